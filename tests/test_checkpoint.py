"""Checkpointer: dtypes, the data position (exactly once), process-count changes,
checkpoints of an earlier form of the train state, and the checksums of the saved
values that a restore verifies."""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax import checkpoint as ckpt_lib
from ttt_jax.data import pipeline
from ttt_jax.training.state import TrainState

SEQ = 4
WINDOWS = 24


def dataset(process_index: int = 0, process_count: int = 1, batch: int = 4):
  tokens = np.arange(WINDOWS * SEQ + 1, dtype=np.uint16)
  return pipeline.train_dataset(tokens, seq_len=SEQ, global_batch_size=batch, seed=5,
                                shuffle=True, process_index=process_index,
                                process_count=process_count, worker_count=0)


def ids(batch) -> list[int]:
  return (batch["inputs"][:, 0] // SEQ).tolist()


def small_state():
  return {"fast_weights_fp32": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7,
          "params_bf16": (jnp.arange(8, dtype=jnp.float32) / 3).astype(jnp.bfloat16),
          "count": jnp.asarray(3, jnp.int32)}


def abstract_like(tree):
  """ShapeDtypeStructs with the shapes, dtypes and shardings of ``tree``'s arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def restore_state(directory, step: int, like):
  """The state saved at ``step``, restored with the shardings of ``like``."""
  ckpt = ckpt_lib.Checkpointer(directory, keep=2)
  try:
    return ckpt.restore(step, abstract_like(like), None).state
  finally:
    ckpt.close()


def test_save_restore_keeps_dtypes_and_bits(tmp_path):
  state = small_state()
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2)
  ckpt.save(1, state, iter(dataset()), {"process_count": 1})
  ckpt.close()
  restored = restore_state(tmp_path, 1, state)
  for key, value in state.items():
    assert restored[key].dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value))


class _StateBeforeExtras(NamedTuple):
  """The train state's form before it had ``extras``."""
  step: jax.Array
  params: dict
  opt_state: dict


def test_a_checkpoint_from_before_the_extras_field_restores_with_it_empty(tmp_path):
  old = _StateBeforeExtras(jnp.asarray(3, jnp.int32), {"w": jnp.arange(6.0)},
                           {"mu": jnp.ones(6) / 3})
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2)
  ckpt.save(1, old, iter(dataset()), {"process_count": 1})
  ckpt.close()
  new = TrainState(*old)
  assert new.extras == {}
  restored = restore_state(tmp_path, 1, new)
  assert isinstance(restored, TrainState) and restored.extras == {}
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # an extra tree the checkpoint does not have is not made up
  with pytest.raises(ValueError, match="do not match"):
    restore_state(tmp_path, 1, new._replace(extras={"ema": {"w": jnp.arange(6.0)}}))


def state_files(directory, step: int) -> set[str]:
  return set(os.listdir(directory / str(step) / "state"))


def stored_bytes(directory) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(directory) for name in names)


@pytest.mark.parametrize("compress", [True, False])
def test_state_is_saved_without_sharding_files_and_restores_resharded(tmp_path, compress):
  """The state item holds the array data and pytree metadata but no per-array sharding
  file or array-metadata store; it restores bit-exactly onto another sharding (the
  target's, which is all a restore reads), compressed or not."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("fsdp",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  state = {"w": jax.device_put(jnp.arange(64, dtype=jnp.float32).reshape(8, 8) / 9, rows),
           "zeros": jnp.zeros((256, 256), jnp.float32), "step": jnp.asarray(7, jnp.int32)}
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2, compress=compress)
  ckpt.save(1, state, iter(dataset()), {"process_count": 1})
  ckpt.close()
  files = state_files(tmp_path, 1)
  assert "_METADATA" in files and "manifest.ocdbt" in files
  assert not files & {"_sharding", "array_metadatas"}
  # 256 KiB of zeros: stored raw without compression, to almost nothing with it
  assert (stored_bytes(tmp_path / "1" / "state") > 256 * 1024) == (not compress)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  like = jax.tree.map(lambda x: jax.device_put(x, replicated), state)
  restored = restore_state(tmp_path, 1, like)
  for key, value in state.items():
    assert restored[key].sharding == replicated
    np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value))


def test_restores_checkpoints_of_orbaxs_standard_handler(tmp_path):
  """Checkpoints whose state item was written by ``StandardCheckpointHandler`` (with
  sharding files, as this project wrote them before) restore and init-from unchanged."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  state = {"params": small_state(), "step": jnp.asarray(4, jnp.int32)}
  manager = ocp.CheckpointManager(
      tmp_path, options=ocp.CheckpointManagerOptions(create=True),
      item_names=("state", "meta"),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})
  manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave({"process_count": 1})))
  manager.close()
  assert "_sharding" in state_files(tmp_path, 4)
  restored = restore_state(tmp_path, 4, state)
  step, params, _ = ckpt_lib.load_params(tmp_path / "4", abstract_like(state["params"]),
                                         check=lambda meta: None)
  assert step == 4
  for key, value in state["params"].items():
    np.testing.assert_array_equal(np.asarray(restored["params"][key]), np.asarray(value))
    np.testing.assert_array_equal(np.asarray(params[key]), np.asarray(value))


