"""host_memory: with glibc's hugetlb tunable XLA:CPU's per-execution temporary buffer
arrives in 2 MiB pages instead of page-faulting in 4 KiB at a time every call (measured
in fresh processes: tunables are read at process start), and the command-line entry
points restart themselves with it."""

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
SUPPORTED = host_memory.supported(platform.libc_ver(), host_memory.thp_mode())

# A program whose temporary buffer (the [4096, 8192] f32 hidden layer, 128 MiB) is far
# above glibc's mmap threshold; prints its temp size and the minor page faults of each
# call.
PROBE = r"""
import json, resource
import jax, jax.numpy as jnp
x = jnp.ones((4096, 64), jnp.float32)
w = jnp.full((64, 8192), 0.01, jnp.float32)
v = jnp.full((8192, 8), 0.01, jnp.float32)
step = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v).lower(x, w, v).compile()
step(x, w, v).block_until_ready()
faults = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x, w, v).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "temp_bytes": step.memory_analysis().temp_size_in_bytes}))
"""


def probe(hugepages: bool) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
  if hugepages:
    env["GLIBC_TUNABLES"] = host_memory.TUNABLE
  result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=300, check=True, env=env)
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(SUPPORTED is not None, reason=f"no huge pages here: {SUPPORTED}")
def test_hugepages_remove_per_call_page_faults():
  default, huge = probe(False), probe(True)
  pages = default["temp_bytes"] / 4096
  assert default["temp_bytes"] >= 128 * 2**20
  if host_memory.thp_mode() == "madvise":
    # Without the tunable each call faults its whole temporary buffer in again.
    assert statistics.median(default["faults"]) >= 0.9 * pages, default
  # With it: ~1 fault per 2 MiB page plus small change (64 for this buffer).
  assert statistics.median(huge["faults"]) <= 0.05 * pages, huge


def test_hugepage_environ():
  glibc = ("glibc", "2.36")
  assert host_memory.hugepage_environ({"A": "1"}, glibc, "madvise") == {
      "A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert host_memory.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, glibc,
                                      "always") == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
  # Nothing to gain: already set, THP off, not glibc, or a glibc without the tunable.
  assert host_memory.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, glibc,
                                      "madvise") is None
  assert host_memory.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, glibc,
                                      "madvise") is None  # the user's choice stands
  assert host_memory.hugepage_environ({}, glibc, "never") is None
  assert host_memory.hugepage_environ({}, ("musl", "1.2"), "madvise") is None
  assert host_memory.hugepage_environ({}, ("glibc", "2.31"), "madvise") is None
  assert host_memory.supported(("glibc", "2.31"), "madvise") == (
      "glibc 2.31 predates the hugetlb tunable (2.35)")


def test_thp_mode(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host_memory.thp_mode(path) == "madvise"
  assert host_memory.thp_mode(tmp_path / "missing") == "unavailable"


def test_status_says_what_applies(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", host_memory.TUNABLE)
  assert host_memory.status(True).startswith("host malloc: transparent huge pages")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
  assert host_memory.status(True) == (
      "host malloc: system default (GLIBC_TUNABLES sets glibc.malloc.hugetlb=0)")
  monkeypatch.delenv("GLIBC_TUNABLES")
  assert host_memory.status(False) == "host malloc: system default (train.host_hugepages false)"
  monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("musl", "1.2"))
  assert host_memory.status(True) == "host malloc: system default (C library musl, not glibc)"


class Exec(Exception):
  pass


@pytest.mark.parametrize("hugepages", [True, False])
def test_train_entry_point_restarts_itself_with_hugepages(monkeypatch, hugepages):
  """The command line's call re-executes ``python -m ttt_jax.train`` with the same
  arguments and the tunable (config checked first, before jax.distributed starts);
  in-process callers and ``host_hugepages: false`` never do."""
  calls = []

  def execve(path, args, env):
    calls.append((path, args, env.get("GLIBC_TUNABLES")))
    raise Exec

  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.setattr(host_memory, "thp_mode", lambda path=None: "madvise")
  monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
  monkeypatch.setattr(host_memory.os, "execve", execve)
  monkeypatch.setattr(train_lib.distributed, "initialize_from_env", lambda: calls.append("dist"))
  monkeypatch.setattr(train_lib, "train", lambda cfg, workdir: calls.append("train"))
  argv = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--workdir", "w",
          "--set", f"train.host_hugepages={str(hugepages).lower()}"]
  if hugepages:
    with pytest.raises(Exec):
      train_lib.main(argv, reexec=True)
    assert calls == [(sys.executable, [sys.executable, "-m", "ttt_jax.train", *argv],
                      host_memory.TUNABLE)]
  else:
    train_lib.main(argv, reexec=True)
    assert calls == ["dist", "train"]
  calls.clear()
  train_lib.main(argv)  # an in-process caller
  assert calls == ["dist", "train"]
  with pytest.raises(SystemExit):  # a bad config is reported before any restart
    train_lib.main(["--config", os.devnull, "--workdir", "w", "--set", "train.steps=0"],
                   reexec=True)
  assert calls == ["dist", "train"]


@pytest.mark.slow
@pytest.mark.skipif(SUPPORTED is not None, reason=f"no huge pages here: {SUPPORTED}")
def test_bench_command_line_runs_with_hugepages():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
  tiny = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.ffn.d_ff=64",
          "data.seq_len=16", "data.vocab_size=64", "train.batch_size=2"]
  result = subprocess.run(
      [sys.executable, "-m", "ttt_jax.bench", "train", "--config",
       str(REPO / "configs" / "bench_dense.yaml"), "--steps", "1", "--warmup", "0",
       *[a for kv in tiny for a in ("--set", kv)]],
      capture_output=True, text=True, timeout=300, check=True, env=env, cwd=REPO)
  report = json.loads(result.stdout)
  assert report["host_malloc"].startswith("host malloc: transparent huge pages"), report


def test_config_field():
  assert load_config(None).train.host_hugepages is True
  assert load_config(None, ["train.host_hugepages=false"]).train.host_hugepages is False
