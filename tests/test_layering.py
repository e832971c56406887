"""The package's import structure, read from its source (ast), never by importing it:

  (a) no import cycle between ttt_jax modules (imports run at import time: any import
      outside a function body; ``from ttt_jax.x import y`` is an edge to ttt_jax.x, and
      to ttt_jax.x.y when that is a module);
  (b) no import inside a function body, except of an optional dependency (``OPTIONAL``);
  (c) no import of a mechanism package (``MECHANISMS``) from the core: every module but
      ``ttt_jax.catalog``, the command lines and the mechanism packages themselves
      (``NOT_CORE``). Mechanisms register themselves (``ttt_jax.registry``) and the core
      looks them up by name.

Each violation is reported as ``module -> module``. The checkers are tested on small
synthetic sources first, so a clean report means a clean tree.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, NamedTuple

PACKAGE = "ttt_jax"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
OPTIONAL = frozenset({"tqdm", "tensorboardX", "absl", "matplotlib"})
"""Top-level packages that may be imported inside a function (optional dependencies)."""
MECHANISMS = ("ttt_jax.models.mixers", "ttt_jax.models.residuals", "ttt_jax.models.ffn",
              "ttt_jax.models.trunks", "ttt_jax.models.embeddings", "ttt_jax.models.heads",
              "ttt_jax.cct")
NOT_CORE = ("ttt_jax.catalog", "ttt_jax.train", "ttt_jax.generate", "ttt_jax.evaluate",
            "ttt_jax.cct_chain", "ttt_jax.bench", "ttt_jax.reproduce.cct") + MECHANISMS
"""Modules (and packages, with everything under them) that may import a mechanism (the
``cct`` reproduction study runs CCT's own evaluations, like ``bench``)."""


class Import(NamedTuple):
  source: str
  """The importing module."""
  target: str
  """The module imported: ``import x.y``: x.y; ``from x import y``: x.y where that is a
  ttt_jax module, else x (y is a name defined in x)."""
  line: int
  in_function: bool
  """Inside a function body: runs when called, not when the module is imported."""
  package: str | None = None
  """``from x import y`` of a module y: x (its ``__init__`` runs first)."""


def under(module: str, prefixes: tuple[str, ...]) -> bool:
  """Whether ``module`` is one of ``prefixes`` or inside one of those packages."""
  return any(module == p or module.startswith(p + ".") for p in prefixes)


def read_package(directory: Path = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, str]:
  """Module name -> source of every ``.py`` file under ``directory`` (a package's
  ``__init__.py`` under the package's name)."""
  sources = {}
  for path in sorted(directory.rglob("*.py")):
    parts = (package,) + path.relative_to(directory).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    sources[".".join(parts)] = path.read_text(encoding="utf-8")
  return sources


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
  """The absolute module name of ``from <node.module> import ...`` inside ``module``."""
  if not node.level:
    return node.module or ""
  base = module.split(".") if is_package else module.split(".")[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _import_nodes(tree: ast.AST, in_function: bool = False
                  ) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
  """Every import statement under ``tree``, and whether it is inside a function body."""
  for child in ast.iter_child_nodes(tree):
    if isinstance(child, (ast.Import, ast.ImportFrom)):
      yield child, in_function
    nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                               ast.Lambda))
    yield from _import_nodes(child, nested)


def module_imports(module: str, source: str, modules: set[str]) -> list[Import]:
  """Every import of one module, one per imported module; ``modules`` is the set of
  ttt_jax modules (to tell ``from x import y`` of a module y from that of a name)."""
  is_package = any(m.startswith(module + ".") for m in modules)
  imports = []
  for node, in_function in _import_nodes(ast.parse(source)):
    if isinstance(node, ast.Import):
      imports += [Import(module, alias.name, node.lineno, in_function) for alias in node.names]
      continue
    base = _absolute(module, is_package, node)
    submodules = [f"{base}.{alias.name}" for alias in node.names
                  if f"{base}.{alias.name}" in modules]
    if len(submodules) < len(node.names):  # names defined in the module ``base``
      imports.append(Import(module, base, node.lineno, in_function))
    imports += [Import(module, name, node.lineno, in_function, base) for name in submodules]
  return imports


