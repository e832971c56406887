"""Training objectives: what the train step differentiates, chosen by ``train.objective``.

An objective maps ``(model, batch, ctx)`` to ``(loss, metrics)``:

- ``model``: the LM merged from the current params (inside the jitted step);
- ``batch``: this micro-batch, ``inputs``/``targets`` int32 [B, T] plus whatever extra
  per-token fields the data pipeline emits for the mechanism;
- ``ctx`` (``StepContext``): ``step``, int32 scalar, the 0-based optimizer step
  (curricula and loss-weight schedules are functions of it); ``rng``, a key that is
  ``fold_in(key(train.seed), micro_step)``, so randomness is a pure function of the seed
  and the step and needs no checkpointing; ``extras``, the train state's extra trees
  (a teacher's or reference params, EMA weights; empty unless a mechanism adds one);
- ``metrics``: float32 scalars, logged as ``metrics.jsonl`` columns and tensorboard
  ``train/<name>`` tags next to ``loss``.

``batch_logits`` is the forward every evaluation scores: the logits of a batch's inputs
with its per-token side fields. A mechanism that trains with its own losses adds a
builder to ``OBJECTIVES``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from ttt_jax.config import Config
from ttt_jax.models import cct, lm


class StepContext(NamedTuple):
  """What an objective knows of the step besides the model and the batch."""
  step: jax.Array
  """int32 scalar: the 0-based optimizer step."""
  rng: jax.Array
  """``fold_in(key(train.seed), micro_step)``."""
  extras: Mapping[str, Any]
  """The train state's extra trees (``TrainState.extras``); ``{}`` unless a mechanism adds one."""


Objective = Callable[[lm.LM, dict[str, jax.Array], StepContext],
                     tuple[jax.Array, dict[str, jax.Array]]]


def batch_logits(model: lm.LM, batch: dict[str, jax.Array]) -> jax.Array:
  """Logits [B, T, V] of ``batch['inputs']`` with the batch's segment and step ids."""
  return model(batch["inputs"], segment_ids_BxT=batch.get("segment_ids"),
               step_ids_BxT=batch.get("step_ids"))


def language_modeling(cfg: Config) -> Objective:
  """Mean next-token cross-entropy over every target."""
  del cfg

  def objective(model: lm.LM, batch: dict[str, jax.Array],
                ctx: StepContext) -> tuple[jax.Array, dict[str, jax.Array]]:
    del ctx
    logits_BxTxV = model(batch["inputs"], segment_ids_BxT=batch.get("segment_ids"))
    loss, _, _ = lm.cross_entropy_loss(logits_BxTxV, batch["targets"])
    return loss, {}

  return objective


def commitment_constrained(cfg: Config) -> Objective:
  """CCT (``models/cct.py``): alpha L_standard + beta L_validity + gamma L_conclusion +
  delta L_sufficiency, weights and p_commit from the curriculum at ``step``.

  - L_standard: cross-entropy with each step boundary committed w.p. p_commit (``rng``);
  - L_validity: cross-entropy, every boundary committed, over the tokens of steps >= 1
    (their only cross-step context is the earlier steps' summaries);
  - L_conclusion: the same forward, over the tokens of each sequence's final step;
  - L_sufficiency: per layer, a linear probe from each complete step's summary to the
    step's mean (detached) hidden state; mean squared error per feature.

  Step ids come from ``batch['step_ids']`` (data.step_boundaries), else fixed steps of
  model.cct_step_len. Each term, the weights and p_commit are logged.
  """
  total_steps = cfg.train.steps
  step_len = cfg.model.cct_step_len

  def objective(model: lm.LM, batch: dict[str, jax.Array],
                ctx: StepContext) -> tuple[jax.Array, dict[str, jax.Array]]:
    step, rng = ctx.step, ctx.rng
    inputs_BxT, targets_BxT = batch["inputs"], batch["targets"]
    step_ids_BxT = batch.get("step_ids")
    if step_ids_BxT is None:
      step_ids_BxT = cct.fixed_step_ids(lm.default_positions(inputs_BxT), step_len)
    p_commit = cct.p_commit_schedule(step, total_steps)
    weights = cct.loss_weights(step, total_steps)
    sampled_BxT = cct.sample_segments(step_ids_BxT, p_commit, rng)
    segment_ids_BxT = batch.get("segment_ids")
    logits_BxTxV = model(inputs_BxT, segment_ids_BxT=segment_ids_BxT, step_ids_BxT=sampled_BxT)
    standard, _, _ = lm.cross_entropy_loss(logits_BxTxV, targets_BxT)
    committed_BxT = cct.commitment_segments(step_ids_BxT, jnp.ones(step_ids_BxT.shape, bool))
    committed_logits_BxTxV, aux = cct.forward_with_summaries(
        model, inputs_BxT, committed_BxT, segment_ids_BxT=segment_ids_BxT)
    later_BxT = committed_BxT > 0
    validity, _, _ = lm.cross_entropy_loss(committed_logits_BxTxV, targets_BxT, later_BxT)
    final_BxT = later_BxT & (committed_BxT == committed_BxT[:, -1:])
    conclusion, _, _ = lm.cross_entropy_loss(committed_logits_BxTxV, targets_BxT, final_BxT)
    sufficiency = cct.sufficiency_loss(model, aux)
    loss = (weights["alpha"] * standard + weights["beta"] * validity
            + weights["gamma"] * conclusion + weights["delta"] * sufficiency)
    metrics = {"loss_standard": standard, "loss_validity": validity,
               "loss_conclusion": conclusion, "loss_sufficiency": sufficiency,
               "p_commit": p_commit, **{f"weight_{k}": v for k, v in weights.items()}}
    return loss, metrics

  return objective


OBJECTIVES: dict[str, Callable[[Config], Objective]] = {"lm": language_modeling,
                                                        "cct": commitment_constrained}
"""``train.objective`` name -> builder of the objective from the config."""


def build(cfg: Config) -> Objective:
  return OBJECTIVES[cfg.train.objective](cfg)
