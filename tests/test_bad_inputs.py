"""The bad-input corpus: every case is a real command line that a new user might type.

Each case in ``CASES`` runs ``python -m ttt_jax.<module> ...`` in a fresh process, from
an empty current directory, and must:
- exit non-zero;
- end stderr with one line naming the field, file or flag at fault (``last_line``, a
  regex searched in stderr's last line);
- print no traceback;
- write nothing into the current directory;
- leave the good run (a tiny model trained for a few steps in a module fixture, that
  the ``{run}`` cases point at) byte-identical, which still resumes afterwards
  (``test_the_good_run_still_resumes``, last in the module).

To add a case, append a ``Case`` to ``CASES``. In its ``argv``:
- ``{run}`` is the good run's workdir;
- ``{files}`` the folder of bad files written by ``_write_bad_files``;
- ``{new}`` a fresh, not yet created workdir of the case's own;
- the item ``TINY`` expands to the ``--set`` flags of the good run's config (so a case
  that adds ``--set key=value`` after it changes that one field).
``fast=True`` marks a case that fails on the config alone, before JAX compiles anything:
those run in the fast tier, the rest are ``slow``. The slow cases run two at a time: the
whole module takes about 2 minutes on 2 idle CPUs (3 under load), most of it each
process's JAX import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.train_util import copy_stdlib_corpus, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  argv: tuple[str, ...]
  """``python -m ttt_jax.<argv[0]> <argv[1:]>``, with the placeholders of the docstring."""
  last_line: str
  """A regex searched in stderr's last line: it names the field, file or flag."""
  fast: bool = False
  """Fails on the config alone, before JAX compiles anything (the fast tier runs it)."""


def _train(*args: str) -> tuple[str, ...]:
  """``train`` with the good run's config on a fresh workdir, then ``args``."""
  return ("train", "--config", os.devnull, "--workdir", "{new}", "TINY", *args)


def _config_file(name: str, *args: str) -> tuple[str, ...]:
  """``train`` with the config file ``name`` of the case files on a fresh workdir."""
  return ("train", "--config", f"{{files}}/{name}" if name else "{files}", "--workdir",
          "{new}", *args)


def _on_run(*args: str) -> tuple[str, ...]:
  """``train`` resuming the good run with its own config, then ``args``."""
  return ("train", "--config", os.devnull, "--workdir", "{run}", "TINY", *args)


