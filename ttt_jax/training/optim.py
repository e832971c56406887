"""Optimizers and learning-rate schedules: AdamW, SGD and Muon, built from ``OptimConfig``.

Every parameter is classified once, from its logical axis names alone (``param_group``):

  'embedding'  any axis named 'vocab' (token embedding [V, D], untied LM head [D, V]);
  'vector'     an axis registered as a vector axis (``registry.AxisInfo.vector``: 'norm',
               'conv', 'streams', 'fast', 'gate'), or fewer than two matrix axes
               (norm scales, biases, scalars, gates, per-head vectors);
  'matrix'     everything else: at least two matrix axes (hidden weight matrices).

Matrix axes are the axes left after removing the batch axes: 'layers' (stacked/scanned
copies) always, and 'heads'/'kv_heads' when the parameter has no 'embed' axis (a
per-head parameter such as TTT's inner weights [H, Dh, Dh] is H independent matrices;
with an 'embed' axis the head axes are part of a projection, e.g. [D, H, Dh]).
'norm'/'conv'/'streams' mark parameters that are not linear maps of hidden features
(norm scales, depthwise conv filters, hyper-connection mixing logits), so Adam is the
right optimizer for them whatever their rank.
'fast' marks the learned initial state of an inner model trained at test time (TTT's
W0 [H, Dh, Dh] and b0 [H, Dh]: the inner loss, not weight decay, sets their scale) and
'gate' its inner learning-rate gate (TTT's θ_lr [D, H], β [H] and per-position scales);
both are 'vector' too.

Weight decay (decoupled, multiplied by the learning rate) applies to 'matrix' and
'embedding' parameters only, never to 'vector' ones.

Muon (Jordan et al., 2024) orthogonalises the momentum of each hidden matrix with a
quintic Newton-Schulz iteration, M -> ~U V^T for M = U S V^T, then scales it by
sqrt(max(1, fan_out / fan_in)). Batch axes are vmapped, so each layer (and head) of a
stacked parameter is orthogonalised on its own. With more than two matrix axes the
matrix is split into the 'embed' axis on one side and the other matrix axes on the
other side (a projection reads from or writes to the residual stream): [D, H, Dh] is
the D x (H*Dh) matrix, [H, Dh, D] the (H*Dh) x D one. The side holding the first matrix
axis is the reduction (input) side. Without 'embed', the first matrix axis is the
reduction side and the remaining ones the output side.

Gradient accumulation wraps the whole chain (clipping included) in ``optax.MultiSteps``:
the train loop calls ``update`` once per micro-batch, parameters change on every
``grad_accum_steps``-th call only, clipping sees the averaged gradient and the
schedules count optimizer updates, not micro-batches.

Weight averaging (EMA, SWA; ``training.averaging``) is the chain's last transformation,
inside MultiSteps: the averages live in the optimizer state, are sharded like the params
(``opt_state_shardings``) and update once per optimizer update.

All parameter-dependent choices are looked up by parameter path, so one optimizer works
on nested dicts, on ``nnx.State`` of ``nnx.Variable``s and on their pure-array form
(``nnx.Optimizer`` inits with the former and updates with the latter).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from ttt_jax import registry
from ttt_jax.config import OptimConfig
from ttt_jax.errors import ConfigError
from ttt_jax.training import averaging

MATRIX, EMBEDDING, VECTOR = "matrix", "embedding", "vector"
"""The parameter groups returned by ``param_group``."""
VOCAB_AXIS = "vocab"
"""An axis indexing the vocabulary: embedding or LM head."""
STACKED_AXES = ("layers",)
"""Axes of stacked (scanned) copies: always batch axes, never matrix axes."""
HEAD_AXES = ("heads", "kv_heads")
"""Axes of independent per-head parameters: batch axes unless 'embed' is present."""
RESIDUAL_AXIS = "embed"
"""The residual-stream axis: one side of a projection matrix."""


# ----------------------------------------------------------------------------- classification


def _axis_names(entry: Any) -> tuple[str, ...]:
  """The logical names of one PartitionSpec entry (None, a name or a tuple of names)."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _matrix_axes(spec: P) -> list[int]:
  """Indices of the axes that form the matrix (all but the batch axes)."""
  names = [_axis_names(entry) for entry in spec]
  touches_residual = any(RESIDUAL_AXIS in n for n in names)
  batch = STACKED_AXES if touches_residual else STACKED_AXES + HEAD_AXES
  return [i for i, n in enumerate(names) if not any(a in batch for a in n)]


