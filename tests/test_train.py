"""``python -m ttt_jax.train`` on small real text: learning, determinism, resume, errors,
and the run it leaves for sampling and evaluation."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import textwrap
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax import checkpoint as ckpt_lib
from ttt_jax import evaluate as evaluate_cli
from ttt_jax import generate, runs, sharding, train
from ttt_jax.data import tokenizer as tokenizer_lib
from ttt_jax.errors import ConfigError, TrainingError
from ttt_jax.eval import lm as eval_lm
from ttt_jax.inference import sampling
from ttt_jax.training import objectives
from ttt_jax.training import state as state_lib
from ttt_jax.training import step as step_lib
from ttt_jax.training.step import train_flops_per_step
from train_util import (copy_stdlib_corpus, eval_losses, read_metrics, tiny_config,
                        tiny_overrides, train_losses)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  return copy_stdlib_corpus(root / "src"), root / "cache"


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  """One 60-step run: (config, workdir, summary)."""
  workdir = tmp_path_factory.mktemp("run")
  cfg = tiny_config(*corpus)
  return cfg, workdir, train.train(cfg, workdir)


def params_of(summary) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(summary["state"].params)]


@pytest.mark.slow
def test_loss_goes_down_on_real_text(trained):
  cfg, workdir, _ = trained
  evals = eval_losses(workdir)
  assert sorted(evals) == [0, 30, 60]
  assert evals[0] > 0.95 * math.log(cfg.data.vocab_size)  # untrained: about uniform
  assert evals[60] < evals[0] - 1.0
  losses = train_losses(workdir)
  assert np.mean([losses[s] for s in range(56, 61)]) < np.mean([losses[s] for s in range(1, 6)]) - 1.0


@pytest.mark.slow
def test_run_directory_holds_config_tokenizer_metrics_and_events(trained):
  cfg, workdir, _ = trained
  assert (workdir / "config.yaml").read_text().count("vocab_size: 512") == 1
  assert (workdir / "tokenizer.model").stat().st_size > 0
  assert list((workdir / "tb").glob("events.out.tfevents.*"))
  rows = read_metrics(workdir)
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, 61))
  for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "step_time_s", "mfu"):
    assert all(math.isfinite(r[key]) for r in train_rows), key
  # the tiny config's peak (train.peak_flops=1e11) is nominal, so MFU is checked against
  # its definition here rather than bounded by 1; tests/test_metrics.py covers the peaks
  flops = train_flops_per_step(cfg, cfg.data.vocab_size)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  for r in train_rows:
    assert r["step_time_s"] > 0
    assert r["mfu"] == pytest.approx(flops / (r["step_time_s"] * cfg.train.peak_flops), rel=1e-9)
    assert r["tokens_per_sec"] == pytest.approx(tokens / r["step_time_s"], rel=1e-9)
  eval_rows = [r for r in rows if "eval_loss" in r]
  assert all(r["eval_bpb"] > 0 and r["eval_ppl"] > 1 for r in eval_rows)
  # bpb = nats/token / ln 2 * tokens/byte: consistent with the loss and ~3-4 bytes/token
  for r in eval_rows:
    bytes_per_token = r["eval_loss"] / math.log(2) / r["eval_bpb"]
    assert 1.5 < bytes_per_token < 6.0
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [20, 40, 60]


@pytest.mark.slow
def test_same_seed_and_config_give_bitwise_identical_losses(trained, corpus, tmp_path):
  cfg, workdir, summary = trained
  again = train.train(cfg, tmp_path)
  assert train_losses(tmp_path) == train_losses(workdir)
  assert eval_losses(tmp_path) == eval_losses(workdir)
  for a, b in zip(params_of(summary), params_of(again)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted_run(trained, corpus, tmp_path):
  """Stop after 27 steps (a checkpoint at 20 and one at the stop), resume to 60."""
  cfg, workdir, summary = trained
  first = train.train(tiny_config(*corpus, "train.stop_after=27"), tmp_path)
  assert first["final_step"] == 27
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [20, 27]
  resumed = train.train(cfg, tmp_path)
  assert resumed["start_step"] == 27
  assert train_losses(tmp_path) == train_losses(workdir)  # no duplicated or missing rows
  assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == list(range(1, 61))
  assert eval_losses(tmp_path) == eval_losses(workdir)
  for a, b in zip(params_of(summary), params_of(resumed)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_loading_a_run_leaves_the_save_it_may_be_writing_now(trained):
  """evaluate and generate read a run that may be training: the temporary directory of
  a save in progress there is not theirs to remove."""
  _, workdir, _ = trained
  in_progress = workdir / "checkpoints" / "99.orbax-checkpoint-tmp-1234" / "state"
  in_progress.mkdir(parents=True)
  try:
    assert runs.load_trained(workdir, log=lambda line: None)[3] == 60
    time.sleep(1)  # orbax removes temporary directories on a thread of its own
    assert in_progress.is_dir()
  finally:
    shutil.rmtree(in_progress.parent, ignore_errors=True)


@pytest.mark.slow
def test_generation_samples_from_the_trained_run(trained, capsys):
  _, workdir, _ = trained
  greedy = [generate.generate_text(workdir, "def ", max_new_tokens=12, temperature=0.0,
                                   top_p=1.0, seed=s) for s in (0, 1)]
  assert greedy[0] == greedy[1] and len(greedy[0]) > 0
  generate.main(["--workdir", str(workdir), "--prompt", "import ", "--max-new-tokens", "8",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"])
  out = capsys.readouterr().out
  assert out.startswith("import ") and len(out) > len("import ")
  _, model, tokenizer, _ = generate.load_for_generation(workdir)
  prompt = tokenizer.encode("def ")
  tokens = sampling.generate(model, np.asarray([prompt], np.int32), 12, jax.random.key(0),
                             temperature=0.0, eos_id=tokenizer.eos_id)
  new_ids = np.asarray(tokens)[0, len(prompt):].tolist()
  new_ids = new_ids[:new_ids.index(tokenizer.eos_id)] if tokenizer.eos_id in new_ids else new_ids
  assert tokenizer.decode(new_ids) == greedy[0]
  first = int(tokens[0, len(prompt)])  # the greedy first token, forbidden: another text
  forbidden = generate.generate_text(workdir, "def ", max_new_tokens=12, temperature=0.0,
                                     top_p=1.0, seed=0, forbid=[f"#{first}", "<s>"])
  assert forbidden != greedy[0]
  assert generate.forbidden_ids(tokenizer, ["<pad>", "#5", "<pad>"]) == tuple(
      sorted({tokenizer.pad_id, 5}))
  for pieces, message in ((["#99999"], "--forbid: #99999 is past the vocabulary"),
                          (["zzqqzz"], "--forbid: 'zzqqzz' is not a piece")):
    with pytest.raises(ConfigError, match=message):
      generate.forbidden_ids(tokenizer, pieces)


def test_forbid_takes_pieces_and_ascii_ids_and_refuses_the_rest_in_one_line():
  """--forbid: a piece of the vocabulary (the unknown piece itself included) or #ID in
  ASCII digits, each id once; anything else, #ID in other digits included, is one
  ConfigError line."""
  tokenizer = tokenizer_lib.train_tokenizer([Path(textwrap.__file__).read_text()],
                                            vocab_size=400, max_sentences=10_000)
  assert generate.forbidden_ids(tokenizer, ["<unk>", "#0", "<s>", "#0", "#007"]) == tuple(
      sorted({tokenizer.unk_id, 0, tokenizer.bos_id, 7}))
  for piece in ("#\u00b2", "#\u0661", "zzqqzz"):  # superscript two, Arabic-Indic one
    with pytest.raises(ConfigError, match=re.escape(f"--forbid: {piece!r} is not a piece")):
      generate.forbidden_ids(tokenizer, [piece])


@pytest.mark.slow
def test_evaluate_command_scores_the_run_as_the_loop_did(trained, capsys):
  _, workdir, summary = trained
  evaluate_cli.main(["--workdir", str(workdir)])
  result = json.loads(capsys.readouterr().out)
  assert (result["task"], result["step"], result["batches"]) == ("lm", 60, 4)
  for key in ("eval_loss", "eval_bpb"):
    assert result[key] == pytest.approx(summary["eval"][60][key], rel=1e-6)
  assert json.loads((workdir / "eval_lm.json").read_text()) == result
  for argv, message in ((["--task", "lmm"], "--task: 'lmm' is not one of ['all', "),
                        (["--batches", "-1"], "--batches: must be >= 0, got -1")):
    with pytest.raises(SystemExit) as exit_info:
      evaluate_cli.main(["--workdir", str(workdir), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err


@pytest.mark.slow
def test_eval_time_is_not_counted_as_step_time(corpus, tmp_path, monkeypatch):
  evaluate = eval_lm.evaluate

  def slow_evaluate(*args):
    time.sleep(2.0)
    return evaluate(*args)

  monkeypatch.setattr(eval_lm, "evaluate", slow_evaluate)
  train.train(tiny_config(*corpus, "train.steps=6", "train.eval_every=2",
                          "checkpoint.every=0"), tmp_path)
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4, 6]
  step_times = {r["step"]: r["step_time_s"] for r in rows if "loss" in r}
  assert sorted(step_times) == [1, 2, 3, 4, 5, 6]
  # steps 3 and 5 follow an eval: with it counted, they would take over 2 s
  assert max(step_times.values()) < 1.0, step_times


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step(corpus, tmp_path):
  cfg = tiny_config(*corpus, "model.init_std=1e30", "train.eval_every=0")
  with pytest.raises(TrainingError, match=r"non-finite (loss|train state) at step [12] "
                                          r"\(loss [\w.]+, grad_norm \w+\); stopping; no checkpoint"):
    train.train(cfg, tmp_path)
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def checkpointed_states(cfg, workdir, *, skip: bool = False) -> dict[int, Any]:
  """Every checkpoint left in ``workdir``, restored: {step: train state} (``skip``: with
  train.nonfinite=skip's counter)."""
  mesh = sharding.make_mesh(cfg.mesh)
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=10, async_save=False)
  try:
    states = {}
    for step in ckpt.all_steps():
      vocab_size = int(ckpt.read_meta(step)["vocab_size"])
      _, _, abstract, shardings = state_lib.abstract_state(
          cfg, vocab_size, mesh,
          {"skipped_steps": jax.ShapeDtypeStruct((), jnp.int32)} if skip else None,
          {"skipped_steps": sharding.replicated(mesh)} if skip else None)
      states[step] = ckpt.restore(step, ckpt_lib.with_shardings(abstract, shardings),
                                  None).state
  finally:
    ckpt.close()
  return states


