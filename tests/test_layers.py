"""RMSNorm, RoPE, the embedding/head matmuls and the param helper against float64 numpy
references."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.models import layers


def rope_reference(x_BxTxHxK: np.ndarray, positions_BxT: np.ndarray, theta: float) -> np.ndarray:
  x = np.asarray(x_BxTxHxK, np.float64)
  half = x.shape[-1] // 2
  out = np.empty_like(x)
  for i in range(half):
    angle_BxTx1 = positions_BxT[:, :, None] * theta ** (-2.0 * i / x.shape[-1])
    c, s = np.cos(angle_BxTx1), np.sin(angle_BxTx1)
    out[..., i] = x[..., i] * c - x[..., half + i] * s
    out[..., half + i] = x[..., half + i] * c + x[..., i] * s
  return out


def test_rms_norm_matches_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 16)) * 3.0
  scale = rng.normal(size=(16,))
  expected = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-5) * scale
  got = layers.rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32), 1e-5)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_bf16_keeps_dtype_and_uses_fp32_statistics():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 64)) * 100.0  # squares overflow nothing in fp32, but matter in bf16
  x_bf16 = jnp.asarray(x, jnp.bfloat16)
  got = layers.rms_norm(x_bf16, jnp.ones((64,), jnp.float32), 1e-5)
  assert got.dtype == jnp.bfloat16
  x_rounded = np.asarray(x_bf16.astype(jnp.float32), np.float64)
  expected = x_rounded / np.sqrt(np.mean(x_rounded ** 2, axis=-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), expected, rtol=1e-2, atol=1e-2)


def test_rope_matches_reference():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 7, 3, 8))
  positions = rng.integers(0, 1000, size=(2, 7))
  got = layers.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), 10000.0)
  np.testing.assert_allclose(np.asarray(got), rope_reference(x, positions, 10000.0),
                             rtol=1e-4, atol=1e-4)


def test_rope_preserves_norm():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 9, 4, 16)), jnp.float32)
  positions = jnp.asarray(rng.integers(0, 4096, size=(2, 9)))
  rotated = layers.apply_rope(x, positions, 10000.0)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(rotated), axis=-1),
                             np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-5)


def test_rope_position_zero_is_identity():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 3, 2, 8)), jnp.float32)
  rotated = layers.apply_rope(x, jnp.zeros((1, 3), jnp.int32), 10000.0)
  np.testing.assert_allclose(np.asarray(rotated), np.asarray(x), atol=1e-7)


def test_rope_dot_product_depends_only_on_relative_position():
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(m: int, n: int) -> float:
    q_rot = layers.apply_rope(q, jnp.array([[m]]), 10000.0)
    k_rot = layers.apply_rope(k, jnp.array([[n]]), 10000.0)
    return float(jnp.sum(q_rot * k_rot))

  for offset in (0, 3, 17):
    scores = [score(start + offset, start) for start in (0, 5, 123, 1000)]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
  assert abs(score(3, 0) - score(0, 3)) > 1e-3  # and it does depend on the sign of m - n


def test_head_logits_are_float32_from_bf16_activations():
  x = jnp.ones((1, 2, 4), jnp.bfloat16)
  assert layers.logits_from_head(x, jnp.ones((4, 5), jnp.float32)).dtype == jnp.float32


def test_param_helper_names_and_validation():
  p = layers.param(jnp.zeros((2, 3)), ("embed", "mlp"))
  assert isinstance(p, nnx.Param)
  assert p.get_metadata("out_sharding") == ("embed", "mlp")
  assert p.get_metadata("eager_sharding") is False
  with pytest.raises(ValueError, match="axis names"):
    layers.param(jnp.zeros((2, 3)), ("embed",))
  with pytest.raises(ValueError, match="unknown"):
    layers.param(jnp.zeros((2,)), ("hidden",))


def test_rms_norm_module_stores_scale_in_param_dtype():
  norm = layers.RMSNorm(5, 1e-6, jnp.bfloat16)
  assert norm.scale[...].dtype == jnp.bfloat16
  assert norm.scale.get_metadata("out_sharding") == ("norm",)
  np.testing.assert_array_equal(np.asarray(norm.scale[...], np.float32), np.ones(5))


def test_embedding_lookup_and_tied_logits_functions():
  rng = np.random.default_rng(8)
  table = rng.normal(size=(11, 6))
  tokens = jnp.array([[0, 3, 10]])
  x = layers.embed_tokens(tokens, jnp.asarray(table, jnp.float32), jnp.bfloat16)
  assert x.dtype == jnp.bfloat16
  x = layers.embed_tokens(tokens, jnp.asarray(table, jnp.float32), jnp.float32)
  np.testing.assert_allclose(np.asarray(x)[0], table[[0, 3, 10]], rtol=1e-6)
  logits = layers.logits_from_embedding(x, jnp.asarray(table, jnp.float32))
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits)[0], table[[0, 3, 10]] @ table.T, rtol=1e-4,
                             atol=1e-5)
