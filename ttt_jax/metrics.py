"""Metric sinks (metrics.jsonl, tensorboardX, progress bar) and throughput maths.

Only process 0 writes. ``metrics.jsonl`` holds one JSON object per line: train rows
with ``step, loss, lr, grad_norm, tokens_per_sec, step_time_s, mfu`` and eval rows
with ``step, eval_loss, eval_ppl, eval_bpb``. A non-finite float (NaN, inf) is written
as ``null``, so every line is strict JSON. Tensorboard tags are namespaced
(``train/loss``, ``eval/bpb``, ``perf/mfu``).

``step_time_s`` is wall time per step over the rows' window, measured between the
steps' completions. Evals and profile writing are left out of it; the blocking part of
a checkpoint save is kept in, since that stall is the training loop's own cost.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TB_TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "tokens_per_sec": "perf/tokens_per_sec", "step_time_s": "perf/step_time_s",
    "mfu": "perf/mfu", "eval_loss": "eval/loss", "eval_ppl": "eval/ppl",
    "eval_bpb": "eval/bpb",
}


def _tag(key: str) -> str:
  return TB_TAGS.get(key) or (key if "/" in key else f"train/{key}")


class MetricsWriter:
  """Appends rows to ``WORKDIR/metrics.jsonl`` and ``WORKDIR/tb`` (process 0 only)."""

  def __init__(self, workdir: Path, *, tensorboard: bool, enabled: bool,
               resume_step: int | None = None):
    """``resume_step``: the run continues from this step, so rows logged after it by an
    interrupted run are dropped from metrics.jsonl and purged from tensorboard."""
    self.enabled = enabled
    self.path = Path(workdir) / "metrics.jsonl"
    self._tb = None
    if resume_step is not None:
      self.truncate_after(resume_step)
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter
      purge_step = None if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(str(Path(workdir) / "tb"), purge_step=purge_step)

  def truncate_after(self, step: int) -> None:
    """Drops rows logged after ``step`` (used when resuming from an earlier step)."""
    if not (self.enabled and self.path.exists()):
      return
    kept = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    tmp = self.path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(self.path)

  def write(self, step: int, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in row.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(_finite_or_null(row), allow_nan=False) + "\n")
    if self._tb is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(_tag(key), value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    value = np.asarray(value).item()
  return value


def _finite_or_null(value: Any) -> Any:
  """``value`` with every non-finite float (in lists and mappings too) as None, which
  JSON writes as ``null``: strict parsers reject bare ``NaN`` and ``Infinity``."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite_or_null(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_null(v) for v in value]
  return value


def measure_peak_flops(size: int = 2048, repeats: int = 5) -> float:
  """Best observed f32 matmul rate (FLOP/s) of one ``size``x``size`` product on the
  first local device: the MFU denominator when no peak is configured."""
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best


PEAK_FLOPS_BY_KIND = {
    # Dense bf16 tensor-core peaks (FLOP/s) from vendor data sheets.
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
}


def peak_flops_per_device(configured: float) -> tuple[float, str]:
  """The per-device peak used for MFU and where it came from."""
  if configured > 0:
    return configured, "config"
  kind = jax.local_devices()[0].device_kind
  if kind in PEAK_FLOPS_BY_KIND:
    return PEAK_FLOPS_BY_KIND[kind], f"table ({kind})"
  return measure_peak_flops(), f"measured f32 matmul on {kind}"


def mesh_peak_flops(configured: float, mesh: jax.sharding.Mesh) -> tuple[float, str]:
  """Aggregate peak FLOP/s of the devices in ``mesh`` (the MFU denominator).

  A configured or tabulated peak is per device and is multiplied by the mesh size. A
  measured CPU rate is per host, since simulated CPU devices of one process share its
  cores, and is multiplied by the number of processes in the mesh.
  """
  per_device, source = peak_flops_per_device(configured)
  devices = list(mesh.devices.flat)
  if source.startswith("measured") and devices[0].platform == "cpu":
    return per_device * len({d.process_index for d in devices}), source + " (per host)"
  return per_device * len(devices), source
