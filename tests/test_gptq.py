"""GPTQ (``ttt_jax.gptq``): on correlated inputs its output error is below
round-to-nearest's; with H = I it is round-to-nearest; the blocked float64 loop equals
a plain column-by-column reference; and the jaxpr interpreter's input statistics are
X^T X of the inputs each weight really meets (synthetic functions, and the first
block's normed input in attention and mHC models)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax import catalog  # noqa: F401  (registers the mechanisms)
from ttt_jax import gptq, quant
from ttt_jax.config import load_config
from ttt_jax.errors import ConfigError
from ttt_jax.models import lm
from ttt_jax.models.context import SequenceContext

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.ffn.d_ff=128",
        "data.vocab_size=128", "model.dtype=float32"]


def correlated_layer(seed: int, inputs: int = 64, outputs: int = 48, n: int = 1024
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(X [n, I] with strongly correlated columns and a few dead ones, W [I, O])."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 8)) @ rng.normal(size=(8, inputs)) + 0.1 * rng.normal(size=(n, inputs))
  x[:, :3] = 0.0
  return x, rng.normal(size=(inputs, outputs)).astype(np.float32)


def output_error(x: np.ndarray, w: np.ndarray, q: np.ndarray, scale: np.ndarray) -> float:
  return float(np.sum(np.square(x @ (w - quant.dequantize(q, scale)))))


def reference_codes(w: np.ndarray, hessian: np.ndarray, scale: np.ndarray, bits: int,
                    damp: float, act_order: bool) -> np.ndarray:
  """GPTQ written plainly in float64: one input at a time, every later input updated at
  once with a row of the upper Cholesky factor of H^-1."""
  h = hessian.astype(np.float64)
  w = w.astype(np.float64)
  diag = np.diag(h).copy()
  h = h + damp * diag.mean() * np.eye(len(h))
  order = np.argsort(-diag, kind="stable") if act_order else np.arange(len(h))
  w, h = w[order], h[order][:, order]
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  q = np.zeros(w.shape, np.int8)
  for i in range(len(w)):
    q[i] = quant.codes(w[i].astype(np.float32), scale, bits)
    error = (w[i] - q[i] * scale.astype(np.float64)) / u[i, i]
    w[i + 1:] -= np.outer(u[i, i + 1:], error)
  restored = np.empty_like(q)
  restored[order] = q
  return restored


@pytest.mark.parametrize("bits", [6, 4])
def test_gptq_output_error_is_below_round_to_nearest(bits):
  x, w = correlated_layer(bits)
  rtn, scale = quant.quantize(w, (0,), bits)
  q = gptq.gptq_codes(w[None], (2 * x.T @ x / len(x))[None], scale, bits)[0]
  assert np.abs(q.astype(np.int32)).max() <= quant.qmax(bits)
  assert q.dtype == np.int8 and q.shape == w.shape
  assert output_error(x, w, q, scale) < 0.7 * output_error(x, w, rtn, scale)


def test_identity_hessian_and_dead_inputs_round_to_nearest():
  x, w = correlated_layer(1)
  rtn, scale = quant.quantize(w, (0,), 6)
  np.testing.assert_array_equal(gptq.gptq_codes(w[None], np.eye(len(w))[None], scale, 6)[0],
                                rtn)
  q = gptq.gptq_codes(w[None], (x.T @ x)[None], scale, 6)[0]
  np.testing.assert_array_equal(q[:3], rtn[:3])  # no token reaches inputs 0..2
  all_dead = gptq.gptq_codes(w[None], np.zeros((1, len(w), len(w))), scale, 6)[0]
  np.testing.assert_array_equal(all_dead, rtn)


@pytest.mark.parametrize("act_order,block", [(False, 128), (True, 128), (True, 5)])
def test_blocked_codes_equal_the_plain_float64_reference(act_order, block):
  x, w = correlated_layer(2, inputs=40, outputs=24)
  hessian = 2 * x.T @ x / len(x)
  _, scale = quant.quantize(w, (0,), 4)
  expected = reference_codes(w, hessian, scale[0], 4, 0.01, act_order)
  got = gptq.gptq_codes(w[None], hessian[None], scale, 4, 0.01, act_order, block)[0]
  np.testing.assert_array_equal(got, expected)


def test_batched_matrices_are_independent():
  x1, w1 = correlated_layer(3, inputs=32, outputs=16)
  x2, w2 = correlated_layer(4, inputs=32, outputs=16)
  w, h = np.stack([w1, w2]), np.stack([x1.T @ x1, x2.T @ x2])
  _, scale = quant.quantize(w, (1,), 6)
  both = gptq.gptq_codes(w, h, scale[:, 0], 6)
  for i in range(2):
    np.testing.assert_array_equal(both[i], gptq.gptq_codes(w[i:i + 1], h[i:i + 1],
                                                           scale[i:i + 1, 0], 6)[0])


def test_parameter_codes_keep_the_parameter_layout():
  """A [layers, heads, embed] weight (reduction 'heads', batch 'layers'), and one whose
  reduction axes are two: with H = I, exactly quant's own codes."""
  rng = np.random.default_rng(5)
  for spec, shape in [(jax.sharding.PartitionSpec("layers", "heads", "embed"), (2, 64, 48)),
                      (jax.sharding.PartitionSpec("layers", "heads", "head_dim", "embed"),
                       (2, 4, 16, 48))]:
    w = rng.normal(size=shape).astype(np.float32)
    lay = gptq.layout(spec, shape)
    q, scale = quant.quantize(w, quant.reduction_axes(spec, quant.MATRIX), 6)
    identity = np.broadcast_to(np.eye(gptq.hessian_shape(lay, shape)[-1]),
                               gptq.hessian_shape(lay, shape))
    np.testing.assert_array_equal(gptq.parameter_codes(w, scale, identity, lay, 6), q)


