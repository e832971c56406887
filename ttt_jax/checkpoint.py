"""Resumable checkpoints: one orbax ``CheckpointManager`` per workdir.

Each step directory holds three items:
- ``state``: the train state (step, params, optimizer state, extra trees), saved in
  their own dtypes, restored against an abstract state that carries the *current*
  mesh's shardings (so a different mesh reshards on load); a checkpoint written before
  the state gained an empty field (``TrainState.extras``) restores with it empty;
- ``data``: the grain iterator state (grain's own checkpoint handler, one file per process);
- ``meta``: JSON with the config hashes, the model and optimizer configs, the state's
  signature (each leaf's path, dtype and shape), what fixes the sample stream (its
  settings and the content hashes of the text and tokenizer), mesh shape, process count
  and versions, and ``state_checksums`` (below).

The ``state`` item is written by orbax's PyTree handler with an ``ArrayHandler`` that
skips the per-array sharding file and array-metadata store (``state_handler``): this
project always restores against explicit target shardings (which orbax's own docs call
the only safe way onto another topology), so neither is ever read, and writing them was
about a fifth of a save's CPU here (benchmarks/RESULTS.md). The array data, its
tensorstore metadata and the pytree metadata are unchanged, so checkpoints written with
or without them restore the same way.

Every saved array's values are checksummed on the device (``state_checksums``, one
jitted function over the whole tree whose result, one uint32 word per leaf, is fetched
once), stored in the meta item as ``{path: 8 hex digits}`` keyed like
``state_signature``, and recomputed on the restored state: a checkpoint whose array bytes
changed after the save (a garbled file that still decodes) is reported as damaged,
naming the first array that differs. Checkpoints written without checksums restore
unchecked. The hash of one array ``x``:

- its words ``w``: ``x`` bitcast to uint32 (4-byte dtypes); zero-extended to uint32 from
  its bits (2-byte and 1-byte dtypes; bool as 0 or 1); bitcast to a trailing pair of
  uint32 words (8-byte dtypes); a PRNG key array's key data the same way; a 0-d array as
  one element. ``i`` is each word's row-major index in that array of words;
- ``fmix(v)``: murmur3's 32-bit finalizer, ``v ^= v >> 16; v *= 0x85EBCA6B;
  v ^= v >> 13; v *= 0xC2B2AE35; v ^= v >> 16``;
- ``h = sum_i fmix(w_i ^ (i * 0x9E3779B9))``, all in uint32 arithmetic (mod 2**32);
- the checksum is ``f"{h:08x}"``.

``fmix`` is a bijection and ``i * 0x9E3779B9`` differs for every ``i < 2**32``, so
changing any one word always changes ``h``, and swapping two different words changes
it except by a 2**-32-scale accident, as does random damage. Integer sums do not depend
on the order of reduction, so the value is the same under any mesh or sharding: the
global array's values are hashed, not its shards or files. On CPU devices the sum is
taken by folding the eighths of each chunk of 2**18 words onto each other (XLA's CPU
integer reductions are several times slower than its elementwise adds); elsewhere by
one ``jnp.sum``, which keeps a sharded array's words where they are. On a 2-CPU host it
costs 0.4-0.5 ns per word, 2.5-3.4 ms for the quickstart's 6.5M-word train state, about
4-5% of a save's CPU time (``bench io`` reports it per save and per restore).

Orbax writes into a temporary directory and renames it when complete, so a crash mid-save
never leaves a step that ``all_steps()`` would list; the run's next ``Checkpointer`` on
the directory removes such leftovers (a reader, such as evaluate on a run that is
training now, leaves them: one may be a save in progress). A step that still fails to
restore (truncated files) is reported and the previous one is tried.

A save or restore that fails because of the storage rather than the checkpoint (no
space, a file-size limit or quota, permissions, an I/O error: ``errors.STORAGE_ERRNOS``) is one
``CheckpointError`` line naming the directory and the errno, found in the error's chain
(an ``OSError``, or the ``os_error_code`` tensorstore puts in its messages). The
checkpoints already written are untouched: a failed save stops the run, and a failed
restore does not move the checkpoint aside as damaged. Orbax finishes an async save on
its own threads, so its failure surfaces at the next save or at ``close``, named with
the step that failed; it is reported once, and the later calls that see the same
failure again stay quiet.

Async saves in a single-process run with ``device_snapshot`` take a device-side copy of
the state (the next train step donates the original buffers) and hand it to orbax on a
background thread at the lowest CPU priority, so the training thread pays only for the
copy's dispatch (~2 ms here); orbax's own save call (its device-to-host transfer and
Python bookkeeping, ~25 ms here) and its writer threads (which inherit the priority) then
run in the gaps XLA leaves. The thread lives as long as the checkpointer, so a save does
not start one. Multi-process runs call orbax on the training thread: orbax's
barriers there are collectives and must stay in program order with the train steps.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import importlib.metadata
import os
import platform
import re
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ttt_jax.config import Config, config_hash, to_dict
from ttt_jax.errors import STORAGE_ERRNOS, CheckpointError, describe_errno


class DamagedError(CheckpointError):
  """A checkpoint whose files cannot be what was saved: ``restore_latest`` moves it
  aside, where another ``CheckpointError`` of a restore (a whole checkpoint this run
  cannot take) stops the run with everything left in place."""


class ChecksumError(DamagedError):
  """A restored array whose values differ from those the checkpoint saved."""


_VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_DETAILS = re.compile(r"\s*See full TensorStore details:.*", re.DOTALL)


def _chain(error: BaseException) -> list[BaseException]:
  """``error`` and its causes and contexts, outermost first."""
  chain: list[BaseException] = []
  while error is not None and all(error is not e for e in chain):
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def error_errno(error: BaseException) -> int | None:
  """The errno of an I/O failure in ``error``'s chain, or None."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno:
      return e.errno
    if match := _OS_ERROR_CODE.search(str(e)):
      return int(match.group(1))
  return None


