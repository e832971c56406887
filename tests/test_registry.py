"""Registries (ttt_jax/registry.py): registration, lookup errors that name the config
key, and the lazy import of the built-in mechanisms."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ttt_jax import registry
from ttt_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_register_as_decorator_and_with_an_entry():
  reg = registry.Registry("widget", "model.widget.type")

  @reg.register("round")
  class Round:
    pass

  assert reg.get("round") is Round
  assert reg.register("none", None) is None
  assert reg.get("none") is None  # an entry may be None (remat 'none')
  reg.register("round", Round)  # the same entry again (a module imported twice) is fine
  assert reg.names() == ["none", "round"]
  assert "round" in reg and "square" not in reg
  assert list(reg.items()) == [("none", None), ("round", Round)]


def test_a_duplicate_registration_raises():
  reg = registry.Registry("widget", "model.widget.type")
  reg.register("round", object())
  with pytest.raises(ValueError, match="widget 'round' is registered twice"):
    reg.register("round", object())
  with pytest.raises(ValueError, match="registered twice"):
    reg.register("round")(type("Other", (), {}))
  with pytest.raises(ValueError, match="mixer 'attention' is registered twice"):
    registry.MIXERS.register("attention", type("Impostor", (), {}))


def test_unknown_name_is_a_config_error_naming_the_key_and_the_choices():
  reg = registry.Registry("widget", "model.widget.type")
  reg.register("square", 1)
  reg.register("circle", 2)
  with pytest.raises(ConfigError) as raised:
    reg.get("circel")
  message = str(raised.value)
  assert message == ("model.widget.type: 'circel' is not one of ['circle', 'square']; "
                     "did you mean 'circle'?")
  with pytest.raises(ConfigError) as raised:
    reg.get("hexagon")
  assert str(raised.value) == "model.widget.type: 'hexagon' is not one of ['circle', 'square']"


def test_builtin_registries_name_their_config_keys():
  with pytest.raises(ConfigError, match=r"^model\.mixer\.type: 'tt_linear' is not one of "
                                        r"\[.*'ttt_linear'.*\]; did you mean 'ttt_linear'\?$"):
    registry.MIXERS.get("tt_linear")
  with pytest.raises(ConfigError, match=r"^train\.objective: 'lml' is not one of \['cct', "
                                        r"'lm', 'sdft'\]; did you mean 'lm'\?$"):
    registry.OBJECTIVES.get("lml")
  assert registry.SLOTS["residual"] is registry.RESIDUALS
  for slot, reg in registry.SLOTS.items():
    assert reg.key == f"model.{slot}.type"


def test_builtins_load_lazily_on_the_first_lookup():
  """A fresh interpreter that imports only the registry sees no mechanism until its
  first lookup, which imports the catalog and with it every built-in choice."""
  script = textwrap.dedent("""
      import sys
      from ttt_jax import registry
      assert registry.BUILTINS not in sys.modules, "catalog imported eagerly"
      assert "ttt_jax.models.mixers.attention" not in sys.modules
      assert "ttt_jax.cct.mixer" not in sys.modules
      names = registry.MIXERS.names()
      assert registry.BUILTINS in sys.modules
      print(names)
      print(registry.RESIDUALS.names(), registry.FFNS.names(), registry.TRUNKS.names(),
            registry.EMBEDDINGS.names(), registry.HEADS.names())
      print(registry.OBJECTIVES.names(), registry.REMAT_POLICIES.names())
      print(registry.LOGICAL_AXES.get("streams").vector,
            registry.LOGICAL_AXES.get("streams").shardable)
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          check=False)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == "['attention', 'cct', 'ttt_linear']"
  assert lines[1] == ("['mhc', 'plain'] ['swiglu'] ['scan', 'unrolled'] ['token'] "
                      "['linear']")
  assert lines[2] == ("['cct', 'lm', 'sdft'] ['dots', 'dots_no_batch', 'full', 'mhc_streams', "
                      "'none', 'save_qkv_proj']")
  assert lines[3] == "True False"
