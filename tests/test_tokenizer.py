"""Tests of ttt_jax/data/tokenizer.py: byte-exact round trips, special ids, piece byte counts,
deterministic training."""

import subprocess
import sys

import numpy as np
import pytest

from ttt_jax.data import bpb
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.data import tokenizer as tokenizer_lib

STDLIB_SAMPLE = ("textwrap.py", "colorsys.py", "json/encoder.py", "string.py", "shlex.py",
                 "fnmatch.py", "bisect.py", "heapq.py")
TRICKY_TEXT = ("def f(x):\n\tif x:\n\t\treturn 'tab\\t'  # tabs\n    \n\n\n"
               "    café = \"naïve — ünïcode ✓ 漢字 🐍\"\r\n"
               "  trailing spaces   \n\x00\x07 control chars 12345678901234567890\n")


def stdlib_texts(names=STDLIB_SAMPLE) -> list[str]:
  root, _ = corpus_lib.stdlib_files()
  return [(root / name).read_text(encoding="utf-8") for name in names]


@pytest.fixture(scope="module")
def trained() -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.train_tokenizer(stdlib_texts(), vocab_size=500, max_sentences=100_000)


def test_round_trip_is_exact_on_stdlib_source(trained):
  for text in stdlib_texts() + stdlib_texts(("tokenize.py", "calendar.py")) + [TRICKY_TEXT]:
    assert trained.decode(trained.encode(text)) == text
  assert [trained.decode(ids) for ids in trained.encode_batch([TRICKY_TEXT, "\n", " "])] == [
      TRICKY_TEXT, "\n", " "]
  assert trained.decode(trained.encode("a\u2581b")) == "a b"  # the documented exception


def test_special_ids_and_vocab(trained):
  assert trained.vocab_size == 500
  assert trained.special_ids == {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
  assert trained.decode([trained.bos_id, *trained.encode("x = 1"), trained.eos_id]) == "x = 1"


def test_piece_bytes_count_decoded_utf8_bytes(trained):
  assert trained.piece_bytes.shape == (500,) and trained.piece_bytes.dtype == np.int32
  assert trained.piece_bytes[:4].tolist() == [0, 0, 0, 0]  # pad, unk, bos, eos
  byte_piece = trained.processor.piece_to_id("<0x0A>")
  assert trained.piece_bytes[byte_piece] == 1
  space_run = trained.processor.piece_to_id("\u2581\u2581\u2581\u2581")
  assert space_run != trained.unk_id and trained.piece_bytes[space_run] == 4
  text = "héllo wörld\n"
  assert bpb.count_bytes(np.asarray(trained.encode(text)), trained.piece_bytes) == len(
      text.encode())
  for text in stdlib_texts() + [TRICKY_TEXT]:
    ids = np.asarray(trained.encode(text))
    assert bpb.count_bytes(ids, trained.piece_bytes) == len(text.encode())


def test_save_and_load(trained, tmp_path):
  path = tmp_path / "tok.model"
  trained.save(path)
  loaded = tokenizer_lib.Tokenizer(path)
  assert loaded.sha256 == trained.sha256
  np.testing.assert_array_equal(loaded.piece_bytes, trained.piece_bytes)
  assert loaded.encode(TRICKY_TEXT) == trained.encode(TRICKY_TEXT)


def test_training_chunks_keep_whole_lines_under_the_cap():
  long_line = "x" * (3 * tokenizer_lib.MAX_CHUNK_CHARS)
  text = "a = 1\nb = 2\n\n\n" + "c = 3\n" * 1000 + long_line + "\n   \n"
  chunks = list(tokenizer_lib.training_chunks([text]))
  assert all(0 < len(c) <= tokenizer_lib.MAX_CHUNK_CHARS for c in chunks)
  assert chunks[0] == "a = 1\nb = 2\n"
  assert all(c.endswith("\n") for c in chunks[1:4])  # cut after a newline
  assert "".join(chunks).replace("\n", "") == text.replace("\n", "").replace("   ", "")


def test_sampling_is_deterministic_and_ordered():
  chunks = [f"line {i}" for i in range(1000)]
  sample = tokenizer_lib.sample_chunks(chunks, 100)
  assert sample == tokenizer_lib.sample_chunks(chunks, 100)
  assert len(sample) == 100 and sample == sorted(sample, key=chunks.index)
  assert tokenizer_lib.sample_chunks(chunks, 5000) == chunks


_TRAIN_IN_SUBPROCESS = """
from ttt_jax.data import corpus, tokenizer
root, _ = corpus.stdlib_files()
texts = [(root / n).read_text() for n in {names!r}]
print(tokenizer.train_tokenizer(texts, vocab_size=400, max_sentences=200).sha256)
"""


def test_training_is_deterministic_across_processes():
  """sentencepiece's own sampling is seeded by the clock; ours must not be."""
  script = _TRAIN_IN_SUBPROCESS.format(names=STDLIB_SAMPLE)
  hashes = {subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                           text=True).stdout.strip() for _ in range(2)}
  assert len(hashes) == 1 and len(next(iter(hashes))) == 64


def test_vocab_too_large_is_a_clear_error():
  with pytest.raises(ValueError, match="vocab_size=100000"):
    tokenizer_lib.train_tokenizer(["tiny text\n"] * 3, vocab_size=100_000, max_sentences=10)
