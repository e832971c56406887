"""Decoder-only language model with a pluggable token mixer and residual scheme.

With E the token embedding, N blocks and a final RMSNorm:

    x_0     = E[tokens]                                 [B, T, D]
    s_0     = Streams.expand(x_0)                       residual stream(s)
    s_{l+1} = block_l(s_l)
    logits  = rms_norm(Streams.reduce(s_N)) W_head      float32 [B, T, V]
              (W_head = E^T when embeddings are tied)

    block(s) = residual_mlp(residual_mix(s, mixer), swiglu)

The 'plain' residual is pre-norm: residual(s, f) = s + f(rms_norm(s)), with expand and
reduce the identity. A residual keeping n parallel streams [B, T, n, D] (mHC) expands
once after the embedding and reduces once before the final norm. Expand and reduce
belong to a model-level ``Streams`` module (``Residual.streams``, held as ``LM.streams``)
so they may carry parameters (mHC's per-stream embedding).

Mixer and residual are chosen by name in one place, ``MIXERS`` and ``RESIDUALS``; a new
mechanism adds a class with the interface of ``Mixer`` / ``Residual`` below plus one
registry entry (and its name in ``ttt_jax.config.MIXERS`` / ``RESIDUALS``).

Layers are stacked: ``nnx.vmap`` over the block constructor (with
``transform_metadata={nnx.PARTITION_NAME: 'layers'}``) gives every block parameter a
leading 'layers' axis and logical name. The forward splits the stacked blocks into
(graphdef, state) and runs ``jax.lax.scan`` over the state with a pure per-layer body
that merges one layer's slice back into a ``Block``; ``scan_layers=False`` runs the
same body in an unrolled Python loop. Each body is wrapped in ``jax.checkpoint`` with
the configured remat policy.

FLOP convention (``forward_flops_per_token``): matmul FLOPs only, 2 per multiply-add:
2 * (every matmul parameter, the head included even when tied; embedding lookups and
norms excluded) plus, per attention layer, q k^T and p v over T/2 keys on average under
the causal mask: 2 * 2 * H * Dh * T / 2. Training FLOPs are 3x forward.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import spmd

from ttt_jax.config import ModelConfig
from ttt_jax.models.attention import QKV_PROJ_NAMES, Attention
from ttt_jax.models.cct import CCTAttention
from ttt_jax.models.layers import Embedding, RMSNorm, SwiGLU, logits_from_head, normal, param
from ttt_jax.models.mhc import MHC_COEFFS, MHCResidual
from ttt_jax.models.ttt_linear import PreConv, TTTLinear

Cache = Any
"""Decode state of the whole model: the mixers' per-layer caches stacked on a leading
'layers' axis (for attention a ``KVCache`` whose arrays are [n_layers, ...])."""


# ----------------------------------------------------------------------------- interfaces


class Mixer(Protocol):
  """A token mixer (one layer). Parameters are per layer; lm.py stacks them."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs): ...

  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
               segment_ids_BxT: jax.Array | None = None) -> jax.Array:
    """Causal mixing of a whole (normed) sequence: y [B, T, D] in x's dtype. A mixer
    whose class sets ``uses_step_ids = True`` (CCT) also takes ``step_ids_BxT``, the
    per-token step ids; the model passes them to no other mixer."""

  def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype) -> Any:
    """Decode state before any token (a pytree; may depend on this layer's params). A
    mixer with ``uses_step_ids`` also takes ``max_steps`` (the most steps to hold)."""

  def decode(self, x_BxSxD: jax.Array, positions_BxS: jax.Array, cache: Any
             ) -> tuple[jax.Array, Any]:
    """Mixes S new tokens given the state of all earlier ones; returns (y, new cache).
    A mixer with ``uses_step_ids`` also takes the new tokens' ``step_ids_BxS``."""

  @staticmethod
  def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per token of one layer of this mixer."""


class Streams(Protocol):
  """Entry to and exit from the residual stream; one instance per model (may hold
  parameters, which carry no 'layers' axis)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs): ...

  def expand(self, x_BxTxD: jax.Array) -> jax.Array:
    """Embedding output -> initial stream (once, after the embedding)."""

  def reduce(self, stream: jax.Array) -> jax.Array:
    """Final stream -> [B, T, D] (once, before the final norm)."""


