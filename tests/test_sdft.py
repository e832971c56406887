"""SDFT: demonstrations data and its replay stream, the EMA teacher in the train step,
and ``python -m ttt_jax.sdft`` (full fine-tuning, LoRA, resume after SIGTERM, errors)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_util import copy_stdlib_corpus, read_metrics, tiny_overrides, train_losses
from ttt_jax import lora, runs, sharding, train
from ttt_jax.lora import files as lora_files
from ttt_jax.config import load_config, save_config
from ttt_jax.config.schema import SDFTConfig
from ttt_jax.errors import ConfigError, DataError
from ttt_jax.sdft import __main__ as sdft_cli
from ttt_jax.sdft import data, objective, teacher
from ttt_jax.training import gates, loop
from ttt_jax.training import state as state_lib
from ttt_jax.training import step as step_lib

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "sdft_tiny.yaml")


# ----------------------------------------------------------------------------- data


def _write_lines(path: Path, lines: list[str]) -> Path:
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "demonstration": "b"', "not a JSON object"),
    ('["prompt", "demonstration"]', "expected a JSON object with prompt and demonstration"),
    ('{"prompt": "a"}', "field 'demonstration' must be a string, it is missing"),
    ('{"prompt": 3, "demonstration": "b"}', "field 'prompt' must be a string, it is a int"),
])
def test_a_bad_line_is_a_one_line_error_naming_file_and_line(tmp_path, line, message):
  path = _write_lines(tmp_path / "demos.jsonl", [
      '{"prompt": "p", "demonstration": "d", "source": "x"}', "", line])
  with pytest.raises(DataError) as error:
    data.read_examples(path)
  assert str(error.value).startswith(f"{path}:3: {message}")
  assert "\n" not in str(error.value)


def test_examples_keep_their_lines_and_the_teacher_template_is_verbatim(tmp_path):
  path = _write_lines(tmp_path / "demos.jsonl", [
      json.dumps({"prompt": "What is {x}?", "demonstration": "It is 2.", "id": 7}), "",
      json.dumps({"prompt": "Q2", "demonstration": "D2"})])
  first, second = data.read_examples(path)
  assert (first.prompt, second.line) == ("What is {x}?", 3)
  assert data.teacher_text(first) == (
      "<Question>\nWhat is {x}?\n\nThis is an example for a response to the question:\n"
      "<Demonstration>\nIt is 2.\n\nNow answer with a response of your own, including the "
      "thinking process:\n")
  with pytest.raises(DataError, match="no examples"):
    data.read_examples(_write_lines(tmp_path / "empty.jsonl", ["", "  "]))


class CharTokenizer:
  """One id per character (3 + its code mod 100); pad 0."""
  pad_id, bos_id, eos_id = 0, 1, 2

  def encode_batch(self, texts):
    return [[3 + ord(c) % 100 for c in text] for text in texts]


def test_prompts_are_left_padded_and_overlong_ones_cut_from_the_left_or_refused(tmp_path):
  examples = [data.Example("abc", "x", 1), data.Example("abcdefgh", "y", 2)]
  cfg = SDFTConfig(prompt_width=5, teacher_width=400)
  logged = []
  encoded = data.encode(examples, CharTokenizer(), cfg, "d.jsonl", logged.append)
  ids = CharTokenizer().encode_batch(["abc", "abcdefgh"])
  np.testing.assert_array_equal(encoded.prompt, [[0, 0, *ids[0]], ids[1][-5:]])
  np.testing.assert_array_equal(encoded.prompt_lens, [3, 5])
  teacher_ids = CharTokenizer().encode_batch([data.teacher_text(examples[0])])[0]
  np.testing.assert_array_equal(encoded.teacher[0, -len(teacher_ids):], teacher_ids)
  assert encoded.teacher_lens[0] == len(teacher_ids) and not encoded.teacher[0, 0]
  assert logged == ["sdft: d.jsonl: kept the last tokens of 1 of 2 prompts "
                    "(sdft.prompt_width=5) and of 0 teacher prompts (sdft.teacher_width=400)"]
  with pytest.raises(DataError, match=r"^d.jsonl:2: the prompt has 8 tokens, more "
                                      r"than sdft.prompt_width=5"):
    data.encode(examples, CharTokenizer(), SDFTConfig(prompt_width=5, overlong="error"),
                "d.jsonl", logged.append)
  with pytest.raises(DataError, match=r"^d.jsonl:1: the prompt encodes to no tokens"):
    data.encode([data.Example("", "x", 1)], CharTokenizer(), cfg, "d.jsonl", logged.append)


def _encoded(n: int, offset: int = 0) -> data.Encoded:
  ids = np.arange(offset, offset + n, dtype=np.int32)
  return data.Encoded(ids[:, None], np.ones(n, np.int32), ids[:, None], np.ones(n, np.int32))


def test_replay_fraction_is_the_ratio_and_draws_come_from_the_capped_buffer():
  stream = data.Stream(_encoded(40), None, seed=3, batch_size=8, replay_ratio=0.2,
                       replay_buffer=30)
  draws = [stream.draws(step) for step in range(1250)]  # 10k slots
  replay = np.concatenate([d.replay for d in draws])
  assert abs(replay.mean() - 0.2) < 0.02
  assert not draws[0].replay.any()  # nothing trained on yet
  # a replayed slot holds an example of the last 30 positions before its micro-step
  fresh_at = {step * 8 + slot: int(d.fresh[slot]) for step, d in enumerate(draws)
              for slot in np.flatnonzero(~d.replay)}
  for step, d in enumerate(draws[5:], start=5):
    window = {stream.example_at(np.arange(step * 8 - 30, step * 8))[i] for i in range(30)}
    assert set(d.fresh[d.replay].tolist()) <= window
  # an epoch's fresh positions hold each example once
  first_epoch = [fresh_at[q] for q in range(40) if q in fresh_at]
  assert len(set(first_epoch)) == len(first_epoch)


def test_replay_of_an_earlier_file_draws_its_last_examples():
  stream = data.Stream(_encoded(10), _encoded(50, offset=100), seed=0, batch_size=8,
                       replay_ratio=0.5, replay_buffer=20)
  batches = [stream.batch(step) for step in range(200)]
  replay = np.concatenate([b["replay"] for b in batches]) == 1
  prompts = np.concatenate([b["prompt"][:, 0] for b in batches])
  assert abs(replay.mean() - 0.5) < 0.05 and replay[:8].any()
  assert set(prompts[replay].tolist()) <= set(range(130, 150))
  assert set(prompts[~replay].tolist()) <= set(range(10))


def test_draws_are_a_pure_function_of_seed_and_step_so_a_resume_draws_the_same():
  def stream(seed=1, **kw):
    return data.Stream(_encoded(13), None, seed=seed, batch_size=4, replay_ratio=0.2,
                       replay_buffer=50, **kw)

  whole_run = stream()
  uninterrupted = [next(whole_run) for _ in range(30)]
  first = stream()
  head = [next(first) for _ in range(12)]
  saved = json.dumps(first.get_state()).encode()  # as the checkpoint stores it
  resumed = stream()
  resumed.set_state(saved)
  tail = [next(resumed) for _ in range(18)]
  for a, b in zip(uninterrupted, head + tail, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert any((a["prompt"] != b["prompt"]).any()
             for a, b in zip(uninterrupted, [next(stream(seed=2)) for _ in range(30)]))
  # each process takes its slice of the global micro-batch
  halves = [stream(process_index=p, process_count=2).batch(7) for p in (0, 1)]
  whole = stream().batch(7)
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


# ----------------------------------------------------------------------------- teacher


def test_teacher_follows_the_ema_closed_form_and_decay_one_freezes_it():
  decay = 0.9
  rng = np.random.default_rng(0)
  params = [{"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)} for _ in range(5)]
  extras = {teacher.TEACHER: teacher.as_float32(params[0])}
  update = teacher.follow(decay)
  for p in params[1:]:
    extras = {**extras, **update(extras, p)}
  k = len(params) - 1
  want = decay**k * np.asarray(params[0]["w"], np.float64) + sum(
      (1 - decay) * decay**(k - i) * np.asarray(params[i]["w"], np.float64)
      for i in range(1, k + 1))
  np.testing.assert_allclose(np.asarray(extras[teacher.TEACHER]["w"]), want, rtol=1e-6)
  assert teacher.follow(1.0) is None


def _step_config(tmp_path: Path, *overrides: str):
  return load_config(CONFIG, [
      "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.ffn.d_ff=64",
      "mesh.num_devices=1", "mesh.fsdp=1", "train.batch_size=4", "optim.warmup_steps=0",
      "optim.lr=1e-2", "sdft.max_new_tokens=4", "sdft.prompt_width=6",
      "sdft.teacher_width=10", f"data.cache_dir={tmp_path}", *overrides])


def _run_steps(cfg, micro_steps: int):
  """The params and teacher after each micro-step of the SDFT train step on a random
  tiny model and batch."""
  mesh = sharding.make_mesh(cfg.mesh)
  built = state_lib.build(cfg, 50, mesh, extras_init=teacher.extras_init(cfg),
                          extras_shardings=teacher.extras_shardings)
  fresh = data.Encoded(*(np.asarray(a, np.int32) for a in (
      [[0, 0, 5, 6, 7, 8], [0, 0, 0, 9, 10, 11]] * 2, [4, 3] * 2,
      [[0, 12, 13, 14, 15, 16, 17, 18, 19, 20]] * 4, [9] * 4)))
  stream = data.Stream(fresh, None, seed=0, batch_size=cfg.train.batch_size //
                       cfg.optim.grad_accum_steps, replay_ratio=0.0, replay_buffer=1)
  step = step_lib.jit_train_step(
      built, objective.objective(cfg, objective.TokenIds(0, 1, 2)),
      batch_sharding={k: sharding.batch_sharding(mesh, v.ndim)
                      for k, v in stream.batch(0).items()})
  state = teacher.restart(built.state, built.state_shardings.extras[teacher.TEACHER])
  history = [(jax.device_get(state.params), jax.device_get(state.extras[teacher.TEACHER]))]
  for batch in [stream.batch(i) for i in range(micro_steps)]:
    state, metrics = step(state, sharding.put_batch(batch, mesh))
    assert np.isfinite(float(metrics["loss"]))
    history.append((jax.device_get(state.params), jax.device_get(state.extras[teacher.TEACHER])))
  return history


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_teacher_in_the_train_step_is_the_ema_of_each_optimizer_steps_params(tmp_path):
  decay = 0.8
  history = _run_steps(_step_config(tmp_path, f"sdft.teacher_decay={decay}",
                                    "optim.grad_accum_steps=2"), micro_steps=6)
  updates = [params for params, _ in history[::2]]  # after each optimizer step
  want = _leaves(updates[0])
  for params in updates[1:]:
    want = [decay * t + (1 - decay) * p for t, p in zip(want, _leaves(params))]
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(updates[0]), _leaves(updates[-1])))
  for got, expected in zip(_leaves(history[-1][1]), want):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  # between the micro-steps of one update the teacher stays put
  for a, b in zip(_leaves(history[1][1]), _leaves(history[0][1])):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_decay_one_keeps_the_teacher_bitwise_the_initial_model(tmp_path):
  history = _run_steps(_step_config(tmp_path, "sdft.teacher_decay=1"), micro_steps=3)
  initial = history[0][1]
  for a, b in zip(jax.tree.leaves(history[-1][1]), jax.tree.leaves(initial)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(a, b) for a, b in
             zip(_leaves(history[-1][0]), _leaves(history[0][0])))  # the student trained


@pytest.mark.slow
def test_sdft_steps_train_a_cct_model_on_its_left_padded_rollouts(tmp_path):
  """CCT decodes left-padded prompts, so the SDFT step samples and trains on a CCT
  student (fixed steps) and stays finite."""
  history = _run_steps(_step_config(tmp_path, "model.mixer={type: cct, d_summary: 8, "
                                    "step_len: 3}"), micro_steps=2)
  assert any(not np.array_equal(a, b) for a, b in
             zip(_leaves(history[-1][0]), _leaves(history[0][0])))
  assert all(np.isfinite(leaf).all() for leaf in _leaves(history[-1][0]))


# ----------------------------------------------------------------------------- command line


def _demos(path: Path, count: int = 12) -> Path:
  return _write_lines(path, [json.dumps({"prompt": f"def add_{i}(x):",
                                         "demonstration": f"    return x + {i}\n", "id": i})
                             for i in range(count)])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny trained run to fine-tune, its --set flags and a demonstrations file."""
  root = tmp_path_factory.mktemp("sdft")
  sets = tiny_overrides(copy_stdlib_corpus(root / "corpus"), root / "cache")
  train.train(load_config(None, [*sets, "train.steps=6", "train.eval_every=0"]), root / "base")
  return root, sets, _demos(root / "demos.jsonl")


