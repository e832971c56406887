"""The sequence context: what every block and sublayer knows about the tokens besides
their hidden states.

    positions_BxT     int32 position of each token (0..T-1 for a whole sequence; the
                      absolute positions of the new tokens when decoding)
    segment_ids_BxT   int32 packed-document id of each token, or None (one document)
    side              named per-token side inputs [B, T] that a mechanism reads
                      (CCT: 'step_ids'), from the batch's extra fields or, when
                      decoding, from the registered decode inputs
    options           static, hashable settings of one forward (an ablation, say),
                      as (name, value) pairs

One context is built per forward (``for_tokens``, ``from_batch``) and handed unchanged
to the embedding, to every block and through it to every sublayer: a new mechanism
reads what it needs from it instead of growing the signature of every call between
the model and itself.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import struct

BATCH_TOKEN_FIELDS = ("inputs", "targets", "segment_ids")
"""Batch fields that are not side inputs."""


def default_positions(tokens_BxT: jax.Array, offset: int | jax.Array = 0) -> jax.Array:
  """Positions offset..offset+T-1 of every row: int32 [B, T]."""
  batch, length = tokens_BxT.shape
  positions_T = jnp.arange(length, dtype=jnp.int32) + offset
  return jnp.broadcast_to(positions_T[None, :], (batch, length))


@struct.dataclass
class SequenceContext:
  """Positions, document ids, side inputs and options of one forward (module doc)."""
  positions_BxT: jax.Array
  segment_ids_BxT: jax.Array | None = None
  side: Mapping[str, jax.Array] = struct.field(default_factory=dict)
  options: tuple[tuple[str, Any], ...] = struct.field(pytree_node=False, default=())

  @classmethod
  def for_tokens(cls, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                 segment_ids_BxT: jax.Array | None = None,
                 side: Mapping[str, jax.Array] | None = None,
                 options: tuple[tuple[str, Any], ...] = ()) -> SequenceContext:
    """The context of ``tokens``; positions default to 0..T-1."""
    if positions_BxT is None:
      positions_BxT = default_positions(tokens_BxT)
    return cls(positions_BxT, segment_ids_BxT, dict(side or {}), options)

  @classmethod
  def from_batch(cls, batch: Mapping[str, jax.Array],
                 options: tuple[tuple[str, Any], ...] = ()) -> SequenceContext:
    """The context of ``batch['inputs']``: its ``segment_ids`` when present, and every
    other per-token field but the targets as a side input."""
    side = {k: v for k, v in batch.items() if k not in BATCH_TOKEN_FIELDS}
    return cls.for_tokens(batch["inputs"], None, batch.get("segment_ids"), side, options)

  def side_input(self, name: str) -> jax.Array | None:
    """The side input ``name`` [B, T], or None when this forward has none."""
    return self.side.get(name)

  def option(self, name: str, default: Any = None) -> Any:
    return dict(self.options).get(name, default)

  def replace_side(self, **side: jax.Array | None) -> SequenceContext:
    """This context with the given side inputs set (None removes one)."""
    merged = {**self.side, **side}
    return self.replace(side={k: v for k, v in merged.items() if v is not None})
