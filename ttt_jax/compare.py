"""Comparing runs: ``python -m ttt_jax.compare RUN [RUN ...] [--plot curves.png]``.

Reads each run directory's ``metrics.jsonl`` and ``config.yaml`` (and the meta item of
its newest checkpoint, when there is one) and prints one table row per run: the steps
trained, tokens seen (steps x ``train.batch_size`` x ``data.seq_len``), the parameter
count (from the checkpoint's state signature), the time spent in train steps (the sum of
the logged ``step_time_s`` over the steps they cover: compilation and evals left out),
the last train loss, and the final and best eval loss and bits per byte (a last value
that was non-finite, ``null`` in ``metrics.jsonl``, shows as nan). Below it come
the config fields whose values differ between the runs (``config.flatten``).

Eval numbers compare only on the same eval set: when the runs' corpus, tokenizer,
sequence length, validation split or eval batches differ (``EVAL_SET_KEYS``, and the
corpus and tokenizer hashes of their checkpoints), one warning line says which.

``--plot PATH`` draws every run's eval loss (and bits per byte) against the step into
one PNG, headless (matplotlib's Agg canvas); without matplotlib one line names the
extra to install. Nothing here imports JAX: the command reads files only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from ttt_jax.config import flatten
from ttt_jax.errors import DataError, UserError, user_errors

EVAL_SET_KEYS = ("data.corpus", "data.stdlib_include_tests", "data.val_fraction",
                 "data.seq_len", "data.vocab_size", "data.tokenizer",
                 "data.tokenizer_max_sentences", "eval.batches", "eval.batch_size")
"""Config fields that fix the validation tokens a run evaluates on (``eval.batch_size``
as resolved: 0 means ``train.batch_size``)."""
STREAM_HASH_KEYS = ("corpus_hash", "tokenizer_hash")
"""Checkpoint meta fields that fix the text and its tokenization."""
PLOTTED = (("eval_loss", "eval loss"), ("eval_bpb", "eval bits per byte"))
"""(metrics.jsonl key, axis label) of each panel ``--plot`` draws."""


class Run(NamedTuple):
  """What ``compare`` reads of one run directory."""
  name: str
  rows: list[dict[str, Any]]
  """``metrics.jsonl``, in file order."""
  config: dict[str, Any]
  """``config.yaml``, flattened to dotted keys."""
  meta: dict[str, Any] | None
  """The newest checkpoint's meta item (None without a checkpoint)."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
  """The rows of a ``metrics.jsonl``; a DataError naming the file when it is missing,
  empty or holds a line that is not a JSON object. A last line without its newline that
  is not JSON is a row being written (a running run) or cut short by a kill: skipped."""
  try:
    text = path.read_text()
  except OSError as e:
    raise DataError(f"{path}: cannot read metrics ({e.strerror}); is "
                    f"{path.parent} a run directory?") from None
  lines = text.split("\n")  # the last item: "" or a line still being written
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):
        continue
      raise DataError(f"{path}: line {number} is not JSON ({e.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
      raise DataError(f"{path}: line {number} is not a metrics row with a 'step'")
    rows.append(row)
  if not rows:
    raise DataError(f"{path}: no metrics rows (has the run logged a step yet?)")
  return rows


def read_config(path: Path) -> dict[str, Any]:
  """A run's ``config.yaml`` as flattened dotted keys."""
  try:
    values = yaml.safe_load(path.read_text())
  except OSError as e:
    raise DataError(f"{path}: cannot read the run's config ({e.strerror})") from None
  except yaml.YAMLError as e:
    raise DataError(f"{path}: invalid YAML ({getattr(e, 'problem', e)})") from None
  if not isinstance(values, dict):
    raise DataError(f"{path}: expected a mapping at the top level")
  return flatten(values)


def newest_meta(checkpoints: Path) -> dict[str, Any] | None:
  """The meta item of the newest checkpoint under ``checkpoints`` that has one."""
  steps = sorted((int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()),
                 reverse=True)
  for step in steps:
    path = checkpoints / str(step) / "meta" / "metadata"
    if path.is_file():
      try:
        return json.loads(path.read_text())
      except (OSError, json.JSONDecodeError):
        continue  # a damaged step: the one before it
  return None


def read_run(directory: str) -> Run:
  path = Path(directory)
  if not path.is_dir():
    raise DataError(f"{directory}: not a directory (expected a run directory)")
  rows = read_metrics(path / "metrics.jsonl")
  return Run(directory, rows, read_config(path / "config.yaml"),
             newest_meta(path / "checkpoints"))


def count_params(meta: dict[str, Any] | None) -> int | None:
  """Parameters in a checkpoint meta's ``state_signature`` ({path: 'dtype[shape]'})."""
  if meta is None or "state_signature" not in meta:
    return None
  total = 0
  for path, signature in meta["state_signature"].items():
    if path.startswith(".params"):
      shape = json.loads(signature[signature.index("["):])
      total += math.prod(shape)
  return total


def summarize(run: Run) -> dict[str, Any]:
  """One table row: see the module docstring (None where the run has no such value)."""
  # a non-finite value is null in metrics.jsonl: its row still counts, shown as nan
  train = [row for row in run.rows if "loss" in row]
  evals = [row for row in run.rows if "eval_loss" in row]
  steps = max(row["step"] for row in run.rows)
  batch, seq_len = run.config.get("train.batch_size"), run.config.get("data.seq_len")
  train_s, previous = 0.0, 0
  for row in train:
    if row.get("step_time_s") is not None:
      train_s += row["step_time_s"] * (row["step"] - previous)
    previous = row["step"]

  def best(key: str) -> float | None:
    values = [row[key] for row in evals if row.get(key) is not None]
    return min(values) if values else None

  def last(rows: list[dict[str, Any]], key: str) -> float | None:
    """``key`` of the last row (None without rows or key; nan where it was null)."""
    if not rows or key not in rows[-1]:
      return None
    return math.nan if rows[-1][key] is None else rows[-1][key]

  return {
      "run": run.name, "steps": steps,
      "tokens": steps * batch * seq_len if batch and seq_len else None,
      "params": count_params(run.meta),
      "train time": train_s if train else None,
      "train loss": last(train, "loss"),
      "eval loss": last(evals, "eval_loss"),
      "best eval loss": best("eval_loss"),
      "eval bpb": last(evals, "eval_bpb"),
      "best eval bpb": best("eval_bpb"),
  }


def _format(key: str, value: Any) -> str:
  if value is None:
    return "-"
  if key in ("tokens", "params"):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
      if value >= scale:
        return f"{value / scale:.2f}{unit}"
    return str(value)
  if key == "train time":
    return f"{value:.1f}s" if value < 600 else f"{value / 60:.1f}min"
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def _config_value(config: dict[str, Any], key: str) -> str:
  if key not in config:
    return "(absent)"
  value = config[key]
  return json.dumps(value) if isinstance(value, (list, dict, str)) else str(value)


def table(header: list[str], rows: list[list[str]]) -> str:
  """Left-aligned columns, two spaces apart."""
  widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                   for line in [header, *rows])


