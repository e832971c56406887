"""What the benchmarks share: the ``Bench`` entry each subject registers, synthetic
batches, the machine's description and the statistics of timed samples."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
from typing import Any, Callable

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
    parser.add_argument("--config", required=True)
  else:
    parser.add_argument("--config", default=default)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


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


def standard_error(values: list[float]) -> float:
  """Standard error of the mean of ``values`` (nan for fewer than two)."""
  return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def synthetic_batch(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One micro-batch of uniform random tokens for this process."""
  micro = cfg.train.batch_size // cfg.optim.grad_accum_steps // jax.process_count()
  tokens = rng.integers(0, cfg.data.vocab_size, (micro, cfg.data.seq_len + 1), np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
