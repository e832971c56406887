"""Benchmarks: ``python -m ttt_jax.bench train --config C [--set k=v] [--steps N]``.

``train`` times the compiled train step of a config on synthetic tokens (the data
pipeline is not what is measured) and prints one JSON object: step time, tokens/s,
MFU against the measured (or configured) peak, compile time and the compiled step's
memory analysis. Record results, with the machine, in ``benchmarks/RESULTS.md``.

``mhc`` (``python -m ttt_jax.bench mhc [--config C] [--rounds R]``) compares the mHC
residual (model.mhc_streams streams) with the plain residual on the same model: each
variant is compiled ``--replicas`` times (default 2), then all instances are timed in R
interleaved rounds (so a busy shared CPU slows them alike), each round of an instance
one untimed step after a switch of program and then ``--steps`` timed; it reports the
median switch step, median and best step times, the spread between replicas of the
same program (a systematic error of one instance that interleaving does not remove),
the overhead of mHC (ratio of medians, and paired: median and mean +- standard error of
the per-round ratios), the compiled peak memory with and without the 'mhc_streams'
remat policy, and mHC's throughput against the PyTorch reference's
(``--reference-tokens-per-sec``, measured on the same machine with
``benchmarks/torch_reference.py``).

``ttt`` (``python -m ttt_jax.bench ttt [--backbone mamba] [--batch 2] [--seq 512]
[--width 256] [--heads 4] [--mini-batch 16] [--dtype float32] [--remat-group 0]``)
times one TTT-Linear layer alone (projections, convs, inner TTT, output) on random
inputs: forward and forward+backward (gradients of every parameter and of the input)
with the inner model in the dual form and in the primal anchored form, and decoding
token by token (``ttt_linear_decode_step`` in a scan over the sequence). It reports
median and best times, tokens/s and the compiled peak memory (for decode also that of
one step, which does not grow with the sequence). Variants are compiled first, then
timed in interleaved rounds.

``io`` (``python -m ttt_jax.bench io [--config configs/quickstart.yaml] [--steps N]
[--saves S] [--spare-writer-cpu]``) measures the training stall caused by each async
checkpoint save, as a fraction of one step, the wall and CPU time of a save run alone,
and the tokens/s the data pipeline delivers alone against what the trainer consumes.

``cct`` (``python -m ttt_jax.bench cct [--config configs/cct_tier1_160m.yaml]
[--contexts 1024,4096,8192,32768]``) measures the live decode state of CCT working
memory (summary buffer + current step's K/V) against the KV cache of the same model with
causal attention: bytes of the arrays actually held after decoding each context of
random tokens through a randomly initialised model (``ttt_jax.cct_eval``). With
``--hash-chain`` it instead measures the governance overhead (the guide's < 2% target):
time per generated token of ``sampling.generate`` against ``generate_with_state`` plus
the host-side commitment hash chain (``ttt_jax.cct_chain.overhead_report``), fixed
steps, greedy, on a randomly initialised model of the config, in interleaved rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from ttt_jax import host_memory, sharding
from ttt_jax import metrics as metrics_lib
from ttt_jax.config import Config, ConfigError, TrainConfig, load_config, to_dict
from ttt_jax.train import build, compile_step, jit_train_step, train_flops_per_step, user_errors

if TYPE_CHECKING:
  from ttt_jax.checkpoint import Checkpointer


def standard_error(values: list[float]) -> float:
  """Standard error of the mean of ``values`` (nan for fewer than two)."""
  return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def synthetic_batch(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
  micro = cfg.train.batch_size // cfg.optim.grad_accum_steps // jax.process_count()
  tokens = rng.integers(0, cfg.data.vocab_size, (micro, cfg.data.seq_len + 1), np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def bench_train(cfg: Config, steps: int, warmup: int) -> dict:
  mesh = sharding.make_mesh(cfg.mesh)
  built = build(cfg, cfg.data.vocab_size, mesh)
  step_fn = jit_train_step(built)
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
PYTORCH_REFERENCE_TOKENS_PER_SEC = 1568.0
"""Median tokens/s of the handoff's PyTorch ``MHCTransformerLM`` at the bench_dense config
(n = 4, t_max = 20, AdamW, 2 threads), measured with ``benchmarks/torch_reference.py``
on the 2-core CPU of benchmarks/RESULTS.md (torch 2.13.0); issue 5 quoted ~295. On
another machine, measure it there and pass ``bench mhc --reference-tokens-per-sec``."""


def bench_mhc(cfg: Config, steps: int, warmup: int, rounds: int,
              reference_tokens_per_sec: float = PYTORCH_REFERENCE_TOKENS_PER_SEC,
              replicas: int = 2) -> dict:
  """Each variant is built and compiled ``replicas`` times (own executable, own state).

  On a shared CPU two instances of the *same* program keep different speeds for the
  whole run (their buffers land differently), so one instance per variant carries a
  systematic error that interleaving cannot average out. The spread between replicas of
  one variant measures it; the paired overheads pair replica k of one variant with
  replica k of the other, round by round.

  Each round of an instance starts with one untimed step (``switch_step_time_median_s``):
  the first step after another program ran is slower (by ~0.1 s for the mHC step at
  the bench_dense config), a cost of interleaving that back-to-back training steps do
  not pay. ``steps`` timed steps follow.
  """
  mesh = sharding.make_mesh(cfg.mesh)
  rng = np.random.default_rng(cfg.train.seed)
  batch = sharding.put_batch(synthetic_batch(cfg, rng), mesh)
  runs = {}
  for name, fields in MHC_VARIANTS.items():
    variant = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields))
    for replica in range(replicas):
      built = build(variant, variant.data.vocab_size, mesh)
      step_fn = jit_train_step(built)
      compiled, compile_s, memory = compile_step(step_fn, built.state, batch,
                                                 log=lambda _: None)
      state = built.state
      for _ in range(warmup):
        state, _ = compiled(state, batch)
      jax.block_until_ready(state)
      runs[name, replica] = {"compiled": compiled, "state": state, "times": [],
                             "switch_times": [], "compile_s": compile_s, "memory": memory}
  for _ in range(rounds):
    for run in runs.values():
      for step in range(steps + 1):
        start = time.perf_counter()
        run["state"], metrics = run["compiled"](run["state"], batch)
        jax.block_until_ready(metrics)
        (run["times"] if step else run["switch_times"]).append(time.perf_counter() - start)
  return {
      "benchmark": "mhc",
      **mhc_summary(runs, steps=steps, tokens=cfg.train.batch_size * cfg.data.seq_len,
                    reference_tokens_per_sec=reference_tokens_per_sec),
      "mhc_streams": cfg.model.mhc_streams,
      "steps_per_round": steps, "rounds": rounds, "replicas": replicas,
      "devices": jax.device_count(),
      "jax": jax.__version__,
      "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.processor() or ''}".strip(", "),
      "config": {k: to_dict(getattr(cfg, k)) for k in ("model", "optim", "train", "data")},
  }


def mhc_summary(runs: dict[tuple[str, int], dict], *, steps: int, tokens: int,
                reference_tokens_per_sec: float) -> dict:
  """``bench mhc``'s statistics from its timed runs, keyed (variant, replica), each with
  ``times`` (the timed steps, ``steps`` per round in round order), ``switch_times``,
  ``compile_s`` and ``memory`` (``compile_step``'s memory analysis)."""
  replicas = 1 + max(replica for _, replica in runs)
  variants = {}
  for name in MHC_VARIANTS:
    replica_runs = [runs[name, replica] for replica in range(replicas)]
    times = [t for run in replica_runs for t in run["times"]]
    replica_medians = [statistics.median(run["times"]) for run in replica_runs]
    median = statistics.median(times)
    memory = replica_runs[0]["memory"]
    variants[name] = {
        "step_time_median_s": median, "step_time_min_s": min(times),
        "replica_step_time_medians_s": replica_medians,
        "replica_spread": (max(replica_medians) - min(replica_medians)) / median,
        "switch_step_time_median_s": statistics.median(
            t for run in replica_runs for t in run["switch_times"]),
        "tokens_per_sec_median": tokens / median,
        "tokens_per_sec_best": tokens / min(times),
        "peak_bytes": memory.get("peak_bytes"),
        "temp_bytes": memory.get("temp_size_in_bytes"),
        "compile_s": statistics.fmean(run["compile_s"] for run in replica_runs),
    }

  def overhead(a: str, b: str, key: str) -> float:
    return variants[a][key] / variants[b][key] - 1.0

  def paired_overhead(a: str, b: str) -> dict:
    """Per-round ratios of mean step times, replica k of ``a`` over replica k of ``b``
    (rounds are adjacent in time, so a slow stretch of a shared machine slows both
    variants of a pair); ``per_replica``: the mean ratio of each replica pair."""
    def round_means(run: dict) -> list[float]:
      return [statistics.fmean(run["times"][i:i + steps])
              for i in range(0, len(run["times"]), steps)]

    pairs = [[ta / tb - 1.0 for ta, tb in zip(round_means(runs[a, k]), round_means(runs[b, k]))]
             for k in range(replicas)]
    ratios = [r for pair in pairs for r in pair]
    return {"median": statistics.median(ratios), "mean": statistics.fmean(ratios),
            "stderr": standard_error(ratios), "rounds": len(pairs[0]), "replicas": replicas,
            "per_replica": [statistics.fmean(pair) for pair in pairs]}

  return {
      "variants": variants,
      "overhead_median": overhead("mhc", "plain", "step_time_median_s"),
      "overhead_best": overhead("mhc", "plain", "step_time_min_s"),
      "overhead_remat_median": overhead("mhc_remat", "plain_remat", "step_time_median_s"),
      "overhead_paired": paired_overhead("mhc", "plain"),
      "overhead_remat_paired": paired_overhead("mhc_remat", "plain_remat"),
      "identical_program_spread": (max(v["replica_spread"] for v in variants.values())
                                   if replicas > 1 else None),
      "mhc_peak_bytes_remat_vs_none": (variants["mhc_remat"]["peak_bytes"]
                                       / variants["mhc"]["peak_bytes"]),
      "pytorch_reference_tokens_per_sec": reference_tokens_per_sec,
      "speedup_vs_pytorch_reference_median": (variants["mhc"]["tokens_per_sec_median"]
                                              / reference_tokens_per_sec),
      "speedup_vs_pytorch_reference_remat_median": (
          variants["mhc_remat"]["tokens_per_sec_median"] / reference_tokens_per_sec),
  }


def bench_ttt(backbone: str, batch: int, seq: int, width: int, heads: int, mini_batch: int,
              dtype: str, remat_group: int, iters: int, warmup: int) -> dict:
  import jax.numpy as jnp
  from flax import nnx

  from ttt_jax.config import ModelConfig
  from ttt_jax.models import ttt_linear

  cfg = ModelConfig(mixer="ttt_linear", ttt_backbone=backbone, d_model=width, n_heads=heads,
                    ttt_mini_batch=mini_batch, ttt_remat_group=remat_group, dtype=dtype,
                    n_layers=1)
  layer = ttt_linear.TTTLinear(cfg, rngs=nnx.Rngs(0))
  params, spec = layer.params(), layer.spec
  rng = np.random.default_rng(0)
  x_BxTxD = jnp.asarray(rng.normal(size=(batch, seq, width)), jnp.dtype(dtype))
  cotangent_BxTxD = jnp.asarray(rng.normal(size=(batch, seq, width)), jnp.dtype(dtype))

  def forward(params, x_BxTxD, form):
    return ttt_linear.ttt_linear_forward(params, spec, x_BxTxD, inner_form=form)[0]

  def forward_backward(params, x_BxTxD, form):
    def loss(params, x_BxTxD):
      y_BxTxD = forward(params, x_BxTxD, form).astype(jnp.float32)
      return jnp.sum(y_BxTxD * cotangent_BxTxD.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1))(params, x_BxTxD)

  def decode_sequence(params, x_BxTxD):
    cache = ttt_linear.init_cache(params, spec, batch, x_BxTxD.dtype)
    step = lambda cache, x_BxD: ttt_linear.ttt_linear_decode_step(params, spec, cache, x_BxD)
    _, y_TxBxD = jax.lax.scan(step, cache, jnp.swapaxes(x_BxTxD, 0, 1))
    return y_TxBxD

  cases = {}
  for form in ("dual", "primal"):
    cases[f"{form}_fwd_bwd"] = (lambda p, x, f=form: forward_backward(p, x, f), params, x_BxTxD)
    cases[f"{form}_fwd"] = (lambda p, x, f=form: forward(p, x, f), params, x_BxTxD)
  cases["decode"] = (decode_sequence, params, x_BxTxD)
  compiled, results = {}, {}
  for name, (fn, *args) in cases.items():
    compiled[name], compile_s, memory = compile_step(jax.jit(fn), *args, log=lambda _: None)
    results[name] = {"compile_s": compile_s, "peak_bytes": memory.get("peak_bytes")}
    for _ in range(warmup):
      jax.block_until_ready(compiled[name](*args))
  times = {name: [] for name in cases}
  for _ in range(iters):  # interleaved rounds: a busy shared CPU slows every variant alike
    for name, (_, *args) in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled[name](*args))
      times[name].append(time.perf_counter() - start)
  for name, samples in times.items():
    median = statistics.median(samples)
    results[name].update({"median_ms": 1e3 * median, "best_ms": 1e3 * min(samples),
                          "tokens_per_sec": batch * seq / median})
  decode = results["decode"]
  decode["per_token_ms"] = decode["median_ms"] / seq
  cache = ttt_linear.init_cache(params, spec, batch, x_BxTxD.dtype)
  one_step = jax.jit(lambda p, c, x: ttt_linear.ttt_linear_decode_step(p, spec, c, x))
  _, _, step_memory = compile_step(one_step, params, cache, x_BxTxD[:, 0], log=lambda _: None)
  decode["one_step_peak_bytes"] = step_memory.get("peak_bytes")
  return {
      "benchmark": "ttt",
      "shape": {"backbone": backbone, "batch": batch, "seq": seq, "width": width,
                "heads": heads, "head_dim": width // heads, "mini_batch": mini_batch,
                "dtype": dtype, "remat_group": remat_group},
      "results": results,
      "dual_speedup_fwd_bwd": (results["primal_fwd_bwd"]["median_ms"]
                               / results["dual_fwd_bwd"]["median_ms"]),
      "dual_speedup_fwd": results["primal_fwd"]["median_ms"] / results["dual_fwd"]["median_ms"],
      "device_kind": jax.devices()[0].device_kind,
      "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.processor() or ''}".strip(", "),
  }


