"""``bench train``: ``python -m ttt_jax.bench train --config C [--set k=v] [--steps N]``.

Times the compiled train step of a config on synthetic tokens (the data pipeline is not
what is measured) and prints one JSON object: step time, tokens/s, MFU against the
measured (or configured) peak, compile time and the compiled step's memory analysis.
Record results, with the machine, in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from ttt_jax import metrics as metrics_lib
from ttt_jax import sharding
from ttt_jax.bench import common
from ttt_jax.config import Config, to_dict
from ttt_jax.training.state import build
from ttt_jax.training.step import compile_step, jit_train_step, train_flops_per_step


def bench_train(cfg: Config, steps: int, warmup: int) -> dict:
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
    start = time.perf_counter()
    for micro in range(accum):
      state, metrics = compiled(state, batches[(i * accum + micro) % len(batches)])
    jax.block_until_ready(metrics)
    if i >= warmup:
      times.append(time.perf_counter() - start)
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
      "config": {k: to_dict(getattr(cfg, k)) for k in ("model", "optim")},
  }


def _add_arguments(parser: argparse.ArgumentParser) -> None:
  common.add_config_arguments(parser, None)
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")


BENCH = common.register(common.Bench(
    "train", "time the compiled train step", __doc__, _add_arguments,
    lambda cfg, args: bench_train(cfg, args.steps, args.warmup),
    counts=(("steps", 1), ("warmup", 0))))
