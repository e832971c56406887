"""Weight averaging: an exponential moving average (EMA) and stochastic weight averaging
(SWA) of the parameters, kept in the optimizer state.

``transform`` is an optax transformation that ``optim.build_optimizer`` chains last,
after clipping and the optimizer and inside ``optax.MultiSteps`` when gradients are
accumulated, so it runs once per optimizer update. It passes the updates through
unchanged and reads the parameters they lead to, p_t = p_{t-1} + u_t (as
``optax.apply_updates`` computes them, in the params' dtype), at updates t = 1, 2, ...:

  EMA, decay d:    e_0 = p_0,   e_t = d e_{t-1} + (1 - d) p_t
  SWA, every k:    at a snapshot  n_t = n_{t-1} + 1,  m_t = m_{t-1} + (p_t - m_{t-1}) / n_t
                   otherwise      n_t = n_{t-1},      m_t = m_{t-1}

A snapshot is taken at every update t that is a multiple of k and whose learning rate
is past the warmup and at most ``swa_start_lr_ratio`` x the peak (``swa_active``), so
m is the uniform mean of the n snapshots taken. Until the first one (n = 0) the SWA
weights follow the params, m_t = p_t, so they are always a usable model.

Both averages are float32 whatever the params' dtype (bfloat16 params would round
away the (1 - d) p_t increments). ``AveragingState`` holds them as params-shaped trees,
so ``optim.opt_state_shardings`` shards them like the params, checkpoints save them
with the rest of the optimizer state and a resumed run continues them bit-exactly.
e_0 (and the followed m) are taken at the first update from the params that update
sees, so a run whose params are replaced after the optimizer's init
(``checkpoint.init_from``) averages the params it trains.

``weights(params, opt_state, which)`` gives the params to evaluate: 'raw' the params
themselves, 'ema' / 'swa' the average cast to the params' dtypes. ``evaluate_each``
scores several of them side by side (``eval_loss``, ``ema_eval_loss``, ...).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ttt_jax.config import Config
from ttt_jax.errors import ConfigError

RAW, EMA, SWA = "raw", "ema", "swa"
"""The weights an evaluation can score: the params as trained, or one of the averages."""
EVAL_PREFIX = {RAW: "", EMA: "ema_", SWA: "swa_"}
"""Prefix of each weights' evaluation metrics (``ema_eval_loss``, ...)."""
ENABLED_BY = {EMA: "optim.ema_decay", SWA: "optim.swa_every"}
"""The config field that turns each average on (> 0)."""


class AveragingState(NamedTuple):
  count: jax.Array
  """int32 scalar: optimizer updates seen."""
  ema: Any
  """float32 params-shaped EMA e_t; ``optax.EmptyState()`` when off."""
  swa: Any
  """float32 params-shaped SWA mean m_t; ``optax.EmptyState()`` when off."""
  swa_count: jax.Array
  """int32 scalar: SWA snapshots averaged (n_t)."""


# ----------------------------------------------------------------------------- pure math


