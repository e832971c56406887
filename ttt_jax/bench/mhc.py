"""``bench mhc``: ``python -m ttt_jax.bench mhc [--config C] [--rounds R]``.

Compares the mHC residual (model.residual.streams streams) with the plain residual on the
same model: each variant is compiled ``--replicas`` times (default 2), then all
instances are timed in R interleaved rounds (so a busy shared CPU slows them alike),
each round of an instance one untimed step after a switch of program and then
``--steps`` timed; it reports the median switch step, median and best step times, the
spread between replicas of the same program (a systematic error of one instance that
interleaving does not remove), the overhead of mHC (ratio of medians, and paired: median
and mean +- standard error of the per-round ratios), the compiled peak memory with and
without the 'mhc_streams' remat policy, and mHC's throughput against the PyTorch
reference's (``--reference-tokens-per-sec``, measured on the same machine with
``benchmarks/torch_reference.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import jax
import numpy as np

from ttt_jax import registry, sharding
from ttt_jax.bench import common
from ttt_jax.compare import table
from ttt_jax.config import Config, ModelConfig, to_dict
from ttt_jax.errors import ConfigError
from ttt_jax.training.state import build
from ttt_jax.training.step import compile_step, jit_train_step


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
on the 2-core CPU of benchmarks/RESULTS.md (torch 2.13.0); the design document quoted ~295. On
another machine, measure it there and pass ``bench mhc --reference-tokens-per-sec``."""


def variant_model(model: ModelConfig, residual: str, remat: str) -> ModelConfig:
  """``model`` with the named residual (its own section when it already has that
  residual, else the residual's defaults) and remat policy."""
  section = (model.residual if model.residual.type == residual
             else registry.RESIDUALS.get(residual).Config())
  return dataclasses.replace(model, residual=section, remat=remat)


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
  batch = sharding.put_batch(common.synthetic_batch(cfg, rng), mesh)
  runs = {}
  for name, fields in MHC_VARIANTS.items():
    variant = dataclasses.replace(cfg, model=variant_model(cfg.model, **fields))
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
  common.time_rounds(runs.values(), batch, steps, rounds)
  return {
      "benchmark": "mhc",
      **mhc_summary(runs, steps=steps, tokens=cfg.train.batch_size * cfg.data.seq_len,
                    reference_tokens_per_sec=reference_tokens_per_sec),
      "mhc_streams": variant_model(cfg.model, "mhc", cfg.model.remat).residual.streams,
      "steps_per_round": steps, "rounds": rounds, "replicas": replicas,
      "devices": jax.device_count(),
      "jax": jax.__version__,
      "machine": common.machine(processor=True),
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
    pairs = [[ta / tb - 1.0 for ta, tb in zip(common.round_means(runs[a, k]["times"], steps),
                                               common.round_means(runs[b, k]["times"], steps))]
             for k in range(replicas)]
    ratios = [r for pair in pairs for r in pair]
    return {"median": statistics.median(ratios), "mean": statistics.fmean(ratios),
            "stderr": common.standard_error(ratios), "rounds": len(pairs[0]), "replicas": replicas,
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


def summary(result: dict) -> list[str]:
  """A table of the variants, then mHC's overheads and its speed against PyTorch."""
  rows = [[name, f"{v['step_time_median_s']:.4g}", f"{v['step_time_min_s']:.4g}",
           common.human_count(v["tokens_per_sec_median"]), f"{100 * v['replica_spread']:.1f}%",
           common.human_bytes(v["peak_bytes"])] for name, v in result["variants"].items()]
  paired, remat = result["overhead_paired"], result["overhead_remat_paired"]
  return [
      f"mhc: {result['mhc_streams']} streams, {common.rounds_text(result)}",
      table(["variant", "median s/step", "best s/step", "tokens/s", "replica spread",
             "peak memory"], rows),
      f"mHC overhead: {100 * result['overhead_median']:+.1f}% (paired "
      f"{100 * paired['mean']:+.1f}% +- {100 * paired['stderr']:.1f}%), with remat "
      f"{100 * result['overhead_remat_median']:+.1f}% (paired {100 * remat['mean']:+.1f}% +- "
      f"{100 * remat['stderr']:.1f}%); {result['speedup_vs_pytorch_reference_median']:.2f}x "
      f"the PyTorch reference's {result['pytorch_reference_tokens_per_sec']:.0f} tokens/s"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
  common.add_config_arguments(parser, "configs/bench_dense.yaml")
  common.add_rounds_arguments(parser)
  parser.add_argument("--reference-tokens-per-sec", type=float,
                      default=PYTORCH_REFERENCE_TOKENS_PER_SEC,
                      help="the PyTorch reference's tokens/s on this machine "
                           "(benchmarks/torch_reference.py)")


def _run(cfg: Config, args: argparse.Namespace) -> dict:
  if not args.reference_tokens_per_sec > 0:
    raise ConfigError("--reference-tokens-per-sec: must be > 0, got "
                      f"{args.reference_tokens_per_sec}")
  return bench_mhc(cfg, args.steps, args.warmup, args.rounds, args.reference_tokens_per_sec,
                   args.replicas)


BENCH = common.register(common.Bench(
    "mhc", "mHC vs plain residual: step time and peak memory", __doc__, _add_arguments, _run,
    summary,
    counts=common.ROUNDS_COUNTS))
