"""Sliding-window evaluation (``ttt_jax.eval.sliding``, ``eval.stride``): every target of
the evaluated stream is scored exactly once with its exact bytes; stride = seq_len is
today's evaluation bit for bit; a smaller stride is no worse on a trained model."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ttt_jax import runs, sharding, train
from ttt_jax.config import MeshConfig, load_config
from ttt_jax.data import bpb, pipeline
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.errors import ConfigError, DataError
from ttt_jax.eval import lm as eval_lm
from ttt_jax.eval import sliding
from ttt_jax.training.step import make_eval_step
from data_util import prepare_sample
from train_util import copy_stdlib_corpus, eval_losses, tiny_config


@pytest.mark.parametrize("n_tokens,seq_len,stride", [
    (65, 64, 64), (257, 64, 64), (257, 64, 16), (257, 64, 24), (300, 64, 1), (100, 32, 7),
    (33, 32, 5)])
def test_the_windows_score_every_target_once_with_the_stream_before_it(n_tokens, seq_len,
                                                                       stride):
  windows = sliding.plan(0, n_tokens - 1, seq_len, stride)
  scored = np.concatenate([np.arange(p + 1, e + 1)
                           for p, e in zip(windows.prev_ends, windows.ends)])
  np.testing.assert_array_equal(scored, np.arange(1, n_tokens))
  assert (windows.starts >= 0).all() and (windows.ends - windows.starts == seq_len).all()
  assert windows.ends[0] == seq_len and windows.prev_ends[0] == 0  # all of the first
  middle = slice(1, len(windows) - 1)
  np.testing.assert_array_equal(windows.starts[:-1], stride * np.arange(len(windows) - 1))
  assert (windows.ends[middle] - windows.prev_ends[middle] == stride).all()
  assert 0 < windows.ends[-1] - windows.prev_ends[-1] <= (stride if len(windows) > 1
                                                           else seq_len)


def test_a_stream_shorter_than_a_window_is_refused():
  with pytest.raises(DataError, match="seq_len=64"):
    sliding.plan(0, 40, 64, 16)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
  """A real corpus with a tokenizer, and a one-device mesh: (corpus, mesh)."""
  _, corpus, _, _ = prepare_sample(tmp_path_factory.mktemp("sliding"))
  return corpus, sharding.make_mesh(MeshConfig(num_devices=1))


def _stream(sample, batches: int = 3, batch_size: int = 4) -> sliding.Stream:
  corpus, mesh = sample
  tokens = sliding.eval_stream(corpus.val_tokens, seq_len=32, batch_size=batch_size,
                               batches=batches)
  return sliding.Stream(tokens, 32, batch_size, corpus.tokenizer.piece_bytes, mesh)


def test_the_evaluated_stream_is_what_the_validation_batches_cover(sample):
  corpus, _ = sample
  stream = _stream(sample)
  batches = pipeline.eval_batches(corpus.val_tokens, seq_len=32, batch_size=4,
                                  num_batches=3, process_index=0, process_count=1)
  covered = np.concatenate([b["inputs"].reshape(-1) for b in batches]
                           + [batches[-1]["targets"][-1, -1:]])
  np.testing.assert_array_equal(stream.tokens, covered)
  # stride = seq_len: the same rows, every target scored
  rows = list(sliding.host_batches(stream, sliding.plan(0, len(stream.tokens) - 1, 32, 32)))
  assert len(rows) == len(batches)
  for row, batch in zip(rows, batches):
    np.testing.assert_array_equal(row["inputs"], batch["inputs"])
    np.testing.assert_array_equal(row["targets"], batch["targets"])
    assert (row[sliding.MASK] == 1).all()


@pytest.mark.parametrize("stride", [32, 16, 5, 1])
def test_every_stride_scores_n_minus_one_tokens_and_their_exact_bytes(sample, stride):
  stream = _stream(sample)
  rows = list(sliding.host_batches(stream, sliding.plan(0, len(stream.tokens) - 1, 32,
                                                        stride)))
  masks = [row[sliding.MASK] > 0 for row in rows]
  targets = np.concatenate([row["targets"][mask] for row, mask in zip(rows, masks)])
  np.testing.assert_array_equal(targets, stream.tokens[1:])  # in order, each once
  assert sum(int(mask.sum()) for mask in masks) == len(stream.tokens) - 1
  padded = sum(int((~mask.any(axis=1)).sum()) for mask in masks)
  assert padded < stream.batch_size and all(row["inputs"].shape == (4, 32) for row in rows)
  scored_bytes = sum(int(stream.piece_bytes[row["targets"]][mask].sum())
                     for row, mask in zip(rows, masks))
  assert scored_bytes == bpb.count_bytes(stream.tokens[1:], stream.piece_bytes)


def test_ttt_eval_max_tokens_takes_the_splits_first_tokens(sample, tmp_path):
  corpus, mesh = sample
  cfg = load_config(None, ["data.seq_len=32", "train.batch_size=4", "eval.batches=3",
                           f"data.cache_dir={tmp_path}"])
  default = eval_lm.val_stream(cfg, corpus, mesh, 0)
  assert len(default.tokens) == 3 * 4 * 32 + 1
  np.testing.assert_array_equal(eval_lm.val_stream(cfg, corpus, mesh, 0, 100).tokens,
                                corpus.val_tokens[:100])
  assert len(eval_lm.val_stream(cfg, corpus, mesh, 0, 10**9).tokens) == len(corpus.val_tokens)
  with pytest.raises(ConfigError, match="ttt_eval.max_tokens: 32 tokens do not fill"):
    eval_lm.val_stream(cfg, corpus, mesh, 0, 32)


def test_the_stride_must_be_within_the_window():
  for stride, message in ((65, "eval.stride: must be <= data.seq_len=64, got 65"),
                          (-1, "eval.stride: must be >= 0")):
    with pytest.raises(ConfigError, match=message):
      load_config(None, ["data.seq_len=64", f"eval.stride={stride}"])
  assert load_config(None, ["data.seq_len=64", "eval.stride=64"]).eval.stride == 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny model trained 60 steps, evaluated by the train loop at its end: workdir."""
  root = tmp_path_factory.mktemp("sliding_run")
  train.train(tiny_config(copy_stdlib_corpus(root / "src"), root / "cache",
                          "train.eval_every=60", "checkpoint.every=60"), root / "run")
  return root / "run"


