"""The Trainer as a library: its order of dispatches, reads and hooks; a custom objective
that reads the state's extra trees through the step context and a custom hook; extra
trees sharded, checkpointed and restored bit-exactly."""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax import checkpoint as ckpt_lib
from ttt_jax import metrics as metrics_lib
from ttt_jax import sharding
from ttt_jax.training import objectives
from ttt_jax.config import load_config
from ttt_jax.errors import ConfigError
from ttt_jax.models import lm
from ttt_jax.training import loop
from ttt_jax.training import state as state_lib
from ttt_jax.training import step as step_lib

TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.ffn.d_ff=64",
        "data.seq_len=16", "data.vocab_size=64", "train.batch_size=4", "train.steps=8",
        "mesh.num_devices=2", "mesh.fsdp=2", "optim.name=sgd", "optim.lr=0.5",
        "optim.schedule=constant", "optim.warmup_steps=0", "optim.momentum=0",
        "optim.weight_decay=0", "optim.clip_norm=0"]


class Recorder(loop.Hook):
  """Records when the loop calls it; ``after_step`` at step ``at``."""

  def __init__(self, events: list, at: int):
    self.events, self.at = events, at

  def start(self, info: loop.StepInfo) -> None:
    self.events.append(("start", info.step))

  def on_metrics(self, info: loop.StepInfo) -> None:
    assert info.state is None
    self.events.append(("read", info.step, info.metrics["loss"]))

  def due(self, info: loop.StepInfo) -> bool:
    return info.step == self.at

  def after_step(self, info: loop.StepInfo) -> None:
    self.events.append(("after", info.step, info.metrics["loss"], int(info.state)))

  def close(self) -> None:
    self.events.append(("close",))


def test_step_t_is_read_after_step_t_plus_1_is_dispatched_unless_a_hook_is_due():
  events: list[Any] = []

  def step_fn(state, batch):  # one micro-batch: the state counts them
    events.append(("micro", batch))
    return state + 1, {"loss": jnp.asarray(batch, jnp.float32)}

  trainer = loop.Trainer(step_fn, iter(float(i) for i in range(100)), micro_steps=2)
  trainer.add(Recorder(events, at=3))
  finished = trainer.run(jnp.int32(0), 0, 5)
  assert (finished.step, int(finished.state)) == (5, 10)
  # step t trains on micro-batches 2t-2 and 2t-1; its loss is their mean, 2t - 1.5
  assert events == [
      ("start", 0), ("micro", 0.0), ("micro", 1.0),
      ("micro", 2.0), ("micro", 3.0), ("read", 1, 0.5),
      ("micro", 4.0), ("micro", 5.0), ("read", 2, 2.5), ("read", 3, 4.5), ("after", 3, 4.5, 6),
      ("micro", 6.0), ("micro", 7.0),
      ("micro", 8.0), ("micro", 9.0), ("read", 4, 6.5), ("read", 5, 8.5), ("close",)]


def test_a_stop_request_ends_the_loop_after_that_step_s_hooks():
  trainer = loop.Trainer(lambda s, b: (s + 1, {"loss": jnp.float32(b)}), iter(range(100)))
  steps = []
  trainer.add_hook(lambda info: trainer.request_stop("enough"), every=4)
  trainer.add_hook(lambda info: steps.append((info.step, info.stop_reason)), every=2)
  assert trainer.run(jnp.int32(0), 0, 10).step == 4
  assert steps == [(2, None), (4, "enough")]
  with pytest.raises(ValueError, match="every: must be >= 1"):
    trainer.add_hook(print, every=0)


def test_hooks_hear_of_a_stop_requested_while_the_step_s_hooks_ran():
  """A stop that arrives during a hook that already ran at this step (a signal during a
  regular checkpoint's save) is still announced to every hook, once."""

  class Recorder(loop.Hook):
    def __init__(self):
      self.saved, self.stops = [], []

    def due(self, info):
      return info.step % 2 == 0 or info.stop_reason is not None

    def after_step(self, info):
      self.saved.append(info.step)
      trainer.request_stop("SIGTERM")  # arrives while this hook runs

    def stopped(self, info):
      self.stops.append((info.step, info.stop_reason))

  trainer = loop.Trainer(lambda s, b: (s + 1, {"loss": jnp.float32(b)}), iter(range(100)))
  recorder = Recorder()
  trainer.add(recorder)
  assert trainer.run(jnp.int32(0), 0, 10).step == 2
  assert recorder.saved == [2]  # not saved twice
  assert recorder.stops == [(2, "SIGTERM")]


