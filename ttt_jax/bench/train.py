"""``bench train``: ``python -m ttt_jax.bench train --config C [--set k=v] [--steps N]
[--peak-flops F] [--profile DIR]``.

Times the compiled train step of a config on synthetic tokens (the data pipeline is not
what is measured) and prints one JSON object: step time, tokens/s, MFU, compile time
and the compiled step's memory analysis, and one summary line on stderr. The MFU peak
is ``--peak-flops`` (per device) or ``train.peak_flops``, else the device kind's table
entry, else an f32 matmul measured at start-up, which varies from run to run on a
shared CPU: pin it to compare MFU between runs. ``--profile DIR`` writes a
``jax.profiler`` trace of the timed steps there (open it as README's "Profiles" says);
tracing slows the steps it records. Record results, with the machine, in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from ttt_jax import metrics as metrics_lib
from ttt_jax import sharding
from ttt_jax.bench import common
from ttt_jax.config import Config, to_dict
from ttt_jax.training.state import build
from ttt_jax.training.step import compile_step, jit_train_step, train_flops_per_step


def bench_train(cfg: Config, steps: int, warmup: int, profile: Path | None = None) -> dict:
  """``profile``: a directory for a trace of the ``steps`` timed steps."""
  mesh = sharding.make_mesh(cfg.mesh)
  built = build(cfg, cfg.data.vocab_size, mesh)
  step_fn = jit_train_step(built)
  rng = np.random.default_rng(cfg.train.seed)
  batches = [sharding.put_batch(common.synthetic_batch(cfg, rng), mesh) for _ in range(4)]
  compiled, compile_s, memory = compile_step(step_fn, built.state, batches[0],
                                             log=lambda _: None)
  state = built.state
  accum = cfg.optim.grad_accum_steps
  times = []
  for i in range(warmup + steps):
    if i == warmup and profile is not None:
      jax.profiler.start_trace(str(profile))
    start = time.perf_counter()
    with jax.profiler.StepTraceAnnotation("train", step_num=i):
      for micro in range(accum):
        state, metrics = compiled(state, batches[(i * accum + micro) % len(batches)])
      jax.block_until_ready(metrics)
    if i >= warmup:
      times.append(time.perf_counter() - start)
  if profile is not None:
    jax.profiler.stop_trace()
  step_time = statistics.median(times)
  peak, source = metrics_lib.mesh_peak_flops(cfg.train.peak_flops, mesh)
  flops = train_flops_per_step(cfg, cfg.data.vocab_size)
  return {
      "benchmark": "train",
      "step_time_s": step_time,
      "step_time_min_s": min(times),
      "tokens_per_sec": cfg.train.batch_size * cfg.data.seq_len / step_time,
      "train_flops_per_step": flops,
      "achieved_flops_per_sec": flops / step_time,
      "peak_flops_mesh": peak,
      "peak_source": source,
      "mfu": flops / (step_time * peak),
      "compile_s": compile_s,
      "memory": memory,
      "final_loss": float(metrics["loss"]),
      "devices": mesh.devices.size,
      "device_kind": jax.devices()[0].device_kind,
      "mesh": dict(mesh.shape),
      "machine": common.machine(processor=True),
      "steps_timed": steps,
      "profile": None if profile is None else str(profile),
      "config": {k: to_dict(getattr(cfg, k)) for k in ("model", "optim")},
  }


def summary(result: dict) -> list[str]:
  """One line: step time, tokens/s, MFU and its peak, compile time, peak memory."""
  lines = [
      f"train: {result['step_time_s']:.4g} s/step (best {result['step_time_min_s']:.4g}), "
      f"{common.human_count(result['tokens_per_sec'])} tokens/s, MFU {100 * result['mfu']:.2f}% "
      f"of {result['peak_flops_mesh'] / 1e9:.1f} GFLOP/s ({result['peak_source']}), compile "
      f"{result['compile_s']:.1f} s, peak memory "
      f"{common.human_bytes(result['memory'].get('peak_bytes'))}"]
  if result["profile"] is not None:
    lines.append(f"profile of the {result['steps_timed']} timed steps: {result['profile']}")
  return lines


def _add_arguments(parser: argparse.ArgumentParser) -> None:
  common.add_config_arguments(parser, None)
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
  common.add_peak_flops_argument(parser)
  parser.add_argument("--profile", metavar="DIR", type=Path, default=None,
                      help="write a jax.profiler trace of the timed steps into DIR")


def _run(cfg: Config, args: argparse.Namespace) -> dict:
  return bench_train(common.pinned_peak_flops(cfg, args.peak_flops), args.steps, args.warmup,
                     args.profile)


BENCH = common.register(common.Bench(
    "train", "time the compiled train step", __doc__, _add_arguments, _run, summary,
    counts=(("steps", 1), ("warmup", 0))))
