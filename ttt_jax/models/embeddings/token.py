"""Token embedding (``model.embedding: token``): a table E [V, D] ('vocab', 'embed'),

    x_t = E[token_t]          (GPT-2 style: no sqrt(D) multiplier)

initialised N(0, init_std^2); with ``model.tie_embeddings`` the head's logits are
x E^T (``attend``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax import registry
from ttt_jax.config import ModelConfig, Section
from ttt_jax.models.context import SequenceContext
from ttt_jax.models.layers import embed_tokens, logits_from_embedding, normal, param


@dataclasses.dataclass(frozen=True)
class TokenEmbeddingConfig(Section):
  """``model.embedding: token``: the table's width is model.d_model."""
  type: str = "token"


@registry.EMBEDDINGS.register("token")
class TokenEmbedding(nnx.Module):
  """Holds E [V, D]; a row lookup in the compute dtype."""

  Config = TokenEmbeddingConfig

  def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
    self.embedding = param(normal(rngs.params(), (vocab_size, cfg.d_model), cfg.init_std,
                                  jnp.dtype(cfg.param_dtype)), ("vocab", "embed"))

  def __call__(self, tokens_BxT: jax.Array, ctx: SequenceContext | None,
               dtype: jnp.dtype) -> jax.Array:
    del ctx  # one row per token
    return embed_tokens(tokens_BxT, self.embedding[...], dtype)

  def attend(self, x_BxTxD: jax.Array) -> jax.Array:
    """Tied-head logits [B, T, V] in float32."""
    return logits_from_embedding(x_BxTxD, self.embedding[...])
