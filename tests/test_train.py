"""``python -m ttt_jax.train`` on small real text: learning, determinism, resume, errors,
and the run it leaves for sampling and evaluation."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
import pytest

from ttt_jax import checkpoint as ckpt_lib
from ttt_jax import evaluate as evaluate_cli
from ttt_jax import generate, train
from ttt_jax.errors import TrainingError
from ttt_jax.eval import lm as eval_lm
from ttt_jax.training.step import train_flops_per_step
from train_util import copy_stdlib_corpus, eval_losses, read_metrics, tiny_config, train_losses


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
def test_generation_samples_from_the_trained_run(trained, capsys):
  _, workdir, _ = trained
  greedy = [generate.generate_text(workdir, "def ", max_new_tokens=12, temperature=0.0,
                                   top_p=1.0, seed=s) for s in (0, 1)]
  assert greedy[0] == greedy[1] and len(greedy[0]) > 0
  generate.main(["--workdir", str(workdir), "--prompt", "import ", "--max-new-tokens", "8",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"])
  out = capsys.readouterr().out
  assert out.startswith("import ") and len(out) > len("import ")


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
  with pytest.raises(TrainingError, match=r"non-finite loss \(\w+\) at step [12]; stopping"):
    train.train(cfg, tmp_path)
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


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
  out = capsys.readouterr().out
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
  # params-only fine-tuning on other text: its own tokenizer would misread the ids
  other = ("train.steps=2", "train.eval_every=0", f"checkpoint.init_from={workdir}",
           f"data.corpus=[{corpus[0].replace('*.py', 'd*.py')}]")  # difflib, dataclasses
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"data.tokenizer: the params were trained with another tokenizer"):
    train.train(tiny_config(*corpus, *other), tmp_path / "retokenized")
  train.train(tiny_config(*corpus, *other, f"data.tokenizer={workdir}/tokenizer.model"),
              tmp_path / "same_tokenizer")
  branch = train.train(tiny_config(*corpus, "train.steps=62", "train.eval_every=0",
                                   f"checkpoint.init_from={workdir}/checkpoints/40",
                                   "checkpoint.init_from_full=true"), tmp_path / "branch")
  assert branch["start_step"] == 40
  # the branch continues the source run exactly: same state, same data position
  assert branch["losses"][41] == train_losses(workdir)[41]