def param_group(spec: P) -> str:
  """'embedding' | 'vector' | 'matrix' for one parameter's logical axes (module doc)."""
  names = [a for entry in spec for a in _axis_names(entry)]
  if VOCAB_AXIS in names:
    return EMBEDDING
  if any(a in registry.LOGICAL_AXES and registry.LOGICAL_AXES.get(a).vector for a in names):
    return VECTOR
  return MATRIX if len(_matrix_axes(spec)) >= 2 else VECTOR


def muon_dimension_numbers(spec: P) -> optax.contrib.MuonDimensionNumbers | None:
  """Muon's (reduction, output) axes of a 'matrix' parameter; None for the others.

  Axes named in neither are batch axes that Muon vmaps over (layers, per-head copies).
  """
  if param_group(spec) != MATRIX:
    return None
  axes = _matrix_axes(spec)
  residual = [i for i in axes if RESIDUAL_AXIS in _axis_names(spec[i])]
  if len(axes) == 2 or not residual:
    reduction = (axes[0],)
  elif residual[0] == axes[0]:
    reduction = (residual[0],)
  else:
    reduction = tuple(i for i in axes if i != residual[0])
  output = tuple(i for i in axes if i not in reduction)
  return optax.contrib.MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def param_groups(logical_axes: Any) -> Any:
  """The tree of group labels ('matrix' | 'embedding' | 'vector'), like ``logical_axes``."""
  return jax.tree.map(param_group, logical_axes, is_leaf=_is_spec)


# ----------------------------------------------------------------------------- path lookups


def _path_key(path: tuple) -> tuple:
  """A container-independent parameter path: key names, minus nnx.Variable's '.value'."""
  key = []
  for entry in path:
    if isinstance(entry, jax.tree_util.GetAttrKey) and entry.name == "value":
      continue
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        key.append(getattr(entry, attr))
        break
    else:
      key.append(str(entry))
  return tuple(key)


class _SpecTable:
  """Logical axes by parameter path; maps a per-spec function over any params tree.

  The returned callables work on masked trees (optax.MaskedNode subtrees have no
  leaves) and on the placeholder ``optax.tree_map_params`` passes to ``init``.
  """

  def __init__(self, logical_axes: Any):
    flat, _ = jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=_is_spec)
    self.specs = {}
    for path, spec in flat:
      if not _is_spec(spec):
        raise TypeError(f"logical axes of '{jax.tree_util.keystr(path)}' must be a "
                        f"PartitionSpec, got {type(spec).__name__}")
      self.specs[_path_key(path)] = spec

  def spec_of(self, path: tuple, leaf: Any) -> P:
    key = _path_key(path)
    if key not in self.specs:
      raise ValueError(f"optimizer: parameter '{'/'.join(map(str, key))}' has no logical "
                       f"axes in the tree given to build_optimizer")
    spec = self.specs[key]
    shape = getattr(leaf, "shape", ())
    # A shorter spec (e.g. P() of an unnamed Param) only hides a group for ndim >= 2.
    if len(spec) > len(shape) or (len(spec) < len(shape) and len(shape) >= 2):
      raise ValueError(f"optimizer: parameter '{'/'.join(map(str, key))}' of shape "
                       f"{tuple(shape)} has logical axes {spec}; give every dimension a name")
    return spec

  def mapper(self, fn: Callable[[P], Any]) -> Callable[[Any], Any]:
    return lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, leaf: fn(self.spec_of(path, leaf)), tree)


