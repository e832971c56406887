"""SDFT data: demonstrations read from jsonl, tokenized once, and a replay-mixed stream.

A demonstrations file has one JSON object a line with string fields ``prompt`` and
``demonstration`` (other fields, metadata, are ignored; blank lines are skipped). It is
parsed with ``json.loads`` only; a line that is not such an object is refused with one
line naming ``file:line``.

Each example is tokenized once with the run's tokenizer (no BOS: the run's documents
have none) into the student's prompt, the prompt alone, and the teacher's, the verbatim
template ``TEMPLATE`` holding the prompt and the demonstration; both are left-padded
with the tokenizer's pad id to ``sdft.prompt_width`` and ``sdft.teacher_width``, so the
continuation starts at the same column of every row. A longer one, with
``sdft.overlong='truncate'``, keeps its last tokens (those next to the continuation)
and the number of examples cut is logged; with ``'error'`` it is refused naming the line.

The stream (``Stream``) is a pure function of (train.seed, micro-step m, slot s), with
B slots per micro-batch (global, over processes; each process takes its slice):

  fresh example at stream position q = m B + s: the (q mod N)-th of a seeded permutation
      of the N examples for epoch q div N;
  replay: with probability ``sdft.replay_ratio`` (uniform u(seed, m, s) < ratio) the
      slot holds a replayed example instead, drawn uniformly from the buffer:
      - ``sdft.replay_data`` set: the last ``sdft.replay_buffer`` examples of that
        earlier demonstrations file (the previous task's data);
      - unset: the examples this stream already trained on, the fresh examples of the
        last ``sdft.replay_buffer`` positions before m B (none at the first micro-step,
        whose slots are all fresh).

A replayed slot replaces the fresh example of its position (which the next epoch's
permutation brings back). Nothing of the stream needs saving: a resumed run recomputes
the same draws from the step, and ``get_state``/``set_state`` only carry the position
through the checkpoint's data item.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from ttt_jax.config.schema import SDFTConfig
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.errors import DataError
from ttt_jax.inference import rollout

TEMPLATE = ("<Question>\n{prompt}\n\nThis is an example for a response to the question:\n"
            "<Demonstration>\n{demonstration}\n\nNow answer with a response of your own, "
            "including the thinking process:\n")
"""The teacher's prompt (the SDFT paper's template, verbatim); the student sees the
prompt alone."""
FIELDS = ("prompt", "demonstration")
"""The string fields every line of a demonstrations file has."""


class Example(NamedTuple):
  prompt: str
  demonstration: str
  line: int = 0
  """Its line in the file (for errors)."""


def teacher_text(example: Example) -> str:
  """The teacher's prompt of ``example``: ``TEMPLATE`` filled in."""
  return TEMPLATE.format(prompt=example.prompt, demonstration=example.demonstration)


def _parse_line(path: Path, number: int, line: str) -> Example:
  where = f"{path}:{number}"
  try:
    record = json.loads(line)
  except ValueError as e:
    raise DataError(f"{where}: not a JSON object ({e})") from None
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object with {' and '.join(FIELDS)}, got "
                    f"{type(record).__name__}")
  for name in FIELDS:
    if not isinstance(record.get(name), str):
      what = "missing" if name not in record else f"a {type(record[name]).__name__}"
      raise DataError(f"{where}: field {name!r} must be a string, it is {what}")
  return Example(record["prompt"], record["demonstration"], number)


