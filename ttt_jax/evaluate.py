"""Evaluation of a trained run: ``python -m ttt_jax.evaluate --workdir W --task lm``.

Tasks (``registry.EVAL_TASKS``; ``--help`` with ``--task T`` lists T's own flags):
- ``lm``: loss, perplexity and bits per byte of the newest checkpoint on the run's
  validation split (the same fixed batches the train loop evaluates on, or
  ``--batches N`` of them). With ``--set eval.stride=S`` (< ``data.seq_len``) by sliding
  windows over the tokens those batches cover (``eval.sliding``): each window of seq_len
  tokens scores only its last S targets (the first all), so each of the N - 1 targets is
  scored once, with at least seq_len - S tokens of context; ``tokens`` and ``bytes``
  report what was scored. S = seq_len (the default) is the train loop's evaluation, bit
  for bit.
- ``ttt``: legal score-first test-time training (``eval.score_first``, settings in the
  ``ttt_eval`` section): the stream's sliding windows are cut into chunks; each chunk is
  scored with the current weights, then (all but the last) SGD with momentum trains on
  its tokens. A token's score depends only on the checkpoint and the tokens before it;
  nothing is trained on before it is scored or re-scored after. Reports ``sliding``
  (no TTT) and ``ttt`` bits per byte side by side, ``delta_bpb``, per-chunk NLL, SGD
  steps and the wall time of each pass; the checkpoint is only read.
- ``probes``: the capability probes of ``--probes F.jsonl`` (``eval.probes``: regex and
  substring checks of greedy completions, teacher-forced log p(expected | prompt)), each
  probe's result and the pass rate per kind and mean log-probability.
- CCT runs (``ttt_jax.cct.evals``): ``sufficiency``, ``compression`` (``--contexts``),
  ``passkey`` (``--passkey-lengths/-depths/-trials``), ``perplexity`` (against
  ``--baseline W2``, a run of the same config without CCT), ``governance`` (the
  commitment hash chain's overhead per generated token, ``cct.evals.GOVERNANCE_SHAPE``)
  and ``all`` (every one of them in the guide's "Results JSON" shape, tier-1 criteria as
  PASS/FAIL).

Every task that loads the run (``runs.load_trained``) reads text with the run's own
``tokenizer.model``, whatever ``--set data.corpus=...`` names: scores on another corpus
are the run's tokens' losses, comparable with its own. ``--set data.tokenizer=PATH`` is
accepted only if PATH is the same model (by content hash), else refused in one line.

Prints a JSON object, which records the ``evaluation`` asked for (task, weights,
the overrides and the task's flags) and, for ``lm``, the checkpoint step, weights, corpus
(``data.corpus`` spec, split, content hash) and tokenizer hash. It writes it to the
workdir: the default evaluation (no ``--set``, default flags) to ``eval_<task>.json``,
any other to ``eval_<task>-<hash8>.json``, with hash8 from its ``evaluation``, so one
evaluation never replaces another's file (``eval.tasks.results_path``); the file
written is named on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from ttt_jax import diagnostics, registry
from ttt_jax.errors import ConfigError, user_errors
from ttt_jax.eval import lm  # noqa: F401  (registers the 'lm' task)
from ttt_jax.eval import probes  # noqa: F401  (registers the 'probes' task)
from ttt_jax.eval import score_first  # noqa: F401  (registers the 'ttt' task)
from ttt_jax.eval import tasks
from ttt_jax.runs import check_workdir


def _task_name(argv: list[str] | None) -> str:
  chooser = argparse.ArgumentParser(add_help=False)
  chooser.add_argument("--task", default="lm")
  return chooser.parse_known_args(argv)[0].task


def main(argv: list[str] | None = None) -> None:
  with user_errors():
    task: tasks.EvalTask = registry.EVAL_TASKS.get(_task_name(argv))
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.evaluate", description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--task", default="lm",
                      help=f"one of {', '.join(registry.EVAL_TASKS.names())}")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  task.add_arguments(parser)
  args = parser.parse_args(argv)
  with user_errors():
    workdir = check_workdir(args.workdir)
    diagnostics.library_logs_until_exit(diagnostics.run_log(workdir))
    try:
      result = task.run(args)
    except ValueError as e:  # a task's one-line refusal (wrong kind of run, ...)
      raise ConfigError(str(e)) from None
    result = {**result, "evaluation": tasks.identity(args, parser)}
    path = tasks.results_path(workdir, result["evaluation"])
    path.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {path}", file=sys.stderr)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
