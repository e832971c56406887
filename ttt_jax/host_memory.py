"""Transparent huge pages for XLA:CPU's step buffers (``train.host_hugepages``).

XLA:CPU allocates each executable's temporary buffer (one block holding every
intermediate of the program: 238 MiB for the bench_dense train step) when the program
starts and frees it when it ends, from whichever XLA worker thread runs it. glibc serves
a block that large with a fresh ``mmap`` and returns it with ``munmap``, so every step
page-faults its whole temporary buffer in again, 4 KiB at a time: 61k minor faults and
0.14 s of kernel time per bench_dense step on the VM of benchmarks/RESULTS.md, 61k-176k
faults across the train steps measured there.

glibc's ``glibc.malloc.hugetlb=1`` tunable makes malloc ask for transparent huge pages
(``madvise(MADV_HUGEPAGE)``) on the memory it maps, so the same buffer arrives in 2 MiB
pages: ~550 faults a step. Nothing else about allocation changes (arenas, trimming and
returning memory to the system stay glibc's defaults), so host RSS does not grow.
glibc reads tunables only when a process starts, so ``reexec_with_hugepages`` restarts
the entry point's own command (same PID, same arguments) with the tunable added to
``GLIBC_TUNABLES``; it is a no-op when the tunable is already set, when the C library is
not glibc, or when the kernel's THP mode is 'never'. Only the command-line entry points
use it (``python -m ttt_jax.train`` / ``ttt_jax.bench``); a library caller keeps its
process as it is.

Tried and not kept: ``mallopt`` at run time (one arena, no mmap, no trim) also removes
the faults, but the single arena's lock slows XLA compilation (+1 s on bench_dense) and
makes the many-kernel mHC step wait on it (3x the context switches), and the heap
settles a few buffers higher (quickstart RSS 0.94 to 1.37 GB).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Mapping, Sequence

TUNABLE_NAME = "glibc.malloc.hugetlb"
TUNABLE = f"{TUNABLE_NAME}=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: Path = THP_MODE) -> str:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or
  'unavailable' where the file does not exist or cannot be read."""
  try:
    text = path.read_text()
  except OSError:
    return "unavailable"
  for word in text.split():
    if word.startswith("[") and word.endswith("]"):
      return word[1:-1]
  return "unavailable"


MIN_GLIBC = (2, 35)
"""The first glibc with the hugetlb tunable (older ones ignore unknown tunables)."""


def supported(libc: tuple[str, str], mode: str) -> str | None:
  """Why huge pages cannot be had here (``platform.libc_ver()``, ``thp_mode()``), or
  None when they can."""
  name, version = libc
  if name != "glibc":
    return f"C library {name or 'unknown'}, not glibc"
  parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
  if parts < MIN_GLIBC:
    return f"glibc {version} predates the hugetlb tunable (2.35)"
  if mode not in ("always", "madvise"):
    return f"kernel THP mode {mode}"
  return None


def hugepage_environ(environ: Mapping[str, str], libc: tuple[str, str], mode: str
                     ) -> dict[str, str] | None:
  """``environ`` with the tunable appended to GLIBC_TUNABLES, or None when restarting
  would change nothing (the tunable already set, to any value, or ``supported`` gives a
  reason)."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if supported(libc, mode) is not None:
    return None
  if any(t.startswith(TUNABLE_NAME + "=") for t in tunables.split(":")):
    return None  # already chosen, by us or by the user
  return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def reexec_with_hugepages(module: str, argv: Sequence[str] | None) -> None:
  """Replaces this process with ``python -m module *argv`` (argv None: this process's
  own arguments) with huge pages on, unless that would change nothing
  (``hugepage_environ``); returns only in that case."""
  environ = hugepage_environ(os.environ, platform.libc_ver(), thp_mode())
  if environ is None:
    return
  args = sys.argv[1:] if argv is None else list(argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, "-m", module, *args], environ)


def status(enabled: bool) -> str:
  """One log line on what this process runs with (``train.host_hugepages`` = enabled)."""
  tunables = os.environ.get("GLIBC_TUNABLES", "").split(":")
  if TUNABLE in tunables:
    return f"host malloc: transparent huge pages ({TUNABLE}, kernel THP {thp_mode()})"
  chosen = [t for t in tunables if t.startswith(TUNABLE_NAME + "=")]
  if chosen:
    return f"host malloc: system default (GLIBC_TUNABLES sets {chosen[-1]})"
  if not enabled:
    return "host malloc: system default (train.host_hugepages false)"
  reason = supported(platform.libc_ver(), thp_mode())
  if reason is not None:
    return f"host malloc: system default ({reason})"
  return ("host malloc: system default (in-process caller; `python -m ttt_jax.train` "
          "restarts itself with huge pages)")
