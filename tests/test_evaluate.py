"""``python -m ttt_jax.evaluate``: tasks come from ``registry.EVAL_TASKS``, each with its
own flags; errors are one line; text is read with the run's own tokenizer; each
evaluation writes its own results file. (Scoring a trained run: tests/test_train.py.)"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ttt_jax import evaluate, registry, train
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.eval import lm as eval_lm
from ttt_jax.eval import tasks
from data_util import small_config, write_stdlib_sample
from train_util import copy_stdlib_corpus, tiny_config

TASK_FLAGS = {
    "lm": ["--batches", "2"],
    "ttt": ["--batches", "2"],
    "probes": ["--probes", str(Path(__file__).resolve().parents[1] / "configs" /
                               "probes_python.jsonl")],
    "sufficiency": ["--batches", "2"],
    "compression": ["--contexts", "64,128"],
    "passkey": ["--passkey-lengths", "64", "--passkey-depths", "0,1", "--passkey-trials", "1"],
    "perplexity": ["--batches", "2", "--baseline", "elsewhere"],
    "governance": [],
    "all": ["--batches", "2", "--baseline", "b", "--contexts", "64", "--passkey-lengths", "64",
            "--passkey-depths", "0", "--passkey-trials", "1"],
}


def test_every_task_is_registered():
  assert set(registry.EVAL_TASKS.names()) == set(TASK_FLAGS)


@pytest.mark.parametrize("task", sorted(TASK_FLAGS))
def test_each_task_takes_its_flags_and_reports_a_missing_run_in_one_line(task, tmp_path,
                                                                         capsys):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--workdir", str(tmp_path), "--task", task, *TASK_FLAGS[task]])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}"), err
  assert not list(tmp_path.iterdir())


def test_a_flag_of_another_task_is_refused(capsys):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--workdir", "w", "--task", "lm", "--contexts", "64"])
  assert exit_info.value.code == 2
  assert "unrecognized arguments: --contexts 64" in capsys.readouterr().err


def _identity(argv: list[str]) -> dict:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir")
  parser.add_argument("--task", default="lm")
  parser.add_argument("--set", action="append", default=[])
  tasks.add_batches_argument(parser)
  return tasks.identity(parser.parse_args(["--workdir", "w", *argv]), parser)


def test_each_evaluation_has_its_own_results_file(tmp_path):
  default = _identity([])
  assert default == {"task": "lm", "weights": "raw", "overrides": [], "flags": {"batches": 0},
                     "default": True}
  assert tasks.results_path(tmp_path, default) == tmp_path / "eval_lm.json"
  (tmp_path / "eval_lm.json").write_text(json.dumps({"evaluation": default}))
  assert tasks.results_path(tmp_path, default) == tmp_path / "eval_lm.json"  # its own file
  others = [_identity(["--batches", "2"]), _identity(["--set", "data.corpus=[a.txt]"]),
            _identity(["--set", "data.corpus=[b.txt]"])]
  paths = [tasks.results_path(tmp_path, other) for other in others]
  assert paths == [tmp_path / f"eval_lm-{tasks.identity_hash(o)}.json" for o in others]
  assert len(set(paths)) == 3 and not any(o["default"] for o in others)
  # an eval_lm.json that records no identity (an older version's) is not replaced
  (tmp_path / "eval_lm.json").write_text(json.dumps({"task": "lm", "eval_loss": 1.0}))
  hashed = tmp_path / f"eval_lm-{tasks.identity_hash(default)}.json"
  assert tasks.results_path(tmp_path, default) == hashed


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step run, another corpus and a tokenizer trained on it: (workdir, glob, model)."""
  root = tmp_path_factory.mktemp("evaluated")
  cache = root / "cache"
  train.train(tiny_config(copy_stdlib_corpus(root / "src"), cache, "train.steps=4",
                          "train.eval_every=0", "checkpoint.every=4"), root / "run")
  write_stdlib_sample(root / "other")
  other_glob = str(root / "other" / "*.py")
  other = corpus_lib.prepare_corpus(small_config(root, [other_glob], vocab_size=512,
                                                 seq_len=64), log=lambda _: None)
  return root / "run", other_glob, other.meta["tokenizer_model"]


def _evaluate(capsys, workdir, *argv: str) -> tuple[dict, str]:
  evaluate.main(["--workdir", str(workdir), *argv])
  captured = capsys.readouterr()
  return json.loads(captured.out), captured.err


@pytest.mark.slow
def test_another_corpus_is_read_with_the_runs_tokenizer(run, capsys):
  workdir, other_glob, _ = run
  result, err = _evaluate(capsys, workdir, "--batches", "2",
                          "--set", f"data.corpus=[{other_glob}]")
  run_hash = hashlib.sha256((workdir / "tokenizer.model").read_bytes()).hexdigest()
  assert result["tokenizer_hash"] == run_hash
  assert result["corpus"]["spec"] == [other_glob] and result["corpus"]["split"] == "val"
  assert (result["step"], result["weights"]) == (4, "raw")
  with_run_tokenizer = eval_lm.evaluate_lm(
      workdir, [f"data.corpus=[{other_glob}]", f"data.tokenizer={workdir}/tokenizer.model"],
      2)
  assert result["eval_loss"] == with_run_tokenizer["eval_loss"]
  # not the run's default evaluation: its own file, named on stderr
  path = workdir / f"eval_lm-{tasks.identity_hash(result['evaluation'])}.json"
  assert json.loads(path.read_text()) == result
  assert f"wrote {path}" in err.splitlines()
  assert not (workdir / "eval_lm.json").exists()
  default, _ = _evaluate(capsys, workdir)
  assert default["corpus"]["spec"] != [other_glob] and default["tokenizer_hash"] == run_hash
  assert json.loads((workdir / "eval_lm.json").read_text()) == default
  assert json.loads(path.read_text()) == result


@pytest.mark.slow
def test_another_explicit_tokenizer_is_refused_naming_both(run, capsys):
  workdir, other_glob, other_model = run
  before = sorted(workdir.iterdir())
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--workdir", str(workdir), "--set", f"data.corpus=[{other_glob}]",
                   "--set", f"data.tokenizer={other_model}"])
  assert exit_info.value.code != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: data.tokenizer: {other_model} "), err
  assert f"{workdir / 'tokenizer.model'}" in err[0]
  assert sorted(workdir.iterdir()) == before  # no results file


@pytest.mark.slow
def test_a_run_without_its_tokenizer_file_is_refused_unless_given_the_same(run, capsys,
                                                                          tmp_path):
  workdir, _, other_model = run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  (copy / "tokenizer.model").rename(tmp_path / "kept.model")
  for extra, message in (([], f"{copy / 'tokenizer.model'}: missing; "),
                         (["--set", f"data.tokenizer={other_model}"],
                          f"data.tokenizer: {other_model} ")):
    with pytest.raises(SystemExit):
      evaluate.main(["--workdir", str(copy), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
  result, _ = _evaluate(capsys, copy, "--batches", "2",
                        "--set", f"data.tokenizer={tmp_path / 'kept.model'}")
  assert result["tokenizer_hash"] == hashlib.sha256(
      (tmp_path / "kept.model").read_bytes()).hexdigest()
