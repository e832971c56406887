"""Tests of ttt_jax/training/optim.py: schedules, parameter routing, AdamW/SGD/Muon updates,
clipping, gradient accumulation, nnx.State trees and optimizer-state shardings."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ttt_jax import registry
from ttt_jax.training import averaging, optim
from ttt_jax.config import OptimConfig
from ttt_jax.registry import AxisInfo

L, D, F, H, DH, V = 2, 16, 32, 4, 4, 64


def model_like_specs() -> dict:
  """Logical axes of a small LM: embedding, stacked blocks, final norm, untied head."""
  return {
      "embedding": P("vocab", "embed"),
      "blocks": {
          "w_up": P("layers", "embed", "mlp"),
          "w_down": P("layers", "mlp", "embed"),
          "wq": P("layers", "embed", "heads"),
          "attn_norm": P("layers", "norm"),
      },
      "final_norm": P("norm"),
      "head": P("embed", "vocab"),
      "gate_scalar": P(),
  }


def model_like_params(key: jax.Array) -> dict:
  shapes = {
      "embedding": (V, D),
      "blocks": {"w_up": (L, D, F), "w_down": (L, F, D), "wq": (L, D, H * DH),
                 "attn_norm": (L, D)},
      "final_norm": (D,), "head": (D, V), "gate_scalar": (),
  }
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def flat_constant(**kwargs) -> OptimConfig:
  """A config with a constant lr from step 0 and no clipping, for exact update checks."""
  base = dict(schedule="constant", warmup_steps=0, clip_norm=0.0)
  base.update(kwargs)
  return OptimConfig(**base)


def one_update(cfg: OptimConfig, specs, params, grads, steps: int = 100):
  tx = optim.build_optimizer(cfg, steps, specs)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return updates


# ----------------------------------------------------------------------------- schedules


def lr_at(cfg: OptimConfig, total: int, step: int) -> float:
  return float(optim.lr_schedule(cfg, total)(step))


def test_cosine_schedule_key_points():
  cfg = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
  assert lr_at(cfg, 110, 0) == pytest.approx(0.0)
  assert lr_at(cfg, 110, 5) == pytest.approx(0.5)
  assert lr_at(cfg, 110, 10) == pytest.approx(1.0)
  assert lr_at(cfg, 110, 60) == pytest.approx(0.55, abs=1e-6)  # halfway: (1 + 0.1) / 2
  quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))
  assert lr_at(cfg, 110, 35) == pytest.approx(quarter, abs=1e-6)
  assert lr_at(cfg, 110, 110) == pytest.approx(0.1, abs=1e-6)
  assert lr_at(cfg, 110, 500) == pytest.approx(0.1, abs=1e-6)  # floor


def test_wsd_schedule_key_points():
  cfg = OptimConfig(lr=2.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2,
                    min_lr_ratio=0.1)
  assert lr_at(cfg, 100, 0) == pytest.approx(0.0)
  assert lr_at(cfg, 100, 5) == pytest.approx(1.0)
  assert lr_at(cfg, 100, 10) == pytest.approx(2.0)
  assert lr_at(cfg, 100, 50) == pytest.approx(2.0)
  assert lr_at(cfg, 100, 80) == pytest.approx(2.0)  # warmdown starts at 100 - 20
  assert lr_at(cfg, 100, 90) == pytest.approx(1.1)  # halfway from 2.0 to 0.2
  assert lr_at(cfg, 100, 100) == pytest.approx(0.2)
  assert lr_at(cfg, 100, 300) == pytest.approx(0.2)


def test_constant_schedule_and_peak_override():
  cfg = OptimConfig(lr=1.0, schedule="constant", warmup_steps=4)
  assert [lr_at(cfg, 50, s) for s in (0, 1, 2, 4, 49, 1000)] == pytest.approx(
      [0.0, 0.25, 0.5, 1.0, 1.0, 1.0])
  assert float(optim.lr_schedule(cfg, 50, peak_lr=3.0)(2)) == pytest.approx(1.5)


def test_schedule_edge_cases():
  # warmup >= total: the warmup is capped at total_steps, then the lr stays at peak.
  long_warmup = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
  assert [lr_at(long_warmup, 5, s) for s in (0, 4, 5, 9)] == pytest.approx([0, 0.8, 1, 1])
  # no warmup: the first update uses the peak lr.
  no_warmup = dataclasses.replace(long_warmup, warmup_steps=0)
  assert lr_at(no_warmup, 1, 0) == pytest.approx(1.0)
  assert lr_at(no_warmup, 1, 1) == pytest.approx(0.1)
  # wsd without warmdown is warmup + constant.
  no_decay = OptimConfig(lr=1.0, schedule="wsd", warmup_steps=2, decay_fraction=0.0)
  assert [lr_at(no_decay, 10, s) for s in (1, 2, 10, 20)] == pytest.approx([0.5, 1, 1, 1])
  # wsd warmdown longer than what the warmup leaves: it takes the remaining steps.
  crowded = OptimConfig(lr=1.0, schedule="wsd", warmup_steps=8, decay_fraction=0.5,
                        min_lr_ratio=0.1)
  assert [lr_at(crowded, 10, s) for s in (8, 9, 10)] == pytest.approx([1.0, 0.55, 0.1])
  # the schedule is jittable.
  values = jax.jit(jax.vmap(optim.lr_schedule(long_warmup, 5)))(jnp.arange(3))
  np.testing.assert_allclose(values, [0.0, 0.2, 0.4], atol=1e-7)
  with pytest.raises(ValueError, match="total_steps"):
    optim.lr_schedule(long_warmup, 0)


# ----------------------------------------------------------------------------- routing


def test_param_groups_of_model_shaped_tree():
  groups = optim.param_groups(model_like_specs())
  assert groups == {
      "embedding": "embedding",
      "blocks": {"w_up": "matrix", "w_down": "matrix", "wq": "matrix",
                 "attn_norm": "vector"},
      "final_norm": "vector", "head": "embedding", "gate_scalar": "vector",
  }
  dims = {k: optim.muon_dimension_numbers(s) for k, s in model_like_specs()["blocks"].items()}
  for name in ("w_up", "w_down", "wq"):  # layer axis 0 is a batch axis
    assert dims[name] == optax.contrib.MuonDimensionNumbers((1,), (2,))
  assert dims["attn_norm"] is None


def test_classification_of_other_layouts():
  group, dims = optim.param_group, optim.muon_dimension_numbers
  mdn = optax.contrib.MuonDimensionNumbers
  # Head-split projections: 'embed' on one side, the head axes on the other.
  assert dims(P("layers", "embed", "heads", "head_dim")) == mdn((1,), (2, 3))
  assert dims(P("layers", "heads", "head_dim", "embed")) == mdn((1, 2), (3,))
  assert dims(P("embed", "kv_heads", "head_dim")) == mdn((0,), (1, 2))
  # Per-head parameters without 'embed': heads are a batch axis.
  assert dims(P("layers", "heads", "head_dim", "head_dim")) == mdn((2,), (3,))
  assert group(P("heads", "head_dim")) == "vector"
  # Norm scales, conv filters and hyper-connection mixing stay with Adam.
  for spec in (P("layers", "conv", "embed"), P("layers", "streams", "streams"),
               P("heads", "norm"), P("layers", "embed", "streams")):
    assert group(spec) == "vector" and dims(spec) is None
  assert group(P("layers", "vocab", "embed")) == "embedding"
  assert group(P(None, "mlp")) == "matrix"
  assert group(P("layers", "embed")) == "vector"


TEST_BANK_AXIS = AxisInfo("a test's per-bank values", vector=True)
TEST_EXPERTS_AXIS = AxisInfo("a test's experts")


def test_vector_axes_are_the_registered_ones():
  """Each mechanism declares its axes; the built-in vector axes are those Muon always
  routed to AdamW, and a newly registered vector axis marks a parameter as a vector."""
  vector = {name for name, info in registry.LOGICAL_AXES.items()
            if info.vector and not name.startswith("test_")}
  assert vector == {"norm", "conv", "streams", "fast", "gate"}
  for name in vector:
    assert optim.param_group(P("layers", "embed", name)) == "vector", name
  registry.LOGICAL_AXES.register("test_bank", TEST_BANK_AXIS)
  registry.LOGICAL_AXES.register("test_experts", TEST_EXPERTS_AXIS)
  assert optim.param_group(P("layers", "embed", "mlp", "test_bank")) == "vector"
  assert optim.param_group(P("layers", "test_experts", "embed", "mlp")) == "matrix"
  assert optim.param_group(P("test_experts", "vocab")) == "embedding"


def test_rank_mismatch_is_reported():
  tx = optim.build_optimizer(OptimConfig(), 10, {"w": P(), "bias": P()})
  with pytest.raises(ValueError, match="'w' of shape \\(3, 4\\)"):
    tx.init({"w": jnp.ones((3, 4)), "bias": jnp.ones(4)})
  tx.init({"w": jnp.ones(()), "bias": jnp.ones(4)})  # unnamed vectors are fine
  with pytest.raises(ValueError, match="no logical axes"):
    tx.init({"w": jnp.ones(()), "other": jnp.ones(4)})


# ----------------------------------------------------------------------------- AdamW / SGD


def test_adamw_decays_only_matrices_and_embeddings():
  cfg = flat_constant(name="adamw", lr=0.1, weight_decay=0.5, clip_norm=1.0)
  params = model_like_params(jax.random.key(0))
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = optim.build_optimizer(cfg, 100, model_like_specs())
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)  # one compile, not per op
  new = optax.apply_updates(params, updates)
  groups = optim.param_groups(model_like_specs())
  for group, old, now in zip(jax.tree.leaves(groups), jax.tree.leaves(params),
                             jax.tree.leaves(new)):
    expected = old * (1 - 0.1 * 0.5) if group != "vector" else old
    np.testing.assert_allclose(now, expected, rtol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_two_steps(nesterov, weight_decay):
  lr, mu = 0.5, 0.9
  cfg = flat_constant(name="sgd", lr=lr, momentum=mu, nesterov=nesterov,
                      weight_decay=weight_decay)
  specs = {"w": P("embed", "mlp"), "b": P("mlp")}
  params = {"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([3.0, 4.0])}
  grads = [{"w": jnp.array([[0.5, 1.0]]), "b": jnp.array([1.0, -1.0])},
           {"w": jnp.array([[-1.0, 2.0]]), "b": jnp.array([0.5, 0.5])}]
  tx = optim.build_optimizer(cfg, 10, specs)
  state, current = tx.init(params), params
  expected, trace = dict(params), {k: 0.0 for k in params}
  for g in grads:
    updates, state = tx.update(g, state, current)
    current = optax.apply_updates(current, updates)
    for k in params:  # optax.trace, then decoupled decay (not for 'b'), then -lr
      trace[k] = g[k] + mu * trace[k]
      direction = g[k] + mu * trace[k] if nesterov else trace[k]
      decay = weight_decay * expected[k] if k == "w" else 0.0
      expected[k] = expected[k] - lr * (direction + decay)
  for k in params:
    np.testing.assert_allclose(current[k], expected[k], rtol=1e-6)


def test_clipping_bounds_a_huge_gradient():
  cfg = flat_constant(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, clip_norm=1.0)
  specs = {"w": P("embed", "mlp")}
  params = {"w": jnp.zeros((1, 2))}
  updates = one_update(cfg, specs, params, {"w": jnp.array([[3e6, 4e6]])})
  np.testing.assert_allclose(updates["w"], [[-0.6, -0.8]], rtol=1e-6)


def test_multisteps_averages_then_clips_and_counts_updates():
  specs = {"w": P("embed", "mlp")}
  params = {"w": jnp.zeros((1, 2))}
  micro_grads = [jnp.array([[100.0, 0.0]]), jnp.array([[-99.8, 0.1]]),
                 jnp.array([[0.2, 0.4]]), jnp.array([[0.4, -0.2]])]
  # warmup 2 => lr 0 at the first optimizer update, 0.5 at the second.
  cfg = OptimConfig(name="sgd", lr=1.0, schedule="constant", warmup_steps=2, momentum=0.0,
                    weight_decay=0.0, clip_norm=1.0, grad_accum_steps=2)
  tx = optim.build_optimizer(cfg, 10, specs)
  update_fn = jax.jit(tx.update)
  state, current, history = tx.init(params), params, []
  for g in micro_grads:
    updates, state = update_fn({"w": g}, state, current)
    current = optax.apply_updates(current, updates)
    history.append(current["w"])
  np.testing.assert_allclose(history[0], 0.0)
  np.testing.assert_allclose(history[1], 0.0)  # first optimizer update has lr 0
  np.testing.assert_allclose(history[2], 0.0)  # micro-step: nothing applied
  mean_grad = (micro_grads[2] + micro_grads[3]) / 2  # norm 0.32 < clip_norm
  np.testing.assert_allclose(history[3], -0.5 * mean_grad, rtol=1e-6)
  assert int(state.gradient_step) == 2

  # Clipping applies to the averaged gradient: (100 - 99.8)/2 is not clipped.
  tx = optim.build_optimizer(flat_constant(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0,
                                           clip_norm=1.0, grad_accum_steps=2), 10, specs)
  state = tx.init(params)
  _, state = tx.update({"w": micro_grads[0]}, state, params)
  updates, _ = tx.update({"w": micro_grads[1]}, state, params)
  np.testing.assert_allclose(updates["w"], [[-0.1, -0.05]], rtol=1e-4)


# ----------------------------------------------------------------------------- Muon


def singular_values(x: jax.Array) -> np.ndarray:
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def test_muon_orthogonalises_each_layer_and_routes_the_rest_to_adam():
  lr, adam_lr = 0.02, 0.003
  cfg = flat_constant(name="muon", lr=lr, adam_lr=adam_lr, momentum=0.95, weight_decay=0.0)
  specs = model_like_specs()
  params = model_like_params(jax.random.key(1))
  grads = model_like_params(jax.random.key(2))
  # Layers of wildly different scale: flattening them into one matrix would leave the
  # small layer with near-zero singular values.
  grads["blocks"]["w_up"] = grads["blocks"]["w_up"] * jnp.array([1e3, 1e-3])[:, None, None]
  updates = one_update(cfg, specs, params, grads)

  width_scale = math.sqrt(max(1.0, F / D))  # Muon's sqrt(max(1, fan_out / fan_in))
  for layer in range(L):
    sv = singular_values(updates["blocks"]["w_up"][layer]) / (lr * width_scale)
    assert sv.min() > 0.5 and sv.max() < 1.5, sv
    # The same slice optimised on its own, as a 2-D matrix, gets the same update.
    alone = one_update(cfg, {"w": P("embed", "mlp")}, {"w": params["blocks"]["w_up"][layer]},
                       {"w": grads["blocks"]["w_up"][layer]})
    np.testing.assert_allclose(updates["blocks"]["w_up"][layer], alone["w"],
                               rtol=1e-4, atol=1e-7)
  for name in ("w_down", "wq"):
    for layer in range(L):
      sv = singular_values(updates["blocks"][name][layer]) / lr
      assert sv.min() > 0.5 and sv.max() < 1.5, (name, sv)

  # Adam-routed params: first Adam step is -adam_lr * g / (|g| + eps) ~ -adam_lr * sign(g).
  for path in (("embedding",), ("head",), ("final_norm",), ("blocks", "attn_norm"),
               ("gate_scalar",)):
    update, grad = updates, grads
    for key in path:
      update, grad = update[key], grad[key]
    np.testing.assert_allclose(update, -adam_lr * jnp.sign(grad), rtol=1e-3, atol=1e-7)


def test_muon_head_split_layouts_match_fused_matrices():
  cfg = flat_constant(name="muon", lr=0.02, weight_decay=0.0)
  q_grad = jax.random.normal(jax.random.key(3), (L, D, H, DH))
  o_grad = jax.random.normal(jax.random.key(4), (L, H, DH, D))
  split = one_update(cfg, {"q": P("layers", "embed", "heads", "head_dim"),
                           "o": P("layers", "heads", "head_dim", "embed")},
                     {"q": jnp.zeros_like(q_grad), "o": jnp.zeros_like(o_grad)},
                     {"q": q_grad, "o": o_grad})
  fused = one_update(cfg, {"q": P("layers", "embed", "heads"), "o": P("layers", "heads", "embed")},
                     {"q": jnp.zeros((L, D, H * DH)), "o": jnp.zeros((L, H * DH, D))},
                     {"q": q_grad.reshape(L, D, H * DH), "o": o_grad.reshape(L, H * DH, D)})
  np.testing.assert_allclose(split["q"].reshape(L, D, H * DH), fused["q"], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(split["o"].reshape(L, H * DH, D), fused["o"], rtol=1e-4, atol=1e-7)


def test_muon_weight_decay_per_group():
  lr, adam_lr, wd = 0.02, 0.004, 0.5
  cfg = flat_constant(name="muon", lr=lr, adam_lr=adam_lr, weight_decay=wd)
  params = model_like_params(jax.random.key(5))
  updates = one_update(cfg, model_like_specs(), params, jax.tree.map(jnp.zeros_like, params))
  expected_rate = {"matrix": lr * wd, "embedding": adam_lr * wd, "vector": 0.0}
  groups = optim.param_groups(model_like_specs())
  for group, param, update in zip(jax.tree.leaves(groups), jax.tree.leaves(params),
                                  jax.tree.leaves(updates)):
    np.testing.assert_allclose(update, -expected_rate[group] * param, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- nnx and sharding


class TinyModel(nnx.Module):
  """One embedding, a stacked hidden matrix and a norm scale, with logical axes
  (``out_sharding`` is flax 0.12's name for the deprecated ``sharding_names``)."""

  def __init__(self, rngs: nnx.Rngs):
    def param(shape, names):
      return nnx.Param(jax.random.normal(rngs.params(), shape), out_sharding=names,
                       eager_sharding=False)
    self.embedding = param((V, D), ("vocab", "embed"))
    self.w_up = param((L, D, F), ("layers", "embed", "mlp"))
    self.norm = param((D,), ("norm",))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embedding[...][tokens] * self.norm[...]
    for layer in range(L):
      x = jnp.tanh(x @ self.w_up[...][layer])[..., :D]
    return jnp.mean(x @ self.embedding[...].T)


@pytest.mark.parametrize("name", ["adamw", "sgd", "muon"])
def test_nnx_state_matches_dict_tree(name):
  cfg = OptimConfig(name=name, warmup_steps=0, grad_accum_steps=1)
  model = TinyModel(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  logical_axes = nnx.get_partition_spec(state)
  assert optim.param_groups(nnx.to_pure_dict(logical_axes)) == {
      "embedding": "embedding", "w_up": "matrix", "norm": "vector"}
  tokens = jnp.arange(8) % V
  grads = nnx.grad(lambda m: m(tokens))(model)

  tx = optim.build_optimizer(cfg, 10, logical_axes)
  updates, _ = jax.jit(tx.update)(grads, tx.init(state), state)
  dict_tx = optim.build_optimizer(cfg, 10, nnx.to_pure_dict(logical_axes))
  dict_state = nnx.to_pure_dict(state)
  dict_updates, _ = dict_tx.update(nnx.to_pure_dict(grads), dict_tx.init(dict_state), dict_state)
  for key, value in nnx.to_pure_dict(updates).items():
    np.testing.assert_allclose(value, dict_updates[key], rtol=1e-5, atol=1e-8)

  # nnx.Optimizer inits on Variables and updates on pure arrays: paths still match.
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for key in before:
    # after - before loses float32 precision next to O(1) params: compare loosely.
    np.testing.assert_allclose(after[key] - before[key], dict_updates[key], rtol=1e-3, atol=2e-6)


AVERAGES = dict(ema_decay=0.9, swa_every=2)


@pytest.mark.parametrize("name,accum,averages", [
    ("adamw", 1, {}), ("sgd", 2, {}), ("muon", 1, {}), ("muon", 2, {}), ("adamw", 1, AVERAGES),
    ("muon", 2, AVERAGES)])
def test_opt_state_shardings(name, accum, averages):
  mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  specs = model_like_specs()
  to_mesh = lambda spec: NamedSharding(mesh, P(*("fsdp" if a == "embed" else None
                                                  for a in spec)))
  param_shardings = jax.tree.map(to_mesh, specs, is_leaf=lambda x: isinstance(x, P))
  params = jax.device_put(model_like_params(jax.random.key(6)), param_shardings)
  tx = optim.build_optimizer(OptimConfig(name=name, nesterov=True, grad_accum_steps=accum,
                                         **averages), 10, specs)
  abstract = jax.eval_shape(tx.init, params)
  shardings = optim.opt_state_shardings(tx, abstract, param_shardings,
                                        NamedSharding(mesh, P()))
  opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
  # Every param-shaped state array is sharded like its param, the rest replicated.
  param_specs = {(a.shape, s.spec) for a, s in zip(jax.tree.leaves(params),
                                                    jax.tree.leaves(param_shardings))}
  for leaf in jax.tree.leaves(opt_state):
    if any(leaf.shape == shape for shape, _ in param_specs) and leaf.ndim >= 2:
      assert (leaf.shape, leaf.sharding.spec) in param_specs
  updates, _ = jax.jit(tx.update)(params, opt_state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  average = averaging.find_state(opt_state)
  if averages:  # the averages are sharded exactly like the params
    for tree in (average.ema, average.swa):
      assert jax.tree.leaves(jax.tree.map(lambda a: a.sharding, tree)) == jax.tree.leaves(
          param_shardings)
  else:
    assert average is None
