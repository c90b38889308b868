"""Qwen2.5-VL input processing in numpy (PIL for resizing).

Turns a prompt plus uint8 images / videos into the arrays the model takes:

  * pixels: each image (or video) is resized so both sides are multiples of
    patch_size * merge_size (`smart_resize`), scaled to [0, 1], normalised with the CLIP
    mean/std, padded in time to a multiple of temporal_patch_size by repeating the last
    frame, and cut into [P, C * tp * p * p] patch rows in the order transformers'
    Qwen2-VL processors emit them (`pixel_values` / `pixel_values_videos`);
  * text: each `<|image_pad|>` / `<|video_pad|>` placeholder becomes one token per merged
    vision token, grid_t * grid_h * grid_w / merge_size**2 of them;
  * positions: the 3D mRoPE ids of Qwen2.5-VL (`rope_index`) and a [B, T] modality map.

Patch row layout. With frames [T, H, W, C] (T padded to gt * tp) and gh = H / p,
gw = W / p, row r and column c of the patch matrix are

  r = ((t * gh/m + bh) * gw/m + bw) * m * m + mh * m + mw
  c = ((ch * tp + k) * p + y) * p + x
  value = frames[t * tp + k, (bh * m + mh) * p + y, (bw * m + mw) * p + x, ch]

so the m x m patches that the vision tower merges into one language token are adjacent
rows, and the merged tokens come in raster order, frame group by frame group.

The resizing follows transformers' PIL ("slow") image processor, including for video
frames (transformers' video processor resizes with torchvision instead, so its video
pixels can differ in the last bits; the grid and layout are the same). Frames are used
as given: sampling a video at some fps is the caller's job, and `video_fps` must say
the rate of the frames passed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
DEFAULT_SYSTEM = "You are a helpful assistant."

TEXT_START_MODES = ("grid", "max")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_pos_int(name: str, value) -> int:
  if not _is_int(value) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


# ----------------------------------------------------------------------------- resizing


def smart_resize(
  height: int,
  width: int,
  factor: int = 28,
  min_pixels: int = 56 * 56,
  max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
  """The size Qwen2-VL / Qwen2.5-VL resize an image to.

  Each side is rounded to the nearest multiple of `factor`; if the area then exceeds
  `max_pixels` (falls below `min_pixels`), both sides are instead scaled down (up) by
  the same ratio to fit and floored (ceiled) to multiples of `factor` (never below
  `factor` when scaling down). The aspect ratio is kept as well as that allows.

  Args:
    height, width: the input size in pixels (positive ints).
    factor: the side multiple, patch_size * merge_size (28 for Qwen2.5-VL).
    min_pixels, max_pixels: the allowed area range, min_pixels <= max_pixels.

  Returns:
    (resized_height, resized_width), both multiples of `factor`.

  Raises:
    ValueError: on non-positive or non-int arguments, min_pixels > max_pixels, or an
      aspect ratio (long side / short side) above 200, which Qwen does not accept.
  """
  height = _check_pos_int("height", height)
  width = _check_pos_int("width", width)
  factor = _check_pos_int("factor", factor)
  min_pixels = _check_pos_int("min_pixels", min_pixels)
  max_pixels = _check_pos_int("max_pixels", max_pixels)
  if min_pixels > max_pixels:
    raise ValueError(f"min_pixels ({min_pixels}) must be <= max_pixels ({max_pixels})")
  ratio = max(height, width) / min(height, width)
  if ratio > 200:
    raise ValueError(
      f"image of {height}x{width} has aspect ratio {ratio:.1f}; Qwen accepts at most 200 "
      "(crop or pad the image first)"
    )
  # Python's round (half to even), as Qwen uses it.
  h = round(height / factor) * factor
  w = round(width / factor) * factor
  if h * w > max_pixels:
    scale = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / scale / factor) * factor)
    w = max(factor, math.floor(width / scale / factor) * factor)
  elif h * w < min_pixels:
    scale = math.sqrt(min_pixels / (height * width))
    h = math.ceil(height * scale / factor) * factor
    w = math.ceil(width * scale / factor) * factor
  return h, w


# ----------------------------------------------------------------------------- config


_REQUIRED_FLAGS = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
  """Pixel and token settings of the Qwen2.5-VL processor.

  Defaults are transformers' Qwen2-VL image / video processor class defaults (real
  checkpoints override the pixel ranges: use `from_dir`).

  Attributes:
    patch_size: spatial patch side p of the vision tower.
    temporal_patch_size: frames per temporal patch tp.
    merge_size: m; m x m patches merge into one language token.
    min_pixels, max_pixels: area range of a resized image.
    video_min_pixels, video_max_pixels: area range of a resized video frame.
    image_mean, image_std: per-channel (RGB) normalisation, applied after scaling to [0, 1].
    vision_start_token ... endoftext_token: the special-token strings.
  """

  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  video_min_pixels: int = 128 * 28 * 28
  video_max_pixels: int = 768 * 28 * 28
  image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  image_std: tuple[float, float, float] = OPENAI_CLIP_STD
  vision_start_token: str = VISION_START
  vision_end_token: str = VISION_END
  image_token: str = IMAGE_PAD
  video_token: str = VIDEO_PAD
  im_start_token: str = IM_START
  im_end_token: str = IM_END
  endoftext_token: str = ENDOFTEXT

  def __post_init__(self):
    for name in (
      "patch_size",
      "temporal_patch_size",
      "merge_size",
      "min_pixels",
      "max_pixels",
      "video_min_pixels",
      "video_max_pixels",
    ):
      _check_pos_int(f"ProcessorConfig.{name}", getattr(self, name))
    for lo, hi in (("min_pixels", "max_pixels"), ("video_min_pixels", "video_max_pixels")):
      if getattr(self, lo) > getattr(self, hi):
        raise ValueError(
          f"ProcessorConfig.{lo} ({getattr(self, lo)}) must be <= {hi} ({getattr(self, hi)})"
        )
    for name in ("image_mean", "image_std"):
      value = getattr(self, name)
      if len(value) != 3 or not all(isinstance(v, (int, float, np.number)) for v in value):
        raise ValueError(f"ProcessorConfig.{name} must be 3 floats (RGB), got {value!r}")
      object.__setattr__(self, name, tuple(float(v) for v in value))
    if min(self.image_std) <= 0:
      raise ValueError(f"ProcessorConfig.image_std must be positive, got {self.image_std}")

  @property
  def factor(self) -> int:
    """The side multiple of resized images: patch_size * merge_size."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    """Columns of a patch row: 3 * temporal_patch_size * patch_size**2."""
    return 3 * self.temporal_patch_size * self.patch_size**2

  def tokens_for_grid(self, grid_thw) -> int:
    """Language tokens of one image/video: grid_t * grid_h * grid_w / merge_size**2."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (self.merge_size**2)

  @classmethod
  def from_dir(cls, path: str) -> ProcessorConfig:
    """Reads the processor settings of a Hugging Face Qwen2.5-VL checkpoint directory.

    The image settings come from `preprocessor_config.json`, the video settings from
    `video_preprocessor_config.json`. As in transformers, a nested `processor_config.json`
    ("image_processor" / "video_processor" entries) takes priority, and without any video
    file the video processor reads the image file (so the video pixel range is then the
    image one). Pixel ranges are read from `min_pixels` / `max_pixels`, else from
    `size: {shortest_edge, longest_edge}`, else the class defaults. Keys this processor
    does not use are ignored.

    Args:
      path: the checkpoint directory.

    Returns:
      The config.

    Raises:
      FileNotFoundError: no `preprocessor_config.json` (nor nested image entry).
      ValueError: a setting this processor cannot honour (resizing, rescaling, normalising
        or RGB conversion turned off, another rescale factor or resampling filter), or
        video patch / normalisation settings that differ from the image ones.
    """
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path!r} is not a directory (expected a checkpoint directory)")
    nested = {}
    nested_path = os.path.join(path, "processor_config.json")
    if os.path.isfile(nested_path):
      nested = _read_json(nested_path)
    image_d = nested.get("image_processor")
    if image_d is None:
      image_path = os.path.join(path, "preprocessor_config.json")
      if not os.path.isfile(image_path):
        raise FileNotFoundError(
          f"no preprocessor_config.json in {path!r}: give the directory of a Hugging Face "
          "Qwen2.5-VL checkpoint, or build ProcessorConfig(...) directly"
        )
      image_d = _read_json(image_path)
    video_d = nested.get("video_processor")
    if video_d is None:
      video_path = os.path.join(path, "video_preprocessor_config.json")
      video_d = _read_json(video_path) if os.path.isfile(video_path) else image_d
    _check_supported(image_d, "image")
    _check_supported(video_d, "video")

    defaults = cls()
    fields = {}
    for key in ("patch_size", "temporal_patch_size", "merge_size"):
      fields[key] = image_d.get(key, getattr(defaults, key))
      if video_d.get(key, fields[key]) != fields[key]:
        raise ValueError(
          f"{key} differs between the image ({fields[key]}) and video "
          f"({video_d[key]}) processor configs; this processor uses one value for both"
        )
    for key in ("image_mean", "image_std"):
      value = tuple(image_d.get(key, getattr(defaults, key)))
      if not np.allclose(video_d.get(key, value), value):
        raise ValueError(
          f"{key} differs between the image ({value}) and video ({video_d[key]}) processor "
          "configs; this processor uses one value for both"
        )
      fields[key] = value
    fields["min_pixels"], fields["max_pixels"] = _pixel_range(
      image_d, defaults.min_pixels, defaults.max_pixels, "image"
    )
    fields["video_min_pixels"], fields["video_max_pixels"] = _pixel_range(
      video_d, defaults.video_min_pixels, defaults.video_max_pixels, "video"
    )
    return cls(**fields)


