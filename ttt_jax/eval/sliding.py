"""Sliding-window evaluation: every target of a token stream scored once, each with up to
``seq_len`` tokens of context.

The evaluated stream (``eval_stream``) is what the validation batches cover: the first
``N = K * L + 1`` tokens of the val split, ``K`` = ``eval.batches`` x batch size windows
of ``L = data.seq_len`` (fewer when val is short), targets ``1 .. N - 1``. With stride
``S`` (``eval.stride``), window ``j`` ends at target ``e_j = min(L + j * S, N - 1)``,
reads the ``L`` tokens before it (it starts at ``e_j - L``) and scores only the targets
after ``e_{j-1}`` (``e_{-1} = 0``): the first window all ``L`` of them, the others their
last ``S`` (the last window, ending at the stream's end, fewer). So the scored targets
are exactly ``1 .. N - 1`` (N - 1 tokens, their bytes summed exactly), and with ``S = L``
the windows are the non-overlapping ones the train loop evaluates. A target past the
first window has at least ``L - S`` tokens of context; the cost grows as ``L / S``.

``plan`` generalises this to any target range ``(first, last]`` (``score_first`` cuts a
stream into chunks and trains on windows of a chunk's own targets). Windows go to the
device in batches of ``B`` rows with a float ``mask`` of the scored targets; the last
batch is padded with masked-out rows. The jitted ``make_score_step`` returns each
batch's summed NLL, scored tokens and bytes (no host sync per batch); ``totals`` sums
the batches on the host in float64, in batch order, so any grouping of the same batches
(chunks) sums to the same bits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax import sharding
from ttt_jax.data import bpb
from ttt_jax.data import pipeline
from ttt_jax.errors import DataError
from ttt_jax.models import lm
from ttt_jax.training import objectives

MASK = "mask"
"""The batch field (float32 [B, L]) marking the targets a window scores (1) or only
reads as context (0)."""


@dataclasses.dataclass(frozen=True)
class Stream:
  """A token stream to score and what its windows need: the batch fields of the run's
  mechanisms (``annotators``, ``eos_id`` with ``data.document_mask``), the bytes of each
  token (int32 [V]) and the mesh the batches go to."""
  tokens: np.ndarray
  seq_len: int
  batch_size: int
  piece_bytes: np.ndarray
  mesh: jax.sharding.Mesh
  annotators: Mapping[str, pipeline.Annotator] = dataclasses.field(default_factory=dict)
  eos_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Windows:
  """Windows of ``seq_len`` tokens: window ``i`` reads tokens ``starts[i] ..
  starts[i] + seq_len`` and scores targets ``prev_ends[i] + 1 .. ends[i]``."""
  starts: np.ndarray
  prev_ends: np.ndarray
  ends: np.ndarray

  def __len__(self) -> int:
    return len(self.ends)

  def __getitem__(self, index: slice) -> Windows:
    return Windows(self.starts[index], self.prev_ends[index], self.ends[index])


def eval_stream(val_tokens: np.ndarray, *, seq_len: int, batch_size: int,
                batches: int) -> np.ndarray:
  """The tokens ``batches`` validation batches cover (module doc): ``val[:K * L + 1]``."""
  available = (max(len(val_tokens) - 1, 0) // seq_len) // batch_size
  if available == 0:
    raise DataError(f"val split has {len(val_tokens)} tokens, fewer than one eval batch of "
                    f"{batch_size} windows of seq_len={seq_len}")
  return np.asarray(val_tokens[:min(batches, available) * batch_size * seq_len + 1])


def plan(first: int, last: int, seq_len: int, stride: int) -> Windows:
  """The windows scoring targets ``first + 1 .. last`` (module doc): ends ``first + L,
  first + L + S, ...`` up to ``last``. Needs ``last >= L`` (a whole first window)."""
  if not 0 < stride <= seq_len:
    raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
  if last < seq_len or last <= first:
    raise DataError(f"{last + 1} tokens: too few for a window of seq_len={seq_len} + 1")
  count = 1 + -(-max(last - first - seq_len, 0) // stride)
  ends = np.minimum(first + seq_len + stride * np.arange(count, dtype=np.int64), last)
  prev_ends = np.concatenate([[first], ends[:-1]]).astype(np.int64)
  return Windows(ends - seq_len, prev_ends, ends)


def host_batches(stream: Stream, windows: Windows) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of each batch of ``stream.batch_size`` windows (the last one
  padded with copies of the first window, masked out): ``inputs``, ``targets``, ``MASK``
  and the run's per-token fields."""
  size, seq_len = stream.batch_size, stream.seq_len
  local = size // jax.process_count()
  offsets = np.arange(seq_len + 1)
  for first in range(0, len(windows), size):
    part = windows[first:first + size]
    pad = size - len(part)
    starts = np.concatenate([part.starts, np.full(pad, windows.starts[0])])
    scored = np.concatenate([part.ends - part.prev_ends, np.zeros(pad, np.int64)])
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    block = np.asarray(stream.tokens[starts[rows, None] + offsets], np.int32)
    mask = np.arange(seq_len) >= seq_len - scored[rows, None]
    yield pipeline.annotate_rows({"inputs": block[:, :-1], "targets": block[:, 1:],
                                  MASK: mask.astype(np.float32)},
                                 stream.annotators, stream.eos_id)


