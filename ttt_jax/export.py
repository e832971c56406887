"""Export a trained run as a quantized artifact: ``python -m ttt_jax.export --workdir W``.

Reads the newest usable checkpoint of W (``runs.load_trained``), quantizes its params
per row (``ttt_jax.quant``: matrices to ``--bits-matrix`` bits, 6 by default, embeddings
and untied heads to ``--bits-embed``, 8; norms, biases, control parameters and small
tensors kept as float16/float32) and writes the lzma-compressed artifact to ``--out``
(default ``W/model-int{M}-int{E}.ttq``). It prints one JSON object: the file, its real
size in bytes, the float32 size of the params, their ratio and the export time.
``--weights ema|swa`` exports the run's average of the params instead (``optim.ema_decay``
/ ``optim.swa_every``; ``training.averaging.weights``), by default to
``W/model-{ema|swa}-int{M}-int{E}.ttq``.
``python -m ttt_jax.evaluate --workdir W --task lm --artifact F`` scores it.

``--gptq`` (or ``quant.gptq`` in the run's config) chooses the matrices' codes with GPTQ
(``ttt_jax.gptq``) on ``--calib-seqs`` sequences of ``--calib-len`` tokens (default
data.seq_len) that the model samples itself from the end-of-document token with
``--calib-seed``: same scales, same format, only the int codes differ. The printed
object then also names the matrices GPTQ quantized, those rounded to nearest and why,
and the calibration's time.

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

from ttt_jax import gptq, quant, runs
from ttt_jax.config import Config
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.errors import ConfigError, TrainingError, user_errors
from ttt_jax.training import averaging


def _bits(flag: str, value: int) -> int:
  if not 2 <= value <= 8:
    raise ConfigError(f"{flag}: must be in [2, 8], got {value}")
  return value


def calibrated(cfg: Config, graphdef: nnx.GraphDef, params: nnx.State,
               tokenizer: Tokenizer | None, encoded: dict[tuple, quant.Encoded], log
               ) -> tuple[dict[tuple, quant.Encoded], dict]:
  """``encoded`` with GPTQ's codes for every matrix whose inputs were followed on the
  calibration sequences (``quant`` settings of ``cfg``), and the summary of that."""
  start = time.perf_counter()
  settings = cfg.quant
  if tokenizer is None:
    raise ConfigError(f"--gptq: the run's {runs.RUN_TOKENIZER} is missing (its "
                      "end-of-document token starts the calibration sequences)")
  start_token = tokenizer.eos_id if tokenizer.eos_id >= 0 else tokenizer.bos_id
  if start_token < 0:
    raise ConfigError(f"--gptq: the run's {runs.RUN_TOKENIZER} has no EOS or BOS token to "
                      "start the calibration sequences from")
  length = settings.calib_len or cfg.data.seq_len
  model = nnx.merge(graphdef, params)
  tokens, ctx = gptq.calibration_batch(model, cfg, start_token, settings.calib_seqs, length,
                                       settings.calib_seed, tokenizer)
  hessians, skipped = gptq.input_hessians(model, tokens, ctx)
  encoded = gptq.requantize(encoded, params, hessians, settings.gptq_damp,
                            settings.gptq_act_order)
  name = lambda path: "/".join(map(str, path))  # noqa: E731
  log(f"gptq: {len(hessians)} of {len(hessians) + len(skipped)} matrices on "
      f"{settings.calib_seqs} x {length} sampled tokens"
      + "".join(f"; {name(p)} rounded to nearest ({why})" for p, why in skipped.items()))
  return encoded, {"weights": [name(p) for p in hessians],
                   "round_to_nearest": {name(p): why for p, why in skipped.items()},
                   "calib_seqs": settings.calib_seqs, "calib_len": length,
                   "calib_seed": settings.calib_seed, "damp": settings.gptq_damp,
                   "act_order": settings.gptq_act_order,
                   "seconds": round(time.perf_counter() - start, 3)}


def export(workdir: str | Path, out: str | Path | None = None, bits_matrix: int = 6,
           bits_embed: int = 8, overrides: list[str] = (),
           weights: str = averaging.RAW) -> dict:
  """Writes the artifact of ``workdir``'s newest checkpoint; returns what it printed.
  ``overrides``: ``--set``-style values of the run's config (the ``quant`` section's
  GPTQ settings); ``weights``: the params as trained ('raw') or the run's 'ema' / 'swa'
  average."""
  start = time.perf_counter()
  log = lambda m: print(m, file=sys.stderr)  # noqa: E731
  workdir = runs.check_workdir(workdir)
  bits_matrix, bits_embed = _bits("--bits-matrix", bits_matrix), _bits("--bits-embed", bits_embed)
  cfg, graphdef, params, step, _ = runs.load_trained(workdir, list(overrides), log=log,
                                                     weights=weights)
  tokenizer_path = workdir / runs.RUN_TOKENIZER
  tokenizer = (corpus_lib.load_tokenizer(str(tokenizer_path)) if tokenizer_path.is_file()
               else None)
  tokenizer_hash = tokenizer.sha256 if tokenizer else None
  average = "" if weights == averaging.RAW else f"{weights}-"
  out = Path(out) if out else workdir / f"model-{average}int{bits_matrix}-int{bits_embed}.ttq"
  encoded = quant.encode_params(params, bits_matrix, bits_embed)
  summary = {}
  if cfg.quant.gptq:
    encoded, summary["gptq"] = calibrated(cfg, graphdef, params, tokenizer, encoded, log)
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
  return {"artifact": str(out), "step": step, "weights": weights, "bytes": out.stat().st_size,
          "fp32_param_bytes": fp32_bytes, "ratio": out.stat().st_size / fp32_bytes,
          "bits": {"matrix": bits_matrix, "embedding": bits_embed}, **summary,
          "seconds": round(time.perf_counter() - start, 3)}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default="", help="artifact file (default: in the workdir)")
  parser.add_argument("--bits-matrix", type=int, default=6)
  parser.add_argument("--bits-embed", type=int, default=8)
  parser.add_argument("--weights", choices=(averaging.RAW, averaging.EMA, averaging.SWA),
                      default=averaging.RAW,
                      help="the params as trained, or the run's EMA / SWA average")
  parser.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                      help="GPTQ codes for the matrices (default: the run's quant.gptq, off)")
  parser.add_argument("--calib-seqs", type=int, help="calibration sequences (quant.calib_seqs)")
  parser.add_argument("--calib-len", type=int,
                      help="their length (quant.calib_len; default data.seq_len)")
  parser.add_argument("--calib-seed", type=int, help="their sampling seed (quant.calib_seed)")
  args = parser.parse_args(argv)
  flags = {"gptq": args.gptq, "calib_seqs": args.calib_seqs, "calib_len": args.calib_len,
           "calib_seed": args.calib_seed}
  overrides = [f"quant.{key}={str(value).lower()}" for key, value in flags.items()
               if value is not None]
  with user_errors():
    result = export(args.workdir, args.out or None, args.bits_matrix, args.bits_embed,
                    overrides, args.weights)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
