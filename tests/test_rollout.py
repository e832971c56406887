"""Rollouts of ragged prompts: left padding, the ragged context, forbidden ids, completion
masks and sequence log-probabilities, on attention, TTT-Linear (both backbones) and CCT
(fixed steps, plain and mHC residuals; mean pooling and semantic steps in their own
test)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.cct.decode import SemanticSteps
from ttt_jax.cct.mixer import STEP_IDS, CCTAttention, CCTConfig, StepRule
from ttt_jax.config import ModelConfig
from ttt_jax.errors import DataError
from ttt_jax.inference import rollout as ro
from ttt_jax.inference import sampling
from ttt_jax.models import lm
from ttt_jax.models.context import SequenceContext, default_positions
from ttt_jax.models.ffn.swiglu import SwiGLUConfig
from ttt_jax.models.mixers.ttt_linear import TTTLinearConfig
from ttt_jax.models.residuals.mhc import MHCConfig

VOCAB = 64
PAD = 0
PROMPTS = ([5, 9, 3, 17, 33, 2, 8], [7], [11, 4, 20, 6, 1], [30, 12, 3, 9, 9, 41, 2, 13, 50])
"""Ragged prompts: pad counts 2, 8, 4, 0 at width 9 (mini-batch 4: the rows start at
every slot of a TTT mini-batch grid, and span several mini-batches)."""

MODELS = {
    "attention": dict(n_kv_heads=2, init_std=0.3),
    "ttt_mamba": dict(init_std=0.1, mixer=TTTLinearConfig(backbone="mamba", mini_batch=4)),
    "ttt_transformer": dict(init_std=0.1,
                            mixer=TTTLinearConfig(backbone="transformer", mini_batch=4)),
    "cct": dict(n_kv_heads=2, init_std=0.3, mixer=CCTConfig(d_summary=8, step_len=3)),
    "cct_mhc": dict(n_kv_heads=2, init_std=0.3, mixer=CCTConfig(d_summary=8, step_len=3),
                    residual=MHCConfig(streams=2)),
}


def make_model(name: str, seed: int = 0) -> lm.LM:
  cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, ffn=SwiGLUConfig(d_ff=64),
                    **MODELS[name])
  return lm.LM(cfg, VOCAB, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module", params=list(MODELS))
def model(request) -> lm.LM:
  return make_model(request.param)


# ----------------------------------------------------------------------------- host side


def test_left_pad_right_aligns_rows_and_rejects_long_ones():
  tokens, lengths = ro.left_pad([[1, 2, 3], [4], []], pad_id=9)
  np.testing.assert_array_equal(tokens, [[1, 2, 3], [9, 9, 4], [9, 9, 9]])
  np.testing.assert_array_equal(lengths, [3, 1, 0])
  assert tokens.dtype == np.int32 and lengths.dtype == np.int32
  tokens, _ = ro.left_pad([[1, 2]], pad_id=0, length=4)
  np.testing.assert_array_equal(tokens, [[0, 0, 1, 2]])
  with pytest.raises(DataError, match="prompt 1 has 3 tokens"):
    ro.left_pad([[1], [1, 2, 3]], pad_id=0, length=2)


def test_ragged_context_positions_and_segments():
  tokens = jnp.zeros((3, 6), jnp.int32)  # width 4, then 2 completion tokens
  ctx = ro.ragged_context(tokens, jnp.asarray([4, 1, 0]), 4)
  np.testing.assert_array_equal(ctx.positions_BxT, [[0, 1, 2, 3, 4, 5], [-3, -2, -1, 0, 1, 2],
                                                    [-4, -3, -2, -1, 0, 1]])
  np.testing.assert_array_equal(ctx.segment_ids_BxT, [[1] * 6, [0, 0, 0, 1, 1, 1],
                                                      [0, 0, 0, 0, 1, 1]])


def test_completion_mask_keeps_the_first_eos_and_nothing_after():
  completion = jnp.asarray([[4, 2, 7, 2], [2, 2, 2, 2], [5, 6, 7, 8]])
  np.testing.assert_array_equal(ro.completion_mask(completion, 2),
                                [[True, True, False, False], [True, False, False, False],
                                 [True] * 4])
  assert bool(jnp.all(ro.completion_mask(completion, None)))


def test_forbidden_ids_are_never_sampled_even_when_most_likely():
  logits = jnp.zeros((4096, 8)).at[:, 3].set(5.0).at[:, 0].set(4.0)
  allowed = sampling.forbid(logits, (0, 3))
  for temperature, top_p in ((0.0, 1.0), (10.0, 1.0), (10.0, 0.5), (1.0, 1e-6)):
    tokens = np.asarray(sampling.sample_token(allowed, jax.random.key(1), temperature, top_p))
    assert not np.isin(tokens, (0, 3)).any(), (temperature, top_p)
  high = np.asarray(sampling.sample_token(allowed, jax.random.key(2), 10.0, 1.0))
  assert set(np.unique(high)) == {1, 2, 4, 5, 6, 7}  # everything else is still sampled


# ----------------------------------------------------------------------------- models


def padded_prompts(prompts=PROMPTS, width: int | None = None):
  tokens, lengths = ro.left_pad(prompts, PAD, width)
  return jnp.asarray(tokens), jnp.asarray(lengths)


@pytest.mark.slow
def test_greedy_rollout_of_a_padded_batch_equals_each_prompt_alone(model):
  tokens, lengths = padded_prompts()
  out = ro.rollout(model, tokens, lengths, 7, jax.random.key(0), temperature=0.0,
                   eos_id=None)
  width = tokens.shape[1]
  np.testing.assert_array_equal(np.asarray(out.tokens_BxT[:, :width]), np.asarray(tokens))
  for row, prompt in enumerate(PROMPTS):
    alone = sampling.generate(model, jnp.asarray([prompt], jnp.int32), 7, jax.random.key(0),
                              temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.completion_BxN[row]),
                                  np.asarray(alone[0, len(prompt):]), err_msg=f"row {row}")


def semantic_steps(step_len: int) -> SemanticSteps:
  """A synthetic semantic rule: a step may start at a multiple of 5 (in text state 0; a
  multiple of 3 moves to state 1, where none may) or after the piece 7, at most
  ``step_len`` tokens per step, at least 2."""
  ids = np.arange(VOCAB)
  candidate = np.stack([ids % 5 == 0, np.zeros(VOCAB, bool)])
  next_state = np.stack([(ids % 3 == 0).astype(np.int32), np.zeros(VOCAB, np.int32)])
  return SemanticSteps(StepRule(jnp.asarray(candidate), jnp.asarray(next_state),
                                jnp.asarray(ids == 7), jnp.int32(step_len), jnp.int32(2)))


@pytest.mark.slow
def test_cct_semantic_steps_and_mean_pool_rollout_equals_each_prompt_alone():
  """CCT with semantic step ids (a decode input) and mean pooling: the rule and the
  working memory skip each row's pads, so a greedy padded rollout gives every prompt's
  unpadded generation, with the same steps."""
  cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, init_std=0.3,
                    ffn=SwiGLUConfig(d_ff=64), mixer=CCTConfig(d_summary=8, step_len=4,
                                                               pool="mean"))
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(1))
  inputs = (semantic_steps(4),)
  prompts = PROMPTS + ([],)
  tokens, lengths = padded_prompts(prompts)
  out = ro.rollout(model, tokens, lengths, 8, jax.random.key(0), temperature=0.0, eos_id=None,
                   inputs=inputs)
  for row, prompt in enumerate(prompts[:-1]):
    alone = sampling.generate_with_state(model, jnp.asarray([prompt], jnp.int32), 8,
                                         jax.random.key(0), temperature=0.0, inputs=inputs)
    np.testing.assert_array_equal(np.asarray(out.completion_BxN[row]),
                                  np.asarray(alone.tokens_BxT[0, len(prompt):]),
                                  err_msg=f"row {row}")
    assert int(alone.side[STEP_IDS].max()) >= 2  # several steps, boundaries in the prompt
  assert 0 <= int(out.completion_BxN[-1].min()) and int(out.completion_BxN[-1].max()) < VOCAB


def semantic_cct(seed: int = 1) -> lm.LM:
  cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, init_std=0.3,
                    ffn=SwiGLUConfig(d_ff=64), mixer=CCTConfig(d_summary=8, step_len=4))
  return lm.LM(cfg, VOCAB, rngs=nnx.Rngs(seed))


@pytest.mark.slow
def test_sequence_side_gives_the_steps_decoding_decides():
  """The decode inputs over whole rows (a teacher-forced forward) decide the same side
  inputs as decoding the rows token by token."""
  model, inputs = semantic_cct(), (semantic_steps(4),)
  for prompt in PROMPTS:
    out = sampling.generate_with_state(model, jnp.asarray([prompt], jnp.int32), 9,
                                       jax.random.key(3), temperature=1.0, inputs=inputs)
    side = sampling.sequence_side(inputs, out.tokens_BxT)
    np.testing.assert_array_equal(np.asarray(side[STEP_IDS]), np.asarray(out.side[STEP_IDS]))
  assert sampling.sequence_side((), out.tokens_BxT) == {}


@pytest.mark.slow
def test_sequence_logprobs_read_the_steps_the_rollout_decoded_with():
  """On CCT with semantic steps, teacher-forced scoring with the run's decode inputs
  equals a loop of unpadded forwards reading each row's decoded step ids; without them
  (fixed steps) it does not, and the greedy tokens are its argmax."""
  model, inputs = semantic_cct(), (semantic_steps(4),)
  tokens, lengths = padded_prompts()
  width = tokens.shape[1]
  out = ro.rollout(model, tokens, lengths, 8, jax.random.key(0), temperature=0.0,
                   eos_id=None, inputs=inputs)
  mask = jnp.ones(out.completion_BxN.shape, bool)
  per_token, _ = ro.score(model, out.tokens_BxT, lengths, width, mask, inputs)
  fixed, _ = ro.score(model, out.tokens_BxT, lengths, width, mask)
  forward = jax.jit(lambda t, steps: jax.nn.log_softmax(
      model(t, SequenceContext.for_tokens(t, side={STEP_IDS: steps}))[0]))
  expected = np.zeros(per_token.shape, np.float32)
  for row, prompt in enumerate(PROMPTS):
    alone = sampling.generate_with_state(model, jnp.asarray([prompt], jnp.int32), 8,
                                         jax.random.key(0), temperature=0.0, inputs=inputs)
    log_probs = np.asarray(forward(alone.tokens_BxT, alone.side[STEP_IDS]))
    for j in range(8):
      position = len(prompt) - 1 + j
      expected[row, j] = log_probs[position, alone.tokens_BxT[0, position + 1]]
      assert log_probs[position].argmax() == int(alone.tokens_BxT[0, position + 1])
    assert int(alone.side[STEP_IDS].max()) >= 2
  np.testing.assert_allclose(np.asarray(per_token), expected, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(fixed - per_token))) > 1e-3  # the steps matter


@pytest.mark.slow
def test_front_rows_read_the_steps_and_logits_of_the_padded_decode_loop():
  """Sampled rows with empty prompts and EOS (7, which ends a step) padding included:
  the step ids ``sequence_side`` gives the front-aligned rows are those the decode loop
  decided for the padded rows, and ``front_logits`` / ``score`` are the padded rows'
  decode logits, so the wrapped pads reach no real position."""
  model, inputs, eos = semantic_cct(), (semantic_steps(4),), 7
  prompts = PROMPTS + ([], [7, 7, 12], [])
  tokens, lengths = padded_prompts(prompts)
  width, n_new = tokens.shape[1], 12
  total = width + n_new
  cache_options = sampling.checked_cache_options(model, inputs, total)
  loop = sampling.decode_loop(model, tokens, jax.random.key(5), 3.0, 1.0, inputs,
                              max_new_tokens=n_new, eos_id=eos, cache_options=cache_options,
                              with_state=True,
                              prompt_ctx=ro.ragged_context(tokens, lengths, width))
  completion = loop.tokens_BxT[:, width:]
  assert int(jnp.sum(completion[:, :-2] == eos)) >= 3  # rows ending early, EOS padded
  front = ro.to_front(loop.tokens_BxT, lengths, width)
  real_BxT = jnp.arange(total)[None] < (lengths + n_new)[:, None]
  decided = ro.to_front(loop.side[STEP_IDS], lengths, width)
  side = sampling.sequence_side(inputs, front)[STEP_IDS]
  np.testing.assert_array_equal(np.asarray(jnp.where(real_BxT, side, -1)),
                                np.asarray(jnp.where(real_BxT, decided, -1)))
  padded_logits, _ = model.decode(  # the loop's logits: one chunk, the loop's steps
      loop.tokens_BxT, ro.ragged_context(loop.tokens_BxT, lengths, width).replace_side(
          **loop.side), model.init_cache(len(prompts), total, dict(cache_options)))
  moved = jax.vmap(lambda x, n: jnp.roll(x, n - width, axis=0))(padded_logits, lengths)
  np.testing.assert_allclose(np.asarray(jnp.where(real_BxT[..., None],
                                                  ro.front_logits(model, front, inputs), 0)),
                             np.asarray(jnp.where(real_BxT[..., None], moved, 0)),
                             rtol=1e-5, atol=1e-5)
  mask = ro.completion_mask(completion, eos)
  per_token, _ = ro.score(model, loop.tokens_BxT, lengths, width, mask, inputs)
  log_probs = jax.nn.log_softmax(padded_logits, axis=-1)[:, width - 1:-1]
  expected = jnp.take_along_axis(log_probs, completion[..., None], axis=2)[..., 0]
  expected = jnp.where(mask & (lengths[:, None] + jnp.arange(n_new) >= 1), expected, 0.0)
  np.testing.assert_allclose(np.asarray(per_token), np.asarray(expected), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.slow
def test_width_one_prompts_with_an_empty_row_decode_token_by_token(model):
  """Width 1: the prompt goes through a one-token decode step, the empty row's pad
  included; each row generates what it generates alone."""
  tokens, lengths = padded_prompts(([], [5]))
  out = ro.rollout(model, tokens, lengths, 5, jax.random.key(0), temperature=0.0,
                   eos_id=None)
  alone = sampling.generate(model, jnp.asarray([[5]], jnp.int32), 5, jax.random.key(0),
                            temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxT[1]), np.asarray(alone[0]))
  # The empty row's pad is seen by nothing: after its first token it continues exactly
  # as that token alone would.
  first = out.completion_BxN[:1, :1]
  assert 0 <= int(first[0, 0]) < VOCAB
  from_first = sampling.generate(model, first, 4, jax.random.key(0), temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out.completion_BxN[0]), np.asarray(from_first[0]))


@pytest.mark.slow
def test_padded_prefill_logits_equal_each_prompt_alone_and_pads_stay_finite(model):
  """The decode prefill of a padded batch (an all-pad row included) and its first
  decode step give each prompt's unpadded logits; nothing is NaN."""
  prompts = PROMPTS + ([],)
  tokens, lengths = padded_prompts(prompts)
  batch, width = tokens.shape
  decode = jax.jit(lambda c, t, ctx: model.decode(t, ctx, c))
  ctx = ro.ragged_context(tokens, lengths, width)
  logits, cache = decode(model.init_cache(batch, width + 1), tokens, ctx)
  step = jnp.arange(batch, dtype=jnp.int32)[:, None] + 1
  step_logits, _ = decode(cache, step, SequenceContext(lengths[:, None]))
  assert bool(jnp.all(jnp.isfinite(logits))) and bool(jnp.all(jnp.isfinite(step_logits)))
  for row, prompt in enumerate(prompts[:-1]):
    alone = jnp.asarray([prompt + [row + 1]], jnp.int32)
    alone_logits, _ = decode(model.init_cache(1, len(prompt) + 1), alone,
                             SequenceContext(default_positions(alone)))
    np.testing.assert_allclose(np.asarray(logits[row, width - len(prompt):]),
                               np.asarray(alone_logits[0, :-1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(step_logits[row, 0]), np.asarray(alone_logits[0, -1]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sequence_logprobs_equal_a_loop_of_unpadded_prefix_forwards(model):
  prompts = PROMPTS + ([],)
  tokens, lengths = padded_prompts(prompts)
  width = tokens.shape[1]
  completion = jnp.asarray(np.random.default_rng(0).integers(1, VOCAB, (len(prompts), 5)),
                           jnp.int32)
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0], [1, 1, 0, 0, 0],
                      [1, 1, 1, 1, 0]], bool)
  per_token, summed = jax.jit(ro.sequence_logprobs, static_argnums=3)(
      model, jnp.concatenate([tokens, completion], axis=1), lengths, width, mask)
  assert per_token.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(per_token)))
  forward = jax.jit(lambda t: jax.nn.log_softmax(model(t)[0, -1]))
  expected = np.zeros(per_token.shape, np.float32)
  for row, prompt in enumerate(prompts):
    for j in range(completion.shape[1]):
      prefix = prompt + np.asarray(completion[row, :j]).tolist()
      if mask[row, j] and prefix:
        expected[row, j] = forward(jnp.asarray([prefix], jnp.int32))[completion[row, j]]
  np.testing.assert_allclose(np.asarray(per_token), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(summed), expected.sum(axis=1), rtol=1e-5, atol=1e-5)
  assert per_token[4, 0] == 0.0  # the empty prompt's first token has nothing before it


