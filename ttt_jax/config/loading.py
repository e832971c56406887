"""Loading the config tree: YAML files, ``--set`` overrides, strict coercion, describe.

Loading is strict: an unknown key or a value of the wrong type raises ``ConfigError``
with a one-line message naming the dotted key and close matches. A model slot's section
(``schema.Section``) is built as the dataclass its ``type`` names in the slot's registry;
a bare string is that type with its defaults (``mixer: ttt_linear``).

Configs written before the model had slots kept every mechanism's settings as prefixed
fields of ``model`` (``ttt_mini_batch``, ``mhc_streams``, ...). ``LEGACY_MODEL_KEYS``
maps each to its section key: such a file is refused with one line naming the new key,
and ``upgrade_legacy`` rewrites the model of a run directory or checkpoint written then.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ttt_jax import registry
from ttt_jax.config.schema import SLOTS, Config, ModelConfig, Section, field_docs
from ttt_jax.errors import ConfigError

LEGACY_MODEL_KEYS = {
    "d_ff": "ffn.d_ff",
    "attention_impl": "mixer.impl",
    "scan_layers": "trunk.type",
    "mhc_streams": "residual.streams",
    "mhc_alpha_init": "residual.alpha_init",
    "mhc_init": "residual.init",
    "mhc_sinkhorn_iters": "residual.sinkhorn_iters",
    "mhc_sinkhorn_eps": "residual.sinkhorn_eps",
    "mhc_logit_clamp": "residual.logit_clamp",
    "ttt_backbone": "mixer.backbone",
    "ttt_mini_batch": "mixer.mini_batch",
    "ttt_base_lr": "mixer.base_lr",
    "ttt_remat_group": "mixer.remat_group",
    "ttt_conv_width": "mixer.conv_width",
    "cct_d_summary": "mixer.d_summary",
    "cct_d_bottleneck": "mixer.d_bottleneck",
    "cct_pool": "mixer.pool",
    "cct_step_len": "mixer.step_len",
    "cct_max_steps": "mixer.max_steps",
}
"""A flat ``model`` field of the configs before slots -> its key under ``model`` now."""


def upgrade_legacy(model: dict[str, Any]) -> dict[str, Any]:
  """A ``model`` mapping in the flat form -> the same model in sections (a mapping
  already in sections is returned unchanged). A flat field is kept only where the
  slot's mechanism has it (``ttt_mini_batch`` of an attention model is dropped, as it
  meant nothing there); ``scan_layers`` becomes the trunk's type."""
  if not any(key in LEGACY_MODEL_KEYS for key in model):
    return model
  upgraded = {k: v for k, v in model.items() if k not in LEGACY_MODEL_KEYS}
  sections = {slot: ({"type": upgraded.pop(slot)} if isinstance(upgraded.get(slot), str)
                     else dict(upgraded.pop(slot, {}))) for slot in SLOTS}
  if "scan_layers" in model:
    sections["trunk"]["type"] = "scan" if model["scan_layers"] else "unrolled"
  for old, new in LEGACY_MODEL_KEYS.items():
    slot, name = new.split(".")
    if old not in model or name == "type":
      continue
    default = default_type(slot)
    fields = {f.name for f in dataclasses.fields(
        registry.SLOTS[slot].get(sections[slot].get("type", default)).Config)}
    if name in fields:
      sections[slot][name] = model[old]
  upgraded.update({slot: section for slot, section in sections.items() if section})
  return upgraded


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested mapping -> {'a.b': leaf}."""
  flat = {}
  for key, value in values.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def model_from_dict(values: dict[str, Any]) -> ModelConfig:
  """The ``ModelConfig`` of a mapping in either form (``upgrade_legacy``), with the
  defaults of today for the fields it lacks."""
  return _build(ModelConfig, upgrade_legacy(values), "model")


def default_type(slot: str) -> str:
  """The mechanism a ``ModelConfig`` puts in ``slot`` when the config names none."""
  field = next(f for f in dataclasses.fields(ModelConfig) if f.name == slot)
  return field.default_factory().type




def _type_name(tp: Any) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, tp: Any, value: Any, slot: str | None = None) -> Any:
  """Checks ``value`` against annotation ``tp``; returns it converted (lists -> tuples).
  ``slot``: the field is that model slot's section."""
  origin = typing.get_origin(tp)
  if slot is not None:
    return _build_section(key, slot, value)
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, dict):
      raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return _build(tp, value, key)
  if origin in (typing.Union, types.UnionType):
    errors = []
    for arg in typing.get_args(tp):
      if arg is type(None):
        if value is None:
          return None
        continue
      try:
        return _coerce(key, arg, value)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{key}: expected {_type_name(tp)}")
  if origin is Literal:
    if value not in typing.get_args(tp):
      raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
    return value
  if origin is tuple:
    args = typing.get_args(tp)
    if isinstance(value, str) and args[-1] is Ellipsis:
      value = [value]  # a single string for a list-of-strings field
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
    if args[-1] is Ellipsis:
      return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
    if len(value) != len(args):
      raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
    return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise ConfigError(f"{key}: expected true/false, got {value!r}")
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
      try:
        return float(value)
      except ValueError:
        pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")
  if tp is str:
    if isinstance(value, str):
      return value
    raise ConfigError(f"{key}: expected a string, got {value!r}")
  raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _build_section(key: str, slot: str, value: Any) -> Section:
  """The section of model slot ``slot``: the config class its ``type`` names (the
  slot's default when absent), built from the other keys."""
  if isinstance(value, str):
    value = {"type": value}
  if not isinstance(value, dict):
    raise ConfigError(f"{key}: expected a mechanism name or a mapping with 'type', got "
                      f"{type(value).__name__} {value!r}")
  name = value.get("type", default_type(slot))
  if not isinstance(name, str):
    raise ConfigError(f"{key}.type: expected a string, got {name!r}")
  return _build(registry.SLOTS[slot].get(name).Config, {**value, "type": name}, key)


