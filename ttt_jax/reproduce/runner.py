"""The shared runner of a study: arms x seeds of ordinary training runs, then results.

A study (``Study``) names its arms (a config of ``configs/`` plus overrides) and its
budget (steps, warmup, eval batches). Every arm trains on seed s with ``train.seed=s``, so
arms of one seed share the model-init seed and the data order; all arms see the same
tokens (steps x batch x seq_len). ``--budget F`` scales the steps, the warmup and the eval
batches by F (at least ``MIN_STEPS`` steps and one eval batch).

Each arm x seed run lives in its own run directory ``OUT/runs/ARM/seedS``, trained by
``ttt_jax.train.train``: a rerun resumes an interrupted run bit-exactly from its newest
checkpoint, and a finished one is not retrained. When a run is done its values (final
eval loss and bits per byte from ``metrics.jsonl``, read with ``compare``; the parameter
count from its checkpoint; whatever the study measures on the checkpoint) go to
``result.json`` in its run directory, so a rerun reads them instead of measuring again.
A run stopped by SIGTERM/SIGINT saves a checkpoint and stops the study (``Stopped``).

A study writes into OUT:
- ``results.json``: the per-seed values of every arm, the budget and the arms' configs;
  sorted keys and no timestamps or timings, so the same seeds give the same file;
- ``table.md``: the study's markdown tables (``Study.report``);
- ``curves.png`` (and the study's own figures) when matplotlib is installed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

from ttt_jax import compare
from ttt_jax.config import Config, load_config
from ttt_jax.errors import UserError
from ttt_jax.train import train

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
"""The repository's ``configs/`` folder, which the arms' config names are relative to."""
MIN_STEPS = 4
CURVE_POINTS = 5
"""Evaluations per run (and checkpoints): the points of its eval-loss curve."""
RESULT_FILE = "result.json"
CURVE_PANELS = (("loss", "train loss"), ("eval_loss", "eval loss"))
"""(metrics.jsonl key, axis label) of each panel of ``curves.png``."""


class Stopped(Exception):
  """A run stopped before its last step (a signal): rerun the study to continue."""


@dataclasses.dataclass(frozen=True)
class Arm:
  """One variant of a study: a config file of ``configs/`` and overrides."""
  name: str
  config: str
  overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Study:
  """A named comparison: its arms, their shared budget and how the results read."""
  name: str
  summary: str
  """One line for ``--list``."""
  arms: tuple[Arm, ...]
  steps: int
  warmup_steps: int
  eval_batches: int
  report: Callable[[dict[str, Any]], str]
  """results.json's content -> ``table.md``."""
  measure: Callable[[Path], dict[str, Any]] | None = None
  """A finished run directory -> extra values (e.g. measured on its checkpoint)."""
  figures: Callable[[dict[str, Any], Path], list[Path]] | None = None
  """(results, OUT) -> the study's own PNGs written into OUT (needs matplotlib)."""
  prepare: Callable[[Path, Config], tuple[str, ...]] | None = None
  """(OUT, the first run's config) -> overrides added to every run, after writing what
  they need into OUT (e.g. a generated corpus to add to ``data.corpus``)."""


class Budget(NamedTuple):
  """What every run of a study trains and evaluates at one ``--budget``."""
  steps: int
  warmup_steps: int
  eval_batches: int
  eval_every: int
  log_every: int


