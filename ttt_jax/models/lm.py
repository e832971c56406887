"""Decoder-only language model built from named slots, each filled from a registry.

With N blocks, a context ``ctx`` (``models/context.py``) and a final RMSNorm:

    x_0     = embedding(tokens, ctx)                    [B, T, D]
    s_0     = Streams.expand(x_0)                       residual stream(s)
    s_N     = trunk(blocks, s_0, ctx)                   every block once (scan or loop)
    logits  = head(rms_norm(Streams.reduce(s_N)))       float32 [B, T, V]

    block(s) = residual(s, ffn) after residual(s, mixer) after residual(s, p) for each of
               the mixer's pre-sublayers p (TTT-Linear's causal conv)

The slots are sections of ``model`` in the config, each a name in its registry
(``ttt_jax.registry``): ``embedding`` (EMBEDDINGS), ``mixer`` (MIXERS), ``residual``
(RESIDUALS), ``ffn`` (FFNS), ``trunk`` (TRUNKS) and ``head`` (HEADS). The interfaces
below are what each must provide; this module imports none of them.

The 'plain' residual is pre-norm: residual(s, f) = s + f(rms_norm(s)), with expand and
reduce the identity. A residual keeping n parallel streams [B, T, n, D] (mHC) expands
once after the embedding and reduces once before the final norm, through its model-level
``Streams`` module (``Residual.streams``, held as ``LM.streams``) which may carry
parameters.

Layers are stacked: ``nnx.vmap`` over the block constructor (with
``transform_metadata={nnx.PARTITION_NAME: 'layers'}``) gives every block parameter a
leading 'layers' axis and logical name. A trunk splits the stacked blocks into
(graphdef, state) and runs a pure per-layer body, ``apply_layer``, that merges one
layer's slice back into a ``Block``.

Auxiliary channel: a sublayer may record per-layer values with
``self.sow(nnx.Intermediate, name, value)`` (an extra loss, a statistic, CCT's step
summaries). ``apply_layer`` captures them (``nnx.capture``) while it runs the layer's
block and returns them keyed '<sublayer>.<name>'; the trunk stacks them on a leading
layers axis and ``LM.forward`` returns them beside the logits, for the objective. The
model is never mutated (a forward may run under a jit that closes over it), and a model
whose sublayers record nothing has no aux and the same program.

FLOP convention (``forward_flops_per_token``): matmul FLOPs only, 2 per multiply-add:
2 * (every matmul parameter, the head included even when tied; embedding lookups,
norms and depthwise convolutions excluded) plus, per attention layer, q k^T and p v
over T/2 keys on average under the causal mask: 2 * 2 * H * Dh * T / 2. Training
FLOPs are 3x forward.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import spmd

from ttt_jax import registry
from ttt_jax.config import ModelConfig
from ttt_jax.models.context import SequenceContext
from ttt_jax.models.layers import RMSNorm

Cache = Any
"""Decode state of the whole model: the blocks' per-layer caches stacked on a leading
'layers' axis (for attention a ``KVCache`` whose arrays are [n_layers, ...])."""

Aux = dict[str, Any]
"""What a forward's sublayers recorded: '<sublayer>.<name>' -> value stacked on a
leading layers axis."""



# ----------------------------------------------------------------------------- interfaces


class Sublayer(Protocol):
  """A sublayer of a block, [B, T, D] -> [B, T, D] (one layer; lm.py stacks them): the
  mixer, or one of the pre-sublayers it declares."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs): ...

  def __call__(self, x_BxTxD: jax.Array, ctx: SequenceContext) -> jax.Array:
    """Causal map of a whole (normed) sequence: y [B, T, D] in x's dtype."""

  def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype,
                 options: dict[str, Any]) -> Any:
    """Decode state before any token (a pytree; may depend on this layer's params).
    ``options``: what the decode inputs ask of it (``inference.sampling``)."""

  def decode(self, x_BxSxD: jax.Array, ctx: SequenceContext, cache: Any
             ) -> tuple[jax.Array, Any]:
    """Maps S new tokens given the state of all earlier ones; returns (y, new cache)."""

  @staticmethod
  def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per token of one layer of this sublayer."""


class Mixer(Sublayer, Protocol):
  """A token mixer; ``Config`` is its ``model.mixer`` section."""

  @staticmethod
  def pre_sublayers(cfg: ModelConfig) -> tuple[tuple[str, type], ...]:
    """(attribute name, ``Sublayer`` class) of every sublayer a block runs before this
    mixer, in order, each inside its own residual."""


class FFN(Protocol):
  """A block's feed-forward sublayer; ``Config`` is its ``model.ffn`` section."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs): ...

  def __call__(self, x_BxTxD: jax.Array, ctx: SequenceContext) -> jax.Array: ...

  @staticmethod
  def flops_per_token(cfg: ModelConfig, seq_len: int) -> float: ...