class Residual(Protocol):
  """How a sublayer f is added to the residual stream; one instance per sublayer."""

  streams: type
  """The ``Streams`` class that makes and ends this residual's stream."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs): ...

  def __call__(self, stream: jax.Array, sublayer: Callable[[jax.Array], jax.Array]
               ) -> jax.Array:
    """New stream. ``sublayer`` maps [B, T, D] -> [B, T, D]; call it exactly once."""

  @staticmethod
  def flops_per_token(cfg: ModelConfig) -> float:
    """Forward matmul FLOPs per token of one residual connection (beyond the sublayer)."""


class PlainStreams(nnx.Module):
  """One stream [B, T, D]: expand and reduce are the identity (no parameters)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    del cfg, rngs

  def expand(self, x_BxTxD: jax.Array) -> jax.Array:
    return x_BxTxD

  def reduce(self, stream_BxTxD: jax.Array) -> jax.Array:
    return stream_BxTxD


class PlainResidual(nnx.Module):
  """Pre-norm residual: s + f(rms_norm(s)); one stream [B, T, D]."""

  streams = PlainStreams

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    del rngs  # no random parameters
    self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, jnp.dtype(cfg.param_dtype))

  def __call__(self, stream_BxTxD: jax.Array, sublayer: Callable[[jax.Array], jax.Array]
               ) -> jax.Array:
    return stream_BxTxD + sublayer(self.norm(stream_BxTxD))

  @staticmethod
  def flops_per_token(cfg: ModelConfig) -> float:
    return 0.0


MIXERS: dict[str, type] = {"attention": Attention, "ttt_linear": TTTLinear, "cct": CCTAttention}
"""Config name -> mixer class (``Mixer`` interface)."""
RESIDUALS: dict[str, type] = {"plain": PlainResidual, "mhc": MHCResidual}
"""Config name -> residual class (``Residual`` interface)."""

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(*QKV_PROJ_NAMES),
    "mhc_streams": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(MHC_COEFFS)),
}
"""remat name -> ``jax.checkpoint`` policy ('none' skips checkpointing, 'full' saves
nothing but the block inputs). 'mhc_streams' keeps the weight-matmul outputs (at most
max(D, d_ff, 2n + n^2) wide per token) and the mHC maps (2n + n^2), and recomputes
every n*D-wide stream tensor of the block in the backward pass."""


def remat(fn: Callable, policy_name: str, *, prevent_cse: bool = True) -> Callable:
  """``fn`` wrapped in ``jax.checkpoint`` with the named policy ('none': unchanged)."""
  if policy_name == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[policy_name], prevent_cse=prevent_cse)


# ----------------------------------------------------------------------------- blocks