def test_a_hook_may_replace_the_state_and_the_loop_goes_on_from_it():
  """``start`` and ``after_step`` return a replacement (None: keep); later hooks see it
  and the next step is dispatched from it; a function of ``add_hook`` replaces nothing."""

  class Replace(loop.Hook):
    def start(self, info):
      return info.state + 100

    def due(self, info):
      return info.step in (2, 3)

    def after_step(self, info):
      return jnp.int32(0) if info.step == 2 else None

  trainer = loop.Trainer(lambda s, b: (s + 1, {"loss": jnp.float32(b)}), iter(range(100)))
  seen = []
  trainer.add(Replace())
  trainer.add_hook(lambda info: info.state + 1000, every=1)  # its value is not a state
  trainer.add_hook(lambda info: seen.append((info.step, int(info.state))), every=1)
  finished = trainer.run(jnp.int32(0), 0, 4)
  assert seen == [(1, 101), (2, 0), (3, 1), (4, 2)]
  assert (finished.step, int(finished.state)) == (4, 2)


class Batches:
  """Endless random token batches on the mesh, with a checkpointable position."""

  def __init__(self, cfg, mesh):
    self.cfg, self.mesh, self.index = cfg, mesh, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    rng = np.random.default_rng(self.index)
    self.index += 1
    tokens = rng.integers(0, self.cfg.data.vocab_size,
                          (self.cfg.train.batch_size, self.cfg.data.seq_len + 1), np.int32)
    return sharding.put_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, self.mesh)

  def get_state(self) -> dict[str, int]:
    return {"next_index": self.index}


def anchored_lm(model: lm.LM, batch: dict[str, jax.Array], ctx: objectives.StepContext):
  """Cross-entropy + l2 * ||params - anchor||^2, both read from ``ctx.extras``: the form
  of a loss against reference params (a teacher, a pretrained model)."""
  logits = objectives.batch_logits(model, batch)
  ce, _, _ = lm.cross_entropy_loss(logits, batch["targets"])
  distance = sum(jnp.sum(jnp.square(p - a)) for p, a in
                 zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(ctx.extras["anchor"])))
  return ce + ctx.extras["l2"] * distance, {"ce": ce, "distance": distance}


def build_anchored(cfg, mesh, l2: float) -> state_lib.Built:
  """A train state whose extras hold the initial params ('anchor') and the weight 'l2'."""
  replicated = sharding.replicated(mesh)
  return state_lib.build(cfg, cfg.data.vocab_size, mesh,
                         extras_init=lambda params: {"anchor": params, "l2": jnp.float32(l2)},
                         extras_shardings=lambda params: {"anchor": params, "l2": replicated})


@pytest.mark.slow
def test_a_custom_objective_reads_extras_and_a_custom_hook_runs_every_n_steps():
  cfg = load_config(None, TINY)
  mesh = sharding.make_mesh(cfg.mesh)
  distances = {}
  for l2 in (0.0, 1.0):  # one jitted step serves both: l2 is a traced leaf of the state
    built = build_anchored(cfg, mesh, l2)
    initial = jax.device_get(built.state.params)
    step_fn = step_lib.jit_train_step(built, anchored_lm)
    trainer = loop.Trainer(step_fn, Batches(cfg, mesh))
    seen = []
    trainer.add(loop.NanGuard())
    trainer.add_hook(lambda info: seen.append((info.step, dict(info.metrics))), every=3)
    finished = trainer.run(built.state, 0, 7)
    assert finished.step == 7 and int(finished.state.step) == 7
    assert [step for step, _ in seen] == [3, 6]
    assert set(seen[0][1]) == {"loss", "grad_norm", "finite_state", "ce", "distance"}
    distances[l2] = seen[1][1]["distance"]
    # the step carries the extras through unchanged: the anchor is still the initial params
    for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(finished.state.extras["anchor"])):
      np.testing.assert_array_equal(a, np.asarray(b))
  assert distances[0.0] > 0.0
  assert distances[1.0] < 0.5 * distances[0.0]  # the penalty holds the params near it