def is_finite(state) -> bool:
  """Every float of the params and optimizer state is finite (checked on the host)."""
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(
      (state.params, state.opt_state)) if jnp.issubdtype(x.dtype, jnp.inexact))


@pytest.mark.slow
def test_a_diverging_run_saves_no_nan_checkpoint_and_a_rerun_resumes(corpus, tmp_path,
                                                                      capsys):
  """The issue's repro: lr 1e6 and a checkpoint every step. The loss stays finite a step
  longer than the gradients; no checkpoint of a NaN state is saved, and a rerun with a
  sane lr resumes from the newest (finite) one."""
  diverging = tiny_config(*corpus, "optim.lr=1e6", "optim.warmup_steps=0",
                          "checkpoint.every=1", "checkpoint.keep=10", "train.eval_every=0")
  with pytest.raises(TrainingError) as error:
    train.train(diverging, tmp_path)
  states = checkpointed_states(diverging, tmp_path)
  assert {step: is_finite(state) for step, state in states.items()} == dict.fromkeys(states, True)
  newest = max(states)
  assert str(error.value).endswith(
      f"; stopping; the newest checkpoint, step {newest}, is finite: rerun to resume from it")
  # lr 1e6 moved every parameter by ~1e6 at step 1: the checkpoints are finite but
  # ruined, so the rerun resumes from the newest and stops there again, saving nothing
  capsys.readouterr()
  with pytest.raises(TrainingError) as again:
    train.train(tiny_config(*corpus, "train.steps=8", "train.eval_every=0",
                            "checkpoint.every=1", "checkpoint.keep=10"), tmp_path)
  assert f"resumed from checkpoint at step {newest}\n" in capsys.readouterr().err
  assert str(again.value).startswith(f"non-finite train state at step {newest + 1} ")
  assert f"; the newest checkpoint, step {newest}, is finite" in str(again.value)
  assert checkpointed_states(diverging, tmp_path).keys() == states.keys()


