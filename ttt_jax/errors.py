"""The errors a user can act on, and how every command line reports them.

Each is raised with one line that names the config field, file or flag at fault;
``user_errors`` turns it into ``error: <line>`` on stderr and a non-zero exit (2 for a
config problem, 1 otherwise). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


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