CASES = [
    # unknown keys, wrong types, legacy keys
    Case("unknown key", _train("--set", "model.n_layer=2"),
         r"unknown config key 'model\.n_layer'; did you mean model\.n_layers", fast=True),
    Case("unknown section", _train("--set", "trian.steps=3"), r"'trian'", fast=True),
    Case("set without =", _train("--set", "train.steps"), r"--set 'train\.steps': expected KEY=VALUE",
         fast=True),
    Case("int field given text", _train("--set", "train.steps=abc"),
         r"train\.steps: expected an integer", fast=True),
    Case("bool field given text", _train("--set", "model.tie_embeddings=maybe"),
         r"model\.tie_embeddings: expected true/false", fast=True),
    Case("float field given text", _train("--set", "optim.lr=fast"), r"optim\.lr: expected a number"),
    Case("list field given a mapping", _train("--set", "data.corpus={a: 1}"), r"data\.corpus"),
    Case("flat legacy key", _train("--set", "model.ttt_mini_batch=8"),
         r"model\.ttt_mini_batch: moved to model\.mixer\.mini_batch"),
    Case("flat legacy key cct", _train("--set", "model.cct_step_len=8"),
         r"model\.cct_step_len: moved to model\.mixer\.step_len"),
    Case("key of another mechanism", _train("--set", "model.mixer.mini_batch=8"),
         r"model\.mixer\.mini_batch"),
    # bad enum values
    Case("bad mixer", _train("--set", "model.mixer=transformr"), r"model\.mixer.*'transformr'"),
    Case("bad residual", _train("--set", "model.residual=hyper"), r"model\.residual.*'hyper'"),
    Case("bad remat", _train("--set", "model.remat=some"), r"model\.remat.*'some'"),
    Case("bad optimizer", _train("--set", "optim.name=adam"), r"optim\.name: 'adam'"),
    Case("bad schedule", _train("--set", "optim.schedule=linear"), r"optim\.schedule: 'linear'"),
    Case("bad objective", _train("--set", "train.objective=mlm"), r"objective.*'mlm'"),
    Case("bad dtype", _train("--set", "model.dtype=float8"), r"model\.dtype"),
    # counts and ranges
    Case("zero steps", _train("--set", "train.steps=0"), r"train\.steps: must be"),
    Case("negative batch", _train("--set", "train.batch_size=-8"), r"train\.batch_size"),
    Case("negative warmup", _train("--set", "optim.warmup_steps=-1"), r"optim\.warmup_steps"),
    Case("zero seq_len", _train("--set", "data.seq_len=0"), r"data\.seq_len"),
    Case("accum not dividing the batch", _train("--set", "optim.grad_accum_steps=3"),
         r"optim\.grad_accum_steps"),
    Case("lr 1e39 (inf in float32)", _train("--set", "optim.lr=1e39"),
         r"optim\.lr: must be <= 1e\+10", fast=True),
    Case("adam_lr inf", _train("--set", "optim.adam_lr=.inf"), r"optim\.adam_lr: must be"),
    Case("lr nan", _train("--set", "optim.lr=.nan"), r"optim\.lr: must be"),
    Case("negative lr", _train("--set", "optim.lr=-1"), r"optim\.lr: must be > 0"),
    Case("beta above 1", _train("--set", "optim.b2=1.5"), r"optim\.b2: must be in \[0, 1\]"),
    Case("empty corpus", _train("--set", "data.corpus=[]"), r"data\.corpus"),
    Case("corpus matching nothing", _train("--set", "data.corpus=[/nonexistent/*.txt]"),
         r"/nonexistent/\*\.txt"),
    Case("mesh larger than the devices", _train("--set", "mesh.num_devices=4"), r"mesh"),
    # config files
    Case("missing config file", _config_file("nope.yaml"),
         r"nope\.yaml: cannot read config file", fast=True),
    Case("config is a directory", _config_file(""), r"cannot read config file"),
    Case("config not UTF-8", _config_file("binary.yaml"),
         r"binary\.yaml: not a UTF-8 text file"),
    Case("invalid YAML", _config_file("invalid.yaml"),
         r"invalid\.yaml: line \d+ invalid YAML"),
    Case("YAML list at the top", _config_file("list.yaml"),
         r"list\.yaml: expected a mapping at the top level"),
    Case("YAML model: 5 with --set", _config_file("model5.yaml", "--set", "model.n_layers=2"),
         r"model5\.yaml: model: expected a mapping, got int 5", fast=True),
    Case("YAML python tag", _config_file("python_tag.yaml"),
         r"python_tag\.yaml:.* invalid YAML"),
    Case("YAML unknown key", _config_file("unknown.yaml"),
         r"unknown config key 'optim\.learning_rate'"),
    Case("YAML flat legacy key", _config_file("legacy.yaml"),
         r"model\.ttt_mini_batch: moved to"),
    # workdirs
    Case("empty workdir", ("train", "--config", "configs/quickstart.yaml", "--workdir", ""),
         r"^error: --workdir: empty", fast=True),
    Case("blank workdir", ("train", "--config", "configs/quickstart.yaml", "--workdir", "  "),
         r"^error: --workdir: empty"),
    Case("workdir is a file", ("train", "--config", os.devnull, "--workdir", "{files}/a_file",
                               "TINY"), r"a_file: workdir is not writable"),
    Case("workdir under a file", ("train", "--config", os.devnull, "--workdir",
                                  "{files}/a_file/run", "TINY"), r"a_file/run: workdir is not writable"),
    Case("workdir unwritable", ("train", "--config", os.devnull, "--workdir", "/proc/ttt_run",
                                "TINY"), r"/proc/ttt_run: workdir is not writable"),
    # resuming the good run with another config
    Case("resume, another model", _on_run("--set", "model.n_layers=3"), r"model"),
    Case("resume, another optimizer", _on_run("--set", "optim.name=sgd"), r"optim"),
    Case("resume, another seq_len", _on_run("--set", "data.seq_len=32"), r"data\.seq_len"),
    Case("resume, another tokenizer", _on_run("--set", "data.vocab_size=384"), r"tokenizer|vocab"),
    Case("resume, lr 1e39", _on_run("--set", "optim.lr=1e39"), r"optim\.lr"),
    Case("init-from a missing path", _train("--init-from", "{files}/no_such_run"), r"no_such_run"),
    # generate
    Case("generate, empty workdir", ("generate", "--workdir", "", "--prompt", "def"),
         r"^error: --workdir: empty"),
    Case("generate, no checkpoint", ("generate", "--workdir", "{files}", "--prompt", "def"),
         r"tokenizer\.model: missing"),
    Case("generate, zero max-new-tokens", ("generate", "--workdir", "{run}", "--prompt", "def",
                                           "--max-new-tokens", "0"), r"--max-new-tokens: must be"),
    Case("generate, negative temperature", ("generate", "--workdir", "{run}", "--prompt", "def",
                                            "--temperature", "-1"), r"--temperature: must be"),
    Case("generate, NaN temperature", ("generate", "--workdir", "{run}", "--prompt", "def",
                                       "--temperature", "nan"), r"--temperature: must be"),
    Case("generate, top-p 0", ("generate", "--workdir", "{run}", "--prompt", "def", "--top-p", "0"),
         r"--top-p: must be in"),
    Case("generate, top-p 1.5", ("generate", "--workdir", "{run}", "--prompt", "def",
                                 "--top-p", "1.5"), r"--top-p: must be in"),
    Case("generate, empty prompt", ("generate", "--workdir", "{run}", "--prompt", ""),
         r"--prompt: encodes to no tokens"),
    Case("generate, another model", ("generate", "--workdir", "{run}", "--prompt", "def",
                                     "--set", "model.n_layers=3"), r"model"),
    Case("generate, hash chain of a non-CCT run", ("generate", "--workdir", "{run}", "--prompt",
                                                   "def", "--hash-chain", "{files}/c.json"),
         r"--hash-chain: needs a CCT run"),
    # evaluate
    Case("evaluate, unknown task", ("evaluate", "--workdir", "{run}", "--task", "lmm"),
         r"'lmm' is not one of"),
    Case("evaluate, negative batches", ("evaluate", "--workdir", "{run}", "--batches", "-1"),
         r"--batches"),
    Case("evaluate, another model", ("evaluate", "--workdir", "{run}", "--set", "model.d_model=32"),
         r"model"),
    Case("evaluate, empty workdir", ("evaluate", "--workdir", ""), r"^error: --workdir: empty"),
    Case("evaluate, not a run", ("evaluate", "--workdir", "{files}"), r"no config\.yaml here"),
    # bench counts
    Case("bench train, zero steps", ("bench", "train", "--config", "configs/quickstart.yaml",
                                     "--steps", "0"), r"^error: --steps: must be >= 1, got 0",
         fast=True),
    Case("bench train, negative warmup", ("bench", "train", "--config", "configs/quickstart.yaml",
                                          "--warmup", "-1"), r"^error: --warmup: must be >= 0"),
    Case("bench train, missing config", ("bench", "train", "--config", "{files}/nope.yaml"),
         r"nope\.yaml: cannot read"),
    Case("bench io, zero saves", ("bench", "io", "--saves", "0"), r"^error: --saves: must be >= 1"),
    Case("bench io, zero steps", ("bench", "io", "--steps", "0"), r"^error: --steps: must be >= 1"),
    Case("bench ttt, zero iters", ("bench", "ttt", "--iters", "0"), r"^error: --iters: must be >= 1"),
    Case("bench ttt, zero batch", ("bench", "ttt", "--batch", "0"), r"^error: --batch: must be >= 1"),
    Case("bench ttt, zero seq", ("bench", "ttt", "--seq", "0"), r"^error: --seq: must be >= 1"),
    Case("bench ttt, zero mini-batch", ("bench", "ttt", "--mini-batch", "0"),
         r"^error: --mini-batch: must be >= 1"),
    Case("bench mhc, zero rounds", ("bench", "mhc", "--rounds", "0"), r"^error: --rounds: must be"),
    Case("bench mhc, negative warmup", ("bench", "mhc", "--warmup", "-1"),
         r"^error: --warmup: must be >= 0"),
    Case("bench mhc, zero replicas", ("bench", "mhc", "--replicas", "0"),
         r"^error: --replicas: must be"),
    Case("bench cct, bad contexts", ("bench", "cct", "--config", "configs/cct_tier1_160m.yaml",
                                     "--contexts", "1024,x"), r"^error: --contexts"),
    Case("bench cct, zero context", ("bench", "cct", "--config", "configs/cct_tier1_160m.yaml",
                                     "--contexts", "0"), r"^error: --contexts: every context"),
    Case("bench cct, zero new tokens", ("bench", "cct", "--hash-chain", "--new-tokens", "0"),
         r"^error: --new-tokens: must be >= 1"),
    # cct_chain records
    Case("cct_chain, missing record", ("cct_chain", "--workdir", "{run}", "{files}/nope.json"),
         r"FILE\.json: cannot read"),
    Case("cct_chain, record not JSON", ("cct_chain", "--workdir", "{run}", "{files}/invalid.yaml"),
         r"FILE\.json: cannot read"),
    Case("cct_chain, not a record", ("cct_chain", "--workdir", "{run}", "{files}/record.json"),
         r"FILE\.json: .* is not a hash chain record"),
    Case("cct_chain, empty workdir", ("cct_chain", "--workdir", "", "{files}/record.json"),
         r"^error: --workdir: empty"),
    Case("cct_chain, a non-CCT run", ("cct_chain", "--workdir", "{run}", "{files}/chain.json"),
         r"--workdir: needs a CCT run"),
]


