"""The Flax module: dense policy = plain attention; full budget = dense; mRoPE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import policies as P
from mmjax.nn import SparseAttention, rope_cos_sin
from mmjax.nn.attention import dense_reference


@pytest.fixture(autouse=True)
def _full_f32_matmuls():
  # GPUs run f32 matmuls in TF32 by default; these tests compare f32 paths at 2e-5.
  with jax.default_matmul_precision("float32"):
    yield


def _setup(mrope=None, t=100):
  m = SparseAttention(num_heads=4, num_kv_heads=2, head_dim=32, mrope_section=mrope)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, t, 64))
  pos = jnp.broadcast_to(jnp.arange(t), (2, t))
  if mrope:
    pos = jnp.stack([pos, pos // 3, pos % 7])
  params = m.init(jax.random.PRNGKey(1), x, pos)
  return m, x, pos, params


@pytest.mark.parametrize("mrope", [None, (4, 6, 6)])
def test_dense_module_matches_plain_attention(mrope):
  m, x, pos, params = _setup(mrope)
  y = jax.jit(m.apply)(params, x, pos)
  np.testing.assert_allclose(
    np.asarray(y), np.asarray(dense_reference(params, x, pos, m)), atol=2e-5
  )


def test_policy_at_full_budget_equals_dense_and_sparse_differs():
  m, x, pos, params = _setup()
  mod = (jnp.arange(100)[None] % 30 > 10).astype(jnp.int32).repeat(2, 0)
  y = m.apply(params, x, pos, mod)
  for name in ("a_shape", "2d_boundary", "vertical_slash"):
    pol = P.get(name, block_q=16, block_k=16)
    full = m.clone(policy=pol.full_budget(100))
    np.testing.assert_allclose(
      np.asarray(full.apply(params, x, pos, mod)), np.asarray(y), atol=2e-5
    )
  sparse = m.clone(policy=P.get("a_shape", block_q=16, block_k=16, sink_tokens=16, local_tokens=16))
  assert float(jnp.abs(sparse.apply(params, x, pos, mod) - y).max()) > 1e-3


def test_mrope_with_equal_rows_is_rope():
  pos = jnp.broadcast_to(jnp.arange(50), (1, 50))
  c1, s1 = rope_cos_sin(pos, 32)
  c3, s3 = rope_cos_sin(jnp.stack([pos] * 3), 32, mrope_section=(4, 6, 6))
  np.testing.assert_allclose(np.asarray(c1), np.asarray(c3), atol=1e-6)
  np.testing.assert_allclose(np.asarray(s1), np.asarray(s3), atol=1e-6)
  c3b, _ = rope_cos_sin(jnp.stack([pos, pos * 2, pos]), 32, theta=100.0, mrope_section=(4, 6, 6))
  c1, _ = rope_cos_sin(pos, 32, theta=100.0)
  # frequencies 4..9 take the height row: they differ, the others do not.
  diff = np.abs(np.asarray(c3b - c1)).max(axis=(0, 1))
  assert (diff[4:10] > 1e-3).all() and (diff[:4] < 1e-6).all() and (diff[10:16] < 1e-6).all()


def test_module_errors():
  m, x, pos, params = _setup()
  with pytest.raises(ValueError, match="positions must have shape"):
    m.apply(params, x, pos[:, :10])
  with pytest.raises(ValueError, match="x must be"):
    m.apply(params, x[0], pos)
  with pytest.raises(ValueError, match="sum to head_dim"):
    rope_cos_sin(jnp.zeros((3, 1, 4)), 32, mrope_section=(4, 4, 4))
