"""Sharded sparse prefill of the Qwen2.5-VL-7B decoder: a mesh of devices against one device.

Hypothesis: sequence-parallel prefill (mesh seq = 2) halves the activation memory per
device and, since every device runs half the heads of each attention call after one
all-to-all, brings the prefill time close to half of one device's; tensor parallel
(heads = 2) halves the weights per device instead, at the cost of two all-reduces of
[B, T, D] per layer.

  python experiments/bench_sharded.py --config=configs/bench_sharded.py \
      --workdir=benchmarks/results/h200x2_sharded          # 2 GPUs (device tool)
  python experiments/bench_sharded.py --config=configs/bench_sharded.py:one \
      --workdir=workdirs/sharded_one                          # 1 GPU: the baseline rows
  python experiments/bench_sharded.py --config=configs/bench_sharded.py:smoke \
      --workdir=/tmp/sharded_smoke                            # CPU, 8 fake devices

benchmarks/results/h200x2_2026-11-30_cublas/README.md has the exact commands of the
committed 2-GPU runs (256k and 1M; meshes 1x1x1, 1x1x2, 1x2x1; this config's xla_flags).

Args: "" (7B shapes, bf16, 256k and 1M tokens, vertical_slash on the pallas backend;
meshes 1x1x1, 1x1x2, 1x2x1), "one" (the one-device rows only), "smoke" (a tiny model on
CPU devices: 1x1x1, 1x1x2, 1x2x1, 2x2x2 at 1024 tokens, xla backend).
`mesh` entries are {data, heads, seq}; each must divide the batch (1), the length, and
heads * seq the 28 query / 4 kv heads (so heads * seq <= 4 for the 7B model).
"""

import ml_collections


def _mesh(data=1, heads=1, seq=1):
  return ml_collections.ConfigDict({"data": data, "heads": heads, "seq": seq})


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in ("", "one", "smoke"):
    raise ValueError(f"configs/bench_sharded.py: unknown arg {arg!r}; use '', one or smoke")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = "qwen2_5_vl_7b"
  c.dtype = "bfloat16"
  c.policy = "vertical_slash"
  c.policy_kwargs = ml_collections.ConfigDict({})
  c.backend = "pallas"
  c.platform = "gpu"  # "cpu": each item's process gets as many fake CPU devices as its mesh
  c.lengths = (262144, 1048576)
  c.meshes = (_mesh(), _mesh(seq=2), _mesh(heads=2))
  c.frame_hw = (16, 16)
  c.text = (96, 64)
  c.block_q = 128
  c.block_k = 64
  c.heads_per_step = 2
  c.mlp_chunk = 65536  # the MLP over 64k tokens of each device at a time (0: all at once)
  c.isolate = True  # each item in its own process (clean peak memory, OOM recorded)
  c.timeout_s = 0  # per item, 0 = none
  c.mem_fraction = 0.95  # gpu: XLA_PYTHON_CLIENT_MEM_FRACTION of each item's process
  # appended to XLA_FLAGS of each item's process. GEMMs on cuBLAS with its heuristics: no
  # autotuning at compile time (bounded compiles at 1M tokens), and 3.9x faster prefills
  # than XLA's Triton GEMMs with autotuning off (benchmarks/results/h200x2_2026-11-30*/).
  c.xla_flags = "--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0"
  c.warmup = 1
  c.iters = 2
  if arg == "one":
    c.meshes = (_mesh(),)
  if arg == "smoke":
    c.model = "tiny_sharded"
    c.dtype = "float32"
    c.backend = "xla"
    c.platform = "cpu"
    c.policy_kwargs = ml_collections.ConfigDict({"vertical_size": 64, "slash_size": 64})
    c.xla_flags = ""
    c.lengths = (1024,)
    c.meshes = (_mesh(), _mesh(seq=2), _mesh(heads=2), _mesh(data=1, heads=2, seq=2))
    c.frame_hw = (4, 4)
    c.text = (32, 16)
    c.block_q = 64
    c.heads_per_step = 0
    c.mlp_chunk = 256
    c.iters = 1
  return c