def test_extra_trees_are_sharded_checkpointed_and_restored_bit_exactly(tmp_path):
  cfg = load_config(None, TINY)
  mesh = sharding.make_mesh(cfg.mesh)
  built = build_anchored(cfg, mesh, 0.5)
  anchor_shardings = built.state_shardings.extras["anchor"]
  assert jax.tree.leaves(anchor_shardings) == jax.tree.leaves(built.state_shardings.params)
  assert not all(s.is_fully_replicated for s in jax.tree.leaves(anchor_shardings))
  for leaf, expected in zip(jax.tree.leaves(built.state.extras["anchor"]),
                            jax.tree.leaves(anchor_shardings)):
    assert leaf.sharding == expected

  batches = Batches(cfg, mesh)
  trainer = loop.Trainer(step_lib.jit_train_step(built, anchored_lm), batches)
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2, async_save=True)
  trainer.add(loop.Checkpoint(ckpt, batches, {"process_count": 1}, every=0, log=print))
  trainer.add_hook(lambda info: trainer.request_stop("test"), every=3)
  finished = trainer.run(built.state, 0, 8)
  ckpt.close()
  assert finished.step == 3 and ckpt.all_steps() == [3]

  extras = jax.eval_shape(lambda: finished.state.extras)
  _, _, abstract, shardings = state_lib.abstract_state(
      cfg, cfg.data.vocab_size, mesh, extras, built.state_shardings.extras)
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2)
  try:
    restored = ckpt.restore(3, ckpt_lib.with_shardings(abstract, shardings), None).state
  finally:
    ckpt.close()
  position = json.loads((tmp_path / "3" / "data" / "process_0-of-1.json").read_text())
  assert position == {"next_index": batches.index} == {"next_index": 3}
  assert set(restored.extras) == {"anchor", "l2"}
  for a, b in zip(jax.tree.leaves(finished.state), jax.tree.leaves(restored)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_all_finite_is_one_scalar_that_one_nan_leaf_makes_false():
  tree = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4, jnp.bfloat16), "count": jnp.int32(7),
          "nested": [jnp.arange(5.0), {"m": jnp.full((2, 2), 1e30)}]}
  finite = jax.jit(step_lib.all_finite)(tree)
  assert finite.shape == () and finite.dtype == jnp.bool_ and bool(finite)
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    broken = {**tree, "nested": [tree["nested"][0].at[3].set(bad), tree["nested"][1]]}
    assert not bool(jax.jit(step_lib.all_finite)(broken))
  # the whole check compiles to one program with one scalar output: no per-array sync
  lowered = jax.jit(step_lib.all_finite).lower(tree)
  assert len(jax.tree.leaves(lowered.out_info)) == 1


def nonfinite_step(bad_steps: set[int]):
  """A step_fn on an int state: the state after step t is non-finite for t in bad_steps
  (its loss stays finite, as in the issue's repro)."""
  def step_fn(state, batch):
    del batch
    step = int(state) + 1
    return state + 1, {"loss": jnp.float32(5.0), "grad_norm": jnp.float32(
        jnp.nan if step in bad_steps else 1.0),
        "finite_state": jnp.float32(step not in bad_steps)}
  return step_fn


class FakeCheckpointer:
  """Records the steps saved; ``all_steps`` as orbax's would list them."""

  def __init__(self, steps=()):
    self.steps = list(steps)

  def all_steps(self):
    return list(self.steps)

  def save(self, step, state, data_iter, meta):
    self.steps.append(step)


@pytest.mark.parametrize("bad_step", [1, 3, 4, 5])
def test_a_non_finite_state_stops_the_run_before_its_checkpoint(bad_step):
  """Finite loss, non-finite updated state (the issue's finding 1): the guard stops at
  that step, naming the newest checkpoint, and no checkpoint of that state is saved,
  even at the run's last step or with every=1."""
  ckpt = FakeCheckpointer([0] if bad_step == 1 else [])
  trainer = loop.Trainer(nonfinite_step({bad_step}), iter(range(100)))
  checkpoint = loop.Checkpoint(ckpt, None, {}, every=1, log=print)
  trainer.add(loop.NanGuard(newest_checkpoint=checkpoint.newest))
  trainer.add(checkpoint)
  with pytest.raises(loop.TrainingError) as error:
    trainer.run(jnp.int32(0), 0, 5)
  newest = bad_step - 1
  assert str(error.value) == (
      f"non-finite train state at step {bad_step} (loss 5, grad_norm nan); stopping; the "
      f"newest checkpoint, step {newest}, is finite: rerun to resume from it")
  assert ckpt.steps == ([0] if bad_step == 1 else list(range(1, bad_step)))