def test_async_save_then_restore_continues_exactly_once(tmp_path):
  """Batches after a restore are exactly those the original run saw after the save,
  even though the original kept iterating while the save was in flight; within an
  epoch no window repeats and none is skipped."""
  iterator = iter(dataset())
  seen = [ids(next(iterator)) for _ in range(3)]
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=3, async_save=True)
  ckpt.save(3, small_state(), iterator, {"process_count": 1})
  after_save = [ids(next(iterator)) for _ in range(9)]  # overlaps the async write
  ckpt.close()

  resumed = iter(dataset())
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=3)
  ckpt.restore(3, abstract_like(small_state()), resumed)
  ckpt.close()
  assert [ids(next(resumed)) for _ in range(9)] == after_save
  stream = [i for b in seen + after_save for i in b]
  for epoch in range(len(stream) // WINDOWS):
    assert sorted(stream[epoch * WINDOWS:(epoch + 1) * WINDOWS]) == list(range(WINDOWS))


def test_background_save_keeps_the_state_of_the_call_under_donation(tmp_path):
  """The snapshot is taken when save() is called: donating steps that overwrite the
  state's buffers right after it (as the train loop does) do not reach the checkpoint."""
  state = small_state()
  expected = jax.tree.map(lambda x: np.array(x, copy=True), state)  # no view of the buffer
  step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2, async_save=True, device_snapshot=True)
  assert ckpt.background
  orbax_save, started = ckpt._save, threading.Event()

  def late_save(*args):  # the writer reaches orbax only after the steps below
    started.wait(timeout=30)
    orbax_save(*args)

  ckpt._save = late_save
  ckpt.save(1, state, iter(dataset()), {"process_count": 1})
  for _ in range(5):
    state = step(state)
  jax.block_until_ready(state)
  started.set()
  ckpt.close()
  restored = restore_state(tmp_path, 1, state)
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), value)


def test_background_saves_share_one_lowest_priority_writer_thread(tmp_path):
  linux = sys.platform == "linux"
  cpus = frozenset([min(os.sched_getaffinity(0))]) if linux else None
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2, async_save=True, device_snapshot=True,
                               writer_cpus=cpus)
  orbax_save, writers = ckpt._save, []

  def recording_save(*args):
    writers.append((threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0),
                    os.sched_getaffinity(0) if linux else None))
    orbax_save(*args)

  ckpt._save = recording_save
  for step in (1, 2):
    ckpt.save(step, small_state(), iter(dataset()), {"process_count": 1})
  ckpt.close()
  assert len(writers) == 2 and writers[0] == writers[1]
  assert writers[0][0] != threading.get_native_id()
  if linux:
    assert writers[0][1:] == (19, cpus)
    assert os.sched_getaffinity(0) != cpus or os.cpu_count() == 1  # the caller's is unchanged
  assert ckpt.all_steps() == [1, 2]
  with pytest.raises(ValueError, match="writer_cpus"):
    ckpt_lib.Checkpointer(tmp_path / "sync", keep=2, async_save=False,
                          writer_cpus=frozenset({0}))
  if linux:  # a CPU the machine does not have
    with pytest.raises(ValueError, match="writer_cpus"):
      ckpt_lib.Checkpointer(tmp_path / "nowhere", keep=2, writer_cpus=frozenset({4096}))