def _args(base, workdir: Path, *overrides: str, init_from: bool = True,
          demos: Path | None = None) -> list[str]:
  root, sets, base_demos = base
  demos = demos or base_demos
  settings = [*sets, "sdft.max_new_tokens=6", "sdft.prompt_width=12", "sdft.teacher_width=80",
              "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep=2", *overrides]
  return ["--config", CONFIG, "--workdir", str(workdir), "--data", str(demos),
          *(["--init-from", str(root / "base")] if init_from else []),
          *[arg for value in settings for arg in ("--set", value)]]


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))
  return env


@pytest.mark.slow
def test_sigterm_and_rerun_resume_bit_exactly(base, tmp_path):
  """Full fine-tuning: interrupted by SIGTERM and rerun with the same command, the run
  has the per-step losses of an uninterrupted one; metrics hold the SDFT columns."""
  steps = "train.steps=150"
  reference = tmp_path / "reference"
  sdft_cli.main(_args(base, reference, steps))
  rows = [row for row in read_metrics(reference) if "loss" in row]
  assert len(rows) == 150
  for column in ("kl", "teacher_gain", "gen_len_mean", "gen_len_min", "gen_len_max",
                 "replay_fraction"):
    assert all(np.isfinite(row[column]) for row in rows), column
  assert all(row["kl"] == row["loss"] and 1 <= row["gen_len_min"] <= row["gen_len_mean"]
             <= row["gen_len_max"] <= 6 for row in rows)
  assert 0.1 < np.mean([row["replay_fraction"] for row in rows]) < 0.3

  workdir = tmp_path / "interrupted"
  command = [sys.executable, "-m", "ttt_jax.sdft", *_args(base, workdir, steps)]
  proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 300
  while not (workdir / "checkpoints" / "4").is_dir() and not any(
      p.name.isdigit() and int(p.name) > 4 for p in
      ((workdir / "checkpoints").iterdir() if (workdir / "checkpoints").is_dir() else ())):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.monotonic() < deadline, "no checkpoint appeared"
    time.sleep(0.02)
  assert proc.poll() is None, "the run finished before it could be interrupted"
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "received SIGTERM; saved a checkpoint at step" in err, err
  rerun = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from checkpoint at step" in rerun.stderr
  assert train_losses(workdir) == train_losses(reference)


