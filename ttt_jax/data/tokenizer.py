"""Byte-exact sentencepiece BPE tokenizer for source code and text.

The trainer options make ``decode(encode(text)) == text``: identity normalization, no
dummy prefix, whitespace kept verbatim (spaces become ``▁``), and byte fallback so
characters outside the vocabulary become ``<0xNN>`` byte pieces. The one exception is
a literal U+2581 ``▁`` in the text, which sentencepiece reserves and decodes as a space.

Training is deterministic: sentencepiece's own sentence sampling differs from process
to process (even after ``set_random_generator_seed``), so the training chunks are
sampled here with a fixed-seed generator and passed in full (``input_sentence_size=0``).
Chunks are runs of lines between blank lines, so newlines are seen in context and
pieces such as ``"):\\n"`` can be learned.

``piece_bytes[i]`` is the number of UTF-8 bytes piece ``i`` adds to decoded text;
summed over predicted tokens it is the denominator of bits-per-byte.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TRAIN_THREADS = 2
"""Threads of the sentencepiece trainer: the pieces do not depend on it, but the saved
model records it, so it is fixed to keep model hashes stable across machines."""
MAX_CHUNK_CHARS = 2048
"""Longest training chunk; sentencepiece silently drops sentences over its byte limit."""
SAMPLE_SEED = 0
STEP_PIECE = "<STEP>"
"""User-defined piece marking a reasoning-step boundary (CCT); in the vocabulary only of
tokenizers trained with ``user_symbols=(STEP_PIECE,)``."""

_TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    character_coverage=0.9995,
    max_sentence_length=4 * MAX_CHUNK_CHARS,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    pad_id=PAD_ID,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    num_threads=TRAIN_THREADS,
    minloglevel=2,
)


def trainer_settings(vocab_size: int, max_sentences: int,
                     user_symbols: Sequence[str] = ()) -> dict:
  """Everything that determines a trained model besides its input text (for cache keys).
  ``user_symbols`` appear in the settings only when given, so existing keys are kept."""
  settings = {"vocab_size": vocab_size, "max_sentences": max_sentences,
              "max_chunk_chars": MAX_CHUNK_CHARS, "sample_seed": SAMPLE_SEED,
              "sentencepiece": spm.__version__, "options": _TRAINER_OPTIONS}
  if user_symbols:
    settings["user_symbols"] = list(user_symbols)
  return settings


class Tokenizer:
  """A sentencepiece model with its special ids and per-piece byte lengths."""

  def __init__(self, model: str | os.PathLike | bytes):
    """Loads a ``.model`` file, or a serialized model given as bytes."""
    self.serialized = model if isinstance(model, bytes) else Path(model).read_bytes()
    self.processor = spm.SentencePieceProcessor(model_proto=self.serialized)
    self.sha256 = hashlib.sha256(self.serialized).hexdigest()
    self.vocab_size = self.processor.get_piece_size()
    self.pad_id = self.processor.pad_id()
    self.unk_id = self.processor.unk_id()
    self.bos_id = self.processor.bos_id()
    self.eos_id = self.processor.eos_id()
    self.piece_bytes = _piece_bytes(self.processor)

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (no BOS/EOS added)."""
    return self.processor.encode(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    """Token ids of many texts, encoded in parallel (``num_threads=0``: all cores)."""
    threads = num_threads or os.cpu_count() or 1
    return self.processor.encode(list(texts), num_threads=threads)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ``ids``; control pieces (pad/bos/eos) decode to nothing."""
    return self.processor.decode([int(i) for i in ids])

  @property
  def special_ids(self) -> dict[str, int]:
    return {"pad_id": self.pad_id, "unk_id": self.unk_id, "bos_id": self.bos_id,
            "eos_id": self.eos_id}

  def save(self, path: str | os.PathLike) -> None:
    """Writes the ``.model`` file atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(self.serialized)
    os.replace(tmp, path)


def _piece_bytes(processor: spm.SentencePieceProcessor) -> np.ndarray:
  """UTF-8 bytes each piece contributes to decoded text: ``<0xNN>`` is 1, control and
  unknown pieces are 0, ``▁`` is a space."""
  counts = np.zeros(processor.get_piece_size(), np.int32)
  for piece_id in range(len(counts)):
    if processor.is_byte(piece_id):
      counts[piece_id] = 1
    elif not (processor.is_control(piece_id) or processor.is_unknown(piece_id)
              or processor.is_unused(piece_id)):
      counts[piece_id] = len(processor.id_to_piece(piece_id).replace("\u2581", " ").encode())
  return counts


_BLANK_LINE_BOUNDARY = re.compile(r"(?<=\n)(?=\n)")


def training_chunks(texts: Iterable[str]) -> Iterator[str]:
  """Splits documents at blank lines into chunks of at most ``MAX_CHUNK_CHARS``.

  Long blocks are cut after a newline where possible, so each chunk keeps whole lines.
  """
  for text in texts:
    for block in _BLANK_LINE_BOUNDARY.split(text):
      while len(block) > MAX_CHUNK_CHARS:
        cut = block.rfind("\n", 0, MAX_CHUNK_CHARS) + 1 or MAX_CHUNK_CHARS
        yield block[:cut]
        block = block[cut:]
      if block.strip():
        yield block


def sample_chunks(chunks: list[str], max_sentences: int) -> list[str]:
  """A deterministic subset of ``max_sentences`` chunks, kept in corpus order."""
  if len(chunks) <= max_sentences:
    return chunks
  rng = np.random.default_rng(SAMPLE_SEED)
  keep = np.sort(rng.choice(len(chunks), size=max_sentences, replace=False))
  return [chunks[i] for i in keep]


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_sentences: int,
                    user_symbols: Sequence[str] = ()) -> Tokenizer:
  """Trains a byte-exact BPE model on ``texts``; raises ``ValueError`` if the text cannot
  support ``vocab_size`` (sentencepiece's message says which sizes it can).
  ``user_symbols`` (e.g. ``STEP_PIECE``) become pieces that are never split."""
  chunks = sample_chunks(list(training_chunks(texts)), max_sentences)
  if not chunks:
    raise ValueError("no non-blank text to train the tokenizer on")
  model = io.BytesIO()
  try:
    extra = {"user_defined_symbols": list(user_symbols)} if user_symbols else {}
    spm.SentencePieceTrainer.train(sentence_iterator=iter(chunks), model_writer=model,
                                   vocab_size=vocab_size, **_TRAINER_OPTIONS, **extra)
  except RuntimeError as e:
    raise ValueError(f"sentencepiece training failed for vocab_size={vocab_size}: "
                     f"{str(e).strip()}") from None
  return Tokenizer(model.getvalue())
