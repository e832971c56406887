"""Training objectives: what the train step differentiates, chosen by ``train.objective``.

An objective maps ``(model, batch, ctx)`` to ``(loss, metrics)``:

- ``model``: the LM merged from the current params (inside the jitted step);
- ``batch``: this micro-batch, ``inputs``/``targets`` int32 [B, T] plus the per-token
  fields the data pipeline adds for the mechanisms (``segment_ids``, ``step_ids``, ...);
- ``ctx``: the ``StepContext``: the 0-based optimizer ``step`` (curricula and
  loss-weight schedules are functions of it), ``rng`` = ``fold_in(key(train.seed),
  micro_step)`` (randomness is a pure function of the seed and the step and needs no
  checkpointing) and ``extras``, the train state's extra trees (a teacher's or a
  reference model's params, EMA weights, ...);
- ``metrics``: float32 scalars, logged as ``metrics.jsonl`` columns and tensorboard
  ``train/<name>`` tags next to ``loss``.

Every objective sees the whole batch through ``SequenceContext.from_batch``, so a
mechanism's per-token fields reach its sublayers. What the sublayers record in the aux
channel (``LM.forward``'s aux) is the objective's to use: the language-modeling
objective adds every recorded ``AUX_LOSS`` entry (mean over layers) to the loss and
logs it.

A mechanism that trains with its own losses registers an ``ObjectiveEntry`` in
``registry.OBJECTIVES``, with a ``check`` of the config it needs, and, when it keeps
extra trees in the train state (an EMA teacher), their ``extras`` (which every program
that builds or restores such a run's state adds) and the ``after_update`` the step
applies after every optimizer update.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from ttt_jax import registry
from ttt_jax.config import Config
from ttt_jax.models import lm
from ttt_jax.models.context import SequenceContext
from ttt_jax.registry import ObjectiveEntry

AUX_LOSS = "aux_loss"
"""Name under which a sublayer records (``sow``) a scalar loss of its own per layer,
e.g. a mixture of experts' balance loss; the LM objective adds it to the loss."""


class StepContext(NamedTuple):
  """What an objective knows about the step besides the batch."""
  step: jax.Array
  """int32 scalar: the 0-based optimizer step."""
  rng: jax.Array
  """A key, ``fold_in(key(train.seed), micro_step)``."""
  extras: Mapping[str, Any]
  """The train state's extra trees (``TrainState.extras``); empty when none."""


Objective = Callable[[lm.LM, dict[str, jax.Array], StepContext],
                     tuple[jax.Array, dict[str, jax.Array]]]


def batch_logits(model: lm.LM, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Float32 logits [B, T, V] of ``batch['inputs']`` with every per-token field of the
  batch in the context: the forward of training and of every evaluation."""
  return model(batch["inputs"], SequenceContext.from_batch(batch))


def aux_losses(aux: lm.Aux) -> dict[str, jax.Array]:
  """The recorded ``AUX_LOSS`` entries, each averaged over layers: '<sublayer>.aux_loss'
  -> float32 scalar."""
  return {key: jnp.mean(value.astype(jnp.float32)) for key, value in aux.items()
          if key.rsplit(".", 1)[-1] == AUX_LOSS}


def language_modeling(cfg: Config) -> Objective:
  """Mean next-token cross-entropy over every target, plus the sublayers' aux losses."""
  del cfg

  def objective(model: lm.LM, batch: dict[str, jax.Array], ctx: StepContext
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del ctx
    logits_BxTxV, aux = model.forward(batch["inputs"], SequenceContext.from_batch(batch))
    loss, _, _ = lm.cross_entropy_loss(logits_BxTxV, batch["targets"])
    extra = aux_losses(aux)
    for value in extra.values():
      loss = loss + value
    return loss, extra

  return objective


registry.OBJECTIVES.register("lm", ObjectiveEntry(language_modeling))


ExtrasUpdate = Callable[[Mapping[str, Any], Any], dict[str, Any]]
"""``(extras, params) -> {name: tree}``: extra trees that follow the params, computed
after an optimizer update from the params it produced (``ObjectiveEntry.after_update``)."""


def build(cfg: Config) -> Objective:
  return registry.OBJECTIVES.get(cfg.train.objective).build(cfg)


def build_extras(cfg: Config) -> tuple[Callable[[Any], dict[str, Any]] | None, Any]:
  """``(extras_init, extras_shardings)`` of the extra trees ``train.objective`` keeps in
  the train state (``state.build``'s arguments); ``(None, None)`` when it keeps none."""
  entry = registry.OBJECTIVES.get(cfg.train.objective)
  return entry.extras(cfg) if entry.extras is not None else (None, None)


def build_after_update(cfg: Config) -> ExtrasUpdate | None:
  """``train.objective``'s update of the extra trees after each optimizer update (None:
  it has none)."""
  entry = registry.OBJECTIVES.get(cfg.train.objective)
  return entry.after_update(cfg) if entry.after_update is not None else None
