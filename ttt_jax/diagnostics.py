"""Library diagnostics go to a file in the run directory, not to the console.

orbax and grain log through absl (Python's ``absl`` logger); asyncio reports the futures
and coroutines that a failed tensorstore read or write leaves behind ("exception was
never retrieved", "Exception ignored in: <coroutine ...>", "Event loop is closed")
through its ``asyncio`` logger and ``sys.unraisablehook``. Each repeats, with a library
traceback, a failure that ttt_jax reports itself in one line (a damaged checkpoint moved
aside, a save that failed), often dozens of times. They are appended to a file instead
(``W/logs/libraries.log``, created with its folder on the first record): the console
keeps one line per event, and the file keeps everything for a bug report.

- ``library_logs(path)``: within a block (``train``, ``runs.load_trained``), then
  restored. The block ends with a garbage collection, so that coroutines a failed call
  left behind are finalized (and reported) while the file still receives them.
- ``library_logs_until_exit(path)``: for a command line's process, from then on: a
  library thread can still report a failed save's leftovers while the interpreter
  shuts down, after any block has ended.

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
from typing import Any, Callable, Iterator

LIBRARY_LOGGERS = ("absl", "asyncio")
"""The loggers whose records go to the file."""


def run_log(workdir: str | Path) -> Path:
  """A run directory's library log."""
  return Path(workdir) / "logs" / "libraries.log"


class _FileHandler(logging.FileHandler):
  """Appends to ``path``, creating it and its folder on the first record; a record it
  cannot write (or flush when closing) is dropped instead of raising."""

  def __init__(self, path: Path):
    super().__init__(path, delay=True)
    self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

  def _open(self):
    Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
    return super()._open()

  def emit(self, record: logging.LogRecord) -> None:
    try:
      super().emit(record)  # opens the file on the first record, outside its own guard
    except OSError:
      pass

  def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
    del record

  def close(self) -> None:
    """Closes the file; what it cannot flush (a full disk, a file-size limit) is dropped,
    so the error being reported (a save that failed for the same reason) stays the one
    the user sees."""
    try:
      super().close()
    except OSError:
      pass


def _unraisable_hook(handler: logging.Handler):
  """A ``sys.unraisablehook`` that writes to ``handler`` itself (not through a logger
  whose routing a block may have restored meanwhile)."""
  def hook(info: Any) -> None:
    where = f" in {info.object!r}" if info.object is not None else ""
    lines = traceback.format_exception(info.exc_type, info.exc_value, info.exc_traceback)
    handler.handle(logging.makeLogRecord({
        "name": "unraisable", "levelno": logging.WARNING, "levelname": "WARNING",
        "msg": f"{info.err_msg or 'Exception ignored'}{where}\n{''.join(lines).rstrip()}"}))
  return hook


def _route(path: str | Path) -> Callable[[], None]:
  """Routes the library loggers and unraisable exceptions to ``path``; returns the
  function that restores the previous routing."""
  handler = _FileHandler(Path(path))
  loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
  saved = [(logger.handlers, logger.propagate) for logger in loggers]
  previous_hook = sys.unraisablehook
  for logger in loggers:
    logger.handlers, logger.propagate = [handler], False
  sys.unraisablehook = _unraisable_hook(handler)

  def restore() -> None:
    sys.unraisablehook = previous_hook
    for logger, (handlers, propagate) in zip(loggers, saved):
      logger.handlers, logger.propagate = handlers, propagate
    handler.close()
  return restore


@contextlib.contextmanager
def library_logs(path: str | Path) -> Iterator[Path]:
  """Within the block, the ``LIBRARY_LOGGERS``' records and unraisable exceptions are
  appended to ``path``, not printed."""
  restore = _route(path)
  try:
    yield Path(path)
  finally:
    gc.collect()  # what a failed library call left behind is finalized here, to the file
    restore()


def library_logs_until_exit(path: str | Path) -> None:
  """``library_logs`` for the rest of the process (a command line's ``main``)."""
  _route(path)
