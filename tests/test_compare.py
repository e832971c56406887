"""ttt_jax.compare: the runs' table, the config fields that differ, the eval-set warning,
the eval curves' PNG, one-line errors; and on two real tiny runs."""

import json
import re
import sys
from pathlib import Path

import pytest

from ttt_jax import compare
from ttt_jax import train as train_lib
from ttt_jax.config import load_config, save_config
from ttt_jax.errors import DataError, UserError
from train_util import copy_stdlib_corpus, tiny_config

SIGNATURE = {".step": "int32[]", ".params['embed']['embedding'].value": "float32[64, 8]",
             ".params['blocks']['mlp']['w_up'].value": "float32[2, 8, 16]",
             ".opt_state[0].mu['embed']['embedding'].value": "float32[64, 8]"}
"""A checkpoint's state signature: 64 * 8 + 2 * 8 * 16 = 768 parameters."""


def make_run(directory: Path, overrides: list[str], rows: list[dict],
             meta: dict | None = None) -> str:
  """A run directory as train writes it: config.yaml, metrics.jsonl and, with ``meta``,
  two checkpoints whose newest holds it."""
  directory.mkdir(parents=True)
  save_config(load_config(None, ["train.batch_size=4", "data.seq_len=32"] + overrides),
              directory / "config.yaml")
  (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
  if meta is not None:
    for step, content in ((2, {"state_signature": {}}), (10, meta)):
      (directory / "checkpoints" / str(step) / "meta").mkdir(parents=True)
      (directory / "checkpoints" / str(step) / "meta" / "metadata").write_text(
          json.dumps(content))
  return str(directory)


def rows(eval_losses: dict[int, float], step_time: float = 0.5) -> list[dict]:
  """Train rows at steps 5 and 10, eval rows at ``eval_losses``' steps (bpb: loss / 2)."""
  train = [{"step": s, "loss": 4.0 - s / 10, "lr": 1e-3, "step_time_s": step_time}
           for s in (5, 10)]
  evals = [{"step": s, "eval_loss": loss, "eval_ppl": 1.0, "eval_bpb": loss / 2}
           for s, loss in eval_losses.items()]
  return sorted(train + evals, key=lambda row: row["step"])


def test_table_has_each_runs_figures_and_the_fields_that_differ(tmp_path):
  first = make_run(tmp_path / "first", ["optim.lr=1e-3"], rows({0: 5.0, 5: 3.0, 10: 3.5}),
                   meta={"state_signature": SIGNATURE})
  second = make_run(tmp_path / "second", ["optim.lr=3e-3", "model.n_layers=2"],
                    rows({0: 5.0, 10: 2.5}, step_time=2.0))
  runs = [compare.read_run(first), compare.read_run(second)]
  assert compare.summarize(runs[0]) == {
      "run": first, "steps": 10, "tokens": 10 * 4 * 32, "params": 768,
      "train time": 5.0, "train loss": 3.0, "eval loss": 3.5, "best eval loss": 3.0,
      "eval bpb": 1.75, "best eval bpb": 1.5}
  second_row = compare.summarize(runs[1])
  assert second_row["params"] is None and second_row["train time"] == 20.0
  lines = compare.report(runs).splitlines()
  assert lines[0].split()[:4] == ["run", "steps", "tokens", "params"]
  assert lines[1].split()[:5] == [first, "10", "1.28K", "768", "5.0s"]
  assert lines[2].split()[3] == "-"  # no checkpoint: no parameter count
  differ = lines[lines.index("config fields that differ:") + 1:]
  assert [line.split() for line in differ] == [
      ["field", first, second], ["model.n_layers", "4", "2"], ["optim.lr", "0.001", "0.003"]]
  assert compare.eval_set_warning(runs) is None


def test_non_finite_values_show_as_nan_and_keep_their_rows(tmp_path):
  # metrics.jsonl writes NaN as null: the last train row (a step that train.nonfinite=
  # 'skip' dropped) and the final eval are NaN, and the table must not show older values
  # in their place; the row's step time still counts
  run_rows = [{"step": 5, "loss": 3.0, "step_time_s": 0.5},
              {"step": 10, "loss": None, "grad_norm": None, "step_time_s": 1.0},
              {"step": 5, "eval_loss": 2.5, "eval_bpb": 1.25},
              {"step": 10, "eval_loss": None, "eval_bpb": None}]
  summary = compare.summarize(compare.read_run(make_run(tmp_path / "run", [], run_rows)))
  assert summary["train time"] == 5 * 0.5 + 5 * 1.0
  assert all(summary[key] != summary[key] for key in ("train loss", "eval loss", "eval bpb"))
  assert (summary["best eval loss"], summary["best eval bpb"]) == (2.5, 1.25)
  assert compare.report([compare.read_run(str(tmp_path / "run"))]).splitlines()[1].split()[
      5:8] == ["nan", "nan", "2.5000"]


def test_eval_set_warning_names_what_differs(tmp_path):
  base = make_run(tmp_path / "base", [], rows({10: 3.0}),
                  meta={"state_signature": {}, "corpus_hash": "a", "tokenizer_hash": "t"})
  # eval.batch_size 0 means train.batch_size: the same eval set
  same = make_run(tmp_path / "same", ["eval.batch_size=4", "optim.lr=1"], rows({10: 3.0}))
  other = make_run(tmp_path / "other", ["eval.batches=2", "data.seq_len=16"], rows({10: 3.0}),
                   meta={"state_signature": {}, "corpus_hash": "b", "tokenizer_hash": "t"})
  read = compare.read_run
  assert compare.eval_set_warning([read(base), read(same)]) is None
  assert compare.eval_set_warning([read(base), read(other)]) == (
      "warning: the runs' eval sets differ (corpus_hash, data.seq_len, eval.batches): their "
      "eval losses and bits per byte are not comparable")


@pytest.mark.parametrize("content, message", [
    (None, "metrics.jsonl: cannot read metrics (No such file or directory); is "),
    ("\n", "metrics.jsonl: no metrics rows (has the run logged a step yet?)"),
    ('{"step": 1}\n{"step": 2\n', "metrics.jsonl: line 2 is not JSON ("),
    ('{"step": 1\n{"step": 2}\n{"step": 3', "metrics.jsonl: line 1 is not JSON ("),
    ('[1, 2]\n', "metrics.jsonl: line 1 is not a metrics row with a 'step'"),
])
def test_a_bad_metrics_file_is_one_line_naming_it(tmp_path, capsys, content, message):
  run = make_run(tmp_path / "run", [], rows({10: 3.0}))
  metrics = Path(run) / "metrics.jsonl"
  if content is None:
    metrics.unlink()
  else:
    metrics.write_text(content)
  with pytest.raises(DataError, match=f"^{re.escape(str(metrics))}"):
    compare.read_run(run)
  with pytest.raises(SystemExit) as exit_info:
    compare.main([run])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith(f"error: {metrics}: {message.split(': ', 1)[1]}")
  assert err.count("\n") == 1


def test_a_row_being_written_at_the_end_is_skipped(tmp_path):
  """A running run (or one a kill cut short) may end in a partial row without its
  newline: the rows before it are read."""
  run = make_run(tmp_path / "run", [], rows({10: 3.0}))
  metrics = Path(run) / "metrics.jsonl"
  metrics.write_text('{"step": 1, "loss": 4.0}\n{"step": 2, "loss": 3.5}\n{"step": 3, "lo')
  assert [row["step"] for row in compare.read_metrics(metrics)] == [1, 2]


def test_a_missing_run_directory_is_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit):
    compare.main([str(tmp_path / "nowhere")])
  assert capsys.readouterr().err == (f"error: {tmp_path / 'nowhere'}: not a directory "
                                     "(expected a run directory)\n")


