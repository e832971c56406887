"""The SwiGLU feed-forward sublayer (models/ffn/swiglu.py) against a float64 numpy
reference: the pure function, the module's init, logical names and FLOP count."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, ModelConfig
from ttt_jax.models.context import SequenceContext
from ttt_jax.models.ffn import swiglu


def test_swiglu_matches_reference():
  rng = np.random.default_rng(6)
  x, w_gate, w_up, w_down = (rng.normal(size=s) for s in [(2, 4, 8), (8, 12), (8, 12), (12, 8)])
  gate = x @ w_gate
  expected = (gate / (1 + np.exp(-gate)) * (x @ w_up)) @ w_down
  got = swiglu.swiglu(*(jnp.asarray(a, jnp.float32) for a in (x, w_gate, w_up, w_down)))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_swiglu_runs_in_activation_dtype():
  x = jnp.ones((1, 2, 8), jnp.bfloat16)
  w = jnp.full((8, 8), 0.1, jnp.float32)
  assert swiglu.swiglu(x, w, w, w).dtype == jnp.bfloat16


def ffn_config(**overrides) -> ModelConfig:
  values = dict(n_layers=8, d_model=64, n_heads=4, init_std=0.02,
                ffn=swiglu.SwiGLUConfig(d_ff=256))
  values.update(overrides)
  return ModelConfig(**values)


def test_module_inits_deterministically_with_expected_stds_and_names():
  def make():
    return swiglu.SwiGLU(ffn_config(), rngs=nnx.Rngs(7))
  a, b = make(), make()
  for name in ("w_gate", "w_up", "w_down"):
    np.testing.assert_array_equal(np.asarray(getattr(a, name)[...]),
                                  np.asarray(getattr(b, name)[...]))
  assert {name: getattr(a, name)[...].shape for name in ("w_gate", "w_up", "w_down")} == {
      "w_gate": (64, 256), "w_up": (64, 256), "w_down": (256, 64)}
  assert {name: getattr(a, name).get_metadata("out_sharding")
          for name in ("w_gate", "w_up", "w_down")} == {
      "w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"), "w_down": ("mlp", "embed")}
  assert abs(float(jnp.std(a.w_up[...])) - 0.02) < 0.002
  assert abs(float(jnp.std(a.w_down[...])) - 0.02 / 4.0) < 0.0005  # 1/sqrt(2 * 8 layers)


def test_module_call_is_the_pure_function_and_ignores_the_context():
  module = swiglu.SwiGLU(ffn_config(param_dtype="bfloat16"), rngs=nnx.Rngs(8))
  assert module.w_gate[...].dtype == jnp.bfloat16
  x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 5, 64)), jnp.float32)
  expected = swiglu.swiglu(x, module.w_gate[...], module.w_up[...], module.w_down[...])
  ctx = SequenceContext.for_tokens(jnp.zeros((2, 5), jnp.int32))
  np.testing.assert_array_equal(np.asarray(module(x, ctx)), np.asarray(expected))
  np.testing.assert_array_equal(np.asarray(module(x)), np.asarray(expected))


def test_flops_per_token_and_config_validation():
  assert swiglu.SwiGLU.flops_per_token(ffn_config(), 16) == 2 * 3 * 64 * 256
  with pytest.raises(ConfigError, match=r"model\.ffn\.d_ff: must be > 0"):
    swiglu.SwiGLUConfig(d_ff=0)