def _write_bad_files(files: Path) -> None:
  files.mkdir()
  (files / "binary.yaml").write_bytes(b"\xff\xfe\x00model: \x80\x81\n")
  (files / "invalid.yaml").write_text("model: [1, 2\noptim: {\n")
  (files / "list.yaml").write_text("- model\n- optim\n")
  (files / "model5.yaml").write_text("model: 5\n")
  (files / "python_tag.yaml").write_text("model: !!python/object/apply:os.system ['true']\n")
  (files / "unknown.yaml").write_text("optim:\n  learning_rate: 0.1\n")
  (files / "legacy.yaml").write_text("model:\n  ttt_mini_batch: 8\n")
  (files / "a_file").write_text("not a directory\n")
  (files / "record.json").write_text(json.dumps({"header": {}}))
  (files / "chain.json").write_text(json.dumps({"header": {}, "genesis": "0", "sequences": []}))


def cli_env() -> dict[str, str]:
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))
  for var in ("TTT_JAX_COORDINATOR", "TTT_JAX_NUM_PROCESSES", "TTT_JAX_PROCESS_ID"):
    env.pop(var, None)
  return env


@dataclasses.dataclass(frozen=True)
class Setup:
  root: Path
  run: Path
  files: Path
  tiny: tuple[str, ...]
  """The good run's ``--set`` flags."""


