"""`sparse_attention`: run a policy's plan through a backend.

Backends:
  reference: materialises the [B, N, T, S] mask of `plan.to_dense_mask()` and does a masked
    fp32 softmax. Small inputs only; it is the spec the others are tested against.
  xla: the plan executed blockwise in plain jnp: for every query block, a loop over its
    key-block slots gathers the listed key blocks (through the key permutation, so no
    permuted copy of k/v is made), then the single columns in chunks, with an online
    softmax in fp32. Memory O(T * block), so any length that fits runs on CPU or GPU.
  pallas: `pallas_kernels.sparse_flash` (GPU; interpret mode on the CPU). The plan's
    permutation is applied by a gather before the kernel and undone after it; keys are
    copied per query head only when the plan permutes keys (their order may differ
    between the heads of a kv group).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mmjax import planning
from mmjax.plan import SparsePlan
from mmjax.policies import Dense, Policy, check_qk

BACKENDS = ("reference", "xla", "pallas", "cudnn")
_COL_CHUNK = 64


def sparse_attention(
  q,
  k,
  v,
  policy: Policy | None = None,
  modality=None,
  *,
  backend: str = "xla",
  plan: SparsePlan | None = None,
  return_lse: bool = False,
  interpret: bool | None = None,
  pallas_options: dict | None = None,
):
  """Causal prefill attention computed only where the policy's plan says.

  Args:
    q: [B, T, N, H] queries.
    k, v: [B, S, K, H] keys and values, S == T, N a multiple of K (GQA).
    policy: a policy from `mmjax.policies.get`; not needed when `plan` is given.
    modality: [B, S] int ids (0 text, 1 vision, ...) or None (all text).
    backend: "reference", "xla" or "pallas"; or "cudnn" for the dense policy only (no
      plan: `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`, the
      dense baseline, GPU with bf16/f16 inputs).
    plan: a precomputed plan (from `policy.plan`); built from q, k if None.
    return_lse: also return the log-sum-exp of the scores, [B, N, T] fp32.
    interpret: pallas backend only: run the kernels in interpret mode (default: on CPU).
    pallas_options: pallas backend only: `kernel` ("auto": the Mosaic GPU kernel where it
      runs (a Hopper GPU, bf16/f16, 128x64 or 128x128 plans in identity order without key
      columns: dense, a_shape, block_sparse), the Triton kernel otherwise; "triton";
      "mosaic", an error where it cannot run), Triton knobs (col_chunk, num_warps,
      num_stages, fuse_permutation) and the Mosaic knob mosaic_steps (k/v blocks in
      flight).

  Returns:
    [B, T, N, H] in q's dtype (and the lse when asked).
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
  b, t, n, kh, h = check_qk(q, k, modality, v)
  if backend == "cudnn":
    if plan is not None or not isinstance(policy, Dense):
      raise ValueError(
        "backend='cudnn' runs the dense policy only (policy=Dense(), no plan); "
        "use backend 'xla', 'pallas' or 'reference' for sparse policies"
      )
    if return_lse:
      raise ValueError("return_lse is supported by the 'reference' and 'xla' backends")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  if plan is None:
    if policy is None:
      raise ValueError("give a `policy` (or a precomputed `plan`)")
    plan = policy.plan(q, k, modality)
  if plan.seq_len != t or plan.batch != b or plan.num_heads != n:
    raise ValueError(
      f"plan is for (B, T, N) = {(plan.batch, plan.seq_len, plan.num_heads)}, "
      f"inputs are {(b, t, n)}"
    )
  if backend == "reference":
    out, lse = _reference(q, k, v, plan)
  elif backend == "xla":
    out, lse = _xla(q, k, v, plan)
  else:
    if interpret is None:
      interpret = jax.default_backend() == "cpu"
    out, lse = _pallas(q, k, v, plan, interpret=interpret, options=pallas_options), None
    if return_lse:
      raise ValueError("return_lse is supported by the 'reference' and 'xla' backends")
  return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------
