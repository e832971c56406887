"""Shared helpers for the tests of ``ttt_jax.data``: small real-text corpora."""

from __future__ import annotations

from pathlib import Path

from ttt_jax.config import DataConfig
from ttt_jax.data import corpus as corpus_lib

STDLIB_SAMPLE = ("textwrap.py", "colorsys.py", "json/encoder.py", "json/decoder.py",
                 "string.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py", "keyword.py")


def write_stdlib_sample(directory: Path) -> list[str]:
  """Copies real stdlib files into ``directory``; returns their texts in sorted order."""
  root, _ = corpus_lib.stdlib_files()
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


def prepare_sample(tmp_path: Path) -> tuple[DataConfig, corpus_lib.Corpus, list[str], LogLines]:
  """A small real-source corpus, prepared: (config, corpus, texts, log)."""
  texts = write_stdlib_sample(tmp_path / "src")
  cfg = small_config(tmp_path, [str(tmp_path / "src" / "*.py")])
  log = LogLines()
  return cfg, corpus_lib.prepare_corpus(cfg, log=log), texts, log