def eval_set(run: Run) -> dict[str, Any]:
  """The values of ``EVAL_SET_KEYS`` (and the checkpoint's text and tokenizer hashes)."""
  identity = {key: run.config.get(key) for key in EVAL_SET_KEYS}
  if not identity["eval.batch_size"]:
    identity["eval.batch_size"] = run.config.get("train.batch_size")
  if run.meta is not None:
    identity.update({key: run.meta.get(key) for key in STREAM_HASH_KEYS})
  return identity


def differing(values: list[dict[str, Any]]) -> list[str]:
  """The keys whose value is not the same in every mapping (an absent key reads None)."""
  keys = sorted({key for value in values for key in value})
  return [key for key in keys if len({json.dumps(v.get(key), sort_keys=True)
                                      for v in values}) > 1]


def eval_set_warning(runs: list[Run]) -> str | None:
  """One line naming what differs between the runs' eval sets, or None."""
  identities = [eval_set(run) for run in runs]
  shared = set.intersection(*(set(i) for i in identities))  # hashes: only where all have them
  keys = differing([{k: v for k, v in i.items() if k in shared} for i in identities])
  if not keys:
    return None
  return (f"warning: the runs' eval sets differ ({', '.join(keys)}): their eval losses "
          f"and bits per byte are not comparable")


