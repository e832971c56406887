"""CCT's decode input: the step id of every generated token (``registry.DECODE_INPUTS``).

A run trained with fixed steps needs none (the mixer's default is position //
model.mixer.step_len). A run trained with ``data.step_boundaries: semantic`` decodes
with the semantic rule applied token by token on device (``mixer.StepRule``, the exact
online form of the training annotator), so that generation sees the steps training
saw; every step but the last has >= step_min_len tokens, so T tokens need at most
(T - 1) // step_min_len + 1 summary slots. The rule skips pads (tokens at negative
positions of left-padded prompts), so each row's steps start at its first real token.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from ttt_jax import registry
from ttt_jax.cct import mixer as cct
from ttt_jax.cct.steps import StepAnnotator, step_annotator
from ttt_jax.config import Config, ConfigError
from ttt_jax.models.lm import LM


class SemanticSteps(NamedTuple):
  """``inference.sampling.DecodeInputs`` of semantic steps: the side input
  ``step_ids`` from ``rule``."""
  rule: cct.StepRule

  name = cct.STEP_IDS

  def check(self, model: LM) -> None:
    if model.cfg.mixer.type != "cct":
      raise ValueError(f"semantic step ids need model.mixer.type='cct', got "
                       f"{model.cfg.mixer.type!r}")
    if int(self.rule.step_len) > model.cfg.mixer.step_len:
      raise ValueError(f"steps of up to {int(self.rule.step_len)} tokens exceed the decode "
                       f"step buffer, model.mixer.step_len={model.cfg.mixer.step_len}")

  def cache_options(self, total_len: int) -> dict[str, Any]:
    return {"max_steps": (total_len - 1) // int(self.rule.step_min_len) + 1}

  def start(self, batch_size: int) -> cct.StepRuleState:
    return cct.step_rule_start(batch_size)

  def next(self, state: cct.StepRuleState, tokens_BxS: jax.Array, positions_BxS: jax.Array
           ) -> tuple[jax.Array, cct.StepRuleState]:
    return cct.step_rule_ids(self.rule, state, tokens_BxS, positions_BxS >= 0)  # pads skipped


def semantic_annotator(cfg: Config, tokenizer: Any) -> StepAnnotator | None:
  """The step annotator a CCT run with semantic steps decodes with (None otherwise); its
  steps must fit the decode step buffer (model.mixer.step_len tokens)."""
  if cfg.model.mixer.type != "cct" or cfg.data.step_boundaries != "semantic":
    return None
  if cfg.data.step_len > cfg.model.mixer.step_len:
    raise ConfigError(f"data.step_len: semantic steps of up to {cfg.data.step_len} tokens "
                      f"exceed model.mixer.step_len={cfg.model.mixer.step_len}, the decode "
                      f"step buffer; --set model.mixer.step_len={cfg.data.step_len}")
  return step_annotator(cfg, tokenizer)


def semantic_steps(cfg: Config, tokenizer: Any) -> SemanticSteps | None:
  """The decode input of a CCT run with semantic steps (None otherwise)."""
  annotator = semantic_annotator(cfg, tokenizer)
  return None if annotator is None else SemanticSteps(cct.step_rule(annotator))


registry.DECODE_INPUTS.register(cct.STEP_IDS, semantic_steps)
