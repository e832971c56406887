"""Shared helpers for tests that run the training loop on small real text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ttt_jax.data import corpus
from ttt_jax.config import Config, load_config

STDLIB_FILES = ("argparse.py", "difflib.py", "textwrap.py", "dataclasses.py",
                "json/decoder.py", "json/encoder.py", "string.py", "shlex.py")
"""Real stdlib sources (~350 KB) used as the corpus of the training tests."""


def copy_stdlib_corpus(directory: Path) -> str:
  """Copies STDLIB_FILES into ``directory``; returns a glob matching them."""
  root, _ = corpus.stdlib_files()
  directory.mkdir(parents=True, exist_ok=True)
  for name in STDLIB_FILES:
    shutil.copyfile(root / name, directory / name.replace("/", "_"))
  return str(directory / "*.py")


def pretokenized_corpus(directory: Path, vocab_size: int, num_tokens: int = 40_000) -> str:
  """Writes random token ids below ``vocab_size`` as a pre-tokenized corpus (``.bin`` and
  its ``.json`` sidecar; no tokenizer, so no bytes); returns the ``.bin`` path."""
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f"tokens{vocab_size}.bin"
  np.random.default_rng(vocab_size).integers(0, vocab_size, num_tokens).astype(
      np.uint16).tofile(path)
  path.with_suffix(".json").write_text(json.dumps(
      {"vocab_size": vocab_size, "dtype": "uint16", "num_tokens": num_tokens}))
  return str(path)


def tiny_overrides(corpus_glob: str, cache_dir: Path) -> list[str]:
  """``--set`` values of a 2-layer d64 model on one device, quick to compile and train."""
  return [
      f"data.corpus=[{corpus_glob}]", f"data.cache_dir={cache_dir}", "data.seq_len=64",
      "data.vocab_size=512", "data.val_fraction=0.15",
      "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.ffn.d_ff=128",
      "model.tie_embeddings=true",
      "optim.lr=2e-2", "optim.warmup_steps=5",
      "train.steps=60", "train.batch_size=8", "train.log_every=1", "train.eval_every=30",
      "train.peak_flops=1e11", "eval.batches=4",
      "checkpoint.every=20", "checkpoint.keep=3", "checkpoint.async_save=true",
      "mesh.num_devices=1", "mesh.fsdp=1",
      "logging.progress_bar=false", "logging.tensorboard=true",
  ]


def tiny_config(corpus_glob: str, cache_dir: Path, *overrides: str) -> Config:
  return load_config(None, tiny_overrides(corpus_glob, cache_dir) + list(overrides))


def read_metrics(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(workdir: Path) -> dict[int, float]:
  return {row["step"]: row["loss"] for row in read_metrics(workdir) if "loss" in row}


def eval_losses(workdir: Path) -> dict[int, float]:
  return {row["step"]: row["eval_loss"] for row in read_metrics(workdir) if "eval_loss" in row}
