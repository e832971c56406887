"""Language-model evaluation: validation loss, perplexity and bits per byte.

Over fixed validation batches (the split's first ``eval.batches``, the same at every
evaluation), with N the summed next-token NLL in nats, n the target tokens and b the
UTF-8 bytes they decode to (``Tokenizer.piece_bytes``):

  eval_loss = N / n,   eval_ppl = exp(eval_loss),   eval_bpb = N / (ln 2 * b)

``evaluate`` is what the train loop logs; ``evaluate_lm`` scores the newest checkpoint
of a run directory (``python -m ttt_jax.evaluate --task lm``, registered here).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax import quant, runs, sharding
from ttt_jax.config import Config
from ttt_jax.data import bpb
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.errors import ConfigError
from ttt_jax.eval import tasks
from ttt_jax.training.step import make_eval_step


def piece_bytes(corpus: corpus_lib.Corpus, mesh: jax.sharding.Mesh) -> jax.Array:
  """int32 [V] UTF-8 bytes of each token (zeros without a tokenizer: no bpb), replicated."""
  values = (corpus.tokenizer.piece_bytes if corpus.tokenizer else
            np.zeros(corpus.vocab_size, np.int32))
  return jax.device_put(np.asarray(values, np.int32), sharding.replicated(mesh))


def evaluate(eval_fn: Callable, params: Any, batches: Iterable[dict[str, jax.Array]],
             piece_bytes: jax.Array) -> dict[str, float]:
  """``eval_loss``, ``eval_ppl`` and (with bytes) ``eval_bpb`` of ``params`` over
  ``batches``; ``eval_fn`` is a jitted ``training.step.make_eval_step``."""
  totals = None
  for batch in batches:
    out = eval_fn(params, batch, piece_bytes)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  loss = float(totals["nll"]) / float(totals["tokens"])
  row = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0))}
  if float(totals["bytes"]) > 0:
    row["eval_bpb"] = bpb.bits_per_byte(float(totals["nll"]), int(totals["bytes"]))
  return row


def validation_batches(cfg: Config, corpus: corpus_lib.Corpus, mesh: jax.sharding.Mesh,
                       batches: int = 0) -> tuple[list[dict[str, jax.Array]], int]:
  """(the first ``batches`` validation batches (0: ``eval.batches``) on the mesh, their
  batch size): what the train loop evaluates on."""
  batch_size = cfg.eval.batch_size or cfg.train.batch_size
  _, host_batches = runs.run_batches(cfg, corpus, train_batch_size=None,
                                     eval_batch_size=batch_size,
                                     eval_batches=batches or cfg.eval.batches)
  return [sharding.put_batch(b, mesh) for b in host_batches], batch_size


def evaluate_lm(workdir: Path, overrides: list[str], batches: int,
                weights: str = tasks.RAW_WEIGHTS, artifact: str = "") -> dict[str, Any]:
  """``evaluate`` of the newest usable checkpoint in ``workdir`` on the validation batches
  of ``data.corpus`` (``batches`` of them; 0: ``eval.batches``), read with the run's own
  tokenizer (``runs.load_trained``), with what was scored: the checkpoint step, its
  ``weights`` ('raw', or the run's 'ema' / 'swa' average), the corpus spec, split and
  content hash, and the tokenizer's hash. ``artifact``: score that quantized artifact
  (``python -m ttt_jax.export``) instead."""
  if artifact and weights != tasks.RAW_WEIGHTS:
    raise ConfigError(f"--weights {weights}: an --artifact holds its own weights; "
                      "export the average instead")
  log = lambda m: print(m, file=sys.stderr)  # noqa: E731
  quantized = quant.read_artifact(artifact) if artifact else None  # refused before loading
  cfg, graphdef, params, step, mesh = runs.load_trained(workdir, overrides, log=log,
                                                        weights=weights)
  corpus = corpus_lib.prepare_corpus(cfg.data, log=log)
  if quantized is not None:
    params, step = quant.artifact_params(quantized, params, corpus.meta.get("tokenizer_hash"))
  eval_batches, batch_size = validation_batches(cfg, corpus, mesh, batches)
  row = evaluate(jax.jit(make_eval_step(graphdef)), params, eval_batches,
                 piece_bytes(corpus, mesh))
  if artifact:
    weights = f"artifact {artifact}"
  return {"task": "lm", "workdir": str(workdir), "step": step, "weights": weights,
          "corpus": {"spec": list(cfg.data.corpus), "split": "val",
                     "sha256": corpus.meta.get("corpus_hash")},
          "tokenizer_hash": corpus.meta.get("tokenizer_hash"),
          "batches": len(eval_batches), "batch_size": batch_size,
          "seq_len": cfg.data.seq_len, **row}


def _run(args: argparse.Namespace) -> dict[str, Any]:
  return evaluate_lm(Path(args.workdir), args.set, tasks.batches(args), args.weights,
                     args.artifact)


def _arguments(parser: argparse.ArgumentParser) -> None:
  tasks.add_batches_argument(parser)
  parser.add_argument("--weights", choices=("raw", "ema", "swa"), default=tasks.RAW_WEIGHTS,
                      help="the params as trained, or the run's EMA / SWA average")
  parser.add_argument("--artifact", default="", help="score this quantized artifact "
                      "(python -m ttt_jax.export) instead of the newest checkpoint")


LM = tasks.register(tasks.EvalTask("lm", _run, _arguments))
"""``evaluate --task lm [--batches N] [--weights raw|ema|swa | --artifact F]``."""
