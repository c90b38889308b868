"""The largest temporary buffers of the compiled Qwen2.5-VL-7B decoder prefill (no run).

Compiles the prefill from embeddings for `--layers` decoder layers at `--length` tokens,
prints XLA's per-device memory plan and the largest values of its temporary arena (from
the buffer-assignment dump), to find what a long prefill's memory goes to.

  python tools/prefill_memory.py --length 262144 --layers 2 --policy vertical_slash
"""

import argparse
import dataclasses
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--length", type=int, default=262144)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--policy", default="vertical_slash")
  ap.add_argument("--backend", default="pallas")
  ap.add_argument("--mlp_chunk", type=int, default=0)
  ap.add_argument("--heads_per_step", type=int, default=2)
  ap.add_argument("--top", type=int, default=25)
  args = ap.parse_args()
  dump = tempfile.mkdtemp(prefix="xla_dump_")
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_module_re=prefill"
  ).strip()

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from mmjax import policies  # noqa: PLC0415
  from mmjax.models.qwen2_5_vl import Qwen2_5_VL, init_params, qwen2_5_vl_7b  # noqa: PLC0415

  cfg = qwen2_5_vl_7b()
  cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=args.layers))
  dt = jnp.bfloat16
  params = jax.eval_shape(lambda: init_params(cfg, dtype=dt))
  pol = policies.get(args.policy, block_q=128, block_k=64, heads_per_step=args.heads_per_step)
  model = Qwen2_5_VL(
    cfg, policy=pol, backend=args.backend, dtype=dt, param_dtype=dt, mlp_chunk=args.mlp_chunk
  )
  t = args.length
  x = jax.ShapeDtypeStruct((1, t, cfg.text.hidden_size), dt)
  pos = jax.ShapeDtypeStruct((3, 1, t), jnp.int32)
  mod = jax.ShapeDtypeStruct((1, t), jnp.int32)

  def prefill(p, x, pos, mod):
    return model.apply(p, x, pos, mod, method="prefill_embeds")[0]

  compiled = jax.jit(prefill).lower(params, x, pos, mod).compile()
  ma = compiled.memory_analysis()
  gb = 2**30
  print(
    f"T={t} layers={args.layers} {args.policy}/{args.backend} on {jax.devices()[0].device_kind}: "
    f"arguments {ma.argument_size_in_bytes / gb:.2f} GB, temp {ma.temp_size_in_bytes / gb:.2f} "
    f"GB ({ma.temp_size_in_bytes / t / 1024:.1f} KB/token)"
  )
  files = sorted(glob.glob(os.path.join(dump, "*prefill*buffer-assignment.txt")))
  if not files:
    print("no buffer-assignment dump found")
    return
  text = open(files[-1]).read()
  temp = text.split("preallocated-temp", 1)[-1].split("\nallocation ", 1)[0]
  vals = re.findall(r"value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\): (\S+)", temp)
  vals.sort(key=lambda v: -int(v[1]))
  print(f"largest of {len(vals)} temp values (size, offset, name, shape):")
  for name, size, off, shape in vals[: args.top]:
    print(f"  {int(size) / gb:7.2f} GB @ {int(off) / gb:7.2f}  {name:40s} {shape}")


if __name__ == "__main__":
  main()
