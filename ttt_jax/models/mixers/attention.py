"""Grouped-query causal softmax attention with rotary positions and a KV cache.

For query heads h = 0..H-1 sharing G = n_kv_heads key/value heads (query head h reads
kv head h // (H / G); G = H is multi-head, G = 1 multi-query attention; Ainslie et al.,
2023), with head width K and x in R^{T x D}:

    q_h = rope(x W_q)_h,  k_g = rope(x W_k)_g,  v_g = (x W_v)_g
    o_h = softmax(q_h k_g^T / sqrt(K) + M) v_g,          g = h // (H / G)
    y   = concat_h(o_h) W_o

M is the causal mask (0 where key index <= query index, -inf elsewhere), optionally
intersected with a same-segment mask for packed sequences.

Training uses ``jax.nn.dot_product_attention``. Its 'xla' implementation forms the
logits q k^T with float32 accumulation (``preferred_element_type`` float32, and
``DotAlgorithmPreset.BF16_BF16_F32`` for bfloat16 inputs), applies the mask and the
softmax in float32, casts the probabilities back to the value dtype and multiplies by V
in the compute dtype. 'cudnn' is the fused flash kernel (GPU only).

Decoding keeps a KV cache per layer: keys/values of every token seen so far in slots
0..end-1 of a [B, max_len, G, K] buffer, together with each slot's position (-1 for an
empty slot). A chunk of S new tokens (S = prompt length at prefill, 1 per step after)
is written at slots end..end+S-1 and attends to every filled slot whose position is
<= its own, which is the causal mask of the full sequence:

    mask[b, s, l] = (cache_pos[b, l] >= 0) and (cache_pos[b, l] <= query_pos[b, s])

A token decoded at a negative position (a pad of a left-padded prompt) is therefore
never attended to; its own query attends to nothing, and a fully masked row stays
finite (the mask is a large negative logit, not -inf: uniform weights over the slots).

``attention_reference`` is the float64 numpy oracle the tests compare against.

Config: ``model.mixer: {type: attention, impl: xla | cudnn}``; the heads, head width
and RoPE base are the model's (``model.n_heads``, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ttt_jax import registry
from ttt_jax.config import ConfigError, ModelConfig, Section, check_choice
from ttt_jax.models.context import SequenceContext
from ttt_jax.models.layers import apply_rope, dense, normal, param

QUERY_PROJ = "query_proj"
KEY_PROJ = "key_proj"
VALUE_PROJ = "value_proj"
QKV_PROJ_NAMES = (QUERY_PROJ, KEY_PROJ, VALUE_PROJ)
"""``checkpoint_name`` tags on the q/k/v projections (saved by remat='save_qkv_proj')."""

registry.REMAT_POLICIES.register("save_qkv_proj",
                                 jax.checkpoint_policies.save_only_these_names(*QKV_PROJ_NAMES))


@dataclasses.dataclass(frozen=True)
class AttentionConfig(Section):
  type: str = "attention"
  impl: str = "xla"
  """Implementation of jax.nn.dot_product_attention: 'xla' or 'cudnn' (the fused flash
  kernel: GPU only, model.dtype=bfloat16)."""

  COMPUTE_ONLY = ("impl",)

  def __post_init__(self):
    check_choice("model.mixer", "impl", self.impl, ("xla", "cudnn"))

  def check(self, cfg: Any) -> None:
    if self.impl == "cudnn" and cfg.model.dtype != "bfloat16":
      raise ConfigError(f"model.mixer.impl: 'cudnn' is the fused kernel of attention in "
                        f"bfloat16, got model.dtype={cfg.model.dtype!r}")

  def check_platform(self, platform: str) -> None:
    if self.impl == "cudnn" and platform != "gpu":
      raise ConfigError(f"model.mixer.impl: 'cudnn' needs GPU devices, these are "
                        f"{platform}; set model.mixer.impl=xla")


class KVCache(NamedTuple):
  """Decode state of one attention layer (a pytree; stacked over layers in lm.py)."""
  k_BxLxGxK: jax.Array
  """Rotated keys of the filled slots (compute dtype)."""
  v_BxLxGxK: jax.Array
  """Values of the filled slots (compute dtype)."""
  positions_BxL: jax.Array
  """int32 position of the token in each slot; -1 marks an empty slot."""
  end: jax.Array
  """int32 scalar: number of filled slots (the next write index)."""


# ----------------------------------------------------------------------------- pure math


def attention_reference(q_BxTxHxK: np.ndarray, k_BxSxGxK: np.ndarray, v_BxSxGxK: np.ndarray,
                        mask_BxTxS: np.ndarray) -> np.ndarray:
  """Float64 numpy GQA attention with an explicit boolean mask (True = attend)."""
  q = np.asarray(q_BxTxHxK, np.float64)
  k = np.asarray(k_BxSxGxK, np.float64)
  v = np.asarray(v_BxSxGxK, np.float64)
  n_heads, n_kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
  group = n_heads // n_kv_heads
  k_BxSxHxK = np.repeat(k, group, axis=2)  # query head h reads kv head h // group
  v_BxSxHxK = np.repeat(v, group, axis=2)
  scores_BxHxTxS = np.einsum("bthk,bshk->bhts", q, k_BxSxHxK) / np.sqrt(head_dim)
  scores_BxHxTxS = np.where(np.asarray(mask_BxTxS)[:, None], scores_BxHxTxS, -np.inf)
  scores_BxHxTxS -= scores_BxHxTxS.max(axis=-1, keepdims=True)
  probs_BxHxTxS = np.exp(scores_BxHxTxS)
  probs_BxHxTxS /= probs_BxHxTxS.sum(axis=-1, keepdims=True)
  return np.einsum("bhts,bshk->bthk", probs_BxHxTxS, v_BxSxHxK)


def segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, 1, T, T] boolean: query and key belong to the same packed segment."""
  same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return same_BxTxT[:, None, :, :]


