"""``bench lora``: ``python -m ttt_jax.bench lora --config C [--set k=v] [--rounds R]
[--steps N] [--replicas K]``.

Times LoRA fine-tuning (``lora.enabled``: the adapters train, the base is frozen)
against full fine-tuning of the same model on the same synthetic batch. Each variant is
compiled ``--replicas`` times (default 2, own executable and state), then every
instance is timed in R interleaved rounds, each one untimed step after the switch of
program and then ``--steps`` timed ones. It reports per variant the median and best
step time, the trainable count, the optimizer state's bytes and XLA's count of the
compiled step's FLOPs, and for LoRA against full: the step time ratio (of medians, and
paired: the per-round ratios of replica k of LoRA over replica k of full) and the
optimizer-state bytes ratio. Targets: LoRA's step at most 1.1x full's, its optimizer
state at most 12% of full's.

Where the time goes: LoRA adds the merge W + s * A @ B of every adapted weight and the
factors' gradients (from the merged weight's gradient, which full fine-tuning forms
too), and skips the gradients of every weight it does not adapt (the tied embedding and
head, the norms) and the optimizer's update of the whole model.

Both variants use the config's optimizer settings; LoRA's optimizer is
``lora.optimizer_config`` of them (AdamW, never Muon), so with AdamW in both the bytes
ratio is the trainable ratio (two float32 moments per trainable parameter) up to the
optimizer's scalar counters.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
from typing import Any

import jax
import numpy as np

from ttt_jax import sharding
from ttt_jax.bench import common
from ttt_jax.bench.ttt import compiled_costs
from ttt_jax.compare import table
from ttt_jax.config import Config, to_dict
from ttt_jax.training.state import abstract_state, build
from ttt_jax.training.step import compile_step, jit_train_step

VARIANTS = ("full", "lora")
"""``bench lora`` variants: the config with ``lora.enabled`` false, then true."""
TARGET_STEP_TIME_RATIO = 1.1
"""LoRA's step time over full fine-tuning's should stay at or under this."""
TARGET_OPT_BYTES_RATIO = 0.12
"""LoRA's optimizer state over full fine-tuning's should stay at or under this."""


def variant_config(cfg: Config, name: str) -> Config:
  """``cfg`` with ``lora.enabled`` set for the variant ``name`` ('full' or 'lora')."""
  return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, enabled=name == "lora"))


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def tree_size(tree: Any) -> int:
  """Elements of every array leaf of ``tree``."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def sizes(cfg: Config, mesh: jax.sharding.Mesh) -> dict[str, dict[str, int]]:
  """Per variant, from the abstract train state (nothing allocated): the trainable count
  (full: every model parameter; lora: ``lora.trainable_count`` of the adapted weights,
  the size of its params) and the optimizer state's bytes."""
  figures = {}
  for name in VARIANTS:
    _, _, abstract, _ = abstract_state(variant_config(cfg, name), cfg.data.vocab_size, mesh)
    figures[name] = {"trainable": tree_size(abstract.params),
                     "opt_state_bytes": tree_bytes(abstract.opt_state)}
  return figures


def _instance(cfg: Config, mesh: jax.sharding.Mesh, batch: dict, warmup: int) -> dict:
  """A built, compiled and warmed-up variant: its step, state and compiled figures."""
  built = build(cfg, cfg.data.vocab_size, mesh)
  compiled, compile_s, memory = compile_step(jit_train_step(built), built.state, batch,
                                             log=lambda _: None)
  state = built.state
  for _ in range(warmup):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  return {"compiled": compiled, "state": state, "times": [], "switch_times": [],
          "compile_s": compile_s, "peak_bytes": memory.get("peak_bytes"),
          **compiled_costs(compiled)}


def bench_lora(cfg: Config, steps: int, warmup: int, rounds: int, replicas: int = 2) -> dict:
  """See the module doc; ``cfg``'s own ``lora.enabled`` is ignored."""
  mesh = sharding.make_mesh(cfg.mesh)
  batch = sharding.put_batch(common.synthetic_batch(cfg, np.random.default_rng(cfg.train.seed)),
                             mesh)
  runs = {(name, k): _instance(variant_config(cfg, name), mesh, batch, warmup)
          for name in VARIANTS for k in range(replicas)}
  common.time_rounds(runs.values(), batch, steps, rounds)
  return {
      "benchmark": "lora",
      **lora_summary(runs, steps=steps, sizes=sizes(cfg, mesh)),
      "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets)},
      "steps_per_round": steps, "rounds": rounds, "replicas": replicas,
      "devices": mesh.devices.size,
      "jax": jax.__version__,
      "machine": common.machine(processor=True),
      "config": {k: to_dict(getattr(cfg, k)) for k in ("model", "optim", "train", "data")},
  }


