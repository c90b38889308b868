"""Sharded prefill (mmjax.distributed) on 8 CPU devices.

A process gets 8 CPU devices only from XLA_FLAGS set before jax starts, so
`test_on_8_cpu_devices` runs this file again in a subprocess with
`--xla_force_host_platform_device_count=8` and MMJAX_MULTIDEVICE=1; there the tests
marked `multidevice` run. The other tests (mesh validation) run in the main process.
"""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmjax
from mmjax import bench, distributed
from mmjax import policies as P
from mmjax.attention import sparse_attention
from tests.helpers import mixed_table_policy, small_policies
from tests.test_qwen2_5_vl import tok_tiny  # noqa: F401  (a fixture)

MULTI = os.environ.get("MMJAX_MULTIDEVICE") == "1"
multidevice = pytest.mark.skipif(
  not MULTI, reason="runs in the 8-device subprocess of test_on_8_cpu_devices"
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The subprocess's tests in two shards of about two minutes each, so that the suite's
# workers share them: the model tests and the bf16 + Pallas one, then the other attention
# tests (2026-12-02, alone: 91 and 145 s before the bf16 test, 27 s, moved).
_FIRST = "model_prefill or generate or answer or poison or bf16_and_pallas"
SHARDS = (_FIRST, f"not ({_FIRST})")


@pytest.mark.skipif(MULTI, reason="this is the subprocess")
@pytest.mark.parametrize("shard", range(len(SHARDS)))
def test_on_8_cpu_devices(shard):
  flags = os.environ.get("XLA_FLAGS", "")
  env = dict(
    os.environ,
    XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=8".strip(),
    MMJAX_MULTIDEVICE="1",
    JAX_PLATFORMS="cpu",
  )
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "-q",
      "-rs",
      "-p",
      "no:cacheprovider",
      "-n",
      "0",
      "-m",
      "not gpu",
      "-k",
      SHARDS[shard],
      __file__,
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=1200,
    check=False,
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-6000:]
  summary = out.strip().splitlines()[-1]
  passed = int(re.search(r"(\d+) passed", summary).group(1))
  assert passed >= (6, 10)[shard], summary
  # there, only the main process's tests skip (no test marked multidevice)
  skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
  assert all("this is the subprocess" in s or "main process" in s for s in skips), skips


# ----------------------------------------------------------------------------------------
# mesh validation (main process)
# ----------------------------------------------------------------------------------------
def test_mesh_shape_parse_and_errors():
  assert distributed.MeshShape.parse(None) == distributed.MeshShape(1, 1, 1)
  m = distributed.MeshShape.parse({"seq": 2, "heads": 2})
  assert (m.data, m.heads, m.seq, m.size, m.head_shards) == (1, 2, 2, 4, 4)
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['tensor'\]"):
    distributed.MeshShape.parse({"tensor": 2})
  with pytest.raises(ValueError, match="mesh.seq must be an int >= 1"):
    distributed.MeshShape.parse({"seq": 0})
  with pytest.raises(ValueError, match="mesh.heads must be an int"):
    distributed.MeshShape(heads=1.5)
  with pytest.raises(ValueError, match="must be a mapping"):
    distributed.MeshShape.parse([1, 2, 1])


def test_mesh_shape_check_names_the_shape():
  m = distributed.MeshShape(data=2, heads=2, seq=2)
  m.check(batch=4, seq_len=1024, num_heads=28, num_kv_heads=4)
  with pytest.raises(ValueError, match=r"mesh.data=2 does not divide the batch B=3"):
    m.check(batch=3)
  with pytest.raises(ValueError, match=r"mesh.seq=2 does not divide the sequence length T=1001"):
    m.check(seq_len=1001)
  with pytest.raises(ValueError, match=r"= 4 does not divide the kv heads K=2"):
    m.check(num_kv_heads=2)
  with pytest.raises(ValueError, match=r"does not divide the query heads N=6"):
    m.check(num_heads=6)


