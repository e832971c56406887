"""The adapter tree and its merge into the base: pure functions.

Targets. Every weight matrix (``optim.param_group`` 'matrix') whose '/'-joined path
(e.g. 'blocks/mixer/wq') a pattern of ``lora.targets`` matches (``re.search``) gets an
adapter; a pattern that matches no weight matrix is a ``ConfigError``.

Layout. A weight W keeps its own axes; ``optim.muon_dimension_numbers`` splits them
into reduction (input) axes R, output axes O and batch axes (the rest, in order: the
stacked 'layers' axis of scanned blocks, per-head axes of a parameter without 'embed').
In the flattened matrix view

  W~ = transpose(W, batch + R + O).reshape(*batch_shape, in, out),  in = prod R, out = prod O

the adapter is A [*batch_shape, in, r] and B [*batch_shape, r, out], and

  W' = W + s * unflatten(A @ B),   s = alpha / r,

where ``unflatten`` reshapes [*batch_shape, in, out] to [*batch_shape, *R, *O] and
transposes back to W's axes order. The sum is formed in float32 and cast to W's dtype.
Each batch element (layer, head) has its own (A, B) pair. Since x @ W~' = x @ W~ +
s * (x @ A) @ B, a zero B leaves the model exactly unchanged: A ~ N(0, init_std^2),
B = 0 (``init``).

Trainable count: sum over targets of prod(batch_shape) * r * (in + out)
(``trainable_count``). A and B shard like their weight's batch axes; their in, r and
out axes are replicated (``logical_axes``).

The adapter tree mirrors the params' paths: ``{'blocks': {'mixer': {'wq': {'a': A,
'b': B}}}}``, float32 arrays. ``BASE`` names the frozen base params in the train
state's extras when the adapters are what trains (``lora.enabled``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from ttt_jax.config import LoRAConfig, OptimConfig
from ttt_jax.errors import ConfigError
from ttt_jax.training import optim

BASE = "lora_base"
"""The train state's extra tree holding the frozen base params while adapters train."""


class Target(NamedTuple):
  """One adapted weight and its flattened matrix view."""
  path: tuple[str, ...]
  shape: tuple[int, ...]
  batch: tuple[int, ...]
  """Axes of W that index independent matrices (layers, per-head copies)."""
  reduction: tuple[int, ...]
  """W's input axes (flattened into ``in``)."""
  output: tuple[int, ...]
  """W's output axes (flattened into ``out``)."""
  spec: P
  """W's logical axes."""

  @property
  def name(self) -> str:
    return "/".join(self.path)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[i] for i in self.batch)

  @property
  def fan_in(self) -> int:
    return math.prod(self.shape[i] for i in self.reduction)

  @property
  def fan_out(self) -> int:
    return math.prod(self.shape[i] for i in self.output)


def _leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  """(path key, leaf) of every leaf: paths without nnx.Variable's '.value'."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))
  return [(tuple(str(k) for k in optim._path_key(path)), leaf) for path, leaf in flat]


def find_targets(cfg: LoRAConfig, params: Any) -> list[Target]:
  """The weights ``cfg.targets`` selects, sorted by path. ``params``: an ``nnx.State``
  (arrays or ShapeDtypeStructs, with their logical axes)."""
  specs = dict(_leaves(nnx.get_partition_spec(params)))
  matrices = {}
  for path, leaf in _leaves(params):
    numbers = optim.muon_dimension_numbers(specs[path]) if path in specs else None
    if numbers is not None:
      matrices["/".join(path)] = (path, tuple(leaf.shape), numbers, specs[path])
  for pattern in cfg.targets:
    if not any(re.search(pattern, name) for name in matrices):
      raise ConfigError(f"lora.targets: {pattern!r} matches no weight matrix of this model "
                        f"(its matrices: {', '.join(sorted(matrices))})")
  targets = []
  for name in sorted(matrices):
    if any(re.search(pattern, name) for pattern in cfg.targets):
      path, shape, numbers, spec = matrices[name]
      reduction, output = tuple(numbers.reduction_axis), tuple(numbers.output_axis)
      batch = tuple(i for i in range(len(shape)) if i not in reduction + output)
      targets.append(Target(path, shape, batch, reduction, output, spec))
  return targets


def _nest(items: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
  """A nested dict with ``value`` at each ``path``."""
  tree: dict[str, Any] = {}
  for path, value in items:
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _pairs(adapters: dict[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
  """The adapter tree's (A, B) dicts by weight path."""
  return {path[:-1]: _get(adapters, path[:-1]) for path, _ in _leaves(adapters)
          if path[-1] == "a"}


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def init(cfg: LoRAConfig, targets: list[Target], key: jax.Array) -> dict[str, Any]:
  """A ~ N(0, init_std^2) (the i-th target's from ``fold_in(key, i)``), B = 0; float32."""
  items = []
  for i, t in enumerate(targets):
    a = cfg.init_std * jax.random.normal(jax.random.fold_in(key, i),
                                         (*t.batch_shape, t.fan_in, cfg.rank), jnp.float32)
    items.append((t.path, {"a": a, "b": jnp.zeros((*t.batch_shape, cfg.rank, t.fan_out),
                                                  jnp.float32)}))
  return _nest(items)


