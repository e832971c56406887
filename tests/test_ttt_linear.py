"""Tests of ttt_jax/models/mixers/ttt_linear.py: dual form against the anchored primal form and
a float64 oracle, remainder mini-batches, document resets, decode, fp32 state, W0,
gradients, parameter routing, packed documents with the pipeline's segment ids, and a tiny
TTT LM learning real text (alone and through train.train with data.document_mask)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ttt_jax import sharding, train
from ttt_jax.config import ConfigError, DataConfig, MeshConfig, ModelConfig
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.data import pipeline
from ttt_jax.models import lm
from ttt_jax.models.context import SequenceContext, default_positions
from ttt_jax.models.ffn.swiglu import SwiGLUConfig
from ttt_jax.models.mixers import ttt_linear as ttt
from ttt_jax.models.mixers.ttt_linear import TTTLinearConfig
from ttt_jax.training import optim
from train_util import tiny_config

VOCAB = 64
BF16_REL_BOUND = 3e-2
"""bf16 compute (dual and primal on the same bf16 inputs) against the fp32 primal: the
relative error (Frobenius norm over all outputs) stays below this."""


dual = jax.jit(ttt.ttt_linear_dual, static_argnames=("mini_batch", "remat_group"))
primal = jax.jit(ttt.ttt_linear_primal_anchored, static_argnames=("mini_batch",))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_inner(rng: np.random.Generator, heads: int, k: int, b: int) -> ttt.InnerParams:
  """Inner parameters away from their init so every term of the update matters."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return ttt.InnerParams(
      w0_HxKxK=f32(rng.normal(size=(heads, k, k)) * 0.3),
      b0_HxK=f32(rng.normal(size=(heads, k)) * 0.2),
      ln_scale_HxK=f32(1.0 + 0.2 * rng.normal(size=(heads, k))),
      ln_bias_HxK=f32(0.2 * rng.normal(size=(heads, k))),
      position_scale_M=f32(1.0 / np.arange(1, b + 1) + 0.05 * rng.normal(size=b)))


def random_inputs(rng: np.random.Generator, batch: int, length: int, heads: int, k: int):
  q, k_, v = (jnp.asarray(rng.normal(size=(batch, length, heads, k)), jnp.float32)
              for _ in range(3))
  eta = jnp.asarray(rng.uniform(0.05, 0.6, size=(batch, length, heads)), jnp.float32)
  return q, k_, v, eta


# ----------------------------------------------------------------------------- float64 oracle


def _ln(z, gamma, beta, eps=ttt.INNER_LN_EPS):
  mu = z.mean()
  var = ((z - mu) ** 2).mean()
  return (z - mu) / np.sqrt(var + eps) * gamma + beta


def _ln_l2_grad(z, target, gamma, beta, eps=ttt.INNER_LN_EPS):
  """∂/∂z ½‖LN(z) - target‖² by the chain rule through mean and variance, written
  differently from the module: explicit Jacobian of LN."""
  k = z.size
  mu = z.mean()
  sigma = np.sqrt(((z - mu) ** 2).mean() + eps)
  x_hat = (z - mu) / sigma
  jac = (np.eye(k) - 1.0 / k - np.outer(x_hat, x_hat) / k) / sigma  # d x_hat / d z
  return jac.T @ (gamma * (_ln(z, gamma, beta, eps) - target))


