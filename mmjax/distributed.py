"""Sharded sparse prefill on a device mesh: jax's `Mesh`, `NamedSharding` and `shard_map`.

The mesh has three named axes (`MeshShape`):

  data   splits the batch.
  heads  splits the attention heads (kv-head groups stay together for GQA) and, in the
         model, the projection and MLP weights (tensor parallel, Megatron style).
  seq    splits the tokens: in the model, every activation outside attention is [B, T/seq,
         ...] on a device (sequence parallel).

Attention (`sharded_sparse_attention`) is head-parallel. Each device holds the full
sequence for `N / (heads * seq)` query heads and the matching `K / (heads * seq)` kv heads,
builds its own plans from its own q/k and runs the kernel on them: no device ever holds
another device's heads, so q/k/v are never gathered. With `seq > 1` the token-sharded
q/k/v are exchanged for head-sharded ones by one all-to-all over the `seq` axis
(DeepSpeed-Ulysses style), and the output goes back the same way:

  q [B/d, T/s, N/h, H]  --all_to_all(seq)-->  [B/d, T, N/(h s), H]  -> plan + kernel
  out [B/d, T, N/(h s), H]  --all_to_all(seq)-->  [B/d, T/s, N/h, H]

A device's head chunk is `c = heads_index * seq + seq_index`: global query heads
[c * N/(h s), (c + 1) * N/(h s)) and kv heads [c * K/(h s), ...), consistent with GQA's
`kv_head = q_head // (N / K)`. An `mminference` table gives different heads different
patterns, while shard_map runs one program on every device: each distinct per-chunk
sub-table becomes a branch of a `lax.switch` on the chunk index (all branches compile,
one runs).

Several hosts: call `jax.distributed.initialize()` first; the mesh then spans every
host's devices (`jax.devices()`), and nothing else changes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.policies import Dense, MMInference, Policy, check_qk

AXES = ("data", "heads", "seq")


@dataclasses.dataclass(frozen=True)
class MeshShape:
  """How many devices each mesh axis has; the mesh uses data * heads * seq devices."""

  data: int = 1
  heads: int = 1
  seq: int = 1

  def __post_init__(self):
    for name in AXES:
      val = getattr(self, name)
      if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
        raise ValueError(f"mesh.{name} must be an int >= 1, got {val!r}")
      object.__setattr__(self, name, int(val))

  @property
  def size(self) -> int:
    return self.data * self.heads * self.seq

  @property
  def head_shards(self) -> int:
    """Devices the heads of one attention call are split over (heads * seq)."""
    return self.heads * self.seq

  @classmethod
  def parse(cls, spec: Any) -> MeshShape:
    """A MeshShape from None (1, 1, 1), a MeshShape, a Mesh, or a mapping / ConfigDict with
    keys among data, heads, seq (unknown keys raise)."""
    if spec is None:
      return cls()
    if isinstance(spec, MeshShape):
      return spec
    if isinstance(spec, Mesh):
      return cls.of(spec)
    if hasattr(spec, "to_dict"):
      spec = spec.to_dict()
    if not isinstance(spec, Mapping):
      raise ValueError(
        f"mesh must be a mapping like {{'data': 1, 'heads': 1, 'seq': 2}}, got {spec!r}"
      )
    unknown = sorted(set(spec) - set(AXES))
    if unknown:
      raise ValueError(f"mesh: unknown key(s) {unknown}; the axes are {list(AXES)}")
    return cls(**dict(spec))

  @classmethod
  def of(cls, mesh: Mesh) -> MeshShape:
    """The shape of a mesh made by `make_mesh` (its axis names must be AXES)."""
    if tuple(mesh.axis_names) != AXES:
      raise ValueError(
        f"mesh axes must be {AXES} (use mmjax.distributed.make_mesh), got {tuple(mesh.axis_names)}"
      )
    return cls(**dict(mesh.shape))

  def check(
    self,
    *,
    batch: int | None = None,
    seq_len: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    where: str = "",
  ) -> None:
    """Raises ValueError when the mesh does not divide the shapes."""
    at = f" ({where})" if where else ""
    if batch is not None and batch % self.data:
      raise ValueError(
        f"mesh.data={self.data} does not divide the batch B={batch}{at}; use a data size "
        f"among {_divisors(batch)}"
      )
    if seq_len is not None and seq_len % self.seq:
      raise ValueError(
        f"mesh.seq={self.seq} does not divide the sequence length T={seq_len}{at}; pad T "
        f"to a multiple of {self.seq} or use a seq size among {_divisors(seq_len)[:8]}"
      )
    for what, count in (("query heads N", num_heads), ("kv heads K", num_kv_heads)):
      if count is not None and count % self.head_shards:
        raise ValueError(
          f"mesh.heads * mesh.seq = {self.heads} * {self.seq} = {self.head_shards} does not "
          f"divide the {what}={count}{at}: attention splits heads over both axes, keeping kv "
          f"groups together; use heads * seq among {_divisors(count)}"
        )


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def make_mesh(shape: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes (data, heads, seq) over the first `shape.size` devices.

  Args:
    shape: a MeshShape or what `MeshShape.parse` takes.
    devices: the devices to use (default `jax.devices()`, every host's after
      `jax.distributed.initialize()`).
  """
  shape = MeshShape.parse(shape)
  devices = list(jax.devices() if devices is None else devices)
  if shape.size > len(devices):
    raise ValueError(
      f"mesh {dataclasses.asdict(shape)} needs {shape.size} devices, {len(devices)} are "
      "available (on the CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N "
      "before jax is imported)"
    )
  arr = np.asarray(devices[: shape.size], dtype=object).reshape(shape.data, shape.heads, shape.seq)
  return Mesh(arr, AXES)


