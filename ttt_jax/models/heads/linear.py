"""Linear LM head (``model.head: linear``): float32 logits of the final hidden states,

    logits = x W_head        W_head [D, V] ('embed', 'vocab'), init N(0, init_std^2)
    logits = x E^T           with model.tie_embeddings (the embedding's ``attend``)

accumulated in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax import registry
from ttt_jax.config import ModelConfig, Section
from ttt_jax.models.layers import logits_from_head, normal, param


@dataclasses.dataclass(frozen=True)
class LinearHeadConfig(Section):
  """``model.head: linear``: no settings of its own; ``model.tie_embeddings`` decides
  whether it holds W_head or reads the embedding table."""
  type: str = "linear"


@registry.HEADS.register("linear")
class LinearHead(nnx.Module):
  """Holds W_head [D, V] ('embed', 'vocab'), or nothing when the embeddings are tied
  (the embedding's ``attend`` then gives the logits)."""

  Config = LinearHeadConfig

  def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
    self.w = None if cfg.tie_embeddings else param(
        normal(rngs.params(), (cfg.d_model, vocab_size), cfg.init_std,
               jnp.dtype(cfg.param_dtype)), ("embed", "vocab"))

  def __call__(self, x_BxTxD: jax.Array, embedding) -> jax.Array:
    if self.w is None:
      return embedding.attend(x_BxTxD)
    return logits_from_head(x_BxTxD, self.w[...])

  @staticmethod
  def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """2 D V, counted when tied as well."""
    return 2 * cfg.d_model * vocab_size
