"""A tiny random Qwen2.5-VL built in transformers (CPU torch), saved as safetensors, and
a mixed video + image + text input for it (the equivalence tests' reference)."""

from __future__ import annotations

import numpy as np

IMAGE, VIDEO, V_START, V_END, EOS = 300, 301, 302, 303, 310
TEXT_VOCAB = 300  # ordinary token ids are drawn below this


def tiny_hf_config(token_ids=None, **text_overrides):
  from transformers import Qwen2_5_VLConfig

  ids = dict(
    image_token_id=IMAGE,
    video_token_id=VIDEO,
    vision_start_token_id=V_START,
    vision_end_token_id=V_END,
  )
  ids.update(token_ids or {})

  text = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    eos_token_id=EOS,
    bos_token_id=311,
    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
  )
  text.update(text_overrides)
  return Qwen2_5_VLConfig(
    text_config=text,
    vision_config=dict(
      depth=2,
      hidden_size=32,
      intermediate_size=48,
      num_heads=2,
      out_hidden_size=64,
      fullatt_block_indexes=[1],
      window_size=112,
      tokens_per_second=2,
    ),
    **ids,
  )


def make_tiny_checkpoint(path, seed=0, token_ids=None, **text_overrides):
  """Random weights (norm scales around 1, everything else N(0, 0.1)) so that a wrong
  name, transpose or missing bias shows in the logits. Returns the torch model."""
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration

  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(tiny_hf_config(token_ids, **text_overrides)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if any(s in name for s in ("norm", "ln_q")):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(path))
  return model


def mixed_input(seed=0, video_grid=(4, 8, 12), image_grid=(1, 4, 6)):
  """Text, a video, text, an image, text; random pixels and token ids."""
  rng = np.random.default_rng(seed)
  feat = 3 * 2 * 14 * 14
  nv = int(np.prod(video_grid)) // 4
  ni = int(np.prod(image_grid)) // 4
  txt = lambda n: list(rng.integers(0, TEXT_VOCAB, n))
  ids = txt(5) + [V_START] + [VIDEO] * nv + [V_END] + txt(7) + [V_START] + [IMAGE] * ni
  ids = ids + [V_END] + txt(4)
  ids = np.asarray([ids], np.int64)
  return {
    "input_ids": ids,
    "pixel_values": rng.standard_normal((int(np.prod(image_grid)), feat)).astype(np.float32),
    "image_grid_thw": np.asarray([image_grid], np.int64),
    "pixel_values_videos": rng.standard_normal((int(np.prod(video_grid)), feat)).astype(np.float32),
    "video_grid_thw": np.asarray([video_grid], np.int64),
    "second_per_grid_ts": np.asarray([1.0], np.float32),
    "mm_token_type_ids": np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0)),
  }


def hf_positions(hf_model, inp):
  import torch

  pos, delta = hf_model.model.get_rope_index(
    torch.tensor(inp["input_ids"]),
    torch.tensor(inp["mm_token_type_ids"]),
    torch.tensor(inp["image_grid_thw"]),
    torch.tensor(inp["video_grid_thw"]),
    torch.tensor(inp["second_per_grid_ts"]),
  )
  return pos.numpy(), delta.numpy()


def hf_logits(hf_model, inp):
  import torch

  pos, _ = hf_positions(hf_model, inp)
  with torch.no_grad():
    out = hf_model(
      input_ids=torch.tensor(inp["input_ids"]),
      pixel_values=torch.tensor(inp["pixel_values"]),
      image_grid_thw=torch.tensor(inp["image_grid_thw"]),
      pixel_values_videos=torch.tensor(inp["pixel_values_videos"]),
      video_grid_thw=torch.tensor(inp["video_grid_thw"]),
      second_per_grid_ts=torch.tensor(inp["second_per_grid_ts"]),
      position_ids=torch.tensor(pos),
    )
  return out.logits.numpy()


def mmjax_batch(hf_model, inp):
  """The same input as an mmjax batch (positions from transformers)."""
  pos, _ = hf_positions(hf_model, inp)
  return {
    "input_ids": inp["input_ids"].astype(np.int32),
    "position_ids": pos.astype(np.int32),
    "modality": (inp["mm_token_type_ids"] > 0).astype(np.int32),
    "pixel_values": inp["pixel_values"],
    "image_grid_thw": inp["image_grid_thw"],
    "pixel_values_videos": inp["pixel_values_videos"],
    "video_grid_thw": inp["video_grid_thw"],
  }