def test_background_save_error_reaches_the_training_thread(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2, async_save=True, device_snapshot=True)
  ckpt.save(1, small_state(), iter(dataset()), {"process_count": 1})
  ckpt.save(1, {"other": jnp.zeros(2)}, iter(dataset()), {"process_count": 1})
  with pytest.raises(ckpt_lib.CheckpointError, match="checkpoint save at step 1 failed"):
    ckpt.close()


def test_data_position_rescales_to_another_process_count(tmp_path):
  """A checkpoint written by 2 processes continues, in 1 process, with the global
  batches the 2 processes would have read next."""
  steps = 5
  iterators = [iter(dataset(p, 2)) for p in range(2)]
  for _ in range(steps):
    for it in iterators:
      next(it)
  step_dir = tmp_path / "7" / "data"
  step_dir.mkdir(parents=True)
  for p, it in enumerate(iterators):
    (step_dir / f"process_{p}-of-2.json").write_text(json.dumps(it.get_state()))
  expected = [sorted(ids(next(iterators[0])) + ids(next(iterators[1]))) for _ in range(8)]

  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2)
  state = ckpt._rescaled_data_state(7, 2)
  single = iter(dataset())
  single.set_state(state)
  assert [sorted(ids(next(single))) for _ in range(8)] == expected

  (step_dir / "process_1-of-2.json").write_text(json.dumps({"next_index": 1}))
  with pytest.raises(ckpt_lib.CheckpointError, match="disagree on the data position"):
    ckpt._rescaled_data_state(7, 2)
  (step_dir / "process_1-of-2.json").write_text(json.dumps({"next_index_in_cycle": 1}))
  with pytest.raises(ckpt_lib.CheckpointError, match="grain workers"):
    ckpt._rescaled_data_state(7, 2)
  ckpt.close()


def test_incomplete_save_is_never_listed(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=3, async_save=False)
  ckpt.save(2, small_state(), iter(dataset()), {"process_count": 1})
  ckpt.close()
  # what a process killed mid-save leaves: orbax's temporary directory, never renamed
  (tmp_path / "4.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=3)
  assert ckpt.all_steps() == [2]
  ckpt.close()


def test_a_reader_leaves_a_save_in_flight(tmp_path):
  """A reader (evaluate, export, ... while the run trains) must not delete orbax's
  temporary directory: it may be the run's save in flight (only the run's own
  Checkpointer removes one, left by a killed process, when it resumes)."""
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=3, async_save=False)
  ckpt.save(2, small_state(), iter(dataset()), {"process_count": 1})
  ckpt.close()
  in_flight = tmp_path / "4.orbax-checkpoint-tmp-1700000000000000" / "state"
  in_flight.mkdir(parents=True)
  (in_flight / "part").write_bytes(b"being written")
  reader = ckpt_lib.Checkpointer(tmp_path, keep=3, async_save=False, reader=True)
  assert reader.all_steps() == [2]
  reader.close()
  time.sleep(1)  # orbax cleans up in the background
  assert (in_flight / "part").read_bytes() == b"being written"


