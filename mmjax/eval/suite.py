"""The synthetic VLM attention suite at named sizes (4k to 256k tokens).

Each size is a `synthetic.VideoLayout` (frames of h x w patches with text before, between
and after them); `synthetic.make_batch` plants one head per pattern on it, with the
ground truth (modality, frame stride) in the batch.
"""

from __future__ import annotations

from mmjax import synthetic

# name -> (frames, height, width); text: 64 before, 16 between frames, 64 after.
SIZES = {
  "4k": (14, 16, 16),
  "16k": (58, 16, 16),
  "64k": (58, 32, 32),
  "128k": (117, 32, 32),
  "256k": (234, 32, 32),
}


def layout(size: str) -> synthetic.VideoLayout:
  """The layout of a named size ("4k" ... "256k")."""
  if size not in SIZES:
    raise ValueError(f"size={size!r} is not one of {list(SIZES)}")
  f, h, w = SIZES[size]
  return synthetic.VideoLayout(
    frames=f, height=h, width=w, text_prefix=64, text_between=16, text_suffix=64
  )


def batch(size: str, seed: int = 0, head_kinds=synthetic.HEAD_KINDS, head_dim: int = 128):
  """A planted batch (q, k, v, modality + ground truth) at a named size."""
  return synthetic.make_batch(
    seed=seed, layout=layout(size), head_kinds=tuple(head_kinds), batch=1, head_dim=head_dim
  )
