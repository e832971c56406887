"""Gated update blocks: a block of optimizer steps is kept only if it does not regress.

Every ``gate.every`` optimizer steps form a block (the run's last step ends one too).
The state at a block's start, its *anchor*, rides in the train state as the extra tree
``GATE``::

  extras["gate"] = {params, opt_state, extras: every other extra tree (not the frozen
                    LoRA base, which no step changes), step: the optimizer step it was
                    taken at, scores: {eval_loss, probe_pass_rate, probe_logprob}}

At a block's end the ``Gate`` hook scores the state (``score(state)``; in a train run
the eval loss on the run's fixed validation batches and the pass rate and mean
log-probability of the ``gate.probes``, ``eval.probes.gate_scorer``) and compares the
scores with the anchor's. The block is rejected iff, for a score the anchor has (NaN:
no probe of that sort),

  after.eval_loss - before.eval_loss             > gate.max_eval_loss_increase
  before.probe_pass_rate - after.probe_pass_rate > gate.max_probe_pass_drop
  before.probe_logprob - after.probe_logprob     > gate.max_logprob_drop

or the after score is not finite. Scores are compared as the float32 they are stored
in, so a resumed run compares exactly what an uninterrupted one did.

Accepted: the state goes on and a copy of it, with its scores, becomes the next anchor.
Rejected: params, optimizer state and every anchored extra tree go back to the anchor's,
bit for bit; the step counter and the data stream go on (the block's batches are
consumed) and the anchor stays. The optimizer state holds the optimizer's own update
count, so its schedule position and bias corrections go back too: to the optimizer a
rejected block never happened (the ``lr`` column of metrics.jsonl follows the step
counter, not it).

A fresh run's anchor is unscored (NaN eval loss): ``start`` scores the first state and
anchors it, after ``checkpoint.init_from`` has replaced its params. Resume exactness:
the anchor and its scores are checkpointed with the state, so a run killed mid-block
and resumed ends the block against the same anchor, makes the same decisions and
reaches the bitwise-same state. The price is one more params + optimizer state (and
extras) in device memory and in every checkpoint: little for adapters.

Another loop on the ``Trainer`` (a fine-tuning recipe) gates its blocks the same way:
``built = add_gate(built)`` before it compiles its step, and
``trainer.add(Gate(cfg.gate, scorer, ...))`` before its eval and checkpoint hooks, so
they see the decided state; ``runs.restore_newest`` reads the anchor of any run whose
``gate.every`` is set.

Each decision goes to ``gate_decision.json`` (the latest) and ``gates.jsonl`` (every
one; rows past a resumed run's start are dropped, as metrics.jsonl's) in the workdir,
with the scores before and after, the thresholds and the reasons; to a metrics row
(``gate_accepted`` 1/0, ``gate_<score>_before``/``_after``); and to one console line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax import lora, sharding
from ttt_jax import metrics as metrics_lib
from ttt_jax.config.schema import GateConfig
from ttt_jax.training import loop
from ttt_jax.training.state import Built, TrainState

GATE = "gate"
"""The train state's extra tree holding the anchor."""
FROZEN = (lora.BASE,)
"""Extra trees no step changes: not copied into the anchor."""
SCORES = ("eval_loss", "probe_pass_rate", "probe_logprob")
CHECKS = (("eval_loss", 1.0, "max_eval_loss_increase"),
          ("probe_pass_rate", -1.0, "max_probe_pass_drop"),
          ("probe_logprob", -1.0, "max_logprob_drop"))
"""(score, +1 where higher is worse / -1 where lower is, the ``GateConfig`` limit)."""
DECISION_FILE, LOG_FILE = "gate_decision.json", "gates.jsonl"

Scorer = Callable[[TrainState], Mapping[str, float]]
"""The scores of a train state (``SCORES``; a missing one is not compared)."""


# ----------------------------------------------------------------------------- the anchor


def _anchored(state: TrainState) -> dict[str, Any]:
  return {k: v for k, v in state.extras.items() if k != GATE and k not in FROZEN}


