"""Hugging Face Qwen2.5-VL checkpoints -> Flax params (no torch), and orbax save/restore.

A checkpoint directory holds `config.json` and `model.safetensors` or shards listed in
`model.safetensors.index.json`. Shards are read one at a time through a memory map (the
safetensors format is a JSON header followed by raw little-endian arrays), each tensor is
renamed, transposed where Flax wants [in, out], cast, and put on the device; the host
holds one tensor at a time.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mmjax.models.qwen2_5_vl import Qwen2_5_VLConfig, param_shapes

_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


def read_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) of one .safetensors file; arrays are read-only memory maps."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
      raise ValueError(f"{path}: header length {n} runs past the end of the file")
    header = json.loads(f.read(n))
  mm = np.memmap(path, dtype=np.uint8, mode="r")
  base = 8 + n
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    if meta["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
    dt = np.dtype(_DTYPES[meta["dtype"]])
    lo, hi = meta["data_offsets"]
    shape = tuple(meta["shape"])
    if hi - lo != int(np.prod(shape)) * dt.itemsize or base + hi > size:
      raise ValueError(f"{path}: tensor {name} has inconsistent offsets {lo}..{hi}")
    yield name, mm[base + lo : base + hi].view(dt).reshape(shape)


def shard_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint dir, in index order."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    missing = [s for s in files if not os.path.isfile(os.path.join(path, s))]
    if missing:
      raise FileNotFoundError(f"{path}: shards listed in the index are missing: {missing}")
    return [os.path.join(path, s) for s in files]
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(single):
    return [single]
  raise FileNotFoundError(
    f"{path}: no model.safetensors or model.safetensors.index.json (a Hugging Face "
    "checkpoint dir is expected)"
  )


_VIS = re.compile(r"^(?:model\.)?visual\.(.+)$")
_TXT = re.compile(r"^model\.(?:language_model\.)?(.+)$")


def hf_to_flax_path(name: str) -> tuple[tuple[str, ...], str]:
  """Maps a checkpoint tensor name to (flax param path, kind) with kind one of
  "linear" (transpose), "conv" (flatten + transpose), "plain". Raises on unknown names."""
  if name == "lm_head.weight":
    return ("lm_head", "kernel"), "linear"
  m = _VIS.match(name)
  if m:
    rest = m.group(1)
    if rest == "patch_embed.proj.weight":
      return ("visual", "patch_embed", "kernel"), "conv"
    mb = re.match(
      r"^blocks\.(\d+)\.(?:attn\.)?(norm1|norm2|qkv|proj|mlp\.\w+)\.(weight|bias)$", rest
    )
    if mb:
      i, mod, leaf = mb.groups()
      path = ("visual", f"blocks_{i}", *mod.split("."))
      if mod.startswith("norm"):
        return (*path, "weight"), "plain"
      return (*path, "kernel" if leaf == "weight" else "bias"), (
        "linear" if leaf == "weight" else "plain"
      )
    if rest == "merger.ln_q.weight":
      return ("visual", "merger_ln_q", "weight"), "plain"
    mm = re.match(r"^merger\.mlp\.(\d+)\.(weight|bias)$", rest)
    if mm:
      i, leaf = mm.groups()
      mod = f"merger_mlp_{i}"
      if leaf == "weight":
        return ("visual", mod, "kernel"), "linear"
      return ("visual", mod, "bias"), "plain"
  m = _TXT.match(name)
  if m:
    rest = m.group(1)
    if rest == "embed_tokens.weight":
      return ("embed_tokens", "embedding"), "plain"
    if rest == "norm.weight":
      return ("norm", "weight"), "plain"
    ml = re.match(
      r"^layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn\.\w+|mlp\.\w+)"
      r"\.(weight|bias)$",
      rest,
    )
    if ml:
      i, mod, leaf = ml.groups()
      path = (f"layers_{i}", *mod.split("."))
      if mod.endswith("layernorm"):
        return (*path, "weight"), "plain"
      if leaf == "weight":
        return (*path, "kernel"), "linear"
      return (*path, "bias"), "plain"
  raise ValueError(f"checkpoint tensor {name!r} is not a Qwen2.5-VL parameter")


def _convert(arr: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return arr.T
  if kind == "conv":  # [E, C, tp, p, p] -> [C * tp * p * p, E]
    return arr.reshape(arr.shape[0], -1).T
  return arr


def load_hf_checkpoint(path: str, dtype=jnp.bfloat16, config: Qwen2_5_VLConfig | None = None):
  """Loads a Hugging Face Qwen2.5-VL checkpoint dir into Flax params.

  Args:
    path: dir with config.json and safetensors (one file, or shards + index).
    dtype: the params' dtype (jnp.bfloat16 or jnp.float32).
    config: the model config (default: read from the dir's config.json).

  Returns:
    (config, params): params as `{"params": ...}` for `Qwen2_5_VL.apply`.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint dir {path!r} does not exist")
  if config is None:
    config = Qwen2_5_VLConfig.from_dir(path)
  want = {
    tuple(k.key for k in p)[1:]: leaf
    for p, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(config, dtype))[0]
  }
  tied = config.text.tie_word_embeddings
  got: dict[tuple[str, ...], jax.Array] = {}
  for shard in shard_files(path):
    for name, arr in read_safetensors(shard):
      fpath, kind = hf_to_flax_path(name)
      if tied and fpath == ("lm_head", "kernel"):
        continue  # the tied head is the embedding
      if fpath not in want:
        raise ValueError(
          f"checkpoint tensor {name!r} ({shard}) maps to {'/'.join(fpath)}, which this config "
          f"does not have (layers={config.text.num_layers}, depth={config.vision.depth})"
        )
      arr = _convert(arr, kind)
      if tuple(arr.shape) != tuple(want[fpath].shape):
        raise ValueError(
          f"checkpoint tensor {name!r} has shape {tuple(arr.shape)} after conversion, the "
          f"model expects {tuple(want[fpath].shape)} for {'/'.join(fpath)}"
        )
      got[fpath] = jnp.asarray(np.ascontiguousarray(arr).astype(dtype))
  missing = [p for p in want if p not in got]
  if missing:
    raise ValueError(
      f"{path}: {len(missing)} parameters missing from the checkpoint, e.g. {'/'.join(missing[0])}"
    )
  tree: dict = {}
  for p, v in got.items():
    node = tree
    for k in p[:-1]:
      node = node.setdefault(k, {})
    node[p[-1]] = v
  return config, {"params": tree}


def save_params(path: str, params) -> None:
  """Saves params with orbax (the dir must not exist)."""
  import orbax.checkpoint as ocp

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(path), params)
  ckpt.wait_until_finished()


def restore_params(path: str, like=None):
  """Restores params saved by `save_params`; `like` (a tree of arrays or
  ShapeDtypeStructs) fixes dtypes and shardings."""
  import orbax.checkpoint as ocp

  if not os.path.isdir(path):
    raise FileNotFoundError(f"no orbax checkpoint at {path!r}")
  ckpt = ocp.StandardCheckpointer()
  if like is None:
    return ckpt.restore(os.path.abspath(path))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
  return ckpt.restore(os.path.abspath(path), abstract)