LM_OBJECTIVE = objectives.build


def nan_gradients_at(cfg, step: int) -> objectives.Objective:
  """The LM loss with a finite value but NaN gradients at optimizer step ``step``
  (1-based, as the loop counts): d sqrt(x)/dx is inf at 0, times dx/dparams = 0."""
  lm_loss = LM_OBJECTIVE(cfg)

  def objective(model, batch, ctx):
    loss, aux = lm_loss(model, batch, ctx)
    first = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    x = jnp.where(ctx.step == step - 1, jnp.sum(first * 0.0), 1.0)
    return loss + jnp.sqrt(x) - jnp.where(ctx.step == step - 1, 0.0, 1.0), aux
  return objective


@pytest.mark.slow
@pytest.mark.parametrize("bad_step", [5, 8])
def test_a_run_diverging_at_any_step_leaves_its_newest_checkpoint_finite(
    corpus, tmp_path, monkeypatch, bad_step):
  """NaN gradients under a finite loss at ``bad_step`` (8: the run's last step, which
  used to exit 0 with a NaN final checkpoint): the run stops there, and the newest
  checkpoint is the last one before it, finite."""
  monkeypatch.setattr(objectives, "build", lambda cfg: nan_gradients_at(cfg, bad_step))
  cfg = tiny_config(*corpus, "train.steps=8", "train.eval_every=0", "checkpoint.every=3")
  with pytest.raises(TrainingError, match=rf"^non-finite train state at step {bad_step} "
                                          r"\(loss [0-9.]+, grad_norm nan\); stopping; the "
                                          rf"newest checkpoint, step {bad_step // 3 * 3}, is"):
    train.train(cfg, tmp_path)
  states = checkpointed_states(cfg, tmp_path)
  assert max(states) == bad_step // 3 * 3 and all(is_finite(s) for s in states.values())
  monkeypatch.undo()  # the cause fixed, a rerun resumes from it and trains on
  summary = train.train(cfg, tmp_path)
  assert summary["start_step"] == bad_step // 3 * 3 and summary["final_step"] == 8
  assert is_finite(summary["state"])


