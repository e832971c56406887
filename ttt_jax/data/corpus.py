"""Corpus preparation: documents from ``data.corpus`` to two flat token arrays.

``prepare_corpus`` turns ``DataConfig.corpus`` into a ``Corpus``:

  documents --(hash of name < val_fraction)--> train / val
  train     --sentencepiece BPE (tokenizer.py)--> Tokenizer        [cached]
  each split --encode, EOS after every document--> uint16/uint32   [cached]

Sources are the running Python's standard library (``"stdlib"``), text files and globs,
``.jsonl`` files with a ``text`` field per line, or one packed ``.bin`` token file with
a ``.json`` sidecar (split by position: the last ``val_fraction`` of tokens is val).

Cache entries live under ``cache_dir/{tokenizers,tokens}/<content hash>/`` and are
published by renaming a finished staging directory, with every file's size and sha256
in ``meta.json``; an entry that fails that check is rebuilt, never trusted.

``document_eos_id`` gives the EOS id that ends every document of a corpus, which
``data.document_mask`` resets the model at (``pipeline.document_segment_ids``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import platform
import re
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ttt_jax.config import DataConfig
from ttt_jax.data.tokenizer import STEP_PIECE, Tokenizer, train_tokenizer, trainer_settings
from ttt_jax.errors import DataError

STDLIB = "stdlib"
"""The ``data.corpus`` entry naming the running Python's standard library."""
CACHE_FORMAT = 1
"""Bumped whenever the layout or meaning of cache entries changes."""
_STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_ENCODE_BATCH_CHARS = 1 << 23
_SCAN_CHUNK_TOKENS = 1 << 24
_GLOB_MAGIC = re.compile(r"[*?[]")


@dataclasses.dataclass(frozen=True)
class Document:
  name: str
  """Split key: the path relative to its source (``path:line`` for JSONL records)."""
  text: str


@dataclasses.dataclass(frozen=True)
class Corpus:
  train_tokens: np.ndarray
  """1-D uint16/uint32 token stream of the train split (a read-only memmap)."""
  val_tokens: np.ndarray
  """1-D token stream of the validation split."""
  vocab_size: int
  tokenizer: Tokenizer | None
  """None for a packed .bin corpus given without ``data.tokenizer``."""
  meta: dict[str, Any]
  """JSON-able provenance: special ids, python version, hashes, token/byte counts."""


# ---------------------------------------------------------------------------- sources


def stdlib_files(include_tests: bool = False) -> tuple[Path, list[str]]:
  """The stdlib directory and its ``.py`` files (relative posix paths, sorted).

  ``site-packages``/``dist-packages`` are skipped (some installs keep them inside the
  stdlib), and so are ``test``/``tests``/``idle_test`` packages unless ``include_tests``.
  """
  root = Path(sysconfig.get_paths()["stdlib"])
  skipped = _STDLIB_SKIPPED_DIRS if include_tests else _STDLIB_SKIPPED_DIRS | _STDLIB_TEST_DIRS
  relative_paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in skipped]
    base = Path(dirpath).relative_to(root)
    relative_paths.extend((base / f).as_posix() for f in filenames if f.endswith(".py"))
  return root, sorted(relative_paths)


