"""Trunks that run each of the n_layers stacked blocks once, in order (``model.trunk``):

    s_{l+1} = block_l(s_l),  l = 0..n_layers-1

'scan': ``jax.lax.scan`` over the stacked block state (one compiled body: compile time
independent of depth). 'unrolled': the same body in a Python loop (XLA sees every
layer). Both wrap the body in ``jax.checkpoint`` with the ``model.remat`` policy, and
stack what the blocks record (lm.py's aux channel) on a leading layers axis. The two
compute the same parameters' function; a checkpoint of one resumes with the other.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax import registry
from ttt_jax.config import ModelConfig, Section
from ttt_jax.models import lm
from ttt_jax.models.context import SequenceContext
from ttt_jax.models.remat import remat


@dataclasses.dataclass(frozen=True)
class ScanTrunkConfig(Section):
  type: str = "scan"
  COMPUTE_ONLY = ("type",)


@dataclasses.dataclass(frozen=True)
class UnrolledTrunkConfig(Section):
  type: str = "unrolled"
  COMPUTE_ONLY = ("type",)


class StackedTrunk(nnx.Module):
  """Each block once, in order: with ``lax.scan`` when ``scan``, else a Python loop."""

  scan: bool = True

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    del rngs  # no parameters
    self.remat_policy = cfg.remat
    self.n_layers = cfg.n_layers

  def __call__(self, blocks: lm.Block, stream: jax.Array, ctx: SequenceContext
               ) -> tuple[jax.Array, lm.Aux]:
    graphdef, stacked_state = nnx.split(blocks)
    body = remat(functools.partial(lm.apply_layer, graphdef, ctx), self.remat_policy,
                 prevent_cse=not self.scan)
    if self.scan:
      return jax.lax.scan(body, stream, stacked_state)
    layer_aux = []
    for index in range(self.n_layers):
      stream, aux = body(stream, lm.layer_slice(stacked_state, index))
      layer_aux.append(aux)
    return stream, _stack(layer_aux)

  def decode(self, blocks: lm.Block, stream: jax.Array, ctx: SequenceContext,
             cache: lm.Cache) -> tuple[jax.Array, lm.Cache]:
    graphdef, stacked_state = nnx.split(blocks)
    body = functools.partial(lm.decode_layer, graphdef, ctx)
    if self.scan:
      return jax.lax.scan(body, stream, (stacked_state, cache))
    new_caches = []
    for index in range(self.n_layers):
      stream, new_cache = body(
          stream, (lm.layer_slice(stacked_state, index), lm.layer_slice(cache, index)))
      new_caches.append(new_cache)
    return stream, _stack(new_caches)


@registry.TRUNKS.register("scan")
class ScanTrunk(StackedTrunk):
  """``lax.scan`` over the blocks."""
  Config = ScanTrunkConfig
  scan = True


@registry.TRUNKS.register("unrolled")
class UnrolledTrunk(StackedTrunk):
  """A Python loop over the blocks."""
  Config = UnrolledTrunkConfig
  scan = False


def _stack(per_layer: list) -> object:
  """Per-layer pytrees -> one pytree stacked on a leading layers axis."""
  return jax.tree.map(lambda *layers: jnp.stack(layers), *per_layer)