def logical_axes(targets: list[Target]) -> dict[str, Any]:
  """The adapter tree's logical axes: the weight's batch axes, then in/r/out unsharded."""
  items = []
  for t in targets:
    batch = tuple(t.spec[i] for i in t.batch)
    items.append((t.path, {"a": P(*batch, None, None), "b": P(*batch, None, None)}))
  return _nest(items)


def delta(target: Target, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``scale * A @ B`` in W's own axes order (the module doc's ``unflatten``), in float32
  (float64 when the adapters are)."""
  dtype = jnp.promote_types(jnp.float32, jnp.result_type(a, b))
  ab = scale * jnp.einsum("...ir,...ro->...io", a.astype(dtype), b.astype(dtype),
                          precision=jax.lax.Precision.HIGHEST)
  perm = target.batch + target.reduction + target.output
  ab = ab.reshape(tuple(target.shape[i] for i in perm))
  return jnp.transpose(ab, tuple(perm.index(i) for i in range(len(perm))))


def merge(base: Any, adapters: dict[str, Any], cfg: LoRAConfig,
          targets: list[Target] | None = None) -> Any:
  """``base`` with W + (alpha / r) * A @ B for every target (float32, then W's dtype);
  every other leaf is ``base``'s own. ``targets``: ``find_targets(cfg, base)`` unless
  given."""
  targets = find_targets(cfg, base) if targets is None else targets
  by_path = {t.path: t for t in targets}
  pairs = _pairs(adapters)
  if set(pairs) != set(by_path):
    raise ValueError(f"lora.merge: the adapters adapt {sorted('/'.join(p) for p in pairs)}, "
                     f"the targets are {[t.name for t in targets]}")
  scale = cfg.alpha / cfg.rank

  def one(path, w):
    key = tuple(str(k) for k in optim._path_key(path))
    if key not in by_path:
      return w
    pair = pairs[key]
    update = delta(by_path[key], pair["a"], pair["b"], scale)
    return (w.astype(jnp.promote_types(update.dtype, w.dtype)) + update).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(one, base)


def optimizer_config(cfg: OptimConfig) -> OptimConfig:
  """The adapters' optimizer: AdamW with ``cfg``'s lr, schedule, betas, eps, clipping and
  accumulation, weight decay 0 (never Muon: A and B are thin factors, not matrices
  whose updates orthogonalisation should whiten)."""
  return dataclasses.replace(cfg, name="adamw", weight_decay=0.0)


def trainable_count(targets: list[Target], rank: int) -> int:
  """sum over targets of prod(batch_shape) * r * (in + out)."""
  return sum(math.prod(t.batch_shape) * rank * (t.fan_in + t.fan_out) for t in targets)


def summary_line(cfg: LoRAConfig, targets: list[Target]) -> str:
  """One line: rank, alpha, the adapted weights and the trainable count."""
  return (f"lora: rank {cfg.rank}, alpha {cfg.alpha:g}; adapted {len(targets)} weights "
          f"({', '.join(t.name for t in targets)}); "
          f"{trainable_count(targets, cfg.rank):,} trainable params")