def test_init_from_path_forms(tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints" / "5" / "state").mkdir(parents=True)
  assert ckpt_lib.resolve_source(run) == (run / "checkpoints", None)
  assert ckpt_lib.resolve_source(run / "checkpoints") == (run / "checkpoints", None)
  assert ckpt_lib.resolve_source(run / "checkpoints" / "5") == (run / "checkpoints", 5)
  with pytest.raises(ckpt_lib.CheckpointError, match="--init-from expects"):
    ckpt_lib.resolve_source(tmp_path / "nothing")


# --- checksums of the saved values (issue 21: "verify what is loaded") ---

def reference_checksum(x) -> str:
  """The module docstring's formula in numpy, on the host."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    w = x.astype(np.uint32)
  elif x.dtype.itemsize in (1, 2):
    w = x.view(f"uint{8 * x.dtype.itemsize}").astype(np.uint32)
  else:
    w = x.view(np.uint32)
  w = w.reshape(-1)
  i = np.arange(w.size, dtype=np.uint32)

  def fmix(v):
    v = v ^ (v >> np.uint32(16))
    v = v * np.uint32(0x85EBCA6B)
    v = v ^ (v >> np.uint32(13))
    v = v * np.uint32(0xC2B2AE35)
    return v ^ (v >> np.uint32(16))

  with np.errstate(over="ignore"):
    h = fmix(w ^ (i * np.uint32(0x9E3779B9))).sum(dtype=np.uint32)
  return f"{int(h):08x}"


def mixed_state():
  rng = np.random.default_rng(0)
  return {"w_fp32": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
          "w_bf16": jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16),
          "ids_int32": jnp.asarray(rng.integers(-9, 9, size=(8, 4)), jnp.int32),
          "bytes_uint8": jnp.asarray(rng.integers(0, 255, size=(8,)), jnp.uint8),
          "mask_bool": jnp.asarray(rng.integers(0, 2, size=(8, 2)), bool),
          "step": jnp.asarray(7, jnp.int32)}


def test_checksums_follow_the_documented_formula():
  """On either reduction (CPU's fold, other devices' one sum), and for arrays larger
  than the fold's stop and chunk, with sizes that leave a remainder at each fold."""
  state = {**mixed_state(), "odd_fp32": jnp.arange(8 * 1031 + 5, dtype=jnp.float32) / 3,
           "chunks_fp32": jnp.arange(2 * ckpt_lib._CHUNK + 3, dtype=jnp.float32) / 3}
  sums = ckpt_lib.state_checksums(state)
  assert set(sums) == set(ckpt_lib.state_signature(state))
  leaves = [state[k] for k in sorted(state)]
  unfolded = np.asarray(ckpt_lib._checksum_words(leaves, fold=False))
  for key, value, other in zip(sorted(state), leaves, unfolded):
    assert sums[f"['{key}']"] == reference_checksum(value) == f"{int(other):08x}", key


def test_checksums_are_the_same_on_any_mesh_and_see_one_changed_or_swapped_element():
  state = mixed_state()
  expected = ckpt_lib.state_checksums(state)
  P = jax.sharding.PartitionSpec
  for shape, names, spec in [((8,), ("fsdp",), P("fsdp")),
                             ((4, 2), ("data", "tensor"), P("data", "tensor")),
                             ((2, 4), ("data", "tensor"), P(None, "data")),
                             ((8,), ("fsdp",), P())]:
    mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))

    def place(x, spec=spec, mesh=mesh):
      fits = x.ndim == len(spec) and all(
          a is None or x.shape[d] % mesh.shape[a] == 0 for d, a in enumerate(spec))
      return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec if fits else P()))

    placed = jax.tree.map(place, state)
    assert ckpt_lib.state_checksums(placed) == expected, (shape, spec)
    unfolded = ckpt_lib._checksum_words(jax.tree.leaves(placed), fold=False)
    assert [f"{int(h):08x}" for h in np.asarray(unfolded)] == [
        expected[f"['{k}']"] for k in sorted(state)], (shape, spec)
  for key, value in state.items():
    flat = np.asarray(value).reshape(-1).copy()
    changed = flat.copy()
    changed[-1] = np.logical_not(changed[-1]) if flat.dtype == bool else changed[-1] + 1
    variants = [changed]
    i, j = next((i, j) for i in range(flat.size) for j in range(i + 1, flat.size)
                if flat[i] != flat[j]) if flat.size > 1 else (None, None)
    if i is not None:
      swapped = flat.copy()
      swapped[[i, j]] = swapped[[j, i]]
      variants.append(swapped)
    for variant in variants:
      other = {**state, key: jnp.asarray(variant.reshape(value.shape), value.dtype)}
      assert ckpt_lib.state_checksums(other)[f"['{key}']"] != expected[f"['{key}']"], key


