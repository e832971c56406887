"""Evaluation of a trained run: ``python -m ttt_jax.evaluate --workdir W --task lm``.

Tasks:
- ``lm``: loss, perplexity and bits per byte of the newest checkpoint on the run's
  validation split (the same fixed batches the train loop evaluates on, or
  ``--batches N`` of them).
- CCT runs (``ttt_jax.cct_eval``): ``sufficiency``, ``compression`` (``--contexts``),
  ``passkey`` (``--passkey-lengths/-depths/-trials``), ``perplexity`` (against
  ``--baseline W2``, a run of the same config without CCT), ``governance`` (the
  commitment hash chain's overhead per generated token, ``cct_eval.GOVERNANCE_SHAPE``)
  and ``all`` (every one of them in the guide's "Results JSON" shape, tier-1 criteria as
  PASS/FAIL).

Prints a JSON object and writes it to ``W/eval_<task>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

from ttt_jax import cct_eval
from ttt_jax import sharding
from ttt_jax.config import ConfigError
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.data import pipeline
from ttt_jax.train import evaluate, load_trained, make_eval_step, user_errors

TASKS = ("lm",) + cct_eval.TASKS


def evaluate_lm(workdir: Path, overrides: list[str], batches: int) -> dict:
  log = lambda m: print(m, file=sys.stderr)  # noqa: E731
  cfg, graphdef, params, step, mesh = load_trained(workdir, overrides, log=log)
  corpus = corpus_lib.prepare_corpus(cfg.data, log=log)
  batch_size = cfg.eval.batch_size or cfg.train.batch_size
  eval_batches = [sharding.put_batch(b, mesh) for b in pipeline.eval_batches(
      corpus.val_tokens, seq_len=cfg.data.seq_len, batch_size=batch_size,
      num_batches=batches or cfg.eval.batches, process_index=jax.process_index(),
      process_count=jax.process_count(),
      annotators=pipeline.batch_annotators(cfg, corpus.tokenizer),
      eos_id=corpus_lib.document_eos_id(cfg.data, corpus))]
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
  parser.add_argument("--baseline", default="", help="perplexity/all: the baseline run")
  parser.add_argument("--contexts", default="1024,4096,8192,32768",
                      help="compression/all: context lengths")
  parser.add_argument("--passkey-lengths", default="512,1024")
  parser.add_argument("--passkey-depths", default="0,0.25,0.5,0.75,1")
  parser.add_argument("--passkey-trials", type=int, default=2)
  args = parser.parse_args(argv)
  with user_errors():
    if args.task not in TASKS:
      raise ConfigError(f"--task: {args.task!r} is not one of {list(TASKS)}")
    if args.batches < 0:
      raise ConfigError(f"--batches: must be >= 0, got {args.batches}")
    workdir = Path(args.workdir)
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    depths = [float(v) for v in args.passkey_depths.split(",") if v]
    batches = args.batches or 8
    try:
      if args.task == "lm":
        result = evaluate_lm(workdir, args.set, args.batches)
      elif args.task == "sufficiency":
        result = cct_eval.run_sufficiency(workdir, args.set, batches)
      elif args.task == "compression":
        result = cct_eval.run_compression(workdir, args.set, ints(args.contexts))
      elif args.task == "passkey":
        result = cct_eval.run_passkey(workdir, args.set, ints(args.passkey_lengths), depths,
                                      args.passkey_trials)
      elif args.task == "governance":
        result = cct_eval.run_governance(workdir, args.set)
      elif args.task == "perplexity":
        result = cct_eval.run_perplexity(workdir, args.baseline, args.set, args.batches,
                                         evaluate_lm)
      else:
        result = cct_eval.run_all(workdir, args.baseline, args.set, batches,
                                  ints(args.contexts), ints(args.passkey_lengths), depths,
                                  args.passkey_trials, evaluate_lm)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    (workdir / f"eval_{args.task}.json").write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
