"""Tests of ttt_jax/data/corpus.py: corpus sources and errors, the train/val split,
caching, packed .bin corpora, document EOS ids."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from data_util import STDLIB_SAMPLE, LogLines, prepare_sample, small_config, write_stdlib_sample
from ttt_jax import errors
from ttt_jax.config import DataConfig
from ttt_jax.data import bpb
from ttt_jax.data import corpus as corpus_lib

PROSE = [
    "The quick brown fox jumps over the lazy dog. " * 8,
    "Ünïcode prose: naïve café, 漢字, and a snake 🐍.\n\tIndented with a tab.\n",
    "Numbers like 3.14159 and 2718281828 are split into digits.\n" * 5,
    "A short line.\n",
]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
  """A small real-source corpus, prepared once: (config, corpus, texts, log)."""
  return prepare_sample(tmp_path_factory.mktemp("sample"))


def split_on_eos(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
  ends = np.flatnonzero(tokens == eos_id)
  assert ends.size and ends[-1] == len(tokens) - 1, "stream must end with EOS"
  return np.split(np.asarray(tokens), ends + 1)[:-1]


# ---------------------------------------------------------------------------- sources


def test_stdlib_listing_is_sorted_and_excludes_tests_and_site_packages():
  root, files = corpus_lib.stdlib_files()
  assert files == sorted(files) and len(files) == len(set(files)) > 500
  assert all(f.endswith(".py") and (root / f).is_file() for f in files)
  for f in files:
    assert not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(
        Path(f).parts[:-1]), f
  assert {"os.py", "json/encoder.py", "asyncio/base_events.py"} <= set(files)
  _, with_tests = corpus_lib.stdlib_files(include_tests=True)
  assert set(files) < set(with_tests) and any(f.startswith("test/") for f in with_tests)
  assert not any("site-packages/" in f for f in with_tests)


def test_split_is_deterministic_and_never_empty():
  _, files = corpus_lib.stdlib_files()
  is_val = corpus_lib.split_documents(files, 0.05)
  assert is_val == corpus_lib.split_documents(files, 0.05)
  assert 0.02 < sum(is_val) / len(files) < 0.09
  assert corpus_lib.split_documents(list(reversed(files)), 0.05) == list(reversed(is_val))
  for names in (["a.txt", "b.txt"], [f"doc{i}" for i in range(5)]):
    for fraction in (1e-6, 0.999999):
      split = corpus_lib.split_documents(names, fraction)
      assert any(split) and not all(split)
  with pytest.raises(errors.DataError, match="only.txt"):
    corpus_lib.split_documents(["only.txt"], 0.1)


def test_prepared_corpus_is_train_then_val_documents_separated_by_eos(sample):
  cfg, corpus, texts, _ = sample
  tokenizer = corpus.tokenizer
  assert corpus.vocab_size == tokenizer.vocab_size == 400
  assert corpus.train_tokens.dtype == np.uint16 and corpus.train_tokens.ndim == 1
  meta = corpus.meta
  assert (meta["pad_id"], meta["unk_id"], meta["bos_id"], meta["eos_id"]) == (0, 1, 2, 3)
  assert meta["python_version"].count(".") == 2 and len(meta["corpus_hash"]) == 64
  assert meta["tokenizer_hash"] == tokenizer.sha256
  json.dumps(meta)
  names = sorted(name.replace("/", "_") for name in STDLIB_SAMPLE)
  is_val = corpus_lib.split_documents(names, cfg.val_fraction)
  for tokens, want_val in ((corpus.train_tokens, False), (corpus.val_tokens, True)):
    documents = split_on_eos(tokens, tokenizer.eos_id)
    expected = [t for t, v in zip(texts, is_val) if v == want_val]
    assert [tokenizer.decode(d[:-1]) for d in documents] == expected
    split = "val" if want_val else "train"
    assert meta[f"{split}_tokens"] == len(tokens) and meta[f"{split}_docs"] == len(expected)
    assert meta[f"{split}_bytes"] == sum(len(t.encode()) for t in expected)
    assert bpb.count_bytes(np.asarray(tokens), tokenizer.piece_bytes) == meta[f"{split}_bytes"]


def test_second_prepare_reuses_the_cache(sample):
  cfg, corpus, _, first_log = sample
  assert first_log.saying("tokenizer: trained") and first_log.saying("tokens: packed")
  entry = Path(corpus.meta["cache_entry"])
  model = Path(corpus.meta["tokenizer_model"])
  mtimes = {p: p.stat().st_mtime_ns for p in (model, *entry.iterdir())}
  log = LogLines()
  again = corpus_lib.prepare_corpus(cfg, log=log)
  assert log.saying("tokenizer: cached") and log.saying("tokens: cached")
  assert not log.saying("tokenizer: trained") and not log.saying("tokens: packed")
  assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)
  assert again.tokenizer.sha256 == corpus.tokenizer.sha256


def test_corrupt_or_partial_cache_entries_are_rebuilt(tmp_path):
  write_stdlib_sample(tmp_path / "src")
  cfg = small_config(tmp_path, [str(tmp_path / "src" / "*.py")])
  corpus = corpus_lib.prepare_corpus(cfg, log=LogLines())
  entry, model = Path(corpus.meta["cache_entry"]), Path(corpus.meta["tokenizer_model"])
  expected_train = np.array(corpus.train_tokens)
  expected_model = model.read_bytes()
  del corpus

  (entry / "train.bin").write_bytes((entry / "train.bin").read_bytes()[:100])  # truncated
  log = LogLines()
  corpus = corpus_lib.prepare_corpus(cfg, log=log)
  assert log.saying("tokenizer: cached") and log.saying("tokens: packed")
  np.testing.assert_array_equal(corpus.train_tokens, expected_train)

  model.write_bytes(expected_model[:-1] + bytes([expected_model[-1] ^ 1]))  # one bit flipped
  (entry / "meta.json").unlink()  # an entry without its meta is incomplete
  log = LogLines()
  corpus = corpus_lib.prepare_corpus(cfg, log=log)
  assert log.saying("tokenizer: trained") and log.saying("tokens: packed")
  assert model.read_bytes() == expected_model
  np.testing.assert_array_equal(corpus.train_tokens, expected_train)
  assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_cache_dir_falls_back_to_env_then_home(monkeypatch, tmp_path):
  assert corpus_lib.cache_dir(DataConfig(cache_dir=str(tmp_path))) == tmp_path
  monkeypatch.setenv("TTT_JAX_CACHE", str(tmp_path / "env"))
  assert corpus_lib.cache_dir(DataConfig()) == tmp_path / "env"
  monkeypatch.delenv("TTT_JAX_CACHE")
  assert corpus_lib.cache_dir(DataConfig()) == Path.home() / ".cache" / "ttt_jax"


def test_text_glob_and_jsonl_documents(tmp_path):
  (tmp_path / "notes").mkdir()
  for i, text in enumerate(PROSE[:2]):
    (tmp_path / "notes" / f"n{i}.txt").write_text(text, encoding="utf-8")
  (tmp_path / "notes" / "empty.md").write_text("")
  lines = [json.dumps({"text": text, "id": i}) for i, text in enumerate(PROSE[2:])]
  (tmp_path / "records.jsonl").write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n")
  cfg = small_config(tmp_path, [str(tmp_path / "notes" / "*"), str(tmp_path / "records.jsonl"),
                                str(tmp_path / "notes" / "n0.txt")],
                     seq_len=8, vocab_size=320, val_fraction=0.3)
  corpus = corpus_lib.prepare_corpus(cfg, log=LogLines())
  tokenizer = corpus.tokenizer
  decoded = [tokenizer.decode(d[:-1]) for tokens in (corpus.train_tokens, corpus.val_tokens)
             for d in split_on_eos(tokens, tokenizer.eos_id)]
  assert sorted(decoded) == sorted(PROSE)  # n0.txt once; empty file and blank line skipped
  names = ["n0.txt", "n1.txt", "records.jsonl:1", "records.jsonl:3"]
  assert corpus.meta["val_docs"] == sum(corpus_lib.split_documents(names, 0.3))


def test_jsonl_lines_are_newline_separated_whatever_the_text_holds(tmp_path):
  # JSON allows U+2028/U+2029 and U+0085 unescaped inside strings (ensure_ascii=False
  # writes them so); Windows tools add a BOM and CRLF line ends
  texts = ["one\u2028still one", "two\x85and\u2029more", "three"]
  lines = [json.dumps({"text": text}, ensure_ascii=False) for text in texts]
  path = tmp_path / "records.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines[:2] + ["", lines[2]]).encode() + b"\r\n")
  documents = corpus_lib._jsonl_documents(path, "records.jsonl")
  assert [(d.name, d.text) for d in documents] == [
      ("records.jsonl:1", texts[0]), ("records.jsonl:2", texts[1]), ("records.jsonl:4", texts[2])]


def test_a_file_named_with_glob_characters_is_that_file(tmp_path):
  (tmp_path / "notes [draft].txt").write_text(PROSE[0])
  (tmp_path / "what?.txt").write_text(PROSE[1])
  for name in ("notes [draft].txt", "what?.txt"):
    assert corpus_lib._expand_source(str(tmp_path / name)) == [(tmp_path / name, name)]
  assert corpus_lib._expand_source(str(tmp_path / "*.txt")) == [
      (tmp_path / "notes [draft].txt", "notes [draft].txt"),
      (tmp_path / "what?.txt", "what?.txt")]


def test_packed_bin_corpus(tmp_path):
  tokens = (np.arange(1000) * 7 % 300).astype(np.uint16)
  tokens.tofile(tmp_path / "train.bin")
  (tmp_path / "train.json").write_text(json.dumps(
      {"vocab_size": 300, "dtype": "uint16", "num_tokens": 1000, "eos_id": 5}))
  cfg = small_config(tmp_path, [str(tmp_path / "train.bin")], val_fraction=0.1)
  log = LogLines()
  corpus = corpus_lib.prepare_corpus(cfg, log=log)
  assert corpus.tokenizer is None and corpus.vocab_size == 300
  np.testing.assert_array_equal(corpus.train_tokens, tokens[:900])
  np.testing.assert_array_equal(corpus.val_tokens, tokens[900:])
  assert corpus.meta["eos_id"] == 5 and corpus.meta["val_tokens"] == 100
  assert log.saying("corpus: using vocab_size=300")

  # The seed handoff's naming: x.bin.json with n_tokens, and uint32 ids.
  tokens.astype(np.uint32).tofile(tmp_path / "seed.bin")
  (tmp_path / "seed.bin.json").write_text(json.dumps(
      {"vocab_size": 300, "dtype": "uint32", "n_tokens": 1000}))
  seed_cfg = dataclasses.replace(cfg, corpus=(str(tmp_path / "seed.bin"),))
  corpus = corpus_lib.prepare_corpus(seed_cfg, log=LogLines())
  assert corpus.train_tokens.dtype == np.uint32
  np.testing.assert_array_equal(corpus.val_tokens, tokens[900:])


# ----------------------------------------------------------------------------- errors


def _write_bin(tmp_path: Path, tokens, sidecar: dict | None, stem: str = "tok") -> str:
  np.asarray(tokens, np.uint16).tofile(tmp_path / f"{stem}.bin")
  if sidecar is not None:
    (tmp_path / f"{stem}.json").write_text(json.dumps(sidecar))
  return str(tmp_path / f"{stem}.bin")


def _bad_corpora(tmp_path: Path) -> dict[str, tuple[list[str], dict, str]]:
  """name -> (corpus, config overrides, regex the error must match)."""
  good = tmp_path / "good.txt"
  good.write_text(PROSE[0])
  (tmp_path / "numbers.txt").write_text(PROSE[2])
  (tmp_path / "latin1.txt").write_bytes("ok: caf\xe9".encode("latin-1"))
  (tmp_path / "empty1.txt").write_text("")
  (tmp_path / "empty2.txt").write_text("")
  (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "oops"\n')
  (tmp_path / "notext.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n')
  (tmp_path / "numtext.jsonl").write_text('{"text": 3}\n')
  (tmp_path / "folder").mkdir()
  return {
      "glob matches nothing": ([str(tmp_path / "nope" / "*.txt")], {},
                               r"nope/\*\.txt.*matched no files"),
      "missing file": ([str(tmp_path / "missing.txt")], {}, r"missing\.txt does not exist"),
      "directory": ([str(tmp_path / "folder")], {}, r"folder is a directory"),
      "empty entry": ([str(good), " "], {},
                      r"^data\.corpus: entry 2 is empty \(' '\); an unset shell variable\?"),
      "all empty": ([str(tmp_path / "empty*.txt")], {}, r"no non-empty documents \(2 files"),
      "non-utf8": ([str(good), str(tmp_path / "latin1.txt")], {},
                   r"latin1\.txt: not valid UTF-8 at byte offset 7"),
      "malformed jsonl": ([str(tmp_path / "bad.jsonl")], {}, r"bad\.jsonl:2: malformed JSON"),
      "missing text": ([str(tmp_path / "notext.jsonl")], {}, r"notext\.jsonl:3: missing 'text'"),
      "text not str": ([str(tmp_path / "numtext.jsonl")], {}, r"numtext\.jsonl:1: 'text' field"),
      "one document": ([str(good)], {}, r"1 document.*good\.txt.*at least 2"),
      "too small": ([str(good), str(tmp_path / "numbers.txt")], {"seq_len": 4096},
                    r"too small for data.seq_len=4096: the train split has \d+ tokens.*at "
                    r"least 4097"),
      "vocab too large": ([str(good), str(tmp_path / "numbers.txt")], {"vocab_size": 5000},
                          r"data\.vocab_size: .*vocab_size=5000"),
      "bin size mismatch": ([_write_bin(tmp_path, range(100), {
          "vocab_size": 300, "dtype": "uint16", "num_tokens": 99}, "sized")], {},
          r"sized\.bin: 200 bytes, but sized\.json says num_tokens=99"),
      "bin id out of range": ([_write_bin(tmp_path, [1] * 17 + [300] + [1] * 100, {
          "vocab_size": 300, "dtype": "uint16", "num_tokens": 118}, "ids")], {},
          r"ids\.bin: token id 300 at token offset 17 is >= vocab_size=300"),
      "bin sidecar field": ([_write_bin(tmp_path, range(100), {
          "vocab_size": 300, "num_tokens": 100}, "fields")], {},
          r"fields\.json: missing field 'dtype'"),
      "bin too small": ([_write_bin(tmp_path, range(40), {
          "vocab_size": 300, "dtype": "uint16", "num_tokens": 40}, "small")], {},
          r"small\.bin: too small for data.seq_len=32: the train split has 36 tokens and the "
          r"val split 4"),
  }


BAD_DATA_CASES = (
    "glob matches nothing", "missing file", "directory", "empty entry", "all empty", "non-utf8",
    "malformed jsonl", "missing text", "text not str", "one document", "too small",
    "vocab too large", "bin size mismatch", "bin id out of range", "bin sidecar field",
    "bin too small")


@pytest.mark.parametrize("case", BAD_DATA_CASES)
def test_bad_data_is_one_clear_error(tmp_path, case):
  cases = _bad_corpora(tmp_path)
  assert set(cases) == set(BAD_DATA_CASES)
  corpus, overrides, message = cases[case]
  cfg = small_config(tmp_path, corpus, **{"vocab_size": 300, "val_fraction": 0.1, **overrides})
  with pytest.raises(errors.DataError, match=message):
    corpus_lib.prepare_corpus(cfg, log=LogLines())


def test_bin_errors_missing_sidecar_and_mixed_sources(tmp_path):
  path = _write_bin(tmp_path, range(100), None)
  with pytest.raises(errors.DataError, match=r"tok\.bin: missing sidecar tok\.json"):
    corpus_lib.prepare_corpus(small_config(tmp_path, [path]), log=LogLines())
  (tmp_path / "tok.json").write_text('{"vocab_size": 300, "dtype": "uint16", "num_tokens": 100}')
  with pytest.raises(errors.DataError, match=r"must be the only source"):
    corpus_lib.prepare_corpus(small_config(tmp_path, [path, "stdlib"]), log=LogLines())



def test_document_eos_id_sources_and_the_error_without_one(sample, tmp_path):
  cfg, corpus, _, _ = sample
  assert corpus_lib.document_eos_id(cfg, corpus) is None
  masked = dataclasses.replace(cfg, document_mask=True)
  assert corpus_lib.document_eos_id(masked, corpus) == corpus.tokenizer.eos_id
  tokens = np.arange(200) % 50
  with_eos = _write_bin(tmp_path, tokens, {"vocab_size": 50, "dtype": "uint16",
                                           "num_tokens": 200, "eos_id": 7}, "with_eos")
  bin_cfg = small_config(tmp_path, [with_eos], seq_len=8, document_mask=True)
  with_eos_corpus = corpus_lib.prepare_corpus(bin_cfg, log=LogLines())
  assert corpus_lib.document_eos_id(bin_cfg, with_eos_corpus) == 7
  without = _write_bin(tmp_path, tokens, {"vocab_size": 50, "dtype": "uint16",
                                          "num_tokens": 200}, "no_eos")
  bin_cfg = dataclasses.replace(bin_cfg, corpus=(without,))
  packed = corpus_lib.prepare_corpus(bin_cfg, log=LogLines())
  with pytest.raises(errors.DataError, match=r"^data\.document_mask: no valid EOS id for "
                     r"data\.corpus .*no_eos\.bin.*\(got None\).*sidecar an 'eos_id'"):
    corpus_lib.document_eos_id(bin_cfg, packed)
  unmasked = dataclasses.replace(bin_cfg, document_mask=False)
  assert corpus_lib.document_eos_id(unmasked, packed) is None


@pytest.mark.slow
def test_full_stdlib_corpus_end_to_end(tmp_path):
  """The quickstart's corpus at the default vocab (about 5 s cold on 2 cores)."""
  corpus = corpus_lib.prepare_corpus(DataConfig(cache_dir=str(tmp_path)), log=LogLines())
  tokenizer, meta = corpus.tokenizer, corpus.meta
  assert corpus.vocab_size == 8192 and meta["sources"] == ["stdlib"]
  assert meta["train_docs"] > 500 and meta["val_docs"] > 10
  assert len(corpus.val_tokens) > 100 * DataConfig().seq_len
  for split in ("train", "val"):
    tokens = np.asarray(getattr(corpus, f"{split}_tokens"))
    assert bpb.count_bytes(tokens, tokenizer.piece_bytes) == meta[f"{split}_bytes"]
    assert (tokens == tokenizer.eos_id).sum() == meta[f"{split}_docs"]
  root, files = corpus_lib.stdlib_files()
  for name in files:
    text = (root / name).read_text(encoding="utf-8")
    assert tokenizer.decode(tokenizer.encode(text)) == text, name