def test_without_a_checkpoint_the_guard_says_so_and_a_nan_loss_stops_too():
  def step_fn(state, batch):
    return state + 1, {"loss": jnp.float32(jnp.nan), "grad_norm": jnp.float32(1.0),
                       "finite_state": jnp.float32(1.0)}

  trainer = loop.Trainer(step_fn, iter(range(100)))
  checkpoint = loop.Checkpoint(FakeCheckpointer(), None, {}, every=5, log=print)
  trainer.add(loop.NanGuard(newest_checkpoint=checkpoint.newest))
  trainer.add(checkpoint)
  with pytest.raises(loop.TrainingError, match=r"^non-finite loss at step 1 \(loss nan, "
                                               r"grad_norm 1\); stopping; no checkpoint"):
    trainer.run(jnp.int32(0), 0, 5)
  # with skip the step dropped the update itself: a non-finite loss alone does not stop
  trainer = loop.Trainer(step_fn, iter(range(100)))
  trainer.add(loop.NanGuard(skip=True))
  assert trainer.run(jnp.int32(0), 0, 3).step == 3


def test_the_checkpoint_hook_refuses_a_state_not_known_to_be_finite():
  """Defence in depth: without the guard, the checkpoint hook still never saves it."""
  ckpt = FakeCheckpointer()
  trainer = loop.Trainer(nonfinite_step({2}), iter(range(100)))
  trainer.add(loop.Checkpoint(ckpt, None, {}, every=1, log=print))
  with pytest.raises(loop.TrainingError, match="step 2: refusing to save a checkpoint"):
    trainer.run(jnp.int32(0), 0, 5)
  assert ckpt.steps == [1]


@pytest.mark.slow
def test_the_train_step_reports_the_updated_state_s_finiteness():
  cfg = load_config(None, TINY)
  mesh = sharding.make_mesh(cfg.mesh)
  built = state_lib.build(cfg, cfg.data.vocab_size, mesh)
  step_fn = step_lib.jit_train_step(built)
  batch = next(Batches(cfg, mesh))
  state, metrics = step_fn(built.state, batch)
  assert float(metrics["finite_state"]) == 1.0 and "skipped_steps" not in metrics
  # a NaN in one parameter leaf: the loss goes NaN, and the state it returns is flagged
  leaves, treedef = jax.tree.flatten(state.params)
  leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(jnp.nan)
  state = state._replace(params=jax.tree.unflatten(treedef, leaves))
  _, metrics = step_fn(state, batch)
  assert float(metrics["finite_state"]) == 0.0


def nan_at_step(step: int) -> objectives.Objective:
  """The LM loss, times NaN at optimizer step ``step``: a NaN loss and NaN gradients."""
  def objective(model, batch, ctx):
    logits = objectives.batch_logits(model, batch)
    ce, _, _ = lm.cross_entropy_loss(logits, batch["targets"])
    return ce * jnp.where(ctx.step == step, jnp.nan, 1.0), {}
  return objective


@pytest.mark.slow
def test_skip_drops_a_non_finite_update_counts_it_and_advances_the_step(tmp_path):
  cfg = load_config(None, TINY + ["train.nonfinite=skip"])
  mesh = sharding.make_mesh(cfg.mesh)
  built = state_lib.build(
      cfg, cfg.data.vocab_size, mesh, extras_init=lambda params: step_lib.skip_extras(cfg),
      extras_shardings={"skipped_steps": sharding.replicated(mesh)})
  step_fn = step_lib.jit_train_step(built, nan_at_step(1))
  batches = Batches(cfg, mesh)
  state, metrics = step_fn(built.state, next(batches))
  assert float(metrics["skipped_steps"]) == 0 and float(metrics["finite_state"]) == 1.0
  before = jax.device_get(state)
  skipped, metrics = step_fn(state, next(batches))
  assert math.isnan(float(metrics["loss"])) and math.isnan(float(metrics["grad_norm"]))
  assert float(metrics["finite_state"]) == 1.0 and float(metrics["skipped_steps"]) == 1
  assert int(skipped.step) == 2 and int(skipped.extras["skipped_steps"]) == 1
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves((skipped.params, skipped.opt_state))):
    np.testing.assert_array_equal(a, np.asarray(b))
  after, metrics = step_fn(skipped, next(batches))  # training goes on from the kept state
  assert float(metrics["skipped_steps"]) == 1 and math.isfinite(float(metrics["loss"]))
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)))
  # the count is part of the checkpointed state: saved and restored bit-exactly
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2, async_save=False)
  try:
    ckpt.save(3, after, batches, {"process_count": 1})
    restored = ckpt.restore(3, ckpt_lib.with_shardings(after, built.state_shardings),
                            None).state
  finally:
    ckpt.close()
  assert int(restored.extras["skipped_steps"]) == 1
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_skip_needs_no_gradient_accumulation():
  with pytest.raises(ConfigError, match=r"^train.nonfinite: 'skip' drops"):
    load_config(None, TINY + ["train.nonfinite=skip", "optim.grad_accum_steps=2"])
  with pytest.raises(ConfigError, match=r"train.nonfinite: 'drop' is not one of"):
    load_config(None, TINY + ["train.nonfinite=drop"])


