"""Evaluation of a trained run: ``python -m ttt_jax.evaluate --workdir W --task lm``.

Tasks:
- ``lm``: loss, perplexity and bits per byte of the newest checkpoint on the run's
  validation split (the same fixed batches the train loop evaluates on, or
  ``--batches N`` of them).

Prints a JSON object and writes it to ``W/eval_<task>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

from ttt_jax import data as data_lib
from ttt_jax import sharding
from ttt_jax.config import ConfigError
from ttt_jax.train import evaluate, load_trained, make_eval_step, user_errors

TASKS = ("lm",)


def evaluate_lm(workdir: Path, overrides: list[str], batches: int) -> dict:
  log = lambda m: print(m, file=sys.stderr)  # noqa: E731
  cfg, graphdef, params, step, mesh = load_trained(workdir, overrides, log=log)
  corpus = data_lib.prepare_corpus(cfg.data, log=log)
  batch_size = cfg.eval.batch_size or cfg.train.batch_size
  eval_batches = [sharding.put_batch(b, mesh) for b in data_lib.eval_batches(
      corpus.val_tokens, seq_len=cfg.data.seq_len, batch_size=batch_size,
      num_batches=batches or cfg.eval.batches, process_index=jax.process_index(),
      process_count=jax.process_count())]
  piece_bytes = np.asarray(corpus.tokenizer.piece_bytes if corpus.tokenizer else
                           np.zeros(corpus.vocab_size), np.int32)
  eval_step = jax.jit(make_eval_step(graphdef))
  row = evaluate(eval_step, params, eval_batches, jax.device_put(piece_bytes,
                                                                 sharding.replicated(mesh)))
  return {"task": "lm", "workdir": str(workdir), "step": step,
          "batches": len(eval_batches), "batch_size": batch_size,
          "seq_len": cfg.data.seq_len, **row}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.evaluate", description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--task", default="lm", help=f"one of {', '.join(TASKS)}")
  parser.add_argument("--batches", type=int, default=0,
                      help="validation batches (0 = eval.batches of the run's config)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  args = parser.parse_args(argv)
  with user_errors():
    if args.task not in TASKS:
      raise ConfigError(f"--task: {args.task!r} is not one of {list(TASKS)}")
    if args.batches < 0:
      raise ConfigError(f"--batches: must be >= 0, got {args.batches}")
    workdir = Path(args.workdir)
    result = evaluate_lm(workdir, args.set, args.batches)
    (workdir / f"eval_{args.task}.json").write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
