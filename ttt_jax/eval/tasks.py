"""Evaluation tasks: what ``python -m ttt_jax.evaluate --task NAME`` runs.

A task registers an ``EvalTask`` in ``registry.EVAL_TASKS`` under its name. The command
line has ``--workdir``, ``--task`` and ``--set KEY=VALUE`` for every task and adds the
chosen task's own flags (``add_arguments``); ``run(args)`` returns the JSON-able result
that is printed and written to ``WORKDIR/eval_<task>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

from ttt_jax import registry
from ttt_jax.errors import ConfigError


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
