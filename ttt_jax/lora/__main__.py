"""``python -m ttt_jax.lora merge --workdir W --out W2``: an ordinary run directory with
the adapter run W's adapters folded into its base (``--adapter A``: the adapter A folded
into the run W's params); ``python -m ttt_jax.lora export
--workdir W --out A``: W's adapter as an adapter directory (``--adapter A`` of
``generate`` and ``evaluate``). See ``ttt_jax.lora.files``."""

from __future__ import annotations

import argparse
import sys

from ttt_jax.errors import user_errors
from ttt_jax.lora import files


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.lora", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  for name, text in (("merge", "write an ordinary run with the adapter folded in"),
                     ("export", "write the adapter run's adapter as an adapter directory")):
    command = commands.add_parser(name, help=text)
    command.add_argument("--workdir", required=True, help="an adapter run (lora.enabled)")
    command.add_argument("--out", required=True, help="the new directory")
    if name == "merge":
      command.add_argument("--adapter", metavar="PATH", default=None,
                           help="fold this adapter (an adapter directory or an adapter run) "
                                "into the run --workdir instead")
  args = parser.parse_args(argv)
  log = lambda m: print(m, file=sys.stderr)  # noqa: E731
  with user_errors():
    if args.command == "merge":
      files.merge_run(args.workdir, args.out, args.adapter, log=log)
    else:
      log(f"wrote {files.export_adapter(args.workdir, args.out)}")


if __name__ == "__main__":
  main()
