"""Score-first test-time training at evaluation (``ttt_jax.eval.score_first``,
``evaluate --task ttt``): legal (a chunk's NLL depends only on the weights and the
tokens up to it; nothing trains before it is scored), the adapt step runs once per chunk
but the last, epochs = 0 is the sliding figure bit for bit, the checkpoint is never
written, and TTT lowers the bits per byte of a briefly trained model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from ttt_jax import evaluate, sharding, train
from ttt_jax.config import MeshConfig, load_config
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.errors import ConfigError
from ttt_jax.eval import lm as eval_lm
from ttt_jax.eval import score_first, sliding, tasks
from ttt_jax.training import state as state_lib
from train_util import copy_stdlib_corpus, pretokenized_corpus, tiny_config


def _stream(tokens: np.ndarray, seq_len: int = 32, batch_size: int = 4) -> sliding.Stream:
  return sliding.Stream(np.asarray(tokens), seq_len, batch_size, np.ones(512, np.int32),
                        sharding.make_mesh(MeshConfig(num_devices=1)))


@pytest.mark.parametrize("stride,chunk_tokens", [(32, 256), (8, 64), (8, 1), (5, 100)])
def test_chunks_are_whole_scoring_batches_and_train_only_on_their_own_scored_tokens(
    stride, chunk_tokens):
  stream = _stream(np.arange(32 * 4 * 5 + 1))
  parts = score_first.chunks(stream, stride, chunk_tokens)
  windows = sliding.plan(0, len(stream.tokens) - 1, 32, stride)
  np.testing.assert_array_equal(np.concatenate([c.scored.ends for c in parts]), windows.ends)
  assert all(len(c.scored) % 4 == 0 for c in parts[:-1]) and len(parts) > 1
  for chunk in parts:
    first, last = int(chunk.scored.prev_ends[0]), int(chunk.scored.ends[-1])
    trained = np.concatenate([np.arange(p + 1, e + 1)
                              for p, e in zip(chunk.train.prev_ends, chunk.train.ends)])
    np.testing.assert_array_equal(trained, np.arange(first + 1, last + 1))
    assert chunk.train.ends.max() == last and (chunk.train.starts >= 0).all()
    assert (np.diff(chunk.train.ends[:-1]) == 32).all()  # non-overlapping but the last


def test_the_learning_rate_decays_by_a_cosine_over_the_chunks():
  ttt = load_config(None, ["ttt_eval.lr=0.1"]).ttt_eval
  rates = [score_first.chunk_lr(ttt, c, 5) for c in range(5)]
  assert rates[0] == 0.1 and rates[2] == pytest.approx(0.05) and rates[-1] == pytest.approx(0)
  assert all(a > b for a, b in zip(rates, rates[1:]))
  flat = load_config(None, ["ttt_eval.lr=0.1", "ttt_eval.cosine=false"]).ttt_eval
  assert {score_first.chunk_lr(flat, c, 5) for c in range(5)} == {0.1}


@pytest.mark.parametrize("override,message", [
    ("ttt_eval.momentum=1.0", "ttt_eval.momentum: must be in [0, 1)"),
    ("ttt_eval.params=blocks/(", "ttt_eval.params: 'blocks/(' is neither"),
    ("ttt_eval.stride=65", "ttt_eval.stride: must be <= data.seq_len=64"),
    ("ttt_eval.chunk_tokens=0", "ttt_eval.chunk_tokens: must be > 0"),
    ("ttt_eval.epochs=-1", "ttt_eval.epochs: must be >= 0")])
def test_bad_ttt_settings_are_refused_naming_the_field(override, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    load_config(None, ["data.seq_len=64", override])


def test_which_parameters_adapt(tmp_path):
  cfg = tiny_config("unused", tmp_path)
  params = state_lib.build(cfg, 512, sharding.make_mesh(cfg.mesh)).state.params
  paths = [score_first.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert score_first.adapted_leaves(cfg, 512, params) == [True] * len(paths)
  matrices = score_first.adapted_leaves(
      tiny_config("unused", tmp_path, "ttt_eval.params=matrices"), 512, params)
  chosen = {path for path, on in zip(paths, matrices) if on}
  assert chosen and not any("embed" in path or "norm" in path for path in chosen), chosen
  regex = score_first.adapted_leaves(tiny_config("unused", tmp_path, "ttt_eval.params=mlp/"),
                                     512, params)
  assert {p for p, on in zip(paths, regex) if on} == {p for p in paths if "mlp/" in p} != set()
  with pytest.raises(ConfigError, match="ttt_eval.params: 'nowhere' matches no parameter"):
    score_first.adapted_leaves(tiny_config("unused", tmp_path, "ttt_eval.params=nowhere"),
                               512, params)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
  """The training tests' corpus, prepared: (glob, cache dir, corpus)."""
  root = tmp_path_factory.mktemp("score_first")
  glob = copy_stdlib_corpus(root / "src")
  cfg = tiny_config(glob, root / "cache")
  return glob, root / "cache", corpus_lib.prepare_corpus(cfg.data, log=lambda _: None)


