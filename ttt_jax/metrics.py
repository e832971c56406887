"""Metric sinks (metrics.jsonl, tensorboardX, plain log lines) and throughput maths.

Only process 0 writes. ``metrics.jsonl`` holds one JSON object per line: train rows
with ``step, loss, lr, grad_norm, tokens_per_sec, step_time_s, mfu`` and eval rows
with ``step, eval_loss, eval_ppl, eval_bpb``. A non-finite float (NaN, inf) is written
as ``null``, so every line is strict JSON. Tensorboard tags are namespaced
(``train/loss``, ``eval/bpb``, ``perf/mfu``).

``step_time_s`` is wall time per step over the rows' window, measured between the
steps' completions. Evals and profile writing are left out of it; the blocking part of
a checkpoint save is kept in, since that stall is the training loop's own cost.

The console gets the same rows as plain lines (``train_line``, ``eval_line``: one per
row, no carriage returns, readable in a cluster's log file) and a run's closing summary
(``summary_lines``); numbers are rounded for reading, never printed as reprs.
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


def _row_step(line: str) -> int | None:
  """The step of a jsonl row, or None for a line that is not one (a write a kill cut
  short)."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError:
    return None
  step = row.get("step") if isinstance(row, dict) else None
  return step if isinstance(step, int) else None


def keep_rows_through(path: Path, step: int) -> None:
  """Rewrites the jsonl file at ``path`` (rows with an int ``step``) without its rows
  after ``step`` and without lines that are no row (a write cut short by a kill, which a
  resume would otherwise trip on), atomically."""
  kept = [line for line in path.read_text(errors="replace").splitlines()
          if (row_step := _row_step(line)) is not None and row_step <= step]
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(line + "\n" for line in kept))
  tmp.replace(path)


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
    keep_rows_through(self.path, step)

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


def format_duration(seconds: float) -> str:
  """``seconds`` for reading: '8.2s', '1m12s', '3h05m'."""
  if not math.isfinite(seconds):
    return "?"
  if seconds < 60:
    return f"{seconds:.1f}s"
  minutes = int(seconds // 60)
  if minutes < 60:
    return f"{minutes}m{int(seconds % 60):02d}s"
  return f"{minutes // 60}h{minutes % 60:02d}m"


def format_count(value: float) -> str:
  """A rate or count with a unit prefix: '812', '41.2k', '3.05M', '1.20G'."""
  for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= factor:
      return f"{value / factor:.3g}{suffix}"
  return f"{value:.3g}"


def train_line(step: int, final_step: int, row: dict[str, float], eta_s: float) -> str:
  """A train row (``MetricsLog``'s) as one line: ``step 120/300 loss 3.412 lr 8.1e-04
  gnorm 0.93 tok/s 41.2k mfu 3.1% eta 1m12s`` (and the skipped steps, when any)."""
  line = (f"step {step}/{final_step} loss {row['loss']:#.4g} lr {row['lr']:.1e} "
          f"gnorm {row['grad_norm']:#.3g} tok/s {format_count(row['tokens_per_sec'])} "
          f"mfu {100 * row['mfu']:.1f}% eta {format_duration(eta_s)}")
  if row.get("skipped_steps"):
    line += f" skipped {row['skipped_steps']:.0f}"
  return line


def eval_line(step: int, final_step: int, row: dict[str, float]) -> str:
  """An eval row as one line: ``eval step 30/60 loss 4.123 ppl 61.75 bpb 1.234``."""
  return f"eval step {step}/{final_step} " + _eval_values(row)


def _eval_values(row: dict[str, float], keys: tuple[str, ...] | None = None) -> str:
  """'loss 4.123 bpb 1.234': the row's values (those in ``keys``), unprefixed."""
  return " ".join(f"{key.removeprefix('eval_')} {f'{value:#.4g}'.rstrip('.')}"
                  for key, value in row.items() if keys is None or key in keys)


def summary_lines(*, start_step: int, final_step: int, total_steps: int, wall_s: float,
                  setup_s: float, loss: float | None, eval_step: int | None,
                  eval_row: dict[str, float] | None, checkpoint: Path | None) -> list[str]:
  """The closing lines of a run that went from ``start_step`` to ``final_step`` (of
  ``total_steps``) in ``wall_s`` seconds, ``setup_s`` of them before the first step:
  its last loss, its last eval row (at ``eval_step``) and the checkpoint it leaves
  (None: none)."""
  done = final_step - start_step
  lines = [f"done: {done} step{'s' * (done != 1)} (step {start_step} -> {final_step} of "
           f"{total_steps}) in {format_duration(wall_s)} (set-up "
           f"{format_duration(setup_s)}, training {format_duration(wall_s - setup_s)})"]
  results = []
  if loss is not None:
    results.append(f"final loss {loss:#.4g}")
  if eval_row:
    results.append(f"eval at step {eval_step}: "
                   + _eval_values(eval_row, ("eval_loss", "eval_bpb")))
  if results:
    lines.append("; ".join(results))
  lines.append(f"checkpoint: {checkpoint}" if checkpoint is not None else
               "checkpoint: none saved")
  return lines


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
