"""Config tree: YAML + --set loading, type checks, one-line errors, round trip."""

import dataclasses
import math
import re
import subprocess
import sys
import typing
from pathlib import Path

import jax
import pytest

from ttt_jax import config as config_lib
from ttt_jax import sharding
from ttt_jax.training import state as state_lib
from ttt_jax.training import step as step_lib
from ttt_jax.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("model:\n  n_layers: 2\noptim:\n  lr: 1e-3\ndata:\n  corpus: [a.txt, 'b/*.md']\n")
  cfg = load_config(path, ["train.steps=7", "model.tie_embeddings=true", "optim.name=muon"])
  assert cfg.model.n_layers == 2
  assert cfg.optim.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string
  assert cfg.data.corpus == ("a.txt", "b/*.md")
  assert cfg.train.steps == 7 and cfg.model.tie_embeddings and cfg.optim.name == "muon"
  assert load_config(None, ["data.corpus=notes.txt"]).data.corpus == ("notes.txt",)


@pytest.mark.parametrize("override, message", [
    ("train.stepz=5", "unknown config key 'train.stepz'; did you mean train.steps?"),
    ("trian.steps=5", "unknown config key 'trian'; did you mean train?"),
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("train.steps=1.5", "train.steps: expected an integer, got 1.5"),
    ("model.tie_embeddings=maybe", "model.tie_embeddings: expected true/false"),
    ("model.mixer=lstm", "model.mixer: 'lstm' is not one of"),
    ("optim.name=adam", "optim.name: 'adam' is not one of"),
    ("train.steps=0", "train.steps: must be > 0"),
    ("model.n_heads=3", "model.n_heads: d_model=256 is not divisible"),
    ("model.d_model=100", "model.head_dim: RoPE needs an even head_dim, got 25"),
    ("model.head_dim=-4", "model.head_dim: must be >= 0"),
    ("model.n_kv_heads=-1", "model.n_kv_heads: must be >= 0"),
    (("model.residual=mhc", "model.mhc_streams=1"), "model.mhc_streams: mhc needs at least 2"),
    ("model.attention_impl=cudnn", "model.attention_impl: 'cudnn' is the fused kernel"),
    (("model.attention_impl=cudnn", "model.dtype=bfloat16", "model.mixer=cct"),
     "got mixer='cct', dtype='bfloat16'"),
    ("mesh.fsdp=-2", "mesh: sizes must be positive"),
    ("optim.grad_accum_steps=3", "optim.grad_accum_steps: train.batch_size=8"),
    ("model=3", "model: expected a mapping"),
    ("steps", "expected KEY=VALUE"),
])
def test_errors_name_the_key(override, message):
  with pytest.raises(ConfigError) as err:
    load_config(None, list(override) if isinstance(override, tuple) else [override])
  assert message in str(err.value)
  assert "\n" not in str(err.value)


def test_platform_only_options_fail_on_other_devices():
  cfg = load_config(None, ["model.attention_impl=cudnn", "model.dtype=bfloat16"])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  with pytest.raises(ConfigError, match="model.attention_impl: 'cudnn' needs GPU devices, "
                                        "these are cpu"):
    state_lib.abstract_state(cfg, cfg.data.vocab_size, mesh)


def test_yaml_file_errors(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: [unclosed\n")
  with pytest.raises(ConfigError, match="bad.yaml.*invalid YAML"):
    load_config(bad)
  with pytest.raises(ConfigError, match="cannot read config file"):
    load_config(tmp_path / "missing.yaml")
  bad.write_text("- just\n- a list\n")
  with pytest.raises(ConfigError, match="expected a mapping at the top level"):
    load_config(bad)


def test_yaml_is_read_safely(tmp_path):
  evil = tmp_path / "evil.yaml"
  evil.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
  with pytest.raises(ConfigError, match="invalid YAML"):
    load_config(evil)


def test_save_load_round_trip_and_hash(tmp_path):
  cfg = load_config(None, ["model.n_layers=3", "mesh.rules=[[batch, data], [embed, '']]"])
  config_lib.save_config(cfg, tmp_path / "config.yaml")
  again = load_config(tmp_path / "config.yaml")
  assert again == cfg
  assert config_lib.config_hash(again) == config_lib.config_hash(cfg)
  assert config_lib.config_hash(Config()) != config_lib.config_hash(cfg)


def test_every_field_has_a_docstring():
  def walk(cls):
    docs = config_lib._field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
      if dataclasses.is_dataclass(hints[f.name]):
        walk(hints[f.name])
  walk(Config)
  assert any(line.startswith("train.steps (int, default 1000)") for line in config_lib.describe())


def test_configs_are_frozen():
  cfg = Config()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.train.steps = 3  # type: ignore[misc]


@pytest.mark.slow
def test_cli_reports_bad_key_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "ttt_jax.train", "--config", str(REPO / "configs/quickstart.yaml"),
       "--workdir", str(tmp_path / "run"), "--set", "train.stepss=3"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("error: unknown config key 'train.stepss'; "
                                 "did you mean train.steps?")


SHIPPED = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def _named_size(name: str) -> float | None:
  """The parameter count in a config's name ('ttt_linear_1.3b' -> 1.3e9), if any."""
  match = re.search(r"_(\d+(?:\.\d+)?)([mb])$", name.removesuffix(".yaml"))
  return None if match is None else float(match[1]) * (1e6 if match[2] == "m" else 1e9)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_builds_on_its_mesh(name, tmp_path):
  """Each file in configs/ loads, round-trips, and its train state's shapes build and
  shard on its mesh (abstractly: nothing is allocated) with the batch dividing it."""
  cfg = load_config(REPO / "configs" / name)
  config_lib.save_config(cfg, tmp_path / "config.yaml")
  assert load_config(tmp_path / "config.yaml") == cfg
  sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  # a -1 axis takes as many of the 8 simulated devices as the batch allows
  count = math.gcd(8, cfg.train.batch_size) if -1 in sizes else math.prod(sizes)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:count])
  sharding.check_batch(cfg.train.batch_size // cfg.optim.grad_accum_steps, mesh)
  sharding.check_batch(cfg.eval.batch_size or cfg.train.batch_size, mesh)
  _, _, abstract, shardings = state_lib.abstract_state(cfg, cfg.data.vocab_size, mesh)
  params = jax.tree.leaves(abstract.params)
  assert len(params) == len(jax.tree.leaves(shardings.params))
  assert step_lib.train_flops_per_step(cfg, cfg.data.vocab_size) > 0
  named = _named_size(name)
  if named is not None:  # the names round: 'ttt_linear_125m' is 110M with a 32k vocab
    assert 0.65 * named < sum(p.size for p in params) < 1.35 * named
