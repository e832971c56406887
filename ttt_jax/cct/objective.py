"""The CCT training objective (``train.objective: cct``), from the Commitment-Constrained
Training guide:

    loss = alpha L_standard + beta L_validity + gamma L_conclusion + delta L_sufficiency

- L_standard: cross-entropy with each step boundary committed w.p. p_commit (``rng``);
- L_validity: cross-entropy, every boundary committed, over the tokens of steps >= 1
  (their only cross-step context is the earlier steps' summaries);
- L_conclusion: the same forward, over the tokens of each sequence's final step;
- L_sufficiency: per layer, a linear probe from each complete step's summary to the
  step's mean (detached) hidden state; mean squared error per feature.

The weights and p_commit follow the curriculum at the optimizer step
(``mixer.p_commit_schedule``, ``mixer.loss_weights``). Step ids come from the batch's
``step_ids`` (``data.step_boundaries``), else fixed steps of model.mixer.step_len. Each
term, the weights and p_commit are logged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ttt_jax import registry
from ttt_jax.cct import mixer as cct
from ttt_jax.config import Config, ConfigError
from ttt_jax.models import lm
from ttt_jax.models.context import SequenceContext, default_positions
from ttt_jax.registry import ObjectiveEntry
from ttt_jax.training.objectives import Objective, StepContext


def commitment_constrained(cfg: Config) -> Objective:
  """The CCT objective of ``cfg`` (module docstring)."""
  total_steps = cfg.train.steps
  step_len = cfg.model.mixer.step_len

  def objective(model: lm.LM, batch: dict[str, jax.Array], ctx: StepContext
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    inputs_BxT, targets_BxT = batch["inputs"], batch["targets"]
    step_ids_BxT = batch.get(cct.STEP_IDS)
    if step_ids_BxT is None:
      step_ids_BxT = cct.fixed_step_ids(default_positions(inputs_BxT), step_len)
    p_commit = cct.p_commit_schedule(ctx.step, total_steps)
    weights = cct.loss_weights(ctx.step, total_steps)
    sampled_BxT = cct.sample_segments(step_ids_BxT, p_commit, ctx.rng)
    segment_ids_BxT = batch.get("segment_ids")
    logits_BxTxV = model(inputs_BxT, SequenceContext.for_tokens(
        inputs_BxT, segment_ids_BxT=segment_ids_BxT, side={cct.STEP_IDS: sampled_BxT}))
    standard, _, _ = lm.cross_entropy_loss(logits_BxTxV, targets_BxT)
    committed_BxT = cct.commitment_segments(step_ids_BxT, jnp.ones(step_ids_BxT.shape, bool))
    committed_logits_BxTxV, aux = cct.logits_and_summaries(
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


def check(cfg: Any) -> None:
  if cfg.model.mixer.type != "cct":
    raise ConfigError(f"train.objective: 'cct' needs model.mixer.type='cct', got "
                      f"{cfg.model.mixer.type!r}")


registry.OBJECTIVES.register("cct", ObjectiveEntry(commitment_constrained, check))
