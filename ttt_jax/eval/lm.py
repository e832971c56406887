"""Language-model evaluation: validation loss, perplexity and bits per byte.

Over fixed validation batches (the split's first ``eval.batches``, the same at every
evaluation), with N the summed next-token NLL in nats, n the target tokens and b the
UTF-8 bytes they decode to (``Tokenizer.piece_bytes``):

  eval_loss = N / n,   eval_ppl = exp(eval_loss),   eval_bpb = N / (ln 2 * b)

``evaluate`` is what the train loop logs; ``evaluate_lm`` scores the newest checkpoint
of a run directory (``python -m ttt_jax.evaluate --task lm``, registered here), by
sliding windows (``sliding``) when ``eval.stride`` is below ``data.seq_len``, over the
same tokens (``val_stream``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax import quant, runs, sharding
from ttt_jax.config import Config
from ttt_jax.data import bpb
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.data import pipeline
from ttt_jax.errors import CheckpointError, ConfigError
from ttt_jax.eval import sliding, tasks
from ttt_jax.lora import files as lora_files
from ttt_jax.training.step import make_eval_step


def host_piece_bytes(corpus: corpus_lib.Corpus) -> np.ndarray:
  """int32 [V] UTF-8 bytes of each token (zeros without a tokenizer: no bpb)."""
  values = (corpus.tokenizer.piece_bytes if corpus.tokenizer else
            np.zeros(corpus.vocab_size, np.int32))
  return np.asarray(values, np.int32)


def piece_bytes(corpus: corpus_lib.Corpus, mesh: jax.sharding.Mesh) -> jax.Array:
  """``host_piece_bytes``, replicated over ``mesh``."""
  return jax.device_put(host_piece_bytes(corpus), sharding.replicated(mesh))


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


def val_stream(cfg: Config, corpus: corpus_lib.Corpus, mesh: jax.sharding.Mesh,
               batches: int, max_tokens: int = 0) -> sliding.Stream:
  """The validation tokens an evaluation scores, with what their windows need: those of
  ``batches`` validation batches (0: ``eval.batches``; ``sliding.eval_stream``), or with
  ``max_tokens`` the split's first ``max_tokens`` tokens (all of it if fewer)."""
  batch_size = cfg.eval.batch_size or cfg.train.batch_size
  if 0 < max_tokens <= cfg.data.seq_len:
    raise ConfigError(f"ttt_eval.max_tokens: {max_tokens} tokens do not fill one window of "
                      f"data.seq_len={cfg.data.seq_len} + 1")
  tokens = (np.asarray(corpus.val_tokens[:max_tokens]) if max_tokens else
            sliding.eval_stream(corpus.val_tokens, seq_len=cfg.data.seq_len,
                                batch_size=batch_size, batches=batches or cfg.eval.batches))
  return sliding.Stream(tokens, cfg.data.seq_len, batch_size, host_piece_bytes(corpus), mesh,
                        pipeline.batch_annotators(cfg, corpus.tokenizer),
                        corpus_lib.document_eos_id(cfg.data, corpus))


def run_record(workdir: Path, cfg: Config, corpus: corpus_lib.Corpus, step: int,
               weights: str = tasks.RAW_WEIGHTS) -> dict[str, Any]:
  """What an evaluation of a run scored: the run, the checkpoint step, its ``weights``,
  the corpus spec, split and content hash, and the tokenizer's hash."""
  return {"workdir": str(workdir), "step": step, "weights": weights,
          "corpus": {"spec": list(cfg.data.corpus), "split": "val",
                     "sha256": corpus.meta.get("corpus_hash")},
          "tokenizer_hash": corpus.meta.get("tokenizer_hash")}


def validation_batches(cfg: Config, corpus: corpus_lib.Corpus, mesh: jax.sharding.Mesh,
                       batches: int = 0) -> tuple[list[dict[str, jax.Array]], int]:
  """(the first ``batches`` validation batches (0: ``eval.batches``) on the mesh, their
  batch size): what the train loop evaluates on."""
  batch_size = cfg.eval.batch_size or cfg.train.batch_size
  _, host_batches = runs.run_batches(cfg, corpus, train_batch_size=None,
                                     eval_batch_size=batch_size,
                                     eval_batches=batches or cfg.eval.batches)
  return [sharding.put_batch(b, mesh) for b in host_batches], batch_size


class Loaded(NamedTuple):
  """A run's weights to evaluate, and what they are evaluated with."""
  cfg: Config
  graphdef: Any
  params: Any
  step: int
  mesh: jax.sharding.Mesh
  corpus: corpus_lib.Corpus
  weights: str
  """'raw', 'ema', 'swa' or 'artifact <path>'."""


