"""SwiGLU feed-forward sublayer (Shazeer, 2020), ``model.ffn: {type: swiglu, d_ff: F}``:

    swiglu(x) = (silu(x W_gate) * (x W_up)) W_down       W_gate, W_up [D, F], W_down [F, D]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax import registry
from ttt_jax.config import ModelConfig, Section, check_positive
from ttt_jax.models.context import SequenceContext
from ttt_jax.models.layers import dense, normal, param


@dataclasses.dataclass(frozen=True)
class SwiGLUConfig(Section):
  type: str = "swiglu"
  d_ff: int = 688
  """Hidden width F of the SwiGLU MLP."""

  def __post_init__(self):
    check_positive("model.ffn", self, "d_ff")


def swiglu(x_BxTxD: jax.Array, w_gate_DxF: jax.Array, w_up_DxF: jax.Array,
           w_down_FxD: jax.Array) -> jax.Array:
  """(silu(x W_gate) * x W_up) W_down, with the weights cast to x's dtype."""
  dtype = x_BxTxD.dtype
  gate_BxTxF = dense(x_BxTxD, w_gate_DxF.astype(dtype))
  up_BxTxF = dense(x_BxTxD, w_up_DxF.astype(dtype))
  hidden_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
  return dense(hidden_BxTxF, w_down_FxD.astype(dtype))


@registry.FFNS.register("swiglu")
class SwiGLU(nnx.Module):
  """Holds W_gate, W_up [D, F] ('embed', 'mlp') and W_down [F, D] ('mlp', 'embed') of
  ``swiglu``. Inits are N(0, init_std^2); W_down (an output projection into the
  residual stream) is further scaled by 1/sqrt(2 * n_layers)."""

  Config = SwiGLUConfig

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d_model, d_ff = cfg.d_model, cfg.ffn.d_ff
    param_dtype = jnp.dtype(cfg.param_dtype)
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.w_gate = param(normal(rngs.params(), (d_model, d_ff), cfg.init_std, param_dtype),
                        ("embed", "mlp"))
    self.w_up = param(normal(rngs.params(), (d_model, d_ff), cfg.init_std, param_dtype),
                      ("embed", "mlp"))
    self.w_down = param(normal(rngs.params(), (d_ff, d_model), out_std, param_dtype),
                        ("mlp", "embed"))

  def __call__(self, x_BxTxD: jax.Array, ctx: SequenceContext | None = None) -> jax.Array:
    del ctx  # position-wise
    return swiglu(x_BxTxD, self.w_gate[...], self.w_up[...], self.w_down[...])

  @staticmethod
  def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    del seq_len
    return 2 * 3 * cfg.d_model * cfg.ffn.d_ff