def budget(study: Study, scale: float) -> Budget:
  """The study's steps, warmup and eval batches scaled by ``scale``."""
  if not 0 < scale < math.inf:
    raise UserError(f"--budget: must be a finite number > 0, got {scale}")
  steps = max(MIN_STEPS, round(study.steps * scale))
  warmup = min(max(1, round(study.warmup_steps * scale)), steps - 1)
  return Budget(steps=steps, warmup_steps=warmup,
                eval_batches=max(1, round(study.eval_batches * scale)),
                eval_every=max(1, steps // CURVE_POINTS), log_every=max(1, steps // 50))


def run_overrides(arm: Arm, seed: int, plan: Budget, extra: tuple[str, ...] = ()
                  ) -> list[str]:
  """The ``--set`` values of one run: the arm's, the budget's, the seed, one device."""
  return [*arm.overrides,
          f"train.steps={plan.steps}", f"optim.warmup_steps={plan.warmup_steps}",
          f"train.seed={seed}", f"eval.batches={plan.eval_batches}",
          f"train.eval_every={plan.eval_every}", f"checkpoint.every={plan.eval_every}",
          f"train.log_every={plan.log_every}", "logging.progress_bar=false",
          "logging.tensorboard=false", "mesh.num_devices=1", "mesh.data=1", "mesh.fsdp=1",
          "mesh.tensor=1", *extra]


def run_config(arm: Arm, seed: int, plan: Budget, extra: tuple[str, ...] = ()) -> Config:
  return load_config(str(CONFIGS_DIR / arm.config), run_overrides(arm, seed, plan, extra))


def run_dir(out: Path, arm: Arm, seed: int) -> Path:
  return Path(out) / "runs" / arm.name / f"seed{seed}"


def write_json(path: Path, value: Any) -> None:
  """``value`` as indented JSON with sorted keys, replacing ``path`` atomically."""
  partial = path.with_name(path.name + ".partial")
  partial.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
  os.replace(partial, path)


def final_values(workdir: Path, steps: int) -> dict[str, Any]:
  """A finished run's final eval loss and bits per byte, its last train loss and its
  parameter count (``compare.summarize`` of its files)."""
  run = compare.read_run(str(workdir))
  evals = [row for row in run.rows if row.get("eval_loss") is not None]
  if not evals or evals[-1]["step"] != steps:
    raise UserError(f"{workdir}: no eval at the last step {steps} in metrics.jsonl; "
                    "delete this run directory and rerun")
  summary = compare.summarize(run)
  return {"eval_loss": summary["eval loss"], "eval_bpb": summary["eval bpb"],
          "train_loss": summary["train loss"], "n_params": summary["params"]}


def run_one(study: Study, arm: Arm, seed: int, plan: Budget, out: Path,
            extra: tuple[str, ...] = ()) -> dict[str, Any]:
  """The values of one arm x seed: read from its ``result.json``, or trained (resumed)
  and measured, then recorded there."""
  workdir = run_dir(out, arm, seed)
  overrides = run_overrides(arm, seed, plan, extra)
  record = workdir / RESULT_FILE
  if record.is_file():
    done = json.loads(record.read_text())
    if done.get("config") == arm.config and done.get("overrides") == overrides:
      return done["values"]
    raise UserError(f"{workdir}: trained with other settings than this command's; "
                    "use another --out (or delete it)")
  cfg = run_config(arm, seed, plan, extra)
  summary = train(cfg, workdir)
  if summary["final_step"] < cfg.train.steps:
    raise Stopped(f"study {study.name}: run {arm.name}/seed{seed} stopped at step "
                  f"{summary['final_step']} of {cfg.train.steps}; rerun the same command "
                  "to continue")
  values = final_values(workdir, cfg.train.steps)
  if study.measure is not None:
    values.update(study.measure(workdir))
  write_json(record, {"config": arm.config, "overrides": overrides, "values": values})
  return values


def check_out(out: Path, study: Study, scale: float, extra: tuple[str, ...]) -> None:
  """Records the study and budget of ``out``; refuses a folder of another study/budget."""
  settings = {"study": study.name, "budget": scale, "overrides": list(extra)}
  path = out / "settings.json"
  if path.is_file() and json.loads(path.read_text()) != settings:
    raise UserError(f"{path}: {out} holds runs of another study or --budget "
                    f"({path.read_text().strip()}); use another --out")
  out.mkdir(parents=True, exist_ok=True)
  write_json(path, settings)


def run_study(study: Study, out: Path, seeds: list[int], scale: float = 1.0,
              extra: tuple[str, ...] = (), log: Callable[[str], None] = print
              ) -> dict[str, Any]:
  """Trains (or resumes, or reads) every arm x seed, seed by seed, then writes
  ``results.json``, ``table.md`` and the plots into ``out``; returns the results.
  ``extra``: overrides for every run (tests point the data cache elsewhere)."""
  out = Path(out)
  plan = budget(study, scale)  # a refused --budget records nothing in ``out``
  check_out(out, study, scale, extra)
  if study.prepare is not None:
    extra = (*extra, *study.prepare(out, run_config(study.arms[0], seeds[0], plan, extra)))
  runs: dict[str, dict[str, Any]] = {arm.name: {} for arm in study.arms}
  for seed in seeds:
    for arm in study.arms:
      log(f"reproduce {study.name}: {arm.name} seed {seed}")
      runs[arm.name][str(seed)] = run_one(study, arm, seed, plan, out, extra)
  results = {"study": study.name, "budget": scale, "seeds": list(seeds),
             "schedule": plan._asdict(),
             "arms": {arm.name: {"config": arm.config, "overrides": list(arm.overrides)}
                      for arm in study.arms},
             "runs": runs}
  write_json(out / "results.json", results)
  (out / "table.md").write_text(study.report(results))
  written = [out / "results.json", out / "table.md"]
  if compare.have_matplotlib():
    written.append(plot_curves(study, out, seeds))
    if study.figures is not None:
      written.extend(study.figures(results, out))
  else:
    log("plots skipped: matplotlib is not installed (pip install -e '.[plots]')")
  log(f"reproduce {study.name}: wrote " + ", ".join(str(p) for p in written))
  return results


def arm_colors(names: list[str]) -> dict[str, str]:
  """A matplotlib color cycle entry ('C0', 'C1', ...) for each name, in order."""
  return {name: f"C{i % 10}" for i, name in enumerate(names)}


def plot_curves(study: Study, out: Path, seeds: list[int]) -> Path:
  """Every run's train and eval loss against the step, one color per arm: curves.png."""
  runs = [compare.read_run(str(run_dir(out, arm, seed)))._replace(name=arm.name)
          for arm in study.arms for seed in seeds]
  colors = arm_colors([arm.name for arm in study.arms])
  figure = compare.new_figure(len(CURVE_PANELS), "reproduce")
  panels = figure.subplots(1, len(CURVE_PANELS), squeeze=False)[0]
  for axes, (key, label) in zip(panels, CURVE_PANELS):
    compare.draw_curves(axes, runs, key, label, colors)
  figure.suptitle(f"{study.name}: {len(seeds)} seed(s) per arm")
  path = out / "curves.png"
  compare.save_figure(figure, path, "reproduce")
  return path


def values(results: dict[str, Any], arm: str, key: str) -> list[float]:
  """``key`` of every seed of ``arm``, in the order of ``results['seeds']``."""
  return [results["runs"][arm][str(seed)][key] for seed in results["seeds"]]
