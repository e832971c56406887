"""Greedy / temperature / top-p sampling, the KV-cache generate loop and its decode
inputs (per-token side inputs decided on device)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import Config, ModelConfig
from ttt_jax.inference import sampling
from ttt_jax.models import lm
from ttt_jax.models.ffn.swiglu import SwiGLUConfig

VOCAB = 64


def test_temperature_zero_is_argmax():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(16, 50)), jnp.float32)
  tokens = sampling.sample_token(logits, jax.random.key(0), 0.0, 0.9)
  assert tokens.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), axis=-1))


def test_tiny_top_p_is_argmax():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(64, 30)), jnp.float32)
  for seed in range(3):
    tokens = sampling.sample_token(logits, jax.random.key(seed), 1.0, 1e-6)
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), axis=-1))


def draw_counts(logits_V: np.ndarray, temperature: float, top_p: float, n: int) -> np.ndarray:
  logits_NxV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
  tokens = sampling.sample_token(logits_NxV, jax.random.key(42), temperature, top_p)
  return np.bincount(np.asarray(tokens), minlength=len(logits_V))


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
  expected = counts.sum() * probs
  return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_nucleus_samples_follow_tempered_softmax(temperature):
  logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.3])
  counts = draw_counts(logits, temperature, 1.0, 40000)
  probs = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
  # 7 degrees of freedom: the 99.9% quantile of chi^2_7 is 24.3.
  assert chi_square(counts, probs) < 24.3, (counts, probs * counts.sum())


def test_top_p_keeps_smallest_set_with_enough_mass():
  probs = np.array([0.05, 0.5, 0.15, 0.3])
  counts = draw_counts(np.log(probs), 1.0, 0.7, 20000)  # keeps tokens 1 and 3 (0.5 + 0.3)
  assert counts[0] == 0 and counts[2] == 0
  kept = np.array([0.5, 0.3]) / 0.8
  assert chi_square(counts[[1, 3]], kept) < 10.8  # 99.9% quantile of chi^2_1
  mask = sampling.top_p_mask(jnp.log(jnp.asarray([probs, probs])), jnp.float32(0.85))
  np.testing.assert_array_equal(np.asarray(mask), [[False, True, True, True]] * 2)


def test_top_p_one_keeps_every_token_of_a_large_peaked_vocabulary():
  """The float32 running mass reaches 1 before the tail of a large vocabulary; top_p = 1
  (the default) must still keep every token, as the exact definition does."""
  logits = jax.random.normal(jax.random.key(0), (4, 32000)) * 8.0
  assert bool(jnp.all(sampling.top_p_mask(logits, 1.0)))
  assert bool(jnp.all(sampling.top_p_mask(logits, jnp.float32(1.0))))
  assert not bool(jnp.all(sampling.top_p_mask(logits, 0.999)))


@pytest.fixture(scope="module")
def model() -> lm.LM:
  cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn=SwiGLUConfig(d_ff=64),
                    init_std=0.3)
  return lm.LM(cfg, VOCAB, rngs=nnx.Rngs(0))


def greedy_by_full_forward(model: lm.LM, prompt: jax.Array, n_new: int) -> np.ndarray:
  forward = jax.jit(lambda tokens: model(tokens))
  tokens = prompt
  for _ in range(n_new):
    next_token = jnp.argmax(forward(tokens)[:, -1], axis=-1).astype(jnp.int32)
    tokens = jnp.concatenate([tokens, next_token[:, None]], axis=1)
  return np.asarray(tokens)


@pytest.mark.slow
def test_greedy_generate_matches_repeated_full_forward(model):
  prompt = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, size=(3, 5)), jnp.int32)
  state_before = jax.tree.map(np.asarray, nnx.state(model))
  generated = sampling.generate(model, prompt, 6, jax.random.key(0), temperature=0.0)
  assert generated.shape == (3, 11) and generated.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(generated), greedy_by_full_forward(model, prompt, 6))
  for before, after in zip(jax.tree.leaves(state_before), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(before, np.asarray(after))  # the model is not mutated


@pytest.mark.slow
def test_eos_pads_the_rest_of_the_row(model):
  prompt = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, size=(4, 3)), jnp.int32)
  free = np.asarray(sampling.generate(model, prompt, 8, jax.random.key(1), temperature=0.0))
  eos_id = int(free[0, 3 + 2])  # row 0 emits this token at its third new position
  with_eos = np.asarray(sampling.generate(model, prompt, 8, jax.random.key(1),
                                          temperature=0.0, eos_id=eos_id))
  expected = free.copy()
  for row in range(4):
    hits = np.flatnonzero(free[row, 3:] == eos_id)
    if len(hits):
      expected[row, 3 + hits[0]:] = eos_id
  np.testing.assert_array_equal(with_eos, expected)
  assert np.all(with_eos[0, 5:] == eos_id)


@pytest.mark.slow
def test_sampled_generate_is_reproducible_and_in_vocab(model):
  prompt = jnp.zeros((2, 2), jnp.int32)
  a = sampling.generate(model, prompt, 5, jax.random.key(7), temperature=1.0, top_p=0.9)
  b = sampling.generate(model, prompt, 5, jax.random.key(7), temperature=1.0, top_p=0.9)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert a.shape == (2, 7) and int(a.min()) >= 0 and int(a.max()) < VOCAB


@pytest.mark.slow
def test_forbidden_ids_are_never_generated(model):
  prompt = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, size=(8, 3)), jnp.int32)
  greedy = np.asarray(sampling.generate(model, prompt, 6, jax.random.key(0), temperature=0.0))
  forbidden = tuple(int(t) for t in np.unique(greedy[:, 3]))  # the greedy first tokens
  for temperature in (0.0, 20.0):
    out = np.asarray(sampling.generate(model, prompt, 6, jax.random.key(2),
                                       temperature=temperature, forbid_ids=forbidden))
    assert not np.isin(out[:, 3:], forbidden).any(), temperature
    assert (out[:, 3:] != greedy[:, 3:]).any()


class RunningSum(NamedTuple):
  """A test decode input: each token's side input is offset + the sum of every token so
  far, itself included (state: the sum before the new tokens)."""
  offset: jax.Array

  name = "running_sum"

  def check(self, model: lm.LM) -> None:
    if model.vocab_size != VOCAB:
      raise ValueError("running sums need the test vocabulary")

  def cache_options(self, total_len: int) -> dict[str, Any]:
    return {"running_sum_len": total_len}

  def start(self, batch_size: int) -> jax.Array:
    return jnp.zeros((batch_size,), jnp.int32)

  def next(self, state: jax.Array, tokens_BxS: jax.Array, positions_BxS: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
    del positions_BxS
    sums_BxS = state[:, None] + jnp.cumsum(tokens_BxS, axis=1)
    return sums_BxS + self.offset, sums_BxS[:, -1]


def test_decode_inputs_give_every_token_its_side_input(model, monkeypatch):
  recorded_options = []
  init_cache = lm.LM.init_cache

  def spy_init_cache(self, batch_size, max_len, options=None):
    recorded_options.append(dict(options or {}))
    return init_cache(self, batch_size, max_len, options)

  monkeypatch.setattr(lm.LM, "init_cache", spy_init_cache)
  prompt = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, size=(2, 4)), jnp.int32)
  inputs = (RunningSum(jnp.int32(100)),)
  generation = sampling.generate_with_state(model, prompt, 5, jax.random.key(2),
                                            temperature=0.0, inputs=inputs)
  tokens = np.asarray(generation.tokens_BxT)
  assert tokens.shape == (2, 9)
  assert set(generation.side) == {"running_sum"}
  side = np.asarray(generation.side["running_sum"])
  assert side.shape == (2, 9)
  np.testing.assert_array_equal(side, np.cumsum(tokens, axis=1) + 100)
  assert recorded_options == [{"running_sum_len": 9}]
  # attention reads no side input: the tokens are those of a generation without inputs
  plain = sampling.generate(model, prompt, 5, jax.random.key(2), temperature=0.0)
  np.testing.assert_array_equal(np.asarray(plain), tokens)
  no_inputs = sampling.generate_with_state(model, prompt, 5, jax.random.key(2),
                                           temperature=0.0)
  assert no_inputs.side == {}
  np.testing.assert_array_equal(np.asarray(no_inputs.tokens_BxT), tokens)
  # the final cache holds the first T - 1 tokens (the last one is never fed back)
  assert int(generation.cache.end[0]) == 8


def test_decode_inputs_are_checked_against_the_model():
  other = lm.LM(ModelConfig(n_layers=1, d_model=32, n_heads=4), VOCAB + 1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="running sums need the test vocabulary"):
    sampling.generate(other, jnp.zeros((1, 2), jnp.int32), 3, jax.random.key(0),
                      inputs=(RunningSum(jnp.int32(0)),))
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    sampling.generate(other, jnp.zeros((1, 2), jnp.int32), 0, jax.random.key(0))


def test_a_run_without_side_inputs_decodes_with_none():
  assert sampling.decode_inputs(Config(), tokenizer=None) == ()
