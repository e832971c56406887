"""CCT's mixer (cct/mixer.py): attention against a dense-mask oracle, no-leak, gradient
isolation, p_commit = 0 is causal attention, curriculum, working-memory decode, the
summaries on the aux channel. The model-level properties are checked with both
residuals: CCT's isolation must survive the mHC residual (n streams mixed per token,
never across tokens)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax import registry
from ttt_jax.cct import mixer as cct
from ttt_jax.cct.mixer import CCTConfig
from ttt_jax.config import ConfigError, ModelConfig
from ttt_jax.models import lm
from ttt_jax.models.context import SequenceContext, default_positions
from ttt_jax.models.ffn.swiglu import SwiGLUConfig
from ttt_jax.models.mixers import attention
from ttt_jax.models.residuals.mhc import MHCConfig
from ttt_jax.models.residuals.plain import PlainConfig
from ttt_jax.models.trunks.stacked import UnrolledTrunkConfig

VOCAB = 61
RESIDUALS = {"plain": PlainConfig(), "mhc": MHCConfig()}



def run_mixer(mixer: cct.CCTAttention, x: jax.Array, ctx: SequenceContext) -> jax.Array:
  """The mixer's output, its recorded summaries captured (as the trunk does)."""
  y, _ = nnx.capture(mixer, nnx.Intermediate)(x, ctx)
  return y

def cct_config(residual: str = "plain", **mixer_overrides) -> ModelConfig:
  """A tiny CCT model (steps of 4 tokens, 8-d summaries); ``mixer_overrides`` are
  ``CCTConfig`` fields."""
  mixer = dict(step_len=4, d_summary=8)
  mixer.update(mixer_overrides)
  return ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                     ffn=SwiGLUConfig(d_ff=64), mixer=CCTConfig(**mixer),
                     residual=RESIDUALS[residual])


def steps_ctx(positions_BxT: jax.Array, step_ids_BxT: jax.Array | None,
              options: tuple = ()) -> SequenceContext:
  """The context of a forward at ``positions`` whose CCT steps are ``step_ids``."""
  side = {} if step_ids_BxT is None else {cct.STEP_IDS: step_ids_BxT}
  return SequenceContext(positions_BxT, side=side, options=options)


def random_tokens(seed: int, batch: int, length: int) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def random_segments(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
  boundaries = rng.random((batch, length)) < 0.3
  boundaries[:, 0] = False
  return np.cumsum(boundaries, axis=1).astype(np.int32)


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merged_attention_matches_dense_mask_reference(seed):
  rng = np.random.default_rng(seed)
  batch, length, heads, kv_heads, head_dim = 2, 11, 4, 2, 8
  segments = random_segments(rng, batch, length)
  n_slots = length
  arrays = [rng.normal(size=shape).astype(np.float32) for shape in (
      (batch, length, heads, head_dim), (batch, length, kv_heads, head_dim),
      (batch, length, kv_heads, head_dim), (batch, length, heads, head_dim),
      (batch, n_slots, kv_heads, head_dim), (batch, n_slots, kv_heads, head_dim))]
  q_rot, k, v, q, summary_k, summary_v = arrays
  local_mask, summary_mask = cct.training_masks(jnp.asarray(segments), n_slots)
  got = cct.merged_attention(*map(jnp.asarray, (q_rot, k, v)), local_mask, jnp.asarray(q),
                             jnp.asarray(summary_k), jnp.asarray(summary_v), summary_mask)
  expected = cct.cct_attention_reference(q_rot, k, v, q, summary_k, summary_v, segments)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_p_commit_zero_is_plain_causal_attention():
  cfg = cct_config()
  mixer = cct.CCTAttention(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 13, cfg.d_model))
  positions = default_positions(x[..., 0])
  step_ids = cct.fixed_step_ids(positions, 4)
  never = cct.sample_segments(step_ids, jnp.float32(0.0), jax.random.key(2))
  assert int(never.max()) == 0
  got = run_mixer(mixer, x, steps_ctx(positions, never))
  q, k, v = mixer.project_qkv(x, positions)
  expected = mixer.output_projection(attention.causal_attention(q, k, v))
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
  # and with every boundary committed it is something else
  always = cct.sample_segments(step_ids, jnp.float32(1.0), jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(always), np.asarray(step_ids))
  assert not np.allclose(np.asarray(run_mixer(mixer, x, steps_ctx(positions, always))),
                         np.asarray(expected))
  # without the side input, steps are fixed by position (step_len = 4): the same as always
  np.testing.assert_array_equal(np.asarray(run_mixer(mixer, x, steps_ctx(positions, None))),
                                np.asarray(run_mixer(mixer, x, steps_ctx(positions, always))))