def describe_error(error: BaseException, limit: int = 300) -> str:
  """One line for a library error: the errno's name and text where there is one, else
  the innermost cause's type and first line (without tensorstore's object reprs)."""
  code = error_errno(error)
  if code is not None:
    return describe_errno(code)
  innermost = _chain(error)[-1]
  text = _DETAILS.sub("", str(innermost)).strip().splitlines()
  line = f"{type(innermost).__name__}: {text[0] if text else ''}"
  return line if len(line) <= limit else line[:limit - 3] + "..."


def state_signature(state: Any) -> dict[str, str]:
  """``{path: "dtype[shape]"}`` of every leaf of a train state (arrays or
  ShapeDtypeStructs): what a restore needs to match, readable in the meta item."""
  return {jax.tree_util.keystr(path): f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"
          for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


_M1, _M2, _GOLDEN = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35), np.uint32(0x9E3779B9)


def _fmix(v: jax.Array) -> jax.Array:
  """murmur3's 32-bit finalizer (a bijection of uint32)."""
  v = v ^ (v >> 16)
  v = v * _M1
  v = v ^ (v >> 13)
  v = v * _M2
  return v ^ (v >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The uint32 words of ``x`` (module docstring): same shape (at least 1-D), or with a
  trailing axis of 2 for 8-byte dtypes."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = jnp.asarray(x)
  if x.ndim == 0:
    x = x.reshape(1)
  size = np.dtype(x.dtype).itemsize
  if x.dtype == np.bool_:
    return x.astype(jnp.uint32)
  if size in (4, 8):
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
  raise TypeError(f"cannot checksum an array of dtype {x.dtype}")


_CHUNK = 2**18
"""Words per chunk of the CPU fold: folding chunks that stay in cache is ~6x faster on a
multi-million-word array than folding it whole."""


def _folded_sum(v_N: jax.Array, ways: int = 8, stop: int = 1024) -> jax.Array:
  """sum(v_N) mod 2**32 of a 1-D uint32 array: in chunks of ``_CHUNK`` words (at most
  1024 chunks), each folded by adding its ``ways`` equal parts elementwise until
  ``stop`` words are left (remainder words summed aside)."""

  def fold(part_N: jax.Array) -> jax.Array:
    total = jnp.zeros((), jnp.uint32)
    while part_N.size > stop:
      rest = part_N.size % ways
      if rest:
        total = total + jnp.sum(part_N[part_N.size - rest:], dtype=jnp.uint32)
        part_N = part_N[:part_N.size - rest]
      size = part_N.size // ways
      part_N = sum((part_N[k * size:(k + 1) * size] for k in range(1, ways)), part_N[:size])
    return total + jnp.sum(part_N, dtype=jnp.uint32)

  chunk = max(_CHUNK, -(-v_N.size // 1024))
  sums = [fold(v_N[start:start + chunk]) for start in range(0, v_N.size, chunk)]
  return sum(sums[1:], sums[0])


def _array_checksum(x: jax.Array, fold: bool) -> jax.Array:
  """h (a uint32 scalar) of one array (module docstring)."""
  w = _words(x)
  if fold:
    w_N = w.reshape(-1)
    return _folded_sum(_fmix(w_N ^ (jax.lax.iota(jnp.uint32, w_N.size) * _GOLDEN)))
  index = jnp.zeros(w.shape, jnp.uint32)  # the row-major index without a reshape
  stride = 1
  for axis in reversed(range(w.ndim)):
    index = index + (jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
                     * np.uint32(stride % 2**32))
    stride *= w.shape[axis]
  return jnp.sum(_fmix(w ^ (index * _GOLDEN)), dtype=jnp.uint32)


@functools.partial(jax.jit, static_argnames="fold")
def _checksum_words(leaves: list[jax.Array], fold: bool) -> jax.Array:
  """[n_leaves] uint32: every leaf's checksum, in one program."""
  if not leaves:
    return jnp.zeros((0,), jnp.uint32)
  return jnp.stack([_array_checksum(x, fold) for x in leaves])


def _on_cpu(leaf: Any) -> bool:
  return not isinstance(leaf, jax.Array) or all(d.platform == "cpu" for d in leaf.devices())


def state_checksums(state: Any) -> dict[str, str]:
  """``{path: 8 hex digits}``: a checksum of each array's global values, keyed like
  ``state_signature`` (formula in the module docstring): one program for the whole
  tree, one transfer of its result to the host."""
  with_paths = jax.tree_util.tree_leaves_with_path(state)
  leaves = [leaf for _, leaf in with_paths]
  words = _checksum_words(leaves, fold=all(_on_cpu(leaf) for leaf in leaves))
  if not words.is_fully_addressable:  # replicated over processes: any local copy has it
    words = words.addressable_data(0)
  return {jax.tree_util.keystr(path): f"{int(h):08x}"
          for (path, _), h in zip(with_paths, np.asarray(words))}


def verify_checksums(step: int, saved: dict[str, str], state: Any,
                     prefix: str = "") -> None:
  """Raises ``ChecksumError`` naming the first array of ``state`` whose checksum is not
  the one ``saved`` (a checkpoint's ``state_checksums``) records for ``prefix`` + its
  path. Paths the checkpoint has no checksum for are not checked."""
  for path, value in state_checksums(state).items():
    expected = saved.get(prefix + path)
    if expected is not None and expected != value:
      raise ChecksumError(f"checkpoint {step}: array {prefix + path} does not match its "
                          f"saved checksum ({value}, saved {expected}): its files changed "
                          "after the save")


def run_metadata(cfg: Config, mesh: jax.sharding.Mesh, vocab_size: int, state: Any,
                 stream: dict[str, Any]) -> dict[str, Any]:
  """The meta item; ``state`` (the train state or its shapes) gives ``state_signature``,
  ``stream`` what fixes the sample stream (``runs.stream_identity``)."""
  versions = {}
  for name in _VERSIONED:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {
      "config_hash": config_hash(cfg),
      "model_config_hash": config_hash(cfg.model),
      "model": to_dict(cfg.model),
      "optim": to_dict(cfg.optim),
      "state_signature": state_signature(state),
      "vocab_size": vocab_size,
      **stream,
      "rng": "stateless: per-step randomness is fold_in(key(train.seed), step)",
      "mesh_shape": dict(mesh.shape),
      "process_count": jax.process_count(),
      "python": platform.python_version(),
      "versions": versions,
  }


def _is_namedtuple(tree: Any) -> bool:
  return isinstance(tree, tuple) and hasattr(tree, "_fields")


def _fields(tree: Any) -> dict[str, Any] | None:
  """The top-level fields of a NamedTuple or dict state; None for another tree."""
  if _is_namedtuple(tree):
    return tree._asdict()
  return dict(tree) if isinstance(tree, dict) else None


def with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


class _IteratorState:
  """A data iterator's state frozen at save time, in the form grain's checkpoint handler
  writes for iterators that are not grain ``DatasetIterator``s (JSON bytes)."""

  def __init__(self, data_iter: Any):
    self.state = json.dumps(data_iter.get_state(), indent=4).encode()

  def get_state(self) -> bytes:
    return self.state


def _start_writer_thread(cpus: frozenset[int] | None) -> None:
  """Lowest CPU priority (nice 19, best effort: Linux only) for the calling thread and
  the threads it starts, and with ``cpus`` only those CPUs (raises if that fails)."""
  try:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
  except (AttributeError, OSError):
    pass
  if cpus is not None:
    os.sched_setaffinity(0, cpus)


def state_handler(compress: bool = True) -> ocp.PyTreeCheckpointHandler:
  """The ``state`` item's handler: orbax's PyTree format (OCDBT, zstd-compressed unless
  ``compress`` is false), jax arrays written without the sharding file or array-metadata
  store (module docstring)."""
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(enable_write_sharding_file=False,
                                                 array_metadata_store=None)),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (np.number, ocp.type_handlers.ScalarHandler()),
      (int, ocp.type_handlers.ScalarHandler()),
      (float, ocp.type_handlers.ScalarHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=compress)


def state_restore_args(abstract_state: Any, *, partial: bool = False) -> ocp.args.PyTreeRestore:
  """Restore ``abstract_state`` (ShapeDtypeStructs with shardings) into those shardings:
  in full, or with ``partial`` only the subtree it names (e.g. ``{"params": ...}``)."""
  return ocp.args.PyTreeRestore(
      item=abstract_state,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
      partial_restore=partial)


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  meta: dict[str, Any]


class Checkpointer:
  """Thin policy layer over ``ocp.CheckpointManager``: cadence, metadata, fallback."""

  def __init__(self, directory: str | Path, *, keep: int, keep_every: int = 0,
               async_save: bool = True, device_snapshot: bool = True,
               writer_cpus: frozenset[int] | None = None, compress: bool = True,
               cleanup: bool = True):
    """``writer_cpus`` pins the background writer (and the orbax and tensorstore threads
    it starts) to those CPUs, e.g. cores the training process leaves free. ``compress``
    zstd-compresses the arrays it saves (restores read either kind). ``cleanup``
    removes the temporary directories of saves that never finished (a killed run's);
    a reader of a run that may be training now passes False: such a directory may be
    that run's save in progress."""
    self.directory = Path(directory).absolute()
    self.background = async_save and device_snapshot and jax.process_count() == 1
    if writer_cpus is not None and not self.background:
      raise ValueError("writer_cpus: only a background writer (one process, async_save and "
                       "device_snapshot) can be pinned")
    self._writer = (concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="ttt_jax-checkpoint",
        initializer=_start_writer_thread, initargs=(writer_cpus,))
        if self.background else None)
    self._pending: concurrent.futures.Future | None = None
    self._in_flight: int | None = None  # the newest step handed to orbax
    self._reported = False  # a save failure has been raised to the caller
    if self._writer is not None:  # start the thread now: not in the first save, and a
      try:                        # failed pinning is reported here
        self._writer.submit(lambda: None).result()
      except concurrent.futures.BrokenExecutor:
        self._writer.shutdown()
        raise ValueError(f"writer_cpus: cannot run the checkpoint writer on CPUs "
                         f"{sorted(writer_cpus or ())}") from None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every or None,
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=cleanup)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "meta"),
        item_handlers={"state": state_handler(compress),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any, meta: dict[str, Any]) -> None:
    """Starts an (async) save of ``state`` and of the data position as of this call,
    with ``meta`` and the state's ``state_checksums``."""
    data_state = _IteratorState(data_iter)
    self._join_writer()
    if not self.background:
      try:
        self._save(step, state, data_state, meta)
      except CheckpointError:
        self._reported = True
        raise
      return
    snapshot = jax.device_put(state, may_alias=False)
    # the writer hashes the snapshot (no train step donates it): the first save's
    # compilation of the hash and its fetch stay off the training thread
    self._pending = self._writer.submit(self._save, step, snapshot, data_state, meta)

  def _save(self, step: int, state: Any, data_state: _IteratorState,
            meta: dict[str, Any]) -> None:
    meta = {**meta, "state_checksums": state_checksums(state)}
    self._finish_previous()
    self._in_flight = step
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state),
          data=grain.checkpoint.CheckpointSave(data_state),
          meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # noqa: BLE001 - any failure of the write is reported as one line
      raise self._save_error(step, e) from None

  def _finish_previous(self) -> None:
    """Waits for orbax to finish the save in flight; its failure, as a CheckpointError."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(self._in_flight, e) from None

  def _save_error(self, step: int | None, error: BaseException) -> CheckpointError:
    steps = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
    kept = [s for s in steps if step is None or s < step]
    return CheckpointError(
        f"checkpoint save at step {step} failed in {self.directory}: "
        f"{describe_error(error)}; "
        + (f"checkpoint {kept[-1]} and those before it are intact" if kept else
           "no checkpoint before it exists")
        + " (the partial save is removed when the run restarts)")

  def _join_writer(self) -> None:
    """Waits for the background thread to hand its save to orbax; re-raises its error."""
    if self._pending is None:
      return
    pending, self._pending = self._pending, None
    error = pending.exception()
    if error is None:
      return
    self._reported = True
    if isinstance(error, CheckpointError):
      raise error
    raise CheckpointError(f"checkpoint save failed: {type(error).__name__}: {error}"
                          ) from error

  def read_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Restored:
    """Restores ``step`` into the shardings of ``abstract_state`` and, if given, moves
    ``data_iter`` to the checkpoint's position in the global sample stream."""
    meta = self.read_meta(step)
    same_processes = meta.get("process_count") == jax.process_count()
    absent = self._absent_empty_fields(step, abstract_state)
    target = abstract_state
    if absent:
      target = {k: v for k, v in _fields(abstract_state).items() if k not in absent}
    items = {"state": state_restore_args(target)}
    if data_iter is not None and same_processes:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None and not same_processes:
      data_iter.set_state(self._rescaled_data_state(step, meta["process_count"]))
    state = restored["state"]
    if absent:
      state = {**state, **{k: {} for k in absent}}
      state = type(abstract_state)(**state) if _is_namedtuple(abstract_state) else state
    if "state_checksums" in meta:
      verify_checksums(step, meta["state_checksums"], state)
    return Restored(step, state, meta)

  def _absent_empty_fields(self, step: int, abstract_state: Any) -> list[str]:
    """Fields of the state (a NamedTuple or dict) that are empty dicts and that the
    checkpoint does not have: added to the state after it was written (as
    ``TrainState.extras``), so restored as empty. Any other difference of form is an
    error of the restore."""
    fields = _fields(abstract_state)
    empty = [k for k, v in (fields or {}).items() if isinstance(v, dict) and not v]
    if not empty:
      return []
    saved = self.manager.item_metadata(step)["state"]
    return [k for k in empty if saved is not None and k not in saved]

  def _rescaled_data_state(self, step: int, saved_processes: int) -> dict[str, int]:
    """The data position of a checkpoint written by another number of processes.

    Process p of P reads elements p, p + P, ... of the global window stream (see
    ``data.pipeline.train_dataset``), and at a step boundary every process has read the
    same number k of them, so the global position is k * P, which is the same for any
    process count dividing it. Only the in-process pipeline (``data.worker_count = 0``) has a
    state of this form; grain worker pools interleave per-worker slices instead.
    """
    positions = set()
    for p in range(saved_processes):
      path = self.directory / str(step) / "data" / f"process_{p}-of-{saved_processes}.json"
      try:
        state = json.loads(path.read_text())
      except (OSError, ValueError) as e:
        self._check_storage(step, e)
        raise DamagedError(f"{path}: cannot read the data iterator state ({e})") from None
      if set(state) != {"next_index"}:
        raise CheckpointError(
            f"checkpoint {step} was written by {saved_processes} processes with grain "
            "workers; it can only resume with the same process count and data.worker_count")
      positions.add(int(state["next_index"]))
    if len(positions) != 1:
      raise DamagedError(f"checkpoint {step}: processes disagree on the data position "
                            f"{sorted(positions)}")
    global_position = positions.pop() * saved_processes
    if global_position % jax.process_count():
      raise CheckpointError(f"checkpoint {step}: data position {global_position} cannot be "
                            f"split over {jax.process_count()} processes")
    return {"next_index": global_position // jax.process_count()}

  def restore_latest(self, abstract_state: Any, data_iter: Any | None,
                     check: Callable[[dict], None], log: Callable[[str], None]
                     ) -> Restored | None:
    """Newest usable checkpoint; damaged ones are skipped with a message and moved
    aside (never deleted) so that the run's next saves can reuse their step numbers.
    ``check`` raises CheckpointError for an incompatible (not damaged) checkpoint, as
    does a restore that this run cannot take (another process count's data position);
    a ``DamagedError`` or any other failure of a restore is damage."""
    damaged: list[int] = []
    restored = None
    for step in reversed(self.all_steps()):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # noqa: BLE001 - any other read failure means a damaged step
        self._check_storage(step, e)
        log(f"checkpoint {step} is unreadable ({describe_error(e)}); trying an older one")
        damaged.append(step)
        continue
      check(meta)
      try:
        restored = self.restore(step, abstract_state, data_iter)
        break
      except DamagedError as e:
        log(f"{e}; trying an older one")
        damaged.append(step)
      except CheckpointError:  # a whole checkpoint this run cannot take: left in place
        raise
      except Exception as e:  # noqa: BLE001
        self._check_storage(step, e)
        log(f"checkpoint {step} is damaged ({describe_error(e)}); trying an older one")
        damaged.append(step)
    if damaged:
      self._quarantine(damaged, log)
    return restored

  def _check_storage(self, step: int, error: BaseException) -> None:
    """Raises a storage failure (``STORAGE_ERRNOS``) as one line: the checkpoint may be
    whole, so it is not moved aside."""
    if error_errno(error) in STORAGE_ERRNOS:
      raise CheckpointError(f"cannot read checkpoint {step} in {self.directory}: "
                            f"{describe_error(error)}") from None

  def _quarantine(self, steps: list[int], log: Callable[[str], None]) -> None:
    """Moves damaged step directories to ``<checkpoints>.damaged/<step>-<n>``."""
    target_root = self.directory.with_name(self.directory.name + ".damaged")
    if jax.process_index() == 0:
      target_root.mkdir(exist_ok=True)
      for step in steps:
        n = 0
        while (target := target_root / f"{step}-{n}").exists():
          n += 1
        (self.directory / str(step)).rename(target)
        log(f"moved damaged checkpoint {step} to {target}")
    multihost_utils.sync_global_devices("ttt_jax.checkpoint.quarantine")
    self.manager.reload()

  def wait(self) -> None:
    """Waits for every save to be complete; raises a save failure not yet reported."""
    self._join_writer()
    try:
      self._finish_previous()
    except CheckpointError:
      if not self._reported:
        self._reported = True
        raise

  def close(self) -> None:
    try:
      self.wait()
    finally:
      if self._writer is not None:
        self._writer.shutdown()
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001 - wait() has reported the failure that this repeats
        if not self._reported:
          raise


def resolve_source(path: str | Path) -> tuple[Path, int | None]:
  """(checkpoint directory, step or None for the newest) of an ``--init-from`` path: a
  run directory, its ``checkpoints`` directory or one step directory in it."""
  path = Path(path).absolute()
  if (path / "checkpoints").is_dir():
    return path / "checkpoints", None
  if path.name.isdigit() and (path / "state").is_dir():
    return path.parent, int(path.name)
  if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
    return path, None
  raise CheckpointError(f"{path}: --init-from expects a run directory, its checkpoints "
                        "directory or a checkpoint step directory")


@contextlib.contextmanager
def reading_source(directory: Path, step: int, steps: list[int]) -> Iterator[None]:
  """Turns a failure to read step ``step`` of an ``--init-from`` source (one of
  ``steps``) into one ``CheckpointError`` line naming the step and the newest older one
  to start from instead (not for a storage failure, ``STORAGE_ERRNOS``). Another run's
  checkpoint is not moved aside; a CheckpointError (an incompatible or checksum-failing
  checkpoint) passes through as it is."""
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - any read failure: a damaged or missing step
    older = [s for s in steps if s < step]
    hint = (f"; start from an older one with --init-from {directory / str(older[-1])}"
            if older and error_errno(e) not in STORAGE_ERRNOS else "")
    raise CheckpointError(f"--init-from: checkpoint {directory / str(step)} cannot be read "
                          f"({describe_error(e)}){hint}") from None


def load_params(path: str | Path, abstract_params: Any,
                check: Callable[[dict], None]) -> tuple[int, Any, dict[str, Any]]:
  """(step, params, meta) of another run's checkpoint, params only (partial restore),
  placed with the shardings of ``abstract_params`` (ShapeDtypeStructs)."""
  directory, step = resolve_source(path)
  manager = ocp.CheckpointManager(
      directory, item_names=("state", "meta"),
      item_handlers={"state": state_handler(),
                     "meta": ocp.JsonCheckpointHandler()})
  try:
    steps = sorted(manager.all_steps())
    if step is None:
      if not steps:
        raise CheckpointError(f"{directory}: no complete checkpoint to initialise from")
      step = steps[-1]
    elif step not in steps:
      raise CheckpointError(f"{directory}/{step}: not a complete checkpoint")
    with reading_source(directory, step, steps):  # check's CheckpointError passes through
      meta = manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
      check(meta)
      restored = manager.restore(step, args=ocp.args.Composite(
          state=state_restore_args({"params": abstract_params}, partial=True)))
  finally:
    manager.close()
  params = restored["state"]["params"]
  saved = meta.get("state_checksums", {})
  # the params of a NamedTuple train state, or of a dict one
  prefix = ".params" if any(k.startswith(".params") for k in saved) else "['params']"
  verify_checksums(step, saved, params, prefix)
  return step, params, meta
