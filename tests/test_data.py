"""Tests of ttt_jax/data.py: corpus sources and errors, caching, the grain pipeline,
bits-per-byte."""

import dataclasses
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from ttt_jax import data
from ttt_jax.config import DataConfig

STDLIB_SAMPLE = ("textwrap.py", "colorsys.py", "json/encoder.py", "json/decoder.py",
                 "string.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py", "keyword.py")
PROSE = [
    "The quick brown fox jumps over the lazy dog. " * 8,
    "Ünïcode prose: naïve café, 漢字, and a snake 🐍.\n\tIndented with a tab.\n",
    "Numbers like 3.14159 and 2718281828 are split into digits.\n" * 5,
    "A short line.\n",
]


def write_stdlib_sample(directory: Path) -> list[str]:
  """Copies real stdlib files into ``directory``; returns their texts in sorted order."""
  root, _ = data.stdlib_files()
  texts = {}
  for name in STDLIB_SAMPLE:
    target = directory / name.replace("/", "_")
    target.parent.mkdir(parents=True, exist_ok=True)
    texts[target.name] = (root / name).read_text(encoding="utf-8")
    target.write_text(texts[target.name], encoding="utf-8")
  return [texts[name] for name in sorted(texts)]


def small_config(tmp_path: Path, corpus, **overrides) -> DataConfig:
  values = dict(corpus=tuple(corpus), seq_len=32, vocab_size=400, val_fraction=0.2,
                cache_dir=str(tmp_path / "cache"))
  return DataConfig(**{**values, **overrides})


class LogLines(list):
  def __call__(self, message: str) -> None:
    self.append(message)

  def saying(self, prefix: str) -> list[str]:
    return [line for line in self if line.startswith(prefix)]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
  """A small real-source corpus, prepared once: (config, corpus, texts, log)."""
  tmp_path = tmp_path_factory.mktemp("sample")
  texts = write_stdlib_sample(tmp_path / "src")
  cfg = small_config(tmp_path, [str(tmp_path / "src" / "*.py")])
  log = LogLines()
  return cfg, data.prepare_corpus(cfg, log=log), texts, log


