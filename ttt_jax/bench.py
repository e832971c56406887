"""Benchmarks: ``python -m ttt_jax.bench train --config C [--set k=v] [--steps N]``.

``train`` times the compiled train step of a config on synthetic tokens (the data
pipeline is not what is measured) and prints one JSON object: step time, tokens/s,
MFU against the measured (or configured) peak, compile time and the compiled step's
memory analysis. Record results, with the machine, in ``benchmarks/RESULTS.md``.

``mhc`` (``python -m ttt_jax.bench mhc [--config C] [--rounds R]``) compares the mHC
residual (model.mhc_streams streams) with the plain residual on the same model: the
variants are compiled once, then timed in R interleaved rounds (so a busy shared CPU
slows them alike); it reports median and best step times, the overhead of mHC, and the
compiled peak memory with and without the 'mhc_streams' remat policy.
"""

from __future__ import annotations

import argparse
import dataclasses
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
      "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.processor() or ''}".strip(", "),
      "steps_timed": steps,
      "config": {k: to_dict(getattr(cfg, k)) for k in ("model", "optim")},
  }


MHC_VARIANTS = {
    "plain": {"residual": "plain", "remat": "none"},
    "mhc": {"residual": "mhc", "remat": "none"},
    "plain_remat": {"residual": "plain", "remat": "mhc_streams"},
    "mhc_remat": {"residual": "mhc", "remat": "mhc_streams"},
}
"""``bench mhc`` variants: model-config fields replaced in the given config."""
PYTORCH_REFERENCE_TOKENS_PER_SEC = 295.0
"""The handoff's PyTorch ``MHCTransformerLM`` at the bench_dense config on this CPU
(issue 5); the target is 8x."""


def bench_mhc(cfg: Config, steps: int, warmup: int, rounds: int) -> dict:
  mesh = sharding.make_mesh(cfg.mesh)
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in ("inputs", "targets")}
  rng = np.random.default_rng(cfg.train.seed)
  batch = sharding.put_batch(synthetic_batch(cfg, rng), mesh)
  runs = {}
  for name, fields in MHC_VARIANTS.items():
    variant = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields))
    built = build(variant, variant.data.vocab_size, mesh)
    step_fn = jax.jit(make_train_step(built.graphdef, built.tx),
                      in_shardings=(built.state_shardings, batch_shardings),
                      out_shardings=(built.state_shardings, sharding.replicated(mesh)),
                      donate_argnums=0)
    compiled, compile_s, memory = compile_step(step_fn, built.state, batch, log=lambda _: None)
    state = built.state
    for _ in range(warmup):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    runs[name] = {"compiled": compiled, "state": state, "times": [],
                  "compile_s": compile_s, "memory": memory}
  for _ in range(rounds):
    for run in runs.values():
      for _ in range(steps):
        start = time.perf_counter()
        run["state"], metrics = run["compiled"](run["state"], batch)
        jax.block_until_ready(metrics)
        run["times"].append(time.perf_counter() - start)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  variants = {}
  for name, run in runs.items():
    median = statistics.median(run["times"])
    variants[name] = {
        "step_time_median_s": median, "step_time_min_s": min(run["times"]),
        "tokens_per_sec_median": tokens / median,
        "tokens_per_sec_best": tokens / min(run["times"]),
        "peak_bytes": run["memory"].get("peak_bytes"),
        "temp_bytes": run["memory"].get("temp_size_in_bytes"),
        "compile_s": run["compile_s"],
    }

  def overhead(a: str, b: str, key: str) -> float:
    return variants[a][key] / variants[b][key] - 1.0

  return {
      "benchmark": "mhc",
      "variants": variants,
      "overhead_median": overhead("mhc", "plain", "step_time_median_s"),
      "overhead_best": overhead("mhc", "plain", "step_time_min_s"),
      "overhead_remat_median": overhead("mhc_remat", "plain_remat", "step_time_median_s"),
      "mhc_peak_bytes_remat_vs_none": (variants["mhc_remat"]["peak_bytes"]
                                       / variants["mhc"]["peak_bytes"]),
      "speedup_vs_pytorch_reference_median": (variants["mhc"]["tokens_per_sec_median"]
                                              / PYTORCH_REFERENCE_TOKENS_PER_SEC),
      "mhc_streams": cfg.model.mhc_streams,
      "steps_per_round": steps, "rounds": rounds,
      "devices": jax.device_count(),
      "jax": jax.__version__,
      "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.processor() or ''}".strip(", "),
      "config": {k: to_dict(getattr(cfg, k)) for k in ("model", "optim", "train", "data")},
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.bench", description=__doc__)
  sub = parser.add_subparsers(dest="what", required=True)
  train_p = sub.add_parser("train", help="time the compiled train step")
  train_p.add_argument("--config", required=True)
  train_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  train_p.add_argument("--steps", type=int, default=10, help="timed steps")
  train_p.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
  mhc_p = sub.add_parser("mhc", help="mHC vs plain residual: step time and peak memory")
  mhc_p.add_argument("--config", default="configs/bench_dense.yaml")
  mhc_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  mhc_p.add_argument("--steps", type=int, default=5, help="timed steps per round")
  mhc_p.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
  mhc_p.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
  args = parser.parse_args(argv)
  with user_errors():
    cfg = load_config(args.config, args.set)
    if args.what == "mhc":
      result = bench_mhc(cfg, args.steps, args.warmup, args.rounds)
    else:
      result = bench_train(cfg, args.steps, args.warmup)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
