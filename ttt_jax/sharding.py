"""Device mesh and logical-axis sharding rules.

Model code names every parameter axis logically (``("layers", "embed", "mlp")``).
One rules table from ``MeshConfig.rules`` maps logical names to mesh axes
``("data", "fsdp", "tensor")``; this module turns those names into ``NamedSharding``s
and checks, before anything is compiled, that every sharded dimension divides its
mesh axes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ttt_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Resolves the (data, fsdp, tensor) sizes, filling a single -1 with the rest."""
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh: {num_devices} devices cannot be split with fixed axes "
                        f"{dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are "
                      f"{num_devices} devices")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
  """A mesh over all devices (topology-aware order), over the first
  ``cfg.num_devices`` of them, or over ``devices`` as given."""
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices is None and cfg.num_devices and cfg.num_devices != jax.device_count():
    if cfg.num_devices > jax.device_count() or jax.process_count() > 1:
      raise ConfigError(f"mesh.num_devices: {cfg.num_devices} must be at most the "
                        f"{jax.device_count()} devices, and 0 in multi-process runs")
    devices = jax.devices()[:cfg.num_devices]
  if devices is None:
    shape = mesh_shape(cfg, jax.device_count())
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
  shape = mesh_shape(cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def rules_table(cfg: MeshConfig) -> dict[str, tuple[str, ...]]:
  return {logical: tuple(filter(None, axes.split("+"))) for logical, axes in cfg.rules}


def logical_to_mesh_spec(logical: P, rules: dict[str, tuple[str, ...]]) -> P:
  """Maps a PartitionSpec of logical names to one of mesh axes; a mesh axis is used
  at most once (the first logical axis claiming it wins)."""
  used: set[str] = set()
  out = []
  for name in logical:
    axes = tuple(a for a in rules.get(name, ()) if a not in used) if name else ()
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def check_divisible(path: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> None:
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    size = math.prod(mesh.shape[a] for a in axes)
    if dim % size:
      raise ConfigError(f"mesh: parameter '{path}' dimension {dim} is not divisible by "
                        f"mesh axes {axes} of total size {size}; change mesh.* or mesh.rules")


def param_shardings(abstract_params: Any, logical_axes: Any, mesh: Mesh,
                    cfg: MeshConfig) -> Any:
  """NamedSharding for every parameter (same tree as ``abstract_params``)."""
  rules = rules_table(cfg)

  def one(path, leaf, logical):
    spec = logical_to_mesh_spec(logical, rules)
    check_divisible(jax.tree_util.keystr(path, simple=True, separator="."), leaf.shape,
                    spec, mesh)
    return NamedSharding(mesh, spec)

  return jax.tree.map_with_path(one, abstract_params, logical_axes)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  size = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % size:
    raise ConfigError(f"{what}: {global_batch} is not divisible by data*fsdp = {size}")


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's local slice."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in batch.items()}