def split_on_eos(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
  ends = np.flatnonzero(tokens == eos_id)
  assert ends.size and ends[-1] == len(tokens) - 1, "stream must end with EOS"
  return np.split(np.asarray(tokens), ends + 1)[:-1]


# ---------------------------------------------------------------------------- sources


def test_stdlib_listing_is_sorted_and_excludes_tests_and_site_packages():
  root, files = data.stdlib_files()
  assert files == sorted(files) and len(files) == len(set(files)) > 500
  assert all(f.endswith(".py") and (root / f).is_file() for f in files)
  for f in files:
    assert not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(
        Path(f).parts[:-1]), f
  assert {"os.py", "json/encoder.py", "asyncio/base_events.py"} <= set(files)
  _, with_tests = data.stdlib_files(include_tests=True)
  assert set(files) < set(with_tests) and any(f.startswith("test/") for f in with_tests)
  assert not any("site-packages/" in f for f in with_tests)


def test_split_is_deterministic_and_never_empty():
  _, files = data.stdlib_files()
  is_val = data.split_documents(files, 0.05)
  assert is_val == data.split_documents(files, 0.05)
  assert 0.02 < sum(is_val) / len(files) < 0.09
  assert data.split_documents(list(reversed(files)), 0.05) == list(reversed(is_val))
  for names in (["a.txt", "b.txt"], [f"doc{i}" for i in range(5)]):
    for fraction in (1e-6, 0.999999):
      split = data.split_documents(names, fraction)
      assert any(split) and not all(split)
  with pytest.raises(data.DataError, match="only.txt"):
    data.split_documents(["only.txt"], 0.1)


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
  is_val = data.split_documents(names, cfg.val_fraction)
  for tokens, want_val in ((corpus.train_tokens, False), (corpus.val_tokens, True)):
    documents = split_on_eos(tokens, tokenizer.eos_id)
    expected = [t for t, v in zip(texts, is_val) if v == want_val]
    assert [tokenizer.decode(d[:-1]) for d in documents] == expected
    split = "val" if want_val else "train"
    assert meta[f"{split}_tokens"] == len(tokens) and meta[f"{split}_docs"] == len(expected)
    assert meta[f"{split}_bytes"] == sum(len(t.encode()) for t in expected)
    assert data.count_bytes(np.asarray(tokens), tokenizer.piece_bytes) == meta[f"{split}_bytes"]


def test_second_prepare_reuses_the_cache(sample):
  cfg, corpus, _, first_log = sample
  assert first_log.saying("tokenizer: trained") and first_log.saying("tokens: packed")
  entry = Path(corpus.meta["cache_entry"])
  model = Path(corpus.meta["tokenizer_model"])
  mtimes = {p: p.stat().st_mtime_ns for p in (model, *entry.iterdir())}
  log = LogLines()
  again = data.prepare_corpus(cfg, log=log)
  assert log.saying("tokenizer: cached") and log.saying("tokens: cached")
  assert not log.saying("tokenizer: trained") and not log.saying("tokens: packed")
  assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
  np.testing.assert_array_equal(again.train_tokens, corpus.train_tokens)
  assert again.tokenizer.sha256 == corpus.tokenizer.sha256


def test_corrupt_or_partial_cache_entries_are_rebuilt(tmp_path):
  write_stdlib_sample(tmp_path / "src")
  cfg = small_config(tmp_path, [str(tmp_path / "src" / "*.py")])
  corpus = data.prepare_corpus(cfg, log=LogLines())
  entry, model = Path(corpus.meta["cache_entry"]), Path(corpus.meta["tokenizer_model"])
  expected_train = np.array(corpus.train_tokens)
  expected_model = model.read_bytes()
  del corpus

  (entry / "train.bin").write_bytes((entry / "train.bin").read_bytes()[:100])  # truncated
  log = LogLines()
  corpus = data.prepare_corpus(cfg, log=log)
  assert log.saying("tokenizer: cached") and log.saying("tokens: packed")
  np.testing.assert_array_equal(corpus.train_tokens, expected_train)

  model.write_bytes(expected_model[:-1] + bytes([expected_model[-1] ^ 1]))  # one bit flipped
  (entry / "meta.json").unlink()  # an entry without its meta is incomplete
  log = LogLines()
  corpus = data.prepare_corpus(cfg, log=log)
  assert log.saying("tokenizer: trained") and log.saying("tokens: packed")
  assert model.read_bytes() == expected_model
  np.testing.assert_array_equal(corpus.train_tokens, expected_train)
  assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_cache_dir_falls_back_to_env_then_home(monkeypatch, tmp_path):
  assert data.cache_dir(DataConfig(cache_dir=str(tmp_path))) == tmp_path
  monkeypatch.setenv("TTT_JAX_CACHE", str(tmp_path / "env"))
  assert data.cache_dir(DataConfig()) == tmp_path / "env"
  monkeypatch.delenv("TTT_JAX_CACHE")
  assert data.cache_dir(DataConfig()) == Path.home() / ".cache" / "ttt_jax"


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
  corpus = data.prepare_corpus(cfg, log=LogLines())
  tokenizer = corpus.tokenizer
  decoded = [tokenizer.decode(d[:-1]) for tokens in (corpus.train_tokens, corpus.val_tokens)
             for d in split_on_eos(tokens, tokenizer.eos_id)]
  assert sorted(decoded) == sorted(PROSE)  # n0.txt once; empty file and blank line skipped
  names = ["n0.txt", "n1.txt", "records.jsonl:1", "records.jsonl:3"]
  assert corpus.meta["val_docs"] == sum(data.split_documents(names, 0.3))


def test_packed_bin_corpus(tmp_path):
  tokens = (np.arange(1000) * 7 % 300).astype(np.uint16)
  tokens.tofile(tmp_path / "train.bin")
  (tmp_path / "train.json").write_text(json.dumps(
      {"vocab_size": 300, "dtype": "uint16", "num_tokens": 1000, "eos_id": 5}))
  cfg = small_config(tmp_path, [str(tmp_path / "train.bin")], val_fraction=0.1)
  log = LogLines()
  corpus = data.prepare_corpus(cfg, log=log)
  assert corpus.tokenizer is None and corpus.vocab_size == 300
  np.testing.assert_array_equal(corpus.train_tokens, tokens[:900])
  np.testing.assert_array_equal(corpus.val_tokens, tokens[900:])
  assert corpus.meta["eos_id"] == 5 and corpus.meta["val_tokens"] == 100
  assert log.saying("corpus: using vocab_size=300")

  # The seed handoff's naming: x.bin.json with n_tokens, and uint32 ids.
  tokens.astype(np.uint32).tofile(tmp_path / "seed.bin")
  (tmp_path / "seed.bin.json").write_text(json.dumps(
      {"vocab_size": 300, "dtype": "uint32", "n_tokens": 1000}))
  corpus = data.prepare_corpus(dataclasses.replace(cfg, corpus=(str(tmp_path / "seed.bin"),)),
                               log=LogLines())
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
    "glob matches nothing", "missing file", "directory", "all empty", "non-utf8",
    "malformed jsonl", "missing text", "text not str", "one document", "too small",
    "vocab too large", "bin size mismatch", "bin id out of range", "bin sidecar field",
    "bin too small")


