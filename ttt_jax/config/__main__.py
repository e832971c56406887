"""The config from the command line: ``python -m ttt_jax.config [--section S]
[--config C] [--set KEY=VALUE ...]``.

- no ``--config`` and no ``--set``: every documented field (``describe()``): its dotted
  key, type and default, then its documentation; a model slot lists the fields of every
  registered mechanism, tagged ``[name]``;
- ``--section S``: only section S (``train``), model slot (``model.mixer``) or field
  (``train.steps``);
- ``--config C`` and/or ``--set``: the resolved config (the file, then the overrides,
  validated, every default filled in) as YAML, as a run writes it to ``config.yaml``;
  with ``--section``, that part of it.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from ttt_jax.config.loading import describe, describe_section, load_config, to_dict, to_yaml
from ttt_jax.errors import ConfigError, user_errors


def field_text(line: str) -> str:
  """A ``describe()`` line as 'key (type, default)' and its documentation below it,
  indented and wrapped."""
  head, sep, doc = line.partition("): ")
  if not sep or not doc.strip():
    return line
  return f"{head})\n" + textwrap.fill(doc, width=88, initial_indent="    ",
                                      subsequent_indent="    ")


def fields_text(lines: list[str]) -> str:
  """``field_text`` of each line, a blank line before each top-level section."""
  blocks, section = [], None
  for line in lines:
    top = line.split(".", 1)[0]
    if section is not None and top != section:
      blocks.append("")
    section = top
    blocks.append(field_text(line))
  return "\n".join(blocks)


def resolved_section(values: dict[str, Any], section: str) -> dict[str, Any]:
  """``{a: {b: values[a][b]}}`` for section 'a.b' of a resolved config's mapping."""
  node: Any = values
  for part in section.split("."):
    if not isinstance(node, dict) or part not in node:
      describe_section(section)  # its error names the sections and close matches
      raise ConfigError(f"--section {section!r}: not in this config (a field of another "
                        f"mechanism than the one its slot names?)")
    node = node[part]
  for part in reversed(section.split(".")):
    node = {part: node}
  return node


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.config", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--section", metavar="S", default=None,
                      help="only this section, model slot or field, e.g. train, model.mixer")
  parser.add_argument("--config", metavar="YAML", default=None,
                      help="print this config file resolved (with --set), as YAML")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a value of the resolved config (repeatable)")
  args = parser.parse_args(argv)
  with user_errors():
    if args.config is None and not args.set:
      print(fields_text(describe_section(args.section) if args.section else describe()))
      return
    cfg = load_config(args.config, args.set)
    if args.section:
      print(to_yaml(resolved_section(to_dict(cfg), args.section)), end="")
    else:
      print(to_yaml(cfg), end="")


if __name__ == "__main__":
  main()
