"""The input pipeline: token windows, the grain training stream, eval batches.

A token array is cut into non-overlapping windows of ``seq_len + 1`` tokens (sharing one
boundary token): window ``i`` is ``tokens[i*L : i*L + L + 1]``, giving
``inputs = window[:-1]`` and ``targets = window[1:]``, both int32 [L].

Further per-token batch fields come from annotators: an annotator maps a window's
``inputs`` [L] to that field's values [L]. Mechanisms register a factory per field in
``registry.BATCH_FIELDS`` (CCT's ``step_ids``: the step of each input token), and
``batch_annotators`` collects the ones a config uses. With ``data.document_mask`` set,
``segment_ids``: int32 [L], the document of each input token, 0 at the window's first
token and +1 right after each EOS (``document_segment_ids``; the model resets at each
change of id).

The order of training windows is a pure function of (seed, process_index,
process_count, worker_count); annotators and segment ids add fields, never change it.
"""

from __future__ import annotations

import hashlib
import mmap
from typing import Any, Callable, Mapping

import grain
import numpy as np

from ttt_jax import registry
from ttt_jax.config import Config
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.errors import DataError

Annotator = Callable[[np.ndarray], np.ndarray]
"""One per-token batch field: a window's input tokens [L] -> that field's values [L]."""


def batch_annotators(cfg: Config, tokenizer: Tokenizer | None) -> dict[str, Annotator]:
  """field name -> annotator, for every field of ``registry.BATCH_FIELDS`` whose factory
  gives one for ``cfg`` (a factory returns None for a config that has no use for it)."""
  annotators = {}
  for name, factory in registry.BATCH_FIELDS.items():
    annotator = factory(cfg, tokenizer)
    if annotator is not None:
      annotators[name] = annotator
  return annotators


def document_segment_ids(inputs: np.ndarray, eos_id: int) -> np.ndarray:
  """int32 segment ids of input tokens [..., T] (``data.document_mask``): the number of
  EOS tokens before each token in its row, so 0 at the row's first token and +1 right
  after each EOS (the EOS belongs to the document it ends)."""
  segment_ids = np.zeros(inputs.shape, np.int32)
  np.cumsum(inputs[..., :-1] == eos_id, axis=-1, dtype=np.int32, out=segment_ids[..., 1:])
  return segment_ids


class TokenWindows:
  """grain random-access source: window ``i`` is ``tokens[i*L : i*L + L + 1]`` (with
  one field per annotator over its inputs, and their document segment ids when
  ``eos_id`` is given)."""

  def __init__(self, tokens: np.ndarray, seq_len: int,
               annotators: Mapping[str, Annotator] = {}, eos_id: int | None = None):
    if tokens.ndim != 1:
      raise DataError(f"token array must be 1-D, got shape {tokens.shape}")
    self.tokens = tokens
    self.seq_len = seq_len
    self.annotators = dict(annotators)
    self.eos_id = eos_id
    self.num_windows = max(len(tokens) - 1, 0) // seq_len

  def __len__(self) -> int:
    return self.num_windows

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    start = index * self.seq_len
    window = np.asarray(self.tokens[start:start + self.seq_len + 1], np.int32)
    example = {"inputs": window[:-1], "targets": window[1:]}
    for name, annotate in self.annotators.items():
      example[name] = annotate(window[:-1])
    if self.eos_id is not None:
      example["segment_ids"] = document_segment_ids(window[:-1], self.eos_id)
    return example

  def __repr__(self) -> str:
    return f"TokenWindows({len(self.tokens)} tokens, seq_len={self.seq_len})"

  def __getstate__(self) -> dict[str, Any]:
    """A memmap travels to grain workers as (file, offset), not as its contents."""
    state = dict(self.__dict__)
    tokens = self.tokens
    if isinstance(tokens, np.memmap) and isinstance(tokens.base, mmap.mmap):
      state["tokens"] = ("memmap", tokens.filename, tokens.offset, tokens.dtype.str, len(tokens))
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    if isinstance(state["tokens"], tuple):
      _, filename, offset, dtype, length = state["tokens"]
      state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset,
                                  shape=(length,))
    self.__dict__.update(state)