@pytest.mark.skipif(MULTI, reason="main process: 1 device")
def test_make_mesh_too_many_devices():
  with pytest.raises(ValueError, match="needs 8 devices, 1 are available.*device_count"):
    distributed.make_mesh({"data": 2, "heads": 2, "seq": 2})


def test_configs_mesh_keys_are_checked():
  """A config's mesh entries go through MeshShape.parse: unknown keys raise."""
  import configs.bench_sharded as cb  # noqa: PLC0415

  for arg in ("", "one", "smoke"):
    for m in cb.get_config(arg).meshes:
      distributed.MeshShape.parse(m)
  bad = cb.get_config("smoke")
  bad.meshes = ({"data": 1, "rows": 2},)
  from mmjax.models import bench_sharded  # noqa: PLC0415

  with pytest.raises(ValueError, match=r"unknown key\(s\) \['rows'\]"):
    bench_sharded.run(bad, None, progress=False)


def test_for_heads_slices_the_table():
  pol = mixed_table_policy(8)
  sub = pol.for_heads(2, 3)
  assert sub.head_policies(3) == pol.head_policies(8)[2:5]
  with pytest.raises(ValueError, match=r"heads \[6, 10\) are outside"):
    pol.for_heads(6, 4)
  chunks = distributed.chunk_policies(pol, 8, 4)
  assert [c.head_policies(2) for c in chunks] == [
    pol.head_policies(8)[i : i + 2] for i in (0, 2, 4, 6)
  ]


# ----------------------------------------------------------------------------------------
# 8 devices
# ----------------------------------------------------------------------------------------
B, T, N, K, H = 2, 192, 8, 4, 32


def _inputs(dtype=jnp.float32, seed=0, h=H):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (B, T, N, h), dtype)
  k = jax.random.normal(ks[1], (B, T, K, h), dtype)
  v = jax.random.normal(ks[2], (B, T, K, h), dtype)
  m0 = bench.video_text_modality(T, 48, 8, 32)[0]
  m1 = bench.video_text_modality(T, 32, 4, 48)[0]  # different layout per batch row
  return q, k, v, jnp.asarray(np.stack([m0, m1]), jnp.int32)


def _all_policies():
  pols = dict(small_policies())
  pols["mminference"] = mixed_table_policy(N)
  return pols