@pytest.mark.slow
def test_skip_drops_non_finite_updates_counts_them_and_resumes_with_the_count(
    corpus, tmp_path, monkeypatch):
  monkeypatch.setattr(objectives, "build", lambda cfg: nan_gradients_at(cfg, 3))
  overrides = ("train.steps=8", "train.eval_every=0", "checkpoint.every=2",
               "train.nonfinite=skip")
  whole = train.train(tiny_config(*corpus, *overrides), tmp_path / "whole")
  rows = [r for r in read_metrics(tmp_path / "whole") if "loss" in r]
  assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1, 1, 1]
  assert [r["finite_state"] for r in rows] == [1.0] * 8
  assert rows[2]["grad_norm"] in (None, "NaN") or math.isnan(rows[2]["grad_norm"])
  assert is_finite(whole["state"])
  assert int(whole["state"].extras["skipped_steps"]) == 1 and int(whole["state"].step) == 8
  # interrupted after the skip and resumed: the same losses, count and params
  first = train.train(tiny_config(*corpus, *overrides, "train.stop_after=5"),
                      tmp_path / "resumed")
  assert first["final_step"] == 5
  resumed = train.train(tiny_config(*corpus, *overrides), tmp_path / "resumed")
  assert resumed["start_step"] == 5
  assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "whole")
  assert ([r["skipped_steps"] for r in read_metrics(tmp_path / "resumed") if "loss" in r]
          == [0, 0, 1, 1, 1, 1, 1, 1])
  assert int(resumed["state"].extras["skipped_steps"]) == 1
  for a, b in zip(params_of(whole), params_of(resumed)):
    np.testing.assert_array_equal(a, b)
  # the counter is part of the state's form: the other mode is refused in one line
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"^train.nonfinite: the checkpoint was written with 'skip', "):
    train.train(tiny_config(*corpus, "train.steps=10", "train.eval_every=0"),
                tmp_path / "resumed")


