"""Benchmarks: ``python -m ttt_jax.bench train --config C [--set k=v] [--steps N]``.

``train`` times the compiled train step of a config on synthetic tokens (the data
pipeline is not what is measured) and prints one JSON object: step time, tokens/s,
MFU against the measured (or configured) peak, compile time and the compiled step's
memory analysis. Record results, with the machine, in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from ttt_jax import metrics as metrics_lib
from ttt_jax import sharding
from ttt_jax.config import Config, load_config, to_dict
from ttt_jax.train import build, compile_step, make_train_step, train_flops_per_step, user_errors


def synthetic_batch(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
  micro = cfg.train.batch_size // cfg.optim.grad_accum_steps // jax.process_count()
  tokens = rng.integers(0, cfg.data.vocab_size, (micro, cfg.data.seq_len + 1), np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def bench_train(cfg: Config, steps: int, warmup: int) -> dict:
  mesh = sharding.make_mesh(cfg.mesh)
  built = build(cfg, cfg.data.vocab_size, mesh)
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in ("inputs", "targets")}
  step_fn = jax.jit(make_train_step(built.graphdef, built.tx),
                    in_shardings=(built.state_shardings, batch_shardings),
                    out_shardings=(built.state_shardings, sharding.replicated(mesh)),
                    donate_argnums=0)
  rng = np.random.default_rng(cfg.train.seed)
  batches = [sharding.put_batch(synthetic_batch(cfg, rng), mesh) for _ in range(4)]
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
  peak, source = metrics_lib.peak_flops_per_device(cfg.train.peak_flops)
  if jax.devices()[0].platform == "cpu" and cfg.train.peak_flops == 0:
    peak /= jax.local_device_count()
  flops = train_flops_per_step(cfg, cfg.data.vocab_size)
  return {
      "benchmark": "train",
      "step_time_s": step_time,
      "step_time_min_s": min(times),
      "tokens_per_sec": cfg.train.batch_size * cfg.data.seq_len / step_time,
      "train_flops_per_step": flops,
      "achieved_flops_per_sec": flops / step_time,
      "peak_flops_per_device": peak,
      "peak_source": source,
      "mfu": flops / (step_time * peak * jax.device_count()),
      "compile_s": compile_s,
      "memory": memory,
      "final_loss": float(metrics["loss"]),
      "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind,
      "mesh": dict(mesh.shape),
      "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.processor() or ''}".strip(", "),
      "steps_timed": steps,
      "config": {k: to_dict(getattr(cfg, k)) for k in ("model", "optim")},
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.bench", description=__doc__)
  sub = parser.add_subparsers(dest="what", required=True)
  train_p = sub.add_parser("train", help="time the compiled train step")
  train_p.add_argument("--config", required=True)
  train_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  train_p.add_argument("--steps", type=int, default=10, help="timed steps")
  train_p.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
  args = parser.parse_args(argv)
  with user_errors():
    cfg = load_config(args.config, args.set)
    result = bench_train(cfg, args.steps, args.warmup)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