def lora_summary(runs: dict[tuple[str, int], dict], *, steps: int,
                 sizes: dict[str, dict[str, int]]) -> dict:
  """``bench lora``'s statistics from its timed runs, keyed (variant, replica), each with
  ``times`` (``steps`` per round, in round order), ``switch_times``, ``compile_s``,
  ``peak_bytes`` and (optionally) ``xla_flops``; ``sizes``: each variant's trainable
  count and optimizer bytes (``sizes``)."""
  replicas = 1 + max(replica for _, replica in runs)
  variants = {}
  for name in VARIANTS:
    replica_runs = [runs[name, k] for k in range(replicas)]
    times = [t for run in replica_runs for t in run["times"]]
    variants[name] = {
        "step_time_median_s": statistics.median(times), "step_time_min_s": min(times),
        "switch_step_time_median_s": statistics.median(
            t for run in replica_runs for t in run["switch_times"]),
        **sizes[name],
        "peak_bytes": replica_runs[0]["peak_bytes"],
        "xla_flops": replica_runs[0].get("xla_flops"),
        "compile_s": statistics.fmean(run["compile_s"] for run in replica_runs),
    }

  ratios = [a / b for k in range(replicas)
            for a, b in zip(common.round_means(runs["lora", k]["times"], steps),
                            common.round_means(runs["full", k]["times"], steps))]
  full, adapted = variants["full"], variants["lora"]
  step_ratio = adapted["step_time_median_s"] / full["step_time_median_s"]
  bytes_ratio = adapted["opt_state_bytes"] / full["opt_state_bytes"]
  return {
      "variants": variants,
      "step_time_ratio": step_ratio,
      "step_time_ratio_paired": {"median": statistics.median(ratios),
                                 "mean": statistics.fmean(ratios),
                                 "stderr": common.standard_error(ratios), "pairs": len(ratios)},
      "opt_state_bytes_ratio": bytes_ratio,
      "trainable_ratio": adapted["trainable"] / full["trainable"],
      "meets_step_time_target": step_ratio <= TARGET_STEP_TIME_RATIO,
      "meets_opt_bytes_target": bytes_ratio <= TARGET_OPT_BYTES_RATIO,
  }


def summary(result: dict) -> list[str]:
  """A table of the two variants, then LoRA's ratios against their targets."""
  columns = ["variant", "median s/step", "best s/step", "trainable", "optimizer state",
             "peak memory", "XLA flops"]
  rows = [[name, f"{v['step_time_median_s']:.4g}", f"{v['step_time_min_s']:.4g}",
           f"{v['trainable']:,}", common.human_bytes(v["opt_state_bytes"]),
           common.human_bytes(v["peak_bytes"]),
           "-" if v["xla_flops"] is None else common.human_count(v["xla_flops"])]
          for name, v in result["variants"].items()]
  paired = result["step_time_ratio_paired"]
  ratios = (
      f"LoRA / full: step time {result['step_time_ratio']:.3f}x (paired: median "
      f"{paired['median']:.3f}x, mean {paired['mean']:.3f}x +- {paired['stderr']:.3f}; "
      f"target <= {TARGET_STEP_TIME_RATIO}x), "
      f"optimizer state {100 * result['opt_state_bytes_ratio']:.1f}% (target <= "
      f"{100 * TARGET_OPT_BYTES_RATIO:.0f}%), trainable {100 * result['trainable_ratio']:.1f}%")
  return [f"lora: rank {result['lora']['rank']}, {common.rounds_text(result)}",
          table(columns, rows), ratios]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
  common.add_config_arguments(parser, None)
  common.add_rounds_arguments(parser)


def _run(cfg: Config, args: argparse.Namespace) -> dict:
  return bench_lora(cfg, args.steps, args.warmup, args.rounds, args.replicas)


BENCH = common.register(common.Bench(
    "lora", "LoRA vs full fine-tuning: step time and optimizer state", __doc__,
    _add_arguments, _run, summary,
    counts=common.ROUNDS_COUNTS))