def test_commitment_segments_merge_uncommitted_boundaries():
  step_ids = jnp.array([[0, 0, 1, 1, 2, 3, 3]])
  committed = jnp.array([[False, True, False, True, True, True, False]])
  # boundaries before tokens 2 (not committed), 4 and 5 (committed)
  np.testing.assert_array_equal(np.asarray(cct.commitment_segments(step_ids, committed)),
                                [[0, 0, 0, 0, 1, 2, 2]])


def test_stochastic_commitment_rate_follows_p_commit():
  step_ids = jnp.broadcast_to(jnp.arange(2000)[None], (4, 2000))  # a boundary per token
  segments = cct.sample_segments(step_ids, jnp.float32(0.3), jax.random.key(0))
  rate = float(segments[:, -1].mean()) / 1999
  assert abs(rate - 0.3) < 0.02


def test_committed_token_sees_no_earlier_step_token_only_its_summary():
  """Mixer level: with every boundary committed, a token's output changes with an
  earlier step's tokens only through that step's summary."""
  cfg = cct_config()
  mixer = cct.CCTAttention(cfg, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (1, 12, cfg.d_model))
  positions = default_positions(x[..., 0])
  step_ids = cct.fixed_step_ids(positions, 4)  # steps [0:4] [4:8] [8:12]
  ctx = steps_ctx(positions, step_ids)
  changed = x.at[:, 4:7].add(1.0)  # step 1, not its last token (the 'last' pool input)
  base, other = run_mixer(mixer, x, ctx), run_mixer(mixer, changed, ctx)
  np.testing.assert_allclose(np.asarray(base[:, 8:]), np.asarray(other[:, 8:]), atol=1e-6)
  assert not np.allclose(np.asarray(base[:, 4:7]), np.asarray(other[:, 4:7]))
  changed_last = x.at[:, 7].add(1.0)  # step 1's last token feeds its summary
  assert not np.allclose(np.asarray(base[:, 8:]),
                         np.asarray(run_mixer(mixer, changed_last, ctx)[:, 8:]))


# ----------------------------------------------------------------------------- model level


@pytest.mark.slow
@pytest.mark.parametrize("residual", RESIDUALS)
def test_no_leak_through_the_model_except_the_summary(residual):
  """Changing step k-1's tokens changes step k's logits (through the summary); with a
  constant (zero) summary swapped in, step k is independent of step k-1's tokens."""
  cfg = cct_config(residual=residual)
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(5))
  tokens = random_tokens(6, 2, 12)
  step_ids = cct.fixed_step_ids(default_positions(tokens), 4)
  changed = tokens.at[:, 4:8].set((tokens[:, 4:8] + 7) % VOCAB)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda tokens, override: cct.logits_and_summaries(
      nnx.merge(graphdef, state), tokens, step_ids, override)[0], static_argnums=1)
  base, other = forward(tokens, "none"), forward(changed, "none")
  np.testing.assert_array_equal(np.asarray(base[:, :4]), np.asarray(other[:, :4]))
  assert not np.allclose(np.asarray(base[:, 8:]), np.asarray(other[:, 8:]), atol=1e-6)
  zero_base, zero_other = forward(tokens, "zero"), forward(changed, "zero")
  np.testing.assert_array_equal(np.asarray(zero_base[:, 8:]), np.asarray(zero_other[:, 8:]))
  # the model's ordinary call is the same computation
  logits, aux = model.forward(
      tokens, SequenceContext.for_tokens(tokens, side={cct.STEP_IDS: step_ids}))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(base), rtol=1e-5, atol=1e-5)
  assert set(aux) == {cct.SUMMARIES}
  # a forward never mutates the model: a jit may close over it
  closed = jax.jit(lambda t: model(t))(tokens)
  np.testing.assert_allclose(np.asarray(closed), np.asarray(model(tokens)), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("residual", RESIDUALS)
def test_gradient_isolation_across_committed_boundaries(residual):
  """d(loss of step k) / d(activations of earlier steps) is exactly zero, although the
  forward value depends on them. With mHC the activations are the n expanded streams."""
  cfg = cct_config(residual=residual)
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(7))
  tokens = random_tokens(8, 2, 12)
  positions = default_positions(tokens)
  step_ids = cct.fixed_step_ids(positions, 4)
  expanded = model.streams.expand(model.embed(tokens, steps_ctx(positions, step_ids),
                                              jnp.float32))
  assert expanded.ndim == (4 if residual == "mhc" else 3)

  def step2_loss(stream, step_ids):
    stream, _ = model.trunk(model.blocks, stream, steps_ctx(positions, step_ids))
    logits = model.logits(model.final_norm(model.streams.reduce(stream)))
    return lm.cross_entropy_loss(logits[:, 8:], tokens[:, 8:])[0]

  grad_fn, loss_fn = jax.jit(jax.grad(step2_loss)), jax.jit(step2_loss)
  grads = grad_fn(expanded, step_ids)
  assert float(jnp.abs(grads[:, :8]).max()) == 0.0
  assert float(jnp.abs(grads[:, 8:]).max()) > 0.0
  assert loss_fn(expanded, step_ids) != loss_fn(expanded.at[:, 7].add(1.0), step_ids)
  # without commitment the earlier tokens do receive gradient
  open_grads = grad_fn(expanded, jnp.zeros_like(step_ids))
  assert float(jnp.abs(open_grads[:, :8]).max()) > 0.0