def read_examples(path: str | Path) -> list[Example]:
  """The examples of a demonstrations file (module doc); ``DataError`` naming
  ``file:line`` for a bad line, or the file when it cannot be read or holds none."""
  path = Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read the demonstrations file ({e})") from None
  examples = [_parse_line(path, number, line)
              for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
  if not examples:
    raise DataError(f"{path}: no examples (one JSON object a line with "
                    f"{' and '.join(FIELDS)})")
  return examples


def file_hash(path: str | Path) -> str:
  """'sha256:' and the first 16 hex digits of the file's content hash."""
  return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class Encoded(NamedTuple):
  """Tokenized examples, left-padded: int32 arrays, one row per example."""
  prompt: np.ndarray
  """[N, sdft.prompt_width] the student's prompt."""
  prompt_lens: np.ndarray
  """[N] its real tokens."""
  teacher: np.ndarray
  """[N, sdft.teacher_width] the teacher's prompt (``TEMPLATE``)."""
  teacher_lens: np.ndarray
  """[N]"""


def _fit(rows: list[list[int]], lines: list[int], width: int, what: str, path: Path,
         overlong: str) -> tuple[list[list[int]], int]:
  """``rows`` cut to their last ``width`` tokens (``overlong='truncate'``) and the number
  cut; ``DataError`` naming the first line whose row is empty, or too long with 'error'."""
  label = {"prompt": "prompt", "teacher": "teacher prompt"}[what]
  for line, row in zip(lines, rows):
    if not row:
      raise DataError(f"{path}:{line}: the {label} encodes to no tokens")
    if len(row) > width and overlong == "error":
      raise DataError(f"{path}:{line}: the {label} has {len(row)} tokens, more than "
                      f"sdft.{what}_width={width} (or set sdft.overlong=truncate)")
  return [row[-width:] for row in rows], sum(len(row) > width for row in rows)


def encode(examples: list[Example], tokenizer: Tokenizer, cfg: SDFTConfig, path: str | Path,
           log: Callable[[str], None]) -> Encoded:
  """``examples`` tokenized and left-padded (module doc); ``path`` names them in errors
  and in the log line counting the prompts cut to their widths."""
  path = Path(path)
  prompts = tokenizer.encode_batch([e.prompt for e in examples])
  teachers = tokenizer.encode_batch([teacher_text(e) for e in examples])
  lines = [e.line for e in examples]
  prompts, cut = _fit(prompts, lines, cfg.prompt_width, "prompt", path, cfg.overlong)
  teachers, teacher_cut = _fit(teachers, lines, cfg.teacher_width, "teacher", path,
                               cfg.overlong)
  if cut or teacher_cut:
    log(f"sdft: {path}: kept the last tokens of {cut} of {len(examples)} prompts "
        f"(sdft.prompt_width={cfg.prompt_width}) and of {teacher_cut} teacher prompts "
        f"(sdft.teacher_width={cfg.teacher_width})")
  prompt, prompt_lens = rollout.left_pad(prompts, tokenizer.pad_id, cfg.prompt_width)
  teacher, teacher_lens = rollout.left_pad(teachers, tokenizer.pad_id, cfg.teacher_width)
  return Encoded(prompt, prompt_lens, teacher, teacher_lens)


def _take(encoded: Encoded, index: np.ndarray) -> Encoded:
  return Encoded(*(field[index] for field in encoded))


REPLAY_SALT, PICK_SALT, EPOCH_SALT = 0x5EE1, 0x91C4, 0xE90C
"""Seed-sequence words that keep the stream's three random draws apart."""


class Draws(NamedTuple):
  """Where the B slots of one micro-batch come from."""
  replay: np.ndarray
  """bool [B]: the slot holds a replayed example."""
  fresh: np.ndarray
  """int [B]: the example of the data file each slot holds (-1 where from replay_data)."""
  replayed: np.ndarray
  """int [B]: the example of replay_data a slot holds (-1 elsewhere)."""


class Stream:
  """The micro-batches of an SDFT run, each a pure function of (seed, micro-step)
  (module doc). Iterating yields this process's slice of the next micro-batch as numpy
  arrays: ``prompt``, ``prompt_lens``, ``teacher_prompt``, ``teacher_lens`` and
  ``replay`` (float32, 1 for a replayed slot)."""

  def __init__(self, fresh: Encoded, replay: Encoded | None, *, seed: int, batch_size: int,
               replay_ratio: float, replay_buffer: int, process_index: int = 0,
               process_count: int = 1):
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    self.fresh, self.replay_source = fresh, replay
    self.seed, self.batch_size = seed, batch_size
    self.ratio, self.cap = replay_ratio, replay_buffer
    local = batch_size // process_count
    self.slots = slice(process_index * local, (process_index + 1) * local)
    self.position = 0
    self._epochs: dict[int, np.ndarray] = {}

  def _rng(self, *words: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, *words])

  def example_at(self, positions: np.ndarray) -> np.ndarray:
    """The example of the data file at each fresh stream position."""
    n = len(self.fresh.prompt)
    out = np.empty(len(positions), np.int64)
    for i, q in enumerate(positions):
      epoch = int(q) // n
      if epoch not in self._epochs:
        if len(self._epochs) > 4:
          self._epochs.clear()
        self._epochs[epoch] = self._rng(EPOCH_SALT, epoch).permutation(n)
      out[i] = self._epochs[epoch][int(q) % n]
    return out

  def draws(self, step: int) -> Draws:
    """The sources of the global micro-batch at micro-step ``step``."""
    b = self.batch_size
    positions = step * b + np.arange(b)
    u = self._rng(REPLAY_SALT, step).random(b)
    v = self._rng(PICK_SALT, step).random(b)
    if self.replay_source is not None:
      size = min(len(self.replay_source.prompt), self.cap)
      start = len(self.replay_source.prompt) - size
    else:
      size = min(step * b, self.cap)
      start = step * b - size
    replay = (u < self.ratio) & (size > 0)
    picked = start + np.minimum((v * size).astype(np.int64), max(size - 1, 0))
    if self.replay_source is not None:
      fresh = np.where(replay, -1, self.example_at(positions))
      replayed = np.where(replay, picked, -1)
    else:
      fresh = self.example_at(np.where(replay, picked, positions))
      replayed = np.full(b, -1)
    return Draws(replay, fresh, replayed)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice of micro-batch ``step``."""
    draws = self.draws(step)
    replay, fresh, replayed = (x[self.slots] for x in draws)
    rows = _take(self.fresh, np.maximum(fresh, 0))
    if self.replay_source is not None:
      other = _take(self.replay_source, np.maximum(replayed, 0))
      rows = Encoded(*(np.where((replay[:, None] if a.ndim == 2 else replay), b, a)
                       for a, b in zip(rows, other)))
    return {"prompt": rows.prompt, "prompt_lens": rows.prompt_lens,
            "teacher_prompt": rows.teacher, "teacher_lens": rows.teacher_lens,
            "replay": replay.astype(np.float32)}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch(self.position)
    self.position += 1
    return batch

  # the checkpoint's data item (grain's handler for iterators of other kinds)
  def get_state(self) -> dict[str, Any]:
    return {"next_index": self.position}

  def set_state(self, state: bytes | dict[str, Any]) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    self.position = int(state["next_index"])

  def start_prefetch(self) -> None:
    """Nothing to prefetch: a batch is computed when asked for."""