def _build(cls: type, values: dict, prefix: str = "") -> Any:
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for name, value in values.items():
    key = f"{prefix}.{name}" if prefix else str(name)
    if name not in fields:
      if prefix == "model" and name in LEGACY_MODEL_KEYS:
        raise ConfigError(f"{key}: moved to model.{LEGACY_MODEL_KEYS[name]} (each mechanism "
                          f"has its own section, e.g. model.mixer: {{type: ttt_linear, "
                          f"mini_batch: 16}})")
      close = difflib.get_close_matches(str(name), list(fields), n=3, cutoff=0.6)
      dot = f"{prefix}." if prefix else ""
      hint = f"; did you mean {', '.join(dot + c for c in close)}?" if close else ""
      raise ConfigError(f"unknown config key '{key}'{hint}")
    kwargs[name] = _coerce(key, hints[name], value, fields[name].metadata.get("slot"))
  try:
    return cls(**kwargs)
  except TypeError as e:  # pragma: no cover - dataclass signature mismatch
    raise ConfigError(f"{prefix or 'config'}: {e}") from None


def _check_sections(path: Path, values: dict, cls: type = Config, prefix: str = "") -> None:
  """A ConfigError naming the file and key where ``path`` gives a section (a config
  dataclass, or a model slot) as something other than a mapping (a slot: or a name),
  before ``--set`` overrides are applied to it and would misreport it as theirs."""
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if f.name not in values:
      continue
    value, key = values[f.name], f"{prefix}{f.name}"
    if f.metadata.get("slot") is not None:
      if not isinstance(value, (dict, str)):
        raise ConfigError(f"{path}: {key}: expected a mechanism name or a mapping with "
                          f"'type', got {type(value).__name__} {value!r}")
    elif dataclasses.is_dataclass(hints[f.name]):
      if not isinstance(value, dict):
        raise ConfigError(f"{path}: {key}: expected a mapping, got "
                          f"{type(value).__name__} {value!r}")
      _check_sections(path, value, hints[f.name], key + ".")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
  parts = dotted.split(".")
  node = tree
  for part in parts[:-1]:
    child = node.setdefault(part, {})
    if isinstance(child, str) and part in SLOTS:  # a bare mechanism name
      child = node[part] = {"type": child}
    if not isinstance(child, dict):
      raise ConfigError(f"--set {dotted}: '{part}' is not a section")
    node = child
  name, current = parts[-1], node.get(parts[-1])
  if (parts[:-1] == ["model"] and name in SLOTS and isinstance(value, str)
      and isinstance(current, dict) and current.get("type", value) == value):
    # naming the slot's own mechanism keeps the settings already given for it
    node[name] = {**current, "type": value}
    return
  node[name] = value


