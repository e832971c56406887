"""The token embedding (models/embeddings/token.py) and the linear head
(models/heads/linear.py): lookups, tied and untied logits, names and inits."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.config import ModelConfig
from ttt_jax.models.context import SequenceContext
from ttt_jax.models.embeddings.token import TokenEmbedding
from ttt_jax.models.heads.linear import LinearHead


def small_config(**overrides) -> ModelConfig:
  values = dict(n_layers=1, d_model=6, n_heads=1, init_std=0.5)
  values.update(overrides)
  return ModelConfig(**values)


def test_embedding_lookup_and_tied_logits():
  module = TokenEmbedding(small_config(), 11, rngs=nnx.Rngs(0))
  assert module.embedding.get_metadata("out_sharding") == ("vocab", "embed")
  table = np.asarray(module.embedding[...], np.float64)
  assert table.shape == (11, 6)
  assert abs(float(np.std(table)) - 0.5) < 0.15
  tokens = jnp.array([[0, 3, 10]])
  x = module(tokens, SequenceContext.for_tokens(tokens), jnp.float32)
  np.testing.assert_allclose(np.asarray(x)[0], table[[0, 3, 10]], rtol=1e-6)
  assert module(tokens, None, jnp.bfloat16).dtype == jnp.bfloat16
  logits = module.attend(x)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits)[0], table[[0, 3, 10]] @ table.T, rtol=1e-4,
                             atol=1e-5)


def test_untied_head_holds_w_and_tied_head_reads_the_embedding():
  embedding = TokenEmbedding(small_config(), 11, rngs=nnx.Rngs(1))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 3, 6)), jnp.bfloat16)
  head = LinearHead(small_config(), 11, rngs=nnx.Rngs(3))
  assert head.w.get_metadata("out_sharding") == ("embed", "vocab")
  assert head.w[...].shape == (6, 11)
  logits = head(x, embedding)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(
      np.asarray(logits), np.asarray(x, np.float64) @ np.asarray(head.w[...], np.float64),
      rtol=2e-2, atol=2e-2)
  tied = LinearHead(small_config(tie_embeddings=True), 11, rngs=nnx.Rngs(3))
  assert tied.w is None
  np.testing.assert_array_equal(np.asarray(tied(x, embedding)),
                                np.asarray(embedding.attend(x)))
  # the head matmul is counted when tied as well
  assert LinearHead.flops_per_token(small_config(tie_embeddings=True), 11) == 2 * 6 * 11
