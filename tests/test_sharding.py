"""Mesh construction, logical-axis rules, and sharded training that matches one device."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ttt_jax import sharding, train
from ttt_jax.training import state as state_lib
from ttt_jax.config import ConfigError, MeshConfig, load_config
from ttt_jax.models import lm
from train_util import copy_stdlib_corpus, tiny_config, train_losses

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (2, 4, 1)]
RTOL = 1e-4
"""Sharded and single-device runs differ only in fp32 summation order (partial matmul
sums over fsdp/tensor shards, cross-device gradient reductions): ~1e-7 relative per
operation; 10-20 Adam steps amplify that to ~1e-5 in the loss. 1e-4 is far below the
step-to-step change of the loss (~1e-2), so a wrong batch or a missed update fails."""


def test_mesh_shape_fills_one_axis_and_rejects_bad_products():
  assert sharding.mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=1, tensor=1), 8) == (8, 1, 1)
  with pytest.raises(ConfigError, match="cannot be split"):
    sharding.mesh_shape(MeshConfig(data=3, fsdp=-1, tensor=1), 8)
  with pytest.raises(ConfigError, match="data\\*fsdp\\*tensor = 4 but there are 8"):
    sharding.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
  with pytest.raises(ConfigError, match="single -1"):
    MeshConfig(data=-1, fsdp=-1)
  with pytest.raises(ConfigError, match="mesh.rules\\[embed\\]"):
    load_config(None, ["mesh.rules=[[embed, fsdpp]]"])
  with pytest.raises(ConfigError, match="mesh.num_devices: 16"):
    sharding.make_mesh(MeshConfig(num_devices=16))


def test_rules_map_logical_axes_and_use_each_mesh_axis_once():
  rules = sharding.rules_table(MeshConfig())
  assert sharding.logical_to_mesh_spec(P("layers", "embed", "mlp"), rules) == P(None, "fsdp", "tensor")
  assert sharding.logical_to_mesh_spec(P("batch", None), rules) == P(("data", "fsdp"), None)
  # 'vocab' and 'mlp' both map to tensor: the first claims it
  assert sharding.logical_to_mesh_spec(P("mlp", "vocab"), rules) == P("tensor", None)


def test_indivisible_parameter_is_a_clear_error():
  cfg = load_config(None, ["model.d_model=60", "model.n_heads=6", "mesh.fsdp=8"])
  with pytest.raises(ConfigError, match=r"parameter '.*' dimension 60 is not divisible by "
                                        r"mesh axes \('fsdp',\) of total size 8"):
    state_lib.abstract_state(cfg, 512, sharding.make_mesh(cfg.mesh))
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
  with pytest.raises(ConfigError, match="train.batch_size: 4 is not divisible by data\\*fsdp = 8"):
    sharding.check_batch(4, mesh)


def test_fsdp_shards_params_and_optimizer_state_eightfold():
  """Measured from the addressable shards actually placed on one device."""
  cfg = load_config(None, ["model.d_model=128", "model.ffn.d_ff=256", "mesh.fsdp=8"])
  built = state_lib.build(cfg, 1024, sharding.make_mesh(cfg.mesh))
  leaves = jax.tree.leaves(built.state)
  total = sum(x.nbytes for x in leaves)
  device0 = jax.devices()[0]
  on_device0 = sum(s.data.nbytes for x in leaves for s in x.addressable_shards
                   if s.device == device0)
  assert on_device0 <= total / 8 * 1.05, (on_device0, total)
  # every matrix really is split (not replicated and merely small)
  embed = built.state.params["embed"]["embedding"][...]
  assert embed.addressable_shards[0].data.shape == (1024, 128 // 8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Single-device reference (20 steps) and 10-step runs on each mesh."""
  root = tmp_path_factory.mktemp("mesh")
  corpus = (copy_stdlib_corpus(root / "src"), root / "cache")
  common = ("train.steps=20", "train.eval_every=0", "checkpoint.every=10")

  def run(name, *overrides):
    workdir = root / name
    train.train(tiny_config(*corpus, *common, *overrides), workdir)
    return workdir

  out = {"corpus": corpus, "common": common, "root": root, "single": run("single")}
  for mesh in MESHES:
    data, fsdp, tensor = mesh
    out[mesh] = run(f"mesh{data}{fsdp}{tensor}", "mesh.num_devices=0", f"mesh.data={data}",
                    f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", "train.stop_after=10")
  return out


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_sharded_losses_match_single_device(runs, mesh):
  reference = train_losses(runs["single"])
  losses = train_losses(runs[mesh])
  assert sorted(losses) == list(range(1, 11))
  np.testing.assert_allclose([losses[s] for s in range(1, 11)],
                             [reference[s] for s in range(1, 11)], rtol=RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("target", [(2, 2, 2), (2, 4, 1), (1, 1, 1)],
                         ids=lambda m: "x".join(map(str, m)))
def test_checkpoint_from_fsdp8_resumes_on_another_mesh(runs, target):
  """Saved on (1, 8, 1) at step 10; resumed elsewhere it continues the same stream."""
  workdir = runs["root"] / ("resume" + "".join(map(str, target)))
  shutil.copytree(runs[(1, 8, 1)], workdir)
  data, fsdp, tensor = target
  num_devices = data * fsdp * tensor
  summary = train.train(tiny_config(*runs["corpus"], *runs["common"],
                                    f"mesh.num_devices={num_devices}", f"mesh.data={data}",
                                    f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"), workdir)
  assert summary["start_step"] == 10
  reference = train_losses(runs["single"])
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, 21))
  np.testing.assert_allclose([losses[s] for s in range(11, 21)],
                             [reference[s] for s in range(11, 21)], rtol=RTOL)
  leaf = jax.tree.leaves(summary["state"].params)[0]
  assert leaf.sharding.mesh.devices.shape == target
