"""Library diagnostics go to a file in the run directory, not to the console.

orbax and grain log through absl (Python's ``absl`` logger); asyncio reports the futures
and coroutines that a failed tensorstore read or write leaves behind ("exception was
never retrieved", "Exception ignored in: <coroutine ...>", "Event loop is closed")
through its ``asyncio`` logger and ``sys.unraisablehook``. Each repeats, with a library
traceback, a failure that ttt_jax reports itself in one line (a damaged checkpoint moved
aside, a save that failed), often dozens of times. Inside ``library_logs(path)`` they
are appended to ``path`` instead (``W/logs/libraries.log`` for the command lines): the
console keeps one line per event, and the file keeps everything for a bug report. The
block ends with a garbage collection, so that coroutines a failed call left behind are
finalized (and reported) while the file still receives them, not at interpreter exit.
Nothing is dropped unless the file itself cannot be written (a full disk), in which case
the records are lost rather than printed as logging errors.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator

LIBRARY_LOGGERS = ("absl", "asyncio")
"""The loggers whose records go to the file."""

_UNRAISABLE = "ttt_jax.unraisable"


class _FileHandler(logging.FileHandler):
  """A file handler that drops a record it cannot write instead of printing a traceback."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      super().emit(record)  # opens the file on the first record, outside its own guard
    except OSError:
      pass

  def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
    del record


@contextlib.contextmanager
def library_logs(path: str | Path) -> Iterator[Path]:
  """Within the block, the ``LIBRARY_LOGGERS``' records and unraisable exceptions are
  appended to ``path`` (created on the first record), not printed."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  handler = _FileHandler(path, delay=True)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  loggers = [logging.getLogger(name) for name in (*LIBRARY_LOGGERS, _UNRAISABLE)]
  saved = [(logger.handlers, logger.propagate) for logger in loggers]
  for logger in loggers:
    logger.handlers, logger.propagate = [handler], False
  previous_hook = sys.unraisablehook

  def unraisable(info: Any) -> None:
    where = f" in {info.object!r}" if info.object is not None else ""
    lines = traceback.format_exception(info.exc_type, info.exc_value, info.exc_traceback)
    logging.getLogger(_UNRAISABLE).warning("%s%s\n%s", info.err_msg or "Exception ignored",
                                           where, "".join(lines).rstrip())

  sys.unraisablehook = unraisable
  try:
    yield path
  finally:
    gc.collect()  # what a failed library call left behind is finalized here, to the file
    sys.unraisablehook = previous_hook
    for logger, (handlers, propagate) in zip(loggers, saved):
      logger.handlers, logger.propagate = handlers, propagate
    handler.close()