def anchored_reference(inner, q, k, v, eta, mini_batch, segment_ids=None):
  """Anchored mini-batch GD token by token in float64 numpy (module docstring)."""
  w0, b0, gamma, beta, s_param = (np.asarray(a, np.float64) for a in inner)
  s = np.maximum(s_param, 0.0)
  q, k, v, eta = (np.asarray(a, np.float64) for a in (q, k, v, eta))
  batch, length, heads, _ = q.shape
  out = np.zeros_like(q)
  final = []
  for row in range(batch):
    row_state = []
    for h in range(heads):
      w, b = w0[h].copy(), b0[h].copy()
      sum_w, sum_b = np.zeros_like(w), np.zeros_like(b)
      rel = 0
      for t in range(length):
        slot = t % mini_batch
        new_doc = (segment_ids is not None and t > 0
                   and segment_ids[row, t] != segment_ids[row, t - 1])
        if new_doc:
          w, b = w0[h].copy(), b0[h].copy()
          sum_w, sum_b = np.zeros_like(w), np.zeros_like(b)
        rel = 0 if (new_doc or slot == 0) else rel + 1
        kt, qt = k[row, t, h], q[row, t, h]
        g = _ln_l2_grad(kt @ w + b, v[row, t, h] - kt, gamma[h], beta[h])
        sum_w = sum_w + eta[row, t, h] * np.outer(kt, g)
        sum_b = sum_b + eta[row, t, h] * g
        w_now, b_now = w - s[rel] * sum_w, b - s[rel] * sum_b
        out[row, t, h] = qt + _ln(qt @ w_now + b_now, gamma[h], beta[h])
        if slot == mini_batch - 1:
          w, b = w_now, b_now
          sum_w, sum_b = np.zeros_like(w), np.zeros_like(b)
      row_state.append((w, b, sum_w, sum_b))
    final.append(row_state)
  return out, final


# ----------------------------------------------------------------------------- inner model


def test_inner_loss_grad_matches_autodiff():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
  scale = jnp.asarray(1 + 0.3 * rng.normal(size=16), jnp.float32)
  bias = jnp.asarray(0.3 * rng.normal(size=16), jnp.float32)
  closed = ttt.inner_loss_grad(z, target, scale, bias)
  auto = jax.grad(ttt.inner_loss)(z, target, scale, bias)
  assert rel_err(closed, auto) < 1e-5


@pytest.mark.parametrize("one_pass, offset, atol", [(True, 10.0, 2e-4), (False, 1e3, 3e-4)])
def test_layer_norm_matches_a_float64_reference(one_pass, offset, atol):
  # one_pass (σ² = E[x²] - μ², the scan body's inner LayerNorms) is accurate while the mean
  # is moderate next to the spread; the default (mean, then centred mean square) for any.
  rng = np.random.default_rng(0)
  x = offset + rng.normal(size=(64, 256))
  scale, bias = 1 + 0.3 * rng.normal(size=256), 0.3 * rng.normal(size=256)
  centered = x - x.mean(-1, keepdims=True)
  expected = centered / np.sqrt((centered ** 2).mean(-1, keepdims=True) + 1e-6) * scale + bias
  got = ttt.layer_norm(*(jnp.asarray(a, jnp.float32) for a in (x, scale, bias)), 1e-6,
                       one_pass=one_pass)
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=atol)


@pytest.mark.parametrize("length", [37, 5])
def test_dual_matches_anchored_primal_fp32(length):
  """Whole mini-batches plus a remainder mini-batch, and less than one mini-batch."""
  rng = np.random.default_rng(length)
  batch, heads, k, b = 2, 3, 16, 16
  inner = random_inner(rng, heads, k, b)
  inputs = random_inputs(rng, batch, length, heads, k)
  out_d, state_d = dual(inner, *inputs, mini_batch=b)
  out_p, state_p = primal(inner, *inputs, mini_batch=b)
  assert out_d.shape == (batch, length, heads, k) and out_d.dtype == jnp.float32
  assert rel_err(out_d, out_p) <= 1e-5
  for a, c in zip(state_d.fast, state_p.fast):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)
  assert int(state_d.index) == int(state_p.index) == length % b
  if length % b:  # the open remainder mini-batch keeps its anchor and running sums
    assert float(jnp.abs(state_d.fast.grad_w_BxHxKxK).max()) > 0


