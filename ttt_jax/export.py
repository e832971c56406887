"""Export a trained run as a quantized artifact: ``python -m ttt_jax.export --workdir W``.

Reads the newest usable checkpoint of W (``runs.load_trained``), quantizes its params
per row (``ttt_jax.quant``: matrices to ``--bits-matrix`` bits, 6 by default, embeddings
and untied heads to ``--bits-embed``, 8; norms, biases, control parameters and small
tensors kept as float16/float32) and writes the lzma-compressed artifact to ``--out``
(default ``W/model-int{M}-int{E}.ttq``). It prints one JSON object: the file, its real
size in bytes, the float32 size of the params, their ratio and the export time.
``python -m ttt_jax.evaluate --workdir W --task lm --artifact F`` scores it.

The artifact holds the run's config, the checkpoint step and the tokenizer's sha256;
text is still read with the run's ``tokenizer.model``. Exporting the same checkpoint
twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from flax import nnx

from ttt_jax import quant, runs
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.errors import ConfigError, TrainingError, user_errors


def _bits(flag: str, value: int) -> int:
  if not 2 <= value <= 8:
    raise ConfigError(f"{flag}: must be in [2, 8], got {value}")
  return value


def export(workdir: str | Path, out: str | Path | None = None, bits_matrix: int = 6,
           bits_embed: int = 8) -> dict:
  """Writes the artifact of ``workdir``'s newest checkpoint; returns what it printed."""
  start = time.perf_counter()
  log = lambda m: print(m, file=sys.stderr)  # noqa: E731
  workdir = runs.check_workdir(workdir)
  bits_matrix, bits_embed = _bits("--bits-matrix", bits_matrix), _bits("--bits-embed", bits_embed)
  cfg, _, params, step, _ = runs.load_trained(workdir, log=log)
  tokenizer = workdir / runs.RUN_TOKENIZER
  tokenizer_hash = (corpus_lib.load_tokenizer(str(tokenizer)).sha256
                    if tokenizer.is_file() else None)
  out = Path(out) if out else workdir / f"model-int{bits_matrix}-int{bits_embed}.ttq"
  encoded = quant.encode_params(params, bits_matrix, bits_embed)
  meta = quant.artifact_meta(cfg, step, cfg.data.vocab_size, tokenizer_hash, bits_matrix,
                             bits_embed)
  data = quant.serialize(encoded, meta)
  partial = out.with_name(out.name + ".partial")
  try:
    partial.write_bytes(data)
    os.replace(partial, out)  # a reader never sees half a file
  except OSError as e:
    raise TrainingError(f"{out}: cannot write the artifact ({e.strerror})") from None
  fp32_bytes = sum(4 * math.prod(var.get_value().shape) for _, var in nnx.to_flat_state(params))
  return {"artifact": str(out), "step": step, "bytes": out.stat().st_size,
          "fp32_param_bytes": fp32_bytes, "ratio": out.stat().st_size / fp32_bytes,
          "bits": {"matrix": bits_matrix, "embedding": bits_embed},
          "seconds": round(time.perf_counter() - start, 3)}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default="", help="artifact file (default: in the workdir)")
  parser.add_argument("--bits-matrix", type=int, default=6)
  parser.add_argument("--bits-embed", type=int, default=8)
  args = parser.parse_args(argv)
  with user_errors():
    result = export(args.workdir, args.out or None, args.bits_matrix, args.bits_embed)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
