"""``python -m ttt_jax.evaluate``: tasks come from ``registry.EVAL_TASKS``, each with its
own flags; errors are one line. (Scoring a trained run: tests/test_train.py.)"""

from __future__ import annotations

import pytest

from ttt_jax import evaluate, registry

TASK_FLAGS = {
    "lm": ["--batches", "2"],
    "sufficiency": ["--batches", "2"],
    "compression": ["--contexts", "64,128"],
    "passkey": ["--passkey-lengths", "64", "--passkey-depths", "0,1", "--passkey-trials", "1"],
    "perplexity": ["--batches", "2", "--baseline", "elsewhere"],
    "governance": [],
    "all": ["--batches", "2", "--baseline", "b", "--contexts", "64", "--passkey-lengths", "64",
            "--passkey-depths", "0", "--passkey-trials", "1"],
}


def test_every_task_is_registered():
  assert set(registry.EVAL_TASKS.names()) == set(TASK_FLAGS)


@pytest.mark.parametrize("task", sorted(TASK_FLAGS))
def test_each_task_takes_its_flags_and_reports_a_missing_run_in_one_line(task, tmp_path,
                                                                         capsys):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--workdir", str(tmp_path), "--task", task, *TASK_FLAGS[task]])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}"), err
  assert not list(tmp_path.iterdir())


def test_a_flag_of_another_task_is_refused(capsys):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--workdir", "w", "--task", "lm", "--contexts", "64"])
  assert exit_info.value.code == 2
  assert "unrecognized arguments: --contexts 64" in capsys.readouterr().err
