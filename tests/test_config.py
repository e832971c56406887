"""Config tree: YAML + --set loading, model slot sections, type checks, one-line errors,
the legacy flat model form, round trip, describe, ``python -m ttt_jax.config`` and
``train --print-config``."""

import dataclasses
import math
import re
import subprocess
import sys
import typing
from pathlib import Path

import jax
import pytest
import yaml

from ttt_jax import config as config_lib
from ttt_jax import train as train_lib
from ttt_jax import registry, sharding
from ttt_jax.cct.mixer import CCTConfig
from ttt_jax.config import SLOTS, Config, ConfigError, ModelConfig, Section, load_config
from ttt_jax.config import __main__ as config_main
from ttt_jax.config.schema import field_docs
from ttt_jax.models.ffn.swiglu import SwiGLUConfig
from ttt_jax.models.mixers.attention import AttentionConfig
from ttt_jax.models.mixers.ttt_linear import TTTLinearConfig
from ttt_jax.models.residuals.mhc import MHCConfig
from ttt_jax.models.residuals.plain import PlainConfig
from ttt_jax.models.trunks.stacked import ScanTrunkConfig, UnrolledTrunkConfig
from ttt_jax.training import state as state_lib
from ttt_jax.training import step as step_lib

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
    ("model.mixer=lstm", "model.mixer.type: 'lstm' is not one of ["),
    ("model.mixer=atention", "; did you mean 'attention'?"),
    ("model.mixer=3", "model.mixer: expected a mechanism name or a mapping with 'type', got int 3"),
    ("model.mixer.type=3", "model.mixer.type: expected a string, got 3"),
    ("model.mixer.mini_batch=8", "unknown config key 'model.mixer.mini_batch'"),
    ("model.mixer.imp=cudnn",
     "unknown config key 'model.mixer.imp'; did you mean model.mixer.impl?"),
    (("model.mixer=ttt_linear", "model.mixer.mini_batch=0"), "model.mixer.mini_batch: must be > 0"),
    (("model.mixer=ttt_linear", "model.mixer.mini_batch=many"),
     "model.mixer.mini_batch: expected an integer, got 'many'"),
    ("model.trunk=loop", "model.trunk.type: 'loop' is not one of ['scan', 'unrolled']"),
    ("model.ffn.d_ff=0", "model.ffn.d_ff: must be > 0"),
    ("model.remat=sometimes", "model.remat: 'sometimes' is not one of ["),
    ("model.ttt_mini_batch=8", "model.ttt_mini_batch: moved to model.mixer.mini_batch"),
    ("model.scan_layers=false", "model.scan_layers: moved to model.trunk.type"),
    ("train.objective=cct", "train.objective: 'cct' needs model.mixer.type='cct', got 'attention'"),
    ("optim.name=adam", "optim.name: 'adam' is not one of"),
    ("train.steps=0", "train.steps: must be > 0"),
    ("model.n_heads=3", "model.n_heads: d_model=256 is not divisible"),
    ("model.d_model=100", "model.head_dim: RoPE needs an even head_dim, got 25"),
    ("model.head_dim=-4", "model.head_dim: must be >= 0"),
    ("model.n_kv_heads=-1", "model.n_kv_heads: must be >= 0"),
    (("model.residual=mhc", "model.residual.streams=1"),
     "model.residual.streams: mhc needs at least 2"),
    ("model.residual.streams=4", "unknown config key 'model.residual.streams'"),
    ("model.mixer.impl=cudnn", "model.mixer.impl: 'cudnn' is the fused kernel"),
    # cudnn is attention's own setting: the CCT mixer has no such key
    (("model.dtype=bfloat16", "model.mixer=cct", "model.mixer.impl=cudnn"),
     "unknown config key 'model.mixer.impl'"),
    (("model.mixer=cct", "data.step_boundaries=fixed", "data.step_len=16"),
     "data.step_len: fixed steps of 16 tokens differ from model.mixer.step_len=50"),
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
  cfg = load_config(None, ["model.mixer.impl=cudnn", "model.dtype=bfloat16"])
  assert cfg.model.mixer == AttentionConfig(impl="cudnn")
  cfg.model.mixer.check_platform("gpu")
  with pytest.raises(ConfigError, match="^model.mixer.impl: 'cudnn' needs GPU devices, these "
                                        "are tpu; set model.mixer.impl=xla$"):
    cfg.model.mixer.check_platform("tpu")
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  with pytest.raises(ConfigError, match="model.mixer.impl: 'cudnn' needs GPU devices, "
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
  walked = set()

  def walk(cls):
    walked.add(cls)
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
      slot = f.metadata.get("slot")
      if slot is not None:  # every mechanism that may fill the slot
        for _, mechanism in registry.SLOTS[slot].items():
          walk(mechanism.Config)
      elif dataclasses.is_dataclass(hints[f.name]):
        walk(hints[f.name])
  walk(Config)
  assert {TTTLinearConfig, MHCConfig, CCTConfig, SwiGLUConfig, UnrolledTrunkConfig} <= walked
  assert any(line.startswith("train.steps (int, default 1000)") for line in config_lib.describe())


def test_describe_lists_every_registered_mechanisms_fields():
  lines = config_lib.describe()
  assert len(lines) == len(set(lines))
  for slot in SLOTS:
    field = next(f for f in dataclasses.fields(ModelConfig) if f.name == slot)
    default = field.default_factory().type
    assert any(line.startswith(f"model.{slot} (section, default {default!r}; one of "
                               f"{registry.SLOTS[slot].names()}): ") for line in lines), slot
    for name, mechanism in registry.SLOTS[slot].items():
      docs = field_docs(mechanism.Config)
      for f in dataclasses.fields(mechanism.Config):
        if f.name == "type":
          continue
        prefix = f"model.{slot}.{f.name} [{name}] ("
        matching = [line for line in lines if line.startswith(prefix)]
        assert len(matching) == 1, (prefix, matching)
        assert matching[0].endswith(docs[f.name]), matching[0]
  assert "model.mixer.mini_batch [ttt_linear] (int, default 16): Inner mini-batch size b " \
         "(anchored mini-batch GD; the last mini-batch of a sequence may be shorter)." in lines
  assert any(line.startswith("model.residual.streams [mhc] (int, default 4): ") for line in lines)
  assert any(line.startswith("model.ffn.d_ff [swiglu] (int, default 688): ") for line in lines)
  assert not any(line.startswith("model.mixer.type ") for line in lines)


def test_configs_are_frozen():
  cfg = Config()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.train.steps = 3  # type: ignore[misc]


def _config_cli(capsys, *argv: str) -> str:
  """stdout of ``python -m ttt_jax.config ARGV`` (run in this process)."""
  config_main.main(list(argv))
  return capsys.readouterr().out


def test_config_command_prints_every_documented_field_by_section(capsys):
  out = _config_cli(capsys)
  blocks = out.split("\n\n")  # one block per top-level section, in the tree's order
  assert [block.split(".", 1)[0] for block in blocks] == [
      f.name for f in dataclasses.fields(Config)]
  lines = out.splitlines()
  steps = lines.index("train.steps (int, default 1000)")
  assert lines[steps + 1].startswith("    Total optimizer steps")
  documented = [line for line in lines if line and not line.startswith("    ")]
  assert len(documented) == len(config_lib.describe())


def test_config_command_section_is_one_section_or_model_slot(capsys):
  lines = _config_cli(capsys, "--section", "model.mixer").splitlines()
  keys = [line.split(" ", 1)[0] for line in lines if not line.startswith("    ")]
  assert keys[0] == "model.mixer" and all(k.startswith("model.mixer.") for k in keys[1:])
  assert "model.mixer.mini_batch [ttt_linear] (int, default 16)" in lines
  train = _config_cli(capsys, "--section", "train").splitlines()
  assert train[0].startswith("train.") and not any(line.startswith("model.") for line in train)
  with pytest.raises(SystemExit) as exit_info:
    config_main.main(["--section", "modle.mixer"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(
      "error: --section 'modle.mixer': no such config section or field (sections: model, "
      "data, optim, train, eval, ttt_eval, checkpoint, mesh, logging, quant, lora, sdft, gate); "
      "did you mean model.mixer")
  assert err.count("\n") == 1


def test_config_command_prints_the_resolved_config_as_yaml(capsys):
  path, overrides = str(REPO / "configs" / "ttt_linear_tiny.yaml"), ["model.mixer.mini_batch=8"]
  resolved = load_config(path, overrides)
  out = _config_cli(capsys, "--config", path, "--set", overrides[0])
  assert config_lib.from_dict(yaml.safe_load(out)) == resolved
  section = _config_cli(capsys, "--config", path, "--set", overrides[0], "--section", "model.mixer")
  assert yaml.safe_load(section) == {"model": {"mixer": config_lib.to_dict(resolved.model.mixer)}}
  assert section.splitlines()[:3] == ["model:", "  mixer:", "    type: ttt_linear"]


def test_train_print_config_prints_the_resolved_config_and_exits(capsys, tmp_path):
  path = str(REPO / "configs" / "quickstart.yaml")
  train_lib.main(["--config", path, "--print-config", "--set", "train.steps=3",
                  "--init-from", str(tmp_path / "source")])
  cfg = config_lib.from_dict(yaml.safe_load(capsys.readouterr().out))
  assert cfg == load_config(path, ["train.steps=3",
                                   f"checkpoint.init_from={tmp_path / 'source'}"])
  with pytest.raises(SystemExit) as exit_info:
    train_lib.main(["--config", path])
  assert exit_info.value.code == 2
  assert "the following arguments are required: --workdir" in capsys.readouterr().err


def test_train_help_points_to_the_config_documentation(capsys):
  with pytest.raises(SystemExit):
    train_lib.parse_args(["--help"])
  out = " ".join(capsys.readouterr().out.split())
  assert "python -m ttt_jax.config [--section model.mixer]" in out
  assert "--print-config" in out


@pytest.mark.slow
def test_config_module_runs_from_the_command_line():
  proc = subprocess.run([sys.executable, "-m", "ttt_jax.config", "--section", "eval"],
                        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines()[0] == "eval.batches (int, default 8)"


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


# ----------------------------------------------------------------------------- model sections


def test_set_chooses_a_mechanism_and_then_its_fields():
  cfg = load_config(None, ["model.mixer=ttt_linear", "model.mixer.mini_batch=8"])
  assert cfg.model.mixer == TTTLinearConfig(mini_batch=8)
  assert type(cfg.model.mixer) is TTTLinearConfig
  bare = load_config(None, ["model.mixer=ttt_linear"])
  assert bare.model.mixer == TTTLinearConfig()
  typed = load_config(None, ["model.mixer.type=ttt_linear", "model.mixer.backbone=transformer"])
  assert typed.model.mixer == TTTLinearConfig(backbone="transformer")
  assert load_config(None, ["model.residual=mhc", "model.residual.streams=2"]).model.residual == (
      MHCConfig(streams=2))
  assert load_config(None, ["model.trunk=unrolled"]).model.trunk == UnrolledTrunkConfig()
  assert load_config(None, ["model.ffn.d_ff=96"]).model.ffn == SwiGLUConfig(d_ff=96)
  defaults = Config().model
  assert (defaults.mixer, defaults.residual, defaults.trunk, defaults.ffn) == (
      AttentionConfig(), PlainConfig(), ScanTrunkConfig(), SwiGLUConfig())


def test_yaml_sections_and_set_overrides_of_them(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("model:\n  mixer: {type: ttt_linear, mini_batch: 4, base_lr: 0.5}\n"
                  "  residual: mhc\n")
  cfg = load_config(path, ["model.mixer.backbone=transformer", "model.residual.streams=3"])
  assert cfg.model.mixer == TTTLinearConfig(backbone="transformer", mini_batch=4, base_lr=0.5)
  assert cfg.model.residual == MHCConfig(streams=3)
  # another mechanism replaces the section; one of its fields on the old type is refused
  assert load_config(path, ["model.mixer=attention"]).model.mixer == AttentionConfig()
  with pytest.raises(ConfigError, match="^unknown config key 'model.mixer.mini_batch'$"):
    load_config(path, ["model.mixer.type=attention"])


def test_a_section_of_another_mechanism_is_refused_in_python():
  with pytest.raises(ConfigError, match=r"^model\.mixer\.type: 'mhc' is not one of \["):
    ModelConfig(mixer=MHCConfig())
  impostor = dataclasses.make_dataclass("Impostor", [("type", str, "attention")],
                                        bases=(Section,), frozen=True)
  with pytest.raises(ConfigError, match="model.mixer: a Impostor is not the config of the mixer "
                                        "'attention' \\(AttentionConfig\\)"):
    ModelConfig(mixer=impostor())


def test_compute_only_keys_come_from_the_sections():
  assert ModelConfig().compute_only_keys() == {"dtype", "remat", "mixer.impl", "trunk.type"}
  ttt = ModelConfig(mixer=TTTLinearConfig())
  assert ttt.compute_only_keys() == {"dtype", "remat", "mixer.remat_group", "trunk.type"}
  cct = ModelConfig(mixer=CCTConfig())  # summary slots size buffers, not params
  assert cct.compute_only_keys() == {"dtype", "remat", "mixer.max_steps", "trunk.type"}


OLD_MODELS = {
    "mhc_ttt_linear_tiny.yaml": {
        "mixer": "ttt_linear", "ttt_backbone": "mamba", "ttt_mini_batch": 16,
        "ttt_base_lr": 1.0, "residual": "mhc", "mhc_streams": 4, "remat": "mhc_streams",
        "n_layers": 2, "d_model": 128, "n_heads": 4, "d_ff": 384, "tie_embeddings": True},
    "cct_tier1_160m.yaml": {
        "mixer": "cct", "residual": "plain", "n_layers": 12, "d_model": 768, "n_heads": 12,
        "d_ff": 2048, "tie_embeddings": True, "dtype": "bfloat16", "remat": "dots_no_batch",
        "cct_d_summary": 16, "cct_d_bottleneck": 32, "cct_pool": "last", "cct_step_len": 50,
        "cct_max_steps": 12},
    "mhc_120m.yaml": {
        "mixer": "attention", "residual": "mhc", "mhc_streams": 4, "mhc_alpha_init": 0.01,
        "mhc_init": "seed", "mhc_sinkhorn_iters": 20, "mhc_sinkhorn_eps": 1.0e-6,
        "mhc_logit_clamp": 15.0, "n_layers": 12, "d_model": 768, "n_heads": 12, "head_dim": 64,
        "d_ff": 2048, "norm_eps": 1.0e-6, "tie_embeddings": True, "dtype": "bfloat16",
        "param_dtype": "float32", "remat": "mhc_streams"},
}
"""The ``model`` of shipped configs as written before model slots (flat, prefixed)."""

OLD_DEFAULT_DUMP = {
    "mixer": "attention", "residual": "plain", "n_layers": 4, "d_model": 256, "n_heads": 4,
    "n_kv_heads": 0, "head_dim": 0, "d_ff": 688, "rope_theta": 10000.0, "norm_eps": 1e-05,
    "tie_embeddings": False, "init_std": 0.02, "dtype": "float32", "param_dtype": "float32",
    "remat": "none", "attention_impl": "xla", "scan_layers": True, "mhc_streams": 4,
    "mhc_alpha_init": 0.01, "mhc_init": "seed", "mhc_sinkhorn_iters": 20,
    "mhc_sinkhorn_eps": 1e-06, "mhc_logit_clamp": 15.0, "ttt_backbone": "mamba",
    "ttt_mini_batch": 16, "ttt_base_lr": 1.0, "ttt_remat_group": 0, "ttt_conv_width": 4,
    "cct_d_summary": 16, "cct_d_bottleneck": 0, "cct_pool": "last", "cct_step_len": 50,
    "cct_max_steps": 0}
"""``to_dict(ModelConfig())`` before model slots: what a run directory's config.yaml held."""


@pytest.mark.parametrize("name", sorted(OLD_MODELS))
def test_upgrade_legacy_gives_the_migrated_yaml(name):
  migrated = yaml.safe_load((REPO / "configs" / name).read_text())["model"]
  upgraded = config_lib.upgrade_legacy(OLD_MODELS[name])
  assert not set(upgraded) & set(config_lib.LEGACY_MODEL_KEYS)
  expected = config_lib.model_from_dict(migrated)
  assert config_lib.from_dict({"model": upgraded}).model == expected
  assert config_lib.model_from_dict(OLD_MODELS[name]) == expected
  assert load_config(REPO / "configs" / name).model == expected
  assert config_lib.upgrade_legacy(migrated) is migrated  # the sectioned form is kept


def test_upgrade_legacy_of_a_full_dump_keeps_only_the_chosen_mechanisms_fields():
  upgraded = config_lib.upgrade_legacy(OLD_DEFAULT_DUMP)
  assert upgraded["mixer"] == {"type": "attention", "impl": "xla"}
  assert upgraded["residual"] == {"type": "plain"}
  assert upgraded["trunk"] == {"type": "scan"}
  assert upgraded["ffn"] == {"d_ff": 688}
  assert config_lib.model_from_dict(OLD_DEFAULT_DUMP) == ModelConfig()
  unrolled_ttt = {**OLD_DEFAULT_DUMP, "scan_layers": False, "mixer": "ttt_linear",
                  "ttt_mini_batch": 8, "ttt_remat_group": 2, "residual": "mhc", "mhc_streams": 3}
  assert config_lib.model_from_dict(unrolled_ttt) == ModelConfig(
      mixer=TTTLinearConfig(mini_batch=8, remat_group=2), residual=MHCConfig(streams=3),
      trunk=UnrolledTrunkConfig())


def test_legacy_run_config_loads_only_when_asked(tmp_path):
  """A run directory's config.yaml from before model slots is upgraded by
  ``legacy=True`` (resuming, generating); a user's config in that form is refused."""
  path = tmp_path / "config.yaml"
  path.write_text(yaml.safe_dump({"model": {**OLD_DEFAULT_DUMP, "mixer": "cct",
                                            "cct_step_len": 16},
                                  "train": {"objective": "cct"}}))
  cfg = load_config(path, ["model.mixer.max_steps=9"], legacy=True)
  assert cfg.model.mixer == CCTConfig(step_len=16, max_steps=9)
  with pytest.raises(ConfigError, match=r"^model\.attention_impl: moved to model\.mixer\.impl "
                                        r"\(each mechanism has its own section"):
    load_config(path)  # safe_dump sorts the keys: attention_impl is the first flat one


@pytest.mark.parametrize("old", sorted(config_lib.LEGACY_MODEL_KEYS))
def test_every_legacy_key_is_refused_naming_its_new_key(old, tmp_path):
  new = config_lib.LEGACY_MODEL_KEYS[old]
  path = tmp_path / "old.yaml"
  path.write_text(yaml.safe_dump({"model": {old: OLD_DEFAULT_DUMP[old]}}))
  with pytest.raises(ConfigError) as err:
    load_config(path)
  message = str(err.value)
  assert message.startswith(f"model.{old}: moved to model.{new} ("), message
  assert "\n" not in message
  with pytest.raises(ConfigError, match=f"^model.{old}: moved to model.{new} "):
    load_config(None, [f"model.{old}={OLD_DEFAULT_DUMP[old]}"])


def test_shipped_configs_are_in_the_sectioned_form():
  for path in sorted((REPO / "configs").glob("*.yaml")):
    model = yaml.safe_load(path.read_text()).get("model", {})
    assert not set(model) & set(config_lib.LEGACY_MODEL_KEYS), path.name
    assert config_lib.upgrade_legacy(model) is model, path.name


def test_naming_the_slots_own_mechanism_keeps_its_settings(tmp_path):
  """``--set model.mixer=NAME`` keeps the settings given for NAME (in the file or an
  earlier --set) and drops those of another mechanism."""
  path = tmp_path / "c.yaml"
  path.write_text("model:\n  mixer: {type: ttt_linear, mini_batch: 4}\n")
  assert load_config(path, ["model.mixer=ttt_linear"]).model.mixer == TTTLinearConfig(
      mini_batch=4)
  assert load_config(None, ["model.mixer.mini_batch=8", "model.mixer=ttt_linear"]
                     ).model.mixer == TTTLinearConfig(mini_batch=8)
  assert load_config(path, ["model.mixer=attention"]).model.mixer == AttentionConfig()


@pytest.mark.parametrize("field", ["lr", "adam_lr"])
@pytest.mark.parametrize("value", ["1e39", "1e11", ".inf", ".nan"])
def test_a_learning_rate_outside_float32s_useful_range_is_refused(field, value):
  with pytest.raises(ConfigError, match=rf"^optim\.{field}: must be"):
    load_config(None, [f"optim.{field}={value}"])
  assert getattr(load_config(None, [f"optim.{field}=1e10"]).optim, field) == 1e10


@pytest.mark.parametrize("text,key", [("model: 5\n", "model"), ("optim: [1]\n", "optim"),
                                      ("model:\n  mixer: 3\n", "model.mixer"),
                                      ("model:\n", "model")])
@pytest.mark.parametrize("overrides", [[], ["model.n_layers=2"], ["model.mixer.mini_batch=8"]])
def test_a_section_given_as_a_scalar_in_the_file_names_the_file(tmp_path, text, key, overrides):
  path = tmp_path / "x.yaml"
  path.write_text(text)
  with pytest.raises(ConfigError, match=rf"^{path}: {key}: expected a"):
    load_config(path, overrides)
