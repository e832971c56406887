"""host_memory: XLA:CPU's per-execution temporary buffer stops page-faulting once freed
host memory is retained (measured in fresh processes, where the setting applies before
any XLA thread allocates)."""

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from ttt_jax import host_memory
from ttt_jax import train as train_lib
from ttt_jax.config import load_config

REPO = Path(__file__).resolve().parents[1]

# A program whose temporary buffer (the [4096, 8192] f32 hidden layer, 128 MiB) is far
# above glibc's 64 MiB secondary-arena heaps; prints its temp size and the minor page
# faults of each call.
PROBE = r"""
import json, resource, sys
from ttt_jax import host_memory
from ttt_jax import train as train_lib
note = host_memory.configure(sys.argv[1] == "retain")
import jax, jax.numpy as jnp
x = jnp.ones((4096, 64), jnp.float32)
w = jnp.full((64, 8192), 0.01, jnp.float32)
v = jnp.full((8192, 8), 0.01, jnp.float32)
step = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v).lower(x, w, v).compile()
step(x, w, v).block_until_ready()
faults = []
for _ in range(30):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x, w, v).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"note": note, "faults": faults,
                  "temp_bytes": step.memory_analysis().temp_size_in_bytes}))
"""


def probe(mode: str) -> dict:
  # One CPU device, as `python -m ttt_jax.train` has on a CPU host (conftest's 8
  # simulated devices add allocating threads and heap churn around the buffer).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True,
                          text=True, timeout=300, check=True, env=env)
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")
def test_retained_memory_removes_per_step_page_faults():
  default, retained = probe("system"), probe("retain")
  pages = default["temp_bytes"] / 4096
  assert default["temp_bytes"] >= 128 * 2**20
  # Without the setting each call faults its whole temporary buffer in again.
  assert statistics.median(default["faults"]) >= 0.9 * pages, default
  assert "unchanged" in default["note"]
  # With it the buffer is reused. The heap still grows by a buffer in a few of the first
  # calls (a buffer's free can land after the next call's allocation); measured 1-7 of
  # 30 calls, then none.
  assert statistics.median(retained["faults"]) <= 0.01 * pages, retained
  assert retained["note"].startswith("host malloc: freed memory retained"), retained


def test_non_glibc_is_reported_not_silent(monkeypatch):
  monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("musl", "1.2"))
  assert host_memory.retain_freed_memory() == (
      "host malloc unchanged: C library is musl, not glibc")


def test_config_field(monkeypatch):
  monkeypatch.setattr(host_memory, "_applied", host_memory._applied)
  assert load_config(None).train.retain_host_memory is True
  cfg = load_config(None, ["train.retain_host_memory=false"])
  assert cfg.train.retain_host_memory is False
  assert host_memory.configure(False) == (
      "host malloc unchanged (train.retain_host_memory false)")
  assert host_memory.status() == host_memory.configure(False)


@pytest.mark.parametrize("retain", [True, False])
def test_train_entry_point_applies_it_before_the_runtime(monkeypatch, retain):
  """``python -m ttt_jax.train`` sets malloc before jax.distributed starts, and only
  when the config asks; the run then logs ``status()``."""
  events = []
  monkeypatch.setattr(host_memory, "_applied", host_memory._applied)
  monkeypatch.setattr(host_memory, "retain_freed_memory",
                      lambda: events.append("malloc") or "retained (test)")
  monkeypatch.setattr(train_lib.distributed, "initialize_from_env",
                      lambda: events.append("distributed"))
  monkeypatch.setattr(train_lib, "train",
                      lambda cfg, workdir: events.append(("train", host_memory.status())))
  train_lib.main(["--config", str(REPO / "configs" / "quickstart.yaml"), "--workdir", "unused",
                  "--set", f"train.retain_host_memory={str(retain).lower()}"])
  if retain:
    assert events == ["malloc", "distributed", ("train", "retained (test)")]
  else:
    assert events == ["distributed",
                      ("train", "host malloc unchanged (train.retain_host_memory false)")]