@pytest.mark.slow
def test_sampled_rollout_forbids_ids_stops_at_eos_and_runs_inside_another_jit():
  model = make_model("attention")
  tokens, lengths = padded_prompts(PROMPTS + ([],) * 4)
  forbidden = (PAD, 1, 2)
  greedy = ro.rollout(model, tokens, lengths, 12, jax.random.key(0), temperature=0.0,
                      eos_id=None, forbid_ids=forbidden)
  eos_id = int(greedy.completion_BxN[0, 3])  # row 0 meets it by its 4th token
  graphdef, state = nnx.split(model)

  @jax.jit
  def train_step(state, rng, temperature):  # as a trainer calls it: inside its own jit
    out = ro.sample_rollout(nnx.merge(graphdef, state), tokens, lengths, 12, rng,
                            temperature=temperature, top_p=0.95, eos_id=eos_id,
                            forbid_ids=forbidden)
    return out, ro.sequence_logprobs(nnx.merge(graphdef, state), out.tokens_BxT, lengths,
                                     tokens.shape[1], out.completion_mask_BxN)

  for rng, temperature in ((jax.random.key(3), 8.0), (jax.random.key(0), 0.0)):
    out, (per_token, summed) = train_step(state, rng, jnp.float32(temperature))
    again = ro.rollout(model, tokens, lengths, 12, rng, temperature=temperature, top_p=0.95,
                       eos_id=eos_id, forbid_ids=forbidden)
    for a, b in zip(out, again):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    scored = ro.score(model, out.tokens_BxT, lengths, tokens.shape[1], out.completion_mask_BxN)
    np.testing.assert_allclose(np.asarray(scored[0]), np.asarray(per_token), rtol=1e-6,
                               atol=1e-6)
    completion = np.asarray(out.completion_BxN)
    assert not np.isin(completion, forbidden).any()
    assert completion.min() >= 0 and completion.max() < VOCAB
    mask = np.asarray(out.completion_mask_BxN)
    for row in completion:  # after the first EOS: EOS only
      hits = np.flatnonzero(row == eos_id)
      if hits.size:
        assert (row[hits[0]:] == eos_id).all()
    np.testing.assert_array_equal(mask, np.asarray(ro.completion_mask(out.completion_BxN,
                                                                      eos_id)))
    np.testing.assert_array_equal(np.asarray(out.completion_lens_B), mask.sum(axis=1))
    assert bool(jnp.all(jnp.isfinite(per_token))) and bool(jnp.all(jnp.isfinite(summed)))
    assert not np.asarray(per_token)[~mask].any()
  assert mask[0].sum() <= 4 and (completion[0, mask[0].sum():] == eos_id).all()  # greedy