@pytest.mark.slow
def test_checkpoint_of_another_model_is_a_clear_error(trained, corpus, tmp_path):
  _, workdir, _ = trained
  run = tmp_path / "run"
  train.train(tiny_config(*corpus, "train.steps=2", "train.eval_every=0"), run)
  files = {name: (run / name).read_bytes() for name in ("config.yaml", "tokenizer.model")}
  with pytest.raises(ckpt_lib.CheckpointError, match=r"model.d_model: 64 -> 32"):
    train.train(tiny_config(*corpus, "train.steps=4", "model.d_model=32",
                            "data.vocab_size=384"), run)
  # the refused run left the run's config and tokenizer as they were
  assert {name: (run / name).read_bytes() for name in files} == files


@pytest.mark.slow
def test_checkpoint_of_another_optimizer_is_a_clear_error_not_damage(corpus, tmp_path):
  train.train(tiny_config(*corpus, "train.steps=2", "train.eval_every=0"), tmp_path)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"optim: the checkpoint's train state does not fit this run's "
                           r"\(optim.name: 'adamw' -> 'muon'; \.opt_state"):
    train.train(tiny_config(*corpus, "train.steps=4", "optim.name=muon"), tmp_path)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"data.val_fraction: the checkpoint's "
                                                     r"sample stream was made with"):
    train.train(tiny_config(*corpus, "train.steps=4", "data.val_fraction=0.3"), tmp_path)
  # nothing was quarantined as damaged, and a change that keeps the state's form resumes
  assert not (tmp_path / "checkpoints.damaged").exists()
  summary = train.train(tiny_config(*corpus, "train.steps=4", "train.eval_every=0",
                                    "optim.lr=1e-3"), tmp_path)
  assert summary["start_step"] == 2


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous(corpus, tmp_path, capsys):
  cfg = tiny_config(*corpus, "train.steps=40", "train.eval_every=0")
  train.train(cfg, tmp_path)
  for f in (tmp_path / "checkpoints" / "40" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"\0" * 7)
  summary = train.train(tiny_config(*corpus, "train.steps=45", "train.eval_every=0"), tmp_path)
  out = capsys.readouterr().err
  assert "checkpoint 40 is damaged" in out
  assert summary["start_step"] == 20


@pytest.mark.slow
def test_profile_window_writes_a_trace(corpus, tmp_path):
  cfg = tiny_config(*corpus, "train.steps=4", "train.eval_every=0", "logging.profile_start=2",
                    "logging.profile_steps=2")
  train.train(cfg, tmp_path)
  traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
  assert traces and traces[0].stat().st_size > 0