def _tree_digest(directory: Path) -> dict[str, str]:
  """sha256 of every file under ``directory`` (the good run's checkpoints and run files)."""
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def _run_digest(run: Path) -> dict[str, str]:
  digest = _tree_digest(run / "checkpoints")
  for name in ("config.yaml", "tokenizer.model", "metrics.jsonl"):
    digest[name] = hashlib.sha256((run / name).read_bytes()).hexdigest()
  return digest


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Setup:
  """The bad files, the corpus and the good run's flags; the run is not trained yet."""
  root = tmp_path_factory.mktemp("bad_inputs")
  corpus_glob = copy_stdlib_corpus(root / "corpus")
  tiny = tuple(arg for value in tiny_overrides(corpus_glob, root / "cache") + [
      "train.steps=4", "train.eval_every=4", "checkpoint.every=2", "checkpoint.async_save=false",
      "logging.tensorboard=false"] for arg in ("--set", value))
  _write_bad_files(root / "files")
  return Setup(root, root / "run", root / "files", tiny)


@pytest.fixture(scope="module")
def setup(base: Setup) -> Setup:
  """``base`` with the good run trained: 4 steps, checkpoints at 2 and 4."""
  result = subprocess.run(
      [sys.executable, "-m", "ttt_jax.train", "--config", os.devnull, "--workdir",
       str(base.run), *base.tiny],
      env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (base.run / "checkpoints" / "4").is_dir()
  return base


@dataclasses.dataclass
class Outcome:
  case: Case
  returncode: int
  stderr: str
  cwd_left: list[str]
  new_left: bool


def _run_case(setup: Setup, case: Case) -> Outcome:
  own = setup.root / "cases" / re.sub(r"\W+", "_", case.name)
  cwd = own / "cwd"
  cwd.mkdir(parents=True)
  new = own / "new"
  argv = []
  for arg in case.argv[1:]:
    if arg == "TINY":
      argv.extend(setup.tiny)
    else:
      for placeholder, path in (("{run}", setup.run), ("{files}", setup.files), ("{new}", new)):
        arg = arg.replace(placeholder, str(path))
      argv.append(arg)
  argv = [str(REPO / arg) if arg.startswith("configs/") else arg for arg in argv]
  result = subprocess.run([sys.executable, "-m", f"ttt_jax.{case.argv[0]}", *argv],
                          env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
                          cwd=cwd)
  return Outcome(case, result.returncode, result.stderr, sorted(os.listdir(cwd)),
                 new.exists() and any(new.iterdir()))


def _failures(outcome: Outcome) -> list[str]:
  """What is wrong with one case's outcome (empty: it is as it should be)."""
  case, problems = outcome.case, []
  lines = outcome.stderr.strip().splitlines()
  last = lines[-1] if lines else ""
  if outcome.returncode == 0:
    problems.append("exited 0")
  if "Traceback" in outcome.stderr:
    problems.append("printed a traceback")
  if not re.search(case.last_line, last):
    problems.append(f"last stderr line {last!r} does not match {case.last_line!r}")
  if outcome.cwd_left:
    problems.append(f"wrote {outcome.cwd_left} into the current directory")
  if outcome.new_left:
    problems.append("wrote into its fresh workdir")
  if problems:
    return [f"{case.name}: {'; '.join(problems)}\n  stderr tail: {outcome.stderr[-600:]!r}"]
  return []


def _check(setup: Setup, cases: list[Case], workers: int) -> None:
  trained = setup.run.exists()
  before = _run_digest(setup.run) if trained else {}
  with ThreadPoolExecutor(workers) as pool:
    outcomes = list(pool.map(lambda case: _run_case(setup, case), cases))
  failures = [line for outcome in outcomes for line in _failures(outcome)]
  assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
  after = _run_digest(setup.run) if trained else {}
  changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
  assert not changed, f"the good run's files changed: {changed}"


def test_the_corpus_is_large_and_its_names_unique():
  assert len(CASES) >= 40
  assert len({case.name for case in CASES}) == len(CASES)
  modules = {case.argv[0] for case in CASES}
  assert modules == {"train", "generate", "evaluate", "bench", "cct_chain"}


def test_fast_cases_fail_with_one_line(base):
  """The cases that fail on the config alone: no good run is needed (nor trained)."""
  fast = [case for case in CASES if case.fast]
  assert all("{run}" not in arg for case in fast for arg in case.argv)
  _check(base, fast, workers=2)


@pytest.mark.slow
def test_every_bad_input_fails_with_one_line_and_the_good_run_is_untouched(setup):
  _check(setup, [case for case in CASES if not case.fast], workers=2)


# Faults of the storage and of saved files, on copies of the good run. The library noise
# that each of them used to print (orbax's absl tracebacks, asyncio's "exception was never
# retrieved", "Exception ignored in: <coroutine>", "Event loop is closed", tensorstore's
# object reprs) must not reach the console.
_NOISE = re.compile(r"Traceback|Exception ignored|Event loop is closed|never retrieved|"
                    r"<bound method|ERROR:absl|sys\.meta_path")


def _copy_of_run(setup: Setup, name: str) -> Path:
  copy = setup.root / "faults" / name
  shutil.copytree(setup.run, copy)
  return copy


def _resume(setup: Setup, workdir: Path, *args: str, file_limit: int | None = None
            ) -> subprocess.CompletedProcess:
  """The good run's command on ``workdir`` to step 6, under a file-size limit (bytes)
  if given: writing past it fails with EFBIG, like a full disk fails with ENOSPC."""
  argv = ["-m", "ttt_jax.train", "--config", os.devnull, "--workdir", str(workdir),
          *setup.tiny, "--set", "train.steps=6", *args]
  if file_limit is not None:  # set by the child itself (no preexec_fn in a threaded parent)
    argv = ["-c", f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
            f"({file_limit}, {file_limit})); os.execv(sys.executable, [sys.executable] + "
            f"sys.argv[1:])", *argv]
  return subprocess.run([sys.executable, *argv], env=cli_env(), capture_output=True,
                        text=True, timeout=TIMEOUT_S, cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_during_a_save_is_one_line_and_loses_nothing(setup, async_save):
  workdir = _copy_of_run(setup, f"full_disk_async_{async_save}")
  before = _tree_digest(workdir / "checkpoints" / "4")
  # 32 KiB: room for the run's own files, not for the data file of any larger array (the
  # embedding, its moments), however orbax groups the arrays into files
  assert max(f.stat().st_size for f in workdir.glob("*") if f.is_file()) < 16 * 1024
  result = _resume(setup, workdir, "--set", f"checkpoint.async_save={str(async_save).lower()}",
                   file_limit=32 * 1024)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1, result.stderr[-3000:]
  assert re.search(rf"^error: checkpoint save at step 6 failed in {re.escape(str(workdir))}"
                   r"/checkpoints: File too large \(EFBIG, errno 27\); checkpoint 4 and those "
                   r"before it are intact", lines[-1]), lines[-1]
  assert not _NOISE.search(result.stdout + result.stderr), result.stderr[-3000:]
  assert _tree_digest(workdir / "checkpoints" / "4") == before
  assert "File too large" in (workdir / "logs" / "libraries.log").read_text()
  # the next run removes the partial save and resumes from the newest good checkpoint
  result = _resume(setup, workdir)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-3000:]
  assert "resumed from checkpoint at step 4" in output
  assert not _NOISE.search(output), output[-3000:]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]