def test_console_modes_put_plain_lines_where_a_bar_cannot_be_read():
  # (progress_bar, plain, terminal) -> (bar, plain lines)
  table = {
      (True, "auto", True): (True, False), (True, "auto", False): (False, True),
      (False, "auto", True): (False, True), (False, "auto", False): (False, True),
      (True, "always", True): (True, True), (True, "always", False): (True, True),
      (True, "never", False): (True, False), (False, "never", True): (False, False)}
  for args, modes in table.items():
    assert loop.console_modes(*args) == modes, args
  with pytest.raises(ConfigError, match=r"logging.plain: 'sometimes' is not one of"):
    load_config(None, ["logging.plain=sometimes"])


def counting_step(state, batch):
  return state + 1, {"loss": jnp.float32(5.0 - 0.1 * batch), "grad_norm": jnp.float32(0.5)}


def test_metric_rows_and_evals_reach_stderr_as_plain_lines(tmp_path, capsys):
  trainer = loop.Trainer(counting_step, iter(range(100)))
  writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False, enabled=True)
  progress = trainer.add(loop.Progress(False, 5))
  trainer.add(loop.MetricsLog(writer, trainer.clock, log_every=2, final_step=5,
                              lr_by_step=np.full(5, 1e-3), tokens_per_step=1000,
                              flops_per_step=1e9, peak_flops=1e12, echo=progress.write))
  trainer.add(loop.Evaluation(lambda state: {"eval_loss": 4.0, "eval_bpb": 1.5}, writer,
                              every=5, final_step=5, log=progress.write))
  trainer.run(jnp.int32(0), 0, 5)
  out, err = capsys.readouterr()
  assert out == "" and "\r" not in err
  lines = err.splitlines()
  assert [line.split(" loss ")[0] for line in lines] == [
      "eval step 0/5", "step 2/5", "step 4/5", "step 5/5", "eval step 5/5"]
  assert lines[1].startswith("step 2/5 loss 4.900 lr 1.0e-03 gnorm 0.500 tok/s ")
  assert " mfu " in lines[1] and " eta " in lines[1]
  assert lines[-1] == "eval step 5/5 loss 4.000 bpb 1.500"
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4, 5]  # the same rows as the file


def test_without_echo_the_metrics_log_prints_nothing(tmp_path, capsys):
  trainer = loop.Trainer(counting_step, iter(range(100)))
  writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False, enabled=True)
  trainer.add(loop.MetricsLog(writer, trainer.clock, log_every=1, final_step=3,
                              lr_by_step=np.full(3, 1e-3), tokens_per_step=1000,
                              flops_per_step=1e9, peak_flops=1e12))
  trainer.run(jnp.int32(0), 0, 3)
  assert capsys.readouterr() == ("", "")


def test_a_stop_request_says_how_to_continue(capsys):
  trainer = loop.Trainer(counting_step, iter(range(100)))
  trainer.add_hook(lambda info: trainer.request_stop("SIGTERM"), every=3)
  trainer.add(loop.Checkpoint(FakeCheckpointer(), None, {}, every=0, log=loop.console))
  assert trainer.run(jnp.int32(0), 0, 10).step == 3
  assert capsys.readouterr().err == (
      "received SIGTERM; saved a checkpoint at step 3 and stopped; rerun the same command "
      "to continue\n")