def test_rollout_rejects_no_new_tokens():
  with pytest.raises(ValueError, match="max_new_tokens"):
    ro.sample_rollout(None, jnp.zeros((1, 2), jnp.int32), jnp.asarray([2]), 0,
                      jax.random.key(0), temperature=0.0, eos_id=None)


@pytest.mark.slow
def test_ragged_context_keeps_pads_away_from_real_tokens(model):
  """A full forward with the ragged context: the pads' ids change no real token's logits
  (an all-pad row stays finite); attention gives each prompt's unpadded logits."""
  prompts = PROMPTS + ([],)
  tokens, lengths = padded_prompts(prompts)
  width = tokens.shape[1]
  forward = jax.jit(lambda t: model(t, ro.ragged_context(t, lengths, width)))
  logits = forward(tokens)
  real = np.asarray(ro.ragged_context(tokens, lengths, width).segment_ids_BxT, bool)
  other_pads = jnp.where(real, tokens, 1 + jnp.arange(width)[None] % (VOCAB - 1))
  assert bool(jnp.all(jnp.isfinite(logits)))
  np.testing.assert_allclose(np.asarray(forward(other_pads))[real], np.asarray(logits)[real],
                             rtol=1e-5, atol=1e-5)
  if model.cfg.mixer.type == "attention":
    for row, prompt in enumerate(prompts[:-1]):
      alone = model(jnp.asarray([prompt], jnp.int32))
      np.testing.assert_allclose(np.asarray(logits[row, width - len(prompt):]),
                                 np.asarray(alone[0]), rtol=1e-5, atol=1e-5)


