"""Library diagnostics go to the file, not the console."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
from pathlib import Path

from ttt_jax import diagnostics

REPO = Path(__file__).resolve().parents[1]


class _RaisesOnDelete:
  def __del__(self):
    raise RuntimeError("Event loop is closed")


def test_library_records_and_unraisable_exceptions_go_to_the_file(tmp_path, capfd):
  path = tmp_path / "logs" / "libraries.log"
  with diagnostics.library_logs(path):
    logging.getLogger("absl").error("save failed: OUT_OF_RANGE")
    logging.getLogger("asyncio").error("Future exception was never retrieved")
    _RaisesOnDelete()
    gc.collect()
  out, err = capfd.readouterr()
  assert out == "" and err == ""
  text = path.read_text()
  assert "save failed: OUT_OF_RANGE" in text and "never retrieved" in text
  assert "RuntimeError: Event loop is closed" in text and "_RaisesOnDelete" in text


def test_the_loggers_and_hook_are_restored(tmp_path):
  absl = logging.getLogger("absl")
  before = (list(absl.handlers), absl.propagate, sys.unraisablehook)
  with diagnostics.library_logs(tmp_path / "libraries.log"):
    assert sys.unraisablehook is not before[2]
  assert (list(absl.handlers), absl.propagate, sys.unraisablehook) == before
  assert not (tmp_path / "libraries.log").exists()  # created on the first record only


def test_an_unwritable_file_drops_records_quietly(tmp_path, capfd):
  path = tmp_path / "libraries.log"
  path.mkdir()  # a directory: opening it for appending fails
  with diagnostics.library_logs(path):
    logging.getLogger("absl").error("lost")
  assert capfd.readouterr().err == ""


def test_a_log_that_cannot_be_flushed_when_closed_raises_nothing(tmp_path):
  """Under a file-size limit (or a full disk) the records still buffered when the block
  ends are dropped: the error being reported stays the one the user sees."""
  code = f"""
import logging, resource
from ttt_jax import diagnostics
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
  with diagnostics.library_logs({str(tmp_path / "libraries.log")!r}):
    for _ in range(8):
      logging.getLogger("absl").error("x" * 1000)
    raise KeyError("the real error")
except KeyError as e:
  print("reported", e)
"""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout == "reported 'the real error'\n" and result.stderr == ""
  assert (tmp_path / "libraries.log").stat().st_size <= 4096


def test_until_exit_catches_what_a_library_reports_at_interpreter_shutdown(tmp_path):
  """A command line's process: an object finalized while the interpreter shuts down (as
  a failed save's asyncio leftovers are) reports to the file, not to stderr."""
  log = tmp_path / "run" / "logs" / "libraries.log"
  code = f"""
from ttt_jax import diagnostics
diagnostics.library_logs_until_exit({str(log)!r})
class Leftover:
  def __del__(self):
    raise RuntimeError("Event loop is closed")
leftover = Leftover()
"""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
  assert result.returncode == 0 and result.stderr == "", result.stderr
  assert "RuntimeError: Event loop is closed" in log.read_text()
