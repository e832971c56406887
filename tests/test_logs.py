"""What a resumed run says about its config changes: every changed field on one line,
and the learning rate at the resume step before -> after when the schedule changes."""

from __future__ import annotations

import pytest

from ttt_jax import runs
from ttt_jax.config import load_config, save_config
from ttt_jax.training import optim

BASE = ["optim.lr=0.001", "optim.schedule=cosine", "optim.warmup_steps=10",
        "train.steps=300"]


def lr_at(cfg, step: int) -> str:
  return f"{float(optim.lr_schedule(cfg.optim, cfg.train.steps)(step)):.2e}"


def test_changed_lr_and_steps_are_named_with_the_schedule_change():
  saved = load_config(None, BASE)
  cfg = load_config(None, BASE + ["optim.lr=0.002", "train.steps=600"])
  lines = runs.resume_changes(saved, cfg, 200)
  assert lines == [
      "resume: config changed: optim.lr 0.001 -> 0.002, train.steps 300 -> 600",
      f"resume: the learning-rate schedule changes from step 201 on (optim.lr, "
      f"train.steps): lr {lr_at(saved, 200)} -> {lr_at(cfg, 200)}"]
  assert lr_at(saved, 200) != lr_at(cfg, 200)


def test_a_change_outside_the_schedule_is_named_alone_and_no_change_says_nothing():
  saved = load_config(None, BASE)
  cfg = load_config(None, BASE + ["train.log_every=5", "logging.progress_bar=false",
                                  "data.corpus=[a.txt, b.txt]"])
  assert runs.resume_changes(saved, cfg, 10) == [
      "resume: config changed: data.corpus [stdlib] -> [a.txt, b.txt], "
      "train.log_every 10 -> 5, logging.progress_bar true -> false"]
  assert runs.resume_changes(saved, load_config(None, BASE), 10) == []


@pytest.mark.parametrize("override", ["optim.warmup_steps=50", "optim.schedule=wsd",
                                      "optim.min_lr_ratio=0.5", "optim.decay_fraction=0.5"])
def test_every_field_the_schedule_reads_is_named_as_a_schedule_change(override):
  saved = load_config(None, BASE)
  lines = runs.resume_changes(saved, load_config(None, BASE + [override]), 100)
  assert len(lines) == 2 and f"({override.split('=')[0]})" in lines[1]


def test_muon_s_adam_lr_changes_the_schedule_only_for_muon():
  for name, lines in (("muon", 2), ("adamw", 1)):
    saved = load_config(None, BASE + [f"optim.name={name}"])
    cfg = load_config(None, BASE + [f"optim.name={name}", "optim.adam_lr=0.01"])
    assert len(runs.resume_changes(saved, cfg, 100)) == lines, name


def test_the_report_reads_the_workdir_s_config_and_names_one_it_cannot_read(tmp_path):
  saved, cfg = load_config(None, BASE), load_config(None, BASE + ["optim.lr=0.002"])
  save_config(saved, tmp_path / "config.yaml")
  printed = []
  runs.report_resume(cfg, tmp_path, 100, printed.append)
  assert printed == runs.resume_changes(saved, cfg, 100) and len(printed) == 2
  (tmp_path / "config.yaml").write_text("train: {retired_field: 1}\n")
  printed.clear()
  runs.report_resume(cfg, tmp_path, 100, printed.append)
  assert printed == [
      "resume: the saved config.yaml cannot be compared with this config (unknown config "
      "key 'train.retired_field'); it is kept in config_history/"]


def test_extending_a_wsd_run_before_its_warmdown_keeps_the_lr():
  """What the README advises for extending without a jump."""
  wsd = BASE + ["optim.schedule=wsd", "optim.decay_fraction=0.2"]
  saved, cfg = load_config(None, wsd), load_config(None, wsd + ["train.steps=600"])
  lines = runs.resume_changes(saved, cfg, 200)
  assert lines[1].endswith("(train.steps): lr 1.00e-03 -> 1.00e-03")
  assert runs.resume_changes(saved, cfg, 280)[1].endswith("-> 1.00e-03")  # was decaying
  assert not runs.resume_changes(saved, cfg, 280)[1].endswith("lr 1.00e-03 -> 1.00e-03")