def causal_attention(q_BxTxHxK: jax.Array, k_BxTxGxK: jax.Array, v_BxTxGxK: jax.Array, *,
                     segment_ids_BxT: jax.Array | None = None,
                     implementation: str = "xla") -> jax.Array:
  """Causal GQA attention over one full sequence; output [B, T, H, K] in q's dtype."""
  mask = None if segment_ids_BxT is None else segment_mask(segment_ids_BxT)
  return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask=mask,
                                      is_causal=True, implementation=implementation)


def init_kv_cache(batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                  dtype: jnp.dtype) -> KVCache:
  """An empty cache with room for ``max_len`` tokens."""
  return KVCache(
      k_BxLxGxK=jnp.zeros((batch_size, max_len, n_kv_heads, head_dim), dtype),
      v_BxLxGxK=jnp.zeros((batch_size, max_len, n_kv_heads, head_dim), dtype),
      positions_BxL=jnp.full((batch_size, max_len), -1, jnp.int32),
      end=jnp.zeros((), jnp.int32),
  )


def update_kv_cache(cache: KVCache, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                    positions_BxS: jax.Array) -> KVCache:
  """Writes S new keys/values at slots end..end+S-1.

  The caller sizes ``max_len`` for every token it will decode; like
  ``lax.dynamic_update_slice`` a write past the end is clamped, not an error.
  """
  def write(buffer, update):
    return jax.lax.dynamic_update_slice_in_dim(buffer, update.astype(buffer.dtype),
                                               cache.end, axis=1)
  return KVCache(
      k_BxLxGxK=write(cache.k_BxLxGxK, k_BxSxGxK),
      v_BxLxGxK=write(cache.v_BxLxGxK, v_BxSxGxK),
      positions_BxL=write(cache.positions_BxL, positions_BxS.astype(jnp.int32)),
      end=cache.end + k_BxSxGxK.shape[1],
  )


def cached_attention(q_BxSxHxK: jax.Array, positions_BxS: jax.Array,
                     cache: KVCache) -> jax.Array:
  """Attention of S queries over the (already updated) cache, masked by positions."""
  key_positions_Bx1xL = cache.positions_BxL[:, None, :]
  query_positions_BxSx1 = positions_BxS.astype(jnp.int32)[:, :, None]
  mask_BxSxL = (key_positions_Bx1xL >= 0) & (key_positions_Bx1xL <= query_positions_BxSx1)
  dtype = q_BxSxHxK.dtype
  return jax.nn.dot_product_attention(
      q_BxSxHxK, cache.k_BxLxGxK.astype(dtype), cache.v_BxLxGxK.astype(dtype),
      mask=mask_BxSxL[:, None, :, :], implementation="xla")


# ----------------------------------------------------------------------------- module


