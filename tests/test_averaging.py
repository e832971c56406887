"""Tests of ttt_jax/training/averaging.py: EMA and SWA against their float64 closed
forms, float32 averages of bfloat16 params, gradient accumulation, extraction of the
averaged weights, config checks, and (slow) a tiny run: resumed bit-exactly with its
averages, evaluated side by side, EMA no worse than the raw weights after a warmdown."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ttt_jax import evaluate as evaluate_cli
from ttt_jax import export, quant, runs, train
from ttt_jax.config import Config, EvalConfig, OptimConfig, load_config
from ttt_jax.errors import ConfigError
from ttt_jax.training import averaging, optim
from train_util import copy_stdlib_corpus, read_metrics, tiny_config

SPECS = {"w": P("embed", "mlp"), "b": P("norm")}
TOTAL = 12
"""Optimizer updates of the toy runs: warmup 2, constant to 6, linear warmdown to 12."""


def toy_problem(dtype=jnp.float32):
  """(params, grad_fn) of a random least-squares problem."""
  keys = jax.random.split(jax.random.key(3), 4)
  a = jax.random.normal(keys[0], (5, 4))
  y = jax.random.normal(keys[1], (5, 3))
  params = {"w": jax.random.normal(keys[2], (4, 3)).astype(dtype),
            "b": jax.random.normal(keys[3], (3,)).astype(dtype)}

  def loss(p):
    return 0.5 * jnp.sum((a @ p["w"].astype(jnp.float32) + p["b"].astype(jnp.float32) - y) ** 2)

  return params, jax.grad(loss)


def toy_config(**kwargs) -> OptimConfig:
  base = dict(name="sgd", lr=0.05, momentum=0.5, weight_decay=0.0, clip_norm=0.0,
              schedule="wsd", warmup_steps=2, decay_fraction=0.5, min_lr_ratio=0.0,
              ema_decay=0.7, swa_every=2, swa_start_lr_ratio=0.6)
  base.update(kwargs)
  return OptimConfig(**base)


def run(cfg: OptimConfig, params, grad_fn, calls: int):
  """``calls`` optimizer.update calls; (final opt_state, params after every call)."""
  tx = optim.build_optimizer(cfg, TOTAL, SPECS)
  update = jax.jit(tx.update)
  state, history = tx.init(params), [params]
  for _ in range(calls):
    updates, state = update(grad_fn(history[-1]), state, history[-1])
    history.append(optax.apply_updates(history[-1], updates))
  return state, history


def as64(tree) -> dict:
  return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def assert_close(actual, expected: dict, what: str = "", dtype=jnp.float32) -> None:
  """float32 averages against float64 closed forms: a few float32 roundings apart. Of
  bfloat16 params, within one bfloat16 rounding of a p_t: inside the jitted update XLA
  may keep the sum p + u in more precision than the params' dtype (excess precision)."""
  rtol, atol = (2e-6, 2e-7) if dtype == jnp.float32 else (8e-3, 1e-3)
  for key, value in expected.items():
    np.testing.assert_allclose(np.asarray(actual[key], np.float64), value, rtol=rtol,
                               atol=atol, err_msg=f"{what} {key}")


def closed_forms(cfg: OptimConfig, history: list) -> tuple[dict, dict, int]:
  """(EMA, SWA mean, snapshots) in float64 from the params p_0..p_T of each update."""
  ps = [as64(p) for p in history]
  ema = ps[0]
  for p in ps[1:]:
    ema = {k: cfg.ema_decay * ema[k] + (1 - cfg.ema_decay) * p[k] for k in p}
  schedule = optim.lr_schedule(cfg, TOTAL)
  snapshots = [ps[t] for t in range(1, len(ps))
               if t % cfg.swa_every == 0 and t - 1 >= cfg.warmup_steps
               and float(schedule(t - 1)) <= cfg.swa_start_lr_ratio * cfg.lr]
  swa = {k: np.mean([s[k] for s in snapshots], axis=0) for k in ps[0]} if snapshots else None
  return ema, swa, len(snapshots)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ema_and_swa_match_the_float64_closed_form(dtype):
  cfg = toy_config()
  params, grad_fn = toy_problem(dtype)
  opt_state, history = run(cfg, params, grad_fn, TOTAL)
  ema, swa, snapshots = closed_forms(cfg, history)
  # lr/peak <= 0.6 from update 9 (0-based) on: snapshots after updates 10 and 12 only
  # (update 2 has lr 0.5 x peak, but in the warmup)
  assert snapshots == 2
  state = averaging.find_state(opt_state)
  assert (int(state.count), int(state.swa_count)) == (TOTAL, snapshots)
  for average in (state.ema, state.swa):
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(average))
  if dtype != jnp.float32:  # the EMA holds values between bfloat16's (never rounded to it)
    assert not np.array_equal(state.ema["w"], state.ema["w"].astype(dtype).astype(jnp.float32))
  for which, expected in (("ema", ema), ("swa", swa)):
    assert_close(getattr(state, which), expected, which, dtype)
    extracted = averaging.weights(history[-1], opt_state, which)
    for key, value in extracted.items():
      assert value.dtype == dtype
      np.testing.assert_array_equal(value, getattr(state, which)[key].astype(dtype))
  assert averaging.weights(history[-1], opt_state, "raw") is history[-1]


