"""mmjax.models.processing against transformers' Qwen2.5-VL input processing.

References (transformers, CPU): `smart_resize`, the PIL image processor
`Qwen2VLImageProcessorPil`, `Qwen2_5_VLProcessor` (images only: its video processor needs
torchvision, which is not installed here) and `Qwen2_5_VLModel.get_rope_index` (called
unbound on a stand-in object holding a config). Videos are checked against the image
processor frame by frame and against an independent per-patch construction.
"""

import json
import os
import types

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mmjax.models import processing as P

SPECIALS = [
  "<|endoftext|>",
  "<|im_start|>",
  "<|im_end|>",
  "<|vision_start|>",
  "<|vision_end|>",
  "<|image_pad|>",
  "<|video_pad|>",
]
CORPUS = [
  "You are a helpful assistant.",
  "What is in this picture? Describe the video in detail.",
  "system user assistant",
  "Compare the two images and the clip.",
]

# The chat template of the Qwen2.5-VL-*-Instruct checkpoints (their chat_template.json),
# used only as the reference `chat_prompt` is rendered against.
QWEN_VL_CHAT_TEMPLATE = (
  "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
  "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
  "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
  "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
  "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
  "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
  "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
  "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
  "{% elif content['type'] == 'video' or 'video' in content %}"
  "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
  "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
  "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
  "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------- fixtures


def _save_tokenizer(directory, specials=SPECIALS):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=specials,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(CORPUS * 4, trainer)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  return str(directory)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return _save_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
  return P.Tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf():
  """The transformers pieces, imported once (torch import takes a few seconds)."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor
  from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
  from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

  class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    # transformers type-checks the video processor against a class needing torchvision;
    # None is fine as long as no video is passed.
    def check_argument_for_proper_class(self, argument_name, argument):
      if argument_name == "video_processor" and argument is None:
        return None
      return super().check_argument_for_proper_class(argument_name, argument)

  return types.SimpleNamespace(
    smart_resize=pil.smart_resize,
    ImageProcessor=pil.Qwen2VLImageProcessorPil,
    Processor=ImageOnlyProcessor,
    TokenizerFast=PreTrainedTokenizerFast,
    Model=Qwen2_5_VLModel,
  )


def _image(seed, h, w):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _video(seed, f, h, w):
  return np.random.RandomState(seed).randint(0, 256, (f, h, w, 3), dtype=np.uint8)


def _hf_image_patches(hf, image, cfg):
  ip = hf.ImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
  out = ip(image, return_tensors="np", input_data_format="channels_last")
  return out["pixel_values"], out["image_grid_thw"][0]


def _hf_rope_index(hf, ids, img_grid, vid_grid, spg, *, tps, mask=None, ids_iv=None):
  import torch

  holder = types.SimpleNamespace(
    config=types.SimpleNamespace(
      vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=tps)
    )
  )
  holder.get_vision_position_ids = types.MethodType(hf.Model.get_vision_position_ids, holder)
  ids_t = torch.tensor(np.asarray(ids, np.int64))
  mm = torch.zeros_like(ids_t)
  img_id, vid_id = ids_iv or (IMG, VID)
  mm[ids_t == img_id] = 1
  mm[ids_t == vid_id] = 2
  pos, deltas = hf.Model.get_rope_index(
    holder,
    ids_t,
    mm_token_type_ids=mm,
    image_grid_thw=None if img_grid is None else torch.tensor(img_grid),
    video_grid_thw=None if vid_grid is None else torch.tensor(vid_grid),
    second_per_grid_ts=None if spg is None else torch.tensor(spg, dtype=torch.float32),
    attention_mask=None if mask is None else torch.tensor(mask),
  )
  return pos.numpy(), deltas.numpy().reshape(-1)


# ----------------------------------------------------------------------------- smart_resize


@pytest.mark.parametrize(
  "factor, lo, hi",
  [
    (28, 56 * 56, 28 * 28 * 1280),  # image processor default
    (28, 3136, 12845056),  # released Qwen2.5-VL preprocessor_config.json
    (28, 128 * 28 * 28, 768 * 28 * 28),  # video processor default
    (32, 1024, 256 * 256),
    (14, 100, 5000),
  ],
)
def test_smart_resize_matches_transformers(hf, factor, lo, hi):
  rs = np.random.RandomState(factor + lo % 97)
  sizes = [tuple(int(v) for v in rs.randint(1, 5000, 2)) for _ in range(400)]
  sizes += [tuple(int(v) for v in rs.randint(1, 120, 2)) for _ in range(100)]
  sizes += [(1, 1), (1, 200), (200, 1), (1, 201), (3, 700), (28, 28), (14, 42), (4000, 20)]
  sizes += [(42, 42), (70, 98), (factor * 3 // 2, factor * 5 // 2)]  # exact .5 roundings
  checked = 0
  for h, w in sizes:
    try:
      want = hf.smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
    except ValueError:
      with pytest.raises(ValueError, match="aspect ratio"):
        P.smart_resize(h, w, factor, lo, hi)
      continue
    assert P.smart_resize(h, w, factor, lo, hi) == tuple(want), (h, w)
    checked += 1
  assert checked > 450


@pytest.mark.parametrize(
  "args, match",
  [
    ((1, 201), "aspect ratio"),
    ((5000, 20), "aspect ratio"),
    ((0, 50), "height must be a positive int"),
    ((50, 3.5), "width must be a positive int"),
    ((50, 50, 0), "factor must be"),
    ((50, 50, 28, 5000, 4000), "min_pixels"),
  ],
)
def test_smart_resize_errors(args, match):
  with pytest.raises(ValueError, match=match):
    P.smart_resize(*args)


# ----------------------------------------------------------------------------- pixels


@pytest.mark.parametrize(
  "h, w, cfg_kw",
  [
    (56, 84, {}),  # kept: multiples of 28 inside the pixel range
    (123, 217, {}),  # rounded: bicubic resize
    (401, 299, {"max_pixels": 28 * 28 * 64}),  # scaled down into max_pixels
    (20, 33, {"min_pixels": 28 * 28 * 8}),  # scaled up to min_pixels
  ],
)
def test_patchify_image_matches_pil_image_processor(hf, h, w, cfg_kw):
  cfg = P.ProcessorConfig(**cfg_kw)
  image = _image(h * w, h, w)
  got, grid = P.patchify_image(image, cfg)
  want, want_grid = _hf_image_patches(hf, image, cfg)
  assert got.dtype == np.float32 and got.shape == want.shape
  assert grid.dtype == np.int64 and grid.tolist() == want_grid.tolist()
  rh, rw = P.smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
  assert ((rh, rw) != (h, w)) == ((h, w) != (56, 84))
  # Same numpy arithmetic and the same PIL call: bit-identical (measured max |diff| = 0).
  assert np.abs(got - want).max() <= 1e-6


def test_video_frames_match_pil_image_processor(hf):
  # Frames of a video are resized like images (here with the image pixel range), and each
  # patch row holds, for channel c and frame k of its temporal patch, the same pixels
  # as that frame's image patch row.
  cfg = P.ProcessorConfig(video_min_pixels=56 * 56, video_max_pixels=28 * 28 * 1280)
  frames = _video(7, 3, 101, 143)  # 3 frames: padded to 4 with a copy of the last
  got, grid = P.patchify_video(frames, cfg)
  per_frame = [_hf_image_patches(hf, f, cfg) for f in frames]
  assert grid.tolist() == [2, *per_frame[0][1][1:].tolist()]
  n = int(grid[1] * grid[2])
  p, tp = cfg.patch_size, cfg.temporal_patch_size
  got = got.reshape(2, n, 3, tp, p * p)
  for f, (want, _) in enumerate(per_frame + [per_frame[-1]]):
    want = want.reshape(n, 3, tp, p * p)[:, :, 0]
    assert np.abs(got[f // tp, :, :, f % tp] - want).max() <= 1e-6, f


def test_patchify_video_layout_independent_construction():
  # transformers' video processor needs torchvision (not installed, must not be), so the
  # layout is checked against a per-patch construction written from the documented layout,
  # on frames whose size smart_resize keeps (no resampling involved).
  cfg = P.ProcessorConfig(video_min_pixels=56 * 56)
  frames = _video(11, 5, 56, 84)
  got, grid = P.patchify_video(frames, cfg)
  assert grid.tolist() == [3, 4, 6]
  x = (frames.astype(np.float64) / 255).astype(np.float32)
  x = (x - np.float32(cfg.image_mean)) / np.float32(cfg.image_std)
  x = np.concatenate([x, x[-1:]])  # pad 5 frames to 6
  p, m, tp = 14, 2, 2
  rows = []
  for t in range(3):
    for bh in range(2):
      for bw in range(3):
        for mh in range(m):
          for mw in range(m):
            y0, x0 = (bh * m + mh) * p, (bw * m + mw) * p
            patch = x[t * tp : (t + 1) * tp, y0 : y0 + p, x0 : x0 + p, :]  # [tp, p, p, C]
            rows.append(patch.transpose(3, 0, 1, 2).reshape(-1))  # (C, tp, y, x)
  np.testing.assert_array_equal(got, np.stack(rows))


def test_patchify_resizes_all_video_frames_to_one_size():
  cfg = P.ProcessorConfig(video_min_pixels=56 * 56, video_max_pixels=28 * 28 * 20)
  frames = _video(3, 4, 300, 200)
  got, grid = P.patchify_video(frames, cfg)
  h, w = P.smart_resize(300, 200, 28, 56 * 56, 28 * 28 * 20)
  assert grid.tolist() == [2, h // 14, w // 14]
  assert got.shape == (2 * (h // 14) * (w // 14), 1176)


# ----------------------------------------------------------------------------- mRoPE

VS, VE, IMG, VID = 1, 2, 3, 4


def _interleaved_ids(seed, spec):
  """spec: ints (text run lengths) and ('i' | 'v', n_pad) items -> 1D ids."""
  rs = np.random.RandomState(seed)
  ids = []
  for item in spec:
    if isinstance(item, int):
      ids += rs.randint(10, 300, item).tolist()
    else:
      ids += [VS] + [IMG if item[0] == "i" else VID] * item[1] + [VE]
  return np.array(ids, np.int64)


ROPE_KW = dict(
  spatial_merge_size=2, image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS
)


@pytest.mark.parametrize(
  "spg, tps",
  [
    ([2.0], 2),  # fps 1: temporal step 4, beyond the 2x2 merged grid
    ([2 / 3], 2),  # fps 3: fractional step 4/3 (float32, truncated per patch)
    ([0.5], 2),  # fps 4: step 1
    ([1.0], 25),  # step 25
  ],
)
def test_rope_index_matches_transformers(hf, spg, tps):
  # text, image (1, 4, 6), text, video (4, 4, 4), text, image (1, 6, 4), text
  img = [[1, 4, 6], [1, 6, 4]]
  vid = [[4, 4, 4]]
  ids = _interleaved_ids(0, [5, ("i", 6), 3, ("v", 16), 2, ("i", 6), 4])[None]
  got, deltas = P.rope_index(ids, img, vid, spg, tokens_per_second=tps, **ROPE_KW)
  want, want_d = _hf_rope_index(hf, ids, img, vid, spg, tps=tps)
  assert got.shape == (3, 1, ids.shape[1]) and got.dtype == np.int64
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(deltas, want_d)


def test_rope_index_batch_with_padding_matches_transformers(hf):
  img = [[1, 4, 4], [1, 4, 8], [1, 8, 4]]
  vid = [[2, 4, 4], [3, 4, 6]]
  spg = [1.0, 2.0]
  row0 = _interleaved_ids(1, [4, ("i", 4), 2, ("v", 8), 3, ("i", 8), 1])
  row1 = _interleaved_ids(2, [2, ("v", 18), ("i", 8), 5])
  t = max(len(row0), len(row1)) + 3
  ids = np.zeros((2, t), np.int64)
  mask = np.zeros((2, t), np.int64)
  ids[0, t - len(row0) :], mask[0, t - len(row0) :] = row0, 1  # left padding
  ids[1, : len(row1)], mask[1, : len(row1)] = row1, 1  # right padding
  got, deltas = P.rope_index(
    ids, img, vid, spg, tokens_per_second=2, attention_mask=mask, **ROPE_KW
  )
  want, want_d = _hf_rope_index(hf, ids, img, vid, spg, tps=2, mask=mask)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(deltas, want_d)


def test_rope_index_text_start_modes():
  # 2 text, video (3, 4, 4) at s = 3 with step 4: temporal ids 3, 7, 11, h/w ids 3..4.
  ids = _interleaved_ids(0, [2, ("v", 12), 2])[None]
  kw = dict(tokens_per_second=2, **ROPE_KW)
  grid, _ = P.rope_index(ids, None, [[3, 4, 4]], [2.0], text_start="grid", **kw)
  mx, deltas = P.rope_index(ids, None, [[3, 4, 4]], [2.0], text_start="max", **kw)
  np.testing.assert_array_equal(grid[:, 0, :3], mx[:, 0, :3])
  np.testing.assert_array_equal(mx[0, 0, 3:15], np.repeat([3, 7, 11], 4))
  np.testing.assert_array_equal(mx[1, 0, 3:15], np.tile([3, 3, 4, 4], 3))
  np.testing.assert_array_equal(mx[2, 0, 3:15], np.tile([3, 4, 3, 4], 3))
  # after <vision_end>: transformers 5.x resumes at s + 2 = 5, Qwen's code at 11 + 1.
  np.testing.assert_array_equal(grid[:, 0, 15:], [[5, 6, 7]] * 3)
  np.testing.assert_array_equal(mx[:, 0, 15:], [[12, 13, 14]] * 3)
  assert deltas.tolist() == [15 - 18]


def test_rope_index_text_only_is_arange():
  ids = np.arange(10, 30)[None]
  pos, deltas = P.rope_index(ids, tokens_per_second=2, **ROPE_KW)
  np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(20), (3, 1, 20)))
  assert deltas.tolist() == [0]


@pytest.mark.parametrize(
  "spec, img, vid, spg, match",
  [
    ([2, ("i", 4), 2], [[1, 4, 4], [1, 4, 4]], None, None, "has 2 grids but"),
    ([2, ("i", 4), 2, ("i", 4)], [[1, 4, 4]], None, None, "more image items"),
    ([2, ("i", 3), 2], [[1, 4, 4]], None, None, "needs 4 pad tokens"),
    ([2, ("v", 4), 2], None, [[1, 4, 4]], None, "second_per_grid_ts is required"),
    ([2, ("v", 4), 2], None, [[1, 4, 4]], [1.0, 2.0], "one per video"),
    ([2, ("i", 4)], [[1, 4, 5]], None, None, "multiples of spatial_merge_size"),
  ],
)
def test_rope_index_errors(spec, img, vid, spg, match):
  ids = _interleaved_ids(0, spec)[None]
  with pytest.raises(ValueError, match=match):
    P.rope_index(ids, img, vid, spg, tokens_per_second=2, **ROPE_KW)


def test_rope_index_needs_vision_start():
  ids = np.array([[10, 11, IMG, IMG, IMG, IMG, VE]])
  with pytest.raises(ValueError, match="vision-start"):
    P.rope_index(ids, [[1, 4, 4]], tokens_per_second=2, **ROPE_KW)


# ----------------------------------------------------------------------------- text


def test_tokenizer_special_ids_and_round_trip(hf, tok, tok_dir):
  fast = hf.TokenizerFast(tokenizer_file=os.path.join(tok_dir, "tokenizer.json"))
  for attr, token in [
    ("vision_start_token_id", "<|vision_start|>"),
    ("vision_end_token_id", "<|vision_end|>"),
    ("image_token_id", "<|image_pad|>"),
    ("video_token_id", "<|video_pad|>"),
    ("im_start_token_id", "<|im_start|>"),
    ("im_end_token_id", "<|im_end|>"),
    ("endoftext_token_id", "<|endoftext|>"),
  ]:
    assert getattr(tok, attr) == fast.convert_tokens_to_ids(token)
  text = P.chat_prompt("Describe the video.", images=1, videos=1)
  ids = tok.encode(text)
  assert ids == fast(text)["input_ids"]
  assert ids[0] == tok.im_start_token_id and ids.count(tok.image_token_id) == 1
  assert tok.decode(ids) == text
  assert tok.decode(ids, skip_special_tokens=True) == (
    "system\nYou are a helpful assistant.\nuser\nDescribe the video.\nassistant\n"
  )


@pytest.mark.parametrize(
  "images, videos, system",
  [(0, 0, None), (1, 0, None), (2, 1, None), (0, 2, None), (1, 1, "Answer in one word.")],
)
def test_chat_prompt_matches_chat_template(hf, tok_dir, images, videos, system):
  fast = hf.TokenizerFast(tokenizer_file=os.path.join(tok_dir, "tokenizer.json"))
  question = "What happens in the clip?"
  content = [{"type": "image"}] * images + [{"type": "video"}] * videos
  messages = [{"role": "user", "content": content + [{"type": "text", "text": question}]}]
  kw = {}
  if system is not None:
    messages.insert(0, {"role": "system", "content": system})
    kw["system"] = system
  want = fast.apply_chat_template(
    messages, chat_template=QWEN_VL_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
  )
  assert P.chat_prompt(question, images=images, videos=videos, **kw) == want


# ----------------------------------------------------------------------------- processor


def test_processor_matches_transformers_processor_images(hf, tok, tok_dir):
  cfg = P.ProcessorConfig()
  fast = hf.TokenizerFast(tokenizer_file=os.path.join(tok_dir, "tokenizer.json"))
  ref = hf.Processor(image_processor=hf.ImageProcessor(), tokenizer=fast, video_processor=None)
  proc = P.Processor(tok, cfg)
  iv = (tok.image_token_id, tok.video_token_id)
  images = [_image(1, 56, 84), _image(2, 123, 217)]  # one kept, one resized
  cases = [
    ([P.chat_prompt("Compare the two images.", images=2)], images),
    (  # B = 2: one image per text, same sizes so the lengths agree
      [P.chat_prompt("What is in this picture?", images=1)] * 2,
      [_image(3, 90, 60), _image(4, 90, 60)],
    ),
  ]
  for texts, ims in cases:
    want = ref(text=texts, images=ims, return_tensors="np")
    got = proc(texts, images=ims)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    assert got["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
    assert np.abs(got["pixel_values"] - want["pixel_values"]).max() <= 1e-6
    np.testing.assert_array_equal(got["modality"], want["mm_token_type_ids"] > 0)
    pos, deltas = _hf_rope_index(
      hf, want["input_ids"], want["image_grid_thw"], None, None, tps=2, ids_iv=iv
    )
    np.testing.assert_array_equal(got["position_ids"], pos)
    np.testing.assert_array_equal(got["rope_deltas"], deltas)
    assert got["position_ids"].dtype == np.int32
    assert "pixel_values_videos" not in got


def test_processor_video_expansion(hf, tok):
  cfg = P.ProcessorConfig(video_min_pixels=56 * 56)
  proc = P.Processor(tok, cfg, tokens_per_second=2)
  text = P.chat_prompt("Describe the video.", images=1, videos=1)
  image, video = _image(5, 56, 56), _video(6, 5, 56, 84)
  got = proc(text, images=[image], videos=[video], video_fps=1.0)
  ids = got["input_ids"][0]
  assert got["video_grid_thw"].tolist() == [[3, 4, 6]]
  assert got["image_grid_thw"].tolist() == [[1, 4, 4]]
  n_vid, n_img = 3 * 4 * 6 // 4, 4 * 4 // 4
  assert (ids == tok.video_token_id).sum() == n_vid and (ids == tok.image_token_id).sum() == n_img
  # the same ids as the prompt with the placeholders repeated as text
  expanded = text.replace("<|image_pad|>", "<|image_pad|>" * n_img).replace(
    "<|video_pad|>", "<|video_pad|>" * n_vid
  )
  assert ids.tolist() == tok.encode(expanded)
  assert got["modality"].sum() == n_vid + n_img
  np.testing.assert_array_equal(got["second_per_grid_ts"], np.float32([2.0]))
  np.testing.assert_array_equal(got["pixel_values_videos"], P.patchify_video(video, cfg)[0])
  pos, deltas = _hf_rope_index(
    hf,
    got["input_ids"],
    got["image_grid_thw"],
    got["video_grid_thw"],
    [2.0],
    tps=2,
    ids_iv=(tok.image_token_id, tok.video_token_id),
  )
  np.testing.assert_array_equal(got["position_ids"], pos)
  np.testing.assert_array_equal(got["rope_deltas"], deltas)


def _write_checkpoint(directory, tok_dir, pre=None, video=None, config=True):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(tok_dir, "tokenizer.json")) as f:
    tok_json = f.read()
  with open(os.path.join(directory, "tokenizer.json"), "w") as f:
    f.write(tok_json)
  pre = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": list(P.OPENAI_CLIP_MEAN),
    "image_std": list(P.OPENAI_CLIP_STD),
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    **(pre or {}),
  }
  with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
    json.dump(pre, f)
  if video is not None:
    with open(os.path.join(directory, "video_preprocessor_config.json"), "w") as f:
      json.dump(video, f)
  if config:
    tokenizer = P.Tokenizer(tok_dir)
    cfg = {
      "image_token_id": tokenizer.image_token_id,
      "video_token_id": tokenizer.video_token_id,
      "vision_start_token_id": tokenizer.vision_start_token_id,
      "vision_config": {"tokens_per_second": 2, "spatial_merge_size": 2},
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(cfg, f)
  return str(directory)


def test_config_from_dir(hf, tmp_path, tok_dir):
  d = _write_checkpoint(tmp_path / "a", tok_dir)
  cfg = P.ProcessorConfig.from_dir(d)
  ref = hf.ImageProcessor.from_pretrained(d)
  assert (cfg.min_pixels, cfg.max_pixels) == (ref.size["shortest_edge"], ref.size["longest_edge"])
  assert (cfg.video_min_pixels, cfg.video_max_pixels) == (3136, 12845056)  # no video file
  assert cfg.image_mean == P.OPENAI_CLIP_MEAN and cfg.patch_size == 14
  video = {"size": {"shortest_edge": 4096, "longest_edge": 100352}, "fps": 2.0}
  d = _write_checkpoint(tmp_path / "b", tok_dir, video=video)
  cfg = P.ProcessorConfig.from_dir(d)
  assert (cfg.min_pixels, cfg.video_min_pixels, cfg.video_max_pixels) == (3136, 4096, 100352)
  proc = P.Processor.from_dir(d)
  assert proc.tokens_per_second == 2 and proc.cfg == cfg
  # transformers v5's nested processor_config.json takes priority over the flat files
  nested = {"image_processor": {"max_pixels": 28 * 28 * 100}, "video_processor": video}
  with open(os.path.join(d, "processor_config.json"), "w") as f:
    json.dump(nested, f)
  cfg = P.ProcessorConfig.from_dir(d)
  assert (cfg.min_pixels, cfg.max_pixels, cfg.video_min_pixels) == (56 * 56, 28 * 28 * 100, 4096)


@pytest.mark.parametrize(
  "pre, video, match",
  [
    ({"do_normalize": False}, None, "do_normalize"),
    ({"rescale_factor": 1.0}, None, "rescale_factor"),
    ({"resample": 2}, None, "resample"),
    ({}, {"patch_size": 16}, "patch_size differs"),
    ({"size": {"shortest_edge": 3136}, "min_pixels": None, "max_pixels": None}, None, "size="),
  ],
)
def test_config_from_dir_rejects_unsupported(tmp_path, tok_dir, pre, video, match):
  d = _write_checkpoint(tmp_path, tok_dir, pre=pre, video=video)
  with pytest.raises(ValueError, match=match):
    P.ProcessorConfig.from_dir(d)


def test_missing_files(tmp_path, tok_dir):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    P.Tokenizer(str(empty))
  with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
    P.ProcessorConfig.from_dir(str(empty))
  d = _write_checkpoint(tmp_path / "noconfig", tok_dir, config=False)
  with pytest.raises(FileNotFoundError, match="tokens_per_second"):
    P.Processor.from_dir(d)
  assert P.Processor.from_dir(d, tokens_per_second=2).tokens_per_second == 2


def test_tokenizer_missing_special_token(tmp_path):
  d = _save_tokenizer(tmp_path, [s for s in SPECIALS if s != "<|video_pad|>"])
  with pytest.raises(ValueError, match=r"<\|video_pad\|>"):
    P.Tokenizer(d)


@pytest.mark.parametrize(
  "text_kw, images, videos, match",
  [
    ({"images": 1}, 2, 0, r"1 <\|image_pad\|> placeholders but 2 images"),
    ({"images": 2}, 1, 0, r"2 <\|image_pad\|> placeholders but 1 images"),
    ({"videos": 1}, 0, 0, r"1 <\|video_pad\|> placeholders but 0 videos"),
    ({}, 0, 1, r"0 <\|video_pad\|> placeholders but 1 videos"),
  ],
)
def test_processor_count_mismatch(tok, text_kw, images, videos, match):
  proc = P.Processor(tok, P.ProcessorConfig(video_min_pixels=56 * 56))
  ims = [_image(i, 56, 56) for i in range(images)]
  vids = [_video(i, 2, 56, 56) for i in range(videos)]
  with pytest.raises(ValueError, match=match):
    proc(P.chat_prompt("hi", **text_kw), images=ims or None, videos=vids or None)


@pytest.mark.parametrize(
  "image, match",
  [
    (np.random.RandomState(0).rand(56, 56, 3).astype(np.float32), "dtype uint8"),
    (_image(0, 56, 56)[..., 0], r"\[H, W, 3\]"),
    (np.concatenate([_image(0, 56, 56), _image(1, 56, 56)[..., :1]], -1), r"\[H, W, 3\]"),
    ([[1, 2, 3]], "numpy uint8 array"),
  ],
)
def test_bad_images(tok, image, match):
  with pytest.raises(ValueError, match=match):
    P.patchify_image(image, P.ProcessorConfig())
  proc = P.Processor(tok)
  with pytest.raises(ValueError, match=match):
    proc(P.chat_prompt("hi", images=1), images=[image])


def test_processor_input_errors(tok):
  proc = P.Processor(tok, P.ProcessorConfig(video_min_pixels=56 * 56))
  with pytest.raises(ValueError, match="different lengths"):
    proc([P.chat_prompt("hi"), P.chat_prompt("a longer question here")])
  with pytest.raises(ValueError, match="one uint8 \\[H, W, 3\\] array or a list"):
    proc(P.chat_prompt("hi", images=2), images=_video(0, 2, 56, 56))
  with pytest.raises(ValueError, match="video_fps"):
    proc(P.chat_prompt("hi", videos=1), videos=[_video(0, 2, 56, 56)], video_fps=0.0)
  with pytest.raises(ValueError, match="frames must be"):
    P.patchify_video(_video(0, 2, 56, 56)[0], P.ProcessorConfig())
  with pytest.raises(ValueError, match="text must be"):
    proc([])
  with pytest.raises(ValueError, match="images must be an int"):
    P.chat_prompt("hi", images=-1)
