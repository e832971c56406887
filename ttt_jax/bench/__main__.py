"""Benchmarks: ``python -m ttt_jax.bench {train,io,ttt,mhc,lora,cct} ...``: one JSON object on
stdout, and a summary for people (a line per variant, or a small table) on stderr.

- ``train --config C [--set k=v] [--steps N]``: step time, tokens/s, MFU, compile time
  and compiled memory of the train step on synthetic tokens;
- ``io``: the training stall of an async checkpoint save, a save's own cost, and the
  data pipeline's throughput against the trainer's;
- ``ttt``: one TTT-Linear layer, dual vs primal form vs decode;
- ``mhc``: mHC vs the plain residual (interleaved, replicated, paired), and against the
  PyTorch reference;
- ``lora``: LoRA vs full fine-tuning of one model (interleaved, paired): step time ratio,
  optimizer-state bytes ratio, trainable counts;
- ``cct``: CCT working memory vs KV cache bytes (``--hash-chain``: the commitment hash
  chain's overhead per generated token).

``python -m ttt_jax.bench <subject> --help`` says what a subject measures and its flags.
"""

from __future__ import annotations

import argparse
import json
import sys

from ttt_jax import host_memory, registry
from ttt_jax.bench import io, lora, mhc, train, ttt  # noqa: F401  (register their subjects)
from ttt_jax.bench import common
from ttt_jax.bench.common import Bench
from ttt_jax.config import TrainConfig, load_config
from ttt_jax.errors import user_errors


def main(argv: list[str] | None = None, reexec: bool = False) -> None:
  """``reexec``: see ``ttt_jax.train.main``."""
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  subjects = parser.add_subparsers(dest="what", required=True)
  for name, bench in registry.BENCHES.items():
    bench.add_arguments(subjects.add_parser(
        name, help=bench.help, description=bench.description,
        formatter_class=argparse.RawDescriptionHelpFormatter))
  args = parser.parse_args(argv)
  bench: Bench = registry.BENCHES.get(args.what)
  with user_errors():
    common.check_counts(args, bench.counts)
    cfg = load_config(args.config, args.set) if bench.uses_config else None
  hugepages = TrainConfig.host_hugepages if cfg is None else cfg.train.host_hugepages
  if reexec and hugepages:  # a subject without a config: the field's default
    host_memory.reexec_with_hugepages("ttt_jax.bench", argv)
  malloc_note = host_memory.status(hugepages)
  with user_errors():
    result = bench.run(cfg, args)
  print(json.dumps({**result, "host_malloc": malloc_note}, indent=2), flush=True)
  print("\n".join(bench.summary(result)), file=sys.stderr)


if __name__ == "__main__":
  main(reexec=True)