def test_averages_start_from_the_params_and_swa_follows_them_until_its_first_snapshot():
  cfg = toy_config()
  params, grad_fn = toy_problem()
  fresh = optim.build_optimizer(cfg, TOTAL, SPECS).init(params)
  for which in ("ema", "swa"):
    np.testing.assert_array_equal(averaging.weights(params, fresh, which)["w"], params["w"])
  # params replaced after init (a run initialised from another's params): the averages
  # start from the params the first update sees
  other = jax.tree.map(lambda x: x + 1.0, params)
  opt_state, history = run(cfg, other, grad_fn, 1)
  np.testing.assert_array_equal(averaging.weights(other, fresh, "ema")["w"], other["w"])
  state = averaging.find_state(opt_state)
  ema, _, _ = closed_forms(cfg, history)
  assert_close(state.ema, ema)
  opt_state, history = run(cfg, params, grad_fn, 7)
  assert int(averaging.find_state(opt_state).swa_count) == 0
  assert_close(averaging.find_state(opt_state).swa, as64(history[-1]))


def test_averages_update_once_per_optimizer_step_under_gradient_accumulation():
  """4 micro-batches per update: the averages follow the params of each update."""
  accum = 4
  cfg = toy_config(grad_accum_steps=accum)
  params, grad_fn = toy_problem()
  opt_state, history = run(cfg, params, grad_fn, TOTAL * accum)
  per_update = history[::accum]
  assert all(np.array_equal(a["w"], b["w"])  # micro-steps change nothing
             for i in range(TOTAL) for a, b in [(per_update[i], history[i * accum + accum - 1])])
  ema, swa, snapshots = closed_forms(cfg, per_update)
  state = averaging.find_state(opt_state)
  assert (int(state.count), int(state.swa_count)) == (TOTAL, snapshots)
  assert_close(state.ema, ema)
  assert_close(state.swa, swa)


def test_averaging_is_off_by_default_and_each_average_on_its_own():
  params, grad_fn = toy_problem()
  plain = optim.build_optimizer(toy_config(ema_decay=0.0, swa_every=0), TOTAL, SPECS)
  assert averaging.find_state(plain.init(params)) is None
  with pytest.raises(ConfigError, match=r"^weights: 'ema' is not kept by this run "
                                        r"\(optim.ema_decay is 0\)$"):
    averaging.weights(params, plain.init(params), "ema")
  ema_only, _ = run(toy_config(swa_every=0), params, grad_fn, 3)
  assert isinstance(averaging.find_state(ema_only).swa, optax.EmptyState)
  with pytest.raises(ConfigError, match=r"optim.swa_every is 0"):
    averaging.weights(params, ema_only, "swa")
  # the updates pass through: the params move as without averaging
  _, with_avg = run(toy_config(), params, grad_fn, 3)
  _, without = run(toy_config(ema_decay=0.0, swa_every=0), params, grad_fn, 3)
  np.testing.assert_array_equal(with_avg[-1]["w"], without[-1]["w"])


def test_evaluate_each_prefixes_each_weights_scores():
  params, grad_fn = toy_problem()
  opt_state, history = run(toy_config(), params, grad_fn, TOTAL)
  score = lambda p: {"eval_loss": float(jnp.sum(p["w"]))}  # noqa: E731
  row = averaging.evaluate_each(score, history[-1], opt_state, ("raw", "ema", "swa"))
  assert list(row) == ["eval_loss", "ema_eval_loss", "swa_eval_loss"]
  assert row["ema_eval_loss"] == score(averaging.weights(history[-1], opt_state, "ema"))[
      "eval_loss"]
  cfg = Config(optim=OptimConfig(ema_decay=0.9, swa_every=5), eval=EvalConfig(weights="all"))
  assert averaging.eval_weights(cfg) == ("raw", "ema", "swa")
  assert averaging.eval_weights(Config(optim=OptimConfig(ema_decay=0.9),
                                       eval=EvalConfig(weights="all"))) == ("raw", "ema")
  assert averaging.eval_weights(Config()) == ("raw",)