def parse_override(text: str) -> tuple[str, Any]:
  """Splits ``a.b=value``; the value is parsed as a YAML scalar/list."""
  if "=" not in text:
    raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=100")
  key, raw = text.split("=", 1)
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError:
    value = raw
  return key.strip(), value


def to_dict(cfg: Any) -> Any:
  """Config -> plain dict/list/scalars (tuples become lists)."""
  if dataclasses.is_dataclass(cfg):
    return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
  if isinstance(cfg, tuple):
    return [to_dict(v) for v in cfg]
  return cfg


def from_dict(values: dict) -> Config:
  if not isinstance(values, dict):
    raise ConfigError(f"config: expected a mapping at the top level, got {type(values).__name__}")
  return _build(Config, values)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (), *,
                legacy: bool = False) -> Config:
  """Reads a YAML file (optional), applies ``a.b=value`` overrides, validates.
  ``legacy``: the file may be a run directory's config written before model slots
  (``upgrade_legacy``); a user's config in that form is refused, naming the new key."""
  values: dict = {}
  if path is not None:
    path = Path(path)
    try:
      text = path.read_text()
    except OSError as e:
      raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    except UnicodeDecodeError as e:
      raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason})") from None
    try:
      loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
      line = getattr(getattr(e, "problem_mark", None), "line", None)
      where = f" line {line + 1}" if line is not None else ""
      raise ConfigError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    if loaded is not None and not isinstance(loaded, dict):
      raise ConfigError(f"{path}: expected a mapping at the top level")
    values = loaded or {}
    _check_sections(path, values)
    if legacy and isinstance(values.get("model"), dict):
      values["model"] = upgrade_legacy(values["model"])
  for override in overrides:
    key, value = parse_override(override)
    _set_dotted(values, key, value)
  return from_dict(values)


def to_yaml(cfg: Any) -> str:
  """A config (or a section of one) as YAML in field order: what ``save_config`` writes."""
  return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
  """Writes ``cfg`` as YAML, atomically (a crash never leaves a half-written file)."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(to_yaml(cfg))
  os.replace(tmp, path)


def config_hash(cfg: Any) -> str:
  """Stable short hash of a (sub)config, for checkpoint metadata and caches."""
  blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def describe(cls: type = Config, prefix: str = "") -> list[str]:
  """Lines 'key (type, default): doc' for every field, recursively; a model slot lists
  every registered mechanism's fields as 'model.<slot>.<field> [<type>]'."""
  lines = []
  docs = field_docs(cls)
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    key = f"{prefix}{f.name}"
    slot = f.metadata.get("slot")
    if slot is not None:
      lines.append(f"{key} (section, default {f.default_factory().type!r}; one of "
                   f"{registry.SLOTS[slot].names()}): {docs.get(f.name, '')}")
      for name, mechanism in registry.SLOTS[slot].items():
        lines.extend(line.replace(" (", f" [{name}] (", 1)
                     for line in describe(mechanism.Config, key + ".")
                     if not line.startswith(f"{key}.type "))
    elif dataclasses.is_dataclass(hints[f.name]):
      lines.extend(describe(hints[f.name], key + "."))
    else:
      default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
      lines.append(f"{key} ({_type_name(hints[f.name])}, default {to_dict(default)!r}): "
                   f"{docs.get(f.name, '')}")
  return lines


def describe_section(section: str) -> list[str]:
  """The ``describe()`` lines of one section (``train``), model slot (``model.mixer``) or
  field (``train.steps``): those whose dotted key is ``section`` or lies under it. An
  unknown name is a ConfigError listing the sections and close matches."""
  lines = describe()
  keys = [line.split(" ", 1)[0] for line in lines]
  chosen = [line for line, key in zip(lines, keys)
            if key == section or key.startswith(section + ".")]
  if not chosen:
    names = sorted({".".join(key.split(".")[:depth]) for key in keys
                    for depth in range(1, key.count(".") + 2)})
    close = difflib.get_close_matches(section, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    sections = ", ".join(f.name for f in dataclasses.fields(Config))
    raise ConfigError(f"--section {section!r}: no such config section or field (sections: "
                      f"{sections}){hint}")
  return chosen