def _precision(dtype):
  """f32 inputs get true f32 matmuls (GPUs otherwise use TF32 for them)."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def masked_attention(q, k, v, mask):
  """Dense softmax attention restricted to `mask` [B, N, T, S], fp32 math.

  Returns (out [B, T, N, H] in q.dtype, lse [B, N, T]).
  """
  prec = _precision(q.dtype)
  n, kh = q.shape[2], k.shape[2]
  g = n // kh
  kr = jnp.repeat(k, g, axis=2).astype(jnp.float32)
  vr = jnp.repeat(v, g, axis=2).astype(jnp.float32)
  # [B, T, N, H] x [B, S, N, H] -> [B, N, T, S]
  s = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kr, precision=prec)
  s = s / math.sqrt(q.shape[-1])
  s = jnp.where(mask, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
  # [B, N, T, S] x [B, S, N, H] -> [B, T, N, H]
  out = jnp.einsum("bnts,bsnh->btnh", p, vr, precision=prec)
  return out.astype(q.dtype), lse


@jax.jit
def _reference(q, k, v, plan):
  return masked_attention(q, k, v, plan.to_dense_mask())


# ----------------------------------------------------------------------------------------
# xla: blockwise gather + online softmax
# ----------------------------------------------------------------------------------------
def _pad_len(x, length):
  pad = length - x.shape[1]
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


@jax.jit
def _xla(q, k, v, plan: SparsePlan):
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  length, bq, bk = plan.padded_len, plan.block_q, plan.block_k
  nq = plan.num_q_blocks
  scale = 1.0 / math.sqrt(h)
  prec = _precision(q.dtype)
  qpos = plan.q_positions()  # [B, N, L]
  kpos = plan.k_positions()
  # queries in view order, by blocks: [B, N, nQ, bq, H]
  qt = _pad_len(q, length).transpose(0, 2, 1, 3)
  qv = jnp.take_along_axis(qt, qpos[..., None], axis=2).astype(jnp.float32) * scale
  qv = qv.reshape(b, n, nq, bq, h)
  qpb = qpos.reshape(b, n, nq, bq)
  kt = _pad_len(k, length).transpose(0, 2, 1, 3)  # [B, K, L, H]
  vt = _pad_len(v, length).transpose(0, 2, 1, 3)
  bi = jnp.arange(b)[:, None, None, None]
  hi = (jnp.arange(n) // g)[None, :, None, None]

  def gather_keys(view_idx):
    """view_idx [B, N, nQ, c] view key indices -> (k, v [B, N, nQ, c, H], positions)."""
    pos = jnp.take_along_axis(kpos, view_idx.reshape(b, n, -1), axis=2).reshape(view_idx.shape)
    return kt[bi, hi, pos].astype(jnp.float32), vt[bi, hi, pos].astype(jnp.float32), pos

  def update(carry, kk, vv, kp, valid):
    m, l, acc = carry
    # [B, N, nQ, bq, H] x [B, N, nQ, c, H] -> [B, N, nQ, bq, c]
    s = jnp.einsum("bnqih,bnqjh->bnqij", qv, kk, precision=prec)
    ok = valid[..., None, :] & (kp[..., None, :] <= qpb[..., :, None])
    s = jnp.where(ok, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.where(ok, jnp.exp(s - m_safe[..., None]), 0.0)
    corr = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
    l = l * corr + p.sum(-1)
    # [B, N, nQ, bq, c] x [B, N, nQ, c, H] -> [B, N, nQ, bq, H]
    acc = acc * corr[..., None] + jnp.einsum("bnqij,bnqjh->bnqih", p, vv, precision=prec)
    return m_new, l, acc

  init = (
    jnp.full((b, n, nq, bq), -jnp.inf, jnp.float32),
    jnp.zeros((b, n, nq, bq), jnp.float32),
    jnp.zeros((b, n, nq, bq, h), jnp.float32),
  )

  def block_step(s, carry):
    blk = plan.block_idx[..., s]  # [B, N, nQ]
    idx = blk[..., None] * bk + jnp.arange(bk)
    kk, vv, kp = gather_keys(idx)
    valid = jnp.broadcast_to((s < plan.block_count)[..., None], idx.shape)
    return update(carry, kk, vv, kp, valid)

  # trip counts are data-dependent (the longest list), so short plans loop less.
  carry = jax.lax.fori_loop(0, plan.block_count.max(), block_step, init)

  mc = plan.max_cols
  if mc:
    chunk = min(_COL_CHUNK, mc)
    n_chunks = -(-mc // chunk)
    cidx = jnp.pad(plan.col_idx, ((0, 0), (0, 0), (0, 0), (0, n_chunks * chunk - mc)))

    def col_step(c, carry):
      sl = jax.lax.dynamic_slice_in_dim(cidx, c * chunk, chunk, axis=3)
      kk, vv, kp = gather_keys(sl)
      valid = (c * chunk + jnp.arange(chunk)) < plan.col_count[..., None]
      return update(carry, kk, vv, kp, valid)

    steps = jnp.minimum((plan.col_count.max() + chunk - 1) // chunk, n_chunks)
    carry = jax.lax.fori_loop(0, steps, col_step, carry)

  m, l, acc = carry
  out = jnp.where(l[..., None] > 0, acc / jnp.maximum(l, 1e-30)[..., None], 0.0)
  lse = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), -jnp.inf)
  out = out.reshape(b, n, length, h)
  lse = lse.reshape(b, n, length)
  inv = jnp.argsort(qpos, axis=-1)  # view index of each original position
  out = jnp.take_along_axis(out, inv[..., None], axis=2)
  lse = jnp.take_along_axis(lse, inv, axis=2)
  return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype), lse[:, :, :t]


# ----------------------------------------------------------------------------------------
# pallas
# ----------------------------------------------------------------------------------------
TRITON_OPTIONS = ("col_chunk", "num_warps", "num_stages", "fuse_permutation")
MOSAIC_OPTIONS = ("mosaic_steps",)
KERNELS = ("auto", "triton", "mosaic")


def mosaic_unsupported(q, plan: SparsePlan, interpret: bool) -> str | None:
  """Why the Mosaic GPU kernel cannot run this plan (None: it can)."""
  from pallas_kernels.sparse_flash import mosaic  # noqa: PLC0415

  if interpret:
    return "it has no interpret mode (interpret=True, or jax's backend is the CPU)"
  dev = jax.devices()[0]
  cap = str(getattr(dev, "compute_capability", ""))
  if dev.platform != "gpu" or not cap.startswith("9."):
    return f"it needs a Hopper GPU (compute capability 9.x), jax has {dev.device_kind!r}"
  if q.dtype not in mosaic.SUPPORTED_DTYPES:
    return f"it takes bfloat16 or float16, got {q.dtype}"
  if q.shape[-1] not in mosaic.SUPPORTED_HEAD_DIMS:
    return f"it takes head_dim in {mosaic.SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}"
  if (plan.block_q, plan.block_k) not in mosaic.SUPPORTED_BLOCKS:
    return (
      f"it takes (block_q, block_k) in {mosaic.SUPPORTED_BLOCKS}, got {plan.block_q}x{plan.block_k}"
    )
  if plan.q_perm is not None or plan.k_perm is not None:
    return "it runs identity-order plans; this plan permutes queries or keys"
  if plan.col_idx.shape[-1]:
    return "it runs key blocks only; this plan has single key columns"
  return None


def pallas_kernel(q, plan: SparsePlan, *, interpret: bool, options=None) -> str:
  """Which kernel backend='pallas' runs for this plan: "mosaic" or "triton".

  kernel="auto" (the default) takes the Mosaic GPU kernel where it runs (see
  `mosaic_unsupported`) unless a Triton knob was given, the Triton kernel otherwise;
  "mosaic" raises where it cannot run. Unknown options and knobs of the kernel not taken
  raise.
  """
  opts = dict(options or {})
  choice = opts.pop("kernel", "auto")
  if choice not in KERNELS:
    raise ValueError(f"pallas_options: kernel={choice!r} is not one of {KERNELS}")
  unknown = set(opts) - set(TRITON_OPTIONS) - set(MOSAIC_OPTIONS)
  if unknown:
    raise ValueError(
      f"pallas_options: unknown {sorted(unknown)}; use kernel, "
      f"{', '.join(TRITON_OPTIONS + MOSAIC_OPTIONS)}"
    )
  triton_knobs = sorted(set(opts) & set(TRITON_OPTIONS))
  mosaic_knobs = sorted(set(opts) & set(MOSAIC_OPTIONS))
  why_not = mosaic_unsupported(q, plan, interpret)
  if choice == "mosaic" and why_not:
    raise ValueError(
      f"pallas_options kernel='mosaic': the Mosaic GPU kernel cannot run this: {why_not}; "
      "kernel='triton' runs every plan"
    )
  if choice == "mosaic" or (choice == "auto" and not why_not and not triton_knobs):
    if triton_knobs:
      raise ValueError(f"pallas_options {triton_knobs} are Triton knobs; kernel='mosaic'")
    return "mosaic"
  if mosaic_knobs:
    raise ValueError(
      f"pallas_options {mosaic_knobs}: the Triton kernel runs this plan"
      + (f" (the Mosaic GPU kernel cannot: {why_not})" if why_not else "")
    )
  return "triton"


def _pallas(q, k, v, plan: SparsePlan, *, interpret: bool, options):
  from pallas_kernels import sparse_flash  # noqa: PLC0415

  if q.dtype not in sparse_flash.SUPPORTED_DTYPES:
    raise ValueError(
      f"backend='pallas' supports dtypes {sparse_flash.SUPPORTED_DTYPES}, got {q.dtype}"
    )
  if q.shape[-1] not in sparse_flash.SUPPORTED_HEAD_DIMS:
    raise ValueError(
      f"backend='pallas' supports head_dim in {sparse_flash.SUPPORTED_HEAD_DIMS}"
      f", got {q.shape[-1]}; use backend='xla'"
    )
  if min(plan.block_q, plan.block_k) < 16:
    raise ValueError("backend='pallas' needs block_q and block_k >= 16")
  opts = dict(options or {})
  if pallas_kernel(q, plan, interpret=interpret, options=opts) == "mosaic":
    return _mosaic_run(q, k, v, plan, steps=opts.get("mosaic_steps", 2))
  return _pallas_run(
    q,
    k,
    v,
    plan,
    interpret=interpret,
    kernel=sparse_flash.sparse_attention,
    options=tuple(sorted((key, val) for key, val in opts.items() if key != "kernel")),
  )


@functools.partial(jax.jit, static_argnames=("steps",))
def _mosaic_run(q, k, v, plan, *, steps):
  from pallas_kernels.sparse_flash import mosaic  # noqa: PLC0415

  t = q.shape[1]
  q, k, v = (_pad_len(x, plan.padded_len) for x in (q, k, v))
  # identity order: padded keys (index >= T) lie after every real query, so the causal
  # mask hides them; padded query rows are dropped.
  out = mosaic.sparse_attention(
    q,
    k,
    v,
    plan.block_idx,
    plan.block_count,
    block_q=plan.block_q,
    block_k=plan.block_k,
    max_concurrent_steps=steps,
  )
  return out[:, :t]


@functools.partial(jax.jit, static_argnames=("interpret", "kernel", "options"))
def _pallas_run(q, k, v, plan, *, interpret, kernel, options):
  t = q.shape[1]
  g = q.shape[2] // k.shape[2]
  length = plan.padded_len
  qpos, kpos = plan.q_positions(), plan.k_positions()
  q, k, v = (_pad_len(x, length) for x in (q, k, v))
  options = dict(options)
  # default: fuse when keys are permuted (grid, 2D boundary: no per-head k/v copies; 18%
  # faster for grid at 128k on the H100); a query-only permutation (Q boundary) ran 4-7%
  # faster as separate gathers (benchmarks/results/h100_2026-11-24/fuse_compare.json).
  fuse = options.pop("fuse_permutation", None)
  fuse = plan.k_perm is not None if fuse is None else fuse
  fuse = fuse and (plan.q_perm is not None or plan.k_perm is not None)
  if fuse:  # the kernel gathers rows by position and scatters its output rows
    qv, kk, vv, kv_pos = q, k, v, kpos
  else:  # view-ordered copies; keys one per q head (a kv group's heads may differ)
    qv = q
    if plan.q_perm is not None:
      qv = jnp.take_along_axis(q, qpos.transpose(0, 2, 1)[..., None], 1)
    if plan.k_perm is None:
      kv_pos, kk, vv = kpos[:, ::g], k, v
    else:
      idx = kpos.transpose(0, 2, 1)[..., None]
      kv_pos = kpos
      kk = jnp.take_along_axis(jnp.repeat(k, g, axis=2), idx, 1)
      vv = jnp.take_along_axis(jnp.repeat(v, g, axis=2), idx, 1)
  out = kernel(
    qv,
    kk,
    vv,
    qpos,
    kv_pos,
    plan.block_idx,
    plan.block_count,
    plan.col_idx,
    plan.col_count,
    block_q=plan.block_q,
    block_k=plan.block_k,
    interpret=interpret,
    fuse_permutation=fuse,
    **options,
  )
  if plan.q_perm is not None and not fuse:
    inv = jnp.argsort(qpos, axis=-1).transpose(0, 2, 1)  # [B, L, N]
    out = jnp.take_along_axis(out, inv[..., None], axis=1)
  return out[:, :t]


def padded_length(seq_len: int, block_q: int, block_k: int) -> int:
  return planning.padded_length(seq_len, block_q, block_k)