def anchor_tree(state: TrainState, scores: Mapping[str, Any], step: Any) -> dict[str, Any]:
  """The gate's extra tree for ``state`` (arrays, abstract values or shardings)."""
  return {"params": state.params, "opt_state": state.opt_state, "extras": _anchored(state),
          "step": step, "scores": {name: scores[name] for name in SCORES}}


def _copy(tree: Any) -> Any:
  return jax.tree.map(jnp.copy, tree)


def _unscored() -> dict[str, jax.Array]:
  return {name: jnp.float32(jnp.nan) for name in SCORES}


def _with_anchor(state: TrainState, scores: Mapping[str, jax.Array], step: jax.Array
                 ) -> TrainState:
  """``state`` whose anchor is a copy of itself with ``scores``, taken at ``step``."""
  scores = {name: jnp.asarray(value, jnp.float32) for name, value in scores.items()}
  anchor = anchor_tree(_copy(state), scores, jnp.asarray(step, jnp.int32))
  return state._replace(extras={**state.extras, GATE: anchor})


def _reverted(state: TrainState) -> TrainState:
  """``state`` with params, optimizer state and anchored extras copied from its anchor."""
  anchor = _copy({k: state.extras[GATE][k] for k in ("params", "opt_state", "extras")})
  return state._replace(params=anchor["params"], opt_state=anchor["opt_state"],
                        extras={**state.extras, **anchor["extras"]})


def add_shardings(shardings: TrainState, replicated: jax.sharding.Sharding) -> TrainState:
  """The train state's shardings with the gate's tree's."""
  gate = anchor_tree(shardings, {name: replicated for name in SCORES}, replicated)
  return shardings._replace(extras={**shardings.extras, GATE: gate})


def add_abstract(abstract: TrainState, shardings: TrainState,
                 replicated: jax.sharding.Sharding) -> tuple[TrainState, TrainState]:
  """(abstract state, shardings) with the gate's tree: what restores a gated run's
  checkpoint."""
  return (jax.eval_shape(lambda s: _with_anchor(s, _unscored(), 0), abstract),
          add_shardings(shardings, replicated))


def add_gate(built: Built) -> Built:
  """``built`` whose state carries the gate's tree: an unscored copy of the state."""
  shardings = add_shardings(built.state_shardings, sharding.replicated(built.mesh))
  state = jax.jit(lambda s: _with_anchor(s, _unscored(), 0), out_shardings=shardings)(
      built.state)
  return dataclasses.replace(built, state=state, state_shardings=shardings)


# ----------------------------------------------------------------------------- the decision


def as_stored(scores: Mapping[str, float]) -> dict[str, float]:
  """``scores`` rounded to the float32 the anchor stores (NaN for a missing one)."""
  return {name: float(np.float32(scores.get(name, math.nan))) for name in SCORES}


def decide(before: Mapping[str, float], after: Mapping[str, float], cfg: GateConfig
           ) -> tuple[bool, list[str]]:
  """(accepted, reasons): the failed checks of a rejected block, or every check of an
  accepted one (module doc); a score ``before`` lacks (NaN) is not compared."""
  failed, passed = [], []
  for name, sign, limit_name in CHECKS:
    old, new = before.get(name, math.nan), after.get(name, math.nan)
    if math.isnan(old):
      continue
    limit = getattr(cfg, limit_name)
    worse = sign * (new - old)
    text = f"{name} {old:.4f} -> {new:.4f}"
    if not math.isfinite(new):
      failed.append(f"{text}: not finite")
    elif worse > limit:
      change = "rose" if sign > 0 else "fell"
      failed.append(f"{text}: {change} by {worse:.4f} > gate.{limit_name}={limit:g}")
    else:
      passed.append(f"{text}: within gate.{limit_name}={limit:g}")
  return not failed, failed or passed


def _json_scores(scores: Mapping[str, float]) -> dict[str, float | None]:
  return {k: v if math.isfinite(v) else None for k, v in scores.items()}


