"""The train state and its sharded initialisation.

``TrainState(step, params, opt_state, extras)`` is one pytree: the jitted step takes and
returns it, checkpoints save and restore it, and every leaf has a sharding on the mesh.
``extras`` maps a name to an extra tree a mechanism keeps beside the params (EMA
weights, a frozen teacher, adapter params); it is empty unless one adds a tree, and is
checkpointed and sharded like the rest.

With ``lora.enabled`` the params are the adapters (``ttt_jax.lora``: what trains and
what the optimizer state mirrors) and the model's own params are the frozen base, the
extra tree ``lora.BASE``; ``extras_init`` still sees the model's params.

The state is never materialised whole on one device: ``abstract_state`` gives its
shapes and shardings from ``eval_shape``, and ``build`` runs the initialisation jitted
with those shardings as ``out_shardings``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ttt_jax import lora, sharding
from ttt_jax.config import SLOTS, Config
from ttt_jax.models import lm
from ttt_jax.training import optim


class TrainState(NamedTuple):
  step: jax.Array
  """int32 scalar: micro-batches trained on (optimizer steps x grad_accum_steps)."""
  params: nnx.State
  opt_state: optax.OptState
  extras: dict[str, Any] = {}
  """Extra trees by name (EMA weights, a teacher, adapters); ``{}`` by default. Never
  mutated in place: a step returns a new dict."""


ExtrasShardings = Mapping[str, Any] | Callable[[Any], Mapping[str, Any]]
"""Shardings of the extra trees by name, or a function of the params' shardings that
gives them (an EMA or a teacher is sharded like the params)."""


@dataclasses.dataclass
class Built:
  """Everything a run needs, made once from the config."""
  cfg: Config
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  state: TrainState
  state_shardings: Any
  vocab_size: int


def model_fn(cfg: Config, vocab_size: int) -> Callable[[], lm.LM]:
  return lambda: lm.LM(cfg.model, vocab_size, rngs=nnx.Rngs(cfg.train.seed))


def adapter_key(cfg: Config) -> jax.Array:
  """The key of the adapters' initial A (``lora.init``)."""
  return jax.random.fold_in(jax.random.key(cfg.train.seed), 1)


def check_platform(cfg: Config, mesh: jax.sharding.Mesh) -> None:
  """Model options that only exist on some platforms fail here, naming the field."""
  platform = mesh.devices.flat[0].platform
  for slot in SLOTS:
    getattr(cfg.model, slot).check_platform(platform)


def abstract_state(cfg: Config, vocab_size: int, mesh: jax.sharding.Mesh,
                   extras: Mapping[str, Any] | None = None,
                   extras_shardings: ExtrasShardings | None = None):
  """(graphdef, optimizer, abstract state, state shardings), without allocating.

  ``extras``: the abstract values (``ShapeDtypeStruct`` trees) of the state's extra
  trees, ``extras_shardings`` their shardings (the same names). With ``lora.enabled``
  the params are the adapters and the base is the extra tree ``lora.BASE``."""
  check_platform(cfg, mesh)
  graphdef, abstract_params = nnx.split(nnx.eval_shape(model_fn(cfg, vocab_size)))
  logical_axes = nnx.get_partition_spec(abstract_params)
  param_shardings = sharding.param_shardings(abstract_params, logical_axes, mesh, cfg.mesh)
  optim_cfg = cfg.optim
  if cfg.lora.enabled:  # the base becomes an extra tree, the adapters the params
    targets = lora.find_targets(cfg.lora, abstract_params)
    base, base_shardings = abstract_params, param_shardings
    abstract_params = jax.eval_shape(lambda: lora.init(cfg.lora, targets, adapter_key(cfg)))
    logical_axes = lora.logical_axes(targets)
    param_shardings = sharding.param_shardings(abstract_params, logical_axes, mesh, cfg.mesh)
    optim_cfg = lora.optimizer_config(cfg.optim)
  tx = optim.build_optimizer(optim_cfg, cfg.train.steps, logical_axes)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = sharding.replicated(mesh)
  opt_shardings = optim.opt_state_shardings(tx, abstract_opt, param_shardings, replicated)
  if callable(extras_shardings):
    extras_shardings = extras_shardings(param_shardings)
  extras, extras_shardings = dict(extras or {}), dict(extras_shardings or {})
  if cfg.lora.enabled:
    extras[lora.BASE], extras_shardings[lora.BASE] = base, base_shardings
  if set(extras) != set(extras_shardings):
    raise ValueError(f"extra trees {sorted(extras)} and their shardings "
                     f"{sorted(extras_shardings)} name different trees")
  shardings = TrainState(replicated, param_shardings, opt_shardings, extras_shardings)
  abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract_params, abstract_opt,
                        extras)
  return graphdef, tx, abstract, shardings


def abstract_extras(cfg: Config, vocab_size: int,
                    extras_init: Callable[[nnx.State], dict[str, Any]] | None
                    ) -> dict[str, Any] | None:
  """The shapes of ``extras_init``'s extra trees (None without one), for
  ``abstract_state``."""
  if extras_init is None:
    return None
  return jax.eval_shape(lambda: extras_init(nnx.state(model_fn(cfg, vocab_size)())))


def build(cfg: Config, vocab_size: int, mesh: jax.sharding.Mesh,
          extras_init: Callable[[nnx.State], dict[str, Any]] | None = None,
          extras_shardings: ExtrasShardings | None = None) -> Built:
  """Initialises the train state directly into its shardings (never whole on one device).

  ``extras_init(params)`` gives the extra trees from the freshly initialised params,
  inside the same jitted init; ``extras_shardings`` as for ``abstract_state``."""
  make = model_fn(cfg, vocab_size)
  extras = abstract_extras(cfg, vocab_size, extras_init)
  graphdef, tx, _, shardings = abstract_state(cfg, vocab_size, mesh, extras, extras_shardings)

  def init() -> TrainState:
    params = nnx.state(make())
    extras = extras_init(params) if extras_init is not None else {}
    if cfg.lora.enabled:
      targets = lora.find_targets(cfg.lora, params)
      params, extras = lora.init(cfg.lora, targets, adapter_key(cfg)), {**extras,
                                                                        lora.BASE: params}
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), extras)

  state = jax.jit(init, out_shardings=shardings)()
  return Built(cfg, mesh, graphdef, tx, state, shardings, vocab_size)