def test_a_resharded_restore_verifies_its_checksums(tmp_path):
  """Saved on an (8,) mesh, restored onto a (4, 2) one: the checksums of the global
  values match, so the restore passes; the meta records them."""
  mesh8 = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  mesh42 = jax.make_mesh((4, 2), ("data", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
  P = jax.sharding.PartitionSpec
  state = {"w": jax.device_put(jnp.arange(128, dtype=jnp.float32).reshape(16, 8) / 7,
                               jax.sharding.NamedSharding(mesh8, P("fsdp")))}
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2)
  ckpt.save(1, state, iter(dataset()), {"process_count": 1})
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2)
  assert ckpt.read_meta(1)["state_checksums"] == ckpt_lib.state_checksums(state)
  like = {"w": jax.device_put(state["w"], jax.sharding.NamedSharding(mesh42, P("data", "tensor")))}
  restored = ckpt.restore(1, abstract_like(like), None).state
  ckpt.close()
  assert restored["w"].sharding == like["w"].sharding
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))


def noisy_state(seed: int):
  """Incompressible values (zstd stores them as raw blocks), large enough that the
  array's data file is the largest file under ``state/``."""
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(128, 128)), jnp.float32),
          "step": jnp.asarray(seed, jnp.int32)}


def save_two(directory, compress: bool) -> None:
  for step in (1, 2):
    ckpt = ckpt_lib.Checkpointer(directory, keep=3, compress=compress)
    ckpt.save(step, noisy_state(step), iter(dataset()), {"process_count": 1})
    ckpt.close()


def largest_state_file(directory, step: int):
  files = [f for f in (directory / str(step) / "state").rglob("*") if f.is_file()]
  return max(files, key=lambda f: f.stat().st_size)


def restore_latest(directory):
  messages = []
  ckpt = ckpt_lib.Checkpointer(directory, keep=3)
  try:
    restored = ckpt.restore_latest(abstract_like(noisy_state(0)), None,
                                   check=lambda meta: None, log=messages.append)
  finally:
    ckpt.close()
  return restored, messages


def assert_fell_back_to_step_1(directory, restored, messages):
  assert restored is not None and restored.step == 1
  np.testing.assert_array_equal(np.asarray(restored.state["w"]),
                                np.asarray(noisy_state(1)["w"]))
  assert any(m.startswith("checkpoint 2") for m in messages), messages
  assert (directory.parent / (directory.name + ".damaged") / "2-0").is_dir()
  assert all("\n" not in m for m in messages)


def test_same_size_random_bytes_in_an_uncompressed_array_file_are_detected(tmp_path):
  """The issue's repro: random bytes over the largest file of an uncompressed
  checkpoint's state; the restore names the array and uses the previous checkpoint."""
  directory = tmp_path / "checkpoints"
  save_two(directory, compress=False)
  target = largest_state_file(directory, 2)
  target.write_bytes(np.random.default_rng(3).bytes(target.stat().st_size))
  restored, messages = restore_latest(directory)
  assert_fell_back_to_step_1(directory, restored, messages)
  assert any("checkpoint 2: array ['w'] does not match its saved checksum" in m
             for m in messages), messages


def test_four_bytes_overwritten_in_a_compressed_array_file_are_detected(tmp_path):
  directory = tmp_path / "checkpoints"
  save_two(directory, compress=True)
  target = largest_state_file(directory, 2)
  data = bytearray(target.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 4] = b"\xde\xad\xbe\xef"
  target.write_bytes(bytes(data))
  restored, messages = restore_latest(directory)
  assert_fell_back_to_step_1(directory, restored, messages)
  assert any("checkpoint 2: array ['w'] does not match its saved checksum" in m
             for m in messages), messages


def test_init_from_params_verifies_their_checksums(tmp_path):
  """``load_params`` (params only, a partial restore) checks the params it loads."""
  state = {"params": noisy_state(1), "opt": {"mu": jnp.zeros(3)}}
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2, compress=False)
  ckpt.save(5, state, iter(dataset()), {"process_count": 1})
  ckpt.close()
  like = abstract_like(state["params"])
  step, params, _ = ckpt_lib.load_params(tmp_path, like, check=lambda meta: None)
  np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(state["params"]["w"]))
  target = largest_state_file(tmp_path, 5)
  target.write_bytes(np.random.default_rng(3).bytes(target.stat().st_size))
  with pytest.raises(ckpt_lib.ChecksumError,
                     match=r"checkpoint 5: array \['params'\]\['w'\] does not match"):
    ckpt_lib.load_params(tmp_path, like, check=lambda meta: None)


