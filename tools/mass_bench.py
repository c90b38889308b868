"""The last-query estimate (column and diagonal mass of the last 64 queries' softmax
against all keys) by the attn_mass kernel against the planner's XLA path, timed in the
same run, for 28 heads (4 kv heads, read in place) at 128k and 1M tokens.

  XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 tools/mass_bench.py --out $OUT/m.json

The kernel's passes are listed by their profiled time; `max_err`: the largest difference
from the XLA path's masses (each row's mass sums to 1). "heads inner": the kernel with
`heads_inner=True` (one call for the 28 heads, a key tile's programs of every head
together), against the kernel under vmap's usual batching. "p in f16": heads inner with
`p_dtype="float16"` (p stored scaled in f16 between passes 2 and 3) against heads inner in
f32, and its largest difference from them. "stride window": heads inner with the grid
stride estimate's `max_offset` (default Grid strides: the first 18433 diagonals; no column
sums, passes 2 and 3 only near the rows) against heads inner, on those diagonals.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import bench, planning, policies
from pallas_kernels.attn_mass import attention_mass
from tools.plan_trace import top_kernels

HEADS, KV_HEADS, ROWS, H = 28, 4, 64, 128
GRID = policies.Grid()  # its default stride range


def inputs(length, seed=0):
  rng = np.random.default_rng(seed)
  k = jnp.asarray(rng.standard_normal((1, length, KV_HEADS, H)), jnp.bfloat16)
  q = jnp.asarray(rng.standard_normal((HEADS, ROWS, H)) * 2, jnp.bfloat16)
  q_lim = jnp.asarray(length - ROWS + np.arange(ROWS), jnp.int32)  # the last queries
  key_lim = jnp.arange(length, dtype=jnp.int32)
  return q, k, key_lim, q_lim


def kernel_fn(scale, heads_inner=False, p_dtype="float32", max_offset=None):
  def one(qh, h, k, key_lim, q_lim):
    index = jnp.stack([jnp.int32(0), h // (HEADS // KV_HEADS)])
    interpret = jax.default_backend() != "gpu"
    return attention_mass(
      qh,
      k,
      key_lim,
      q_lim,
      q_lim,
      scale=scale,
      index=index,
      heads_inner=heads_inner,
      p_dtype=p_dtype,
      max_offset=max_offset,
      interpret=interpret,
    )

  return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, None)))


def xla_fn(scale):
  def one(qh, h, k, key_lim, q_lim):
    kh = k[0, :, h // (HEADS // KV_HEADS)]
    s = jnp.einsum("rh,jh->rj", qh, kh, preferred_element_type=jnp.float32) * scale
    allowed = key_lim[None, :] <= q_lim[:, None]
    p = jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=1)
    return p.sum(0), planning.slash_sums(p, q_lim, kh.shape[0])

  return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, None)))


def max_diff(a, b) -> float:
  """The largest difference between two (col, slash) results (a None col and a slash
  cut short: the first slash sums only)."""
  if a[0] is None or b[0] is None:
    n = min(a[1].shape[-1], b[1].shape[-1])
    return float(jnp.max(jnp.abs(a[1][..., :n] - b[1][..., :n])))
  return max(float(jnp.max(jnp.abs(u - w))) for u, w in zip(a, b, strict=True))


def measure(fn, x):
  """(median ms, {op: profiled ms}) of jitted fn on x."""
  ms = bench.timeit(fn, *x, warmup=2, iters=10)
  return ms, {op: us / 1e3 for op, us in top_kernels(fn, *x)}


def ops_text(passes) -> str:
  return ", ".join(f"{op} {ms:.2f} ms" for op, ms in passes.items())


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="")
  ap.add_argument("--lengths", default="131072,1048576")
  args = ap.parse_args()
  rows = []
  for length in map(int, args.lengths.split(",")):
    q, k, key_lim, q_lim = inputs(length)
    heads = jnp.arange(HEADS, dtype=jnp.int32)
    x = (q, heads, k, key_lim, q_lim)
    ours, ref = kernel_fn(H**-0.5), xla_fn(H**-0.5)
    inner = kernel_fn(H**-0.5, heads_inner=True)
    f16 = kernel_fn(H**-0.5, heads_inner=True, p_dtype="float16")
    n_off = planning.stride_offsets(length, GRID.min_stride, GRID.max_stride)
    window = kernel_fn(H**-0.5, heads_inner=True, max_offset=n_off)
    err, err_inner, err_f16, err_win = (
      max_diff(a(*x), b(*x)) for a, b in ((ours, ref), (inner, ours), (f16, inner), (window, inner))
    )
    t_ours, passes = measure(ours, x)
    t_ref = bench.timeit(ref, *x, warmup=2, iters=10)
    t_inner, passes_inner = measure(inner, x)
    t_f16, passes_f16 = measure(f16, x)
    t_win, passes_win = measure(window, x)
    print(
      f"L={length}: kernel {t_ours:.3f} ms, xla {t_ref:.3f} ms, {t_ref / t_ours:.2f}x, "
      f"max_err {err:.2e}; {ops_text(passes)}",
      flush=True,
    )
    print(
      f"  heads inner: {t_inner:.3f} ms, {t_ours / t_inner:.2f}x the kernel, "
      f"max diff {err_inner:.2e}; {ops_text(passes_inner)}",
      flush=True,
    )
    print(
      f"  p in f16: {t_f16:.3f} ms, {t_inner / t_f16:.2f}x heads inner, "
      f"max diff {err_f16:.2e}; {ops_text(passes_f16)}",
      flush=True,
    )
    print(
      f"  stride window ({n_off} diagonals): {t_win:.3f} ms, {t_inner / t_win:.2f}x heads "
      f"inner, max diff {err_win:.2e}; {ops_text(passes_win)}",
      flush=True,
    )
    rows.append(
      dict(length=length, kernel_ms=t_ours, xla_ms=t_ref, ratio=t_ref / t_ours, max_err=err)
      | dict(kernel_ops_ms=passes, heads_inner_ms=t_inner, heads_inner_ops_ms=passes_inner)
      | dict(heads_inner_vs_kernel=t_ours / t_inner, heads_inner_max_diff=err_inner)
      | dict(p_f16_ms=t_f16, p_f16_vs_f32=t_inner / t_f16, p_f16_max_diff=err_f16)
      | dict(p_f16_ops_ms=passes_f16, window_offsets=n_off, window_ms=t_win)
      | dict(window_vs_heads_inner=t_inner / t_win, window_max_diff=err_win)
      | dict(window_ops_ms=passes_win)
    )
  bench.write_report(args.out, rows)


if __name__ == "__main__":
  main()
