"""The plain pre-norm residual (``model.residual: plain``), one stream [B, T, D]:

    residual(s, f) = s + f(rms_norm(s)),     expand = reduce = identity
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax import registry
from ttt_jax.config import ModelConfig, Section
from ttt_jax.models.layers import RMSNorm


@dataclasses.dataclass(frozen=True)
class PlainConfig(Section):
  type: str = "plain"


class PlainStreams(nnx.Module):
  """One stream [B, T, D]: expand and reduce are the identity (no parameters)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    del cfg, rngs

  def expand(self, x_BxTxD: jax.Array) -> jax.Array:
    return x_BxTxD

  def reduce(self, stream_BxTxD: jax.Array) -> jax.Array:
    return stream_BxTxD


@registry.RESIDUALS.register("plain")
class PlainResidual(nnx.Module):
  """Pre-norm residual: s + f(rms_norm(s)); one stream [B, T, D]."""

  Config = PlainConfig
  streams = PlainStreams

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    del rngs  # no random parameters
    self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, jnp.dtype(cfg.param_dtype))

  def __call__(self, stream_BxTxD: jax.Array, sublayer: Callable[[jax.Array], jax.Array]
               ) -> jax.Array:
    return stream_BxTxD + sublayer(self.norm(stream_BxTxD))

  @staticmethod
  def flops_per_token(cfg: ModelConfig) -> float:
    del cfg
    return 0.0