@pytest.mark.parametrize("overrides,message", [
    (["optim.ema_decay=1.0"], "optim.ema_decay: must be in [0, 1) (0 disables), got 1.0"),
    (["optim.ema_decay=-0.1"], "optim.ema_decay: must be in [0, 1) (0 disables), got -0.1"),
    (["optim.swa_every=-2"], "optim.swa_every: must be >= 0, got -2"),
    (["optim.swa_start_lr_ratio=0"], "optim.swa_start_lr_ratio: must be in (0, 1], got 0.0"),
    (["optim.swa_start_lr_ratio=1.5"], "optim.swa_start_lr_ratio: must be in (0, 1], got 1.5"),
    (["optim.swa_every=10", "optim.swa_start_lr_ratio=0.05"],
     "optim.swa_start_lr_ratio: 0.05 is below the cosine schedule's final lr ratio 0.1, so "
     "SWA would never start"),
    (["optim.swa_every=10", "optim.schedule=constant", "optim.swa_start_lr_ratio=0.5"],
     "optim.swa_start_lr_ratio: 0.5 is below the constant schedule's final lr ratio 1.0, so "
     "SWA would never start"),
    (["eval.weights=best"], "eval.weights: 'best' is not one of ['raw', 'ema', 'swa', 'all']"),
    (["eval.weights=ema"], "eval.weights: 'ema' needs optim.ema_decay > 0"),
    (["eval.weights=swa", "optim.ema_decay=0.9"], "eval.weights: 'swa' needs optim.swa_every > 0"),
    (["eval.weights=all"], "eval.weights: 'all' needs optim.ema_decay or optim.swa_every > 0"),
])
def test_config_errors_are_one_line(overrides, message):
  with pytest.raises(ConfigError) as error:
    load_config(None, overrides)
  assert str(error.value) == message


def test_valid_averaging_configs_load():
  cfg = load_config(None, ["optim.ema_decay=0.99", "optim.swa_every=10",
                           "optim.swa_start_lr_ratio=0.1", "eval.weights=all"])
  assert (cfg.optim.ema_decay, cfg.optim.swa_every, cfg.eval.weights) == (0.99, 10, "all")
  load_config(None, ["optim.swa_every=5", "optim.schedule=constant",
                     "optim.swa_start_lr_ratio=1", "eval.weights=swa"])


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_an_swa_that_would_never_snapshot_is_refused_before_training(schedule, tmp_path):
  """The schedule reaches its final ratio only after the last update: a start ratio equal
  to it (loadable: 'at least the final ratio') would leave 'swa' the raw params."""
  never = toy_config(schedule=schedule, min_lr_ratio=0.1, swa_start_lr_ratio=0.1,
                     swa_every=1)
  assert not any(bool(optim.swa_active(never, TOTAL)(t)) for t in range(TOTAL))
  message = (f"optim.swa_start_lr_ratio: SWA would take no snapshot in train.steps={TOTAL}: "
             "the lr is above 0.1 x peak at every optim.swa_every=1-th update past the "
             "warmup; raise the ratio or lower swa_every")
  with pytest.raises(ConfigError) as error:
    optim.check_swa_starts(never, TOTAL)
  assert str(error.value) == message
  with pytest.raises(ConfigError, match="SWA would take no snapshot"):
    optim.check_swa_starts(toy_config(swa_every=TOTAL + 1), TOTAL)
  optim.check_swa_starts(toy_config(), TOTAL)  # the closed-form tests' two snapshots
  optim.check_swa_starts(toy_config(swa_every=0, min_lr_ratio=0.1), TOTAL)  # SWA off
  cfg = load_config(None, ["optim.swa_every=1", f"optim.schedule={schedule}",
                           "optim.min_lr_ratio=0.1", "optim.swa_start_lr_ratio=0.1",
                           f"train.steps={TOTAL}", f"data.cache_dir={tmp_path / 'cache'}"])
  with pytest.raises(ConfigError, match="SWA would take no snapshot"):
    train.train(cfg, tmp_path / "run")
  assert not (tmp_path / "run").exists()  # refused before the workdir is made


# ----------------------------------------------------------------------------- a tiny run