@pytest.mark.slow
@pytest.mark.parametrize("residual", RESIDUALS)
def test_commitment_head_trains_only_through_sufficiency(residual):
  cfg = cct_config(residual=residual)
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(9))
  tokens = random_tokens(10, 2, 12)
  step_ids = cct.fixed_step_ids(default_positions(tokens), 4)
  graphdef, params = nnx.split(model)

  def losses(params):
    m = nnx.merge(graphdef, params)
    logits, aux = cct.logits_and_summaries(m, tokens, step_ids)
    return lm.cross_entropy_loss(logits, tokens)[0], cct.sufficiency_loss(m, aux)

  lm_grads = jax.jit(jax.grad(lambda p: losses(p)[0]))(params)
  suff_grads = jax.jit(jax.grad(lambda p: losses(p)[1]))(params)
  head = lm_grads["blocks"]["mixer"]
  for name in ("head_w1", "head_b1", "head_ln_scale", "head_ln_bias", "head_w2", "head_b2"):
    assert float(jnp.abs(head[name][...]).max()) == 0.0, name
    assert float(jnp.abs(suff_grads["blocks"]["mixer"][name][...]).max()) > 0.0, name
  assert float(jnp.abs(head["summary_wk"][...]).max()) > 0.0


def test_summaries_are_unit_norm_and_probe_target_is_step_mean():
  cfg = cct_config(pool="mean")
  mixer = cct.CCTAttention(cfg, rngs=nnx.Rngs(11))
  x = jax.random.normal(jax.random.key(12), (2, 10, cfg.d_model))
  positions = default_positions(x[..., 0])
  _, aux = mixer.forward(x, positions, None, cct.fixed_step_ids(positions, 4))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(aux.summary_BxNxS[:, :3]), axis=-1),
                             1.0, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(aux.step_mean_BxNxD[:, 1]),
                             np.asarray(x[:, 4:8].mean(axis=1)), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(aux.complete_BxN[0, :4]),
                                [True, True, False, False])


# ----------------------------------------------------------------------------- curriculum