class Gate(loop.Hook):
  """Scores, keeps or undoes each block of ``cfg.every`` steps (module doc); the run's
  ``final_step`` ends a block too. ``state_shardings``: the state's, gate's tree
  included (``add_gate``); ``workdir`` None writes no files (other processes);
  ``writer`` (None: none) gets the metrics row, ``log`` the console line. The state a
  decision replaces is donated (hooks before it at that step must not keep it)."""

  def __init__(self, cfg: GateConfig, score: Scorer, *, final_step: int,
               state_shardings: TrainState, workdir: Path | None,
               writer: metrics_lib.MetricsWriter | None, log: Callable[[str], None]):
    if cfg.every < 1:
      raise ValueError(f"gate.every: must be >= 1 for a Gate, got {cfg.every}")
    self.cfg, self.score, self.final_step = cfg, score, final_step
    self.workdir, self.writer, self.log = workdir, writer, log
    # the state they replace is donated, as to the train step: ~2x params + optimizer state
    self._anchor = jax.jit(_with_anchor, out_shardings=state_shardings, donate_argnums=0)
    self._revert = jax.jit(_reverted, out_shardings=state_shardings, donate_argnums=0)
    self.decisions: list[dict[str, Any]] = []
    """This run's decisions, in order."""

  def start(self, info: loop.StepInfo) -> TrainState | None:
    if self.workdir is not None:
      self._drop_rows_after(info.step)
    stored = jax.device_get(info.state.extras[GATE]["scores"])
    if not math.isnan(float(stored["eval_loss"])):
      return None  # resumed: the anchor is this block's start
    return self._anchor(info.state, as_stored(self.score(info.state)), info.step)

  def due(self, info: loop.StepInfo) -> bool:
    return info.step % self.cfg.every == 0 or info.step == self.final_step

  def after_step(self, info: loop.StepInfo) -> TrainState:
    gate = jax.device_get({k: info.state.extras[GATE][k] for k in ("scores", "step")})
    before = {name: float(gate["scores"][name]) for name in SCORES}
    after = as_stored(self.score(info.state))
    accepted, reasons = decide(before, after, self.cfg)
    anchor_step = int(gate["step"])
    block_start = max((info.step - 1) // self.cfg.every * self.cfg.every, anchor_step)
    decision = {"step": info.step, "block": [block_start, info.step], "accepted": accepted,
                "action": "kept" if accepted else f"reverted to the state of step {anchor_step}",
                "before": _json_scores(before), "after": _json_scores(after),
                "thresholds": {limit: getattr(self.cfg, limit) for _, _, limit in CHECKS},
                "reasons": reasons}
    self._record(decision)
    if accepted:
      return self._anchor(info.state, after, info.step)
    return self._revert(info.state)

  def _record(self, decision: dict[str, Any]) -> None:
    self.decisions.append(decision)
    step, accepted = decision["step"], decision["accepted"]
    if self.workdir is not None:
      text = json.dumps(decision, allow_nan=False)
      with (self.workdir / LOG_FILE).open("a") as f:
        f.write(text + "\n")
      tmp = self.workdir / f".{DECISION_FILE}.tmp"
      tmp.write_text(json.dumps(decision, indent=2) + "\n")
      tmp.replace(self.workdir / DECISION_FILE)
    if self.writer is not None:
      row = {"gate_accepted": float(accepted)}
      for name in SCORES:
        if decision["before"][name] is not None:
          row[f"gate_{name}_before"] = decision["before"][name]
          row[f"gate_{name}_after"] = decision["after"][name]
      self.writer.write(step, row)
    if accepted:
      verdict = "kept (" + ", ".join(
          f"{name} {old:.4f} -> {decision['after'][name]:.4f}"
          for name, old in decision["before"].items() if old is not None) + ")"
    else:
      verdict = f"rejected, {decision['action']}; " + "; ".join(decision["reasons"])
    self.log(f"gate step {step} (block {decision['block'][0]}..{step}): {verdict}")

  def _drop_rows_after(self, step: int) -> None:
    """Drops the decisions an interrupted attempt logged past ``step``."""
    path = self.workdir / LOG_FILE
    if path.exists():
      metrics_lib.keep_rows_through(path, step)
