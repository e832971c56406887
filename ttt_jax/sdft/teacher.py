"""The SDFT teacher: an exponential moving average of the student, kept in the train state.

The teacher is the train state's extra tree ``TEACHER``, shaped like the params (with
``lora.enabled``: like the adapters, on the same frozen base ``lora.BASE``), in float32
whatever the params' dtype, sharded like the params and checkpointed with them, so a
resumed run continues it bit-exactly. With decay d (``sdft.teacher_decay``):

  t_0 = theta_0 (the params the run starts from: ``restart``)
  t_k = d t_{k-1} + (1 - d) theta_k    after optimizer step k, from its new params
        (``averaging.ema_step``: t + (1 - d) (theta - t))

It is updated by the train step after the optimizer's update (``follow``, the sdft
objective's ``ObjectiveEntry.after_update``), never differentiated: the objective reads
it under ``stop_gradient`` (``model``). d = 1 leaves it untouched, so the teacher stays
bitwise the initial model.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax import lora
from ttt_jax.config import Config
from ttt_jax.training import averaging
from ttt_jax.training.state import TrainState, adapter_key

TEACHER = "sdft_teacher"
"""The train state's extra tree holding the teacher (float32, params- or adapter-shaped)."""


def as_float32(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def extras_init(cfg: Config) -> Callable[[nnx.State], dict[str, Any]]:
  """``state.build``'s ``extras_init``: the teacher from the freshly initialised model
  params (with ``lora.enabled``, from the adapters ``state.build`` initialises on them)."""
  def init(params: nnx.State) -> dict[str, Any]:
    if cfg.lora.enabled:
      params = lora.init(cfg.lora, lora.find_targets(cfg.lora, params), adapter_key(cfg))
    return {TEACHER: as_float32(params)}

  return init


def extras_shardings(param_shardings: Any) -> dict[str, Any]:
  """``state.build``'s ``extras_shardings``: the teacher is sharded like the params."""
  return {TEACHER: param_shardings}


def restart(state: TrainState, shardings: Any) -> TrainState:
  """``state`` with the teacher set to its params: t_0 of a run that starts fresh or from
  another run's params (``checkpoint.init_from`` replaces them after the init). The copy
  is new buffers in the teacher's ``shardings``: the step donates the state."""
  teacher = jax.jit(as_float32, out_shardings=shardings)(state.params)
  return state._replace(extras={**state.extras, TEACHER: teacher})


def follow(decay: float) -> Callable[[Mapping[str, Any], Any], dict[str, Any]] | None:
  """The teacher's update after an optimizer step: ``(extras, new params) -> {TEACHER:
  t_k}``; None for decay 1 (a frozen teacher)."""
  if decay >= 1.0:
    return None

  def update(extras: Mapping[str, Any], params: Any) -> dict[str, Any]:
    return {TEACHER: averaging.ema_step(extras[TEACHER], params, decay)}

  return update


def model(cfg: Config, student: nnx.Module, extras: Mapping[str, Any]) -> nnx.Module:
  """The teacher as a model like ``student`` (the LM merged from the current params):
  the EMA params cast to the student's dtypes, or with ``lora.enabled`` the EMA adapters
  folded into the frozen base; under ``stop_gradient``."""
  graphdef, student_params = nnx.split(student)
  teacher = jax.lax.stop_gradient(extras[TEACHER])
  if cfg.lora.enabled:
    params = lora.merge(jax.lax.stop_gradient(extras[lora.BASE]), teacher, cfg.lora)
  else:
    params = jax.tree.map(lambda t, s: t.astype(s.dtype), teacher, student_params)
  return nnx.merge(graphdef, params)