def test_a_checkpoint_without_checksums_restores_unchecked(tmp_path):
  """A checkpoint written before checksums (its meta has none) restores as before,
  while a new save records them."""
  state = small_state()
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2)
  ckpt.save(1, state, iter(dataset()), {"process_count": 1})
  ckpt.close()
  meta_file = next((tmp_path / "1" / "meta").glob("*"))
  meta = json.loads(meta_file.read_text())
  assert meta["state_checksums"] == ckpt_lib.state_checksums(state)
  del meta["state_checksums"]
  meta_file.write_text(json.dumps(meta))
  restored = restore_state(tmp_path, 1, state)
  for key, value in state.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value))


@pytest.mark.slow
def test_a_run_resumes_from_the_previous_checkpoint_when_the_newest_is_garbled(tmp_path, capsys):
  """The issue's repro on a real run (checkpoint.compress=false): same-size random bytes
  over the largest file of the newest checkpoint's state."""
  from ttt_jax import train  # pylint: disable=import-outside-toplevel
  from train_util import copy_stdlib_corpus, tiny_config  # pylint: disable=import-outside-toplevel
  corpus = (copy_stdlib_corpus(tmp_path / "src"), tmp_path / "cache")
  workdir = tmp_path / "run"
  train.train(tiny_config(*corpus, "train.steps=40", "train.eval_every=0",
                          "checkpoint.compress=false"), workdir)
  target = largest_state_file(workdir / "checkpoints", 40)
  target.write_bytes(np.random.default_rng(0).bytes(target.stat().st_size))
  capsys.readouterr()
  summary = train.train(tiny_config(*corpus, "train.steps=45", "train.eval_every=0",
                                    "checkpoint.compress=false"), workdir)
  out = capsys.readouterr().err
  assert summary["start_step"] == 20
  line = next(line for line in out.splitlines() if line.startswith("checkpoint 40: array"))
  assert "does not match its saved checksum" in line and "trying an older one" in line
  assert (tmp_path / "run" / "checkpoints.damaged" / "40-0").is_dir()


def test_storage_errnos_are_found_in_the_chain_and_described_in_one_line():
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as inner:
      raise ValueError("write failed") from inner
  except ValueError as e:
    chained = e
  assert ckpt_lib.error_errno(chained) == errno.ENOSPC
  assert ckpt_lib.describe_error(chained) == "No space left on device (ENOSPC, errno 28)"
  tensorstore = ValueError("OUT_OF_RANGE: Failed writing \"x\": File too large "
                           "[os_error_code='27']")
  assert ckpt_lib.error_errno(tensorstore) == errno.EFBIG
  damaged = Exception("Encountered error while reading array index: (slice(0, 4, 1),). "
                      "See full TensorStore details: <bound method pybind11_x.spec of "
                      "TensorStore({\n  'driver': 'cast',\n})>.")
  assert ckpt_lib.error_errno(damaged) is None
  assert ckpt_lib.describe_error(damaged) == (
      "Exception: Encountered error while reading array index: (slice(0, 4, 1),).")


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, "Permission denied"),
    ValueError("PERMISSION_DENIED: Error reading local file [os_error_code='13']")])
def test_a_storage_failure_on_restore_stops_without_moving_the_checkpoint(
    tmp_path, monkeypatch, error):
  """A checkpoint that cannot be read for want of permission (or space, or a working
  disk) may be whole: it is reported, not moved aside as damaged."""
  directory = tmp_path / "checkpoints"
  save_two(directory, compress=False)

  def fail(self, step, abstract_state, data_iter):
    raise error
  monkeypatch.setattr(ckpt_lib.Checkpointer, "restore", fail)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=rf"^cannot read checkpoint 2 in {re.escape(str(directory))}: "
                           r"Permission denied \(EACCES, errno 13\)$"):
    restore_latest(directory)
  assert not (tmp_path / "checkpoints.damaged").exists()
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]

