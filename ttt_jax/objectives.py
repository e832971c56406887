"""Training objectives: what the train step differentiates, chosen by ``train.objective``.

An objective maps ``(model, batch, step, rng)`` to ``(loss, metrics)``:

- ``model``: the LM merged from the current params (inside the jitted step);
- ``batch``: this micro-batch, ``inputs``/``targets`` int32 [B, T] plus whatever extra
  per-token fields the data pipeline emits for the mechanism;
- ``step``: int32 scalar, the 0-based optimizer step (curricula and loss-weight
  schedules are functions of it);
- ``rng``: a key that is ``fold_in(key(train.seed), micro_step)``, so randomness is a
  pure function of the seed and the step and needs no checkpointing;
- ``metrics``: float32 scalars, logged as ``metrics.jsonl`` columns and tensorboard
  ``train/<name>`` tags next to ``loss``.

A mechanism that trains with its own losses adds a builder to ``OBJECTIVES``.
"""

from __future__ import annotations

from typing import Callable

import jax

from ttt_jax.config import Config
from ttt_jax.models import lm

Objective = Callable[[lm.LM, dict[str, jax.Array], jax.Array, jax.Array],
                     tuple[jax.Array, dict[str, jax.Array]]]


def language_modeling(cfg: Config) -> Objective:
  """Mean next-token cross-entropy over every target."""
  del cfg

  def objective(model: lm.LM, batch: dict[str, jax.Array], step: jax.Array,
                rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    del step, rng
    logits_BxTxV = model(batch["inputs"], segment_ids_BxT=batch.get("segment_ids"))
    loss, _, _ = lm.cross_entropy_loss(logits_BxTxV, batch["targets"])
    return loss, {}

  return objective


OBJECTIVES: dict[str, Callable[[Config], Objective]] = {"lm": language_modeling}
"""``train.objective`` name -> builder of the objective from the config."""


def build(cfg: Config) -> Objective:
  return OBJECTIVES[cfg.train.objective](cfg)