def _read_json(path: str) -> dict:
  with open(path) as f:
    d = json.load(f)
  if not isinstance(d, dict):
    raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
  return d


def _check_supported(d: Mapping[str, Any], kind: str) -> None:
  for key in _REQUIRED_FLAGS:
    if d.get(key, True) is False:
      raise ValueError(
        f"the {kind} processor config sets {key}=false; this processor always does it"
      )
  if "rescale_factor" in d and not math.isclose(d["rescale_factor"], 1 / 255, rel_tol=1e-6):
    raise ValueError(
      f"the {kind} processor config sets rescale_factor={d['rescale_factor']}; only 1/255 "
      "is supported"
    )
  if "resample" in d and d["resample"] != 3:
    raise ValueError(
      f"the {kind} processor config sets resample={d['resample']}; only 3 (bicubic) is supported"
    )


def _pixel_range(d: Mapping[str, Any], lo: int, hi: int, kind: str) -> tuple[int, int]:
  # transformers: `size` first, then min_pixels / max_pixels override it.
  size = d.get("size")
  if size is not None:
    if not isinstance(size, Mapping) or not {"shortest_edge", "longest_edge"} <= set(size):
      raise ValueError(
        f"the {kind} processor config has size={size!r}; expected "
        "{'shortest_edge': min_pixels, 'longest_edge': max_pixels}"
      )
    lo, hi = size["shortest_edge"], size["longest_edge"]
  lo = d.get("min_pixels") if d.get("min_pixels") is not None else lo
  hi = d.get("max_pixels") if d.get("max_pixels") is not None else hi
  return lo, hi


