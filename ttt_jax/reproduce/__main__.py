"""``python -m ttt_jax.reproduce NAME [--seeds 3] [--out DIR] [--budget F]``, ``--list``.

Trains every arm of study NAME on seeds 0..N-1 (``runner``), resuming any run an earlier
call left unfinished, then writes into ``--out`` (default ``reproductions/NAME/``):
``results.json`` (per-seed values), ``table.md`` (mean ± SE per arm, paired
differences) and the plots (with matplotlib). ``--budget F`` scales the steps and eval
batches by F (e.g. 0.05 for a smoke run); use a separate ``--out`` per budget.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ttt_jax.errors import UserError, user_errors
from ttt_jax.reproduce import runner
from ttt_jax.reproduce.studies import STUDIES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.reproduce", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("name", nargs="?", help=f"the study: {', '.join(STUDIES)}")
  parser.add_argument("--list", action="store_true", help="name the studies and exit")
  parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
  parser.add_argument("--out", type=Path, default=None,
                      help="output folder (default reproductions/NAME)")
  parser.add_argument("--budget", type=float, default=1.0,
                      help="scale of the steps and eval batches (default 1)")
  args = parser.parse_args(argv)
  if not args.list and args.name is None:
    parser.error("name a study (--list names them)")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.list:
    width = max(map(len, STUDIES))
    for name, study in STUDIES.items():
      print(f"{name.ljust(width)}  {study.summary}")
    return
  with user_errors():
    if args.name not in STUDIES:
      raise UserError(f"unknown study {args.name!r}; one of {', '.join(STUDIES)}")
    if args.seeds < 1:
      raise UserError(f"--seeds: must be >= 1, got {args.seeds}")
    out = args.out or Path("reproductions") / args.name
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    try:
      runner.run_study(STUDIES[args.name], out, list(range(args.seeds)), args.budget,
                       log=log)
    except runner.Stopped as stopped:
      log(str(stopped))
      sys.exit(1)


if __name__ == "__main__":
  main()