def test_parameter_codes_in_chunks_of_matrices_are_the_same(monkeypatch):
  x, w = correlated_layer(9, inputs=32, outputs=64)
  w = np.stack([w, 2 * w, -w])
  spec = jax.sharding.PartitionSpec("layers", "embed", "mlp")
  lay = gptq.layout(spec, w.shape)
  hessian = np.stack([x.T @ x, np.eye(32), x.T @ x + np.eye(32)])
  _, scale = quant.quantize(w, quant.reduction_axes(spec, quant.MATRIX), 6)
  whole = gptq.parameter_codes(w, scale, hessian, lay, 6)
  monkeypatch.setattr(gptq, "CHUNK_ELEMENTS", 32 * 32)
  np.testing.assert_array_equal(gptq.parameter_codes(w, scale, hessian, lay, 6), whole)


def test_an_undamped_singular_hessian_is_one_line_naming_the_matrix_and_the_damping():
  """Calibration inputs that span fewer dimensions than a matrix has inputs give a
  singular H; with quant.gptq_damp = 0 (allowed: a full-rank H needs none) that is a
  ConfigError, not a LinAlgError from inside numpy."""
  params = nnx.state(tiny_model("quickstart.yaml"), nnx.Param)
  path = ("blocks", "mlp", "w_down")
  shape = dict(nnx.to_flat_state(params))[path].get_value().shape
  lay = gptq.layout(quant.param_specs(params)[path], shape)
  x = np.random.default_rng(0).normal(size=(4, gptq.hessian_shape(lay, shape)[-1]))
  hessian = np.broadcast_to(x.T @ x, gptq.hessian_shape(lay, shape))  # rank 4
  encoded = quant.encode_params(params)
  assert gptq.requantize(encoded, params, {path: hessian})[path].values.shape == shape
  with pytest.raises(ConfigError, match="quant.gptq_damp=0.0.*blocks/mlp/w_down") as error:
    gptq.requantize(encoded, params, {path: hessian}, damp=0.0)
  assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- interpreter


def test_interpreter_sums_per_layer_and_per_head_through_a_scan():
  """w [layers, heads, K, D] read per head ('bthk,hkd->bthd') inside a scan over layers,
  cast and transposed on the way: each (layer, head) gets its own inputs' X^T X."""
  rng = np.random.default_rng(6)
  w = jnp.asarray(rng.normal(size=(3, 2, 8, 5)), jnp.float32)
  xs = jnp.asarray(rng.normal(size=(3, 4, 6, 2, 8)), jnp.float32)
  lay = gptq.Layout(batch=(0, 1), reduction=(2,), output=(3,))

  def fn(leaves, xs):
    def body(carry, layer):
      w_HxKxD, x_BxTxHxK = layer
      w_KxHxD = jnp.transpose(w_HxKxD.astype(jnp.bfloat16).astype(jnp.float32), (1, 0, 2))
      return carry + jnp.einsum("bthk,khd->bthd", x_BxTxHxK, w_KxHxD).sum(), None
    return jax.lax.scan(body, 0.0, (leaves[0], xs))[0]

  sums, skipped = gptq.traced_sums(fn, [w], [lay], xs)
  assert not skipped and sums[0].shape == (3, 2, 8, 8)
  for layer in range(3):
    for head in range(2):
      x = np.asarray(xs[layer, :, :, head], np.float64).reshape(-1, 8)
      np.testing.assert_allclose(sums[0][layer, head], x.T @ x, rtol=1e-5, atol=1e-5)