@pytest.mark.parametrize("segmented", [False, True])
def test_dual_matches_float64_reference(segmented):
  rng = np.random.default_rng(11)
  batch, length, heads, k, b = 2, 29, 2, 8, 8
  inner = random_inner(rng, heads, k, b)
  inputs = random_inputs(rng, batch, length, heads, k)
  # Row 0: documents starting mid-mini-batch (t=6, t=19); row 1: on the grid (t=16).
  segment_ids = np.array([[0] * 6 + [1] * 13 + [2] * 10, [4] * 16 + [7] * 13])
  seg = jnp.asarray(segment_ids) if segmented else None
  out_d, state_d = dual(inner, *inputs, mini_batch=b, segment_ids_BxT=seg)
  out_p, _ = primal(inner, *inputs, mini_batch=b, segment_ids_BxT=seg)
  out_ref, final_ref = anchored_reference(inner, *inputs, b, segment_ids if segmented else None)
  assert rel_err(out_d, out_ref) <= 1e-5
  assert rel_err(out_p, out_ref) <= 1e-5
  w_ref = np.array([[h[0] for h in row] for row in final_ref])
  sum_w_ref = np.array([[h[2] for h in row] for row in final_ref])
  assert rel_err(state_d.fast.w_BxHxKxK, w_ref) <= 1e-5
  assert rel_err(state_d.fast.grad_w_BxHxKxK, sum_w_ref) <= 1e-5


def test_inner_gradient_is_mean_reduced_over_the_mini_batch():
  """After one whole mini-batch W = W0 - (1/b) Σ_j η_j ∇_W ℓ_j(W0): fails if the default
  1/(i+1) per-position scale (the 1/b of the last token) were dropped."""
  rng = np.random.default_rng(3)
  heads, k, b = 2, 8, 16
  inner = random_inner(rng, heads, k, b)._replace(
      position_scale_M=1.0 / jnp.arange(1, b + 1, dtype=jnp.float32))
  q, k_, v, eta = random_inputs(rng, 1, b, heads, k)
  _, state = dual(inner, q, k_, v, eta, mini_batch=b)

  def summed_loss(w_HxKxK, b_HxK):
    z = jnp.einsum("thk,hkl->thl", k_[0], w_HxKxK) + b_HxK
    per_token = jax.vmap(jax.vmap(ttt.inner_loss, in_axes=(0, 0, 0, 0)),
                         in_axes=(0, 0, None, None))(z, v[0] - k_[0], inner.ln_scale_HxK,
                                                     inner.ln_bias_HxK)
    return jnp.sum(eta[0] * per_token)

  grad_w, grad_b = jax.grad(summed_loss, argnums=(0, 1))(inner.w0_HxKxK, inner.b0_HxK)
  np.testing.assert_allclose(np.asarray(state.fast.w_BxHxKxK[0]),
                             np.asarray(inner.w0_HxKxK - grad_w / b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state.fast.b_BxHxK[0]),
                             np.asarray(inner.b0_HxK - grad_b / b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_remat_groups_give_identical_outputs_and_gradients():
  rng = np.random.default_rng(5)
  inner = random_inner(rng, 2, 8, 4)
  inputs = random_inputs(rng, 2, 30, 2, 8)  # 7 whole mini-batches (groups of 3 + tail) + 2

  def loss(inner, q, remat_group):
    out, _ = dual(inner, q, *inputs[1:], mini_batch=4, remat_group=remat_group)
    return jnp.sum(out * jnp.cos(out))

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  values = {g: grad_fn(inner, inputs[0], g) for g in (0, 3)}
  np.testing.assert_allclose(float(values[3][0]), float(values[0][0]), rtol=1e-6)
  for a, c in zip(jax.tree.leaves(values[3][1]), jax.tree.leaves(values[0][1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)


def test_state_continuation_matches_one_pass():
  """Dual form continuing an open mini-batch (prefill from a cache) == one pass."""
  rng = np.random.default_rng(9)
  inner = random_inner(rng, 2, 8, 8)
  q, k, v, eta = random_inputs(rng, 2, 28, 2, 8)
  full, full_state = dual(inner, q, k, v, eta, mini_batch=8)
  outs, state = [], None
  for start, stop in ((0, 7), (7, 14), (14, 21), (21, 28)):  # open at slots 7, 6, 5
    piece = lambda x: x[:, start:stop]
    out, state = dual(inner, piece(q), piece(k), piece(v), piece(eta),
                                     mini_batch=8, state=state)
    outs.append(out)
  assert rel_err(jnp.concatenate(outs, axis=1), full) <= 1e-5
  assert rel_err(state.fast.w_BxHxKxK, full_state.fast.w_BxHxKxK) <= 1e-5
  assert int(state.index) == int(full_state.index) == 28 % 8


# ----------------------------------------------------------------------------- layer


def layer_params(cfg: ModelConfig, seed: int):
  layer = ttt.TTTLinear(cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  inner = random_inner(rng, layer.spec.n_heads, layer.spec.head_dim, layer.spec.mini_batch)
  return layer.params()._replace(inner=inner), layer.spec


def layer_config(**mixer_overrides) -> ModelConfig:
  """A 2-head d32 model whose mixer is TTT-Linear (b = 8) with ``mixer_overrides``."""
  mixer = dict(mini_batch=8)
  mixer.update(mixer_overrides)
  return ModelConfig(d_model=32, n_heads=2, n_layers=2, ffn=SwiGLUConfig(d_ff=64),
                     init_std=0.2, mixer=TTTLinearConfig(**mixer))


@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
def test_layer_dual_matches_primal_fp32_and_bf16(backbone):
  params, spec = layer_params(layer_config(backbone=backbone), 1)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 21, 32)), jnp.float32)
  forward = jax.jit(lambda p, x, form: ttt.ttt_linear_forward(p, spec, x, inner_form=form),
                    static_argnums=2)
  y_dual, cache = forward(params, x, "dual")
  y_primal, _ = forward(params, x, "primal")
  assert rel_err(y_dual, y_primal) <= 1e-5
  assert cache.state.fast.w_BxHxKxK.dtype == jnp.float32
  x_bf16 = x.astype(jnp.bfloat16)
  y_dual_bf16, cache_bf16 = forward(params, x_bf16, "dual")
  y_primal_bf16, _ = forward(params, x_bf16, "primal")
  assert y_dual_bf16.dtype == jnp.bfloat16
  for leaf in jax.tree.leaves(cache_bf16.state.fast):  # fp32 state under bf16 compute
    assert leaf.dtype == jnp.float32
  assert rel_err(y_dual_bf16, y_primal) <= BF16_REL_BOUND
  assert rel_err(y_primal_bf16, y_primal) <= BF16_REL_BOUND
  assert rel_err(y_dual_bf16, y_primal_bf16) <= BF16_REL_BOUND


def test_causal_conv_matches_loop_and_streams_with_history():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 9, 3))
  filt, bias = rng.normal(size=(4, 3)), rng.normal(size=3)
  expected = np.zeros_like(x) + bias
  for t in range(9):
    for tau in range(4):
      src = t - 3 + tau
      if src >= 0:
        expected[:, t] += filt[tau] * x[:, src]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, _ = ttt.causal_depthwise_conv(f32(x), f32(filt), f32(bias))
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
  y1, hist = ttt.causal_depthwise_conv(f32(x[:, :2]), f32(filt), f32(bias))
  y2, _ = ttt.causal_depthwise_conv(f32(x[:, 2:]), f32(filt), f32(bias), hist)
  np.testing.assert_allclose(np.asarray(jnp.concatenate([y1, y2], 1)), expected, rtol=1e-5,
                             atol=1e-5)


