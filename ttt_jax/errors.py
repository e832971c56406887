"""The errors a user can act on, and how every command line reports them.

Each is raised with one line that names the config field, file or flag at fault;
``user_errors`` turns it into ``error: <line>`` on stderr and a non-zero exit (2 for a
config problem, 1 otherwise). An ``OSError`` that blames the storage (``STORAGE_ERRNOS``:
no space, a quota or file-size limit, permissions, an I/O error) is reported the same way,
naming the file and the errno. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Iterator

STORAGE_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
    errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM})
"""Errnos that blame the storage (or the process's limits), not the data or the code."""


def describe_errno(code: int) -> str:
  """``No space left on device (ENOSPC, errno 28)``."""
  return f"{os.strerror(code)} ({errno.errorcode.get(code, '?')}, errno {code})"


class UserError(Exception):
  """A problem with the user's input or files, reported as one line."""


class ConfigError(UserError, ValueError):
  """A config problem, reported to the user as one line."""


class DataError(UserError, ValueError):
  """A corpus, tokenizer or packed-token file that cannot be used."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be used with the current run."""


class TrainingError(UserError, RuntimeError):
  """A run that cannot go on (non-finite loss, unusable workdir, ...)."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
  """Turns a ``UserError`` into one line on stderr and a non-zero exit."""
  try:
    yield
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2 if isinstance(e, ConfigError) else 1) from None
  except OSError as e:
    if e.errno not in STORAGE_ERRNOS:
      raise
    where = f"{e.filename}: " if e.filename else ""
    print(f"error: {where}{describe_errno(e.errno)}", file=sys.stderr)
    raise SystemExit(1) from None