# ----------------------------------------------------------------------------- schedules


def lr_schedule(cfg: OptimConfig, total_steps: int,
                peak_lr: float | None = None) -> optax.Schedule:
  """The learning rate at optimizer update ``step`` (0 = first update).

  cosine: linear warmup 0 -> peak over warmup_steps, cosine to min_lr_ratio * peak at
  total_steps. wsd: warmup, constant, linear to min_lr_ratio * peak over the last
  decay_fraction of total_steps. constant: warmup, then peak. Warmup is capped at
  total_steps and the wsd warmdown at what the warmup leaves; past total_steps the
  value stays at its end point. ``peak_lr`` defaults to ``cfg.lr``.
  """
  if total_steps < 1:
    raise ValueError(f"lr_schedule: total_steps must be >= 1, got {total_steps}")
  peak = cfg.lr if peak_lr is None else float(peak_lr)
  floor = peak * cfg.min_lr_ratio
  warmup = min(cfg.warmup_steps, total_steps)
  after_warmup = total_steps - warmup
  pieces: list[tuple[optax.Schedule, int]] = []  # (schedule, length); the last runs on
  if warmup > 0:
    pieces.append((optax.linear_schedule(0.0, peak, warmup), warmup))
  if cfg.schedule == "cosine" and after_warmup > 0:
    pieces.append((optax.cosine_decay_schedule(peak, after_warmup, alpha=cfg.min_lr_ratio),
                   after_warmup))
  elif cfg.schedule == "wsd" and after_warmup > 0:
    decay = min(round(cfg.decay_fraction * total_steps), after_warmup)
    if after_warmup - decay > 0:
      pieces.append((optax.constant_schedule(peak), after_warmup - decay))
    if decay > 0:
      pieces.append((optax.linear_schedule(peak, floor, decay), decay))
  else:  # 'constant', or nothing left after the warmup
    pieces.append((optax.constant_schedule(peak), after_warmup))
  if len(pieces) == 1:
    return pieces[0][0]
  boundaries, step = [], 0
  for _, length in pieces[:-1]:
    step += length
    boundaries.append(step)
  return optax.join_schedules([s for s, _ in pieces], boundaries)


# ----------------------------------------------------------------------------- optimizers