@pytest.mark.parametrize("case", BAD_DATA_CASES)
def test_bad_data_is_one_clear_error(tmp_path, case):
  cases = _bad_corpora(tmp_path)
  assert set(cases) == set(BAD_DATA_CASES)
  corpus, overrides, message = cases[case]
  cfg = small_config(tmp_path, corpus, **{"vocab_size": 300, "val_fraction": 0.1, **overrides})
  with pytest.raises(data.DataError, match=message):
    data.prepare_corpus(cfg, log=LogLines())


def test_bin_errors_missing_sidecar_and_mixed_sources(tmp_path):
  path = _write_bin(tmp_path, range(100), None)
  with pytest.raises(data.DataError, match=r"tok\.bin: missing sidecar tok\.json"):
    data.prepare_corpus(small_config(tmp_path, [path]), log=LogLines())
  (tmp_path / "tok.json").write_text('{"vocab_size": 300, "dtype": "uint16", "num_tokens": 100}')
  with pytest.raises(data.DataError, match=r"must be the only source"):
    data.prepare_corpus(small_config(tmp_path, [path, "stdlib"]), log=LogLines())


# --------------------------------------------------------------------------- pipeline

SEQ = 4


def window_ids(batch: dict[str, np.ndarray]) -> list[int]:
  """Window index of each row, for a token stream ``arange(n)``."""
  return (batch["inputs"][:, 0] // SEQ).tolist()


def take(dataset, steps: int) -> list[dict[str, np.ndarray]]:
  iterator = iter(dataset)
  return [next(iterator) for _ in range(steps)]


def make_dataset(num_windows: int = 12, **overrides):
  tokens = np.arange(num_windows * SEQ + 1, dtype=np.uint16)
  kwargs = dict(seq_len=SEQ, global_batch_size=4, seed=0, shuffle=True, process_index=0,
                process_count=1, worker_count=0)
  return data.train_dataset(tokens, **{**kwargs, **overrides})


def test_windows_are_shifted_pairs_sharing_one_boundary_token():
  tokens = np.arange(3 * SEQ + 2, dtype=np.uint16)
  source = data.TokenWindows(tokens, SEQ)
  assert len(source) == 3
  np.testing.assert_array_equal(source[1]["inputs"], [4, 5, 6, 7])
  np.testing.assert_array_equal(source[1]["targets"], [5, 6, 7, 8])
  batch = take(make_dataset(shuffle=False), 1)[0]
  assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (4, SEQ)
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


def test_order_is_a_function_of_the_seed():
  first = [window_ids(b) for b in take(make_dataset(seed=3), 6)]
  assert first == [window_ids(b) for b in take(make_dataset(seed=3), 6)]
  assert first != [window_ids(b) for b in take(make_dataset(seed=4), 6)]
  assert [window_ids(b) for b in take(make_dataset(shuffle=False), 4)] == [
      [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [0, 1, 2, 3]]


def test_iterates_epochs_each_a_fresh_permutation():
  stream = [i for b in take(make_dataset(), 9) for i in window_ids(b)]
  epochs = [stream[i:i + 12] for i in range(0, 36, 12)]
  assert all(sorted(epoch) == list(range(12)) for epoch in epochs)
  assert len({tuple(epoch) for epoch in epochs}) == 3


@pytest.mark.parametrize("num_windows", [16, 13])
def test_processes_split_each_global_batch(num_windows):
  """Each step, the processes' batches together are the single-process global batch,
  also across epoch boundaries (13 windows: a batch may then hold a window twice)."""
  steps = 8
  single = take(make_dataset(num_windows), steps)
  per_process = [take(make_dataset(num_windows, process_index=p, process_count=2), steps)
                 for p in range(2)]
  for step in range(steps):
    a, b = (window_ids(per_process[p][step]) for p in range(2))
    assert len(a) == len(b) == 2
    assert sorted(a + b) == sorted(window_ids(single[step]))
    if num_windows == 16:  # epochs align with steps: no window twice in a step
      assert not set(a) & set(b)
  with pytest.raises(data.DataError, match="global batch size 5.*process count 2"):
    make_dataset(global_batch_size=5, process_count=2)


def test_iterator_state_round_trip():
  iterator = iter(make_dataset(seed=7))
  for _ in range(5):
    next(iterator)
  state = iterator.get_state()
  expected = [window_ids(next(iterator)) for _ in range(6)]
  resumed = iter(make_dataset(seed=7))  # a fresh pipeline, as after a restart
  resumed.set_state(state)
  assert [window_ids(next(resumed)) for _ in range(6)] == expected


def test_worker_processes_are_deterministic_and_resumable():
  dataset = make_dataset(40, worker_count=2)
  iterator = iter(dataset)
  first = [window_ids(next(iterator)) for _ in range(3)]
  state = iterator.get_state()
  expected = [window_ids(next(iterator)) for _ in range(12)]
  iterator.close()
  resumed = iter(dataset)
  resumed.set_state(state)
  assert [window_ids(next(resumed)) for _ in range(12)] == expected
  resumed.close()
  stream = [i for ids in first + expected for i in ids]
  assert sorted(stream[:40]) == list(range(40))


def test_memmap_source_pickles_by_reference(tmp_path):
  np.arange(100, dtype=np.uint16).tofile(tmp_path / "t.bin")
  tokens = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r", offset=20, shape=(50,))
  source = data.TokenWindows(tokens, SEQ)
  blob = pickle.dumps(source)
  assert len(blob) < 400
  clone = pickle.loads(blob)
  np.testing.assert_array_equal(clone[3]["inputs"], [22, 23, 24, 25])


def test_eval_batches_in_order_and_split_across_processes():
  tokens = np.arange(10 * SEQ + 1, dtype=np.uint16)  # 10 windows
  kwargs = dict(seq_len=SEQ, batch_size=4, num_batches=5)
  single = data.eval_batches(tokens, process_index=0, process_count=1, **kwargs)
  assert [window_ids(b) for b in single] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # only 2 full
  halves = [data.eval_batches(tokens, process_index=p, process_count=2, **kwargs)
            for p in range(2)]
  for i, batch in enumerate(single):
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(
          np.concatenate([halves[0][i][key], halves[1][i][key]]), batch[key])
  np.testing.assert_array_equal(single[1]["targets"][-1], [29, 30, 31, 32])
  with pytest.raises(data.DataError, match="fewer than one eval batch of 16"):
    data.eval_batches(tokens, seq_len=SEQ, batch_size=16, num_batches=1, process_index=0,
                      process_count=1)


def expected_segment_ids(inputs: np.ndarray, eos_id: int) -> list[int]:
  """Loop reference: the number of EOS tokens among inputs[0..t-1]."""
  ids, count = [], 0
  for token in inputs:
    ids.append(count)
    count += int(token == eos_id)
  return ids


def test_segment_ids_count_the_eos_before_each_input_token():
  eos = 0
  #          window 0 (inputs 0..7)    | window 1                 | window 2
  tokens = [eos, 3, 4, eos, eos, 5, 6, 7, 8, eos, 1, 2, 3, 4, 5, eos, 9, 9, eos, 9, 9, 9, 9, 9, 9]
  source = data.TokenWindows(np.asarray(tokens, np.uint16), 8, eos_id=eos)
  assert len(source) == 3
  expected = [[0, 1, 1, 1, 2, 3, 3, 3],  # an EOS first: the next token starts document 1
              [0, 0, 1, 1, 1, 1, 1, 1],  # the window's last input is an EOS: no id for it
              [0, 0, 0, 1, 1, 1, 1, 1]]
  for index, ids in enumerate(expected):
    example = source[index]
    assert example["segment_ids"].dtype == np.int32
    np.testing.assert_array_equal(example["segment_ids"], ids)
    assert ids == expected_segment_ids(example["inputs"], eos)
  assert "segment_ids" not in data.TokenWindows(np.asarray(tokens, np.uint16), 8)[0]
  batch = take(make_dataset(), 1)[0]
  assert set(batch) == {"inputs", "targets"}
  # The same windows in the same order, and the same (position-only) iterator state, so
  # checkpoints resume with the option on or off.
  plain, masked = iter(make_dataset(seed=7)), iter(make_dataset(seed=7, eos_id=5))
  for _ in range(3):
    a, b = next(plain), next(masked)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert b["segment_ids"].tolist() == [expected_segment_ids(row, 5) for row in b["inputs"]]
  assert plain.get_state() == masked.get_state()
  resumed = iter(make_dataset(seed=7, eos_id=5))
  resumed.set_state(plain.get_state())
  for _ in range(3):
    a, b = next(masked), next(resumed)
    for key in ("inputs", "targets", "segment_ids"):
      np.testing.assert_array_equal(a[key], b[key])


def test_segment_ids_of_train_windows_and_eval_batches_agree_on_real_text(sample):
  _, corpus, _, _ = sample
  eos, seq_len = corpus.tokenizer.eos_id, 32
  tokens = corpus.train_tokens[:10000]  # the first few documents
  source = data.TokenWindows(tokens, seq_len, eos_id=eos)
  steps = len(source) // 4  # every full batch of the val split
  train = take(data.train_dataset(tokens, seq_len=seq_len, global_batch_size=4, seed=0,
                                  shuffle=False, process_index=0, process_count=1,
                                  worker_count=0, eos_id=eos), steps)
  evals = data.eval_batches(tokens, seq_len=seq_len, batch_size=4, num_batches=steps,
                            process_index=0, process_count=1, eos_id=eos)
  plain = data.eval_batches(tokens, seq_len=seq_len, batch_size=4, num_batches=1,
                            process_index=0, process_count=1)
  assert len(evals) == steps and "segment_ids" not in plain[0]
  resets = 0
  for step in range(steps):
    for key in ("inputs", "targets", "segment_ids"):
      np.testing.assert_array_equal(train[step][key], evals[step][key])
    for row in range(4):
      window = source[4 * step + row]
      np.testing.assert_array_equal(train[step]["segment_ids"][row], window["segment_ids"])
      assert window["segment_ids"].tolist() == expected_segment_ids(window["inputs"], eos)
      resets += int(window["segment_ids"][-1])
  assert resets > 0  # some windows hold a document end


def test_document_eos_id_sources_and_the_error_without_one(sample, tmp_path):
  cfg, corpus, _, _ = sample
  assert data.document_eos_id(cfg, corpus) is None
  masked = dataclasses.replace(cfg, document_mask=True)
  assert data.document_eos_id(masked, corpus) == corpus.tokenizer.eos_id
  tokens = np.arange(200) % 50
  with_eos = _write_bin(tmp_path, tokens, {"vocab_size": 50, "dtype": "uint16",
                                           "num_tokens": 200, "eos_id": 7}, "with_eos")
  bin_cfg = small_config(tmp_path, [with_eos], seq_len=8, document_mask=True)
  assert data.document_eos_id(bin_cfg, data.prepare_corpus(bin_cfg, log=LogLines())) == 7
  without = _write_bin(tmp_path, tokens, {"vocab_size": 50, "dtype": "uint16",
                                          "num_tokens": 200}, "no_eos")
  bin_cfg = dataclasses.replace(bin_cfg, corpus=(without,))
  packed = data.prepare_corpus(bin_cfg, log=LogLines())
  with pytest.raises(data.DataError, match=r"^data\.document_mask: no valid EOS id for "
                     r"data\.corpus .*no_eos\.bin.*\(got None\).*sidecar an 'eos_id'"):
    data.document_eos_id(bin_cfg, packed)
  assert data.document_eos_id(dataclasses.replace(bin_cfg, document_mask=False), packed) is None


# ---------------------------------------------------------------------------- metrics


def test_bits_per_byte_on_known_numbers(sample):
  tokenizer = sample[1].tokenizer
  text = "héllo wörld\n"
  assert data.count_bytes(np.asarray(tokenizer.encode(text)), tokenizer.piece_bytes) == 14
  assert data.count_bytes(np.asarray([[tokenizer.eos_id, tokenizer.pad_id]]),
                          tokenizer.piece_bytes) == 0
  assert data.bits_per_byte(100 * math.log(2), 100) == pytest.approx(1.0)
  assert data.bits_per_byte(8.0, 4) == pytest.approx(2.0 / math.log(2))
  assert math.isnan(data.bits_per_byte(1.0, 0))


@pytest.mark.slow
def test_full_stdlib_corpus_end_to_end(tmp_path):
  """The quickstart's corpus at the default vocab (about 5 s cold on 2 cores)."""
  corpus = data.prepare_corpus(DataConfig(cache_dir=str(tmp_path)), log=LogLines())
  tokenizer, meta = corpus.tokenizer, corpus.meta
  assert corpus.vocab_size == 8192 and meta["sources"] == ["stdlib"]
  assert meta["train_docs"] > 500 and meta["val_docs"] > 10
  assert len(corpus.val_tokens) > 100 * DataConfig().seq_len
  for split in ("train", "val"):
    tokens = np.asarray(getattr(corpus, f"{split}_tokens"))
    assert data.count_bytes(tokens, tokenizer.piece_bytes) == meta[f"{split}_bytes"]
    assert (tokens == tokenizer.eos_id).sum() == meta[f"{split}_docs"]
  root, files = data.stdlib_files()
  for name in files:
    text = (root / name).read_text(encoding="utf-8")
    assert tokenizer.decode(tokenizer.encode(text)) == text, name