class Block(nnx.Module):
  """One decoder block: residual(mixer) then residual(SwiGLU); with ``cfg.ttt_pre_conv``
  (TTT-Linear, mamba backbone) residual(causal conv) first. The decode cache is the
  mixer's, or (conv history, mixer cache) with the pre-conv."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.ttt_pre_conv:
      self.pre_conv_residual = RESIDUALS[cfg.residual](cfg, rngs=rngs)
      self.pre_conv = PreConv(cfg, rngs=rngs)
    else:
      self.pre_conv_residual = self.pre_conv = None
    self.mixer_residual = RESIDUALS[cfg.residual](cfg, rngs=rngs)
    self.mixer = MIXERS[cfg.mixer](cfg, rngs=rngs)
    self.mlp_residual = RESIDUALS[cfg.residual](cfg, rngs=rngs)
    self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, init_std=cfg.init_std, n_layers=cfg.n_layers,
                      param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)

  def __call__(self, stream: jax.Array, positions_BxT: jax.Array,
               segment_ids_BxT: jax.Array | None = None,
               step_ids_BxT: jax.Array | None = None) -> jax.Array:
    """``step_ids`` (None for mixers without ``uses_step_ids``) go to the mixer."""
    if self.pre_conv is not None:
      stream = self.pre_conv_residual(
          stream, lambda x_BxTxD: self.pre_conv(x_BxTxD, segment_ids_BxT))
    stream = self.mixer_residual(
        stream, lambda x_BxTxD: self.mixer(x_BxTxD, positions_BxT, segment_ids_BxT)
        if step_ids_BxT is None else
        self.mixer(x_BxTxD, positions_BxT, segment_ids_BxT, step_ids_BxT))
    return self.mlp_residual(stream, self.mlp)

  def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype,
                 max_steps: int | None = None) -> Any:
    mixer_cache = (self.mixer.init_cache(batch_size, max_len, dtype, max_steps)
                   if getattr(self.mixer, "uses_step_ids", False) else
                   self.mixer.init_cache(batch_size, max_len, dtype))
    if self.pre_conv is None:
      return mixer_cache
    return (self.pre_conv.init_cache(batch_size, dtype), mixer_cache)

  def decode(self, stream: jax.Array, positions_BxS: jax.Array, cache: Any,
             step_ids_BxS: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """``step_ids`` (None: the mixer's default) go to a mixer with ``uses_step_ids``."""
    conv_histories = []
    if self.pre_conv is not None:
      conv_history, cache = cache

      def conv_step(x_BxSxD: jax.Array) -> jax.Array:
        y_BxSxD, new_history = self.pre_conv.decode(x_BxSxD, conv_history)
        conv_histories.append(new_history)
        return y_BxSxD

      stream = self.pre_conv_residual(stream, conv_step)
    new_caches = []

    def mixer_step(x_BxSxD: jax.Array) -> jax.Array:
      y_BxSxD, new_cache = (self.mixer.decode(x_BxSxD, positions_BxS, cache)
                            if step_ids_BxS is None else
                            self.mixer.decode(x_BxSxD, positions_BxS, cache, step_ids_BxS))
      new_caches.append(new_cache)
      return y_BxSxD

    stream = self.mixer_residual(stream, mixer_step)
    if len(new_caches) != 1:
      raise RuntimeError(f"residual called its sublayer {len(new_caches)} times, expected 1")
    new_cache = new_caches[0] if self.pre_conv is None else (conv_histories[0], new_caches[0])
    return self.mlp_residual(stream, self.mlp), new_cache


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """``n_layers`` blocks whose parameters carry a leading 'layers' axis."""

  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make_block(layer_rngs: nnx.Rngs) -> Block:
    return Block(cfg, rngs=layer_rngs)

  return make_block(rngs.split(cfg.n_layers))


def _layer_view(layer_state: nnx.State) -> nnx.State:
  """One layer's slice of the stacked state, with 'layers' dropped from its names."""
  return spmd.remove_axis(layer_state, 0, {nnx.PARTITION_NAME: "layers"})


def _layer_slice(stacked_state: Any, index: int) -> Any:
  return jax.tree.map(lambda leaf: leaf[index], stacked_state)


def default_positions(tokens_BxT: jax.Array, offset: int | jax.Array = 0) -> jax.Array:
  batch, length = tokens_BxT.shape
  positions_T = jnp.arange(length, dtype=jnp.int32) + offset
  return jnp.broadcast_to(positions_T[None, :], (batch, length))


# ----------------------------------------------------------------------------- model


class LM(nnx.Module):
  """Decoder LM. Params: embedding [V, D]; blocks stacked on 'layers'; final norm;
  head [D, V] unless ``tie_embeddings`` (then ``head`` is None and E^T is used)."""

  def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
    if cfg.mixer not in MIXERS or cfg.residual not in RESIDUALS:
      raise ValueError(f"unregistered mixer {cfg.mixer!r} or residual {cfg.residual!r}")
    param_dtype = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.vocab_size = vocab_size
    self.embed = Embedding(vocab_size, cfg.d_model, init_std=cfg.init_std,
                           param_dtype=param_dtype, rngs=rngs)
    self.blocks = stacked_blocks(cfg, rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
    if cfg.tie_embeddings:
      self.head = None
    else:
      self.head = param(normal(rngs.params(), (cfg.d_model, vocab_size), cfg.init_std,
                               param_dtype), ("embed", "vocab"))
    self.streams = self.residual.streams(cfg, rngs=rngs)

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.cfg.dtype)

  @property
  def residual(self) -> type:
    return RESIDUALS[self.cfg.residual]

  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
               segment_ids_BxT: jax.Array | None = None,
               step_ids_BxT: jax.Array | None = None) -> jax.Array:
    """Float32 logits [B, T, V]. Positions default to 0..T-1; ``segment_ids`` (packed
    documents) restricts attention to the same segment; ``step_ids`` (per-token step
    ids) reach a mixer with ``uses_step_ids`` and are ignored by the others."""
    return self.logits(self.features(tokens_BxT, positions_BxT, segment_ids_BxT,
                                     step_ids_BxT))

  def features(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
               segment_ids_BxT: jax.Array | None = None,
               step_ids_BxT: jax.Array | None = None) -> jax.Array:
    """Final-normed hidden states [B, T, D] in the compute dtype."""
    if not getattr(MIXERS[self.cfg.mixer], "uses_step_ids", False):
      step_ids_BxT = None
    if positions_BxT is None:
      positions_BxT = default_positions(tokens_BxT)
    stream = self.streams.expand(self.embed(tokens_BxT, self.dtype))
    stream = self._run_blocks(stream, positions_BxT, segment_ids_BxT, step_ids_BxT)
    return self.final_norm(self.streams.reduce(stream))

  def logits(self, x_BxTxD: jax.Array) -> jax.Array:
    if self.head is None:
      return self.embed.attend(x_BxTxD)
    return logits_from_head(x_BxTxD, self.head[...])

  def _run_blocks(self, stream: jax.Array, positions_BxT: jax.Array,
                  segment_ids_BxT: jax.Array | None,
                  step_ids_BxT: jax.Array | None = None) -> jax.Array:
    graphdef, stacked_state = nnx.split(self.blocks)

    def apply_block(stream: jax.Array, layer_state: nnx.State) -> jax.Array:
      block = nnx.merge(graphdef, _layer_view(layer_state))
      return block(stream, positions_BxT, segment_ids_BxT, step_ids_BxT)

    apply_block = remat(apply_block, self.cfg.remat, prevent_cse=not self.cfg.scan_layers)
    if self.cfg.scan_layers:
      stream, _ = jax.lax.scan(lambda carry, layer_state: (apply_block(carry, layer_state), None),
                               stream, stacked_state)
      return stream
    for index in range(self.cfg.n_layers):
      stream = apply_block(stream, _layer_slice(stacked_state, index))
    return stream

  def init_cache(self, batch_size: int, max_len: int, max_steps: int | None = None) -> Cache:
    """Every layer's empty decode state, stacked on a leading layers axis. ``max_steps``
    (mixers with ``uses_step_ids``): the most steps a decoded sequence may have; None:
    the mixer's default (CCT: fixed steps of cct_step_len)."""
    graphdef, stacked_state = nnx.split(self.blocks)

    def layer_cache(layer_state: nnx.State) -> Any:
      block = nnx.merge(graphdef, _layer_view(layer_state))
      return block.init_cache(batch_size, max_len, self.dtype, max_steps)

    return jax.vmap(layer_cache)(stacked_state)

  def decode(self, tokens_BxS: jax.Array, positions_BxS: jax.Array, cache: Cache,
             step_ids_BxS: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    """Float32 logits [B, S, V] of S new tokens (a prompt at prefill, 1 per step) and
    the updated cache. ``step_ids`` (the tokens' absolute step ids) reach a mixer with
    ``uses_step_ids`` and are ignored by the others."""
    if not getattr(MIXERS[self.cfg.mixer], "uses_step_ids", False):
      step_ids_BxS = None
    graphdef, stacked_state = nnx.split(self.blocks)

    def decode_block(stream: jax.Array, layer: tuple[nnx.State, Any]) -> tuple[jax.Array, Any]:
      layer_state, layer_cache = layer
      block = nnx.merge(graphdef, _layer_view(layer_state))
      return block.decode(stream, positions_BxS, layer_cache, step_ids_BxS)

    stream = self.streams.expand(self.embed(tokens_BxS, self.dtype))
    if self.cfg.scan_layers:
      stream, cache = jax.lax.scan(decode_block, stream, (stacked_state, cache))
    else:
      new_caches = []
      for index in range(self.cfg.n_layers):
        stream, new_cache = decode_block(
            stream, (_layer_slice(stacked_state, index), _layer_slice(cache, index)))
        new_caches.append(new_cache)
      cache = jax.tree.map(lambda *layers: jnp.stack(layers), *new_caches)
    x_BxSxD = self.final_norm(self.streams.reduce(stream))
    return self.logits(x_BxSxD), cache


# ----------------------------------------------------------------------------- loss, counts


def cross_entropy_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                       mask_BxT: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mean NLL, summed NLL, number of counted tokens), float32, via logsumexp.

  ``mask`` (1 = count) defaults to all tokens; the mean of an all-masked batch is 0.
  """
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  log_normalizer_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  nll_BxT = log_normalizer_BxT - target_logit_BxT
  weights_BxT = (jnp.ones_like(nll_BxT) if mask_BxT is None
                 else mask_BxT.astype(jnp.float32))
  sum_nll = jnp.sum(nll_BxT * weights_BxT)
  n_tokens = jnp.sum(weights_BxT)
  return sum_nll / jnp.maximum(n_tokens, 1.0), sum_nll, n_tokens


def forward_flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
  """Analytic forward matmul FLOPs per token (see the module docstring's convention)."""
  mixer = MIXERS[cfg.mixer].flops_per_token(cfg, seq_len)
  residuals = (3 if cfg.ttt_pre_conv else 2) * RESIDUALS[cfg.residual].flops_per_token(cfg)
  mlp = 2 * 3 * cfg.d_model * cfg.d_ff
  head = 2 * cfg.d_model * vocab_size
  return float(cfg.n_layers * (mixer + mlp + residuals) + head)


def count_params(state: Any) -> int:
  """Number of scalars in every array leaf of ``state`` (an ``nnx.State``, a pytree of
  arrays or ``ShapeDtypeStruct``s); a Module counts its ``nnx.Param``s."""
  if isinstance(state, nnx.Module):
    state = nnx.state(state, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))