def test_layer_document_reset():
  """Packed documents: a document starting on the grid gives exactly its standalone
  outputs; one starting mid-mini-batch is independent of the document before it."""
  params, spec = layer_params(layer_config(), 6)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(1, 27, 32)), jnp.float32)
  forward = jax.jit(lambda x, seg: ttt.ttt_linear_forward(params, spec, x, seg)[0])
  # Row 0: documents [0, 16) and [16, 27). Row 1: the second document alone, then filler.
  alone_first = jnp.concatenate([x[:, 16:], x[:, :16]], axis=1)
  both = forward(jnp.concatenate([x, alone_first]),
                 jnp.asarray([[0] * 16 + [1] * 11, [0] * 11 + [1] * 16]))
  np.testing.assert_allclose(np.asarray(both[0, 16:]), np.asarray(both[1, :11]), rtol=1e-5,
                             atol=1e-6)
  no_reset = forward(x, jnp.zeros((1, 27), jnp.int32))
  assert rel_err(both[0, 16:], no_reset[0, 16:]) > 1e-3
  # Mid-mini-batch start at t = 11: other tokens before it change nothing after it.
  mid = jnp.asarray([[0] * 11 + [1] * 16] * 2)
  other_first_doc = x.at[:, :11].set(jnp.asarray(rng.normal(size=(1, 11, 32)), jnp.float32))
  outs = forward(jnp.concatenate([x, other_first_doc]), mid)
  np.testing.assert_allclose(np.asarray(outs[0, 11:]), np.asarray(outs[1, 11:]), rtol=1e-5,
                             atol=1e-6)
  assert rel_err(outs[0, :11], outs[1, :11]) > 1e-3