# ----------------------------------------------------------------------------- pixels


def _check_image(image, name: str) -> np.ndarray:
  if not isinstance(image, np.ndarray):
    raise ValueError(
      f"{name} must be a numpy uint8 array [H, W, 3], got {type(image).__name__} "
      "(for a PIL image use np.asarray(img.convert('RGB')))"
    )
  if image.dtype != np.uint8:
    raise ValueError(
      f"{name} must have dtype uint8 (0..255 RGB), got {image.dtype}; convert floats in [0, 1] "
      "with (x * 255).round().astype(np.uint8)"
    )
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
      f"{name} must be [H, W, 3] (channels last, RGB), got shape {image.shape}; "
      "grey images: np.repeat(x[..., None], 3, -1); RGBA: drop or composite the alpha"
    )
  return image


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [height, width, 3], PIL bicubic."""
  if image.shape[:2] == (height, width):
    return image  # PIL returns an identical copy for the same size
  out = Image.fromarray(np.ascontiguousarray(image)).resize(
    (width, height), resample=Image.Resampling.BICUBIC
  )
  return np.asarray(out)


def _normalize(frames: np.ndarray, cfg: ProcessorConfig) -> np.ndarray:
  """uint8 [..., 3] -> float32: scaled by 1/255 in float64, then (x - mean) / std in float32
  (the arithmetic of transformers' numpy rescale / normalize, bit for bit)."""
  x = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
  mean = np.asarray(cfg.image_mean, np.float32)
  std = np.asarray(cfg.image_std, np.float32)
  return (x - mean) / std


def _patchify(frames: np.ndarray, cfg: ProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
  """float32 [F, H, W, C] (H, W multiples of p * m) -> patches [P, C*tp*p*p], grid [3]."""
  f, h, w, c = frames.shape
  p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
  pad = -f % tp
  if pad:
    frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
  gt, gh, gw = (f + pad) // tp, h // p, w // p
  x = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
  # -> (t, block row, block col, row in block, col in block, channel, frame in tp, y, x)
  x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
  patches = np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p)
  return patches, np.array([gt, gh, gw], dtype=np.int64)


def patchify_image(image: np.ndarray, cfg: ProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
  """One image -> its patch rows, as transformers' Qwen2-VL PIL image processor makes them.

  Args:
    image: uint8 [H, W, 3] RGB.
    cfg: the processor config (patch sizes, image pixel range, mean / std).

  Returns:
    patches: float32 [grid_h * grid_w, 3 * tp * p * p] (the frame repeated tp times in time).
    grid_thw: int64 [3], (1, grid_h, grid_w) in patches.
  """
  image = _check_image(image, "image")
  h, w = smart_resize(image.shape[0], image.shape[1], cfg.factor, cfg.min_pixels, cfg.max_pixels)
  frames = _normalize(_resize(image, h, w), cfg)[None]
  return _patchify(frames, cfg)


def patchify_video(frames: np.ndarray, cfg: ProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
  """One video -> its patch rows (the layout of transformers' Qwen2-VL video processor).

  All frames are resized (PIL bicubic) to the one size `smart_resize` gives for the
  video pixel range; the frame count is padded to a multiple of temporal_patch_size by
  repeating the last frame.

  Args:
    frames: uint8 [F, H, W, 3] RGB, F >= 1, already sampled at the rate the caller will
      pass as `video_fps`.
    cfg: the processor config.

  Returns:
    patches: float32 [grid_t * grid_h * grid_w, 3 * tp * p * p].
    grid_thw: int64 [3], (ceil(F / tp), grid_h, grid_w).
  """
  if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[0] < 1:
    shape = getattr(frames, "shape", type(frames).__name__)
    raise ValueError(f"frames must be a numpy uint8 array [F, H, W, 3] with F >= 1, got {shape}")
  _check_image(frames[0], "frames[0]")
  h, w = smart_resize(
    frames.shape[1], frames.shape[2], cfg.factor, cfg.video_min_pixels, cfg.video_max_pixels
  )
  resized = np.stack([_resize(fr, h, w) for fr in frames])
  return _patchify(_normalize(resized, cfg), cfg)


# ----------------------------------------------------------------------------- text


class Tokenizer:
  """A Hugging Face `tokenizer.json` (through the `tokenizers` library) with Qwen's ids.

  Args:
    path: a checkpoint directory holding `tokenizer.json`, or the file itself.
    cfg: where the special-token strings come from (default: Qwen's).

  Attributes:
    vision_start_token_id, vision_end_token_id, image_token_id, video_token_id,
    im_start_token_id, im_end_token_id, endoftext_token_id: the special-token ids.

  Raises:
    FileNotFoundError: no tokenizer.json there.
    ValueError: a special token is not in the vocabulary, or is not kept as one id.
  """

  def __init__(self, path: str, cfg: ProcessorConfig | None = None):
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise FileNotFoundError(
        f"no tokenizer.json at {path!r}: give a Hugging Face checkpoint directory containing "
        "tokenizer.json, or the path of that file"
      )
    self._tok = tokenizers.Tokenizer.from_file(file)
    cfg = ProcessorConfig() if cfg is None else cfg
    self.vision_start_token_id = self._special_id(cfg.vision_start_token)
    self.vision_end_token_id = self._special_id(cfg.vision_end_token)
    self.image_token_id = self._special_id(cfg.image_token)
    self.video_token_id = self._special_id(cfg.video_token)
    self.im_start_token_id = self._special_id(cfg.im_start_token)
    self.im_end_token_id = self._special_id(cfg.im_end_token)
    self.endoftext_token_id = self._special_id(cfg.endoftext_token)

  def _special_id(self, token: str) -> int:
    tid = self._tok.token_to_id(token)
    if tid is None:
      raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
    if self.encode(token) != [tid]:
      raise ValueError(
        f"special token {token!r} is not encoded as the single id {tid} (got "
        f"{self.encode(token)}); it must be an added token of tokenizer.json"
      )
    return tid

  @property
  def vocab_size(self) -> int:
    """Vocabulary size including added tokens."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Text -> token ids; special tokens in the text stay single ids, nothing is added.

    Args:
      text: the string.

    Returns:
      The ids, a list of ints.
    """
    if not isinstance(text, str):
      raise ValueError(f"text must be a str, got {type(text).__name__}")
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Token ids -> text.

    Args:
      ids: a sequence (or 1D array) of ints.
      skip_special_tokens: drop special tokens (True for a model's answer).

    Returns:
      The text.
    """
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def chat_prompt(
  question: str, *, images: int = 0, videos: int = 0, system: str = DEFAULT_SYSTEM
) -> str:
  """Qwen2.5-VL's chat format for one user turn, ready for the assistant's answer.

  Equal to the checkpoints' chat template applied to a system message and one user
  message whose content is `images` image items, `videos` video items, then the text,
  with the generation prompt added:

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n(<|vision_start|><|image_pad|><|vision_end|>)*images
    (<|vision_start|><|video_pad|><|vision_end|>)*videos{question}<|im_end|>\\n
    <|im_start|>assistant\\n

  Args:
    question: the user's text.
    images, videos: numbers of image / video placeholders (>= 0).
    system: the system message (the template's default when not given).

  Returns:
    The prompt string (placeholders not yet expanded; `Processor` does that).
  """
  for name, value in (("question", question), ("system", system)):
    if not isinstance(value, str):
      raise ValueError(f"{name} must be a str, got {type(value).__name__}")
  for name, value in (("images", images), ("videos", videos)):
    if not _is_int(value) or value < 0:
      raise ValueError(f"{name} must be an int >= 0, got {value!r}")
  vision = (VISION_START + IMAGE_PAD + VISION_END) * images
  vision += (VISION_START + VIDEO_PAD + VISION_END) * videos
  return (
    f"{IM_START}system\n{system}{IM_END}\n"
    f"{IM_START}user\n{vision}{question}{IM_END}\n"
    f"{IM_START}assistant\n"
  )


# ----------------------------------------------------------------------------- mRoPE


def _grids(value, name: str) -> np.ndarray:
  if value is None:
    return np.zeros((0, 3), np.int64)
  g = np.asarray(value)
  if g.size == 0:
    return np.zeros((0, 3), np.int64)
  if g.ndim != 2 or g.shape[1] != 3 or not np.issubdtype(g.dtype, np.integer) or (g <= 0).any():
    raise ValueError(f"{name} must be positive ints [n, 3] (t, h, w per item), got {g.tolist()}")
  return g.astype(np.int64)


def rope_index(
  input_ids,
  image_grid_thw=None,
  video_grid_thw=None,
  second_per_grid_ts=None,
  *,
  spatial_merge_size: int,
  tokens_per_second: float,
  image_token_id: int,
  video_token_id: int,
  vision_start_token_id: int,
  attention_mask=None,
  text_start: str = "grid",
) -> tuple[np.ndarray, np.ndarray]:
  """Qwen2.5-VL's 3D (temporal, height, width) mRoPE position ids.

  Text tokens get the same running index on all three rows. A vision item (a run of
  grid_t * grid_h * grid_w / m**2 image or video pad tokens, right after a vision-start
  token; items are taken in order, row after row) at running index s gets, for merged
  token (t, i, j) of its llm grid (grid_t, grid_h / m, grid_w / m):

    temporal = s + int(t * interval), height = s + i, width = s + j

  with interval = tokens_per_second * second_per_grid_t for a video (float32 arithmetic,
  truncated, as transformers does with the processor's float32 second_per_grid_ts)
  and 1 for an image. The text after an item resumes at:

    text_start="grid": s + max(grid_h, grid_w) / m (transformers 5.x `get_rope_index`);
    text_start="max": 1 + the largest id of the item over all three rows (Qwen's
      original code: transformers <= 5.2 and the ports derived from it). The two differ
      only for videos whose last temporal id exceeds the spatial extent, where "grid"
      makes the following text reuse ids of the video's later frames.

  Args:
    input_ids: int [B, T].
    image_grid_thw: int [n_img, 3] or None.
    video_grid_thw: int [n_vid, 3] or None.
    second_per_grid_ts: [n_vid] seconds per temporal patch (temporal_patch_size / fps);
      required when there are videos.
    spatial_merge_size: m.
    tokens_per_second: temporal ids per second (vision_config.tokens_per_second).
    image_token_id, video_token_id, vision_start_token_id: the special ids.
    attention_mask: optional 0/1 [B, T]; masked tokens are skipped and get position 0.
    text_start: "grid" or "max", see above.

  Returns:
    position_ids: int64 [3, B, T].
    rope_deltas: int64 [B], max position + 1 - number of unmasked tokens (the offset of
      the next decoded token's position from its index).
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"input_ids must be an int array [B, T], got {ids.dtype} {ids.shape}")
  if text_start not in TEXT_START_MODES:
    raise ValueError(f"text_start={text_start!r} is not one of {TEXT_START_MODES}")
  m = _check_pos_int("spatial_merge_size", spatial_merge_size)
  if not isinstance(tokens_per_second, (int, float, np.number)) or tokens_per_second <= 0:
    raise ValueError(f"tokens_per_second must be a positive number, got {tokens_per_second!r}")
  img = _grids(image_grid_thw, "image_grid_thw")
  vid = _grids(video_grid_thw, "video_grid_thw")
  for name, g in (("image_grid_thw", img), ("video_grid_thw", vid)):
    if (g[:, 1:] % m).any():
      raise ValueError(f"{name} h and w must be multiples of spatial_merge_size={m}, got {g}")
  if len(vid):
    if second_per_grid_ts is None:
      raise ValueError(
        "second_per_grid_ts is required with videos: temporal_patch_size / fps per video"
      )
    spg = np.asarray(second_per_grid_ts, dtype=np.float32).reshape(-1)
    if spg.shape != (len(vid),) or not (spg >= 0).all():
      raise ValueError(
        f"second_per_grid_ts must hold {len(vid)} non-negative values (one per video), "
        f"got {np.asarray(second_per_grid_ts).tolist()}"
      )
    intervals = np.float32(tokens_per_second) * spg
  b, t = ids.shape
  if attention_mask is None:
    mask = np.ones((b, t), bool)
  else:
    mask = np.asarray(attention_mask)
    if mask.shape != (b, t) or not np.isin(mask, (0, 1)).all():
      raise ValueError(f"attention_mask must be 0/1 of shape {(b, t)}, got {mask.shape}")
    mask = mask.astype(bool)

  position_ids = np.zeros((3, b, t), np.int64)
  rope_deltas = np.zeros((b,), np.int64)
  next_item = {image_token_id: 0, video_token_id: 0}
  grids = {image_token_id: img, video_token_id: vid}
  names = {image_token_id: "image", video_token_id: "video"}
  for row in range(b):
    keep = np.flatnonzero(mask[row])
    seq = ids[row, keep]
    n = len(seq)
    if n == 0:
      raise ValueError(f"row {row} of input_ids has no unmasked tokens")
    is_vis = (seq == image_token_id) | (seq == video_token_id)
    out = np.empty((3, n), np.int64)
    cur = 0
    i = 0
    while i < n:
      if not is_vis[i]:
        j = i + int(np.argmax(is_vis[i:])) if is_vis[i:].any() else n
        out[:, i:j] = cur + np.arange(j - i)
        cur += j - i
        i = j
        continue
      tok = int(seq[i])
      k = next_item[tok]
      if k >= len(grids[tok]):
        raise ValueError(
          f"input_ids hold more {names[tok]} items than the {len(grids[tok])} grids of "
          f"{names[tok]}_grid_thw (row {row}, token {keep[i]})"
        )
      if i == 0 or seq[i - 1] != vision_start_token_id:
        raise ValueError(
          f"the {names[tok]} pad tokens at row {row}, token {keep[i]} do not follow a "
          f"vision-start token ({vision_start_token_id}): each item is "
          "<vision_start> + its pad tokens + <vision_end>"
        )
      gt, gh, gw = (int(v) for v in grids[tok][k])
      lh, lw = gh // m, gw // m
      count = gt * lh * lw
      if i + count > n or (seq[i : i + count] != tok).any():
        run = int(np.argmin(np.append(seq[i:] == tok, False)))
        raise ValueError(
          f"{names[tok]} {k} (grid {[gt, gh, gw]}) needs {count} pad tokens at row {row}, "
          f"token {keep[i]}, found a run of {run}"
        )
      if tok == video_token_id:
        temporal = (np.arange(gt, dtype=np.float32) * intervals[k]).astype(np.int64)
      else:
        temporal = np.arange(gt, dtype=np.int64)
      block = np.stack(
        [
          np.repeat(temporal, lh * lw),
          np.tile(np.repeat(np.arange(lh), lw), gt),
          np.tile(np.arange(lw), gt * lh),
        ]
      )
      out[:, i : i + count] = block + cur
      cur = cur + max(lh, lw) if text_start == "grid" else int(out[:, i : i + count].max()) + 1
      next_item[tok] += 1
      i += count
    position_ids[:, row, keep] = out
    rope_deltas[row] = int(out.max()) + 1 - n
  for tok, g in grids.items():
    if next_item[tok] != len(g):
      raise ValueError(
        f"{names[tok]}_grid_thw has {len(g)} grids but input_ids hold {next_item[tok]} "
        f"{names[tok]} items"
      )
  return position_ids, rope_deltas


# ----------------------------------------------------------------------------- processor


def _as_list(value, name: str, ndim: int, what: str) -> list[np.ndarray]:
  if value is None:
    return []
  if isinstance(value, np.ndarray):
    if value.ndim == ndim:
      return [value]
    raise ValueError(
      f"{name} must be one {what} or a list of them, got an array of shape {value.shape}"
    )
  if isinstance(value, (list, tuple)):
    return list(value)
  raise ValueError(f"{name} must be one {what} or a list of them, got {type(value).__name__}")


class Processor:
  """Prompt(s) + images + videos -> Qwen2.5-VL model inputs as numpy arrays.

  Args:
    tokenizer: a `Tokenizer`.
    cfg: the `ProcessorConfig`.
    tokens_per_second: vision_config.tokens_per_second of the model (2 for the released
      Qwen2.5-VL checkpoints).
    text_start: where text resumes after a vision item in the mRoPE ids, see `rope_index`
      ("grid" matches transformers 5.x).
  """

  def __init__(
    self,
    tokenizer: Tokenizer,
    cfg: ProcessorConfig | None = None,
    tokens_per_second: float = 2,
    text_start: str = "grid",
  ):
    if not isinstance(tokenizer, Tokenizer):
      raise ValueError(f"tokenizer must be a Tokenizer, got {type(tokenizer).__name__}")
    if not isinstance(tokens_per_second, (int, float)) or tokens_per_second <= 0:
      raise ValueError(f"tokens_per_second must be a positive number, got {tokens_per_second!r}")
    if text_start not in TEXT_START_MODES:
      raise ValueError(f"text_start={text_start!r} is not one of {TEXT_START_MODES}")
    self.tokenizer = tokenizer
    self.cfg = ProcessorConfig() if cfg is None else cfg
    self.tokens_per_second = tokens_per_second
    self.text_start = text_start

  @classmethod
  def from_dir(
    cls, path: str, *, tokens_per_second: float | None = None, text_start: str = "grid"
  ) -> Processor:
    """A processor from a Hugging Face Qwen2.5-VL checkpoint directory.

    Reads tokenizer.json, the processor configs (`ProcessorConfig.from_dir`) and, unless
    `tokens_per_second` is given, `vision_config.tokens_per_second` of config.json (whose
    merge size and special-token ids, where present, must agree with the others).

    Args:
      path: the checkpoint directory.
      tokens_per_second: overrides config.json's value (then config.json is not read).
      text_start: see `rope_index`.

    Returns:
      The processor.
    """
    cfg = ProcessorConfig.from_dir(path)
    tokenizer = Tokenizer(path, cfg)
    if tokens_per_second is None:
      config_path = os.path.join(path, "config.json")
      if not os.path.isfile(config_path):
        raise FileNotFoundError(
          f"no config.json in {path!r} to read vision_config.tokens_per_second from; "
          "pass tokens_per_second= (2 for Qwen2.5-VL)"
        )
      model_cfg = _read_json(config_path)
      vision = model_cfg.get("vision_config", {})
      if "tokens_per_second" not in vision:
        raise ValueError(
          f"{config_path} has no vision_config.tokens_per_second; pass tokens_per_second="
        )
      tokens_per_second = vision["tokens_per_second"]
      merge = vision.get("spatial_merge_size", cfg.merge_size)
      if merge != cfg.merge_size:
        raise ValueError(
          f"config.json spatial_merge_size={merge} but the processor merge_size={cfg.merge_size}"
        )
      for key in ("image_token_id", "video_token_id", "vision_start_token_id"):
        if key in model_cfg and model_cfg[key] != getattr(tokenizer, key):
          raise ValueError(
            f"config.json {key}={model_cfg[key]} but the tokenizer gives {getattr(tokenizer, key)}"
          )
    return cls(tokenizer, cfg, tokens_per_second=tokens_per_second, text_start=text_start)

  def __call__(
    self,
    text: str | Sequence[str],
    images=None,
    videos=None,
    video_fps: float | Sequence[float] = 2.0,
  ) -> dict[str, np.ndarray]:
    """Tokenise, expand the vision placeholders, patchify the pixels, build positions.

    Images and videos fill the `<|image_pad|>` / `<|video_pad|>` placeholders in order,
    through the texts of the batch one after the other (as transformers does).

    Args:
      text: one prompt or a list of B prompts (see `chat_prompt`); after expansion all
        must have the same length (no padding is done).
      images: None, one uint8 [H, W, 3] array, or a list of them.
      videos: None, one uint8 [F, H, W, 3] array, or a list of them.
      video_fps: the rate of the given frames, one value or one per video; the
        temporal mRoPE step of a video is tokens_per_second * temporal_patch_size / fps.

    Returns:
      dict of numpy arrays:
        input_ids: int32 [B, T].
        modality: int32 [B, T], 0 text, 1 image or video pad token.
        position_ids: int32 [3, B, T]; rope_deltas: int32 [B] (see `rope_index`).
        pixel_values: float32 [P_img, 3*tp*p*p] and image_grid_thw: int64 [n_img, 3]
          (only with images).
        pixel_values_videos: float32 [P_vid, 3*tp*p*p], video_grid_thw: int64 [n_vid, 3]
          and second_per_grid_ts: float32 [n_vid] (only with videos).
    """
    texts = [text] if isinstance(text, str) else text
    if (
      not isinstance(texts, (list, tuple))
      or not texts
      or not all(isinstance(s, str) for s in texts)
    ):
      raise ValueError(f"text must be a str or a non-empty list of str, got {text!r:.80}")
    image_list = _as_list(images, "images", 3, "uint8 [H, W, 3] array")
    video_list = _as_list(videos, "videos", 4, "uint8 [F, H, W, 3] array")
    tok = self.tokenizer
    rows = [np.asarray(tok.encode(s), np.int64) for s in texts]

    n_img = sum(int((r == tok.image_token_id).sum()) for r in rows)
    n_vid = sum(int((r == tok.video_token_id).sum()) for r in rows)
    for what, token, found, given in (
      ("images", self.cfg.image_token, n_img, len(image_list)),
      ("videos", self.cfg.video_token, n_vid, len(video_list)),
    ):
      if found != given:
        raise ValueError(
          f"the text holds {found} {token} placeholders but {given} {what} were given; "
          f"use one placeholder per item (chat_prompt(..., {what}={given}))"
        )

    fps = np.asarray(video_fps, dtype=np.float64).reshape(-1)
    if fps.size == 1:
      fps = np.repeat(fps, len(video_list))
    if fps.shape != (len(video_list),) or not (fps > 0).all():
      raise ValueError(
        f"video_fps must be one positive number or one per video ({len(video_list)}), "
        f"got {video_fps!r}"
      )

    out: dict[str, np.ndarray] = {}
    image_tokens: list[int] = []
    if image_list:
      patches, grids = [], []
      for idx, im in enumerate(image_list):
        _check_image(im, f"images[{idx}]")
        pv, g = patchify_image(im, self.cfg)
        patches.append(pv)
        grids.append(g)
        image_tokens.append(self.cfg.tokens_for_grid(g))
      out["pixel_values"] = np.concatenate(patches)
      out["image_grid_thw"] = np.stack(grids)
    video_tokens: list[int] = []
    if video_list:
      patches, grids = [], []
      for idx, fr in enumerate(video_list):
        if not isinstance(fr, np.ndarray) or fr.ndim != 4:
          raise ValueError(
            f"videos[{idx}] must be a uint8 array [F, H, W, 3], got "
            f"{getattr(fr, 'shape', type(fr).__name__)}"
          )
        pv, g = patchify_video(fr, self.cfg)
        patches.append(pv)
        grids.append(g)
        video_tokens.append(self.cfg.tokens_for_grid(g))
      out["pixel_values_videos"] = np.concatenate(patches)
      out["video_grid_thw"] = np.stack(grids)
      out["second_per_grid_ts"] = (self.cfg.temporal_patch_size / fps).astype(np.float32)

    img_it, vid_it = iter(image_tokens), iter(video_tokens)
    expanded = []
    for r in rows:
      counts = np.ones(len(r), np.int64)
      for pos in np.flatnonzero((r == tok.image_token_id) | (r == tok.video_token_id)):
        counts[pos] = next(img_it) if r[pos] == tok.image_token_id else next(vid_it)
      expanded.append(np.repeat(r, counts))
    lengths = [len(e) for e in expanded]
    if len(set(lengths)) != 1:
      raise ValueError(
        f"the texts expand to different lengths {lengths}; this processor does not pad: "
        "process them one at a time or make them the same length"
      )
    input_ids = np.stack(expanded)
    position_ids, rope_deltas = rope_index(
      input_ids,
      out.get("image_grid_thw"),
      out.get("video_grid_thw"),
      out.get("second_per_grid_ts"),
      spatial_merge_size=self.cfg.merge_size,
      tokens_per_second=self.tokens_per_second,
      image_token_id=tok.image_token_id,
      video_token_id=tok.video_token_id,
      vision_start_token_id=tok.vision_start_token_id,
      text_start=self.text_start,
    )
    out["input_ids"] = input_ids.astype(np.int32)
    out["modality"] = np.isin(input_ids, (tok.image_token_id, tok.video_token_id)).astype(np.int32)
    out["position_ids"] = position_ids.astype(np.int32)
    out["rope_deltas"] = rope_deltas.astype(np.int32)
    return out
