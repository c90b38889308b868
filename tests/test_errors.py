"""Bad input gets a ValueError that names the problem."""

import jax.numpy as jnp
import pytest

import mmjax
from mmjax import policies as P
from tests import helpers


def _inputs(b=1, t=64, n=4, kh=2, h=16):
  return helpers.random_inputs(0, b, t, n, kh, h, jnp.float32)


@pytest.mark.parametrize(
  "mutate, match",
  [
    (lambda q, k, m: (q[0], k, m), "q must be"),
    (lambda q, k, m: (q, k[0], m), "k must be"),
    (lambda q, k, m: (q, k[:, :32], m), "T == S"),
    (lambda q, k, m: (q[:, :, :3], k, m), "multiple of kv heads"),
    (lambda q, k, m: (q, k[..., :8], m), "head_dim mismatch"),
    (lambda q, k, m: (q, jnp.concatenate([k, k]), m), "batch mismatch"),
    (lambda q, k, m: (q, k, m[:, :10]), "modality must be"),
    (lambda q, k, m: (q, k, m.astype(jnp.float32)), "integer"),
    (lambda q, k, m: (q, k, m - 5), ">= 0"),
    (lambda q, k, m: (q.at[0, 3, 1, 2].set(jnp.nan), k, m), "q contains NaN"),
    (lambda q, k, m: (q, k.at[0, 5, 0, 0].set(jnp.inf), m), "k contains NaN"),
  ],
)
def test_bad_inputs(mutate, match):
  q, k, _, mod = _inputs()
  q, k, mod = mutate(q, k, mod)
  with pytest.raises(ValueError, match=match):
    P.get("a_shape").plan(q, k, mod)


def test_bad_v_and_backend():
  q, k, v, mod = _inputs()
  with pytest.raises(ValueError, match="v must have"):
    mmjax.sparse_attention(q, k, v[:, :, :1], P.get("dense"), mod)
  with pytest.raises(ValueError, match="backend="):
    mmjax.sparse_attention(q, k, v, P.get("dense"), mod, backend="cuda")
  with pytest.raises(ValueError, match="policy"):
    mmjax.sparse_attention(q, k, v)
  plan = P.get("dense", block_q=16, block_k=16).plan(q, k, mod)
  with pytest.raises(ValueError, match="plan is for"):
    mmjax.sparse_attention(q[:, :32], k[:, :32], v[:, :32], plan=plan)


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: P.get("sliding"), "unknown policy"),
    (lambda: P.get("a_shape", window=3), "no option"),
    (lambda: P.get("a_shape", block_q=48), "power of two"),
    (lambda: P.get("q_boundary", patterns={1: "grid"}), "needs permuted keys"),
    (lambda: P.get("grid", stride_norm="softmax"), "stride_norm must be one of"),
    (lambda: P.get("grid", pool_tokens=8), "pool_tokens must be 0"),
    (lambda: P.get("grid", pool_tokens=24), "pool_tokens must be 0"),
    (lambda: P.get("q_boundary", patterns={0: {"local_tokens": 3}}), "'name'"),
    (lambda: P.get("2d_boundary", patterns={(0, 1): "vertical_slash"}), "cross-modality"),
    (lambda: P.get("2d_boundary", patterns={(0, 0): P.get("a_shape", block_q=32)}), "block sizes"),
    (lambda: P.get("mminference"), "table"),
    (lambda: P.get("mminference", table_path="/nonexistent.json"), "does not exist"),
    (lambda: P.get("mminference", table=((P.get("dense"),),), layer=2), "layer=2"),
  ],
)
def test_bad_policy_options(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_table_heads_must_match():
  q, k, _, mod = _inputs()
  pol = P.get("mminference", table=((P.get("dense"),) * 3,))
  with pytest.raises(ValueError, match="3 heads"):
    pol.plan(q, k, mod)