def test_plot_writes_a_png_or_names_the_extra(tmp_path, capsys):
  first = make_run(tmp_path / "first", [], rows({0: 5.0, 10: 3.0}))
  second = make_run(tmp_path / "second", [], rows({0: 5.0, 10: 2.0}))
  png = tmp_path / "curves.png"
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    with pytest.raises(SystemExit):
      compare.main([first, second, "--plot", str(png)])
    assert capsys.readouterr().err == (
        "error: --plot needs matplotlib: pip install -e '.[plots]'\n")
  else:
    compare.main([first, second, "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().err == f"eval curves: {png}\n"


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
  run = compare.read_run(make_run(tmp_path / "run", [], rows({10: 3.0})))
  monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
  with pytest.raises(UserError, match=r"^--plot needs matplotlib: pip install -e '\.\[plots\]'$"):
    compare.plot([run], tmp_path / "curves.png")
  assert not (tmp_path / "curves.png").exists()


@pytest.mark.slow
def test_two_tiny_runs(tmp_path, capsys):
  corpus = copy_stdlib_corpus(tmp_path / "src")
  summaries = {}
  for name, lr in (("a", "2e-2"), ("b", "5e-3")):
    cfg = tiny_config(corpus, tmp_path / "cache", "train.steps=4", "train.eval_every=2",
                      f"optim.lr={lr}", "logging.tensorboard=false")
    summaries[name] = train_lib.train(cfg, tmp_path / name)
  capsys.readouterr()
  compare.main([str(tmp_path / "a"), str(tmp_path / "b")])
  out = capsys.readouterr()
  runs = [compare.read_run(str(tmp_path / name)) for name in "ab"]
  for run, name in zip(runs, "ab"):
    row = compare.summarize(run)
    evals = summaries[name]["eval"]
    assert row["steps"] == 4 and row["tokens"] == 4 * 8 * 64
    assert row["params"] == summaries[name]["n_params"]
    assert row["eval loss"] == pytest.approx(evals[4]["eval_loss"])
    assert row["best eval loss"] == pytest.approx(min(r["eval_loss"] for r in evals.values()))
    assert row["train time"] > 0
  assert out.out.splitlines()[1].startswith(str(tmp_path / "a"))
  assert out.out.split("config fields that differ:\n")[1].splitlines()[1].split() == [
      "optim.lr", "0.02", "0.005"]
  assert out.err == ""  # the same eval set