def all_imports(sources: dict[str, str]) -> list[Import]:
  """``module_imports`` of every module of ``sources``."""
  modules = set(sources)
  return [i for module, source in sorted(sources.items())
          for i in module_imports(module, source, modules)]


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
  """The strongly connected components of more than one module of the import graph
  (those that hold a cycle), each sorted (Tarjan's algorithm)."""
  graph: dict[str, list[str]] = {}
  for source, target in sorted(edges):
    graph.setdefault(source, []).append(target)
    graph.setdefault(target, [])
  index: dict[str, int] = {}
  lowlink: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components = []

  def visit(node: str) -> None:
    index[node] = lowlink[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for successor in graph[node]:
      if successor not in index:
        visit(successor)
        lowlink[node] = min(lowlink[node], lowlink[successor])
      elif successor in on_stack:
        lowlink[node] = min(lowlink[node], index[successor])
    if lowlink[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return sorted(components)


def cycle_violations(sources: dict[str, str]) -> list[str]:
  """'a -> b' for every import-time edge between ttt_jax modules that lies on a cycle."""
  edges = set()
  for i in all_imports(sources):
    if not i.in_function:
      edges |= {(i.source, target) for target in (i.target, i.package)
                if target in sources and target != i.source}
  violations = []
  for component in cycles(edges):
    members = set(component)
    violations += [f"{a} -> {b}" for a, b in sorted(edges) if a in members and b in members]
  return violations


def function_import_violations(sources: dict[str, str]) -> list[str]:
  """'a -> b (line n)' for every import inside a function body of anything but an
  optional dependency."""
  return sorted({f"{i.source} -> {i.target} (line {i.line})" for i in all_imports(sources)
                 if i.in_function and i.target.split(".")[0] not in OPTIONAL})


def mechanism_violations(sources: dict[str, str]) -> list[str]:
  """'a -> b' for every import of a mechanism package from a core module."""
  return sorted({f"{i.source} -> {i.target}" for i in all_imports(sources)
                 if under(i.target, MECHANISMS) and not under(i.source, NOT_CORE)})


# ----------------------------------------------------------------------- the checkers


def test_a_cycle_is_found_and_only_its_edges_are_reported():
  sources = {
      "ttt_jax": "",
      "ttt_jax.a": "from ttt_jax import b\n",
      "ttt_jax.b": "import numpy\nfrom ttt_jax.c import helper\n",
      "ttt_jax.c": "import ttt_jax.a\n",
      "ttt_jax.d": "from ttt_jax import a\n",  # imports the cycle, is not on it
  }
  assert cycle_violations(sources) == ["ttt_jax.a -> ttt_jax.b", "ttt_jax.b -> ttt_jax.c",
                                       "ttt_jax.c -> ttt_jax.a"]
  acyclic = {**sources, "ttt_jax.c": "import numpy as np\n"}
  assert cycle_violations(acyclic) == []


def test_from_import_of_a_module_is_an_edge_to_it_and_to_its_package():
  sources = {
      "ttt_jax.data": "from ttt_jax.data import corpus\n",  # a package's __init__
      "ttt_jax.data.corpus": "from ttt_jax.data import helper_function\n",
  }
  # __init__ -> corpus (a module) and corpus -> the package __init__ (a name in it)
  assert cycle_violations(sources) == ["ttt_jax.data -> ttt_jax.data.corpus",
                                       "ttt_jax.data.corpus -> ttt_jax.data"]
  relative = {"ttt_jax.data": "from . import corpus\n",
              "ttt_jax.data.corpus": "from . import helper_function\n"}
  assert cycle_violations(relative) == cycle_violations(sources)


def test_an_import_in_a_function_is_reported_unless_optional_and_is_no_cycle_edge():
  sources = {
      "ttt_jax.a": ("import ttt_jax.b\n"
                    "def f():\n"
                    "  from tqdm import tqdm\n"
                    "  from absl import flags\n"
                    "  import json\n"
                    "  return tqdm, flags, json\n"),
      "ttt_jax.b": ("class Lazy:\n"
                    "  def load(self):\n"
                    "    from ttt_jax import a\n"
                    "    return a\n"),
  }
  assert function_import_violations(sources) == ["ttt_jax.a -> json (line 5)",
                                                 "ttt_jax.b -> ttt_jax.a (line 3)"]
  assert cycle_violations(sources) == []  # b's import runs when called, not at import
  assert function_import_violations({"ttt_jax.a": "import json\nfrom tqdm import tqdm\n"}) == []


def test_a_core_module_importing_a_mechanism_is_reported():
  sources = {
      "ttt_jax.cct": "",
      "ttt_jax.cct.steps": "from ttt_jax import registry\n",
      "ttt_jax.registry": "",
      "ttt_jax.models": "",
      "ttt_jax.models.mixers": "",
      "ttt_jax.models.mixers.attention": "from ttt_jax.models import mixers\n",
      "ttt_jax.models.lm": "from ttt_jax.models.mixers import attention\n",
      "ttt_jax.runs": "def f():\n  from ttt_jax.cct import steps\n",
      "ttt_jax.catalog": "import ttt_jax.cct.steps\nimport ttt_jax.models.mixers.attention\n",
      "ttt_jax.train": "from ttt_jax.cct import steps\n",
  }
  assert mechanism_violations(sources) == ["ttt_jax.models.lm -> ttt_jax.models.mixers.attention",
                                           "ttt_jax.runs -> ttt_jax.cct.steps"]
  assert mechanism_violations({"ttt_jax.runs": "from ttt_jax.models.mixers import Attention\n"}
                              ) == ["ttt_jax.runs -> ttt_jax.models.mixers"]


def test_the_package_is_read_under_its_module_names():
  sources = read_package()
  assert {"ttt_jax", "ttt_jax.registry", "ttt_jax.data", "ttt_jax.data.pipeline",
          "ttt_jax.models.lm"} <= set(sources)
  assert not [name for name in sources if "__init__" in name]


# ----------------------------------------------------------------------- the package


def test_no_import_cycles():
  violations = cycle_violations(read_package())
  assert not violations, "import cycles:\n" + "\n".join(violations)


def test_no_imports_inside_functions_but_optional_dependencies():
  violations = function_import_violations(read_package())
  assert not violations, "imports inside functions:\n" + "\n".join(violations)


def test_the_core_never_imports_a_mechanism():
  violations = mechanism_violations(read_package())
  assert not violations, "mechanisms imported by the core:\n" + "\n".join(violations)