@multidevice
@pytest.mark.parametrize(
  "mesh_shape, names",
  [
    ((2, 2, 2), ("2d_boundary",)),
    ((1, 1, 4), ("grid",)),
    ((1, 4, 1), ("q_boundary",)),
  ],
)
def test_sharded_equals_single_device(mesh_shape, names):
  """A few policies per mesh. The 2D boundary's pairs run every pattern on the mesh using
  all three axes (an mminference table there: `test_model_prefill_sharded_equals_single_device`;
  for CI time, 2026-12-03)."""
  assert {p.name for p in _all_policies()["mminference"].head_policies(N)} == set(small_policies())
  q, k, v, mod = _inputs(seed=sum(mesh_shape))
  mesh = distributed.make_mesh(dict(zip(distributed.AXES, mesh_shape, strict=True)))
  for name, pol in _all_policies().items():
    if name not in names:
      continue
    ref = sparse_attention(q, k, v, pol, mod, backend="xla")
    out = distributed.sharded_sparse_attention(q, k, v, pol, mod, mesh=mesh, backend="xla")
    assert bool(jnp.all(jnp.isfinite(out))), name
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5, err_msg=name)
    d, h, s = mesh_shape
    assert out.sharding.shard_shape(out.shape) == (B // d, T // s, N // h, H)


@multidevice
def test_sharded_bf16_and_pallas_interpret():
  q, k, v, mod = _inputs(jnp.bfloat16, seed=7)
  mesh = distributed.make_mesh({"data": 2, "heads": 2, "seq": 2})
  pols = _all_policies()
  # (the sharded XLA backend is compared in f32 above; here the Pallas kernels, with
  # 2d_boundary: its pairs take every pattern; the mminference table took 35 s)
  for name, backends in (("2d_boundary", ("pallas",)),):
    pol = pols[name]
    ref = sparse_attention(q, k, v, pol, mod, backend="xla").astype(jnp.float32)
    for backend in backends:
      out = distributed.sharded_sparse_attention(q, k, v, pol, mod, mesh=mesh, backend=backend)
      np.testing.assert_allclose(
        np.asarray(out.astype(jnp.float32)),
        np.asarray(ref),
        atol=2e-2,
        rtol=2e-2,
        err_msg=f"{name} {backend}",
      )


@multidevice
def test_poison_probe_can_fail():
  """The comparison above does catch a wrong device output (here: one head chunk's output
  zeroed on purpose)."""
  q, k, v, mod = _inputs()
  mesh = distributed.make_mesh({"data": 2, "heads": 2, "seq": 2})
  pol = _all_policies()["vertical_slash"]
  ref = sparse_attention(q, k, v, pol, mod, backend="xla")
  out = distributed.sharded_sparse_attention(q, k, v, pol, mod, mesh=mesh)
  bad = out.at[:, :, 2:4].set(0.0)
  with pytest.raises(AssertionError):
    np.testing.assert_allclose(np.asarray(bad), np.asarray(ref), atol=1e-5, rtol=1e-5)


def _collectives(txt):
  return {
    op: len(re.findall(rf"= [^=]*? {op}\(", txt))
    for op in ("all-gather", "all-to-all", "all-reduce", "reduce-scatter", "collective-permute")
  }


@multidevice
@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 1)])  # tokens sharded or not
def test_hlo_has_no_all_gather(mesh_shape):
  q, k, v, mod = _inputs()
  mesh = distributed.make_mesh(dict(zip(distributed.AXES, mesh_shape, strict=True)))
  for name in ("2d_boundary",):  # its pairs mix every pattern, in lax.cond branches
    pol = _all_policies()[name]
    f = jax.jit(
      lambda q, k, v, m, pol=pol: distributed.sharded_sparse_attention(q, k, v, pol, m, mesh=mesh)
    )
    txt = f.lower(q, k, v, mod).compile().as_text()
    ops = _collectives(txt)
    assert ops["all-gather"] == 0, (name, ops)
    # q, k, v in and the output back: one all-to-all each when the tokens are sharded
    assert (ops["all-to-all"] > 0) == (mesh_shape[2] > 1), (name, ops)
    assert ops["all-reduce"] == ops["reduce-scatter"] == 0, (name, ops)


def _tiny():
  from mmjax.models.bench import tiny_sharded_config  # noqa: PLC0415

  return tiny_sharded_config()


def _prompt(cfg):
  from mmjax.models.bench import video_prompt  # noqa: PLC0415

  ids, pos, mod, _ = video_prompt(cfg, 256, (4, 4), (32, 16))
  ids2, pos2, mod2, _ = video_prompt(cfg, 256, (4, 2), (64, 16), seed=1)
  return (
    np.concatenate([ids, ids2]),
    np.concatenate([pos, pos2], axis=1),
    np.concatenate([mod, mod2]),
  )


def _table_2_layers():
  row = mixed_table_policy(8, 64, 64).head_policies(8)
  return P.get("mminference", table=(row, row[::-1]), block_q=64, block_k=64)