class Streams(Protocol):
  """Entry to and exit from the residual stream; one instance per model (may hold
  parameters, which carry no 'layers' axis)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs): ...

  def expand(self, x_BxTxD: jax.Array) -> jax.Array:
    """Embedding output -> initial stream (once, after the embedding)."""

  def reduce(self, stream: jax.Array) -> jax.Array:
    """Final stream -> [B, T, D] (once, before the final norm)."""


class Residual(Protocol):
  """How a sublayer f is added to the residual stream; one instance per sublayer;
  ``Config`` is its ``model.residual`` section."""

  streams: type
  """The ``Streams`` class that makes and ends this residual's stream."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs): ...

  def __call__(self, stream: jax.Array, sublayer: Callable[[jax.Array], jax.Array]
               ) -> jax.Array:
    """New stream. ``sublayer`` maps [B, T, D] -> [B, T, D]; call it exactly once."""

  @staticmethod
  def flops_per_token(cfg: ModelConfig) -> float:
    """Forward matmul FLOPs per token of one residual connection (beyond the sublayer)."""


class Embedding(Protocol):
  """Tokens (and side inputs) -> the first hidden states; ``Config`` is its
  ``model.embedding`` section. A tied head also calls ``attend``."""

  def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs): ...

  def __call__(self, tokens_BxT: jax.Array, ctx: SequenceContext, dtype: jnp.dtype
               ) -> jax.Array: ...

  def attend(self, x_BxTxD: jax.Array) -> jax.Array:
    """Logits [B, T, V] in float32 against the embedding table (tied head)."""


class Trunk(Protocol):
  """Runs the stacked blocks; ``Config`` is its ``model.trunk`` section."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs): ...

  def __call__(self, blocks: Block, stream: jax.Array, ctx: SequenceContext
               ) -> tuple[jax.Array, Aux]:
    """(final stream, the blocks' aux stacked on layers)."""

  def decode(self, blocks: Block, stream: jax.Array, ctx: SequenceContext, cache: Cache
             ) -> tuple[jax.Array, Cache]: ...


class Head(Protocol):
  """Final hidden states -> float32 logits; ``Config`` is its ``model.head`` section."""

  def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs): ...

  def __call__(self, x_BxTxD: jax.Array, embedding: Embedding) -> jax.Array: ...

  @staticmethod
  def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float: ...


# ----------------------------------------------------------------------------- blocks


class Block(nnx.Module):
  """One decoder block: residual(p) for each of the mixer's pre-sublayers p, then
  residual(mixer), then residual(ffn). The decode cache is the mixer's, or the tuple
  (pre-sublayer caches..., mixer cache) when the mixer declares pre-sublayers."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    residual = registry.RESIDUALS.get(cfg.residual.type)
    mixer = registry.MIXERS.get(cfg.mixer.type)
    pre_sublayers = mixer.pre_sublayers(cfg)
    self.pre_sublayers = tuple(name for name, _ in pre_sublayers)
    for name, sublayer in pre_sublayers:
      setattr(self, f"{name}_residual", residual(cfg, rngs=rngs))
      setattr(self, name, sublayer(cfg, rngs=rngs))
    self.mixer_residual = residual(cfg, rngs=rngs)
    self.mixer = mixer(cfg, rngs=rngs)
    self.mlp_residual = residual(cfg, rngs=rngs)
    self.mlp = registry.FFNS.get(cfg.ffn.type)(cfg, rngs=rngs)

  def _sequence_sublayers(self) -> list[str]:
    """Names of the sublayers that carry a decode cache, in block order."""
    return [*self.pre_sublayers, "mixer"]

  def __call__(self, stream: jax.Array, ctx: SequenceContext) -> jax.Array:
    for name in self._sequence_sublayers():
      sublayer = getattr(self, name)
      stream = getattr(self, f"{name}_residual")(stream, lambda x, f=sublayer: f(x, ctx))
    return self.mlp_residual(stream, lambda x_BxTxD: self.mlp(x_BxTxD, ctx))

  def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype,
                 options: dict[str, Any]) -> Any:
    caches = [getattr(self, name).init_cache(batch_size, max_len, dtype, options)
              for name in self._sequence_sublayers()]
    return tuple(caches) if self.pre_sublayers else caches[0]

  def decode(self, stream: jax.Array, ctx: SequenceContext, cache: Any
             ) -> tuple[jax.Array, Any]:
    names = self._sequence_sublayers()
    caches = cache if self.pre_sublayers else (cache,)
    new_caches = []
    for name, layer_cache in zip(names, caches):
      sublayer, produced = getattr(self, name), []

      def step(x_BxSxD: jax.Array, sublayer=sublayer, layer_cache=layer_cache,
               produced=produced) -> jax.Array:
        y_BxSxD, new_cache = sublayer.decode(x_BxSxD, ctx, layer_cache)
        produced.append(new_cache)
        return y_BxSxD

      stream = getattr(self, f"{name}_residual")(stream, step)
      if len(produced) != 1:
        raise RuntimeError(f"residual called its sublayer {len(produced)} times, expected 1")
      new_caches.append(produced[0])
    new_cache = tuple(new_caches) if self.pre_sublayers else new_caches[0]
    return self.mlp_residual(stream, lambda x_BxSxD: self.mlp(x_BxSxD, ctx)), new_cache


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """``n_layers`` blocks whose parameters carry a leading 'layers' axis."""

  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make_block(layer_rngs: nnx.Rngs) -> Block:
    return Block(cfg, rngs=layer_rngs)

  return make_block(rngs.split(cfg.n_layers))


def layer_view(layer_state: nnx.State) -> nnx.State:
  """One layer's slice of the stacked state, with 'layers' dropped from its names."""
  return spmd.remove_axis(layer_state, 0, {nnx.PARTITION_NAME: "layers"})


