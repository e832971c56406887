"""What the benchmarks share: the ``Bench`` entry each subject registers, its common
flags (``--config``, ``--set``, ``--peak-flops``), synthetic batches, the machine's
description, the statistics of timed samples and the units of the human summaries."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np

from ttt_jax import registry
from ttt_jax.config import Config
from ttt_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Bench:
  """One ``python -m ttt_jax.bench <name>`` subject, registered in ``registry.BENCHES``."""
  name: str
  help: str
  """One line for ``bench --help``."""
  description: str
  """What it measures (``bench <name> --help``): the subject module's docstring."""
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[Config | None, argparse.Namespace], dict[str, Any]]
  """The JSON-able result, from the config (``--config`` with ``--set``) and the flags."""
  summary: Callable[[dict[str, Any]], list[str]]
  """The result for people: a line per variant (or a small table), printed on stderr
  after the JSON on stdout."""
  uses_config: bool = True
  """False: the subject takes no ``--config`` (``run`` gets None)."""
  counts: tuple[tuple[str, int], ...] = ()
  """(flag's dest, least value) of every count flag: ``check_counts`` checks them all
  before the subject loads its config or starts JAX."""


def register(bench: Bench) -> Bench:
  return registry.BENCHES.register(bench.name, bench)


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
  """``--config`` (required when ``default`` is None) and ``--set KEY=VALUE``."""
  if default is None:
    parser.add_argument("--config", required=True, help="YAML config file")
  else:
    parser.add_argument("--config", default=default, help=f"YAML config file (default {default})")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set train.batch_size=8 (repeatable)")


def add_peak_flops_argument(parser: argparse.ArgumentParser) -> None:
  """``--peak-flops``: the MFU denominator pinned (``Config.train.peak_flops``)."""
  parser.add_argument("--peak-flops", type=float, default=None, metavar="FLOPS",
                      help="per-device peak FLOP/s for MFU, e.g. 3e11 (default: "
                           "train.peak_flops, else the device table, else a matmul measured "
                           "now, which varies from run to run: pin it to compare MFU)")


def pinned_peak_flops(cfg: Config, peak_flops: float | None) -> Config:
  """``cfg`` with ``train.peak_flops`` set to ``--peak-flops`` (unchanged when not given);
  a ConfigError unless it is > 0."""
  if peak_flops is None:
    return cfg
  if not peak_flops > 0:
    raise ConfigError(f"--peak-flops: must be > 0, got {peak_flops}")
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, peak_flops=peak_flops))


def check_counts(args: argparse.Namespace, counts: tuple[tuple[str, int], ...]) -> None:
  """ConfigError naming the first command-line count below its least value:
  ``counts`` holds (flag's dest, least value) pairs, as ``Bench.counts``."""
  for name, least in counts:
    value = getattr(args, name)
    if value < least:
      raise ConfigError(f"--{name.replace('_', '-')}: must be >= {least}, got {value}")


def machine(processor: bool = False) -> str:
  """'<arch>, <n> cpus' and, with ``processor``, the processor's name."""
  text = f"{platform.machine()}, {os.cpu_count()} cpus"
  return f"{text}, {platform.processor() or ''}".strip(", ") if processor else text


def human_bytes(n: float | None) -> str:
  """1536 -> '1.5 KiB' (binary units; '-' for None)."""
  if n is None:
    return "-"
  units, power = ("B", "KiB", "MiB", "GiB", "TiB"), 0
  while abs(n) >= 1024 and power < len(units) - 1:
    n, power = n / 1024, power + 1
  return f"{n:.0f} B" if power == 0 else f"{n:.1f} {units[power]}"


def human_count(x: float) -> str:
  """12345.6 -> '12.3K' (decimal units)."""
  for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}"


def standard_error(values: list[float]) -> float:
  """Standard error of the mean of ``values`` (nan for fewer than two)."""
  return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


ROUNDS_COUNTS = (("steps", 1), ("rounds", 1), ("replicas", 1), ("warmup", 0))
"""``Bench.counts`` of ``add_rounds_arguments``' flags."""


def add_rounds_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of an interleaved comparison (``time_rounds``): ``--steps``, ``--rounds``,
  ``--replicas``, ``--warmup``."""
  parser.add_argument("--steps", type=int, default=3,
                      help="timed steps per round, after one untimed step")
  parser.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
  parser.add_argument("--replicas", type=int, default=2,
                      help="separately compiled instances of each variant")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")


def time_rounds(runs: Iterable[dict[str, Any]], batch: Any, steps: int, rounds: int) -> None:
  """Times compiled train steps in ``rounds`` interleaved rounds, so a busy shared CPU
  slows every instance alike. Each run is a dict with ``compiled`` (the step), ``state``
  (advanced in place), ``times`` and ``switch_times``: every round, each run takes one
  untimed step after the switch of program (its time goes to ``switch_times``: the first
  step after another program ran is slower), then ``steps`` timed ones (``times``)."""
  runs = list(runs)
  for _ in range(rounds):
    for run in runs:
      for step in range(steps + 1):
        start = time.perf_counter()
        run["state"], metrics = run["compiled"](run["state"], batch)
        jax.block_until_ready(metrics)
        (run["times"] if step else run["switch_times"]).append(time.perf_counter() - start)


def rounds_text(result: dict[str, Any]) -> str:
  """'R rounds x S steps, K replicas' of an interleaved bench's result."""
  return (f"{result['rounds']} rounds x {result['steps_per_round']} steps, "
          f"{result['replicas']} replicas")


def round_means(times: list[float], steps: int) -> list[float]:
  """The mean of each round's ``steps`` consecutive step times."""
  return [statistics.fmean(times[i:i + steps]) for i in range(0, len(times), steps)]


def synthetic_batch(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One micro-batch of uniform random tokens for this process."""
  micro = cfg.train.batch_size // cfg.optim.grad_accum_steps // jax.process_count()
  tokens = rng.integers(0, cfg.data.vocab_size, (micro, cfg.data.seq_len + 1), np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