def load_weights(workdir: Path, overrides: list[str], weights: str = tasks.RAW_WEIGHTS,
                 artifact: str = "", adapter: str = "") -> Loaded:
  """The newest usable checkpoint of ``workdir`` (``runs.load_trained``: read with the
  run's own tokenizer) and its validation text: its params as trained ('raw'), the run's
  'ema' / 'swa' average, or with ``artifact`` that quantized artifact (``python -m
  ttt_jax.export``) dequantized, refused where it was exported from another model
  config (``runs.model_changes``); ``adapter``: an adapter folded into them
  (``lora.files.apply_adapter``)."""
  if artifact and weights != tasks.RAW_WEIGHTS:
    raise ConfigError(f"--weights {weights}: an --artifact holds its own weights; export "
                      f"the average instead (python -m ttt_jax.export --weights {weights})")
  if artifact and adapter:
    raise ConfigError("--adapter: an --artifact holds its own weights; merge the adapter "
                      "(python -m ttt_jax.lora merge) and export that run instead")
  log = lambda m: print(m, file=sys.stderr)  # noqa: E731
  quantized = quant.read_artifact(artifact) if artifact else None  # refused before loading
  cfg, graphdef, params, step, mesh = runs.load_trained(workdir, overrides, log=log,
                                                        weights=weights)
  corpus = corpus_lib.prepare_corpus(cfg.data, log=log)
  if quantized is not None:
    changes = runs.model_changes(quantized.header.get("config", {}).get("model", {}),
                                 cfg.model) if "config" in quantized.header else []
    if changes:  # same shapes, another model: its weights would be read as this one
      raise CheckpointError(f"{artifact}: exported from another model than this run's "
                            f"({', '.join(changes)}); evaluate it with the --workdir it "
                            "was exported from")
    params, step = quant.artifact_params(quantized, params, corpus.meta.get("tokenizer_hash"))
    weights = f"artifact {artifact}"
  if adapter:
    params = lora_files.apply_adapter(adapter, cfg, params, corpus.meta.get("tokenizer_hash"),
                                      log=log)
    weights = f"{weights} + adapter {adapter}"
  return Loaded(cfg, graphdef, params, step, mesh, corpus, weights)


def add_weights_arguments(parser: argparse.ArgumentParser, batches: bool = True) -> None:
  """``--batches`` (unless not ``batches``), ``--weights``, ``--artifact`` and
  ``--adapter`` (``load_weights``)."""
  if batches:
    tasks.add_batches_argument(parser)
  parser.add_argument("--weights", choices=("raw", "ema", "swa"), default=tasks.RAW_WEIGHTS,
                      help="the params as trained, or the run's EMA / SWA average")
  parser.add_argument("--artifact", default="", help="score this quantized artifact "
                      "(python -m ttt_jax.export) instead of the newest checkpoint")
  parser.add_argument("--adapter", default="", metavar="PATH", help="fold this LoRA "
                      "adapter (an adapter directory or an adapter run) into the weights")


def evaluate_lm(workdir: Path, overrides: list[str], batches: int,
                weights: str = tasks.RAW_WEIGHTS, artifact: str = "",
                adapter: str = "") -> dict[str, Any]:
  """``evaluate`` of ``load_weights``'s weights on the validation batches of
  ``data.corpus`` (``batches`` of them; 0: ``eval.batches``), with what was scored
  (``run_record``). With ``eval.stride`` below ``data.seq_len``, by sliding windows over
  the tokens those batches cover (``sliding.evaluate``), also giving the scored
  ``tokens`` and ``bytes``."""
  cfg, graphdef, params, step, mesh, corpus, weights = load_weights(workdir, overrides,
                                                                    weights, artifact, adapter)
  batch_size = cfg.eval.batch_size or cfg.train.batch_size
  stride = cfg.eval.stride or cfg.data.seq_len
  if stride == cfg.data.seq_len:  # the train loop's evaluation, bit for bit
    eval_batches, _ = validation_batches(cfg, corpus, mesh, batches)
    row = evaluate(jax.jit(make_eval_step(graphdef)), params, eval_batches,
                   piece_bytes(corpus, mesh))
    count = len(eval_batches)
  else:
    stream = val_stream(cfg, corpus, mesh, batches)
    row = sliding.evaluate(graphdef, params, stream, stride)
    count = (len(stream.tokens) - 1) // (batch_size * cfg.data.seq_len)
  return {"task": "lm", **run_record(workdir, cfg, corpus, step, weights), "batches": count,
          "batch_size": batch_size, "seq_len": cfg.data.seq_len, "stride": stride, **row}


def _run(args: argparse.Namespace) -> dict[str, Any]:
  return evaluate_lm(Path(args.workdir), args.set, tasks.batches(args), args.weights,
                     args.artifact, args.adapter)


LM = tasks.register(tasks.EvalTask("lm", _run, add_weights_arguments))
"""``evaluate --task lm [--batches N] [--weights raw|ema|swa | --artifact F]``."""