# the layouts of the model's arrays on the mesh
TOKENS = P("data", "seq", None)  # [B, T, D] activations, sequence parallel
QKV = P("data", "seq", "heads", None)  # [B, T, N or K, H] before the all-to-all
BATCH_TOKENS = P("data", "seq")  # [B, T]


def constrain(x, mesh: Mesh, pspec: P):
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, pspec))


# ----------------------------------------------------------------------------------------
# head-parallel sparse attention
# ----------------------------------------------------------------------------------------
def chunk_policies(policy: Policy, num_heads: int, shards: int) -> tuple[Policy, ...]:
  """The policy each head chunk runs: chunk c gets heads [c * n, (c + 1) * n), n =
  num_heads / shards. An mminference table is sliced per chunk; other policies are the
  same for every chunk."""
  if not isinstance(policy, MMInference):
    return (policy,) * shards
  policy.head_policies(num_heads)  # the table must have N heads
  n = num_heads // shards
  return tuple(policy.for_heads(c * n, n) for c in range(shards))


def sharded_sparse_attention(
  q,
  k,
  v,
  policy: Policy | None = None,
  modality=None,
  *,
  mesh: Mesh,
  backend: str = "xla",
  interpret: bool | None = None,
  pallas_options: dict | None = None,
):
  """`mmjax.sparse_attention` split over a mesh's devices by heads (see the module doc).

  Args:
    q: [B, T, N, H] queries; k, v: [B, T, K, H]. Any sharding: inside jit they are laid
      out as [B/data, T/seq, N/heads, H] (and K/heads) per device before the all-to-all,
      so sequence-sharded activations need no gather.
    policy: any policy (an mminference table is sliced per head chunk); None = dense.
    modality: [B, T] int ids or None (all text); every device sees its batch rows whole.
    mesh: from `make_mesh`, axes (data, heads, seq).
    backend, interpret, pallas_options: as `mmjax.sparse_attention` ("cudnn" takes the
      dense policy only).

  Returns:
    [B, T, N, H] in q's dtype, sharded [B/data, T/seq, N/heads, H].
  """
  b, t, n, kh, _ = check_qk(q, k, modality, v)
  shape = MeshShape.of(mesh)
  shape.check(batch=b, seq_len=t, num_heads=n, num_kv_heads=kh, where="sharded attention")
  policy = Dense() if policy is None else policy
  if modality is None:
    modality = jnp.zeros((b, t), jnp.int32)
  opts = tuple(sorted((pallas_options or {}).items()))
  return _sharded(
    q,
    k,
    v,
    modality.astype(jnp.int32),
    policy=policy,
    mesh=mesh,
    backend=backend,
    interpret=interpret,
    options=opts,
  )