def test_cli_errors_are_one_line(corpus, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main(["--config", os.devnull, "--workdir", str(tmp_path),
                "--set", "model.mixer=lstm"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "model.mixer" in err[0]


@pytest.mark.slow
def test_init_from_takes_params_and_starts_fresh(trained, corpus, tmp_path):
  cfg, workdir, summary = trained
  fresh = train.train(tiny_config(*corpus, "train.steps=3", "train.eval_every=0",
                                  "optim.name=sgd", "optim.lr=1e-3",
                                  f"checkpoint.init_from={workdir}"), tmp_path / "fresh")
  assert fresh["start_step"] == 0
  trained_loss = np.mean([train_losses(workdir)[s] for s in range(56, 61)])
  assert abs(fresh["losses"][1] - trained_loss) < 0.5  # not the untrained ~ln(512)=6.2
  # params-only fine-tuning on other text reads it with the source run's tokenizer
  other = ("train.steps=2", "train.eval_every=0", f"checkpoint.init_from={workdir}",
           f"data.corpus=[{corpus[0].replace('*.py', 'd*.py')}]")  # difflib, dataclasses
  train.train(tiny_config(*corpus, *other), tmp_path / "retokenized")
  branch = train.train(tiny_config(*corpus, "train.steps=62", "train.eval_every=0",
                                   f"checkpoint.init_from={workdir}/checkpoints/40",
                                   "checkpoint.init_from_full=true"), tmp_path / "branch")
  assert branch["start_step"] == 40
  # the branch continues the source run exactly: same state, same data position
  assert branch["losses"][41] == train_losses(workdir)[41]


@pytest.mark.slow
def test_messages_of_a_stopped_resumed_changed_and_finished_run(corpus, tmp_path, capsys,
                                                               monkeypatch):
  """Set-up lines, then plain step lines (stderr is no terminal here) and the summary;
  the stop_after hint; a resume naming its config changes; the finished run's rerun."""
  common = ("train.eval_every=0", "train.log_every=4", "checkpoint.every=0")
  train.train(tiny_config(*corpus, *common, "train.steps=12", "train.stop_after=8"),
              tmp_path)
  out, err = capsys.readouterr()
  assert out == "" and "\r" not in err
  lines = err.splitlines()
  compiled = next(i for i, line in enumerate(lines) if line.startswith("compiled train step"))
  assert [line.split(" loss ")[0] for line in lines[compiled + 1:compiled + 3]] == [
      "step 4/12", "step 8/12"]
  assert lines[compiled + 3].startswith("done: 8 steps (step 0 -> 8 of 12) in ")
  assert lines[compiled + 4].startswith("final loss ")
  assert lines[compiled + 5:] == [
      f"checkpoint: {tmp_path}/checkpoints/8",
      "stopped after 8 steps at step 8 (train.stop_after); rerun the same command to continue"]

  changed = tiny_config(*corpus, *common, "train.steps=16", "optim.lr=1e-2")
  summary = train.train(changed, tmp_path)
  assert summary["final_step"] == 16
  err = capsys.readouterr().err
  assert ("resumed from checkpoint at step 8\nresume: config changed: optim.lr 0.02 -> 0.01, "
          "train.steps 12 -> 16, train.stop_after 8 -> 0\nresume: the learning-rate "
          "schedule changes from step 9 on (optim.lr, train.steps): lr ") in err
  assert "step 16/16 loss " in err and "stopped after" not in err
  history = tmp_path / "config_history"
  assert [p.name for p in history.iterdir()] == ["config.1.step8.yaml"]
  assert "train.stop_after: 8" not in (tmp_path / "config.yaml").read_text()

  monkeypatch.setattr(step_lib, "compile_step", lambda *a, **k: pytest.fail("compiled"))
  argv = ["--config", os.devnull, "--workdir", str(tmp_path)]
  for override in tiny_overrides(*corpus) + list(common) + ["train.steps=16",
                                                            "optim.lr=1e-2"]:
    argv += ["--set", override]
  train.main(argv)  # returns: exit status 0
  err = capsys.readouterr().err
  assert err.endswith("resumed from checkpoint at step 16\nrun already complete at step 16 "
                      "(train.steps=16); raise train.steps to extend it\n")
  assert [p.name for p in history.iterdir()] == ["config.1.step8.yaml"]