def test_curriculum_values_at_phase_boundaries():
  total = 1000
  p = lambda s: float(cct.p_commit_schedule(s, total))  # noqa: E731
  assert p(0) == 0.0 and p(99) == 0.0
  assert p(100) == pytest.approx(0.1)
  assert p(300) == pytest.approx(0.3)
  assert p(499) == pytest.approx(0.499, abs=1e-6)
  assert p(500) == pytest.approx(0.5)
  assert p(650) == pytest.approx(0.7)
  assert p(799) == pytest.approx(0.8987, abs=1e-3)
  assert p(800) == 1.0 and p(999) == 1.0
  w = lambda s: {k: float(v) for k, v in cct.loss_weights(s, total).items()}  # noqa: E731
  assert w(0) == {"alpha": 1.0, "beta": 0.0, "gamma": 0.0, "delta": 0.0}
  assert w(100) == {"alpha": 1.0, "beta": 0.0, "gamma": 0.0, "delta": 0.0}
  half = w(450)
  assert half["alpha"] == pytest.approx(0.75) and half["beta"] == pytest.approx(0.25)
  assert half["gamma"] == pytest.approx(0.15) and half["delta"] == pytest.approx(0.1)
  assert w(800) == pytest.approx({"alpha": 0.5, "beta": 0.5, "gamma": 0.3, "delta": 0.2})
  assert w(999) == pytest.approx({"alpha": 0.5, "beta": 0.5, "gamma": 0.3, "delta": 0.2})


# ----------------------------------------------------------------------------- decode


def semantic_like_steps(rng: np.random.Generator, batch: int, length: int, step_len: int
                        ) -> np.ndarray:
  """Absolute step ids with boundaries at random (p = 0.3), steps of 1..step_len tokens."""
  step_ids = np.zeros((batch, length), np.int32)
  for row in range(batch):
    step, count = 0, 0
    for t in range(length):
      if t and (count >= step_len or rng.random() < 0.3):
        step, count = step + 1, 0
      step_ids[row, t], count = step, count + 1
  return step_ids


@pytest.mark.slow
@pytest.mark.parametrize("pool,residual", [("last", "plain"), ("mean", "plain"),
                                           ("last", "mhc")])