def _shuffle_seed(seed: int) -> int:
  """A 32-bit shuffle seed; hashing keeps nearby seeds' epoch orders unrelated
  (grain shuffles epoch e with seed + e)."""
  return int.from_bytes(hashlib.sha256(f"train_dataset:{seed}".encode()).digest()[:4], "big")


def _allow_grain_workers() -> None:
  """grain's worker processes read absl flags, which must count as parsed."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_dataset(tokens: np.ndarray, *, seq_len: int, global_batch_size: int, seed: int,
                  shuffle: bool, process_index: int, process_count: int,
                  worker_count: int, annotators: Mapping[str, Annotator] = {},
                  eos_id: int | None = None) -> grain.IterDataset:
  """Endless batches ``{"inputs", "targets"}: int32[global_batch_size // process_count,
  seq_len]`` for this process (plus one field per annotator and ``segment_ids`` with an
  ``eos_id``, all of that shape).

  The global stream is every window, shuffled afresh each epoch; process ``p`` takes
  elements ``p, p + P, ...`` of it, so one step's batches over all processes hold
  exactly the global stream's next ``global_batch_size`` windows (with
  ``worker_count=0``; grain workers each batch their own slice).
  ``iter(dataset)`` is checkpointable with grain's ``get_state``/``set_state``.
  """
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is not in [0, {process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise DataError(f"global batch size {global_batch_size} is not a positive multiple of "
                    f"the process count {process_count}")
  source = TokenWindows(tokens, seq_len, annotators, eos_id)
  if not len(source):
    raise DataError(f"train split has {len(tokens)} tokens: no window of seq_len={seq_len} "
                    f"+ 1 tokens")
  windows = grain.MapDataset.source(source)
  if shuffle:
    windows = windows.shuffle(seed=_shuffle_seed(seed))
  windows = windows.repeat()[process_index::process_count]
  batches = windows.to_iter_dataset(grain.ReadOptions(num_threads=0)).batch(
      global_batch_size // process_count, drop_remainder=True)
  if worker_count > 0:
    _allow_grain_workers()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return batches


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, num_batches: int,
                 process_index: int, process_count: int,
                 annotators: Mapping[str, Annotator] = {},
                 eos_id: int | None = None) -> list[dict[str, np.ndarray]]:
  """The first ``num_batches`` batches of val windows, in order (fewer, at least one, if
  val is short). Process ``p`` gets rows ``[p * b, (p + 1) * b)`` of each global batch,
  ``b = batch_size // process_count``. Rows carry the keys of ``TokenWindows``."""
  if batch_size <= 0 or batch_size % process_count:
    raise DataError(f"eval batch size {batch_size} is not a positive multiple of the "
                    f"process count {process_count}")
  num_windows = max(len(tokens) - 1, 0) // seq_len
  available = num_windows // batch_size
  if available == 0:
    raise DataError(f"val split has {len(tokens)} tokens = {num_windows} windows of "
                    f"seq_len={seq_len}, fewer than one eval batch of {batch_size}")
  local = batch_size // process_count
  batches = []
  for batch_index in range(min(num_batches, available)):
    first = (batch_index * batch_size + process_index * local) * seq_len
    block = np.asarray(tokens[first:first + local * seq_len + 1], np.int32)
    batches.append(annotate_rows({"inputs": block[:-1].reshape(local, seq_len),
                                  "targets": block[1:].reshape(local, seq_len)},
                                 annotators, eos_id))
  return batches


def annotate_rows(batch: dict[str, np.ndarray], annotators: Mapping[str, Annotator],
                  eos_id: int | None) -> dict[str, np.ndarray]:
  """``batch`` (rows of ``inputs`` [B, L]) with one field per annotator and, given an
  ``eos_id``, the rows' document ``segment_ids``."""
  batch = dict(batch)
  for name, annotate in annotators.items():
    batch[name] = np.stack([annotate(row) for row in batch["inputs"]])
  if eos_id is not None:
    batch["segment_ids"] = document_segment_ids(batch["inputs"], eos_id)
  return batch
