"""Host allocator settings for XLA:CPU (``train.retain_host_memory``).

XLA:CPU allocates each executable's temporary buffer (one block holding every
intermediate of the program: 238 MiB for the bench_dense train step) when the program
starts and frees it when it ends, from whichever XLA worker thread runs it. glibc serves
such a thread from a secondary malloc arena, whose heaps are at most 64 MiB, so a larger
block always comes from a fresh ``mmap`` and goes back with ``munmap``: every step
page-faults its whole temporary buffer in again (61k-176k minor faults a step measured on
the train steps of benchmarks/RESULTS.md, 7-15% of the step time).

``retain_freed_memory`` configures glibc so freed memory stays in the process and the
next step reuses it: one arena (the main one, which grows with ``sbrk`` and has no size
limit), no ``mmap`` for large blocks, and no trimming of the heap top. The cost is that
the process keeps its peak host memory until it exits, which a training or benchmark
process does anyway. Call it before the first XLA computation: threads that already
allocated keep the arena they have.

Only the command-line entry points apply it (``configure`` in ``train.main`` and
``bench.main``): it is a process-wide setting, and XLA compilation, which allocates
from many threads at once, is slower with a single arena (bench_dense compile 3.2-4.5 s
against 2.7-3.2 s; the compile-heavy test suite ~25% slower), so a library caller such
as the tests keeps its process's default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD_BYTES = 2**31 - 1
"""Largest value mallopt takes (an int): a free heap top below 2 GiB is never trimmed."""

_applied = "host malloc: system default"
"""What this process's entry point did (``status``)."""


def retain_freed_memory() -> str:
  """Applies the settings above; returns a one-line description of what was done
  (also when nothing could be, e.g. on a C library other than glibc)."""
  libc_name, _ = platform.libc_ver()
  if libc_name != "glibc":
    return f"host malloc unchanged: C library is {libc_name or 'unknown'}, not glibc"
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
  settings = ((M_ARENA_MAX, 1, "arena_max=1"), (M_MMAP_MAX, 0, "mmap_max=0"),
              (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES, "trim_threshold=2GiB"))
  failed = [name for param, value, name in settings if libc.mallopt(param, value) != 1]
  if failed:
    return f"host malloc: glibc rejected {', '.join(failed)}"
  return "host malloc: freed memory retained (glibc " + ", ".join(s[2] for s in settings) + ")"


def configure(retain: bool) -> str:
  """``train.retain_host_memory``: ``retain_freed_memory()`` when true; returns (and
  records for ``status``) the log line."""
  global _applied
  _applied = (retain_freed_memory() if retain
              else "host malloc unchanged (train.retain_host_memory false)")
  return _applied


def status() -> str:
  """The line ``configure`` returned in this process, or that nothing was changed."""
  return _applied