def _stdlib_documents(include_tests: bool, log: Callable[[str], None]) -> list[Document]:
  root, relative_paths = stdlib_files(include_tests)
  documents, undecodable = [], []
  for relative_path in relative_paths:
    try:
      text = (root / relative_path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:  # a few test files deliberately use legacy encodings
      undecodable.append(relative_path)
      continue
    if text:
      documents.append(Document(relative_path, text))
  if undecodable:
    log(f"corpus: skipped {len(undecodable)} non-UTF-8 stdlib files: {', '.join(undecodable)}")
  return documents


def _glob_base(pattern: str) -> Path:
  """The leading directories of ``pattern`` that contain no wildcards."""
  literal = itertools.takewhile(lambda part: not _GLOB_MAGIC.search(part), Path(pattern).parts)
  return Path(*literal)


def _expand_source(spec: str) -> list[tuple[Path, str]]:
  """(path, document name) of each file named by one ``data.corpus`` entry: a glob,
  unless it is the name of a file (``notes [draft].txt``)."""
  pattern = os.path.expanduser(spec)
  if _GLOB_MAGIC.search(pattern) and not os.path.isfile(pattern):
    matches = sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
    if not matches:
      raise DataError(f"data.corpus: {spec!r} matched no files")
    base = _glob_base(pattern)
    return [(Path(m), Path(os.path.relpath(m, base)).as_posix()) for m in matches]
  path = Path(pattern)
  if path.is_dir():
    raise DataError(f"data.corpus: {spec} is a directory; name its files with a glob "
                    f"such as '{spec.rstrip('/')}/**/*.txt'")
  if not path.is_file():
    raise DataError(f"data.corpus: {spec} does not exist")
  return [(path, path.name)]


def _read_utf8(path: Path) -> str:
  try:
    data = path.read_bytes()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not valid UTF-8 at byte offset {e.start} ({e.reason})") from None


def _jsonl_documents(path: Path, name: str) -> list[Document]:
  """One document per line's ``text`` field; blank lines are skipped. Lines end at
  ``\n`` only: JSON strings may hold U+2028, U+0085 and the like unescaped, which
  ``str.splitlines`` would also split at (a ``\r`` before ``\n`` is JSON whitespace,
  and a leading byte order mark, as Windows tools write, is dropped)."""
  documents = []
  lines = _read_utf8(path).removeprefix("\ufeff").split("\n")
  for line_number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{line_number}: malformed JSON ({e.msg} at column "
                      f"{e.colno})") from None
    if not isinstance(record, dict) or "text" not in record:
      raise DataError(f"{path}:{line_number}: missing 'text' field")
    if not isinstance(record["text"], str):
      raise DataError(f"{path}:{line_number}: 'text' field must be a string, "
                      f"got {type(record['text']).__name__}")
    if record["text"]:
      documents.append(Document(f"{name}:{line_number}", record["text"]))
  return documents


def _load_documents(cfg: DataConfig, files: list[tuple[Path, str]],
                    log: Callable[[str], None]) -> list[Document]:
  documents = _stdlib_documents(cfg.stdlib_include_tests, log) if STDLIB in cfg.corpus else []
  seen = set()
  for path, name in files:
    if path.resolve() in seen:  # named by overlapping globs
      continue
    seen.add(path.resolve())
    if path.suffix == ".jsonl":
      documents.extend(_jsonl_documents(path, name))
    else:
      text = _read_utf8(path)
      if text:
        documents.append(Document(name, text))
  if not documents:
    raise DataError(f"data.corpus {list(cfg.corpus)}: no non-empty documents "
                    f"({len(files)} files matched, all empty)")
  return documents


def _unit_hash(name: str) -> float:
  """A uniform number in [0, 1) that depends only on ``name``."""
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0**64


def split_documents(names: Sequence[str], val_fraction: float) -> list[bool]:
  """Whether each document is held out, by a hash of its name.

  Both splits are non-empty for two or more documents: if the hash leaves one side
  empty, the document with the smallest (largest) hash moves to val (train).
  """
  if len(names) < 2:
    raise DataError(f"data.corpus: {len(names)} document(s) "
                    f"({', '.join(names) or 'none'}); need at least 2 to split train/val: "
                    "add files, or use a .jsonl file with one document per line")
  scores = [_unit_hash(name) for name in names]
  is_val = [score < val_fraction for score in scores]
  if not any(is_val):
    is_val[int(np.argmin(scores))] = True
  if all(is_val):
    is_val[int(np.argmax(scores))] = False
  return is_val


def _documents_hash(documents: Sequence[Document]) -> str:
  digest = hashlib.sha256()
  for document in documents:
    digest.update(document.name.encode() + b"\0")
    digest.update(hashlib.sha256(document.text.encode()).digest())
  return digest.hexdigest()


# ------------------------------------------------------------------------------ cache


def cache_dir(cfg: DataConfig) -> Path:
  """``data.cache_dir``, else ``$TTT_JAX_CACHE``, else ``~/.cache/ttt_jax``."""
  return Path(cfg.cache_dir or os.environ.get("TTT_JAX_CACHE") or "~/.cache/ttt_jax").expanduser()


def _hash_json(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def _read_entry(entry: Path) -> dict[str, Any] | None:
  """The entry's meta if every file it lists has its recorded size and sha256."""
  try:
    meta = json.loads((entry / "meta.json").read_text())
    for name, record in meta["files"].items():
      path = entry / name
      if path.stat().st_size != record["bytes"] or _file_sha256(path) != record["sha256"]:
        return None
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None
  return meta


@contextlib.contextmanager
def _staging_dir(entry: Path) -> Iterator[Path]:
  """A private directory next to ``entry``, removed on exit unless published."""
  entry.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
  try:
    yield staging
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _publish_entry(staging: Path, entry: Path, meta: dict[str, Any]) -> dict[str, Any]:
  """Records each staged file's size and hash in meta.json, then renames the staging
  directory to ``entry`` (atomic: readers see no entry or a complete one)."""
  files = {path.name: {"bytes": path.stat().st_size, "sha256": _file_sha256(path)}
           for path in sorted(staging.iterdir())}
  meta = {**meta, "files": files}
  (staging / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
  if entry.exists():  # an entry that failed validation
    shutil.rmtree(entry, ignore_errors=True)
  try:
    os.replace(staging, entry)
  except OSError:
    if _read_entry(entry) is None:  # not just another process publishing it first
      raise
  return meta


# ------------------------------------------------------------------------ preparation


def _check_windows(train_tokens: int, val_tokens: int, seq_len: int, what: str) -> None:
  need = seq_len + 1
  if train_tokens < need or val_tokens < need:
    raise DataError(f"{what}: too small for data.seq_len={seq_len}: the train split has "
                    f"{train_tokens} tokens and the val split {val_tokens}; each needs at "
                    f"least {need} (one window of seq_len + 1)")


def _token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def load_tokenizer(path_str: str) -> Tokenizer:
  """The sentencepiece model at ``path_str``; a ``DataError`` naming ``data.tokenizer``
  when it is missing, not a model, or has no EOS piece."""
  path = Path(path_str).expanduser()
  if not path.is_file():
    raise DataError(f"data.tokenizer: {path} does not exist")
  try:
    tokenizer = Tokenizer(path)
  except (OSError, RuntimeError) as e:
    raise DataError(f"data.tokenizer: {path}: not a sentencepiece model ({e})") from None
  if tokenizer.eos_id < 0:
    raise DataError(f"data.tokenizer: {path} has no EOS piece, which separates documents")
  return tokenizer


def _tokenizer_for(cfg: DataConfig, train_documents: Sequence[Document], cache: Path,
                   log: Callable[[str], None]) -> tuple[Tokenizer, Path]:
  """The tokenizer named by ``data.tokenizer``, or one trained on the train split (and
  the path of its ``.model`` file)."""
  if cfg.tokenizer:
    tokenizer = load_tokenizer(cfg.tokenizer)
    log(f"tokenizer: loaded {cfg.tokenizer} (vocab {tokenizer.vocab_size})")
    return tokenizer, Path(cfg.tokenizer).expanduser()
  user_symbols = (STEP_PIECE,) if cfg.step_boundaries != "none" else ()
  settings = trainer_settings(cfg.vocab_size, cfg.tokenizer_max_sentences, user_symbols)
  train_hash = _documents_hash(train_documents)
  entry = cache / "tokenizers" / _hash_json({"format": CACHE_FORMAT, "train": train_hash,
                                             **settings})[:24]
  model_path = entry / "tokenizer.model"
  if _read_entry(entry) is not None:
    log(f"tokenizer: cached {entry}")
    return Tokenizer(model_path), model_path
  start = time.perf_counter()
  try:
    tokenizer = train_tokenizer((d.text for d in train_documents), cfg.vocab_size,
                                cfg.tokenizer_max_sentences, user_symbols)
  except ValueError as e:
    raise DataError(f"data.vocab_size: {e}") from None
  with _staging_dir(entry) as staging:
    tokenizer.save(staging / "tokenizer.model")
    _publish_entry(staging, entry, {"format": CACHE_FORMAT, "train_hash": train_hash,
                                    "settings": settings, "sha256": tokenizer.sha256})
  log(f"tokenizer: trained BPE vocab {cfg.vocab_size} in {time.perf_counter() - start:.1f}s "
      f"-> {entry}")
  return tokenizer, model_path


def _encode_batches(documents: Sequence[Document]) -> Iterator[list[str]]:
  """Consecutive groups of document texts of about ``_ENCODE_BATCH_CHARS`` characters."""
  batch, size = [], 0
  for document in documents:
    batch.append(document.text)
    size += len(document.text)
    if size >= _ENCODE_BATCH_CHARS:
      yield batch
      batch, size = [], 0
  if batch:
    yield batch


def _write_tokens(path: Path, documents: Sequence[Document], tokenizer: Tokenizer,
                  dtype: np.dtype) -> int:
  """Writes ``doc1 EOS doc2 EOS ...`` to ``path``; returns the token count."""
  count = 0
  with open(path, "wb") as f:
    for texts in _encode_batches(documents):
      ids = tokenizer.encode_batch(texts)
      for document_ids in ids:
        document_ids.append(tokenizer.eos_id)
      stream = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype)
      f.write(stream.tobytes())
      count += stream.size
  return count


def _open_tokens(path: Path, dtype: np.dtype, num_tokens: int, offset: int = 0) -> np.ndarray:
  return np.memmap(path, dtype=dtype, mode="r", offset=offset * dtype.itemsize,
                   shape=(num_tokens,))


def _tokenized_corpus(cfg: DataConfig, documents: list[Document],
                      log: Callable[[str], None]) -> Corpus:
  is_val = split_documents([d.name for d in documents], cfg.val_fraction)
  splits = {"train": [d for d, v in zip(documents, is_val) if not v],
            "val": [d for d, v in zip(documents, is_val) if v]}
  num_bytes = {name: sum(len(d.text.encode()) for d in docs) for name, docs in splits.items()}
  python = f" (stdlib of Python {platform.python_version()})" if STDLIB in cfg.corpus else ""
  log(f"corpus: {len(documents)} documents{python}, {sum(num_bytes.values()) / 1e6:.1f} MB; "
      f"{len(splits['train'])} train / {len(splits['val'])} val")
  cache = cache_dir(cfg)
  corpus_hash = _documents_hash(documents)
  tokenizer, model_path = _tokenizer_for(cfg, splits["train"], cache, log)
  dtype = _token_dtype(tokenizer.vocab_size)
  entry = cache / "tokens" / _hash_json({"format": CACHE_FORMAT, "corpus": corpus_hash,
                                         "val_fraction": cfg.val_fraction,
                                         "tokenizer": tokenizer.sha256})[:24]
  meta = _read_entry(entry)
  if meta is not None:
    log(f"tokens: cached {entry}")
  else:
    start = time.perf_counter()
    with _staging_dir(entry) as staging:
      num_tokens = {name: _write_tokens(staging / f"{name}.bin", docs, tokenizer, dtype)
                    for name, docs in splits.items()}
      meta = _publish_entry(staging, entry, {
          "format": CACHE_FORMAT,
          "sources": list(cfg.corpus),
          "python_version": platform.python_version(),
          "corpus_hash": corpus_hash,
          "tokenizer_hash": tokenizer.sha256,
          "vocab_size": tokenizer.vocab_size,
          "dtype": dtype.name,
          **tokenizer.special_ids,
          "val_fraction": cfg.val_fraction,
          **{f"{name}_docs": len(docs) for name, docs in splits.items()},
          **{f"{name}_tokens": count for name, count in num_tokens.items()},
          **{f"{name}_bytes": count for name, count in num_bytes.items()},
      })
    log(f"tokens: packed {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
        f"in {time.perf_counter() - start:.1f}s -> {entry}")
  _check_windows(meta["train_tokens"], meta["val_tokens"], cfg.seq_len,
                 f"data.corpus {list(cfg.corpus)}")
  meta = {k: v for k, v in meta.items() if k != "files"}
  meta.update(sources=list(cfg.corpus), cache_entry=str(entry), tokenizer_model=str(model_path))
  return Corpus(train_tokens=_open_tokens(entry / "train.bin", dtype, meta["train_tokens"]),
                val_tokens=_open_tokens(entry / "val.bin", dtype, meta["val_tokens"]),
                vocab_size=tokenizer.vocab_size, tokenizer=tokenizer, meta=meta)


def _sidecar(path: Path) -> Path:
  """``x.json`` next to ``x.bin`` (or ``x.bin.json``, as the seed's packer writes)."""
  for candidate in (path.with_suffix(".json"), path.with_name(path.name + ".json")):
    if candidate.is_file():
      return candidate
  raise DataError(f"{path}: missing sidecar {path.with_suffix('.json').name} "
                  "(with vocab_size, dtype, num_tokens)")


def _packed_corpus(cfg: DataConfig, path: Path, log: Callable[[str], None]) -> Corpus:
  """A pre-tokenized ``.bin``; the last ``val_fraction`` of its tokens is val."""
  sidecar = _sidecar(path)
  try:
    info = json.loads(sidecar.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f"{sidecar}: unreadable sidecar ({e})") from None
  if not isinstance(info, dict):
    raise DataError(f"{sidecar}: expected a JSON object")
  info.setdefault("num_tokens", info.get("n_tokens"))  # the seed handoff's name
  for field in ("vocab_size", "dtype", "num_tokens"):
    if info.get(field) is None:
      raise DataError(f"{sidecar}: missing field '{field}'")
  for field in ("vocab_size", "num_tokens"):
    if not isinstance(info[field], int) or isinstance(info[field], bool) or info[field] < 0:
      raise DataError(f"{sidecar}: field '{field}' must be a non-negative integer, "
                      f"got {info[field]!r}")
  dtype_match = re.search(r"uint(16|32)", str(info["dtype"]))
  if not dtype_match:
    raise DataError(f"{sidecar}: field 'dtype' must be uint16 or uint32, got {info['dtype']!r}")
  dtype = np.dtype(f"uint{dtype_match.group(1)}")
  vocab_size, num_tokens = info["vocab_size"], info["num_tokens"]
  expected_bytes = num_tokens * dtype.itemsize
  if path.stat().st_size != expected_bytes:
    raise DataError(f"{path}: {path.stat().st_size} bytes, but {sidecar.name} says "
                    f"num_tokens={num_tokens} of {dtype.name} ({expected_bytes} bytes)")
  if num_tokens == 0:
    raise DataError(f"{path}: holds no tokens")
  tokens = _open_tokens(path, dtype, num_tokens)
  for start in range(0, num_tokens, _SCAN_CHUNK_TOKENS):
    chunk = tokens[start:start + _SCAN_CHUNK_TOKENS]
    out_of_range = np.flatnonzero(chunk >= vocab_size)
    if out_of_range.size:
      offset = start + int(out_of_range[0])
      raise DataError(f"{path}: token id {int(tokens[offset])} at token offset {offset} is "
                      f">= vocab_size={vocab_size} from {sidecar.name}")
  num_val = int(num_tokens * cfg.val_fraction)
  _check_windows(num_tokens - num_val, num_val, cfg.seq_len, str(path))
  tokenizer = None
  if cfg.tokenizer:
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size != vocab_size:
      raise DataError(f"data.tokenizer: {cfg.tokenizer} has vocab {tokenizer.vocab_size}, "
                      f"but {sidecar.name} says vocab_size={vocab_size}")
  if cfg.vocab_size != vocab_size:
    log(f"corpus: using vocab_size={vocab_size} from {sidecar} (data.vocab_size is "
        f"{cfg.vocab_size})")
  log(f"corpus: packed {path}: {num_tokens - num_val:,} train / {num_val:,} val tokens")
  meta = {
      "format": CACHE_FORMAT,
      "sources": [str(path)],
      "python_version": platform.python_version(),
      "corpus_hash": _file_sha256(path),
      "tokenizer_hash": tokenizer.sha256 if tokenizer else None,
      "vocab_size": vocab_size,
      "dtype": dtype.name,
      **(tokenizer.special_ids if tokenizer else {"eos_id": info.get("eos_id")}),
      "val_fraction": cfg.val_fraction,
      "train_tokens": num_tokens - num_val,
      "val_tokens": num_val,
      "bytes": info.get("bytes"),
      "sidecar": info,
  }
  return Corpus(train_tokens=_open_tokens(path, dtype, num_tokens - num_val),
                val_tokens=_open_tokens(path, dtype, num_val, offset=num_tokens - num_val),
                vocab_size=vocab_size, tokenizer=tokenizer, meta=meta)


def prepare_corpus(cfg: DataConfig, log: Callable[[str], None] = print) -> Corpus:
  """Reads, splits and tokenizes ``cfg.corpus`` (reusing cached work); see module doc."""
  for number, spec in enumerate(cfg.corpus, start=1):
    if not spec.strip():  # else read as the current directory, or a glob of it
      raise DataError(f"data.corpus: entry {number} is empty ({spec!r}); an unset shell "
                      "variable?")
  files = [match for spec in cfg.corpus if spec != STDLIB for match in _expand_source(spec)]
  packed = [path for path, _ in files if path.suffix == ".bin"]
  if packed:
    if len(files) > 1 or STDLIB in cfg.corpus:
      raise DataError(f"data.corpus: a packed .bin token file must be the only source, got "
                      f"{list(cfg.corpus)} ({len(files)} files)")
    return _packed_corpus(cfg, packed[0], log)
  return _tokenized_corpus(cfg, _load_documents(cfg, files, log), log)



# ------------------------------------------------------------------- document boundaries


def document_eos_id(cfg: DataConfig, corpus: Corpus) -> int | None:
  """The EOS id that ends every packed document when ``cfg.document_mask`` is on (None
  when off): a packed .bin's sidecar ``eos_id``, else the tokenizer's."""
  if not cfg.document_mask:
    return None
  eos_id = (corpus.meta.get("sidecar") or {}).get("eos_id")
  if eos_id is None:
    eos_id = corpus.meta.get("eos_id")
  if (eos_id is None or isinstance(eos_id, bool) or not isinstance(eos_id, int)
      or not 0 <= eos_id < corpus.vocab_size):
    raise DataError(f"data.document_mask: no valid EOS id for data.corpus "
                    f"{list(cfg.corpus)} (got {eos_id!r}); give a packed .bin's sidecar an "
                    f"'eos_id' in [0, {corpus.vocab_size}), set data.tokenizer, or set "
                    "data.document_mask=false")
  return eos_id
