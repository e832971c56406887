"""LoRA adapters: target selection, layout, merge, gradients, counts; training only the
adapters through the ordinary step; saving, loading and folding them into a run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train_util import copy_stdlib_corpus, eval_losses, tiny_config, train_losses
from ttt_jax import generate, lora, runs, sharding, train
from ttt_jax.bench import sdft as bench_sdft
from ttt_jax.cct import mixer as cct
from ttt_jax.config import Config, ConfigError, LoRAConfig, config_hash, load_config
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.errors import CheckpointError
from ttt_jax.eval import lm as eval_lm
from ttt_jax.lora import __main__ as lora_main
from ttt_jax.lora import files
from ttt_jax.models import lm
from ttt_jax.models.context import default_positions
from ttt_jax.training import objectives
from ttt_jax.training import state as state_lib

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.ffn.d_ff=128"]
MODELS = {"attention": [], "ttt_linear": ["model.mixer.type=ttt_linear"],
          "cct": ["model.mixer.type=cct"], "mhc": ["model.residual.type=mhc"]}
VOCAB = 97


def tiny_model(name: str) -> tuple[Config, nnx.GraphDef, nnx.State]:
  cfg = load_config(None, TINY + MODELS[name])
  graphdef, params = nnx.split(lm.LM(cfg.model, VOCAB, rngs=nnx.Rngs(0)))
  return cfg, graphdef, params


def tokens_batch(cfg: Config, seed: int = 0) -> dict[str, jax.Array]:
  inputs = jax.random.randint(jax.random.key(seed), (2, 32), 0, VOCAB)
  batch = {"inputs": inputs}
  if cfg.model.mixer.type == "cct":
    positions = default_positions(inputs)
    batch[cct.STEP_IDS] = cct.fixed_step_ids(positions, cfg.model.mixer.step_len)
  return batch


def logits(graphdef: nnx.GraphDef, params: nnx.State, batch) -> np.ndarray:
  return np.asarray(objectives.batch_logits(nnx.merge(graphdef, params), batch))


def random_adapters(cfg: LoRAConfig, targets, seed: int = 1):
  """Adapters with a nonzero B, so they change the model."""
  adapters = lora.init(cfg, targets, jax.random.key(seed))
  return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed + 1), x.shape),
                      adapters)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_fresh_adapter_leaves_the_logits_bitwise_unchanged(name):
  cfg, graphdef, params = tiny_model(name)
  targets = lora.find_targets(cfg.lora, params)
  expected = {"attention": {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"},
              "ttt_linear": {"wq", "wv", "wo", "w_gate", "w_up", "w_down"}}
  names = {t.path[-1] for t in targets}
  assert names == expected.get(name, expected["attention"])
  adapters = lora.init(cfg.lora, targets, jax.random.key(3))
  assert all(float(jnp.abs(pair["a"]).max()) > 0 for pair in jax.tree.leaves(
      adapters, is_leaf=lambda x: isinstance(x, dict) and "a" in x))
  merged = lora.merge(params, adapters, cfg.lora, targets)
  batch = tokens_batch(cfg)
  np.testing.assert_array_equal(logits(graphdef, merged, batch), logits(graphdef, params, batch))
  changed = lora.merge(params, random_adapters(cfg.lora, targets), cfg.lora, targets)
  assert not np.allclose(logits(graphdef, changed, batch), logits(graphdef, params, batch))


def test_the_merged_weight_acts_as_the_base_plus_the_low_rank_path():
  """x @ (W + s A B) = x @ W + s (x @ A) @ B per layer, on a stacked weight whose input
  side is two axes (attention's output projection [layers, heads, embed])."""
  cfg = load_config(None, TINY + ["model.head_dim=16", "lora.rank=3", "lora.alpha=5"])
  _, _, params = tiny_model("attention")
  target = next(t for t in lora.find_targets(cfg.lora, params) if t.path[-1] == "wo")
  assert target.batch == (0,) and target.output == (2,)
  w = np.asarray(params["blocks"]["mixer"]["wo"][...])
  adapters = random_adapters(cfg.lora, [target])
  merged = lora.merge(params, adapters, cfg.lora, [target])
  w_merged = np.asarray(merged["blocks"]["mixer"]["wo"][...])
  pair = adapters["blocks"]["mixer"]["wo"]
  x = np.asarray(jax.random.normal(jax.random.key(5), (7, target.fan_in)), np.float64)
  scale = 5 / 3
  for layer in range(w.shape[0]):
    a, b = np.asarray(pair["a"][layer], np.float64), np.asarray(pair["b"][layer], np.float64)
    flat = lambda m: m.reshape(target.fan_in, target.fan_out).astype(np.float64)
    np.testing.assert_allclose(x @ flat(w_merged[layer]),
                               x @ flat(w[layer]) + scale * (x @ a) @ b, atol=1e-5, rtol=1e-5)
  assert pair["a"].shape == (2, target.fan_in, 3) and pair["b"].shape == (2, 3, target.fan_out)


def test_a_weight_whose_input_axes_follow_its_output_axes_keeps_its_layout():
  """A per-head weight without 'embed' ([layers, heads, in, out] style): the batch axes
  come first in the flattened view and the delta is transposed back to W's order."""
  target = lora.Target(("w",), (2, 3, 4, 5), (0, 2), (3,), (1,), None)
  a = jax.random.normal(jax.random.key(0), (2, 4, 5, 2))
  b = jax.random.normal(jax.random.key(1), (2, 4, 2, 3))
  d = np.asarray(lora.delta(target, a, b, 0.5))
  assert d.shape == (2, 3, 4, 5)
  want = 0.5 * np.einsum("lkir,lkro->loki", np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(d, want, rtol=1e-6, atol=1e-6)


def test_adapter_gradients_match_float64_finite_differences():
  cfg = load_config(None, TINY + ["lora.rank=2"])
  _, _, params = tiny_model("attention")
  targets = [t for t in lora.find_targets(cfg.lora, params) if t.path[-1] == "w_up"]
  adapters = random_adapters(cfg.lora, targets)
  x = np.asarray(jax.random.normal(jax.random.key(9), (5, 64)), np.float64)

  def loss(adapters):
    w = lora.merge(params, adapters, cfg.lora, targets)["blocks"]["mlp"]["w_up"][...]
    return jnp.sum(jnp.tanh(jnp.einsum("nd,ldf->lnf", x, w)))

  with jax.enable_x64(True):
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params)
    adapters = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), adapters)
    grads = jax.grad(loss)(adapters)
    eps = 1e-6
    for name in ("a", "b"):
      leaf = adapters["blocks"]["mlp"]["w_up"][name]
      for index in [(0, 1, 1), (1, 0, 0), (1, 50, 1) if name == "a" else (1, 1, 100)]:
        step = jnp.zeros_like(leaf).at[index].set(eps)
        shifted = lambda sign: {"blocks": {"mlp": {"w_up": {
            **adapters["blocks"]["mlp"]["w_up"], name: leaf + sign * step}}}}
        numeric = (loss(shifted(1)) - loss(shifted(-1))) / (2 * eps)
        np.testing.assert_allclose(float(grads["blocks"]["mlp"]["w_up"][name][index]),
                                   float(numeric), rtol=1e-6, atol=1e-8)