@pytest.mark.slow
def test_resuming_on_other_demonstrations_is_refused_in_one_line(base, tmp_path, capsys):
  workdir = tmp_path / "run"
  sdft_cli.main(_args(base, workdir, "train.steps=2"))
  capsys.readouterr()
  other = _demos(tmp_path / "other.jsonl", count=5)
  with pytest.raises(SystemExit) as exit_info:
    sdft_cli.main(_args(base, workdir, "train.steps=3", demos=other))
  assert exit_info.value.code != 0
  err = capsys.readouterr().err.splitlines()[-1]
  assert err.startswith("error: sdft.data: the checkpoint's sample stream was made with "
                        "sdft.data=sha256:"), err


def _lora_sdft_config(base, *overrides: str):
  """A tiny LoRA (rank 4) SDFT run's config from the ``base`` fixture's run."""
  root, sets, demos = base
  return load_config(CONFIG, [*sets, "train.objective=sdft", f"sdft.data={demos}",
                              f"checkpoint.init_from={root / 'base'}", "lora.enabled=true",
                              "lora.rank=4", "train.eval_every=0", "sdft.max_new_tokens=6",
                              "sdft.prompt_width=12", "sdft.teacher_width=80",
                              "sdft.teacher_decay=0.5", *overrides])


@pytest.mark.slow
def test_lora_trains_the_adapters_and_their_ema_on_the_frozen_base(base, tmp_path):
  cfg = _lora_sdft_config(base, "train.steps=3", "gate.every=2",
                          "gate.max_eval_loss_increase=100")


  class Own(loop.Hook):  # a caller's hook, logging its rows beside the SDFT metrics
    def __init__(self, writer):
      self.writer = writer

    def due(self, info):
      return True

    def after_step(self, info):
      self.writer.write(info.step, {"own_hook": 1.0})

  summary = sdft_cli.sdft(cfg, tmp_path / "lora", extra_hooks=lambda writer, log: [Own(writer)])
  rows = read_metrics(tmp_path / "lora")
  assert [row["step"] for row in rows if "own_hook" in row] == [1, 2, 3]
  # gate.every gates SDFT blocks as it does a train run's (the last step ends one)
  assert [(row["step"], row["gate_accepted"]) for row in rows if "gate_accepted" in row] == [
      (2, 1.0), (3, 1.0)]
  state = summary["state"]
  assert all(np.isfinite(loss) for loss in summary["losses"].values())
  adapters, ema = state.params, state.extras[teacher.TEACHER]
  assert jax.tree.structure(adapters) == jax.tree.structure(ema)
  assert all(e.dtype == jnp.float32 for e in jax.tree.leaves(ema))
  # the EMA (decay 0.5) moved from the fresh adapters (B = 0) towards the trained ones
  b_ema = [np.asarray(x) for path, x in jax.tree.flatten_with_path(ema)[0]
           if path[-1] == jax.tree_util.DictKey("b")]
  assert b_ema and any(np.abs(b).max() > 0 for b in b_ema)
  assert any(not np.array_equal(np.asarray(a), np.asarray(e))
             for a, e in zip(jax.tree.leaves(adapters), jax.tree.leaves(ema)))
  assert "lora_base" in state.extras  # the frozen base the adapters and the teacher share
  # generation and evaluation load the run (its train state has the teacher)
  loaded_cfg, _, params, step, _ = runs.load_trained(tmp_path / "lora", log=lambda _: None)
  assert step == 3 and loaded_cfg.train.objective == "sdft"
  for a, b in zip(jax.tree.leaves(params),
                  jax.tree.leaves(step_lib.model_params(cfg, state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Snapshots(loop.Hook):
  """Host copies of the params, optimizer state and teacher at the start and after
  every step (after the gate's decision: extra hooks run after it)."""

  def __init__(self):
    self.states = {}

  def _take(self, info):
    self.states[info.step] = jax.device_get(
        (info.state.params, info.state.opt_state, info.state.extras[teacher.TEACHER]))

  def start(self, info):
    self._take(info)

  def due(self, info):
    return True

  def after_step(self, info):
    self._take(info)


class _Noise(loop.Hook):
  """Adds 0.5 to every param after each block's first step (a damaging update)."""

  def due(self, info):
    return info.step % 2 == 1

  def after_step(self, info):
    return info.state._replace(params=jax.tree.map(lambda p: p + 0.5, info.state.params))


@pytest.mark.slow
def test_a_rejected_sdft_block_restores_params_optimizer_and_teacher_bit_for_bit(
    base, tmp_path):
  """A hook that adds 0.5 to every param at each block's first step makes the block's
  eval loss rise, so the gate rejects it: each block's end is the run's start again,
  teacher included."""
  root, sets, demos = base
  cfg = load_config(CONFIG, [*sets, "train.objective=sdft", f"sdft.data={demos}",
                             f"checkpoint.init_from={root / 'base'}", "train.steps=4",
                             "train.eval_every=0", "sdft.max_new_tokens=6",
                             "sdft.prompt_width=12", "sdft.teacher_width=80",
                             "sdft.teacher_decay=0.5", "gate.every=2",
                             "optim.warmup_steps=0"])
  snapshots = _Snapshots()
  sdft_cli.sdft(cfg, tmp_path / "gated",
                extra_hooks=lambda writer, log: [_Noise(), snapshots])
  decisions = [json.loads(line) for line in (tmp_path / "gated" / "gates.jsonl").read_text()
               .splitlines()]
  assert [(d["step"], d["accepted"]) for d in decisions] == [(2, False), (4, False)]
  start = jax.tree.leaves(snapshots.states[0])
  for step in (1, 3):  # inside a block the params, optimizer state and teacher moved
    moved = jax.tree.leaves(snapshots.states[step])
    for part in range(3):
      assert any(not np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(snapshots.states[0][part]),
          jax.tree.leaves(snapshots.states[step][part]))), (step, part)
    assert len(moved) == len(start)
  for step in (2, 4):  # a rejected block's end is the start, bit for bit
    for a, b in zip(start, jax.tree.leaves(snapshots.states[step])):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_merging_an_sdft_lora_run_folds_its_teacher_into_the_base(base, tmp_path):
  """``lora merge`` of a gated SDFT adapter run: an ordinary run whose params are the
  merged student and whose teacher is the EMA adapters folded into the base, as full
  fine-tuning keeps it, with gating off and no gated block's start; it loads like any
  run."""
  cfg = _lora_sdft_config(base, "train.steps=2", "optim.warmup_steps=0", "gate.every=1")
  state = sdft_cli.sdft(cfg, tmp_path / "lora")["state"]
  assert gates.GATE in state.extras
  lora_files.merge_run(tmp_path / "lora", tmp_path / "merged", log=lambda _: None)
  merged_cfg, _, restored, _ = runs.restore_newest(tmp_path / "merged", log=lambda _: None)
  assert not merged_cfg.lora.enabled and lora.BASE not in restored.state.extras
  assert not merged_cfg.gate.every and gates.GATE not in restored.state.extras
  want_teacher = lora.merge(state.extras[lora.BASE], state.extras[teacher.TEACHER], cfg.lora)
  got_teacher = restored.state.extras[teacher.TEACHER]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got_teacher))
  for a, b in zip(jax.tree.leaves(got_teacher), jax.tree.leaves(want_teacher)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))
  for a, b in zip(jax.tree.leaves(restored.state.params),
                  jax.tree.leaves(step_lib.model_params(cfg, state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree.leaves(got_teacher), jax.tree.leaves(restored.state.params)))


def test_command_line_errors_are_one_line(tmp_path, capsys):
  bad = _write_lines(tmp_path / "bad.jsonl", [
      json.dumps({"prompt": "p", "demonstration": "d"}), '{"prompt": "q", "demonstration": 5}'])
  runs_args = ["--config", CONFIG, "--workdir", str(tmp_path / "w"), "--init-from",
               str(tmp_path / "base")]
  for args, message in (
      ([*runs_args, "--data", str(bad)],
       f"error: {bad}:2: field 'demonstration' must be a string, it is a int"),
      (runs_args, "error: --data: give the demonstrations file (sdft.data)"),
      ([*runs_args[:4], "--data", str(bad)],
       f"error: --init-from: {tmp_path / 'w'} has no checkpoint to resume"),
      ([*runs_args, "--data", str(bad), "--set", "sdft.divergence=kl"],
       "error: sdft.divergence: 'kl' is not one of ['reverse', 'forward', 'jsd']")):
    with pytest.raises(SystemExit) as exit_info:
      sdft_cli.main(args)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_config_checks_of_the_sdft_section():
  for overrides, message in (
      (["sdft.replay_ratio=1"], "sdft.replay_ratio: must be in [0, 1)"),
      (["sdft.teacher_decay=1.5"], "sdft.teacher_decay: must be in [0, 1]"),
      (["sdft.skip_first=64"], "sdft.skip_first: 64 leaves none"),
      (["sdft.top_p=0"], "sdft.top_p: must be in (0, 1]"),
      (["quant.qat_lr_ratio=0.5"], "quant.qat_lr_ratio: late QAT is not supported")):
    with pytest.raises(ConfigError) as error:
      load_config(CONFIG, overrides)
    assert str(error.value).startswith(message)
  assert load_config(CONFIG, ["sdft.teacher_decay=1"]).sdft.teacher_decay == 1.0


CCT = "model.mixer={type: cct, d_summary: 8, step_len: 16}"
SEMANTIC = ("data.step_boundaries=semantic", "data.step_len=16", "data.step_min_len=4")


def test_a_base_whose_cct_steps_the_run_would_not_read_is_refused_in_one_line(tmp_path):
  """SDFT reads a CCT base's steps as its config says (semantic: the rule, on device;
  else fixed): a base trained otherwise is refused before anything is prepared, naming
  the settings to give."""
  base = tmp_path / "base"
  (base / "checkpoints").mkdir(parents=True)
  demos = _write_lines(tmp_path / "demos.jsonl",
                       [json.dumps({"prompt": "p", "demonstration": "d"})])

  def run_config(*overrides: str):
    return load_config(CONFIG, [CCT, "train.objective=sdft", f"sdft.data={demos}",
                                f"checkpoint.init_from={base}", *overrides])

  save_config(load_config(None, [CCT, *SEMANTIC]), base / "config.yaml")
  with pytest.raises(ConfigError) as error:
    sdft_cli.sdft(run_config(), tmp_path / "w")
  assert str(error.value).startswith(f"--init-from: {base} was trained with CCT steps")
  assert str(error.value).endswith("give --set data.step_boundaries=semantic "
                                   "--set data.step_len=16 --set data.step_min_len=4")
  assert not (tmp_path / "w").exists()
  with pytest.raises(ConfigError, match="data.step_min_len=4"):
    sdft_cli.check_base_steps(base, run_config(*SEMANTIC[:2], "data.step_min_len=5"))
  sdft_cli.check_base_steps(base, run_config(*SEMANTIC))
  save_config(load_config(None, [CCT, "data.step_boundaries=fixed", "data.step_len=16"]),
              base / "config.yaml")
  sdft_cli.check_base_steps(base, run_config())  # fixed steps are read without settings
  with pytest.raises(ConfigError, match="give --set data.step_boundaries=none$"):
    sdft_cli.check_base_steps(base, run_config(*SEMANTIC))
  save_config(load_config(None, [*SEMANTIC]), base / "config.yaml")  # no CCT: no steps
  sdft_cli.check_base_steps(base, load_config(CONFIG, []))


def test_cct_rows_longer_than_the_summary_slots_hold_are_refused_in_one_line(tmp_path):
  """A CCT forward gives the steps past model.mixer.max_steps no summary, where decoding
  reads one: a starting SDFT run's rows (the teacher's, 160 + 32 tokens here) must fit
  the slots, counted in the shortest steps the run's rule makes."""
  slots = "model.mixer={type: cct, d_summary: 8, step_len: 16, max_steps: %d}"
  demos = _write_lines(tmp_path / "demos.jsonl",
                       [json.dumps({"prompt": "p", "demonstration": "d"})])
  cfg = load_config(CONFIG, [slots % 11, "train.objective=sdft", f"sdft.data={demos}",
                             f"checkpoint.init_from={tmp_path / 'base'}"])
  with pytest.raises(ConfigError) as error:
    sdft_cli.sdft(cfg, tmp_path / "w")
  assert str(error.value).startswith(
      "model.mixer.max_steps: 11 summary slots hold rows of up to 176 tokens (steps of "
      ">= 16), but SDFT rows have up to 192 (max(sdft.prompt_width, sdft.teacher_width) "
      "+ sdft.max_new_tokens)")
  assert str(error.value).endswith("--set model.mixer.max_steps=12 (it sizes buffers only) "
                                   "or make the rows shorter")
  assert not (tmp_path / "w").exists()
  check = objective.check_summary_slots
  check(load_config(CONFIG, [slots % 11, "sdft.teacher_width=144"]))
  check(load_config(CONFIG, [slots % 12]))
  check(load_config(CONFIG, [CCT]))  # no max_steps: a slot per token
  with pytest.raises(ConfigError, match=r"up to 48 tokens \(steps of >= 4\)"):
    check(load_config(CONFIG, [slots % 12, *SEMANTIC]))
  check(load_config(CONFIG, [slots % 48, *SEMANTIC]))


@pytest.mark.slow
def test_sdft_fine_tunes_a_cct_run_trained_with_semantic_steps(base, tmp_path):
  """A CCT run trained with semantic steps: SDFT samples and scores it with its step
  rule, trains, and a rerun of the same command resumes with the same losses."""
  root, sets, _ = base
  cct_sets = [*sets, CCT, *SEMANTIC, "train.objective=cct"]
  train.train(load_config(None, [*cct_sets, "train.steps=4", "train.eval_every=0"]),
              root / "cct_base")
  settings = [CCT, *SEMANTIC, "sdft.max_new_tokens=12", "train.steps=4"]
  args = [*_args(base, tmp_path / "run", *settings)]
  args[args.index(str(root / "base"))] = str(root / "cct_base")
  sdft_cli.main(args)
  rows = [row for row in read_metrics(tmp_path / "run") if "loss" in row]
  assert len(rows) == 4 and all(np.isfinite(row["kl"]) and row["kl"] > 0 for row in rows)
  reference = train_losses(tmp_path / "run")
  for steps in ("train.stop_after=2", "train.stop_after=0"):  # stopped at 2, then resumed
    args = [*_args(base, tmp_path / "resumed", *settings, steps)]
    args[args.index(str(root / "base"))] = str(root / "cct_base")
    sdft_cli.main(args)
  assert train_losses(tmp_path / "resumed") == reference