"""Real multi-process runs on localhost, preemption (SIGTERM) and SIGKILL recovery."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ttt_jax import runs, train
from train_util import copy_stdlib_corpus, tiny_config, tiny_overrides, train_losses

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-4  # see tests/test_sharding.py: fp32 summation order only


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  return copy_stdlib_corpus(root / "src"), root / "cache"


def cli_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHON=sys.executable, PYTHONPATH=str(REPO))
  for var in ("TTT_JAX_COORDINATOR", "TTT_JAX_NUM_PROCESSES", "TTT_JAX_PROCESS_ID"):
    env.pop(var, None)
  return env


def train_args(corpus, workdir: Path, *overrides: str) -> list[str]:
  sets = [arg for value in tiny_overrides(*corpus) + list(overrides) for arg in ("--set", value)]
  return ["--config", os.devnull, "--workdir", str(workdir), *sets]


@pytest.mark.parametrize("script,env,missing", [
    ("multinode.sh", {}, "COORDINATOR"),
    ("multinode.sh", {"COORDINATOR": "h:1", "NUM_PROCESSES": "2"}, "PROCESS_ID"),
    ("multinode.sh", {"COORDINATOR": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "2"},
     "PROCESS_ID must be in \\[0, 2\\)"),
    ("slurm.sbatch", {}, "CONFIG"),
    ("slurm.sbatch", {"CONFIG": "c.yaml", "WORKDIR": "w"}, "SLURM_JOB_ID"),
])
def test_cluster_launchers_fail_fast_naming_the_variable(script, env, missing):
  base = {k: v for k, v in cli_env(1).items()
          if k not in ("COORDINATOR", "NUM_PROCESSES", "PROCESS_ID", "CONFIG", "WORKDIR")
          and not k.startswith("SLURM_")}
  result = subprocess.run(["bash", str(REPO / "launch" / script), "--config", "x"],
                          env={**base, **env}, capture_output=True, text=True, timeout=30)
  assert result.returncode == 2
  assert len(result.stderr.strip().splitlines()) == 1
  import re
  assert re.search(missing, result.stderr), result.stderr


def test_distributed_env_errors_name_the_variable(monkeypatch):
  from ttt_jax import distributed
  from ttt_jax.config import ConfigError
  monkeypatch.setenv("TTT_JAX_COORDINATOR", "127.0.0.1:1")
  monkeypatch.delenv("TTT_JAX_NUM_PROCESSES", raising=False)
  monkeypatch.delenv("TTT_JAX_PROCESS_ID", raising=False)
  with pytest.raises(ConfigError, match="TTT_JAX_NUM_PROCESSES, TTT_JAX_PROCESS_ID not set"):
    distributed.initialize_from_env()


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(corpus, tmp_path):
  """2 processes x 4 devices == 1 process x 8 devices (same (1, 8, 1) mesh), and the
  2-process checkpoint continues the same sample stream in a 1-process run."""
  mesh = ("mesh.num_devices=0", "mesh.fsdp=-1", "train.steps=20", "train.eval_every=0",
          "checkpoint.every=10")
  reference = tmp_path / "reference"
  train.train(tiny_config(*corpus, *mesh), reference)

  multi = tmp_path / "multi"
  result = subprocess.run(
      ["bash", str(REPO / "launch" / "local.sh"), "2", "4", "--",
       *train_args(corpus, multi, *mesh, "train.stop_after=10")],
      env=cli_env(4), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "over 8 of 8 devices (2 processes)" in result.stderr
  ref_losses, multi_losses = train_losses(reference), train_losses(multi)
  assert sorted(multi_losses) == list(range(1, 11))  # metrics written once (process 0)
  np.testing.assert_allclose([multi_losses[s] for s in range(1, 11)],
                             [ref_losses[s] for s in range(1, 11)], rtol=RTOL)

  resumed = train.train(tiny_config(*corpus, *mesh), multi)
  assert resumed["start_step"] == 10
  losses = train_losses(multi)
  assert sorted(losses) == list(range(1, 21))
  np.testing.assert_allclose([losses[s] for s in range(11, 21)],
                             [ref_losses[s] for s in range(11, 21)], rtol=RTOL)


def _wait_for_checkpoint(directory: Path, step: int, proc: subprocess.Popen,
                         timeout: float) -> None:
  """Until a checkpoint of ``step`` or later exists (with keep=K an early one may be
  deleted again before a poll sees it)."""
  deadline = time.monotonic() + timeout
  while not any(p.name.isdigit() and int(p.name) >= step
                for p in (directory.iterdir() if directory.is_dir() else ())):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.monotonic() < deadline, f"no checkpoint >= {step} appeared in {directory}"
    time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_and_sigkill_at_random_moments_resume_bit_exactly(corpus, tmp_path):
  """Interrupted twice (SIGTERM: clean save and exit; SIGKILL: at a random moment,
  possibly mid-save) and restarted each time, the run has exactly the per-step losses
  and final params of an uninterrupted run."""
  # 60 steps leave the run time to be interrupted after checkpoint 12 even on a fast host
  settings = ("train.steps=60", "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep=2")
  reference = tmp_path / "reference"
  ref_summary = train.train(tiny_config(*corpus, *settings), reference)

  workdir = tmp_path / "interrupted"
  args = [sys.executable, "-m", "ttt_jax.train", *train_args(corpus, workdir, *settings)]
  seed = random.randrange(2**32)
  rng = random.Random(seed)
  for sig, first_checkpoint in ((signal.SIGTERM, 4), (signal.SIGKILL, 12)):
    proc = subprocess.Popen(args, env=cli_env(8), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(workdir / "checkpoints", first_checkpoint, proc, timeout=120)
    time.sleep(rng.uniform(0.0, 0.5))
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
      assert proc.returncode == 0, err[-3000:]
      assert "received SIGTERM; saved a checkpoint at step" in err
    else:
      assert proc.returncode == -signal.SIGKILL
  final = subprocess.run(args, env=cli_env(8), capture_output=True, text=True, timeout=300)
  assert final.returncode == 0, final.stderr[-3000:]
  assert "resumed from checkpoint at step" in final.stderr

  assert train_losses(workdir) == train_losses(reference), f"kill-time seed {seed}"
  _, _, params, step, _ = runs.load_trained(workdir, log=lambda _: None)
  assert step == 60
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_summary["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