def test_trainable_count_is_the_formula():
  cfg = load_config(None, TINY + ["lora.rank=4"])
  _, _, params = tiny_model("attention")
  targets = lora.find_targets(cfg.lora, params)
  adapters = lora.init(cfg.lora, targets, jax.random.key(0))
  n = lm.count_params(adapters)
  # 2 layers x r x (in + out): q/k/v/o 64x64, gate/up 64x128, down 128x64
  assert n == lora.trainable_count(targets, 4) == 2 * 4 * (4 * 128 + 3 * 192)
  assert f"{n:,} trainable" in lora.summary_line(cfg.lora, targets)
  axes = lora.logical_axes(targets)
  assert axes["blocks"]["mixer"]["wq"]["a"] == jax.sharding.PartitionSpec("layers", None, None)
  assert math.prod(adapters["blocks"]["mixer"]["wq"]["b"].shape) == 2 * 4 * 64
  assert not np.asarray(adapters["blocks"]["mixer"]["wq"]["b"]).any()


def test_a_target_that_matches_nothing_is_a_one_line_config_error():
  cfg = load_config(None, TINY + ["lora.targets=[mixer/wq$, attn/q_proj]"])
  _, _, params = tiny_model("attention")
  with pytest.raises(ConfigError, match=r"lora.targets: 'attn/q_proj' matches no weight "
                                        r"matrix") as error:
    lora.find_targets(cfg.lora, params)
  assert "\n" not in str(error.value)
  with pytest.raises(ConfigError, match="lora.targets"):  # a norm scale is no matrix
    lora.find_targets(load_config(None, TINY + ["lora.targets=[norm/scale]"]).lora, params)


