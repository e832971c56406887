"""Loss by token position: how much a model gains from the context before a token.

Over the same validation batches as ``eval.lm.evaluate`` (windows of T tokens), with
nll[b, t] the next-token NLL of target t of window b (``models.lm.token_nll``):

  sum_nll[t] = sum_b nll[b, t],   tokens[t] = B   (summed over every batch)
  loss(t)    = sum_nll[t] / tokens[t]             the loss with t tokens of context

so the token-weighted mean of the per-position losses, sum_t sum_nll[t] / sum_t tokens[t],
is the ordinary ``eval_loss`` (the same sums in another order). ``bucket_losses`` groups
positions into ranges (``log_buckets``: [0, 8), [8, 16), [16, 32), ...), whose means are
the curve that shows whether a mixer keeps improving as its context grows.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.models import lm
from ttt_jax.training import objectives


class PositionLosses(NamedTuple):
  """Summed NLL and target count at each position of the window (float64 [T])."""
  sum_nll: np.ndarray
  tokens: np.ndarray

  def mean(self) -> float:
    """The mean NLL over every position: ``eval_loss`` of the same batches."""
    return float(self.sum_nll.sum() / self.tokens.sum())


def position_sums(logits_BxTxV: jax.Array, targets_BxT: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """(summed NLL [T], target count [T]) over the batch axis, float32."""
  nll_BxT = lm.token_nll(logits_BxTxV, targets_BxT)
  return jnp.sum(nll_BxT, axis=0), jnp.full(nll_BxT.shape[1:], nll_BxT.shape[0], jnp.float32)


def make_position_eval_step(graphdef: nnx.GraphDef) -> Callable:
  """``(params, batch) -> (sum_nll [T], tokens [T])`` for one batch (jit it)."""
  def position_eval_step(params: nnx.State, batch: dict[str, jax.Array]):
    logits = objectives.batch_logits(nnx.merge(graphdef, params), batch)
    return position_sums(logits, batch["targets"])

  return position_eval_step


def evaluate_positions(step_fn: Callable, params: Any,
                       batches: Iterable[dict[str, jax.Array]]) -> PositionLosses:
  """``step_fn`` (a jitted ``make_position_eval_step``) summed over ``batches`` on the
  host in float64, so the totals do not depend on how many batches there are."""
  sum_nll, tokens = None, None
  for batch in batches:
    batch_nll, batch_tokens = jax.device_get(step_fn(params, batch))
    batch_nll, batch_tokens = np.float64(batch_nll), np.float64(batch_tokens)
    sum_nll = batch_nll if sum_nll is None else sum_nll + batch_nll
    tokens = batch_tokens if tokens is None else tokens + batch_tokens
  if sum_nll is None:
    raise ValueError("evaluate_positions: no batches to evaluate")
  return PositionLosses(sum_nll, tokens)


def log_buckets(seq_len: int, first: int = 8) -> list[tuple[int, int]]:
  """[0, first), [first, 2 first), [2 first, 4 first), ... up to ``seq_len`` (the last
  range ends at ``seq_len``)."""
  edges, edge = [0], first
  while edge < seq_len:
    edges.append(edge)
    edge *= 2
  edges.append(seq_len)
  return list(zip(edges[:-1], edges[1:]))


def bucket_losses(losses: PositionLosses, buckets: list[tuple[int, int]]) -> list[float]:
  """The mean NLL over the positions of each [start, end) range of ``buckets``."""
  return [float(losses.sum_nll[start:end].sum() / losses.tokens[start:end].sum())
          for start, end in buckets]
