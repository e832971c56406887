"""The train and eval steps, and their compilation.

The train step is pure, ``(state, batch) -> (state, metrics)``, on one micro-batch:

  (loss, aux), g = value_and_grad(objective)(params; model, batch, StepContext(step, rng, extras))
  params, opt_state = tx.update(g, ...)      (optax.MultiSteps applies every accum-th call)

with ``step = state.step // grad_accum_steps`` (the optimizer step) and
``rng = fold_in(key(train.seed), state.step)``. The objective is ``train.objective``'s
unless the caller passes its own. The eval step sums the next-token NLL, the tokens and
their bytes of a batch (``objectives.batch_logits``), for loss, perplexity and bits per
byte. ``compile_step`` AOT-compiles a jitted step and reports its compiled memory.

Every step also reports ``finite_state``: whether the params and optimizer state it
returns are all finite (``all_finite``, one fused reduction on device), which the
loop's NaN guard and checkpoint hook read before anything saves that state. With
``train.nonfinite='skip'`` a step whose loss, gradient norm or updated state is
non-finite returns the old params and optimizer state (``jnp.where`` over the tree),
and counts itself in the state's extra tree ``skipped_steps``.

An objective's ``after_update`` (``ObjectiveEntry``) replaces extra trees that follow
the params, ``extras[k] = after_update(extras, params)[k]`` from the params the update
produced, once per applied optimizer update (the last micro-step of an accumulation,
and not on a step ``train.nonfinite='skip'`` dropped): an EMA teacher.

Late QAT (``quant.qat_lr_ratio`` > 0): the model is merged from ``quant.qat_transform``'s
params, the matrices fake-quantized once the lr falls under the ratio (a traced switch,
no recompilation), and the step reports it as ``qat_active``.

LoRA (``lora.enabled``): the state's params are the adapters and the model is merged
from ``lora.merge(extras[lora.BASE], adapters)`` (before QAT's transform), so only the
adapters get gradients and updates; ``model_params`` gives that merge for evaluation.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ttt_jax import lora, quant, sharding
from ttt_jax.config import Config
from ttt_jax.models import lm
from ttt_jax.training import objectives
from ttt_jax.training.objectives import Objective, StepContext
from ttt_jax.training.state import Built, TrainState


FINITE_STATE = "finite_state"
"""The step's metric: 1.0 if the params and optimizer state it returns are all finite."""
SKIPPED = "skipped_steps"
"""With ``train.nonfinite='skip'``: the state's extra tree (an int32 scalar) and the
step's metric counting the steps whose update was dropped as non-finite."""


def all_finite(tree: Any) -> jax.Array:
  """A bool scalar: every floating-point element of ``tree`` is finite. One reduction
  per leaf combined into one scalar, all inside the caller's jit, so the host reads one
  value, not one per array."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def skip_extras(cfg: Config) -> dict[str, jax.Array] | None:
  """The extra trees ``train.nonfinite='skip'`` adds to the state (its counter), for
  ``state.build``'s ``extras_init``; None otherwise."""
  if cfg.train.nonfinite != "skip":
    return None
  return {SKIPPED: jnp.zeros((), jnp.int32)}


def make_train_step(cfg: Config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    objective: Objective | None = None,
                    after_update: objectives.ExtrasUpdate | None = None):
  """The pure step on one micro-batch: ``(state, batch) -> (state, metrics)``.
  ``objective``: the loss to differentiate (default: ``train.objective``'s);
  ``after_update``: the extra trees that follow the params (default:
  ``train.objective``'s ``after_update``, if any)."""
  objective = objective if objective is not None else objectives.build(cfg)
  if after_update is None:
    after_update = objectives.build_after_update(cfg)
  accum = cfg.optim.grad_accum_steps
  skip_nonfinite = cfg.train.nonfinite == "skip"
  base_key = jax.random.key(cfg.train.seed)
  qat = quant.qat_transform(cfg)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    ctx = StepContext(state.step // accum, jax.random.fold_in(base_key, state.step),
                      state.extras)

    def loss_fn(params):
      if cfg.lora.enabled:  # the adapters folded into the frozen base
        params = lora.merge(ctx.extras[lora.BASE], params, cfg.lora)
      qat_metrics = {}
      if qat is not None:  # the matrices fake-quantized once past the switch step
        params, qat_on = qat(params, ctx.step)
        qat_metrics = {quant.QAT_METRIC: qat_on.astype(jnp.float32)}
      loss, aux = objective(nnx.merge(graphdef, params), batch, ctx)
      return loss, {**aux, **qat_metrics}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    extras = state.extras
    if skip_nonfinite:  # keep the old params and optimizer state: a select, not a branch
      if SKIPPED not in extras:
        raise ValueError("train.nonfinite='skip': the train state needs the extra tree "
                         f"'{SKIPPED}' (state.build(..., extras_init=...) with skip_extras)")
      ok = all_finite((params, opt_state)) & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                                       (params, opt_state), (state.params, state.opt_state))
      extras = {**extras, SKIPPED: extras[SKIPPED] + (~ok).astype(jnp.int32)}
    if after_update is not None:  # once per applied update: the last micro-step, kept
      applied = (state.step + 1) % accum == 0
      if skip_nonfinite:
        applied = applied & ok
      followed = after_update(extras, params)
      extras = {**extras, **jax.tree.map(lambda new, old: jnp.where(applied, new, old),
                                         followed, {k: extras[k] for k in followed})}
    metrics = {"loss": loss, "grad_norm": grad_norm,
               FINITE_STATE: all_finite((params, opt_state)).astype(jnp.float32), **aux}
    if skip_nonfinite:
      metrics[SKIPPED] = extras[SKIPPED]
    return state._replace(step=state.step + 1, params=params, opt_state=opt_state,
                          extras=extras), metrics

  return train_step