@multidevice
@pytest.mark.parametrize(
  "mesh_shape, policy, mlp_chunk",
  [
    # (every axis: data, heads (all-reduce) and tokens (all-to-all); 2026-12-03: the
    # heads-only and unchunked tokens-only cases went, for CI time: the attention tests
    # below run both meshes)
    ((2, 2, 2), "mminference", 48),  # 128 local tokens: chunks 48, 48, 32
    ((1, 1, 4), "vertical_slash", 24),  # 64 local tokens: chunks 24, 24, 16
  ],
)
def test_model_prefill_sharded_equals_single_device(mesh_shape, policy, mlp_chunk):
  """The sharded prefill (and its MLP chunked over each device's local tokens) equals the
  unchunked single-device prefill."""
  from mmjax.models.qwen2_5_vl import Qwen2_5_VL, init_params  # noqa: PLC0415

  cfg = _tiny()
  ids, pos, mod = _prompt(cfg)
  params = init_params(cfg, seed=3)
  mesh = distributed.make_mesh(dict(zip(distributed.AXES, mesh_shape, strict=True)))
  if policy == "mminference":
    pol = _table_2_layers()
  else:
    pol = P.get("vertical_slash", vertical_size=64, slash_size=64, block_q=64, block_k=64)
  one = Qwen2_5_VL(cfg, policy=pol)
  many = Qwen2_5_VL(cfg, policy=pol, mesh=mesh, mlp_chunk=mlp_chunk)
  f1 = jax.jit(lambda p, i, po, m, model=one: model.apply(p, i, po, m))
  f8 = jax.jit(lambda p, i, po, m, model=many: model.apply(p, i, po, m))
  l1, c1 = f1(params, ids, pos, mod)
  sharded = distributed.shard_params(params, mesh)
  compiled = f8.lower(sharded, ids, pos, mod).compile()  # one compile: run and HLO
  l8, c8 = compiled(sharded, ids, pos, mod)
  np.testing.assert_allclose(np.asarray(l8), np.asarray(l1), atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(c8[-1][0]), np.asarray(c1[-1][0]), atol=2e-5, rtol=1e-4)
  # activations are sequence-sharded, weights head-sharded, and q/k/v never gathered
  ops = _collectives(compiled.as_text())
  assert ops["all-gather"] == 0, ops
  assert (ops["all-to-all"] > 0) == (mesh_shape[2] > 1), ops
  assert (ops["all-reduce"] > 0) == (mesh_shape[1] > 1), ops
  q_proj = sharded["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q_proj.sharding.spec == distributed.P(None, "heads")


@multidevice
def test_generate_with_a_mesh_matches():
  from mmjax.models.qwen2_5_vl import Qwen2_5_VL, init_params  # noqa: PLC0415

  cfg = _tiny()
  params = init_params(cfg, seed=1)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 500, (2, 256)).astype(np.int32)
  batch = dict(
    input_ids=ids,
    position_ids=np.broadcast_to(np.arange(256), (3, 2, 256)).astype(np.int32),
    modality=np.zeros((2, 256), np.int32),
  )
  mesh = distributed.make_mesh({"data": 2, "heads": 2, "seq": 2})
  pol = P.get("a_shape", sink_tokens=64, local_tokens=64)
  a = mmjax.generate(Qwen2_5_VL(cfg, policy=pol), params, batch, max_new_tokens=6)
  b = mmjax.generate(
    Qwen2_5_VL(cfg, policy=pol, mesh=mesh),
    distributed.shard_params(params, mesh),
    batch,
    max_new_tokens=6,
  )
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@multidevice
def test_mesh_errors_on_8_devices():
  from mmjax.models.qwen2_5_vl import Qwen2_5_VL, init_params  # noqa: PLC0415

  cfg = _tiny()
  q, k, v, mod = _inputs()
  mesh = distributed.make_mesh({"data": 1, "heads": 8, "seq": 1})
  with pytest.raises(ValueError, match=r"= 8 does not divide the kv heads K=4"):
    distributed.sharded_sparse_attention(q, k, v, P.get("dense"), mod, mesh=mesh)
  mesh = distributed.make_mesh({"data": 1, "heads": 1, "seq": 8})
  with pytest.raises(ValueError, match=r"does not divide the kv heads K=4"):
    distributed.sharded_sparse_attention(q, k, v, P.get("dense"), mod, mesh=mesh)
  mesh = distributed.make_mesh({"data": 1, "heads": 1, "seq": 4})
  model = Qwen2_5_VL(cfg, policy=P.get("dense"), mesh=mesh)
  params = init_params(cfg)
  ids, pos, mod = _prompt(cfg)
  with pytest.raises(ValueError, match=r"mesh.seq=4 does not divide the sequence length T=254"):
    model.apply(params, ids[:, :254], pos[:, :, :254], mod[:, :254])
  # a split weight dimension the heads axis does not divide
  odd = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, intermediate_size=250))
  with pytest.raises(ValueError, match=r"mesh.heads=4 does not divide .*mlp/down_proj/kernel"):
    distributed.param_shardings(
      jax.eval_shape(lambda: init_params(odd)),
      distributed.make_mesh({"data": 1, "heads": 4, "seq": 1}),
    )


