#!/usr/bin/env bash
# Validates the core on the device machine (jax 0.11.2): the test suite on the GPU backend,
# whether jaxlib accepts the CPU YNN flag, and whether its CPU backend shows the race.
set -u
. "$(dirname "$0")/device_env.sh" || exit 1
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices())"
echo "== flag accepted by jaxlib on CPU?"
XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= JAX_PLATFORMS=cpu python3 -c "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))" 2>&1 | tail -2
echo "== CPU determinism without the flag (jaxlib 0.11.2)"
MMJAX_KEEP_XLA_FLAGS=1 JAX_PLATFORMS=cpu python3 tools/determinism.py 2>&1 | tail -3
echo "== tests on the GPU backend"
timeout 420 python3 -m pytest -q -x -n 4 -p no:cacheprovider tests 2>&1 | tail -15
