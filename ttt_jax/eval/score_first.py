"""Legal score-first test-time training at evaluation: ``evaluate --task ttt``.

A token's prediction may depend only on the weights given and on the tokens before it;
every token is scored once, from a full softmax, before anything trains on it, and
nothing is re-scored. So the stream's sliding windows (``sliding``, stride
``ttt_eval.stride``) are cut, in order, into chunks of whole scoring batches
(``ttt_eval.chunk_tokens`` targets, rounded down), and for each chunk ``c``:

  1. score: its windows' NLL with the current weights (the jitted ``sliding`` step);
  2. adapt (every chunk but the last): ``ttt_eval.epochs`` passes of SGD with momentum
     over windows of the chunk's own scored targets (``sliding.plan`` with stride
     ``seq_len``; their context reaches back only into tokens already scored), lr
     ``ttt_eval.lr``, cosine-decayed over the chunks with ``ttt_eval.cosine``, gradients
     clipped to ``ttt_eval.grad_clip``; the velocity carries across chunks.

``ttt_eval.params`` chooses which parameters adapt ('all', 'matrices' or a path
regex); the others stay as given. The weights are an argument (``evaluate``: the raw
checkpoint's here, averaged or dequantized ones elsewhere), never written back: the
run's checkpoints are only read. The same batches scored with the unadapted weights
give the sliding-window figure without TTT, reported beside it; with ``epochs=0`` the
two are equal bit for bit (``sliding.totals`` sums batches, not chunks).

The result: ``sliding`` and ``ttt`` (loss, perplexity, bits per byte, scored tokens and
bytes), ``delta_bpb`` (ttt - sliding; absent, like ``eval_bpb``, where the tokens have
no bytes: a pre-tokenized corpus without a tokenizer), per-chunk summed NLL and tokens,
the SGD steps taken, and the wall time of each pass (compilation included).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.config import Config, to_dict
from ttt_jax.config.schema import TTTEvalConfig
from ttt_jax.errors import ConfigError
from ttt_jax.eval import lm as eval_lm
from ttt_jax.eval import sliding, tasks
from ttt_jax.training import optim
from ttt_jax.training.state import model_fn


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One chunk: the windows it scores and the windows of its targets it trains on."""
  scored: sliding.Windows
  train: sliding.Windows


def chunks(stream: sliding.Stream, stride: int, chunk_tokens: int) -> list[Chunk]:
  """The stream's sliding windows in chunks of whole scoring batches (module doc)."""
  windows = sliding.plan(0, len(stream.tokens) - 1, stream.seq_len, stride)
  per_chunk = stream.batch_size * max(1, chunk_tokens // (stride * stream.batch_size))
  parts = [windows[i:i + per_chunk] for i in range(0, len(windows), per_chunk)]
  return [Chunk(part, sliding.plan(int(part.prev_ends[0]), int(part.ends[-1]),
                                   stream.seq_len, stream.seq_len)) for part in parts]


def path_name(path: tuple) -> str:
  """A parameter's '/'-joined path (what a ``ttt_eval.params`` regex searches)."""
  names = [str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))
           for entry in path]
  return "/".join(name for name in names if name != "value")


def adapted_leaves(cfg: Config, vocab_size: int, params: Any) -> list[bool]:
  """Per leaf of ``params`` (flattened): whether ``ttt_eval.params`` adapts it."""
  choice = cfg.ttt_eval.params
  paths = [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if choice == "all":
    chosen = [True] * len(paths)
  elif choice == "matrices":
    abstract = nnx.state(nnx.eval_shape(model_fn(cfg, vocab_size)))
    groups = jax.tree.leaves(optim.param_groups(nnx.get_partition_spec(abstract)))
    if len(groups) != len(paths):
      raise ValueError(f"ttt_eval.params: the weights have {len(paths)} arrays, the "
                       f"model {len(groups)}")
    chosen = [group == optim.MATRIX for group in groups]
  else:
    chosen = [re.search(choice, path) is not None for path in paths]
  if not any(chosen):
    raise ConfigError(f"ttt_eval.params: {choice!r} matches no parameter (paths look like "
                      f"{paths[0]!r})")
  return chosen


@functools.lru_cache(maxsize=8)
def make_adapt_step(graphdef: nnx.GraphDef, adapt: tuple[bool, ...], momentum: float,
                    grad_clip: float):
  """Jitted ``(params, velocity, batch, lr) -> (params, velocity)``: one SGD step with
  momentum (``v = momentum * v + g``, ``p = p - lr * v``) on the mean NLL of the batch's
  masked targets, gradients clipped to global norm ``grad_clip`` (0: not), over the
  leaves ``adapt`` marks (``velocity``: their list). Cached: one compilation per model
  and setting."""
  def step(params: Any, velocity: list[jax.Array], batch: dict[str, jax.Array],
           lr: jax.Array):
    leaves, treedef = jax.tree.flatten(params)
    trained = [leaf for leaf, on in zip(leaves, adapt) if on]

    def full(new: list[jax.Array]) -> Any:
      it = iter(new)
      return jax.tree.unflatten(treedef, [next(it) if on else leaf
                                          for leaf, on in zip(leaves, adapt)])

    def loss_fn(new: list[jax.Array]) -> jax.Array:
      sum_nll, tokens = sliding.masked_nll(nnx.merge(graphdef, full(new)), batch)
      return sum_nll / jnp.maximum(tokens, 1.0)

    grads = jax.grad(loss_fn)(trained)
    if grad_clip > 0:
      norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in grads))
      grads = [g * jnp.minimum(1.0, grad_clip / (norm + 1e-12)) for g in grads]
    velocity = [momentum * v + g for v, g in zip(velocity, grads)]
    trained = [p - (lr * v).astype(p.dtype) for p, v in zip(trained, velocity)]
    return full(trained), velocity

  return jax.jit(step)