def jit_train_step(built: Built, objective: Objective | None = None,
                   after_update: objectives.ExtrasUpdate | None = None,
                   batch_sharding: Any = None):
  """``make_train_step`` jitted with the state's shardings, the batch sharded over
  (data, fsdp) (``batch_sharding``: another one, e.g. a dict by field), and the state
  donated."""
  if batch_sharding is None:
    batch_sharding = sharding.batch_sharding(built.mesh)
  return jax.jit(make_train_step(built.cfg, built.graphdef, built.tx, objective,
                                 after_update),
                 in_shardings=(built.state_shardings, batch_sharding),
                 out_shardings=(built.state_shardings, sharding.replicated(built.mesh)),
                 donate_argnums=0)


def model_params(cfg: Config, state: TrainState) -> nnx.State:
  """The params the model is merged from: ``state.params``, or with ``lora.enabled`` the
  base with the adapters folded in."""
  if cfg.lora.enabled:
    return lora.merge(state.extras[lora.BASE], state.params, cfg.lora)
  return state.params


def model_tree(cfg: Config, state: TrainState) -> Any:
  """The model's own params in a train state (of arrays, shapes or shardings): with
  ``lora.enabled`` the frozen base, else the params."""
  return state.extras[lora.BASE] if cfg.lora.enabled else state.params


def make_eval_step(graphdef: nnx.GraphDef):
  """``(params, batch, piece_bytes) -> {nll, tokens, bytes}``: sums over the batch."""
  def eval_step(params: nnx.State, batch: dict[str, jax.Array], piece_bytes: jax.Array):
    logits = objectives.batch_logits(nnx.merge(graphdef, params), batch)
    _, sum_nll, n_tokens = lm.cross_entropy_loss(logits, batch["targets"])
    n_bytes = jnp.sum(piece_bytes[batch["targets"]])
    return {"nll": sum_nll, "tokens": n_tokens, "bytes": n_bytes}

  return eval_step


def jit_eval_step(built: Built):
  """``make_eval_step`` jitted with the model params' shardings and the batch's."""
  replicated = sharding.replicated(built.mesh)
  return jax.jit(make_eval_step(built.graphdef),
                 in_shardings=(model_tree(built.cfg, built.state_shardings),
                               sharding.batch_sharding(built.mesh), replicated),
                 out_shardings=replicated)


def compile_step(jitted, *args, log: Callable[[str], None]):
  """AOT-compiles, reporting compile time and the compiled memory analysis."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  mem_fields = {}
  if mem is not None:
    for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "alias_size_in_bytes", "generated_code_size_in_bytes"):
      mem_fields[name] = int(getattr(mem, name, 0))
    # Live at once: inputs, outputs not aliased to (donated) inputs, and temporaries.
    mem_fields["peak_bytes"] = max(int(getattr(mem, "peak_memory_in_bytes", 0) or 0), (
        mem_fields["argument_size_in_bytes"] + mem_fields["output_size_in_bytes"]
        + mem_fields["temp_size_in_bytes"] - mem_fields["alias_size_in_bytes"]))
  log(f"compiled train step in {seconds:.2f}s; memory_analysis: " +
      ", ".join(f"{k}={v / 2**20:.1f}MiB" for k, v in mem_fields.items()))
  return compiled, seconds, mem_fields


def train_flops_per_step(cfg: Config, vocab_size: int) -> float:
  """Analytic training FLOPs of one optimizer step (3x the forward matmul FLOPs)."""
  per_token = lm.forward_flops_per_token(cfg.model, vocab_size, cfg.data.seq_len)
  return 3.0 * per_token * cfg.train.batch_size * cfg.data.seq_len
