"""Verifies a CCT commitment hash chain record:
``python -m ttt_jax.cct_chain --workdir W FILE.json`` (``ttt_jax.cct.chain``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ttt_jax import diagnostics
from ttt_jax.cct import chain
from ttt_jax.errors import ConfigError, user_errors
from ttt_jax.generate import load_for_generation
from ttt_jax.runs import check_workdir


def main(argv: list[str] | None = None) -> None:
  """``python -m ttt_jax.cct_chain --workdir W FILE.json``: verifies a record written by
  ``python -m ttt_jax.generate --hash-chain FILE.json`` against the run's checkpoint;
  one line per sequence, exit status 1 when any sequence fails."""
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.cct_chain", description=main.__doc__)
  parser.add_argument("record", metavar="FILE.json", help="the --hash-chain record")
  parser.add_argument("--workdir", required=True, help="the run that generated it")
  parser.add_argument("--tolerance", type=float, default=None,
                      help="largest accepted |decode - forward| per summary value "
                           "(default: 2e-5 for float32, 2^-6 for bfloat16)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override the run's config, as given to generate")
  args = parser.parse_args(argv)
  with user_errors():
    diagnostics.library_logs_until_exit(diagnostics.run_log(check_workdir(args.workdir)))
    try:
      record = json.loads(Path(args.record).read_text())
    except (OSError, ValueError) as e:
      raise ConfigError(f"FILE.json: cannot read {args.record} ({e})") from None
    if not isinstance(record, dict) or not {"header", "genesis", "sequences"} <= set(record):
      raise ConfigError(f"FILE.json: {args.record} is not a hash chain record (needs header, "
                        f"genesis and sequences)")
    for index, sequence in enumerate(record["sequences"]):
      missing = chain.SEQUENCE_FIELDS - set(sequence)
      if missing:
        raise ConfigError(f"FILE.json: sequence {index} lacks {sorted(missing)}")
    if args.tolerance is not None and args.tolerance < 0:
      raise ConfigError(f"--tolerance: must be >= 0, got {args.tolerance}")
    cfg, model, _, annotator = load_for_generation(args.workdir, args.set)
    if cfg.model.mixer.type != "cct":
      raise ConfigError(f"--workdir: needs a CCT run (model.mixer.type='cct'), got "
                        f"{cfg.model.mixer.type!r}")
    results = chain.verify_record(model, record, annotator, args.tolerance)
  for index, result in enumerate(results):
    print(f"sequence {index}: {'OK' if result.ok else 'MISMATCH'}: {result.reason}")
  if not all(result.ok for result in results):
    raise SystemExit(1)


if __name__ == "__main__":
  main()