@registry.MIXERS.register("attention")
class Attention(nnx.Module):
  """Causal GQA attention mixer: holds W_q, W_k, W_v, W_o and calls the functions above.

  Implements the mixer interface of lm.py: ``__call__`` (training / full sequence),
  ``init_cache`` and ``decode`` (KV cache), ``flops_per_token`` (analytic FLOPs).
  Inits: N(0, init_std^2); W_o additionally scaled by 1/sqrt(2 * n_layers).
  ``implementation`` overrides ``model.mixer.impl`` (a subclass with its own config).
  """

  Config = AttentionConfig
  RAGGED_DECODE = True
  """Decodes left-padded prompts: a key at a negative position (a pad) is an empty slot."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, implementation: str | None = None):
    d_model, n_heads, n_kv_heads, head_dim = (cfg.d_model, cfg.n_heads, cfg.kv_heads,
                                              cfg.dim_per_head)
    dtype = jnp.dtype(cfg.param_dtype)
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.n_heads = n_heads
    self.n_kv_heads = n_kv_heads
    self.head_dim = head_dim
    self.rope_theta = cfg.rope_theta
    self.implementation = implementation or cfg.mixer.impl
    self.wq = param(normal(rngs.params(), (d_model, n_heads * head_dim), cfg.init_std, dtype),
                    ("embed", "heads"))
    self.wk = param(normal(rngs.params(), (d_model, n_kv_heads * head_dim), cfg.init_std,
                           dtype), ("embed", "kv_heads"))
    self.wv = param(normal(rngs.params(), (d_model, n_kv_heads * head_dim), cfg.init_std,
                           dtype), ("embed", "kv_heads"))
    self.wo = param(normal(rngs.params(), (n_heads * head_dim, d_model), out_std, dtype),
                    ("heads", "embed"))

  def project_qkv(self, x_BxTxD: jax.Array, positions_BxT: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotated queries [B,T,H,K], rotated keys and values [B,T,G,K] in x's dtype."""
    batch, length, _ = x_BxTxD.shape
    dtype = x_BxTxD.dtype
    q_BxTxN = checkpoint_name(
        dense(x_BxTxD, self.wq[...].astype(dtype)), QUERY_PROJ)
    k_BxTxM = checkpoint_name(
        dense(x_BxTxD, self.wk[...].astype(dtype)), KEY_PROJ)
    v_BxTxM = checkpoint_name(
        dense(x_BxTxD, self.wv[...].astype(dtype)), VALUE_PROJ)
    q_BxTxHxK = q_BxTxN.reshape(batch, length, self.n_heads, self.head_dim)
    k_BxTxGxK = k_BxTxM.reshape(batch, length, self.n_kv_heads, self.head_dim)
    v_BxTxGxK = v_BxTxM.reshape(batch, length, self.n_kv_heads, self.head_dim)
    q_BxTxHxK = apply_rope(q_BxTxHxK, positions_BxT, self.rope_theta)
    k_BxTxGxK = apply_rope(k_BxTxGxK, positions_BxT, self.rope_theta)
    return q_BxTxHxK, k_BxTxGxK, v_BxTxGxK

  def output_projection(self, o_BxTxHxK: jax.Array) -> jax.Array:
    batch, length = o_BxTxHxK.shape[:2]
    o_BxTxN = o_BxTxHxK.reshape(batch, length, self.n_heads * self.head_dim)
    return dense(o_BxTxN, self.wo[...].astype(o_BxTxN.dtype))

  @staticmethod
  def pre_sublayers(cfg: ModelConfig) -> tuple:
    del cfg
    return ()

  def __call__(self, x_BxTxD: jax.Array, ctx: SequenceContext) -> jax.Array:
    q_BxTxHxK, k_BxTxGxK, v_BxTxGxK = self.project_qkv(x_BxTxD, ctx.positions_BxT)
    o_BxTxHxK = causal_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK,
                                 segment_ids_BxT=ctx.segment_ids_BxT,
                                 implementation=self.implementation)
    return self.output_projection(o_BxTxHxK)

  def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype,
                 options: dict[str, Any] | None = None) -> KVCache:
    del options
    return init_kv_cache(batch_size, max_len, self.n_kv_heads, self.head_dim, dtype)

  def decode(self, x_BxSxD: jax.Array, ctx: SequenceContext, cache: KVCache
             ) -> tuple[jax.Array, KVCache]:
    positions_BxS = ctx.positions_BxT
    q_BxSxHxK, k_BxSxGxK, v_BxSxGxK = self.project_qkv(x_BxSxD, positions_BxS)
    cache = update_kv_cache(cache, k_BxSxGxK, v_BxSxGxK, positions_BxS)
    o_BxSxHxK = cached_attention(q_BxSxHxK, positions_BxS, cache)
    return self.output_projection(o_BxSxHxK), cache

  @staticmethod
  def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per token: projections 2*(D*H*K + 2*D*G*K + H*K*D), plus
    q k^T and p v under the causal mask, each 2*H*K per attended key with T/2 keys
    attended on average: 2 * 2 * H * K * T / 2."""
    d_model, n_heads, n_kv_heads, head_dim = (cfg.d_model, cfg.n_heads, cfg.kv_heads,
                                              cfg.dim_per_head)
    projections = 2 * (d_model * n_heads * head_dim + 2 * d_model * n_kv_heads * head_dim
                       + n_heads * head_dim * d_model)
    scores_and_values = 2 * 2 * n_heads * head_dim * seq_len / 2
    return float(projections + scores_and_values)