@pytest.mark.slow
def test_stride_seq_len_is_todays_evaluation_and_smaller_strides_are_no_worse(trained):
  cfg, graphdef, params, _, mesh = runs.load_trained(trained, log=lambda _: None)
  corpus = corpus_lib.prepare_corpus(cfg.data, log=lambda _: None)
  _, batches = runs.run_batches(cfg, corpus, train_batch_size=None, eval_batch_size=8,
                                eval_batches=4)
  today = eval_lm.evaluate(jax.jit(make_eval_step(graphdef)), params,
                           [sharding.put_batch(b, mesh) for b in batches],
                           eval_lm.piece_bytes(corpus, mesh))["eval_loss"]
  full = eval_lm.evaluate_lm(trained, [], 0)
  assert full["eval_loss"] == today and full["stride"] == 64  # bit for bit
  assert today == pytest.approx(eval_losses(trained)[60], rel=1e-6)  # as the loop logged
  stream = eval_lm.val_stream(cfg, corpus, mesh, 0)
  exact = (len(stream.tokens) - 1, bpb.count_bytes(stream.tokens[1:], stream.piece_bytes))
  assert exact[0] == 4 * 8 * 64  # eval.batches x batch x seq_len
  # the windowed path at stride = seq_len: the same targets, the same loss to rounding
  windowed = sliding.evaluate(graphdef, params, stream, 64)
  assert (windowed["tokens"], windowed["bytes"]) == exact
  assert windowed["eval_loss"] == pytest.approx(today, rel=1e-6)
  for stride in (32, 16):
    row = eval_lm.evaluate_lm(trained, [f"eval.stride={stride}"], 0)
    assert (row["stride"], row["tokens"], row["bytes"]) == (stride, *exact)
    assert row["eval_loss"] <= full["eval_loss"] + 1e-3, (stride, row, full)