@pytest.mark.parametrize("prompt_len,steps", [(1, "given"), (6, "fixed"), (9, "given")])
def test_working_memory_decode_matches_full_forward(pool, residual, prompt_len, steps):
  """Prefill + token-by-token decode == the training-form forward (every boundary
  committed), with fixed steps by position or with explicit (semantic) step ids."""
  cfg = cct_config(pool=pool, residual=residual)
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(13))
  tokens = random_tokens(14, 2, 15)
  if steps == "fixed":
    step_ids, full = None, model(tokens)  # fixed steps of model.mixer.step_len by position
    cache = model.init_cache(2, 16)
  else:
    step_ids = jnp.asarray(semantic_like_steps(np.random.default_rng(prompt_len), 2, 15, 4))
    assert len(np.unique(np.asarray(step_ids[0]))) > 15 // 4 + 1  # shorter than fixed
    full = model(tokens, steps_ctx(default_positions(tokens), step_ids))
    cache = model.init_cache(2, 16, {"max_steps": 15})
  decode = nnx.jit(lambda model, tokens, positions, cache, step_ids: model.decode(
      tokens, steps_ctx(positions, step_ids), cache))

  def chunk_steps(start, stop):
    return None if step_ids is None else step_ids[:, start:stop]

  logits, cache = decode(model, tokens[:, :prompt_len],
                         default_positions(tokens[:, :prompt_len]), cache,
                         chunk_steps(0, prompt_len))
  pieces = [logits]
  for t in range(prompt_len, 15):
    logits, cache = decode(model, tokens[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), cache,
                           chunk_steps(t, t + 1))
    pieces.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(full),
                             rtol=1e-5, atol=1e-5)
  last_steps = np.asarray(step_ids[:, -1]) if step_ids is not None else np.full(2, 14 // 4)
  np.testing.assert_array_equal(np.asarray(cache.step_B), np.broadcast_to(last_steps, (2, 2)))


@pytest.mark.slow
def test_decode_state_grows_only_by_summaries():
  cfg = cct_config()
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(15))

  def state_bytes(max_len):
    cache = model.init_cache(1, max_len)
    tokens = random_tokens(16, 1, max_len)
    _, cache = model.decode(tokens, SequenceContext(default_positions(tokens)), cache)
    return sum(leaf.nbytes for leaf in jax.tree.leaves(cache)), cache

  small, small_cache = state_bytes(40)
  large, large_cache = state_bytes(400)
  extra_steps = (400 // 4 + 1) - (40 // 4 + 1)
  assert large - small == extra_steps * cfg.mixer.d_summary * cfg.n_layers * 4
  local_shapes = [leaf.shape for leaf in jax.tree.leaves(small_cache)[1:]]
  assert local_shapes == [leaf.shape for leaf in jax.tree.leaves(large_cache)[1:]]
  assert small_cache.local_k_BxSxGxK.shape[2] == cfg.mixer.step_len
  # given step ids (semantic steps): max_steps summary slots, the rest as for fixed steps
  semantic = [leaf.shape for leaf in jax.tree.leaves(
      jax.eval_shape(lambda: model.init_cache(1, 400, {"max_steps": 300})))]
  assert semantic[0] == (cfg.n_layers, 1, 300, cfg.mixer.d_summary)
  assert semantic[1:] == local_shapes


def test_flops_per_token_counts_summary_slots():
  cfg = cct_config(max_steps=5)
  base = attention.Attention.flops_per_token(cfg, 20)
  assert cct.CCTAttention.flops_per_token(cfg, 20) == (
      base + 2 * 2 * cfg.n_heads * cfg.dim_per_head * 5
      + 2 * (cfg.d_model * 16 + 16 * 8))
  assert registry.MIXERS.get("cct") is cct.CCTAttention
  assert dataclasses.replace(cfg.mixer, d_bottleneck=0).bottleneck == 16
  assert dataclasses.replace(cfg.mixer, d_bottleneck=24).bottleneck == 24


def test_config_section_validation():
  for bad, message in ((dict(pool="max"), r"model\.mixer\.pool: 'max' is not one of"),
                       (dict(d_summary=0), r"model\.mixer\.d_summary: must be > 0"),
                       (dict(step_len=0), r"model\.mixer\.step_len: must be > 0"),
                       (dict(max_steps=-1), r"model\.mixer\.max_steps: must be >= 0"),
                       (dict(d_bottleneck=-1), r"model\.mixer\.d_bottleneck: must be >= 0")):
    with pytest.raises(ConfigError, match=message):
      CCTConfig(**bad)


# ----------------------------------------------------------------------------- aux channel


@pytest.mark.parametrize("residual", [pytest.param(r, marks=pytest.mark.slow) if r == "mhc"
                                      else r for r in sorted(RESIDUALS)])
def test_summaries_leave_the_model_through_the_aux_channel_under_either_trunk(residual):
  """``logits_and_summaries`` is the model's own forward: its summaries are every
  layer's ``SummaryAux`` stacked on layers, equal to the mixer's ``forward`` aux for
  layer 0, and the same under the scan and the unrolled trunk."""
  cfg = cct_config(residual=residual)
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(17))
  unrolled = lm.LM(dataclasses.replace(cfg, trunk=UnrolledTrunkConfig()), VOCAB,
                   rngs=nnx.Rngs(17))
  tokens = random_tokens(18, 2, 12)
  step_ids = jnp.asarray(semantic_like_steps(np.random.default_rng(3), 2, 12, 4))
  logits, aux = cct.logits_and_summaries(model, tokens, step_ids)
  assert isinstance(aux, cct.SummaryAux)
  assert aux.summary_BxNxS.shape == (cfg.n_layers, 2, 12, cfg.mixer.d_summary)
  unrolled_logits, unrolled_aux = cct.logits_and_summaries(unrolled, tokens, step_ids)
  np.testing.assert_allclose(np.asarray(unrolled_logits), np.asarray(logits), rtol=1e-6,
                             atol=1e-6)
  for got, expected in zip(unrolled_aux, aux):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)
  if residual == "plain":  # layer 0's aux from its mixer alone, on the block's normed input
    ctx = steps_ctx(default_positions(tokens), step_ids)
    x = model.streams.expand(model.embed(tokens, ctx, jnp.float32))
    graphdef, stacked = nnx.split(model.blocks)
    block0 = nnx.merge(graphdef, lm.layer_view(lm.layer_slice(stacked, 0)))
    _, layer0_aux = block0.mixer.forward(block0.mixer_residual.norm(x), ctx.positions_BxT,
                                         None, step_ids)
    for got, expected in zip(layer0_aux, aux):
      np.testing.assert_allclose(np.asarray(got), np.asarray(expected[0]), rtol=1e-5,
                                 atol=1e-6)