# ----------------------------------------------------------------------------- LM


def lm_config(backbone: str = "mamba", mini_batch: int = 4, **overrides) -> ModelConfig:
  """A tiny TTT-Linear LM; ``overrides`` are ``ModelConfig`` fields."""
  values = dict(n_layers=2, d_model=32, n_heads=4, ffn=SwiGLUConfig(d_ff=64), init_std=0.1,
                mixer=TTTLinearConfig(backbone=backbone, mini_batch=mini_batch))
  values.update(overrides)
  return ModelConfig(**values)


def random_tokens(seed: int, batch: int, length: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length)),
                     jnp.int32)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
def test_prefill_then_decode_matches_full_forward(backbone):
  """Prompt ending mid-mini-batch, a multi-token continuation from an open mini-batch,
  then single tokens: logits equal the full-sequence dual form."""
  model = lm.LM(lm_config(backbone=backbone), VOCAB, rngs=nnx.Rngs(3))
  tokens = random_tokens(3, 2, 17)
  full = jax.jit(lambda t: model(t))(tokens)
  cache = model.init_cache(2, 4)  # max_len does not bound a TTT decode
  decode = jax.jit(lambda c, t, p: model.decode(t, SequenceContext(p), c))
  pieces = []
  for start, stop in ((0, 6), (6, 12), *((t, t + 1) for t in range(12, 17))):
    piece = tokens[:, start:stop]
    logits, cache = decode(cache, piece, default_positions(piece, start))
    pieces.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, axis=1)), np.asarray(full),
                             rtol=1e-5, atol=2e-5)


def ttt_cache(cache):
  """The TTTCache of an LM cache (mamba blocks hold (pre-conv history, TTTCache))."""
  return cache[1] if isinstance(cache, tuple) else cache


@pytest.mark.slow
def test_w0_init_and_reset_fp32_state_under_bf16_and_row_isolation():
  """bf16 params and compute: the cache starts at the learned W0 (cast to float32, bit
  for bit), stays float32 through prefill and decode, does not grow with max_len, rows
  never share state, and a fresh cache (reset) is W0 again."""
  model = lm.LM(lm_config(dtype="bfloat16", param_dtype="bfloat16"), VOCAB, rngs=nnx.Rngs(4))
  learned = (jax.random.normal(jax.random.key(0), model.blocks.mixer.w0.shape) * 0.5
             ).astype(jnp.bfloat16)
  model.blocks.mixer.w0[...] = learned  # as if training had moved W0
  expected_w0 = np.asarray(learned.astype(jnp.float32))
  cache = model.init_cache(3, 8)
  assert jax.tree.map(jnp.shape, cache) == jax.tree.map(jnp.shape, model.init_cache(3, 4096))
  w = ttt_cache(cache).state.fast.w_BxHxKxK  # [layers, B, H, K, K]
  assert w.dtype == jnp.float32
  for row in range(3):
    np.testing.assert_array_equal(np.asarray(w[:, row]), expected_w0)
  decode = jax.jit(lambda c, t, p: model.decode(t, SequenceContext(p), c))
  tokens = random_tokens(5, 3, 9)
  logits, used = decode(cache, tokens, default_positions(tokens))
  logits_step, used_step = decode(used, tokens[:, :1], jnp.full((3, 1), 9, jnp.int32))
  assert bool(jnp.all(jnp.isfinite(logits_step)))
  for leaf in jax.tree.leaves(ttt_cache(used_step).state.fast):
    assert leaf.dtype == jnp.float32
  assert ttt_cache(used_step).qk_history_BxPxN.dtype == jnp.bfloat16
  assert not np.allclose(np.asarray(ttt_cache(used).state.fast.w_BxHxKxK[:, 0]), expected_w0)
  # Rows never share state: changing row 2's tokens leaves rows 0-1 (logits and state) intact.
  other = tokens.at[2].set((tokens[2] + 1) % VOCAB)
  logits_other, used_other = decode(model.init_cache(3, 8), other, default_positions(other))
  np.testing.assert_array_equal(np.asarray(logits[:2]), np.asarray(logits_other[:2]))
  for a, c in zip(jax.tree.leaves(ttt_cache(used).state.fast),
                  jax.tree.leaves(ttt_cache(used_other).state.fast)):
    np.testing.assert_array_equal(np.asarray(a[:, :2]), np.asarray(c[:, :2]))
    assert not np.array_equal(np.asarray(a[:, 2]), np.asarray(c[:, 2]))
  reset = model.init_cache(3, 8)  # reset: back to the learned W0, bit for bit
  np.testing.assert_array_equal(np.asarray(ttt_cache(reset).state.fast.w_BxHxKxK[:, 1]),
                                expected_w0)
  assert not np.any(np.asarray(ttt_cache(reset).state.index))


