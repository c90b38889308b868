"""Qwen2.5-VL in Flax against transformers' implementation (tiny random model, CPU)."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import policies as P
from mmjax.models import checkpoint as ckpt
from mmjax.models import generate as gen
from mmjax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, init_params
from tests import hf_tiny
from tests.helpers import small_policies


@pytest.fixture(autouse=True)
def _full_f32_matmuls():
  with jax.default_matmul_precision("float32"):
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("qwen_tiny")
  hf_model = hf_tiny.make_tiny_checkpoint(path)
  config, params = ckpt.load_hf_checkpoint(str(path), dtype=jnp.float32)
  inp = hf_tiny.mixed_input()
  return {
    "path": str(path),
    "hf": hf_model,
    "config": config,
    "params": params,
    "inp": inp,
    "batch": hf_tiny.mmjax_batch(hf_model, inp),
    "ref": hf_tiny.hf_logits(hf_model, inp),
  }


def _logits(tiny, policy=None, backend="xla"):
  model = Qwen2_5_VL(tiny["config"], policy=policy, backend=backend)
  logits, _ = gen.prefill(model, tiny["params"], tiny["batch"], all_logits=True)
  return np.asarray(logits)


def test_config_from_checkpoint(tiny):
  c = tiny["config"]
  assert (c.text.num_layers, c.text.num_heads, c.text.num_kv_heads) == (2, 4, 2)
  assert c.text.mrope_section == (2, 3, 3)
  assert c.vision.fullatt_block_indexes == (1,)
  assert c.image_token_id == hf_tiny.IMAGE and c.eos_token_ids == (hf_tiny.EOS,)


def test_dense_logits_match_transformers(tiny):
  ref = tiny["ref"]
  ours = _logits(tiny)
  assert ours.shape == ref.shape
  assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero numbers
  err = np.abs(ours - ref).max()
  assert err < 1e-4, err


def test_legacy_flat_config_loads(tiny):
  """Released checkpoints keep the text keys at the top level of config.json."""
  with open(os.path.join(tiny["path"], "config.json")) as f:
    d = json.load(f)
  flat = {**{k: v for k, v in d.items() if k != "text_config"}, **d["text_config"]}
  flat["model_type"] = "qwen2_5_vl"
  flat["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
  flat["rope_theta"] = flat.pop("rope_parameters")["rope_theta"]
  assert Qwen2_5_VLConfig.from_hf(flat) == tiny["config"]


@pytest.mark.parametrize(
  "name", ["a_shape", "vertical_slash", "block_sparse", "grid", "q_boundary", "2d_boundary", "mm"]
)
def test_policy_at_full_budget_equals_dense(tiny, name):
  pols = small_policies()
  if name == "mm":  # a per-layer, per-head table
    n = tiny["config"].text.num_heads
    vals = list(pols.values())
    rows = tuple(tuple(vals[(li * n + h) % len(vals)] for h in range(n)) for li in range(2))
    pol = P.get("mminference", table=rows, block_q=16, block_k=16)
  else:
    pol = pols[name]
  t = tiny["batch"]["input_ids"].shape[1]
  full = _logits(tiny, pol.full_budget(t))
  np.testing.assert_allclose(full, tiny["ref"], atol=1e-4, rtol=0)


def test_every_policy_prefills_under_jit_at_default_budget(tiny):
  """One prefill whose table gives the 2 layers x 4 heads every policy (each policy alone
  runs through the model in `test_policy_at_full_budget_equals_dense`; one program here
  rather than eight, for CI time)."""
  pols = list(small_policies().values())
  n, layers = tiny["config"].text.num_heads, tiny["config"].text.num_layers
  assert n * layers >= len(pols)
  rows = tuple(tuple(pols[(li * n + h) % len(pols)] for h in range(n)) for li in range(layers))
  assert {p.name for row in rows for p in row} == {p.name for p in pols}
  pol = P.get("mminference", table=rows, block_q=16, block_k=16)
  dense = tiny["ref"]
  out = _logits(tiny, pol)
  assert out.shape == dense.shape and np.isfinite(out).all()
  # sparse, so not equal to dense, but close to it on this short input
  assert 0 < np.abs(out - dense).max() < 0.5 * np.abs(dense).max()


def test_pallas_backend_interpret_matches_xla(tiny):
  # the kernels take head_dim >= 32: widen the tiny model (random params, no checkpoint)
  c = tiny["config"]
  c = dataclasses.replace(
    c,
    text=dataclasses.replace(c.text, hidden_size=128, mrope_section=(4, 6, 6)),
    vision=dataclasses.replace(c.vision, out_hidden_size=128),
  )
  params = init_params(c, seed=3, std=0.1)
  pol = small_policies()["2d_boundary"]
  outs = {}
  for backend in ("pallas", "xla"):
    model = Qwen2_5_VL(c, policy=pol, backend=backend)
    outs[backend] = np.asarray(gen.prefill(model, params, tiny["batch"], all_logits=True)[0])
  assert np.abs(outs["xla"]).max() > 0.5
  np.testing.assert_allclose(outs["pallas"], outs["xla"], atol=2e-5, rtol=0)


def test_generate_matches_transformers(tiny):
  import torch

  inp = tiny["inp"]
  hf_model = tiny["hf"]
  with torch.no_grad():
    out = hf_model.generate(
      input_ids=torch.tensor(inp["input_ids"]),
      pixel_values=torch.tensor(inp["pixel_values"]),
      image_grid_thw=torch.tensor(inp["image_grid_thw"]),
      pixel_values_videos=torch.tensor(inp["pixel_values_videos"]),
      video_grid_thw=torch.tensor(inp["video_grid_thw"]),
      second_per_grid_ts=torch.tensor(inp["second_per_grid_ts"]),
      mm_token_type_ids=torch.tensor(inp["mm_token_type_ids"]),
      max_new_tokens=8,
      do_sample=False,
      eos_token_id=[],
      pad_token_id=0,
    )
  ref = out[0, inp["input_ids"].shape[1] :].numpy()
  model = Qwen2_5_VL(tiny["config"])
  ours = gen.generate(model, tiny["params"], tiny["batch"], max_new_tokens=8, eos_token_ids=[319])
  assert len(ref) == 8
  np.testing.assert_array_equal(ours[0], ref)
  again, logits = gen.generate(
    model, tiny["params"], tiny["batch"], max_new_tokens=8, eos_token_ids=[319], return_logits=True
  )
  np.testing.assert_array_equal(again, ours)
  np.testing.assert_allclose(np.asarray(logits)[:, -1], tiny["ref"][:, -1], atol=1e-4, rtol=0)


def test_generate_stops_at_eos(tiny):
  model = Qwen2_5_VL(tiny["config"])
  first = gen.generate(model, tiny["params"], tiny["batch"], max_new_tokens=6, eos_token_ids=[319])
  stop = int(first[0, 2])  # pretend the third token ends the answer
  out = gen.generate(model, tiny["params"], tiny["batch"], max_new_tokens=6, eos_token_ids=[stop])
  assert out.shape[1] == int(np.argmax(first[0] == stop)) + 1
  assert out[0, -1] == stop


def test_orbax_round_trip_is_bit_exact(tiny, tmp_path):
  for dtype in (jnp.float32, jnp.bfloat16):
    params = jax.tree.map(lambda x, d=dtype: x.astype(d), tiny["params"])
    path = tmp_path / f"p_{jnp.dtype(dtype).name}"
    ckpt.save_params(str(path), params)
    back = ckpt.restore_params(str(path), like=params)
    flat_a = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(back)[0])
    assert len(flat_a) == len(flat_b)
    for p, a in flat_a:
      b = flat_b[p]
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(
        np.asarray(a).view(np.uint8 if a.dtype.itemsize == 1 else f"u{a.dtype.itemsize}"),
        np.asarray(b).view(np.uint8 if b.dtype.itemsize == 1 else f"u{b.dtype.itemsize}"),
      )


def test_sharded_checkpoint_loads_the_same(tiny, tmp_path):
  tiny["hf"].save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
  files = os.listdir(tmp_path / "sharded")
  assert "model.safetensors.index.json" in files and len(files) > 4
  _, params = ckpt.load_hf_checkpoint(str(tmp_path / "sharded"), dtype=jnp.float32)
  flat = dict(jax.tree_util.tree_flatten_with_path(tiny["params"])[0])
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    np.testing.assert_array_equal(np.asarray(x), np.asarray(flat[p]))
  os.remove(tmp_path / "sharded" / sorted(f for f in files if f.endswith(".safetensors"))[0])
  with pytest.raises(FileNotFoundError, match="shards listed in the index are missing"):
    ckpt.load_hf_checkpoint(str(tmp_path / "sharded"))


def test_bf16_load_runs(tiny):
  config, params = ckpt.load_hf_checkpoint(tiny["path"], dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  model = Qwen2_5_VL(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  logits, _ = gen.prefill(model, params, tiny["batch"], all_logits=True)
  ref = tiny["ref"]
  err = np.abs(np.asarray(logits, np.float32) - ref).max()
  assert err < 0.1 * np.abs(ref).max(), err


def test_init_params_matches_checkpoint_tree(tiny):
  params = init_params(tiny["config"], seed=1)
  ckpt_tree = jax.tree.map(lambda x: x.shape, tiny["params"])
  assert jax.tree.map(lambda x: x.shape, params) == ckpt_tree


@pytest.fixture(scope="module")
def tok_tiny(tmp_path_factory):
  """A tiny checkpoint dir with a real (small BPE) tokenizer.json and processor config,
  its special-token ids taken from the tokenizer."""
  from mmjax.models import processing
  from tests.test_processing import _save_tokenizer

  path = tmp_path_factory.mktemp("tok_tiny")
  _save_tokenizer(path)
  tok = processing.Tokenizer(str(path))
  ids = dict(
    image_token_id=tok.image_token_id,
    video_token_id=tok.video_token_id,
    vision_start_token_id=tok.vision_start_token_id,
    vision_end_token_id=tok.vision_end_token_id,
  )
  hf_model = hf_tiny.make_tiny_checkpoint(
    path, seed=1, token_ids=ids, vocab_size=tok.vocab_size, eos_token_id=tok.im_end_token_id
  )
  (path / "preprocessor_config.json").write_text(
    json.dumps({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14})
  )
  rng = np.random.default_rng(5)
  frames = rng.integers(0, 256, (6, 56, 84, 3), dtype=np.uint8)  # 3 temporal patches
  image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)  # resized by the processor
  return {
    "path": str(path),
    "hf": hf_model,
    "tok": tok,
    "ids": ids,
    "frames": frames,
    "image": image,
  }


def test_end_to_end_video_question_matches_transformers(tok_tiny):
  """Raw frames + an image + a question through mmjax's processor, then the model,
  against transformers' model on the same pixels and ids (transformers computes its
  own mRoPE positions from the token types)."""
  import torch

  from mmjax.models import processing

  ids, tok, hf_model = tok_tiny["ids"], tok_tiny["tok"], tok_tiny["hf"]
  config, params = ckpt.load_hf_checkpoint(tok_tiny["path"], dtype=jnp.float32)
  proc = processing.Processor.from_dir(tok_tiny["path"])
  batch = proc(
    processing.chat_prompt("What happens in the video?", images=1, videos=1),
    images=[tok_tiny["image"]],
    videos=[tok_tiny["frames"]],
    video_fps=2.0,
  )
  ids_np = batch["input_ids"]
  types = np.where(ids_np == ids["image_token_id"], 1, 0)
  types = np.where(ids_np == ids["video_token_id"], 2, types)
  assert batch["video_grid_thw"][0, 0] == 3  # 6 frames -> 3 temporal patches
  assert (types == 2).sum() == np.prod(batch["video_grid_thw"]) // 4 and (types == 1).sum() > 0
  hf_in = dict(
    input_ids=torch.tensor(ids_np, dtype=torch.long),
    pixel_values=torch.tensor(batch["pixel_values"]),
    image_grid_thw=torch.tensor(batch["image_grid_thw"]),
    pixel_values_videos=torch.tensor(batch["pixel_values_videos"]),
    video_grid_thw=torch.tensor(batch["video_grid_thw"]),
    second_per_grid_ts=torch.tensor(batch["second_per_grid_ts"]),
    mm_token_type_ids=torch.tensor(types),
  )
  with torch.no_grad():
    ref = hf_model(**hf_in).logits.numpy()
    ref_tokens = hf_model.generate(
      **hf_in, max_new_tokens=6, do_sample=False, eos_token_id=[], pad_token_id=0
    )[0, ids_np.shape[1] :].numpy()
  model = Qwen2_5_VL(config)
  logits, _ = gen.prefill(model, params, batch, all_logits=True)
  err = np.abs(np.asarray(logits) - ref).max()
  assert err < 1e-4, err
  out = gen.generate(model, params, batch, max_new_tokens=6, eos_token_ids=[tok.vocab_size - 1])
  np.testing.assert_array_equal(out[0], ref_tokens)


@pytest.mark.slow  # (outside CI's `-m "not slow"`: README, "Run the tests")
def test_answer_and_convert_commands(tok_tiny, tmp_path):
  """The README's commands: convert to orbax, then answer from frames (absl entry points)."""
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  np.save(tmp_path / "frames.npy", tok_tiny["frames"])
  orbax_dir = tmp_path / "orbax"
  run = lambda *args: subprocess.run(
    [sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=600
  )
  r = run(
    "experiments/convert_checkpoint.py",
    f"--checkpoint={tok_tiny['path']}",
    f"--out={orbax_dir}",
    "--dtype=float32",
  )
  assert r.returncode == 0, r.stderr[-2000:]
  r = run(
    "experiments/answer.py",
    "--config=configs/answer.py:smoke",
    f"--config.checkpoint={tok_tiny['path']}",
    f"--config.params={orbax_dir}",
    f"--config.video={tmp_path / 'frames.npy'}",
    "--config.question=What moves?",
    f"--workdir={tmp_path / 'wd'}",
  )
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads((tmp_path / "wd" / "answer.json").read_text())
  assert 1 <= len(res["tokens"]) <= 4 and res["vision_tokens"] > 0
  assert (tmp_path / "wd" / "config.json").exists() and (tmp_path / "wd" / "manifest.json").exists()
  # the same answer as the library call with the HF weights
  from configs.answer import get_config
  from mmjax.models import answer

  cfg = get_config("smoke")
  cfg.checkpoint, cfg.video, cfg.question = (
    tok_tiny["path"],
    str(tmp_path / "frames.npy"),
    "What moves?",
  )
  assert answer.run(cfg)["tokens"] == res["tokens"]


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------
def _copy(tiny, tmp_path):
  dst = tmp_path / "ck"
  shutil.copytree(tiny["path"], dst)
  return dst


def test_missing_files_raise(tiny, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt.load_hf_checkpoint(str(tmp_path / "nope"))
  d = _copy(tiny, tmp_path)
  os.remove(d / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    ckpt.load_hf_checkpoint(str(d))
  os.remove(d / "config.json")
  with pytest.raises(FileNotFoundError, match="config.json"):
    ckpt.load_hf_checkpoint(str(d))


def test_wrong_architecture_raises(tiny, tmp_path):
  d = _copy(tiny, tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["model_type"], cfg["architectures"] = "llava", ["LlavaForConditionalGeneration"]
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="not a Qwen2.5-VL config"):
    ckpt.load_hf_checkpoint(str(d))


def _rewrite(d, fn):
  from safetensors.numpy import save_file

  tensors = {k: np.array(v) for k, v in ckpt.read_safetensors(str(d / "model.safetensors"))}
  tensors = fn(tensors)
  os.remove(d / "model.safetensors")
  save_file(tensors, str(d / "model.safetensors"))


def test_missing_and_misshapen_tensors_raise(tiny, tmp_path):
  d = _copy(tiny, tmp_path)
  name = "model.layers.1.self_attn.k_proj.bias"
  _rewrite(d, lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(ValueError, match="missing.*layers_1/self_attn/k_proj/bias"):
    ckpt.load_hf_checkpoint(str(d))
  d2 = _copy(tiny, tmp_path / "b")
  _rewrite(d2, lambda t: {**t, "model.norm.weight": np.ones(65, np.float32)})
  with pytest.raises(ValueError, match="model.norm.weight.*shape"):
    ckpt.load_hf_checkpoint(str(d2))
  d3 = _copy(tiny, tmp_path / "c")
  _rewrite(d3, lambda t: {**t, "model.extra.weight": np.ones(3, np.float32)})
  with pytest.raises(ValueError, match="model.extra.weight"):
    ckpt.load_hf_checkpoint(str(d3))


def test_bad_batches_raise(tiny):
  model = Qwen2_5_VL(tiny["config"])
  b = dict(tiny["batch"])
  ids = b["input_ids"].copy()
  ids[0, 10] = hf_tiny.VIDEO + 0  # one video pad too many... replace a video pad below
  bad = dict(b, input_ids=np.where(ids == hf_tiny.VIDEO, 5, ids))
  with pytest.raises(ValueError, match="video pad tokens"):
    gen.prefill(model, tiny["params"], bad)
  with pytest.raises(ValueError, match="position_ids"):
    gen.prefill(model, tiny["params"], dict(b, position_ids=b["position_ids"][:, :, :-1]))
  with pytest.raises(ValueError, match="input_ids must lie"):
    gen.prefill(model, tiny["params"], dict(b, input_ids=b["input_ids"] + 1000))
  with pytest.raises(ValueError, match="pixel_values"):
    gen.prefill(model, tiny["params"], dict(b, pixel_values=b["pixel_values"][:-1]))
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.generate(model, tiny["params"], b, max_new_tokens=0)


def test_search_on_the_models_own_qk(tok_tiny, tmp_path):
  """The search reads every decoder layer's q/k of a dense prefill; its table then drives
  the model's prefill as an mminference policy."""
  from configs.search_patterns import get_config
  from mmjax import search

  cfg = get_config("model")
  cfg.checkpoint = tok_tiny["path"]
  cfg.frames, cfg.frame_size = 4, (112, 168)
  cfg.patterns = ("a_shape", "block_sparse", "vertical_slash")
  cfg.scales = (0.5, 1.0)
  cfg.block_q = cfg.block_k = 16
  cfg.sample_blocks = 2
  table = search.run(cfg, str(tmp_path), progress=False)
  assert len(table["layers"]) == 2 and all(len(r) == 4 for r in table["layers"])
  assert table["calibration"]["tokens"] > 70
  pol = P.get(
    "mminference", table_path=str(tmp_path / "pattern_table.json"), block_q=16, block_k=16
  )
  config, params = ckpt.load_hf_checkpoint(tok_tiny["path"], dtype=jnp.float32)
  from mmjax.models import processing

  proc = processing.Processor.from_dir(tok_tiny["path"])
  batch = proc(processing.chat_prompt("Hi?", videos=1), videos=[tok_tiny["frames"]])
  logits, _ = gen.prefill(Qwen2_5_VL(config, policy=pol), params, batch)
  assert np.isfinite(np.asarray(logits)).all()


def test_niah_needle_placement():
  from mmjax.eval import niah

  frames = np.zeros((10, 28, 28, 3), np.uint8)
  item = np.full((28, 28, 3), 7, np.uint8)
  assert niah.insert_at_depth(frames.copy(), item, 0.0) == 0
  assert niah.insert_at_depth(frames.copy(), item, 1.0) == 8
  f = frames.copy()
  assert niah.insert_at_depth(f, item, 0.5) == 4 and (f[4:6] == 7).all() and (f[:4] == 0).all()
  with pytest.raises(ValueError, match="depth"):
    niah.insert_at_depth(frames, item, 1.5)
  prompt, videos = niah.build_example(frames, niah.Needle(kind="text", word="kiwi"), 0.5)
  assert [len(v) for v in videos] == [4, 6] and prompt.count("<|video_pad|>") == 2
  assert prompt.index("kiwi") > prompt.index("<|video_pad|>")
  prompt, videos = niah.build_example(frames, niah.Needle(word="kiwi"), 0.0)
  assert len(videos) == 1 and videos[0][:2].min() < 255 and videos[0][:2].max() == 255
  assert niah.is_correct("It is KIWI.", "kiwi") and not niah.is_correct("apple", "kiwi")
  with pytest.raises(ValueError, match="needle kind"):
    niah.Needle(kind="audio")


def test_niah_runs_on_a_checkpoint_and_reproduces(tok_tiny, tmp_path):
  from configs.niah import get_config
  from mmjax.eval import niah

  cfg = get_config("smoke")
  cfg.checkpoint = tok_tiny["path"]
  rows = niah.run_config(cfg, str(tmp_path / "a"), progress=False)
  assert len(rows) == 2 * 2 and {r["policy"] for r in rows} == {"dense", "a_shape"}
  assert all(r["tokens"] > 20 and isinstance(r["correct"], bool) for r in rows)
  niah.run_config(cfg, str(tmp_path / "b"), progress=False)
  a = (tmp_path / "a" / "niah.jsonl").read_bytes()
  assert a == (tmp_path / "b" / "niah.jsonl").read_bytes()
  assert (tmp_path / "a" / "table.md").exists()
  cfg.needle_kind = "text"
  rows = niah.run_config(cfg, None, progress=False)
  assert len(rows) == 4


@pytest.mark.slow
def test_model_ablation_runs_and_reproduces(tok_tiny, tmp_path):
  """configs/ablate_model.py:smoke on the tiny checkpoint, through the absl main."""
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  outs = []
  for name in ("a", "b"):
    r = subprocess.run(
      [
        sys.executable,
        "experiments/ablate.py",
        "--config=configs/ablate_model.py:smoke",
        f"--config.checkpoint={tok_tiny['path']}",
        f"--workdir={tmp_path / name}",
      ],
      cwd=root,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    outs.append((tmp_path / name / "metrics.jsonl").read_bytes())
  assert outs[0] == outs[1]
  rows = [json.loads(line) for line in outs[0].decode().splitlines()]
  per_layer = [r for r in rows if r["layer"] != "model"]
  model_rows = {r["policy"]: r for r in rows if r["layer"] == "model"}
  assert len(per_layer) == 3 * 2 and set(model_rows) == {"dense", "a_shape", "2d_boundary"}
  dense = model_rows["dense"]
  assert dense["same_answer_as_dense"] and dense["logits_rel_error"] < 1e-5
  for r in per_layer:
    assert 0 < r["density"] <= 1 and 0 < r["recall"] <= 1 + 1e-6
    if r["policy"] == "dense":
      assert r["rel_error"] < 1e-5 and r["recall"] > 1 - 1e-5
  assert any(r["rel_error"] > 1e-4 for r in per_layer if r["policy"] == "a_shape")
  assert (tmp_path / "a" / "error_by_layer.png").exists()