LEGALITY_TTT = ("ttt_eval.epochs=2", "ttt_eval.momentum=0.9", "ttt_eval.stride=16",
                "ttt_eval.chunk_tokens=256", "ttt_eval.lr=0.05", "eval.batch_size=4")


@pytest.mark.slow
@pytest.mark.parametrize("mixer", ["attention", "ttt_linear"])
def test_a_chunks_nll_depends_only_on_the_weights_and_the_stream_up_to_it(text, mixer):
  glob, cache, corpus = text
  cfg = tiny_config(glob, cache, f"model.mixer={mixer}", *LEGALITY_TTT)
  built = state_lib.build(cfg, corpus.vocab_size, sharding.make_mesh(cfg.mesh))
  graphdef, params = built.graphdef, built.state.params
  adapt = score_first.adapted_leaves(cfg, corpus.vocab_size, params)
  original = np.asarray(corpus.val_tokens[:4 * 4 * 64 + 1])
  parts = score_first.chunks(_stream(original, 64), 16, cfg.ttt_eval.chunk_tokens)
  assert len(parts) == 4
  cut = int(parts[1].scored.ends[-1])  # the last target of chunk 1
  changed = original.copy()
  changed[cut + 1:] = original[cut + 1:][::-1]
  assert (changed[cut + 1:] != original[cut + 1:]).any()
  results = []
  for tokens in (original, changed):
    adapted_chunks = []
    results.append(score_first.run(graphdef, params, _stream(tokens, 64), cfg.ttt_eval,
                                   adapt, 16, on_adapt=adapted_chunks.append))
    assert adapted_chunks == [0, 1, 2]  # once per chunk but the last
  same, other = results
  assert same["chunk_nll"][:2] == other["chunk_nll"][:2]  # bit for bit
  assert same["chunk_nll"][2] != other["chunk_nll"][2]
  # epochs x train batches of 4 windows: chunk 0 (304 targets) 2, chunks 1 and 2 one each
  assert same["steps"] == 2 * (2 + 1 + 1)
  # epochs = 0: the sliding-window figure, bit for bit; TTT changes every later chunk
  frozen = score_first.run(graphdef, params, _stream(original, 64),
                           dataclasses.replace(cfg.ttt_eval, epochs=0), adapt, 16)
  assert frozen["steps"] == 0
  assert sliding.metrics(frozen["total"]) == sliding.evaluate(graphdef, params,
                                                              _stream(original, 64), 16)
  assert frozen["chunk_nll"][0] == same["chunk_nll"][0]
  assert all(a != b for a, b in zip(frozen["chunk_nll"][1:], same["chunk_nll"][1:]))