def test_interpreter_skips_weights_it_cannot_follow():
  rng = np.random.default_rng(7)
  leaves = [jnp.asarray(rng.normal(size=(8, 4)), jnp.float32) for _ in range(4)]
  lay = gptq.Layout(batch=(), reduction=(0,), output=(1,))
  x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)

  def fn(leaves, x):
    scaled, plain, as_carry, by_output = leaves
    y = x @ (2.0 * scaled) + x @ plain
    carried = jax.lax.scan(lambda w, _: (w * 0.5, None), as_carry, None, length=2)[0]
    return y.sum() + (x @ carried).sum() + (x[:, :4] @ by_output.T).sum()

  sums, skipped = gptq.traced_sums(fn, leaves, [lay] * 4, x)
  assert skipped == {0: "read by mul", 2: "a scan carry",
                     3: "contracted over other axes than its inputs"}
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(sums[1], x64.T @ x64, rtol=1e-5, atol=1e-5)


def test_interpreter_follows_indexing_and_merging_reshapes_but_not_splits():
  """w [layers, heads, K, D] indexed per layer in a Python loop and merged to [H*K, D]
  (reduction axes 'heads' and K) is followed; a reshape that splits an axis is not."""
  rng = np.random.default_rng(8)
  merged_w = jnp.asarray(rng.normal(size=(2, 4, 8, 6)), jnp.float32)
  split_w = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  xs = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
  layouts = [gptq.Layout(batch=(0,), reduction=(1, 2), output=(3,)),
             gptq.Layout(batch=(), reduction=(0,), output=(1,))]

  def fn(leaves, xs):
    merged, split = leaves
    total = sum((xs[layer] @ merged[layer].reshape(32, 6)).sum() for layer in range(2))
    return total + jnp.einsum("bhk,hkd->", xs[0].reshape(5, 4, 8), split.reshape(4, 8, 6))

  sums, skipped = gptq.traced_sums(fn, [merged_w, split_w], layouts, xs)
  assert skipped == {1: "read by a reshape that splits an axis"}
  for layer in range(2):
    x = np.asarray(xs[layer], np.float64)
    np.testing.assert_allclose(sums[0][layer], x.T @ x, rtol=1e-5, atol=1e-5)


def tiny_model(config: str, *overrides: str) -> lm.LM:
  cfg = load_config(CONFIGS / config, TINY + list(overrides))
  return lm.LM(cfg.model, cfg.data.vocab_size, rngs=nnx.Rngs(0))


def first_block_input(model: lm.LM, tokens_BxT: jax.Array, ctx: SequenceContext
                      ) -> np.ndarray:
  """The normed input of block 0's mixer, by hand: the residual's sublayer argument."""
  graphdef, stacked = nnx.split(model.blocks)
  block = nnx.merge(graphdef, lm.layer_view(lm.layer_slice(stacked, 0)))
  stream = model.streams.expand(model.embed(tokens_BxT, ctx, model.dtype))
  seen = []
  block.mixer_residual(stream, lambda x_BxTxD: seen.append(x_BxTxD) or x_BxTxD)
  return np.asarray(seen[0], np.float64).reshape(-1, seen[0].shape[-1])


@pytest.mark.slow
@pytest.mark.parametrize("config,overrides", [("quickstart.yaml", ()),
                                              ("mhc_tiny.yaml", ()),
                                              ("quickstart.yaml", ("model.trunk.type=unrolled",)),
                                              ("quickstart.yaml", ("model.n_layers=1",))])
def test_first_layer_wq_hessian_is_its_normed_input(config, overrides):
  model = tiny_model(config, *overrides)
  tokens_BxT = jax.random.randint(jax.random.key(1), (3, 16), 0, 128)
  ctx = SequenceContext.for_tokens(tokens_BxT)
  hessians, skipped = gptq.input_hessians(model, tokens_BxT, ctx)
  assert not skipped
  assert {"/".join(p) for p in hessians} >= {"blocks/mixer/wq", "blocks/mlp/w_down"}
  x = first_block_input(model, tokens_BxT, ctx)
  np.testing.assert_allclose(hessians[("blocks", "mixer", "wq")][0], 2 * x.T @ x / len(x),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(hessians[("blocks", "mixer", "wk")],
                             hessians[("blocks", "mixer", "wq")])


@pytest.mark.slow
def test_calibration_is_deterministic_and_sampled_from_the_model():
  model = tiny_model("quickstart.yaml")
  cfg = load_config(CONFIGS / "quickstart.yaml", TINY)
  first, _ = gptq.calibration_batch(model, cfg, 3, 4, 10, seed=0)
  again, ctx = gptq.calibration_batch(model, cfg, 3, 4, 10, seed=0)
  other, _ = gptq.calibration_batch(model, cfg, 3, 4, 10, seed=1)
  assert first.shape == (4, 10) and np.all(np.asarray(first[:, 0]) == 3)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  np.testing.assert_array_equal(ctx.positions_BxT, np.broadcast_to(np.arange(10), (4, 10)))