STEPS, WARMDOWN = 200, 100
"""The tiny run: 200 updates, the last 100 a linear warmdown of the lr to zero (wsd)."""
EMA_DECAY = 1 - 1 / WARMDOWN ** 0.5
"""d = 0.9, a time constant tau = 1/(1 - d) = sqrt(WARMDOWN) updates. Over a linear
warmdown to zero the params move about k^2 / (2 W) peak-lr steps in their last k updates,
so an EMA of time constant tau ends about tau^2 / W peak-lr steps behind them: tau =
sqrt(W) keeps that lag to about one step, while still averaging tau updates' noise."""
AVERAGING = (f"train.steps={STEPS}", "train.eval_every=100", f"optim.ema_decay={EMA_DECAY}",
             "optim.swa_every=5", "optim.swa_start_lr_ratio=0.5", "optim.schedule=wsd",
             f"optim.decay_fraction={WARMDOWN / STEPS}", "optim.min_lr_ratio=0",
             "eval.weights=all")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  return copy_stdlib_corpus(root / "src"), root / "cache"


@pytest.fixture(scope="module")
def averaged_run(corpus, tmp_path_factory):
  """The tiny run keeping both averages and evaluating all weights."""
  workdir = tmp_path_factory.mktemp("run")
  cfg = tiny_config(*corpus, *AVERAGING)
  return cfg, workdir, train.train(cfg, workdir)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run_with_its_averages(averaged_run, corpus, tmp_path):
  cfg, _, summary = averaged_run
  first = train.train(tiny_config(*corpus, *AVERAGING, "train.stop_after=97"), tmp_path)
  assert first["final_step"] == 97
  resumed = train.train(cfg, tmp_path)
  assert resumed["start_step"] == 97
  state = averaging.find_state(resumed["state"].opt_state)
  assert int(state.count) == STEPS and int(state.swa_count) > 0
  expected, got = summary["state"].opt_state, resumed["state"].opt_state
  assert jax.tree.structure(expected) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed["eval"][STEPS] == summary["eval"][STEPS]


@pytest.mark.slow
def test_eval_logs_every_weights_and_ema_is_no_worse_after_a_warmdown(averaged_run, capsys):
  _, workdir, summary = averaged_run
  final = summary["eval"][STEPS]
  for prefix in ("", "ema_", "swa_"):
    assert {f"{prefix}eval_loss", f"{prefix}eval_bpb"} <= set(final)
  rows = [r for r in read_metrics(workdir) if "ema_eval_loss" in r]
  assert [r["step"] for r in rows] == [0, 100, STEPS]
  # at step 0 every average is the initial params
  assert rows[0]["ema_eval_loss"] == rows[0]["eval_loss"] == rows[0]["swa_eval_loss"]
  print(f"eval_loss raw {final['eval_loss']:.4f} ema {final['ema_eval_loss']:.4f} "
        f"swa {final['swa_eval_loss']:.4f}")
  assert final["ema_eval_loss"] <= final["eval_loss"] + 0.005
  capsys.readouterr()

  evaluate_cli.main(["--workdir", str(workdir), "--weights", "ema"])
  result = json.loads(capsys.readouterr().out)
  assert (result["weights"], result["step"]) == ("ema", STEPS)
  assert result["eval_loss"] == pytest.approx(final["ema_eval_loss"], rel=1e-6)
  assert result["evaluation"]["weights"] == "ema" and not result["evaluation"]["default"]
  assert not (workdir / "eval_lm.json").exists()  # the default file is the raw weights'


@pytest.mark.slow
def test_export_quantizes_the_average_that_evaluate_refuses_with_an_artifact(averaged_run,
                                                                            capsys):
  """``evaluate --weights ema --artifact F`` points to ``export --weights ema``: that
  artifact holds the quantized EMA, and it is not the raw weights' artifact."""
  _, workdir, _ = averaged_run
  with pytest.raises(SystemExit):
    evaluate_cli.main(["--workdir", str(workdir), "--weights", "ema", "--artifact", "x.ttq"])
  assert "python -m ttt_jax.export --weights ema" in capsys.readouterr().err
  export.main(["--workdir", str(workdir), "--weights", "ema"])
  result = json.loads(capsys.readouterr().out)
  assert (result["weights"], result["artifact"]) == (
      "ema", str(workdir / "model-ema-int6-int8.ttq"))
  _, _, ema, _, _ = runs.load_trained(workdir, log=lambda _: None, weights="ema")
  _, _, raw, _, _ = runs.load_trained(workdir, log=lambda _: None)
  loaded, _ = quant.load_artifact(result["artifact"], raw)
  expected = {path: quant.decode(enc) for path, enc in quant.encode_params(ema).items()}
  for path, var in nnx.to_flat_state(loaded):
    np.testing.assert_array_equal(np.asarray(var.get_value()), expected[tuple(path)])
  assert not (workdir / "model-int6-int8.ttq").exists()  # the raw weights' default file