def _file_hashes(directory: Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_evaluate_task_ttt_reports_both_figures_and_leaves_the_checkpoint(text, capsys):
  glob, cache, _ = text
  workdir = cache.parent / "run"
  train.train(tiny_config(glob, cache, "train.steps=4", "train.eval_every=0",
                          "checkpoint.every=4"), workdir)
  in_flight = workdir / "checkpoints" / "8.orbax-checkpoint-tmp-1234"  # a save under way
  in_flight.mkdir()
  (in_flight / "part").write_bytes(b"being written")
  before = _file_hashes(workdir / "checkpoints")
  capsys.readouterr()
  settings = ["--set", "ttt_eval.stride=32", "--set", "ttt_eval.chunk_tokens=512",
              "--set", "ttt_eval.epochs=2"]
  evaluate.main(["--workdir", str(workdir), "--task", "ttt", *settings])
  result = json.loads(capsys.readouterr().out)
  assert _file_hashes(workdir / "checkpoints") == before
  assert (result["task"], result["step"], result["weights"], result["stride"]) == (
      "ttt", 4, "raw", 32)
  assert result["sliding"]["tokens"] == result["ttt"]["tokens"] == 4 * 8 * 64
  assert sum(result["chunk_tokens"]) == 4 * 8 * 64 and len(result["chunk_nll"]) == 4
  assert result["delta_bpb"] == result["ttt"]["eval_bpb"] - result["sliding"]["eval_bpb"]
  assert result["steps"] == 2 * (2 + 1 + 1)  # epochs x train batches of chunks 0..2
  assert set(result["seconds"]) == {"sliding", "ttt"}
  path = workdir / f"eval_ttt-{tasks.identity_hash(result['evaluation'])}.json"
  assert json.loads(path.read_text()) == result
  lm_row = eval_lm.evaluate_lm(workdir, ["eval.stride=32"], 0)
  assert lm_row["eval_loss"] == result["sliding"]["eval_loss"]  # the same batches


@pytest.mark.slow
def test_a_corpus_without_bytes_gives_strict_json_without_bits_per_byte(tmp_path, capsys):
  """No tokenizer, no bytes: ``eval_bpb`` and ``delta_bpb`` are absent, not NaN (which
  strict JSON readers refuse)."""
  workdir = tmp_path / "run"
  train.train(tiny_config(pretokenized_corpus(tmp_path, 300), tmp_path / "cache",
                          "train.steps=2", "train.eval_every=0", "checkpoint.every=2",
                          "logging.tensorboard=false"), workdir)
  capsys.readouterr()
  evaluate.main(["--workdir", str(workdir), "--task", "ttt", "--set",
                 "ttt_eval.chunk_tokens=512"])

  def refuse(constant: str):
    raise AssertionError(f"{constant} in the result")

  result = json.loads(capsys.readouterr().out, parse_constant=refuse)
  assert "delta_bpb" not in result and "eval_bpb" not in result["ttt"]
  assert result["ttt"]["tokens"] == result["sliding"]["tokens"] > 0
  assert result["steps"] > 0


QUICKSTART_SIZED = ("model.n_layers=4", "model.d_model=192", "model.n_heads=4",
                    "model.ffn.d_ff=512", "data.seq_len=128", "data.vocab_size=2048",
                    "train.batch_size=16", "optim.lr=3e-3", "optim.warmup_steps=10",
                    "train.steps=40", "train.eval_every=0", "checkpoint.every=40",
                    "eval.batches=2")
TTT_SETTINGS = ("ttt_eval.epochs=2", "ttt_eval.lr=0.05", "ttt_eval.momentum=0.9",
                "ttt_eval.grad_clip=1.0", "ttt_eval.cosine=true", "ttt_eval.params=all",
                "ttt_eval.stride=64", "ttt_eval.chunk_tokens=1024")
"""Fixed once, before any result was seen: the defaults but for a chunk that gives this
stream four chunks and a stride of half the window."""


@pytest.mark.slow
def test_ttt_lowers_the_bits_per_byte_of_a_briefly_trained_model(text, tmp_path):
  glob, cache, _ = text
  train.train(tiny_config(glob, cache, *QUICKSTART_SIZED), tmp_path / "run")
  result = score_first.evaluate_run(tmp_path / "run", list(TTT_SETTINGS), 0)
  assert result["chunks"] == 4 and result["steps"] > 0
  assert result["ttt"]["eval_bpb"] <= 0.995 * result["sliding"]["eval_bpb"], result