def layer_slice(stacked: Any, index: int) -> Any:
  """Layer ``index`` of a pytree stacked on a leading layers axis."""
  return jax.tree.map(lambda leaf: leaf[index], stacked)


def _aux(recorded: nnx.State) -> Aux:
  """Captured intermediates -> '<path>.<name>' -> value (a value recorded once is given
  bare, not in a tuple)."""
  aux = {}
  for path, variable in nnx.to_flat_state(recorded):
    value = variable.get_value() if hasattr(variable, "get_value") else variable.value
    aux[".".join(map(str, path))] = (value[0] if isinstance(value, tuple) and len(value) == 1
                                     else value)
  return aux


def _run_block(block: Block, stream: jax.Array, ctx: SequenceContext) -> jax.Array:
  return block(stream, ctx)


def apply_layer(graphdef: nnx.GraphDef, ctx: SequenceContext, stream: jax.Array,
                layer_state: nnx.State) -> tuple[jax.Array, Aux]:
  """One block on ``stream`` from its layer's slice of the stacked state: (new stream,
  what the block's sublayers recorded). Pure: the trunks scan or loop it."""
  block = nnx.merge(graphdef, layer_view(layer_state))
  stream, recorded = nnx.capture(_run_block, nnx.Intermediate)(block, stream, ctx)
  return stream, _aux(recorded)


def decode_layer(graphdef: nnx.GraphDef, ctx: SequenceContext, stream: jax.Array,
                 layer: tuple[nnx.State, Any]) -> tuple[jax.Array, Any]:
  """One block's decode from (its layer's state slice, its cache)."""
  layer_state, layer_cache = layer
  block = nnx.merge(graphdef, layer_view(layer_state))
  return block.decode(stream, ctx, layer_cache)


# ----------------------------------------------------------------------------- model