@pytest.mark.slow
def test_lm_segment_ids_isolate_grid_aligned_documents():
  model = lm.LM(lm_config(), VOCAB, rngs=nnx.Rngs(8))
  tokens = random_tokens(8, 1, 14)
  # Row 0: documents [0, 8) and [8, 14); row 1: the second document alone, then filler.
  rows = jnp.concatenate([tokens, jnp.roll(tokens, -8, axis=1)])
  logits = jax.jit(lambda t, s: model(t, SequenceContext.for_tokens(t, segment_ids_BxT=s)))(
      rows, jnp.asarray([[0] * 8 + [1] * 6, [0] * 6 + [1] * 8]))
  np.testing.assert_allclose(np.asarray(logits[0, 8:]), np.asarray(logits[1, :6]), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
def test_lm_packed_window_with_pipeline_segment_ids_equals_documents_alone(backbone):
  """[docA, EOS, docB] with ``pipeline.document_segment_ids``: docA+EOS gives its standalone
  logits; docB, starting at t = 7 (mid-mini-batch, b = 16), gives its standalone logits
  (positions 0.., nothing passed but tokens and ids) up to the grid boundary at t = 16,
  and logits independent of docA throughout. Seen as one document (the ids of a window
  without EOS, as without data.document_mask) docB's logits differ. One compiled call:
  rows 2 and 3 are single documents (all ids 0)."""
  eos, b, first, length = 0, 16, 7, 37  # docA: 6 tokens + EOS; docB: 30 tokens
  model = lm.LM(lm_config(backbone=backbone, mini_batch=b), VOCAB, rngs=nnx.Rngs(9))
  rng = np.random.default_rng(9)
  doc_a, other_a = rng.integers(1, VOCAB, size=(2, first - 1))
  doc_b = rng.integers(1, VOCAB, size=length - first)
  packed = np.concatenate([doc_a, [eos], doc_b])
  rows = np.stack([packed, np.concatenate([other_a, [eos], doc_b]),
                   np.concatenate([doc_b, doc_a, [eos]]), packed])  # row 2: docB alone
  segment_ids = pipeline.document_segment_ids(rows, eos)
  segment_ids[3] = 0  # packed without document ids
  assert segment_ids.tolist() == [[0] * first + [1] * (length - first)] * 2 + [[0] * length] * 2
  logits = np.asarray(jax.jit(
      lambda t, s: model(t, SequenceContext.for_tokens(t, segment_ids_BxT=s)))(
          jnp.asarray(rows), jnp.asarray(segment_ids)))
  fragment = b - first  # docB's first mini-batch: tokens 7..15
  np.testing.assert_allclose(logits[0, :first], logits[3, :first], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[0, first:first + fragment], logits[2, :fragment],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[0, first:], logits[1, first:], rtol=1e-5, atol=1e-5)
  assert rel_err(logits[3, first:first + fragment], logits[2, :fragment]) > 1e-3


def test_parameter_groups_and_sharding():
  """No weight decay on W0/b0, norms, biases or the lr gate; heads/projections over
  'tensor', TTT parameters over 'fsdp'; only tiny vectors stay replicated."""
  model = nnx.eval_shape(lambda: lm.LM(lm_config(), VOCAB, rngs=nnx.Rngs(0)))
  specs = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  specs = {"/".join(map(str, p)): v.get_value() for p, v in specs}
  groups = {name: optim.param_group(spec) for name, spec in specs.items()}
  for name in ("w0", "b0", "lr_gate", "lr_bias", "position_scale", "ln_scale", "ln_bias",
               "conv_q", "conv_q_bias", "post_scale", "post_bias"):
    assert groups[f"blocks/mixer/{name}"] == optim.VECTOR, name
  for name in ("wq", "wv", "wg", "wo"):
    assert groups[f"blocks/mixer/{name}"] == optim.MATRIX, name
  assert groups["blocks/pre_conv/filter"] == optim.VECTOR
  rules = sharding.rules_table(MeshConfig())
  replicated = set()
  for name, spec in specs.items():
    if name.startswith(("blocks/mixer/", "blocks/pre_conv/")):
      mesh_spec = sharding.logical_to_mesh_spec(spec, rules)
      if all(axes is None for axes in mesh_spec):
        replicated.add(name.split("/")[-1])
  assert replicated == {"lr_bias", "position_scale"}
  mesh_spec = lambda n: sharding.logical_to_mesh_spec(specs[f"blocks/mixer/{n}"], rules)
  assert mesh_spec("w0") == jax.sharding.PartitionSpec(None, "tensor", None, "fsdp")
  assert mesh_spec("wq") == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_config_validation_and_flops():
  for bad, message in ((dict(mini_batch=0), r"model\.mixer\.mini_batch: must be > 0"),
                       (dict(backbone="rwkv"), r"model\.mixer\.backbone: 'rwkv' is not one of"),
                       (dict(remat_group=-1), r"model\.mixer\.remat_group: must be >= 0"),
                       (dict(base_lr=0.0), r"model\.mixer\.base_lr: must be > 0"),
                       (dict(conv_width=0), r"model\.mixer\.conv_width: must be > 0")):
    with pytest.raises(ConfigError, match=message):
      TTTLinearConfig(**bad)
  with pytest.raises(ConfigError, match=r"model\.head_dim: RoPE needs an even head_dim"):
    lm_config(d_model=30, n_heads=2)
  assert TTTLinearConfig().COMPUTE_ONLY == ("remat_group",)
  cfg = lm_config(backbone="transformer")
  d, n, h, k, b = 32, 32, 4, 8, 4
  expected = 2 * 4 * d * n + 2 * d * h + h * (6 * k * k + 4 * b * k)
  assert ttt.TTTLinear.flops_per_token(cfg, 100) == expected
  assert lm.forward_flops_per_token(cfg, VOCAB, 100) == (
      2 * (expected + 2 * 3 * d * 64) + 2 * d * VOCAB)


# ----------------------------------------------------------------------------- training


STDLIB_SAMPLE = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "bisect.py",
                 "heapq.py", "keyword.py", "colorsys.py", "json/encoder.py", "json/decoder.py")


