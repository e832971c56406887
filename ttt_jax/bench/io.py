"""``bench io``: ``python -m ttt_jax.bench io [--config configs/quickstart.yaml] [--steps N]
[--saves S] [--spare-writer-cpu]``.

Measures the training stall caused by each async checkpoint save, as a fraction of one
step, the wall and CPU time of a save run alone and of a restore, the cost of the
checksums a save records and a restore verifies (``checkpoint.state_checksums``), and
the tokens/s the data pipeline delivers alone against what the trainer consumes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax

from ttt_jax import checkpoint as ckpt_lib
from ttt_jax import sharding
from ttt_jax.bench import common
from ttt_jax.config import Config
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.data import pipeline
from ttt_jax.errors import ConfigError
from ttt_jax.training.state import build
from ttt_jax.training.step import compile_step, jit_train_step


def save_cost(ckpt: ckpt_lib.Checkpointer, state: Any, data_iter: Any, meta: dict, saves: int,
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


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], list[float]]:
  """(wall seconds, process CPU seconds) of each of ``repeats`` calls of ``fn``."""
  walls, cpus = [], []
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    cpus.append(time.process_time() - cpu)
    walls.append(time.perf_counter() - wall)
  return walls, cpus


def checksum_cost(ckpt: ckpt_lib.Checkpointer, state: Any, step: int,
                  repeats: int) -> dict[str, float]:
  """Wall and process CPU time of the state's checksums (``state_checksums``: the
  on-device hash and its one fetch, which a save does once on the saved state and a
  restore once on the restored one), and of a restore of checkpoint ``step`` with its
  verification. Medians over ``repeats``, after one untimed call."""
  jax.block_until_ready(state)
  ckpt_lib.state_checksums(state)
  walls, cpus = _timed(lambda: ckpt_lib.state_checksums(state), repeats)
  abstract = ckpt_lib.with_shardings(state, jax.tree.map(lambda x: x.sharding, state))
  restore_walls, restore_cpus = _timed(
      lambda: jax.block_until_ready(ckpt.restore(step, abstract, None).state), repeats)
  return {"checksum_wall_s": statistics.median(walls),
          "checksum_cpu_s": statistics.median(cpus),
          "restore_wall_s": statistics.median(restore_walls),
          "restore_cpu_s": statistics.median(restore_cpus)}


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
  checksum_compile = time.perf_counter()  # once per run, in its first save
  ckpt_lib.state_checksums(state)
  checksum_compile = time.perf_counter() - checksum_compile
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
    ckpt.wait()
    cost.update(checksum_cost(ckpt, state, ckpt.all_steps()[-1], saves))
    ckpt.close()
  step_time = statistics.median(walls[False]) / every
  differences = [w - wo for w, wo in zip(walls[True], walls[False])]
  stall = statistics.fmean(differences)
  stall_stderr = common.standard_error(differences)
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
      "checksum_first_call_wall_s": checksum_compile,
      "save_alone_cpu_fraction_of_step": cost["save_alone_cpu_s"] / step_time,
      "checksum_cpu_fraction_of_save": cost["checksum_cpu_s"] / cost["save_alone_cpu_s"],
      "checksum_wall_fraction_of_save": cost["checksum_wall_s"] / cost["save_alone_wall_s"],
      "checksum_cpu_fraction_of_restore": cost["checksum_cpu_s"] / cost["restore_cpu_s"],
      "checksum_wall_fraction_of_restore": cost["checksum_wall_s"] / cost["restore_wall_s"],
      "interval_wall_s": {"without_save": walls[False], "with_save": walls[True]},
      "trainer_tokens_per_sec": consumed,
      "data_tokens_per_sec": delivered,
      "data_over_trainer": delivered / consumed,
      "machine": common.machine(),
  }


def summary(result: dict) -> list[str]:
  """The stall of a save, a save's and a restore's own cost, the data rate."""
  return [
      f"io: step {result['step_time_s']:.4g} s; stall per save "
      f"{1e3 * result['stall_per_save_s']:.1f} ms +- {1e3 * result['stall_per_save_stderr_s']:.1f}"
      f" ({100 * result['stall_fraction_of_step']:.1f}% of a step; median "
      f"{1e3 * result['stall_per_save_median_s']:.1f} ms), save call "
      f"{1e3 * result['median_save_call_s']:.1f} ms",
      f"a save alone: {result['save_alone_wall_s']:.3f} s wall, {result['save_alone_cpu_s']:.3f} s "
      f"CPU ({common.human_bytes(result['checkpoint_bytes'])}); a restore "
      f"{result['restore_wall_s']:.3f} s; checksums "
      f"{100 * result['checksum_cpu_fraction_of_save']:.1f}% of a save's CPU, "
      f"{100 * result['checksum_cpu_fraction_of_restore']:.1f}% of a restore's",
      f"data pipeline: {common.human_count(result['data_tokens_per_sec'])} tokens/s alone, "
      f"{result['data_over_trainer']:.1f}x the trainer's "
      f"{common.human_count(result['trainer_tokens_per_sec'])}"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
  common.add_config_arguments(parser, "configs/quickstart.yaml")
  parser.add_argument("--steps", type=int, default=40,
                      help="timed train steps per half (with saves / without)")
  parser.add_argument("--saves", type=int, default=5, help="async saves")
  parser.add_argument("--spare-writer-cpu", action="store_true",
                      help="run XLA on all CPUs but the last and the checkpoint writer on it")


BENCH = common.register(common.Bench(
    "io", "async checkpoint stall and data pipeline throughput", __doc__, _add_arguments,
    lambda cfg, args: bench_io(cfg, args.steps, args.saves, args.spare_writer_cpu), summary,
    counts=(("steps", 1), ("saves", 1))))