def _size(directory: Path) -> int:
  return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


@pytest.mark.slow
def test_no_space_left_during_a_save_is_one_line(setup, tmp_path):
  """A real full disk: a tmpfs with room for the run and half a checkpoint (where this
  process may mount one; the file-size limit above covers every machine)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  room = _size(setup.run) + _size(setup.run / "checkpoints" / "4") // 2
  if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room // 1024 + 64}k", "tmpfs",
                     str(mount)], capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here")
  try:
    workdir = mount / "run"
    shutil.copytree(setup.run, workdir)
    result = _resume(setup, workdir)
    assert result.returncode == 1, result.stderr[-3000:]
    assert re.search(r"^error: checkpoint save at step 6 failed in .*: No space left on device "
                     r"\(ENOSPC, errno 28\); checkpoint 4 and those before it are intact",
                     result.stderr.strip().splitlines()[-1]), result.stderr[-3000:]
    assert not _NOISE.search(result.stdout + result.stderr), result.stderr[-3000:]
    for step in ("2", "4"):
      assert (_tree_digest(workdir / "checkpoints" / step)
              == _tree_digest(setup.run / "checkpoints" / step))
  finally:
    subprocess.run(["umount", str(mount)], check=True)


def _truncate_largest(step_dir: Path) -> None:
  largest = max((f for f in (step_dir / "state").rglob("*") if f.is_file()),
                key=lambda f: f.stat().st_size)
  os.truncate(largest, 100)


def _delete_manifest(step_dir: Path) -> None:
  next((step_dir / "state").rglob("manifest.ocdbt")).unlink()


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_truncate_largest, _delete_manifest])
def test_a_recovered_checkpoint_prints_one_line_without_library_noise(setup, damage):
  workdir = _copy_of_run(setup, damage.__name__)
  damage(workdir / "checkpoints" / "4")
  result = _resume(setup, workdir)
  output = result.stdout + result.stderr  # the run's messages, on either stream
  assert result.returncode == 0, output[-3000:]
  assert not _NOISE.search(output), output[-3000:]
  damaged = [line for line in output.splitlines() if "checkpoint 4 is" in line]
  assert len(damaged) == 1 and "trying an older one" in damaged[0], output[-3000:]
  assert "resumed from checkpoint at step 2" in output
  assert (workdir / "checkpoints.damaged" / "4-0").is_dir()


@pytest.mark.slow
def test_the_good_run_still_resumes(setup):
  """Last in the module: after every bad input, the good run resumes from step 4."""
  result = subprocess.run(
      [sys.executable, "-m", "ttt_jax.train", "--config", os.devnull, "--workdir",
       str(setup.run), *setup.tiny, "--set", "train.steps=6"],
      env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  steps = [json.loads(line)["step"] for line in (setup.run / "metrics.jsonl").read_text()
           .splitlines()]
  assert max(steps) == 6 and steps.count(5) == 1
  assert (setup.run / "checkpoints" / "6").is_dir()