def test_mixers_that_cannot_decode_ragged_prompts_are_refused(monkeypatch):
  cfg = ModelConfig(n_layers=1, d_model=32, n_heads=4, ffn=SwiGLUConfig(d_ff=64),
                    mixer=CCTConfig(step_len=4))
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(0))
  monkeypatch.setattr(CCTAttention, "RAGGED_DECODE", False)  # every registered mixer has it
  with pytest.raises(ValueError, match="'cct' mixer cannot decode ragged"):
    ro.sample_rollout(model, jnp.zeros((1, 2), jnp.int32), jnp.asarray([2]), 3,
                      jax.random.key(0), temperature=0.0, eos_id=None)


@pytest.mark.slow
def test_a_train_step_differentiates_only_the_scored_log_probs():
  """Sampling inside a differentiated step: the gradient is that of the log-probs of
  the sampled tokens held fixed (none flows through the sampling), finite everywhere."""
  model = make_model("ttt_mamba")
  tokens, lengths = padded_prompts(PROMPTS + ([],))
  width = tokens.shape[1]
  graphdef, state = nnx.split(model)

  def scored(state, out):
    _, summed = ro.sequence_logprobs(nnx.merge(graphdef, state), out.tokens_BxT, lengths,
                                     width, out.completion_mask_BxN)
    return -jnp.mean(summed)

  def step_loss(state, rng):
    out = ro.sample_rollout(nnx.merge(graphdef, state), tokens, lengths, 6, rng,
                            temperature=1.0, eos_id=3, forbid_ids=(PAD,))
    return scored(state, out), out

  (loss, out), grads = jax.jit(jax.value_and_grad(step_loss, has_aux=True))(
      state, jax.random.key(0))
  fixed_loss, fixed_grads = jax.jit(jax.value_and_grad(scored))(state, out)
  np.testing.assert_allclose(float(loss), float(fixed_loss), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(fixed_grads)):
    assert bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
