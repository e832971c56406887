"""Grouped-query causal attention and its KV cache against the float64 numpy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ModelConfig
from ttt_jax.models.context import SequenceContext
from ttt_jax.models.ffn.swiglu import SwiGLUConfig
from ttt_jax.models.mixers import attention


def causal_mask(batch: int, length: int) -> np.ndarray:
  return np.broadcast_to(np.tril(np.ones((length, length), bool)), (batch, length, length))


def random_qkv(seed: int, batch: int, length: int, n_heads: int, n_kv_heads: int,
               head_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, length, n_heads, head_dim))
  k = rng.normal(size=(batch, length, n_kv_heads, head_dim))
  v = rng.normal(size=(batch, length, n_kv_heads, head_dim))
  return q, k, v


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_causal_attention_matches_reference(n_heads, n_kv_heads):
  q, k, v = random_qkv(n_kv_heads, 2, 9, n_heads, n_kv_heads, 8)
  got = attention.causal_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  expected = attention.attention_reference(q, k, v, causal_mask(2, 9))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_reference_groups_query_heads_onto_kv_heads():
  # Query heads 0,1 read kv head 0 and heads 2,3 read kv head 1: with identical queries,
  # a head's output equals the single-head attention with its kv head.
  q, k, v = random_qkv(10, 1, 5, 4, 2, 4)
  q[:, :, :, :] = q[:, :, :1, :]
  out = attention.attention_reference(q, k, v, causal_mask(1, 5))
  for head, kv_head in [(0, 0), (1, 0), (2, 1), (3, 1)]:
    single = attention.attention_reference(q[:, :, head:head + 1], k[:, :, kv_head:kv_head + 1],
                                           v[:, :, kv_head:kv_head + 1], causal_mask(1, 5))
    np.testing.assert_allclose(out[:, :, head], single[:, :, 0], rtol=1e-12)


def test_segment_ids_restrict_attention_to_own_segment():
  q, k, v = random_qkv(11, 2, 8, 4, 2, 8)
  segment_ids = np.array([[0, 0, 0, 1, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5, 6, 6]])
  got = attention.causal_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)),
                                   segment_ids_BxT=jnp.asarray(segment_ids))
  mask = causal_mask(2, 8) & (segment_ids[:, :, None] == segment_ids[:, None, :])
  np.testing.assert_allclose(np.asarray(got), attention.attention_reference(q, k, v, mask),
                             rtol=1e-5, atol=1e-5)


def test_bf16_attention_close_to_fp32():
  q, k, v = random_qkv(12, 2, 16, 4, 2, 8)
  got = attention.causal_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
  assert got.dtype == jnp.bfloat16
  expected = attention.attention_reference(q, k, v, causal_mask(2, 16))
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), expected, atol=5e-2)


def test_kv_cache_prefill_then_steps_matches_full_attention():
  batch, length, prompt_len = 2, 10, 4
  q, k, v = random_qkv(13, batch, length, 4, 2, 8)
  expected = attention.attention_reference(q, k, v, causal_mask(batch, length))
  positions = np.broadcast_to(np.arange(length), (batch, length))
  cache = attention.init_kv_cache(batch, 16, 2, 8, jnp.float32)
  outputs = []
  chunks = [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, length)]
  for start, stop in chunks:
    chunk = [jnp.asarray(a[:, start:stop], jnp.float32) for a in (q, k, v, positions)]
    cache = attention.update_kv_cache(cache, chunk[1], chunk[2], chunk[3])
    outputs.append(attention.cached_attention(chunk[0], chunk[3], cache))
  assert int(cache.end) == length
  np.testing.assert_array_equal(np.asarray(cache.positions_BxL)[:, length:], -1)
  np.testing.assert_allclose(np.concatenate([np.asarray(o) for o in outputs], axis=1), expected,
                             rtol=1e-5, atol=1e-5)


def tiny_config(**overrides) -> ModelConfig:
  values = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn=SwiGLUConfig(d_ff=64))
  values.update(overrides)
  return ModelConfig(**values)


def test_module_matches_reference_and_has_named_params():
  cfg = tiny_config()
  module = attention.Attention(cfg, rngs=nnx.Rngs(0))
  shapes = {name: getattr(module, name)[...].shape for name in ("wq", "wk", "wv", "wo")}
  assert shapes == {"wq": (32, 32), "wk": (32, 16), "wv": (32, 16), "wo": (32, 32)}
  names = {name: getattr(module, name).get_metadata("out_sharding")
           for name in ("wq", "wk", "wv", "wo")}
  assert names == {"wq": ("embed", "heads"), "wk": ("embed", "kv_heads"),
                   "wv": ("embed", "kv_heads"), "wo": ("heads", "embed")}
  rng = np.random.default_rng(14)
  x = rng.normal(size=(2, 7, 32))
  positions = np.broadcast_to(np.arange(7), (2, 7))
  got = module(jnp.asarray(x, jnp.float32),
               SequenceContext(positions_BxT=jnp.asarray(positions)))
  q, k, v = module.project_qkv(jnp.asarray(x, jnp.float32), jnp.asarray(positions))
  o = attention.attention_reference(np.asarray(q), np.asarray(k), np.asarray(v),
                                    causal_mask(2, 7))
  expected = o.reshape(2, 7, 32) @ np.asarray(module.wo[...], np.float64)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


def test_module_decode_matches_full_call():
  module = attention.Attention(tiny_config(), rngs=nnx.Rngs(1))
  x = jnp.asarray(np.random.default_rng(15).normal(size=(2, 6, 32)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  full = module(x, SequenceContext(positions_BxT=positions))
  decode = jax.jit(lambda x, positions, cache: module.decode(
      x, SequenceContext(positions_BxT=positions), cache))
  cache = module.init_cache(2, 8, jnp.float32, {})
  y_prompt, cache = decode(x[:, :3], positions[:, :3], cache)
  steps = [y_prompt]
  for t in range(3, 6):
    y_step, cache = decode(x[:, t:t + 1], positions[:, t:t + 1], cache)
    steps.append(y_step)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full),
                             rtol=1e-5, atol=1e-6)


def test_output_projection_init_is_scaled_by_depth():
  cfg = tiny_config(d_model=128, n_heads=4, n_kv_heads=0, n_layers=8, init_std=0.02)
  module = attention.Attention(cfg, rngs=nnx.Rngs(2))
  assert abs(float(jnp.std(module.wq[...])) - 0.02) < 0.002
  assert abs(float(jnp.std(module.wo[...])) - 0.005) < 0.0005