def report(runs: list[Run]) -> str:
  """The runs' table, then the config fields that differ (when any do)."""
  summaries = [summarize(run) for run in runs]
  header = list(summaries[0])
  text = table(header, [[_format(k, s[k]) for k in header] for s in summaries])
  keys = differing([run.config for run in runs])
  if len(runs) > 1:
    if keys:
      fields = [[key] + [_config_value(run.config, key) for run in runs] for key in keys]
      text += "\n\nconfig fields that differ:\n" + table(
          ["field"] + [run.name for run in runs], fields)
    else:
      text += "\n\nthe runs' configs are identical"
  return text


def have_matplotlib() -> bool:
  """Whether matplotlib (the ``plots`` extra) is installed."""
  return importlib.util.find_spec("matplotlib") is not None


def new_figure(panels: int, what: str = "--plot") -> Any:
  """A headless matplotlib Figure (Agg canvas) of ``panels`` side by side; a UserError
  naming ``what`` and the extra to install without matplotlib."""
  try:
    from matplotlib.figure import Figure
  except ImportError:
    raise UserError(f"{what} needs matplotlib: pip install -e '.[plots]'") from None
  return Figure(figsize=(6 * panels, 4.5), layout="constrained")


def save_figure(figure: Any, path: Path, what: str = "--plot") -> None:
  """Writes ``figure`` as a PNG at ``path`` (a UserError naming ``what`` if it cannot)."""
  try:
    figure.savefig(path, format="png", dpi=120)
  except OSError as e:
    raise UserError(f"{what} {path}: cannot write ({e.strerror})") from None


def draw_curves(axes: Any, runs: list[Run], key: str, label: str,
                colors: dict[str, str] | None = None) -> None:
  """Each run's ``key`` against the step on ``axes``; with ``colors`` (run name ->
  color) runs of one name share a color and one legend entry."""
  labelled = set()
  for run in runs:
    points = [(row["step"], row[key]) for row in run.rows if row.get(key) is not None]
    if not points:
      continue
    style = {"label": run.name} if run.name not in labelled else {}
    if colors is not None:
      style.update(color=colors[run.name], alpha=0.75, linewidth=1.2)
    axes.plot(*zip(*points), marker="o", markersize=3, **style)
    labelled.add(run.name)
  axes.set_xlabel("step")
  axes.set_ylabel(label)
  axes.grid(alpha=0.3)
  axes.legend(fontsize="small")


def plot(runs: list[Run], path: Path) -> None:
  """Every run's eval curves (``PLOTTED``) into one PNG at ``path``."""
  figure = new_figure(len(PLOTTED))
  for axes, (key, label) in zip(figure.subplots(1, len(PLOTTED), squeeze=False)[0], PLOTTED):
    draw_curves(axes, runs, key, label)
  save_figure(figure, path)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.compare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory (--workdir of train)")
  parser.add_argument("--plot", metavar="PNG", type=Path, default=None,
                      help="also draw the runs' eval curves into this PNG (needs matplotlib)")
  args = parser.parse_args(argv)
  with user_errors():
    runs = [read_run(directory) for directory in args.runs]
    print(report(runs))
    warning = eval_set_warning(runs)
    if warning:
      print(warning, file=sys.stderr)
    if args.plot is not None:
      plot(runs, args.plot)
      print(f"eval curves: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
  main()