def device_batches(stream: Stream, windows: Windows) -> Iterator[dict[str, jax.Array]]:
  """``host_batches`` assembled on ``stream.mesh``."""
  for batch in host_batches(stream, windows):
    yield sharding.put_batch(batch, stream.mesh)


def model_fields(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The batch the model reads: all but ``MASK``."""
  return {k: v for k, v in batch.items() if k != MASK}


def masked_nll(model: lm.LM, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(summed NLL, scored tokens) of the batch's masked targets, float32."""
  logits = objectives.batch_logits(model, model_fields(batch))
  _, sum_nll, tokens = lm.cross_entropy_loss(logits, batch["targets"], batch[MASK])
  return sum_nll, tokens


@functools.lru_cache(maxsize=8)
def make_score_step(graphdef: nnx.GraphDef):
  """Jitted ``(params, batch, piece_bytes) -> float32 [3]``: the batch's summed NLL of
  its scored targets, their number and their UTF-8 bytes. Cached: one compilation per
  model."""
  def score(params: nnx.State, batch: dict[str, jax.Array], piece_bytes: jax.Array):
    sum_nll, tokens = masked_nll(nnx.merge(graphdef, params), batch)
    scored_bytes = jnp.sum(jnp.where(batch[MASK] > 0, piece_bytes[batch["targets"]], 0))
    return jnp.stack([sum_nll, tokens, scored_bytes.astype(jnp.float32)])

  return jax.jit(score)


def score(score_step, params: Any, batches: Iterator[dict[str, jax.Array]],
          piece_bytes: jax.Array) -> list[jax.Array]:
  """``score_step``'s outputs over ``batches``, left on the device."""
  return [score_step(params, batch, piece_bytes) for batch in batches]


def totals(outputs: list[jax.Array]) -> np.ndarray:
  """float64 [3]: summed NLL, tokens and bytes of the batches' outputs, in order."""
  return np.sum(np.asarray(jax.device_get(outputs), np.float64).reshape(-1, 3), axis=0)


def metrics(total: np.ndarray) -> dict[str, float | int]:
  """``eval_loss``, ``eval_ppl``, ``eval_bpb`` (with bytes), ``tokens`` and ``bytes`` of
  a ``totals`` row."""
  nll, tokens, n_bytes = float(total[0]), int(total[1]), int(total[2])
  loss = nll / max(tokens, 1)
  row: dict[str, float | int] = {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 80.0)))}
  if n_bytes > 0:
    row["eval_bpb"] = bpb.bits_per_byte(nll, n_bytes)
  return {**row, "tokens": tokens, "bytes": n_bytes}


def device_piece_bytes(stream: Stream) -> jax.Array:
  return jax.device_put(np.asarray(stream.piece_bytes, np.int32),
                        sharding.replicated(stream.mesh))


def evaluate(graphdef: nnx.GraphDef, params: Any, stream: Stream,
             stride: int) -> dict[str, float | int]:
  """``metrics`` of ``params`` over every target of ``stream`` by sliding windows of
  ``stride``; ``params`` may be any weights of the run's model (raw, averaged, ...)."""
  windows = plan(0, len(stream.tokens) - 1, stream.seq_len, stride)
  outputs = score(make_score_step(graphdef), params, device_batches(stream, windows),
                  device_piece_bytes(stream))
  return metrics(totals(outputs))
