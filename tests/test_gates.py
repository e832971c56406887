"""Gated update blocks (``ttt_jax.training.gates``): the decision rule; a block that a
hook ruins with noise is undone bit for bit (params, optimizer state, extra trees) while
the step counter goes on, and a good one is kept; the decision files, metrics and
console line; a gated ``python -m ttt_jax.train`` run killed mid-block and resumed makes
the same decisions and reaches the same state as an uninterrupted one; ``evaluate
--task probes`` reads a gated run."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax import evaluate, sharding, train
from ttt_jax import metrics as metrics_lib
from ttt_jax.config import load_config
from ttt_jax.config.schema import GateConfig
from ttt_jax.errors import ConfigError, TrainingError
from ttt_jax.eval import lm as eval_lm
from ttt_jax.training import gates, loop, objectives
from ttt_jax.training import state as state_lib
from ttt_jax.training import step as step_lib
from ttt_jax.training.state import TrainState
from test_loop import TINY, Batches
from train_util import copy_stdlib_corpus, read_metrics, tiny_config, train_losses

NAN = math.nan


def test_a_block_is_rejected_for_any_score_past_its_threshold():
  cfg = GateConfig(every=2, max_eval_loss_increase=0.1, max_probe_pass_drop=0.25,
                   max_logprob_drop=0.5)
  before = {"eval_loss": 3.0, "probe_pass_rate": 0.5, "probe_logprob": -2.0}
  accepted, reasons = gates.decide(before, {"eval_loss": 3.05, "probe_pass_rate": 0.25,
                                            "probe_logprob": -2.4}, cfg)
  assert accepted and len(reasons) == 3
  assert reasons[0] == "eval_loss 3.0000 -> 3.0500: within gate.max_eval_loss_increase=0.1"
  for name, value in (("eval_loss", 3.2), ("probe_pass_rate", 0.0), ("probe_logprob", -2.6)):
    accepted, reasons = gates.decide(before, {**before, name: value}, cfg)
    assert not accepted and len(reasons) == 1 and reasons[0].startswith(name), reasons
  accepted, reasons = gates.decide(before, {**before, "eval_loss": 3.2, "probe_logprob": -9.0},
                                   cfg)
  assert reasons == ["eval_loss 3.0000 -> 3.2000: rose by 0.2000 > "
                     "gate.max_eval_loss_increase=0.1",
                     "probe_logprob -2.0000 -> -9.0000: fell by 7.0000 > "
                     "gate.max_logprob_drop=0.5"]
  accepted, reasons = gates.decide(before, {**before, "eval_loss": NAN}, cfg)
  assert not accepted and reasons == ["eval_loss 3.0000 -> nan: not finite"]


def test_scores_the_anchor_lacks_are_not_compared_and_stored_ones_compare_exactly():
  cfg = GateConfig(every=1)  # no probe may be lost, on balance
  accepted, reasons = gates.decide({"eval_loss": 1.0, "probe_pass_rate": NAN},
                                   {"eval_loss": 1.0, "probe_pass_rate": 0.0}, cfg)
  assert accepted and len(reasons) == 1
  # 1/3 stored as float32 and 1/3 scored again compare as the same float32
  stored = gates.as_stored({"eval_loss": 2.0, "probe_pass_rate": 1 / 3})
  assert math.isnan(stored["probe_logprob"]) and stored["probe_pass_rate"] != 1 / 3
  accepted, _ = gates.decide(stored, gates.as_stored({"eval_loss": 2.0,
                                                      "probe_pass_rate": 1 / 3}), cfg)
  assert accepted


@pytest.mark.parametrize("overrides, message", [
    (["gate.every=-1"], r"^gate.every: must be >= 0, got -1$"),
    (["gate.every=2", "gate.max_probe_pass_drop=1.5"],
     r"^gate.max_probe_pass_drop: must be in \[0, 1\], got 1.5$"),
    (["gate.probes=p.jsonl"], r"^gate.probes: scored only by gated blocks; set gate.every > 0$"),
])
def test_bad_gate_settings_are_refused_naming_the_field(overrides, message):
  with pytest.raises(ConfigError, match=message):
    load_config(None, overrides)
  assert load_config(None, []).gate.every == 0  # off by default


def test_the_anchor_holds_every_extra_tree_but_itself_and_the_frozen_base():
  state = TrainState(1, {"w": 2}, {"mu": 3}, {"lora_base": 4, "teacher": 5, gates.GATE: 6})
  anchor = gates.anchor_tree(state, {name: 0.0 for name in gates.SCORES}, 7)
  assert anchor == {"params": {"w": 2}, "opt_state": {"mu": 3}, "extras": {"teacher": 5},
                    "step": 7, "scores": {name: 0.0 for name in gates.SCORES}}


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_same(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) and jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


def _trained(state: TrainState):
  """What a block changes and a rejection restores: params, optimizer state, extras."""
  return _host((state.params, state.opt_state,
                {k: v for k, v in state.extras.items() if k != gates.GATE}))


class Record(loop.Hook):
  """The state at ``steps`` (where it runs among the hooks), on the host."""

  def __init__(self, steps):
    self.steps, self.states = steps, {}

  def due(self, info):
    return info.step in self.steps

  def after_step(self, info):
    self.states[info.step] = _host(info.state)  # the step donates the state


class Noise(loop.Hook):
  """Adds N(0, 1) to the params and the 'teacher' extra tree after step ``at``."""

  def __init__(self, at, shardings):
    self.at = at
    self.perturb = jax.jit(self._perturb, out_shardings=shardings)

  @staticmethod
  def _perturb(state):
    keys = iter(jax.random.split(jax.random.key(7), 1000))
    noisy = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: x + jax.random.normal(next(keys), x.shape, x.dtype), tree)
    return state._replace(params=noisy(state.params),
                          extras={**state.extras, "teacher": noisy(state.extras["teacher"])})

  def due(self, info):
    return info.step == self.at

  def after_step(self, info):
    return self.perturb(info.state)


@pytest.mark.slow
def test_a_ruined_block_is_undone_bit_for_bit_and_a_good_one_is_kept(tmp_path):
  cfg = load_config(None, TINY + ["optim.name=adamw", "optim.lr=1e-3", "gate.every=2",
                                  "gate.max_eval_loss_increase=0.5"])
  mesh = sharding.make_mesh(cfg.mesh)
  built = gates.add_gate(state_lib.build(
      cfg, cfg.data.vocab_size, mesh, extras_init=lambda params: {"teacher": params},
      extras_shardings=lambda params: {"teacher": params}))
  eval_data = Batches(cfg, mesh)
  eval_data.index = 1000
  eval_batches = [next(eval_data) for _ in range(2)]
  eval_fn = step_lib.jit_eval_step(built)
  no_bytes = jax.device_put(np.zeros(cfg.data.vocab_size, np.int32), sharding.replicated(mesh))
  scored = []

  def score(state):
    scored.append(int(state.step))
    return {"eval_loss": eval_lm.evaluate(eval_fn, state.params, eval_batches,
                                          no_bytes)["eval_loss"]}

  writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False, enabled=True)
  lines = []
  gate = gates.Gate(cfg.gate, score, final_step=5, state_shardings=built.state_shardings,
                    workdir=tmp_path, writer=writer, log=lines.append)
  before_gate, after_gate = Record({2, 4, 5}), Record({2, 4, 5})
  trainer = loop.Trainer(step_lib.jit_train_step(built), Batches(cfg, mesh))
  for hook in (Noise(3, built.state_shardings), before_gate, gate, after_gate):
    trainer.add(hook)
  finished = trainer.run(built.state, 0, 5)

  # blocks 0..2 (kept), 2..4 (ruined at step 3: undone), 4..5 (the run's last step)
  assert [d["block"] for d in gate.decisions] == [[0, 2], [2, 4], [4, 5]]
  assert [d["accepted"] for d in gate.decisions[:2]] == [True, False]
  assert scored[:3] == [0, 2, 4]  # the fresh state is scored in start, then each block's end
  kept, undone = gate.decisions[0], gate.decisions[1]
  assert math.isfinite(kept["before"]["eval_loss"])
  assert undone["before"] == kept["after"] and undone["action"] == "reverted to the state of step 2"
  assert undone["after"]["eval_loss"] > undone["before"]["eval_loss"] + 0.5
  assert len(undone["reasons"]) == 1 and undone["reasons"][0].startswith("eval_loss ")
  assert "rose by" in undone["reasons"][0]
  # kept: the state goes on as trained, and the anchor is a copy of it
  states = {step: _trained(s) for step, s in after_gate.states.items()}
  _assert_same(states[2], _trained(before_gate.states[2]))
  anchor = _host(after_gate.states[2].extras[gates.GATE])
  _assert_same((anchor["params"], anchor["opt_state"], anchor["extras"]), states[2])
  assert int(anchor["step"]) == 2
  # undone: params, optimizer state and the teacher are step 2's, bit for bit; the step
  # counter went on, and so did the data (step 5 trained on the fifth batch)
  _assert_same(states[4], states[2])
  assert not np.array_equal(jax.tree.leaves(_trained(before_gate.states[4]))[0],
                            jax.tree.leaves(states[2])[0])
  assert int(after_gate.states[4].step) == 4 and int(finished.state.step) == 5
  assert int(_host(after_gate.states[4].extras[gates.GATE]["step"])) == 2
  # the decisions on disk, in metrics and on the console
  written = [json.loads(line) for line in (tmp_path / gates.LOG_FILE).read_text().splitlines()]
  assert written == gate.decisions
  assert json.loads((tmp_path / gates.DECISION_FILE).read_text()) == gate.decisions[-1]
  rows = [r for r in read_metrics(tmp_path) if "gate_accepted" in r]
  assert [(r["step"], r["gate_accepted"]) for r in rows][:2] == [(2, 1.0), (4, 0.0)]
  assert rows[1]["gate_eval_loss_after"] == undone["after"]["eval_loss"]
  assert lines[1].startswith("gate step 4 (block 2..4): rejected, reverted to the state of "
                             "step 2; eval_loss ")


def _gated_objective(cfg, *, crash_at: int | None = None):
  """The LM loss ascended (negated) in optimizer steps 4..6, a block the gate must
  undo; with ``crash_at`` a NaN loss there (the run dies at that step)."""
  lm_loss = objectives.language_modeling(cfg)

  def objective(model, batch, ctx):
    loss, aux = lm_loss(model, batch, ctx)
    loss = jnp.where((ctx.step >= 3) & (ctx.step <= 5), -loss, loss)
    if crash_at is not None:
      loss = loss + jnp.where(ctx.step == crash_at - 1, jnp.nan, 0.0)
    return loss, aux
  return objective


@pytest.mark.slow
def test_a_gated_run_killed_mid_block_resumes_to_the_same_decisions_and_state(
    tmp_path, monkeypatch, capsys):
  corpus = (copy_stdlib_corpus(tmp_path / "src"), tmp_path / "cache")
  probes_file = tmp_path / "probes.jsonl"
  probes_file.write_text(
      json.dumps({"kind": "regex", "prompt": "def ", "pattern": r"\(", "max_new_tokens": 4})
      + "\n" + json.dumps({"kind": "logprob", "prompt": "import ", "expected": "os"}) + "\n")
  cfg = tiny_config(*corpus, "train.steps=9", "train.eval_every=0", "checkpoint.every=4",
                    "eval.batches=2", "gate.every=3", f"gate.probes={probes_file}",
                    "gate.max_eval_loss_increase=0.0")
  monkeypatch.setattr(objectives, "build", lambda cfg: _gated_objective(cfg))
  whole = train.train(cfg, tmp_path / "whole")
  decisions = [json.loads(line)
               for line in (tmp_path / "whole" / gates.LOG_FILE).read_text().splitlines()]
  assert [d["block"] for d in decisions] == [[0, 3], [3, 6], [6, 9]]
  assert not decisions[1]["accepted"]  # the ascended block
  assert set(decisions[0]["before"]) == set(gates.SCORES)
  assert all(math.isfinite(d["before"]["probe_logprob"]) for d in decisions)

  # killed at step 7 (after the decision at 6, past the checkpoint at 4), then resumed
  monkeypatch.setattr(objectives, "build", lambda cfg: _gated_objective(cfg, crash_at=7))
  with pytest.raises(TrainingError, match=r"non-finite (loss|train state) at step 7"):
    train.train(cfg, tmp_path / "resumed")
  assert len((tmp_path / "resumed" / gates.LOG_FILE).read_text().splitlines()) == 2
  monkeypatch.setattr(objectives, "build", lambda cfg: _gated_objective(cfg))
  resumed = train.train(cfg, tmp_path / "resumed")
  assert resumed["start_step"] == 4
  assert [json.loads(line) for line in
          (tmp_path / "resumed" / gates.LOG_FILE).read_text().splitlines()] == decisions
  assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "whole")
  _assert_same(_host(resumed["state"]), _host(whole["state"]))

  # the gated run's checkpoint (its anchor included) is read by evaluate
  capsys.readouterr()
  evaluate.main(["--workdir", str(tmp_path / "whole"), "--task", "probes", "--probes",
                 str(probes_file)])
  result = json.loads(capsys.readouterr().out)
  assert result["step"] == 9 and result["aggregate"]["probes"] == 2
  assert [p["kind"] for p in result["probes"]] == ["regex", "logprob"]
  written = list((tmp_path / "whole").glob("eval_probes-*.json"))
  assert len(written) == 1 and json.loads(written[0].read_text()) == result
  # the final state's probes score as its anchor's scores say
  last = decisions[-1]
  anchored = last["after" if last["accepted"] else "before"]
  assert result["aggregate"]["mean_logprob"] == pytest.approx(anchored["probe_logprob"],
                                                              rel=1e-6)
  assert result["aggregate"]["pass_rate"] == pytest.approx(anchored["probe_pass_rate"])