def _float32(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _map(fn: Callable[..., jax.Array], tree: Any, *others: Any) -> Any:
  """``fn`` over the leaves of ``tree`` and ``others`` in ``tree``'s structure. The trees
  have the same leaves in the same order; their containers may differ (``nnx.Optimizer``
  inits with ``nnx.Variable``s and updates with their values)."""
  leaves, treedef = jax.tree.flatten(tree)
  rest = [jax.tree.leaves(other) for other in others]
  return treedef.unflatten([fn(*xs) for xs in zip(leaves, *rest, strict=True)])


def _select(condition: jax.Array, on_true: Any, on_false: Any) -> Any:
  """``on_true`` where ``condition`` else ``on_false``, in ``on_false``'s structure."""
  return _map(lambda b, a: jnp.where(condition, a, b), on_false, on_true)


def ema_step(ema: Any, params: Any, decay: float) -> Any:
  """e_t = d e_{t-1} + (1 - d) p_t, written e + (1 - d) (p - e)."""
  return _map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


def swa_step(mean: Any, params: Any, count: jax.Array) -> Any:
  """The running mean after adding snapshot ``params`` as the ``count``-th one."""
  scale = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
  return _map(lambda m, p: m + (p - m) * scale, mean, params)


# ----------------------------------------------------------------------------- transform


def transform(ema_decay: float, swa_every: int,
              swa_active: Callable[[jax.Array], jax.Array]) -> optax.GradientTransformation:
  """The averaging transformation (module doc); updates pass through unchanged.

  ``ema_decay`` 0 and ``swa_every`` 0 turn the averages off; ``swa_active(step)`` says
  whether update ``step`` (0 = the first) may take an SWA snapshot."""

  def init(params: Any) -> AveragingState:
    start = _float32(params)
    zero = jnp.zeros((), jnp.int32)
    return AveragingState(zero, start if ema_decay else optax.EmptyState(),
                          start if swa_every else optax.EmptyState(), zero)

  def update(updates: Any, state: AveragingState, params: Any = None):
    if params is None:
      raise ValueError("weight averaging needs the params in the optimizer's update")
    new = _float32(optax.apply_updates(params, updates))
    first = state.count == 0
    ema, swa, swa_count = state.ema, state.swa, state.swa_count
    if ema_decay:
      ema = ema_step(_select(first, _float32(params), ema), new, ema_decay)
    if swa_every:
      snapshot = ((state.count + 1) % swa_every == 0) & swa_active(state.count)
      swa_count = swa_count + snapshot.astype(jnp.int32)
      followed = _select(state.swa_count == 0, new, swa)
      swa = _select(snapshot, swa_step(followed, new, swa_count), followed)
    return updates, AveragingState(state.count + 1, ema, swa, swa_count)

  return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- reading


def find_state(opt_state: Any) -> AveragingState | None:
  """The ``AveragingState`` inside an optimizer state (None: no averaging)."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AveragingState))
           if isinstance(x, AveragingState)]
  if len(found) > 1:
    raise ValueError(f"the optimizer state holds {len(found)} weight averages, expected one")
  return found[0] if found else None


def weights(params: Any, opt_state: Any, which: str) -> Any:
  """The params to evaluate: ``params`` ('raw') or the 'ema' / 'swa' average of
  ``opt_state``, cast to the params' dtypes (before the first update: the params)."""
  if which == RAW:
    return params
  if which not in ENABLED_BY:
    raise ConfigError(f"weights: {which!r} is not one of {list(EVAL_PREFIX)}")
  state = find_state(opt_state)
  average = getattr(state, which) if state is not None else optax.EmptyState()
  if isinstance(average, optax.EmptyState):
    raise ConfigError(f"weights: {which!r} is not kept by this run ({ENABLED_BY[which]} "
                      f"is 0)")
  average = _select(state.count == 0, _float32(params), average)
  return _map(lambda p, a: a.astype(p.dtype), params, average)


def enabled(cfg: Config) -> tuple[str, ...]:
  """The averages a run keeps ('ema', 'swa')."""
  return tuple(w for w, on in ((EMA, cfg.optim.ema_decay > 0), (SWA, cfg.optim.swa_every > 0))
               if on)


def eval_weights(cfg: Config) -> tuple[str, ...]:
  """The weights the train loop's evaluation scores: 'raw' always, then
  ``eval.weights`` ('all': every average the run keeps)."""
  if cfg.eval.weights == RAW:
    return (RAW,)
  return (RAW,) + (enabled(cfg) if cfg.eval.weights == "all" else (cfg.eval.weights,))


def evaluate_each(evaluate: Callable[[Any], dict[str, float]], params: Any, opt_state: Any,
                  which: tuple[str, ...]) -> dict[str, float]:
  """One row of ``evaluate(weights)`` for each of ``which``, keys prefixed by
  ``EVAL_PREFIX`` (``eval_loss``, ``ema_eval_loss``, ...)."""
  row = {}
  for name in which:
    scores = evaluate(weights(params, opt_state, name))
    row.update({EVAL_PREFIX[name] + key: value for key, value in scores.items()})
  return row
