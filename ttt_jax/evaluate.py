"""Evaluation of a trained run: ``python -m ttt_jax.evaluate --workdir W --task lm``.

Tasks (``registry.EVAL_TASKS``; ``--help`` with ``--task T`` lists T's own flags):
- ``lm``: loss, perplexity and bits per byte of the newest checkpoint on the run's
  validation split (the same fixed batches the train loop evaluates on, or
  ``--batches N`` of them).
- CCT runs (``ttt_jax.cct.evals``): ``sufficiency``, ``compression`` (``--contexts``),
  ``passkey`` (``--passkey-lengths/-depths/-trials``), ``perplexity`` (against
  ``--baseline W2``, a run of the same config without CCT), ``governance`` (the
  commitment hash chain's overhead per generated token, ``cct.evals.GOVERNANCE_SHAPE``)
  and ``all`` (every one of them in the guide's "Results JSON" shape, tier-1 criteria as
  PASS/FAIL).

Prints a JSON object and writes it to ``W/eval_<task>.json``.
"""

from __future__ import annotations

import argparse
import json

from ttt_jax import registry
from ttt_jax.errors import ConfigError, user_errors
from ttt_jax.eval import lm  # noqa: F401  (registers the 'lm' task)
from ttt_jax.eval.tasks import EvalTask
from ttt_jax.runs import check_workdir


def _task_name(argv: list[str] | None) -> str:
  chooser = argparse.ArgumentParser(add_help=False)
  chooser.add_argument("--task", default="lm")
  return chooser.parse_known_args(argv)[0].task


def main(argv: list[str] | None = None) -> None:
  with user_errors():
    task: EvalTask = registry.EVAL_TASKS.get(_task_name(argv))
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.evaluate", description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--task", default="lm",
                      help=f"one of {', '.join(registry.EVAL_TASKS.names())}")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  task.add_arguments(parser)
  args = parser.parse_args(argv)
  with user_errors():
    workdir = check_workdir(args.workdir)
    try:
      result = task.run(args)
    except ValueError as e:  # a task's one-line refusal (wrong kind of run, ...)
      raise ConfigError(str(e)) from None
    (workdir / f"eval_{args.task}.json").write_text(
        json.dumps(result, indent=2) + "\n")
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