@pytest.mark.slow
def test_tiny_ttt_lm_loss_goes_down_on_real_text_and_grads_reach_ttt_params(tmp_path: Path):
  root, _ = corpus_lib.stdlib_files()
  for name in STDLIB_SAMPLE:
    (tmp_path / name.replace("/", "_")).write_text((root / name).read_text(encoding="utf-8"))
  data_cfg = DataConfig(corpus=(str(tmp_path / "*.py"),), seq_len=64, vocab_size=400,
                        val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
  corpus = corpus_lib.prepare_corpus(data_cfg, log=lambda _: None)
  tokens = np.asarray(corpus.train_tokens, np.int32)
  model = lm.LM(lm_config(d_model=64, n_heads=4, ffn=SwiGLUConfig(d_ff=128), init_std=0.02,
                          mini_batch=16, tie_embeddings=True), corpus.vocab_size,
                rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.1)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(batch[:, :-1])
      return lm.cross_entropy_loss(logits, batch[:, 1:])[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    grad_max = jax.tree.map(lambda g: jnp.max(jnp.abs(g)), grads)
    return optax.apply_updates(params, updates), opt_state, loss, grad_max

  rng = np.random.default_rng(0)
  losses = []
  for index in range(40):
    starts = rng.integers(0, len(tokens) - 65, size=8)
    batch = jnp.asarray(np.stack([tokens[s:s + 65] for s in starts]))
    params, opt_state, loss, grad_max = step(params, opt_state, batch)
    losses.append(float(loss))
    if index == 0:  # every TTT parameter (W0, b0, the lr gate, ...) gets a gradient
      flat = {"/".join(map(str, p)): float(v[...]) for p, v in nnx.to_flat_state(grad_max)}
      for name in ("w0", "b0", "lr_gate", "lr_bias", "position_scale", "ln_scale", "ln_bias",
                   "conv_q", "conv_k", "wq", "wv", "wg", "wo", "post_scale"):
        assert np.isfinite(flat[f"blocks/mixer/{name}"]), name
        assert flat[f"blocks/mixer/{name}"] > 0, name
      assert flat["blocks/pre_conv/filter"] > 0
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses


@pytest.mark.slow
def test_tiny_ttt_run_with_document_mask_trains_on_segment_ids_from_the_pipeline(
    tmp_path: Path, monkeypatch):
  """``data.document_mask=true`` end to end: every train and eval batch reaching the
  device carries the pipeline's segment ids (windows of many short documents, so the
  fast weights reset inside windows), and a few steps lower the train and eval loss."""
  root, _ = corpus_lib.stdlib_files()
  paragraphs = [p for name in STDLIB_SAMPLE
                for p in (root / name).read_text(encoding="utf-8").split("\n\n") if p.strip()]
  corpus = tmp_path / "paragraphs.jsonl"
  corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
  cfg = tiny_config(str(corpus), tmp_path / "cache", "model.mixer=ttt_linear",
                    "model.mixer.backbone=transformer", "model.n_layers=1",  # quick to compile
                    "data.document_mask=true", "train.steps=6", "train.eval_every=6",
                    "eval.batches=1", "logging.tensorboard=false")
  batches, traced_with_segment_ids = [], []
  put, forward = sharding.put_batch, lm.LM.forward

  def put_batch(batch, mesh):
    batches.append({k: np.asarray(v) for k, v in batch.items()})
    return put(batch, mesh)

  def spy_forward(self, tokens_BxT, ctx=None):
    traced_with_segment_ids.append(ctx is not None and ctx.segment_ids_BxT is not None)
    return forward(self, tokens_BxT, ctx)

  monkeypatch.setattr(sharding, "put_batch", put_batch)
  monkeypatch.setattr(lm.LM, "forward", spy_forward)
  summary = train.train(cfg, tmp_path / "run")
  eos = corpus_lib.prepare_corpus(cfg.data, log=lambda _: None).tokenizer.eos_id
  assert traced_with_segment_ids == [True, True]  # the train step and the eval step
  assert len(batches) == 1 + 6  # the eval batch, then one per step
  for batch in batches:
    assert set(batch) == {"inputs", "targets", "segment_ids"}
    np.testing.assert_array_equal(batch["segment_ids"],
                                  pipeline.document_segment_ids(batch["inputs"], eos))
  assert np.mean([batch["segment_ids"][:, -1] > 0 for batch in batches]) > 0.2
  losses, evals = summary["losses"], summary["eval"]
  assert np.isfinite(list(losses.values())).all()
  assert losses[6] < losses[1] - 0.3 and evals[6]["eval_loss"] < evals[0]["eval_loss"] - 0.3