class LM(nnx.Module):
  """Decoder LM. Params: ``embed`` (the embedding slot), ``blocks`` stacked on
  'layers', ``final_norm``, ``head`` (the head slot), ``streams`` (the residual's
  entry and exit); ``trunk`` holds the trunk slot."""

  def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
    param_dtype = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.vocab_size = vocab_size
    self.embed = registry.EMBEDDINGS.get(cfg.embedding.type)(cfg, vocab_size, rngs=rngs)
    self.blocks = stacked_blocks(cfg, rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
    self.head = registry.HEADS.get(cfg.head.type)(cfg, vocab_size, rngs=rngs)
    self.streams = registry.RESIDUALS.get(cfg.residual.type).streams(cfg, rngs=rngs)
    self.trunk = registry.TRUNKS.get(cfg.trunk.type)(cfg, rngs=rngs)

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.cfg.dtype)

  def __call__(self, tokens_BxT: jax.Array, ctx: SequenceContext | None = None
               ) -> jax.Array:
    """Float32 logits [B, T, V]. ``ctx`` defaults to positions 0..T-1, one document
    and no side inputs."""
    return self.forward(tokens_BxT, ctx)[0]

  def forward(self, tokens_BxT: jax.Array, ctx: SequenceContext | None = None
              ) -> tuple[jax.Array, Aux]:
    """(float32 logits [B, T, V], what the sublayers recorded, stacked on layers)."""
    x_BxTxD, aux = self.features_and_aux(tokens_BxT, ctx)
    return self.logits(x_BxTxD), aux

  def features(self, tokens_BxT: jax.Array, ctx: SequenceContext | None = None
               ) -> jax.Array:
    """Final-normed hidden states [B, T, D] in the compute dtype."""
    return self.features_and_aux(tokens_BxT, ctx)[0]

  def features_and_aux(self, tokens_BxT: jax.Array, ctx: SequenceContext | None = None
                       ) -> tuple[jax.Array, Aux]:
    if ctx is None:
      ctx = SequenceContext.for_tokens(tokens_BxT)
    stream = self.streams.expand(self.embed(tokens_BxT, ctx, self.dtype))
    stream, aux = self.trunk(self.blocks, stream, ctx)
    return self.final_norm(self.streams.reduce(stream)), aux

  def logits(self, x_BxTxD: jax.Array) -> jax.Array:
    return self.head(x_BxTxD, self.embed)

  def init_cache(self, batch_size: int, max_len: int,
                 options: dict[str, Any] | None = None) -> Cache:
    """Every layer's empty decode state, stacked on a leading layers axis.
    ``options``: what the decode inputs ask of the caches (CCT: 'max_steps')."""
    graphdef, stacked_state = nnx.split(self.blocks)

    def layer_cache(layer_state: nnx.State) -> Any:
      block = nnx.merge(graphdef, layer_view(layer_state))
      return block.init_cache(batch_size, max_len, self.dtype, dict(options or {}))

    return jax.vmap(layer_cache)(stacked_state)

  def decode(self, tokens_BxS: jax.Array, ctx: SequenceContext, cache: Cache
             ) -> tuple[jax.Array, Cache]:
    """Float32 logits [B, S, V] of S new tokens (a prompt at prefill, 1 per step) at
    ``ctx.positions_BxT``, and the updated cache. A mixer whose class sets
    ``RAGGED_DECODE`` treats tokens at negative positions as pads (left-padded prompts,
    ``inference/rollout.py``): no later token sees them."""
    stream = self.streams.expand(self.embed(tokens_BxS, ctx, self.dtype))
    stream, cache = self.trunk.decode(self.blocks, stream, ctx, cache)
    return self.logits(self.final_norm(self.streams.reduce(stream))), cache


# ----------------------------------------------------------------------------- loss, counts


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """float32 [B, T] next-token NLL of each target, via logsumexp."""
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  log_normalizer_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return log_normalizer_BxT - target_logit_BxT


def cross_entropy_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                       mask_BxT: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mean NLL, summed NLL, number of counted tokens), float32, via logsumexp.

  ``mask`` (1 = count) defaults to all tokens; the mean of an all-masked batch is 0.
  """
  nll_BxT = token_nll(logits_BxTxV, targets_BxT)
  weights_BxT = (jnp.ones_like(nll_BxT) if mask_BxT is None
                 else mask_BxT.astype(jnp.float32))
  sum_nll = jnp.sum(nll_BxT * weights_BxT)
  n_tokens = jnp.sum(weights_BxT)
  return sum_nll / jnp.maximum(n_tokens, 1.0), sum_nll, n_tokens


def forward_flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
  """Analytic forward matmul FLOPs per token (see the module docstring's convention)."""
  mixer_class = registry.MIXERS.get(cfg.mixer.type)
  pre_sublayers = mixer_class.pre_sublayers(cfg)
  mixer = mixer_class.flops_per_token(cfg, seq_len) + sum(
      sublayer.flops_per_token(cfg, seq_len) for _, sublayer in pre_sublayers)
  residuals = ((2 + len(pre_sublayers))
               * registry.RESIDUALS.get(cfg.residual.type).flops_per_token(cfg))
  mlp = registry.FFNS.get(cfg.ffn.type).flops_per_token(cfg, seq_len)
  head = registry.HEADS.get(cfg.head.type).flops_per_token(cfg, vocab_size)
  return float(cfg.n_layers * (mixer + mlp + residuals) + head)


def count_params(state: Any) -> int:
  """Number of scalars in every array leaf of ``state`` (an ``nnx.State``, a pytree of
  arrays or ``ShapeDtypeStruct``s); a Module counts its ``nnx.Param``s."""
  if isinstance(state, nnx.Module):
    state = nnx.state(state, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))
