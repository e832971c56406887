"""Evaluation tasks: what ``python -m ttt_jax.evaluate --task NAME`` runs.

A task registers an ``EvalTask`` in ``registry.EVAL_TASKS`` under its name. The command
line has ``--workdir``, ``--task`` and ``--set KEY=VALUE`` for every task and adds the
chosen task's own flags (``add_arguments``); ``run(args)`` returns the JSON-able result
that is printed and written to the workdir.

Where: ``identity`` is what the command asked for (task, weights, overrides, the task's
flags), recorded in the result as ``evaluation``. The run's default evaluation (no
``--set``, every flag at its default) writes ``eval_<task>.json``; any other, or one
whose ``eval_<task>.json`` records another identity (an older version's file), writes
``eval_<task>-<first 8 hex of the identity's sha256>.json`` (``results_path``). So
rerunning an evaluation replaces its own file and never another evaluation's.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from ttt_jax import registry
from ttt_jax.errors import ConfigError

RAW_WEIGHTS = "raw"
"""The ``weights`` of an evaluation of the checkpoint's params as trained (the field
leaves room for averaged weights)."""
COMMON_FLAGS = ("workdir", "task", "set")
"""Parsed arguments every task has; the others are the chosen task's own flags."""


def _no_arguments(parser: argparse.ArgumentParser) -> None:
  del parser


@dataclasses.dataclass(frozen=True)
class EvalTask:
  """One ``evaluate --task`` choice."""
  name: str
  run: Callable[[argparse.Namespace], dict[str, Any]]
  """The result of the task for the parsed command line (``args.workdir``, ``args.set``
  and the task's own flags)."""
  add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
  """Adds the task's own flags to the command line."""


def register(task: EvalTask) -> EvalTask:
  """Registers ``task`` under its name in ``registry.EVAL_TASKS``."""
  return registry.EVAL_TASKS.register(task.name, task)


def add_batches_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--batches", type=int, default=0,
                      help="validation batches (0 = eval.batches of the run's config)")


def batches(args: argparse.Namespace) -> int:
  """``--batches``, checked (0: the task's default)."""
  if args.batches < 0:
    raise ConfigError(f"--batches: must be >= 0, got {args.batches}")
  return args.batches


def identity(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
  """What an evaluation command asked for: task, weights, ``--set`` overrides (in order)
  and the task's own flags; ``default``: no overrides and every flag at its default."""
  weights = getattr(args, "weights", RAW_WEIGHTS)  # a task's --weights, if it has one
  flags = {k: v for k, v in sorted(vars(args).items()) if k not in COMMON_FLAGS + ("weights",)}
  default = (not args.set and weights == RAW_WEIGHTS
             and all(v == parser.get_default(k) for k, v in flags.items()))
  return {"task": args.task, "weights": weights, "overrides": list(args.set),
          "flags": flags, "default": default}


def identity_hash(evaluation: dict[str, Any]) -> str:
  """The first 8 hex digits of the sha256 of ``evaluation`` (an ``identity``)."""
  blob = json.dumps(evaluation, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:8]


def _recorded_identity(path: Path) -> Any:
  try:
    return json.loads(path.read_text()).get("evaluation")
  except (OSError, ValueError, AttributeError):
    return None


def results_path(workdir: Path, evaluation: dict[str, Any]) -> Path:
  """The file an evaluation's result goes to (module doc): ``eval_<task>.json`` for the
  default evaluation unless it holds another's, else ``eval_<task>-<hash8>.json``."""
  canonical = workdir / f"eval_{evaluation['task']}.json"
  if evaluation["default"] and (not canonical.exists()
                                or _recorded_identity(canonical) == evaluation):
    return canonical
  return workdir / f"eval_{evaluation['task']}-{identity_hash(evaluation)}.json"