def swa_active(cfg: OptimConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Whether optimizer update ``step`` (0 = the first) may take an SWA snapshot: past the
  warmup, with lr <= ``swa_start_lr_ratio`` x peak lr."""
  schedule, warmup = lr_schedule(cfg, total_steps), min(cfg.warmup_steps, total_steps)
  return lambda step: (step >= warmup) & (schedule(step) <= cfg.swa_start_lr_ratio * cfg.lr)


def check_swa_starts(cfg: OptimConfig, total_steps: int) -> None:
  """Refuses (one line) an SWA that would take no snapshot in ``total_steps`` updates,
  its average then silently the raw params: the schedule reaches its final lr ratio only
  after the last update, so ``swa_start_lr_ratio`` equal to it (or a warmdown too short
  to fall that far at a multiple of ``swa_every``) never starts."""
  if not cfg.swa_every:
    return
  steps = jnp.arange(cfg.swa_every - 1, total_steps, cfg.swa_every)
  if not bool(jnp.any(jax.vmap(swa_active(cfg, total_steps))(steps))):
    raise ConfigError(f"optim.swa_start_lr_ratio: SWA would take no snapshot in "
                      f"train.steps={total_steps}: the lr is above {cfg.swa_start_lr_ratio} "
                      f"x peak at every optim.swa_every={cfg.swa_every}-th update past the "
                      "warmup; raise the ratio or lower swa_every")


def build_optimizer(cfg: OptimConfig, total_steps: int,
                    logical_axes: Any) -> optax.GradientTransformation:
  """clip_by_global_norm -> adamw | sgd | muon -> weight averaging (when ``ema_decay`` or
  ``swa_every`` is set: ``averaging.transform``), wrapped in MultiSteps if accumulating.

  ``total_steps`` counts optimizer updates; ``logical_axes`` has the params' tree
  structure with PartitionSpec leaves (``nnx.get_partition_spec(params)``). The lr to
  log at update ``step`` is ``lr_schedule(cfg, total_steps)(step)`` (for muon that of
  the matrices; the Adam groups follow ``peak_lr=cfg.adam_lr or cfg.lr``).
  """
  table = _SpecTable(logical_axes)
  decay_mask = table.mapper(lambda spec: param_group(spec) != VECTOR)
  schedule = lr_schedule(cfg, total_steps)

  if cfg.name == "adamw":
    optimizer = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                            weight_decay=cfg.weight_decay, mask=decay_mask)
  elif cfg.name == "sgd":
    if cfg.weight_decay == 0:
      optimizer = optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    else:
      # optax.sgd's own chain with decoupled decay between momentum and the lr, so the
      # decay is not accumulated into the momentum and is scaled by the lr (SGDW).
      optimizer = optax.chain(
          optax.trace(cfg.momentum, cfg.nesterov) if cfg.momentum else optax.identity(),
          optax.add_decayed_weights(cfg.weight_decay, decay_mask),
          optax.scale_by_learning_rate(schedule))
  elif cfg.name == "muon":
    optimizer = _muon(cfg, total_steps, table)
  else:
    raise ValueError(f"unknown optimizer {cfg.name!r}")

  tx = optimizer
  if cfg.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optimizer)
  if cfg.ema_decay > 0 or cfg.swa_every > 0:
    tx = optax.chain(tx, averaging.transform(cfg.ema_decay, cfg.swa_every,
                                             swa_active(cfg, total_steps)))
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps).gradient_transformation()
  return tx


def _muon(cfg: OptimConfig, total_steps: int,
          table: _SpecTable) -> optax.GradientTransformation:
  """Muon for 'matrix' params, AdamW (own lr and betas) for 'embedding' and 'vector'.

  optax.contrib.muon alone would give every Adam-routed parameter the same (unmasked)
  weight decay, so the three groups are split with optax.partition: the 'matrix' branch
  is optax.contrib.muon with dimension numbers for every leaf it sees, the other two are
  optax.adamw with and without weight decay.
  """
  adam_schedule = lr_schedule(cfg, total_steps, peak_lr=cfg.adam_lr or cfg.lr)

  def adam(weight_decay: float) -> optax.GradientTransformation:
    return optax.adamw(adam_schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.eps,
                       weight_decay=weight_decay)

  matrices = optax.contrib.muon(
      lr_schedule(cfg, total_steps), ns_steps=cfg.ns_steps, beta=cfg.momentum, eps=cfg.eps,
      weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
      muon_weight_dimension_numbers=table.mapper(muon_dimension_numbers))
  return optax.partition(
      {MATRIX: matrices, EMBEDDING: adam(cfg.weight_decay), VECTOR: adam(0.0)},
      param_labels=table.mapper(param_group))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                        param_shardings: Any, non_param_sharding: Any) -> Any:
  """Shardings of the optimizer state: every parameter-shaped subtree (moments, Muon
  momentum, MultiSteps accumulators) gets the parameters' shardings, everything else
  (step counts, Newton-Schulz coefficients) ``non_param_sharding``.

  ``optax.tree_map_params`` with the masked subtrees of optax.partition/masked states
  (``optax.MaskedNode``, no arrays) kept as they are.
  """
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  return optax.tree_map_params(
      tx, lambda value, sharding: value if is_masked(value) else sharding,
      abstract_opt_state, param_shardings,
      transform_non_params=lambda _: non_param_sharding, is_leaf=is_masked)