@multidevice
def test_answer_with_a_mesh(tok_tiny, tmp_path):  # noqa: F811  (the fixture)
  """configs/answer.py's `mesh`: the same greedy answer on 2 devices (heads split)."""
  from configs.answer import get_config  # noqa: PLC0415
  from mmjax.models import answer  # noqa: PLC0415

  np.save(tmp_path / "frames.npy", tok_tiny["frames"])
  cfg = get_config("smoke")
  cfg.checkpoint, cfg.video = tok_tiny["path"], str(tmp_path / "frames.npy")
  base = answer.run(cfg)
  cfg.mesh.heads = 2
  res = answer.run(cfg)
  assert res["tokens"] == base["tokens"] and res["mesh"] == {"data": 1, "heads": 2, "seq": 1}
  cfg.mesh.heads, cfg.mesh.seq = 1, 2
  n = base["prompt_tokens"]
  if n % 2:  # an odd prompt cannot be split over 2 sequence shards
    with pytest.raises(ValueError, match=rf"mesh.seq=2 does not divide the sequence length T={n}"):
      answer.run(cfg)


@pytest.mark.gpu
def test_gpu_shard_map_with_pallas_on_one_device():
  """On the GPU: the shard_map path with the compiled Pallas kernel (a 1-device mesh; more
  GPUs run the same program per device) equals the unsharded kernel."""
  q, k, v, mod = _inputs(jnp.bfloat16, seed=11, h=64)
  mesh = distributed.make_mesh({"data": 1, "heads": 1, "seq": 1})
  for name in ("vertical_slash", "2d_boundary", "mminference"):
    pol = _all_policies()[name]
    ref = sparse_attention(q, k, v, pol, mod, backend="pallas")
    out = distributed.sharded_sparse_attention(q, k, v, pol, mod, mesh=mesh, backend="pallas")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref), err_msg=name)


@pytest.mark.skipif(MULTI, reason="main process: a one-device mesh")
def test_mlp_chunk_gives_the_same_logits():
  """`mlp_chunk` (the MLP over token chunks, a ragged last chunk here) changes no number,
  with or without a (one-device) mesh."""
  from mmjax.models.qwen2_5_vl import Qwen2_5_VL, init_params  # noqa: PLC0415

  cfg = _tiny()
  ids, pos, mod = _prompt(cfg)
  params = init_params(cfg, seed=2)
  pol = P.get("a_shape", sink_tokens=64, local_tokens=64, block_q=64, block_k=64)
  full = Qwen2_5_VL(cfg, policy=pol).apply(params, ids, pos, mod)[0]
  chunked = Qwen2_5_VL(cfg, policy=pol, mlp_chunk=100).apply(params, ids, pos, mod)[0]
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), atol=1e-6, rtol=1e-5)
  mesh = distributed.make_mesh({"data": 1, "heads": 1, "seq": 1})
  on_mesh = Qwen2_5_VL(cfg, policy=pol, mlp_chunk=100, mesh=mesh).apply(params, ids, pos, mod)
  np.testing.assert_allclose(np.asarray(on_mesh[0]), np.asarray(full), atol=1e-6, rtol=1e-5)