def chunk_lr(ttt: TTTEvalConfig, index: int, count: int) -> float:
  """The SGD learning rate on chunk ``index`` of ``count``."""
  if not ttt.cosine or count <= 1:
    return ttt.lr
  return ttt.lr * 0.5 * (1.0 + math.cos(math.pi * index / (count - 1)))


def run(graphdef: nnx.GraphDef, params: Any, stream: sliding.Stream, ttt: TTTEvalConfig,
        adapt: list[bool], stride: int,
        on_adapt: Callable[[int], None] = lambda c: None) -> dict[str, Any]:
  """Score-first TTT of ``params`` over ``stream`` (module doc): per-chunk summed NLL
  and tokens, the totals over every scored batch (``sliding.totals``), SGD steps."""
  score_step = sliding.make_score_step(graphdef)
  adapt_step = make_adapt_step(graphdef, tuple(adapt), ttt.momentum, ttt.grad_clip)
  piece_bytes = sliding.device_piece_bytes(stream)
  velocity = [jnp.zeros_like(leaf) for leaf, on in zip(jax.tree.leaves(params), adapt) if on]
  parts, outputs, per_chunk, steps = chunks(stream, stride, ttt.chunk_tokens), [], [], 0
  for index, chunk in enumerate(parts):
    scored = sliding.score(score_step, params, sliding.device_batches(stream, chunk.scored),
                           piece_bytes)
    outputs += scored
    per_chunk.append(scored)
    if index == len(parts) - 1 or ttt.epochs == 0:
      continue
    on_adapt(index)
    lr = jnp.float32(chunk_lr(ttt, index, len(parts)))
    batches = list(sliding.device_batches(stream, chunk.train))
    for _ in range(ttt.epochs):
      for batch in batches:
        params, velocity = adapt_step(params, velocity, batch, lr)
        steps += 1
  chunk_totals = [sliding.totals(scored) for scored in per_chunk]
  return {"total": sliding.totals(outputs), "chunk_nll": [float(t[0]) for t in chunk_totals],
          "chunk_tokens": [int(t[1]) for t in chunk_totals], "steps": steps}


def evaluate(cfg: Config, graphdef: nnx.GraphDef, params: Any, vocab_size: int,
             stream: sliding.Stream) -> dict[str, Any]:
  """Sliding-window figures of ``params`` without and with score-first TTT over
  ``stream``, both scored on the same batches (module doc). ``params``: any weights of
  the run's model."""
  ttt = cfg.ttt_eval
  stride = ttt.stride or cfg.eval.stride or cfg.data.seq_len
  adapt = adapted_leaves(cfg, vocab_size, params)
  frozen = dataclasses.replace(ttt, epochs=0)
  start = time.perf_counter()
  base = run(graphdef, params, stream, frozen, adapt, stride)
  middle = time.perf_counter()
  adapted = run(graphdef, params, stream, ttt, adapt, stride)
  end = time.perf_counter()
  sliding_row, ttt_row = sliding.metrics(base["total"]), sliding.metrics(adapted["total"])
  delta = ({"delta_bpb": ttt_row["eval_bpb"] - sliding_row["eval_bpb"]}
           if "eval_bpb" in ttt_row else {})  # strict JSON: no NaN without bytes
  return {"seq_len": stream.seq_len, "stride": stride, "batch_size": stream.batch_size,
          "sliding": sliding_row, "ttt": ttt_row, **delta,
          "chunks": len(adapted["chunk_nll"]), "chunk_nll": adapted["chunk_nll"],
          "chunk_tokens": adapted["chunk_tokens"], "steps": adapted["steps"],
          "adapted_params": int(sum(adapt)),
          "seconds": {"sliding": middle - start, "ttt": end - middle},
          "ttt_eval": to_dict(ttt)}


def evaluate_run(workdir: Path, overrides: list[str], batches: int,
                 weights: str = tasks.RAW_WEIGHTS, artifact: str = "",
                 adapter: str = "") -> dict[str, Any]:
  """``evaluate`` on ``eval_lm.load_weights``'s weights of ``workdir`` (raw, its EMA / SWA
  average or a dequantized artifact, with ``adapter`` folded in), over the validation
  stream of ``batches`` batches (0: ``eval.batches``) or ``ttt_eval.max_tokens`` tokens."""
  loaded = eval_lm.load_weights(workdir, overrides, weights, artifact, adapter)
  cfg, corpus = loaded.cfg, loaded.corpus
  stream = eval_lm.val_stream(cfg, corpus, loaded.mesh, batches, cfg.ttt_eval.max_tokens)
  result = evaluate(cfg, loaded.graphdef, loaded.params, corpus.vocab_size, stream)
  return {"task": "ttt",
          **eval_lm.run_record(workdir, cfg, corpus, loaded.step, loaded.weights), **result}


def _run(args: argparse.Namespace) -> dict[str, Any]:
  return evaluate_run(Path(args.workdir), args.set, tasks.batches(args), args.weights,
                      args.artifact, args.adapter)


TTT = tasks.register(tasks.EvalTask("ttt", _run, eval_lm.add_weights_arguments))
"""``evaluate --task ttt [--batches N] [--weights raw|ema|swa | --artifact F]`` (settings:
the ``ttt_eval`` config section)."""