@functools.partial(jax.jit, static_argnames=("policy", "mesh", "backend", "interpret", "options"))
def _sharded(q, k, v, modality, *, policy, mesh, backend, interpret, options):
  from mmjax.attention import sparse_attention  # noqa: PLC0415  (attention imports us not)

  shape = MeshShape.of(mesh)
  s = shape.seq
  chunks = chunk_policies(policy, q.shape[2], shape.head_shards)
  distinct = list(dict.fromkeys(chunks))
  branch_of = np.asarray([distinct.index(p) for p in chunks], np.int32)
  kw = dict(backend=backend, interpret=interpret, pallas_options=dict(options) or None)

  def attend(pol, q, k, v, mod):
    return sparse_attention(q, k, v, pol, mod, **kw)

  def local(q, k, v, mod):
    # per device: q [B/d, T/s, N/h, H], k, v [B/d, T/s, K/h, H], mod [B/d, T]
    if s > 1:  # tokens -> heads: [B/d, T/s, N/h, H] -> [B/d, T, N/(h s), H]
      q, k, v = (jax.lax.all_to_all(x, "seq", 2, 1, tiled=True) for x in (q, k, v))
    if len(distinct) == 1:
      out = attend(distinct[0], q, k, v, mod)
    else:  # mminference: this device's head chunk picks its sub-table's branch
      c = jax.lax.axis_index("heads") * s + jax.lax.axis_index("seq")
      branches = [functools.partial(attend, p) for p in distinct]
      out = jax.lax.switch(jnp.asarray(branch_of)[c], branches, q, k, v, mod)
    if s > 1:  # heads -> tokens: [B/d, T, N/(h s), H] -> [B/d, T/s, N/h, H]
      out = jax.lax.all_to_all(out, "seq", 1, 2, tiled=True)
    return out

  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(QKV, QKV, QKV, P("data", None)),
    out_specs=QKV,
    check_vma=False,
  )(q, k, v, modality)


# ----------------------------------------------------------------------------------------
# the model's parameters
# ----------------------------------------------------------------------------------------
# decoder weights split over `heads` (tensor parallel): column-split projections produce
# head-sharded q/k/v and MLP hiddens, row-split ones sum over `heads`. Everything else
# (embeddings, norms, lm_head, the vision tower) is replicated.
_PARAM_SPECS = {
  ("self_attn", "q_proj", "kernel"): P(None, "heads"),
  ("self_attn", "q_proj", "bias"): P("heads"),
  ("self_attn", "k_proj", "kernel"): P(None, "heads"),
  ("self_attn", "k_proj", "bias"): P("heads"),
  ("self_attn", "v_proj", "kernel"): P(None, "heads"),
  ("self_attn", "v_proj", "bias"): P("heads"),
  ("self_attn", "o_proj", "kernel"): P("heads", None),
  ("mlp", "gate_proj", "kernel"): P(None, "heads"),
  ("mlp", "up_proj", "kernel"): P(None, "heads"),
  ("mlp", "down_proj", "kernel"): P("heads", None),
}


def param_specs(params) -> Any:
  """PartitionSpecs for a Qwen2.5-VL parameter tree (arrays or ShapeDtypeStructs)."""

  def one(path, _):
    names = tuple(getattr(p, "key", str(p)) for p in path)
    if any(str(x).startswith("layers_") for x in names):
      return _PARAM_SPECS.get(names[-3:], P())
    return P()

  return jax.tree_util.tree_map_with_path(one, params)


def param_shardings(params, mesh: Mesh) -> Any:
  """NamedShardings for `params` on `mesh`; raises when `heads` does not divide a split
  dimension (e.g. the MLP width)."""
  shape = MeshShape.of(mesh)
  specs = param_specs(params)

  def check(path, x, ps):
    for dim, ax in zip(x.shape, tuple(ps), strict=False):
      if ax == "heads" and dim % shape.heads:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        raise ValueError(
          f"mesh.heads={shape.heads} does not divide {name} (shape {tuple(x.shape)}); "
          f"use heads among {_divisors(dim)}"
        )
    return NamedSharding(mesh, ps)

  return jax.tree_util.tree_map_with_path(check, params, specs)


def shard_params(params, mesh: Mesh):
  """Places `params` on `mesh` (see `param_shardings`)."""
  return jax.device_put(params, param_shardings(params, mesh))