def save_cost(ckpt: Checkpointer, state: Any, data_iter: Any, meta: dict, saves: int,
              first_step: int) -> dict[str, float]:
  """Wall and process CPU time (user + system, every thread) of ``saves`` checkpoint saves
  of ``state`` at steps ``first_step``, ``first_step + 1``, ..., each run alone and waited
  for: the work a save adds to the machine, which the train step must share when no CPU
  core is spare. Medians over the saves."""
  walls, cpus = [], []
  ckpt.wait()
  for k in range(saves):
    wall, cpu = time.perf_counter(), time.process_time()
    ckpt.save(first_step + k, state, data_iter, meta)
    ckpt.wait()
    cpus.append(time.process_time() - cpu)
    walls.append(time.perf_counter() - wall)
  return {"save_alone_wall_s": statistics.median(walls),
          "save_alone_cpu_s": statistics.median(cpus)}


def bench_io(cfg: Config, steps: int, saves: int, spare_writer_cpu: bool = False) -> dict:
  """Checkpoint stall and data throughput against the trainer's consumption.

  The steps run as in the train loop: each is dispatched before the previous one's
  metrics are read, and a save first waits for its step's metrics (the loop never saves
  a state whose loss it has not checked), then calls ``Checkpointer.save`` with
  ``cfg.checkpoint``'s settings. Intervals of ``steps // saves`` steps alternate between
  no save and one save at the interval's first step, and each interval's wall time is
  taken from its first dispatch to its last result. The background write may spread
  over several steps, so the stall of a save is the mean, over consecutive pairs, of
  the saving interval's wall time minus the save-free one's just before it, with the
  standard error of that mean; pairing keeps slow drifts of a shared machine out of the
  difference (the median of those differences is reported too: it is robust to the rare
  multi-second hiccups of a shared VM). ``save_call_s`` is the time the save call holds
  the training thread. The data pipeline (real corpus, this config's seq_len and batch)
  is timed alone.

  ``spare_writer_cpu`` models a host with a CPU core that training leaves free (as on a
  GPU host, where the step runs on the accelerator): XLA runs on all CPUs but the last
  and the checkpoint writer on the last one. Call it before JAX starts its CPU backend.
  """
  import tempfile

  from ttt_jax import checkpoint as ckpt_lib
  from ttt_jax.data import corpus as corpus_lib
  from ttt_jax.data import pipeline

  writer_cpus = None
  if spare_writer_cpu:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
      raise ConfigError("--spare-writer-cpu: needs at least 2 CPUs")
    if not (cfg.checkpoint.async_save and cfg.checkpoint.device_snapshot):
      raise ConfigError("--spare-writer-cpu: needs checkpoint.async_save and "
                        "checkpoint.device_snapshot (the background writer)")
    writer_cpus = frozenset(cpus[-1:])
    os.sched_setaffinity(0, cpus[:-1])  # XLA's threads, started below, inherit this
  corpus = corpus_lib.prepare_corpus(cfg.data, log=lambda _: None)
  mesh = sharding.make_mesh(cfg.mesh)
  built = build(cfg, corpus.vocab_size, mesh)
  step_fn = jit_train_step(built)
  data_iter = iter(pipeline.train_dataset(
      corpus.train_tokens, seq_len=cfg.data.seq_len, global_batch_size=cfg.train.batch_size,
      seed=cfg.train.seed, shuffle=cfg.data.shuffle, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=cfg.data.worker_count,
      eos_id=corpus_lib.document_eos_id(cfg.data, corpus)))
  batches = [sharding.put_batch(next(data_iter), mesh) for _ in range(4)]
  compiled, _, _ = compile_step(step_fn, built.state, batches[0], log=lambda _: None)
  state = built.state
  for i in range(3):
    state, metrics = compiled(state, batches[i % 4])
  jax.block_until_ready(metrics)

  every = max(steps // saves, 2)
  walls: dict[bool, list[float]] = {False: [], True: []}
  save_calls = []
  with tempfile.TemporaryDirectory() as directory:
    ckpt = ckpt_lib.Checkpointer(Path(directory), keep=2, async_save=cfg.checkpoint.async_save,
                                 device_snapshot=cfg.checkpoint.device_snapshot,
                                 writer_cpus=writer_cpus, compress=cfg.checkpoint.compress)
    meta = {"process_count": jax.process_count()}
    for interval in range(2 * saves):
      saving, pending = interval % 2 == 1, None
      start = time.perf_counter()
      for i in range(every):
        state, metrics = compiled(state, batches[i % 4])
        if pending is not None:
          float(pending["loss"])
        pending = metrics
        if saving and i == 0:
          float(pending["loss"])
          call = time.perf_counter()
          ckpt.save(interval, state, data_iter, meta)
          save_calls.append(time.perf_counter() - call)
      float(pending["loss"])
      walls[saving].append(time.perf_counter() - start)
    cost = save_cost(ckpt, state, data_iter, meta, saves, first_step=2 * saves)
    ckpt.close()
  step_time = statistics.median(walls[False]) / every
  differences = [w - wo for w, wo in zip(walls[True], walls[False])]
  stall = statistics.fmean(differences)
  stall_stderr = standard_error(differences)
  consumed = cfg.train.batch_size * cfg.data.seq_len / step_time

  data_iter = iter(pipeline.train_dataset(
      corpus.train_tokens, seq_len=cfg.data.seq_len, global_batch_size=cfg.train.batch_size,
      seed=cfg.train.seed + 1, shuffle=cfg.data.shuffle, process_index=0, process_count=1,
      worker_count=cfg.data.worker_count, eos_id=corpus_lib.document_eos_id(cfg.data, corpus)))
  next(data_iter)
  n_batches, start = 0, time.perf_counter()
  while time.perf_counter() - start < 2.0:
    next(data_iter)
    n_batches += 1
  delivered = n_batches * cfg.train.batch_size * cfg.data.seq_len / (time.perf_counter() - start)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  return {
      "benchmark": "io",
      "step_time_s": step_time,
      "checkpoint_bytes": state_bytes,
      "saves": saves,
      "steps_per_interval": every,
      "async_save": cfg.checkpoint.async_save,
      "device_snapshot": cfg.checkpoint.device_snapshot,
      "compress": cfg.checkpoint.compress,
      "xla_cpus": sorted(os.sched_getaffinity(0)),
      "writer_cpus": sorted(writer_cpus) if writer_cpus else "shared",
      "save_call_s": save_calls,
      "stall_per_save_s": stall,
      "stall_per_save_stderr_s": stall_stderr,
      "stall_per_save_median_s": statistics.median(differences),
      "stall_fraction_of_step": stall / step_time,
      "median_save_call_s": statistics.median(save_calls),
      **cost,
      "save_alone_cpu_fraction_of_step": cost["save_alone_cpu_s"] / step_time,
      "interval_wall_s": {"without_save": walls[False], "with_save": walls[True]},
      "trainer_tokens_per_sec": consumed,
      "data_tokens_per_sec": delivered,
      "data_over_trainer": delivered / consumed,
      "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
  }


def bench_hash_chain(cfg: Config, batch: int, prompt_len: int, new_tokens: int, rounds: int
                     ) -> dict:
  """Generation time per token without and with the commitment hash chain
  (``cct_chain.overhead_report``) on a randomly initialised model of the config."""
  import jax.numpy as jnp
  from flax import nnx

  from ttt_jax import cct_chain
  from ttt_jax.models import lm

  model = lm.LM(cfg.model, cfg.data.vocab_size, rngs=nnx.Rngs(cfg.train.seed))
  prompt = np.random.default_rng(cfg.train.seed).integers(
      0, cfg.data.vocab_size, (batch, prompt_len), np.int32)
  report = cct_chain.overhead_report(model, prompt, new_tokens, rounds)
  report["shape"].update(n_layers=cfg.model.n_layers, d_model=cfg.model.d_model,
                         d_summary=cfg.model.cct_d_summary, step_len=cfg.model.cct_step_len,
                         dtype=str(jnp.dtype(cfg.model.dtype)), vocab=cfg.data.vocab_size)
  return {"benchmark": "cct_hash_chain", **report,
          "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
          "jax": jax.__version__, "backend": jax.default_backend()}


def check_counts(args: argparse.Namespace, *names: str) -> None:
  """ConfigError naming the first of the command-line counts ``names`` that is < 1."""
  for name in names:
    if getattr(args, name) < 1:
      raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")


def main(argv: list[str] | None = None, reexec: bool = False) -> None:
  """``reexec``: see ``ttt_jax.train.main``."""
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
  mhc_p.add_argument("--steps", type=int, default=3,
                     help="timed steps per round, after one untimed step")
  mhc_p.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
  mhc_p.add_argument("--replicas", type=int, default=2,
                     help="separately compiled instances of each variant")
  mhc_p.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
  mhc_p.add_argument("--reference-tokens-per-sec", type=float,
                     default=PYTORCH_REFERENCE_TOKENS_PER_SEC,
                     help="the PyTorch reference's tokens/s on this machine "
                          "(benchmarks/torch_reference.py)")
  ttt_p = sub.add_parser("ttt", help="one TTT-Linear layer: dual vs primal vs decode")
  ttt_p.add_argument("--backbone", default="mamba", choices=("mamba", "transformer"))
  ttt_p.add_argument("--batch", type=int, default=2)
  ttt_p.add_argument("--seq", type=int, default=512)
  ttt_p.add_argument("--width", type=int, default=256)
  ttt_p.add_argument("--heads", type=int, default=4)
  ttt_p.add_argument("--mini-batch", type=int, default=16)
  ttt_p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ttt_p.add_argument("--remat-group", type=int, default=0)
  ttt_p.add_argument("--iters", type=int, default=10, help="timed rounds (one call of each variant)")
  ttt_p.add_argument("--warmup", type=int, default=2, help="untimed calls after compile")
  cct_p = sub.add_parser("cct", help="CCT working memory vs KV cache: measured bytes")
  cct_p.add_argument("--config", default="configs/cct_tier1_160m.yaml")
  cct_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  cct_p.add_argument("--contexts", default="1024,4096,8192,32768")
  cct_p.add_argument("--baseline-decode-tokens", type=int, default=0,
                     help="decode only this many tokens into the baseline's cache (0: all)")
  cct_p.add_argument("--hash-chain", action="store_true",
                     help="measure the commitment hash chain's overhead instead of memory")
  cct_p.add_argument("--batch", type=int, default=1, help="--hash-chain: sequences")
  cct_p.add_argument("--prompt-len", type=int, default=32, help="--hash-chain: prompt tokens")
  cct_p.add_argument("--new-tokens", type=int, default=256,
                     help="--hash-chain: generated tokens per sequence")
  cct_p.add_argument("--rounds", type=int, default=10, help="--hash-chain: timing rounds")
  io_p = sub.add_parser("io", help="async checkpoint stall and data pipeline throughput")
  io_p.add_argument("--config", default="configs/quickstart.yaml")
  io_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  io_p.add_argument("--steps", type=int, default=40,
                    help="timed train steps per half (with saves / without)")
  io_p.add_argument("--saves", type=int, default=5, help="async saves")
  io_p.add_argument("--spare-writer-cpu", action="store_true",
                    help="run XLA on all CPUs but the last and the checkpoint writer on it")
  args = parser.parse_args(argv)
  with user_errors():
    cfg = None if args.what == "ttt" else load_config(args.config, args.set)
  hugepages = TrainConfig.host_hugepages if cfg is None else cfg.train.host_hugepages
  if reexec and hugepages:  # bench ttt has no config: the field's default
    host_memory.reexec_with_hugepages("ttt_jax.bench", argv)
  malloc_note = host_memory.status(hugepages)
  if args.what == "ttt":
    with user_errors():
      result = bench_ttt(args.backbone, args.batch, args.seq, args.width, args.heads,
                         args.mini_batch, args.dtype, args.remat_group, args.iters,
                         args.warmup)
    print(json.dumps({**result, "host_malloc": malloc_note}, indent=2))
    return
  with user_errors():
    if args.what == "mhc":
      if not args.reference_tokens_per_sec > 0:
        raise ConfigError("--reference-tokens-per-sec: must be > 0, got "
                          f"{args.reference_tokens_per_sec}")
      check_counts(args, "steps", "rounds", "replicas")
      if args.warmup < 0:
        raise ConfigError(f"--warmup: must be >= 0, got {args.warmup}")
      result = bench_mhc(cfg, args.steps, args.warmup, args.rounds,
                         args.reference_tokens_per_sec, args.replicas)
    elif args.what == "io":
      result = bench_io(cfg, args.steps, args.saves, args.spare_writer_cpu)
    elif args.what == "cct" and args.hash_chain:
      if cfg.model.mixer != "cct":
        raise ConfigError(f"model.mixer: --hash-chain needs 'cct', got {cfg.model.mixer!r}")
      check_counts(args, "batch", "prompt_len", "new_tokens", "rounds")
      result = bench_hash_chain(cfg, args.batch, args.prompt_len, args.new_tokens, args.rounds)
    elif args.what == "cct":
      from ttt_jax import cct_eval  # pylint: disable=import-outside-toplevel
      result = {"benchmark": "cct", **cct_eval.compression_report(
          cfg.model, cfg.data.vocab_size, [int(c) for c in args.contexts.split(",")],
          args.baseline_decode_tokens),
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                "jax": jax.__version__, "backend": jax.default_backend()}
    else:
      result = bench_train(cfg, args.steps, args.warmup)
  print(json.dumps({**result, "host_malloc": malloc_note}, indent=2))


if __name__ == "__main__":
  main(reexec=True)