def test_an_adapter_fits_a_base_run_with_other_compute_only_settings(tmp_path):
  """An adapter run may change how the base computes (dtype, remat), not its params: the
  adapter folds into the base as written; another params layout is refused in one line."""
  base_cfg, _, params = tiny_model("attention")
  run_cfg = load_config(None, TINY + ["model.dtype=bfloat16", "model.remat=full",
                                      "lora.rank=2"])
  targets = lora.find_targets(run_cfg.lora, params)
  adapters = random_adapters(run_cfg.lora, targets)
  files.save_adapter(tmp_path / "a", adapters, files.metadata(
      run_cfg.lora, targets, model=run_cfg.model, step=3, tokenizer_hash=None))
  merged = files.apply_adapter(tmp_path / "a", base_cfg, params, None, log=lambda _: None)
  want = lora.merge(params, adapters, run_cfg.lora, targets)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = load_config(None, TINY + ["model.ffn.d_ff=256"])
  with pytest.raises(CheckpointError, match="trained on another base model") as error:
    files.load_adapter(tmp_path / "a", other, params, None)
  assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A tiny trained run (the base) and the corpus and cache its config reads."""
  root = tmp_path_factory.mktemp("lora")
  corpus_glob, cache = copy_stdlib_corpus(root / "src"), root / "cache"
  cfg = tiny_config(corpus_glob, cache, "train.steps=2", "train.eval_every=0",
                    "checkpoint.every=2", "checkpoint.async_save=false")
  train.train(cfg, root / "base")
  return root, corpus_glob, cache


def lora_config(base_run, *overrides: str) -> Config:
  root, corpus_glob, cache = base_run
  return tiny_config(corpus_glob, cache, "lora.enabled=true", "lora.rank=4",
                     "train.steps=4", "train.eval_every=2", "checkpoint.every=2",
                     "checkpoint.async_save=false", "optim.name=muon", "optim.weight_decay=0.1",
                     *overrides)


@pytest.mark.slow
def test_training_moves_only_the_adapters_and_resumes_bitwise(base_run, capsys):
  root = base_run[0]
  init = f"checkpoint.init_from={root / 'base'}"
  whole = train.train(lora_config(base_run, init), root / "whole")
  first = train.train(lora_config(base_run, init, "train.stop_after=2"), root / "parts")
  resumed = train.train(lora_config(base_run), root / "parts")
  assert (first["final_step"], resumed["start_step"], resumed["final_step"]) == (2, 2, 4)
  assert train_losses(root / "parts") == train_losses(root / "whole")
  assert eval_losses(root / "whole")  # the merged model evaluates during training
  for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(whole["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  state = whole["state"]
  _, _, base = runs.load_trained(root / "base", log=lambda _: None)[:3]
  for a, b in zip(jax.tree.leaves(state.extras[lora.BASE]), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the base is frozen
  targets = lora.find_targets(lora_config(base_run).lora, base)
  assert whole["n_params"] == lora.trainable_count(targets, 4)
  assert any(np.asarray(b).any() for b in jax.tree.leaves(
      jax.tree.map(lambda pair: pair["b"], state.params,
                   is_leaf=lambda x: isinstance(x, dict) and "b" in x)))
  # AdamW moments shaped like the adapters, nothing shaped like a base weight
  adapter_shapes = {x.shape for x in jax.tree.leaves(state.params)}
  opt_shapes = {x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim}
  assert opt_shapes == adapter_shapes
  assert "lora: rank 4, alpha 32; adapted 7 weights" in capsys.readouterr().err


# ----------------------------------------------------------------------------- files


LOGITS_SCRIPT = """
import sys
import jax, numpy as np
from flax import nnx
from ttt_jax import runs
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.lora import files
base, adapter, out = sys.argv[1:]
cfg, graphdef, params, _, _ = runs.load_trained(base, log=lambda _: None)
params = files.apply_adapter(adapter, cfg, params, Tokenizer(base + '/tokenizer.model').sha256,
                             log=lambda _: None)
tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 512)
np.save(out, np.asarray(nnx.merge(graphdef, params)(tokens)))
"""


@pytest.fixture(scope="module")
def adapter_run(base_run):
  """An adapter run trained 2 steps on the base, and its adapter exported."""
  root = base_run[0]
  train.train(lora_config(base_run, f"checkpoint.init_from={root / 'base'}", "train.steps=2",
                          "train.eval_every=0"), root / "adapted")
  lora_main.main(["export", "--workdir", str(root / "adapted"), "--out", str(root / "adapter")])
  return root


def run_logits(workdir, adapter=None) -> np.ndarray:
  cfg, graphdef, params, _, _ = runs.load_trained(workdir, log=lambda _: None)
  if adapter is not None:
    params = files.apply_adapter(adapter, cfg, params,
                                 Tokenizer(workdir / "tokenizer.model").sha256,
                                 log=lambda _: None)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 512)
  return np.asarray(nnx.merge(graphdef, params)(tokens))


@pytest.mark.slow
def test_a_saved_adapter_loads_in_a_new_process_to_the_same_logits(adapter_run, tmp_path):
  root = adapter_run
  meta = json.loads((root / "adapter" / files.META_FILE).read_text())
  base_cfg = load_config(root / "base" / "config.yaml")
  assert meta["rank"] == 4 and meta["alpha"] == 32 and meta["step"] == 2
  assert meta["targets"] == list(base_cfg.lora.targets)
  assert meta["model_config_hash"] == config_hash(base_cfg.model)
  assert meta["tokenizer_hash"] == Tokenizer(root / "base" / "tokenizer.model").sha256
  here = run_logits(root / "base", root / "adapter")
  subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, str(root / "base"),
                  str(root / "adapter"), str(tmp_path / "logits.npy")],
                 check=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
  np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), here)
  # the adapter run read directly is the same adapter
  np.testing.assert_allclose(run_logits(root / "base", root / "adapted"), here, rtol=0, atol=0)
  assert not np.allclose(run_logits(root / "base"), here)


@pytest.mark.slow
def test_a_merged_run_is_an_ordinary_run_with_the_adapter_folded_in(adapter_run, capsys):
  root = adapter_run
  lora_main.main(["merge", "--workdir", str(root / "adapted"), "--out", str(root / "merged")])
  merged_cfg = load_config(root / "merged" / "config.yaml")
  assert not merged_cfg.lora.enabled
  assert ((root / "merged" / "tokenizer.model").read_bytes()
          == (root / "base" / "tokenizer.model").read_bytes())
  np.testing.assert_allclose(run_logits(root / "merged"),
                             run_logits(root / "base", root / "adapter"), rtol=0, atol=1e-6)
  lora_main.main(["merge", "--workdir", str(root / "base"), "--adapter", str(root / "adapter"),
                  "--out", str(root / "merged_base")])
  np.testing.assert_allclose(run_logits(root / "merged_base"), run_logits(root / "merged"),
                             rtol=0, atol=1e-6)
  with pytest.raises(SystemExit):  # never over an existing run
    lora_main.main(["merge", "--workdir", str(root / "adapted"), "--out", str(root / "merged")])
  assert capsys.readouterr().err.splitlines()[-1].startswith("error: --out ")
  # evaluate --adapter scores the base with the adapter as the merged run scores
  with_adapter = eval_lm.evaluate_lm(root / "base", [], 2, adapter=str(root / "adapter"))
  merged = eval_lm.evaluate_lm(root / "merged", [], 2)
  assert with_adapter["eval_loss"] == pytest.approx(merged["eval_loss"], rel=1e-5)
  assert with_adapter["eval_loss"] != eval_lm.evaluate_lm(root / "base", [], 2)["eval_loss"]
  generate.main(["--workdir", str(root / "base"), "--adapter", str(root / "adapter"),
                 "--prompt", "def ", "--max-new-tokens", "4", "--temperature", "0"])
  assert "lora: rank 4, alpha 32; adapted 7 weights" in capsys.readouterr().err


@pytest.mark.slow
def test_an_adapter_is_refused_by_another_base_and_a_run_by_other_adapters(base_run, adapter_run,
                                                                            capsys):
  root = adapter_run
  cfg, _, params, _, _ = runs.load_trained(root / "base", log=lambda _: None)
  other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=3))
  with pytest.raises(CheckpointError, match="trained on another base model") as error:
    files.load_adapter(root / "adapter", other, params, None)
  assert "\n" not in str(error.value)
  with pytest.raises(CheckpointError, match="another tokenizer"):
    files.load_adapter(root / "adapter", cfg, params, "0" * 64)
  with pytest.raises(CheckpointError, match="lora: the checkpoint's adapters differ"):
    train.train(lora_config(base_run, "lora.rank=8"), root / "adapted")
  with pytest.raises(CheckpointError, match="lora.enabled: the checkpoint was written with "
                                            "lora.enabled=true"):
    train.train(lora_config(base_run, "lora.enabled=false"), root / "adapted")
  with pytest.raises(SystemExit):
    generate.main(["--workdir", str(root / "base"), "--adapter", str(root / "base"),
                   "--prompt", "x"])  # a run, but no adapter run
  assert capsys.readouterr().err.splitlines()[-1].startswith("error: ")


@pytest.mark.slow
def test_init_from_an_adapter_run_is_refused_in_one_line_naming_the_merge(base_run,
                                                                          adapter_run):
  """Its params are adapters, not a model: a run starts from its merged run instead."""
  root, corpus_glob, cache = base_run
  for cfg in (tiny_config(corpus_glob, cache, f"checkpoint.init_from={root / 'adapted'}"),
              lora_config(base_run, f"checkpoint.init_from={root / 'adapted'}")):
    with pytest.raises(CheckpointError, match=r"^checkpoint.init_from: .*adapted is an "
                                              r"adapter run \(lora.enabled\); fold") as error:
      train.train(cfg, root / f"from_adapted_{cfg.lora.enabled}")
    assert "\n" not in str(error.value) and "python -m ttt_jax.lora merge" in str(error.value)
  with pytest.raises(CheckpointError, match=r"^--init-from: .*adapted is an adapter run"):
    bench_sdft.bench_sdft(tiny_config(corpus_glob, cache), str(root / "adapted"), 1, 0, 1)


def test_the_train_state_of_an_adapter_run_trains_adapters_on_a_frozen_base():
  """Shapes only: params are the adapters, the base is the extra tree, the optimizer
  state (AdamW, also when optim.name is muon) holds adapter-shaped leaves only."""
  cfg = load_config(None, TINY + ["lora.enabled=true", "lora.rank=2", "optim.name=muon",
                                  "mesh.num_devices=1", "mesh.fsdp=1"])
  mesh = sharding.make_mesh(cfg.mesh)
  _, _, abstract, shardings = state_lib.abstract_state(cfg, VOCAB, mesh)
  base = abstract.extras[lora.BASE]
  targets = lora.find_targets(cfg.lora, base)
  assert lm.count_params(abstract.params) == lora.trainable_count(targets, 2)
  assert lm.count_params(base) == lm.count_params(tiny_model("attention")[2])
  adapter_shapes = {x.shape for x in jax.tree.leaves(abstract.params)}
  assert {x.shape for x in jax.tree.leaves(abstract.opt_state) if x.shape} == adapter_shapes
  assert set(shardings.extras) == {lora.BASE}


def test_weight_averaging_of_adapters_is_a_config_error():
  with pytest.raises(ConfigError, match="lora.enabled: weight averaging"):
    load_config(None, ["lora.enabled=true", "optim.ema_decay=0.99"])
  with pytest.raises(ConfigError, match="lora.rank: must be > 0"):
    load_config(None, ["lora.rank=0"])
