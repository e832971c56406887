"""Registries: every named choice a config makes, filled by the mechanisms themselves.

A mechanism module registers what it adds where it defines it::

    @registry.MIXERS.register("ttt_linear")
    class TTTLinear(nnx.Module):
      Config = TTTLinearConfig     # the dataclass of its ``model.mixer`` section
      ...

and the core looks the name up (``registry.MIXERS.get(cfg.model.mixer.type)``) without
importing the mechanism. The core therefore never imports a mechanism package: the
built-in mechanisms are imported, for their registrations, by ``ttt_jax.catalog``,
which the first lookup loads (a plugin import by name, like a package entry point), so
a program that only builds a config still sees every built-in choice. A third-party
mechanism registers the same way from its own module, imported before the config is
loaded.

Registries of this package:

| registry | key in the config | entry |
|---|---|---|
| EMBEDDINGS, MIXERS, RESIDUALS, FFNS, TRUNKS, HEADS | ``model.<slot>.type`` | an ``nnx.Module`` class with a ``Config`` section dataclass (``models/lm.py`` gives each slot's interface) |
| REMAT_POLICIES | ``model.remat`` | a ``jax.checkpoint`` policy (None: save nothing) |
| LOGICAL_AXES | parameter axis names | ``AxisInfo``: its optimizer group and whether it may be sharded |
| OBJECTIVES | ``train.objective`` | ``ObjectiveEntry``: builder of the step's loss, and a cross-config check |
| BATCH_FIELDS | (per-token batch fields) | factory ``(cfg, tokenizer) -> annotator or None`` |
| DECODE_INPUTS | (per-token decode inputs) | ``ttt_jax.inference.sampling.DecodeInputs`` class |
| EVAL_TASKS | ``evaluate --task`` | ``ttt_jax.eval.tasks.EvalTask`` |
| BENCHES | ``bench <subject>`` | ``ttt_jax.bench.common.Bench`` |
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, Callable, Generic, Iterator, TypeVar

from ttt_jax.errors import ConfigError

BUILTINS = "ttt_jax.catalog"
"""The module whose import registers every built-in mechanism."""

T = TypeVar("T")
_DECORATE = object()


def load_builtins() -> None:
  """Imports ``BUILTINS`` once (a no-op afterwards, and while it is being imported)."""
  importlib.import_module(BUILTINS)


class Registry(Generic[T]):
  """Name -> entry, for one kind of choice. ``key`` names the config field that
  chooses, for error messages (e.g. 'model.mixer.type')."""

  def __init__(self, kind: str, key: str):
    self.kind, self.key = kind, key
    self._entries: dict[str, T] = {}

  def register(self, name: str, entry: Any = _DECORATE) -> Any:
    """Registers ``entry`` (which may be None) under ``name``; without ``entry``, a
    decorator that registers what it decorates. A name is registered once."""
    def add(value: T) -> T:
      if name in self._entries and self._entries[name] is not value:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = value
      return value

    return add if entry is _DECORATE else add(entry)

  def get(self, name: str) -> T:
    """The entry of ``name``; a ``ConfigError`` naming ``key`` and the choices if none."""
    if name not in self._entries:
      load_builtins()
    if name not in self._entries:
      close = difflib.get_close_matches(str(name), list(self._entries), n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"{self.key}: {name!r} is not one of {self.names()}{hint}")
    return self._entries[name]

  def names(self) -> list[str]:
    load_builtins()
    return sorted(self._entries)

  def items(self) -> Iterator[tuple[str, T]]:
    load_builtins()
    return iter(sorted(self._entries.items()))

  def __contains__(self, name: str) -> bool:
    load_builtins()
    return name in self._entries


@dataclasses.dataclass(frozen=True)
class AxisInfo:
  """What a logical axis name means to the optimizer and the mesh."""
  doc: str
  """What the axis indexes."""
  vector: bool = False
  """A parameter with this axis is never a hidden matrix (Muon routes it to AdamW)."""
  shardable: bool = True
  """False: no mesh rule may map it (``mesh.rules`` refuses it)."""


@dataclasses.dataclass(frozen=True)
class ObjectiveEntry:
  """A training objective: ``build(cfg)`` gives the step's loss function
  (``ttt_jax.training.objectives.Objective``); ``check(cfg)`` raises ``ConfigError``
  where the rest of the config cannot serve it; ``extras(cfg)`` gives ``(extras_init,
  extras_shardings)`` (``training.state.build``'s) of the extra trees it keeps in the
  train state, which every program building or restoring such a run's state adds;
  ``after_update(cfg)`` gives None or ``(extras, params) -> {name: tree}``, the extra
  trees the step replaces after each optimizer update from the new params (a teacher's
  EMA)."""
  build: Callable[[Any], Callable]
  check: Callable[[Any], None] | None = None
  after_update: Callable[[Any], Callable | None] | None = None
  extras: Callable[[Any], tuple[Callable, Any]] | None = None


SLOTS: dict[str, Registry[type]] = {
    slot: Registry(slot, f"model.{slot}.type")
    for slot in ("embedding", "mixer", "residual", "ffn", "trunk", "head")}
"""The model's slots, by their section name under ``model``."""
EMBEDDINGS, MIXERS, RESIDUALS = SLOTS["embedding"], SLOTS["mixer"], SLOTS["residual"]
FFNS, TRUNKS, HEADS = SLOTS["ffn"], SLOTS["trunk"], SLOTS["head"]

REMAT_POLICIES: Registry[Callable | None] = Registry("remat policy", "model.remat")
LOGICAL_AXES: Registry[AxisInfo] = Registry("logical axis", "parameter axis")
OBJECTIVES: Registry[ObjectiveEntry] = Registry("objective", "train.objective")
BATCH_FIELDS: Registry[Callable] = Registry("batch field", "batch field")
DECODE_INPUTS: Registry[type] = Registry("decode input", "decode input")
EVAL_TASKS: Registry[Any] = Registry("evaluation task", "--task")
BENCHES: Registry[Any] = Registry("bench", "bench subject")
