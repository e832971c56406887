"""How command lines report errors: one line, a non-zero exit."""

from __future__ import annotations

import errno

import pytest

from ttt_jax.errors import ConfigError, DataError, user_errors


@pytest.mark.parametrize("error, code", [(ConfigError("train.steps: must be positive"), 2),
                                         (DataError("corpus.txt: empty"), 1)])
def test_user_errors_are_one_line(capsys, error, code):
  with pytest.raises(SystemExit) as exit_info:
    with user_errors():
      raise error
  assert exit_info.value.code == code
  assert capsys.readouterr().err == f"error: {error}\n"


def test_a_full_disk_anywhere_is_one_line_naming_the_file(capsys):
  with pytest.raises(SystemExit) as exit_info:
    with user_errors():
      raise OSError(errno.ENOSPC, "No space left on device", "/runs/a/metrics.jsonl")
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == (
      "error: /runs/a/metrics.jsonl: No space left on device (ENOSPC, errno 28)\n")


def test_other_os_errors_keep_their_traceback():
  """A missing file where the code expected one is a bug, not the storage's fault."""
  with pytest.raises(FileNotFoundError):
    with user_errors():
      raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")
