"""Training entry point: ``python -m ttt_jax.train --config C --workdir W [--set k=v]``.

parse -> build (data, mesh, sharded state, jitted step) -> loop. The loop dispatches
step t+1 before it reads step t's metrics, so the host never waits on the device
except when it has to (eval rows, checkpoints, the end).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ttt_jax import checkpoint as ckpt_lib
from ttt_jax import distributed, host_memory
from ttt_jax import metrics as metrics_lib
from ttt_jax import objectives, optim, sharding
from ttt_jax.config import Config, ConfigError, load_config, save_config, to_dict
from ttt_jax.data import bpb, pipeline
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.errors import DataError
from ttt_jax.models import lm


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, unusable workdir, ...)."""


class TrainState(NamedTuple):
  step: jax.Array
  """int32 scalar: micro-batches trained on (optimizer steps x grad_accum_steps)."""
  params: nnx.State
  opt_state: optax.OptState


@dataclasses.dataclass
class Built:
  """Everything a run needs, made once from the config."""
  cfg: Config
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  state: TrainState
  state_shardings: Any
  vocab_size: int


def model_fn(cfg: Config, vocab_size: int) -> Callable[[], lm.LM]:
  return lambda: lm.LM(cfg.model, vocab_size, rngs=nnx.Rngs(cfg.train.seed))


def check_platform(cfg: Config, mesh: jax.sharding.Mesh) -> None:
  """Model options that only exist on some platforms fail here, naming the field."""
  platform = mesh.devices.flat[0].platform
  if cfg.model.attention_impl == "cudnn" and platform != "gpu":
    raise ConfigError(f"model.attention_impl: 'cudnn' needs GPU devices, these are "
                      f"{platform}; set model.attention_impl=xla")


def abstract_state(cfg: Config, vocab_size: int, mesh: jax.sharding.Mesh):
  """Shapes, graphdef, optimizer and shardings of the train state, without allocating."""
  check_platform(cfg, mesh)
  graphdef, abstract_params = nnx.split(nnx.eval_shape(model_fn(cfg, vocab_size)))
  logical_axes = nnx.get_partition_spec(abstract_params)
  tx = optim.build_optimizer(cfg.optim, cfg.train.steps, logical_axes)
  param_shardings = sharding.param_shardings(abstract_params, logical_axes, mesh, cfg.mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = sharding.replicated(mesh)
  opt_shardings = optim.opt_state_shardings(tx, abstract_opt, param_shardings, replicated)
  shardings = TrainState(replicated, param_shardings, opt_shardings)
  abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract_params, abstract_opt)
  return graphdef, tx, abstract, shardings


def build(cfg: Config, vocab_size: int, mesh: jax.sharding.Mesh) -> Built:
  """Initialises the train state directly into its shardings (never whole on one device)."""
  graphdef, tx, _, shardings = abstract_state(cfg, vocab_size, mesh)
  make = model_fn(cfg, vocab_size)

  def init() -> TrainState:
    params = nnx.state(make())
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

  state = jax.jit(init, out_shardings=shardings)()
  return Built(cfg, mesh, graphdef, tx, state, shardings, vocab_size)


def make_train_step(cfg: Config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
  """The pure step on one micro-batch: ``(state, batch) -> (state, metrics)``."""
  objective = objectives.build(cfg)
  accum = cfg.optim.grad_accum_steps
  base_key = jax.random.key(cfg.train.seed)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    step = state.step // accum
    rng = jax.random.fold_in(base_key, state.step)

    def loss_fn(params):
      return objective(nnx.merge(graphdef, params), batch, step, rng)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def jit_train_step(built: Built):
  """``make_train_step`` jitted with the state's shardings, the batch sharded over
  (data, fsdp), and the state donated."""
  return jax.jit(make_train_step(built.cfg, built.graphdef, built.tx),
                 in_shardings=(built.state_shardings, sharding.batch_sharding(built.mesh)),
                 out_shardings=(built.state_shardings, sharding.replicated(built.mesh)),
                 donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef):
  def eval_step(params: nnx.State, batch: dict[str, jax.Array], piece_bytes: jax.Array):
    logits = nnx.merge(graphdef, params)(batch["inputs"],
                                         segment_ids_BxT=batch.get("segment_ids"),
                                         step_ids_BxT=batch.get("step_ids"))
    _, sum_nll, n_tokens = lm.cross_entropy_loss(logits, batch["targets"])
    n_bytes = jnp.sum(piece_bytes[batch["targets"]])
    return {"nll": sum_nll, "tokens": n_tokens, "bytes": n_bytes}

  return eval_step


def compile_step(jitted, *args, log: Callable[[str], None]):
  """AOT-compiles, reporting compile time and the compiled memory analysis."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  mem_fields = {}
  if mem is not None:
    for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "alias_size_in_bytes", "generated_code_size_in_bytes"):
      mem_fields[name] = int(getattr(mem, name, 0))
    # Live at once: inputs, outputs not aliased to (donated) inputs, and temporaries.
    mem_fields["peak_bytes"] = max(int(getattr(mem, "peak_memory_in_bytes", 0) or 0), (
        mem_fields["argument_size_in_bytes"] + mem_fields["output_size_in_bytes"]
        + mem_fields["temp_size_in_bytes"] - mem_fields["alias_size_in_bytes"]))
  log(f"compiled train step in {seconds:.2f}s; memory_analysis: " +
      ", ".join(f"{k}={v / 2**20:.1f}MiB" for k, v in mem_fields.items()))
  return compiled, seconds, mem_fields


def train_flops_per_step(cfg: Config, vocab_size: int) -> float:
  """Analytic training FLOPs of one optimizer step (3x the forward matmul FLOPs)."""
  per_token = lm.forward_flops_per_token(cfg.model, vocab_size, cfg.data.seq_len)
  return 3.0 * per_token * cfg.train.batch_size * cfg.data.seq_len


def evaluate(eval_fn, params, batches, piece_bytes) -> dict[str, float]:
  totals = None
  for batch in batches:
    out = eval_fn(params, batch, piece_bytes)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  loss = float(totals["nll"]) / float(totals["tokens"])
  row = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0))}
  if float(totals["bytes"]) > 0:
    row["eval_bpb"] = bpb.bits_per_byte(float(totals["nll"]), int(totals["bytes"]))
  return row


class _Progress:
  def __init__(self, enabled: bool, total: int, initial: int):
    self._bar = None
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")

  def update(self, step: int, loss: float | None = None):
    if self._bar is not None:
      self._bar.n = step
      if loss is not None:
        self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
      self._bar.refresh()

  def write(self, text: str):
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()


def train(cfg: Config, workdir: str | Path) -> dict[str, Any]:
  """Runs training; returns a summary (final losses, timings) for callers and tests."""
  workdir = Path(workdir)
  is_main = jax.process_index() == 0
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise TrainingError(f"{workdir}: workdir is not writable ({e.strerror})") from None
  if not os.access(workdir, os.W_OK):
    raise TrainingError(f"{workdir}: workdir is not writable (permission denied)")
  progress = _Progress(is_main and cfg.logging.progress_bar, cfg.train.steps, 0)
  log = progress.write if is_main else (lambda _: None)

  corpus = corpus_lib.prepare_corpus(cfg.data, log=log)
  vocab_size = corpus.vocab_size
  eos_id = corpus_lib.document_eos_id(cfg.data, corpus)  # None unless data.document_mask
  mesh = sharding.make_mesh(cfg.mesh)
  accum = cfg.optim.grad_accum_steps
  micro_batch = cfg.train.batch_size // accum
  sharding.check_batch(micro_batch, mesh, "train.batch_size / optim.grad_accum_steps")
  eval_batch_size = cfg.eval.batch_size or cfg.train.batch_size
  sharding.check_batch(eval_batch_size, mesh, "eval.batch_size")
  log(f"mesh {dict(mesh.shape)} over {mesh.devices.size} of {jax.device_count()} devices "
      f"({jax.process_count()} processes); vocab {vocab_size}")
  log(host_memory.status(cfg.train.host_hugepages))

  built = build(cfg, vocab_size, mesh)
  n_params = lm.count_params(built.state.params)
  log(f"model: {n_params / 1e6:.2f}M params, mixer={cfg.model.mixer}, "
      f"residual={cfg.model.residual}, optimizer={cfg.optim.name}")

  train_step = jit_train_step(built)
  eval_step = jax.jit(make_eval_step(built.graphdef),
                      in_shardings=(built.state_shardings.params, sharding.batch_sharding(mesh),
                                    sharding.replicated(mesh)),
                      out_shardings=sharding.replicated(mesh))

  pi, pc = jax.process_index(), jax.process_count()
  annotators = pipeline.batch_annotators(cfg, corpus.tokenizer)
  dataset = pipeline.train_dataset(
      corpus.train_tokens, seq_len=cfg.data.seq_len, global_batch_size=micro_batch,
      seed=cfg.train.seed, shuffle=cfg.data.shuffle, process_index=pi,
      process_count=pc, worker_count=cfg.data.worker_count, annotators=annotators,
      eos_id=eos_id)
  data_iter = iter(dataset)
  eval_batches = [sharding.put_batch(b, mesh) for b in pipeline.eval_batches(
      corpus.val_tokens, seq_len=cfg.data.seq_len, batch_size=eval_batch_size,
      num_batches=cfg.eval.batches, process_index=pi, process_count=pc,
      annotators=annotators, eos_id=eos_id)]
  piece_bytes = jax.device_put(
      np.asarray(corpus.tokenizer.piece_bytes if corpus.tokenizer else
                 np.zeros(vocab_size, np.int32), np.int32), sharding.replicated(mesh))

  # the whole schedule once, on the host: reading it per step would sync with the device
  schedule = optim.lr_schedule(cfg.optim, cfg.train.steps)
  lr_by_step = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(cfg.train.steps)))
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  flops_per_step = train_flops_per_step(cfg, vocab_size)
  peak, peak_source = metrics_lib.mesh_peak_flops(cfg.train.peak_flops, mesh)
  log(f"MFU peak {peak / 1e9:.1f} GFLOP/s over the mesh ({peak_source}); "
      f"{flops_per_step / 1e9:.2f} GFLOP per step")

  state, start_step = built.state, 0
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=cfg.checkpoint.keep,
                               keep_every=cfg.checkpoint.keep_every,
                               async_save=cfg.checkpoint.async_save,
                               device_snapshot=cfg.checkpoint.device_snapshot,
                               compress=cfg.checkpoint.compress)
  stream = stream_identity(cfg, corpus.meta)
  restored = ckpt.restore_latest(ckpt_lib.with_shardings(state, built.state_shardings),
                                 data_iter, log=log,
                                 check=lambda meta: check_compatible(
                                     meta, cfg, vocab_size, stream=stream, state=state))
  if restored is not None:
    state, start_step = restored.state, restored.step
    log(f"resumed from checkpoint at step {start_step}")
  elif cfg.checkpoint.init_from:
    state, start_step = init_from(cfg, built, state, data_iter, vocab_size, stream, log)
  if is_main:  # only now: a run refused above leaves the workdir's files as they were
    save_config(cfg, workdir / "config.yaml")
    if corpus.tokenizer is not None:
      corpus.tokenizer.save(workdir / "tokenizer.model")
  # rows an earlier, interrupted attempt logged past the starting step are dropped
  writer = metrics_lib.MetricsWriter(workdir, tensorboard=cfg.logging.tensorboard,
                                     enabled=is_main,
                                     resume_step=start_step if restored is not None else -1)
  run_meta = ckpt_lib.run_metadata(cfg, mesh, vocab_size, built.state, stream)
  progress.update(start_step)

  first_batch = sharding.put_batch(next(data_iter), mesh)
  compiled_step, compile_s, memory = compile_step(train_step, state, first_batch, log=log)
  summary: dict[str, Any] = {"compile_s": compile_s, "memory": memory, "n_params": n_params,
                             "losses": {}, "eval": {}, "start_step": start_step}

  # seconds of evals and profile writing since the last train row: not step time
  excluded_s = 0.0

  def run_eval(step: int):
    nonlocal excluded_s
    start = time.perf_counter()
    row = evaluate(eval_step, state.params, eval_batches, piece_bytes)
    excluded_s += time.perf_counter() - start
    writer.write(step, row)
    summary["eval"][step] = row
    log(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()))

  if cfg.train.eval_every and start_step == 0:
    run_eval(start_step)

  profile_dir = workdir / "profile"
  prof = cfg.logging.profile_start
  pending: tuple[int, dict, float] | None = None
  last_log_time, last_log_step, excluded_s = time.perf_counter(), start_step, 0.0

  def drain(entry):
    """Reads a finished step's metrics (the device has moved on by now)."""
    nonlocal last_log_time, last_log_step, excluded_s
    step, metrics, lr = entry
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise TrainingError(f"non-finite loss ({loss}) at step {step}; stopping")
    summary["losses"][step] = loss
    progress.update(step, loss)
    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
      now = time.perf_counter()
      step_time = (now - last_log_time - excluded_s) / max(step - last_log_step, 1)
      last_log_time, last_log_step, excluded_s = now, step, 0.0
      extra = {k: float(v) for k, v in metrics.items() if k not in ("loss", "grad_norm")}
      writer.write(step, {
          "loss": loss, "lr": lr, "grad_norm": float(metrics["grad_norm"]),
          "tokens_per_sec": tokens_per_step / step_time, "step_time_s": step_time,
          "mfu": flops_per_step / (step_time * peak), **extra})

  stop = _StopRequest()
  step = start_step
  try:
    batch = first_batch
    last_step = cfg.train.steps
    if cfg.train.stop_after:
      last_step = min(last_step, start_step + cfg.train.stop_after)
    for step in range(start_step + 1, last_step + 1):
      if step == prof:
        jax.profiler.start_trace(str(profile_dir))
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        micro_metrics = []
        for _ in range(accum):
          if batch is None:
            batch = sharding.put_batch(next(data_iter), mesh)
          state, metrics = compiled_step(state, batch)
          micro_metrics.append(metrics)
          batch = None
        if accum > 1:  # averages over the micro-batches, dispatched, not fetched
          metrics = jax.tree.map(lambda *xs: sum(xs) / accum, *micro_metrics)
      if prof > 0 and step == prof + cfg.logging.profile_steps - 1:
        jax.block_until_ready(state)
        start = time.perf_counter()
        jax.profiler.stop_trace()
        excluded_s += time.perf_counter() - start
        log(f"wrote profile of steps {prof}..{step} to {profile_dir}")
      if pending is not None:
        drain(pending)
      pending = (step, metrics, float(lr_by_step[step - 1]))
      if cfg.train.eval_every and (step % cfg.train.eval_every == 0
                                   or step == cfg.train.steps):
        drain(pending)
        pending = None
        run_eval(step)
      every = cfg.checkpoint.every
      if (every and step % every == 0) or step == last_step or stop.requested:
        if pending is not None:  # never checkpoint a state whose loss was non-finite
          drain(pending)
          pending = None
        ckpt.save(step, state, data_iter, run_meta)
      if stop.requested:
        log(f"received {stop.requested}; saved a checkpoint at step {step} and stopped")
        break
    if pending is not None:
      drain(pending)
  finally:
    stop.restore()
    ckpt.close()
    progress.close()
    writer.close()
  summary["final_step"] = step
  summary["state"] = state
  return summary


def init_from(cfg: Config, built: Built, state: TrainState, data_iter: Any, vocab_size: int,
              stream: dict[str, Any], log: Callable[[str], None]) -> tuple[TrainState, int]:
  """(state, start step) of a new run initialised from ``cfg.checkpoint.init_from``."""
  source = cfg.checkpoint.init_from
  if cfg.checkpoint.init_from_full:
    directory, step = ckpt_lib.resolve_source(source)
    other = ckpt_lib.Checkpointer(directory, keep=cfg.checkpoint.keep, async_save=False)
    try:
      step = step if step is not None else (other.all_steps() or [None])[-1]
      if step is None:
        raise ckpt_lib.CheckpointError(f"{directory}: no complete checkpoint to initialise from")
      check_compatible(other.read_meta(step), cfg, vocab_size, stream=stream, state=state)
      restored = other.restore(step, ckpt_lib.with_shardings(state, built.state_shardings),
                               data_iter)
    finally:
      other.close()
    log(f"initialised from {directory}/{step}: params, optimizer state and data position")
    return restored.state, restored.step
  step, params, _ = ckpt_lib.load_params(
      source, ckpt_lib.with_shardings(state.params, built.state_shardings.params),
      check=lambda meta: check_compatible(meta, cfg, vocab_size,
                                          tokenizer_hash=stream["tokenizer_hash"]))
  log(f"initialised params from {source} (step {step}); optimizer and data start fresh")
  return TrainState(state.step, params, state.opt_state), 0


class _StopRequest:
  """Turns SIGTERM/SIGINT into a request the loop honours at the next step boundary."""

  def __init__(self):
    self.requested: str | None = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


COMPUTE_ONLY_MODEL_FIELDS = ("dtype", "remat", "attention_impl", "scan_layers",
                             "ttt_remat_group")
"""Model fields that change how the step computes, not what the parameters are: they
may differ between a checkpoint and the run resuming it."""


STREAM_FIELDS = {"seq_len": "data.seq_len", "seed": "train.seed",
                 "worker_count": "data.worker_count", "shuffle": "data.shuffle",
                 "val_fraction": "data.val_fraction", "corpus_hash": "data.corpus",
                 "tokenizer_hash": "data.tokenizer"}
"""Meta keys that fix the sample stream, and the config field each is named by."""


def stream_identity(cfg: Config, corpus_meta: dict[str, Any]) -> dict[str, Any]:
  """What fixes the run's sample stream: the sampling settings, and the content hashes
  of the text and the tokenizer (``data.Corpus.meta``). Saved in each checkpoint."""
  return {"seq_len": cfg.data.seq_len, "seed": cfg.train.seed,
          "worker_count": cfg.data.worker_count, "shuffle": cfg.data.shuffle,
          "val_fraction": cfg.data.val_fraction,
          "corpus_hash": corpus_meta.get("corpus_hash"),
          "tokenizer_hash": corpus_meta.get("tokenizer_hash")}


def check_compatible(meta: dict[str, Any], cfg: Config, vocab_size: int, *,
                     stream: dict[str, Any] | None = None, state: Any = None,
                     tokenizer_hash: str | None = None) -> None:
  """A checkpoint from another model config cannot be loaded here; one from another
  sample stream than ``stream`` (given when the data position is resumed) cannot be
  resumed; one whose state (``state_signature``, when the meta has it) differs from
  ``state``, the train state to restore, cannot be restored, which otherwise would look
  like damage; params trained with another tokenizer than ``tokenizer_hash`` (given for
  params-only fine-tuning) would read the token ids as other pieces. Keys a checkpoint
  predates are not compared."""
  current = to_dict(cfg.model)
  # a field added to ModelConfig after the checkpoint was written had its default then
  saved = {**to_dict(type(cfg.model)()), **meta.get("model", {})}
  differing = sorted(k for k in set(current) | set(saved)
                     if k not in COMPUTE_ONLY_MODEL_FIELDS and current.get(k) != saved.get(k))
  if differing or meta.get("vocab_size") != vocab_size:
    what = ", ".join(f"model.{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
    if meta.get("vocab_size") != vocab_size:
      what = ", ".join(filter(None, [what, f"vocab_size: {meta.get('vocab_size')} -> {vocab_size}"]))
    raise ckpt_lib.CheckpointError(
        f"checkpoint in the workdir was written by a different model ({what}); "
        "use a new --workdir or the original config")
  for key, current_value in (stream or {}).items():
    if key in meta and meta[key] != current_value:
      field = STREAM_FIELDS[key]
      what = {"corpus_hash": "other text", "tokenizer_hash": "another tokenizer"}.get(key)
      detail = (f"was read from {what} (sha256 {str(meta[key])[:12]}..., this run's "
                f"{str(current_value)[:12]}...)" if what else
                f"was made with {field}={meta[key]}, this run has {current_value}")
      raise ckpt_lib.CheckpointError(
          f"{field}: the checkpoint's sample stream {detail}; resume with the original "
          "value or use a new --workdir (--init-from to start from its params)")
  saved_tokenizer = meta.get("tokenizer_hash")
  if tokenizer_hash and saved_tokenizer and saved_tokenizer != tokenizer_hash:
    raise ckpt_lib.CheckpointError(
        f"data.tokenizer: the params were trained with another tokenizer (sha256 "
        f"{saved_tokenizer[:12]}..., this run's {tokenizer_hash[:12]}...); set "
        "data.tokenizer to the source run's tokenizer.model to fine-tune with it")
  if state is not None and "state_signature" in meta:
    _check_state_signature(meta, cfg, state)


def _check_state_signature(meta: dict[str, Any], cfg: Config, state: Any) -> None:
  saved, current = meta["state_signature"], ckpt_lib.state_signature(state)
  if saved == current:
    return
  old_optim = {**to_dict(type(cfg.optim)()), **meta.get("optim", {})}
  new_optim = to_dict(cfg.optim)
  changed = [f"optim.{k}: {old_optim.get(k)!r} -> {new_optim.get(k)!r}"
             for k in sorted(new_optim) if old_optim.get(k) != new_optim.get(k)]
  first = next(k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k))
  detail = (f"{first}: {saved.get(first, 'absent')} in the checkpoint, "
            f"{current.get(first, 'absent')} here")
  cause = ", ".join(changed) if changed else "no optim field changed; another version?"
  raise ckpt_lib.CheckpointError(
      f"optim: the checkpoint's train state does not fit this run's ({cause}; {detail}); "
      "resume with the original optim settings or use a new --workdir "
      "(--init-from to start from its params)")


def load_trained(workdir: str | Path, overrides: list[str] = (), log=print):
  """Config, graphdef and params of the newest usable checkpoint in ``workdir``."""
  workdir = Path(workdir)
  if not (workdir / "config.yaml").exists():
    raise ConfigError(f"{workdir}: no config.yaml here; is this a ttt_jax run directory?")
  cfg = load_config(workdir / "config.yaml", overrides)
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=cfg.checkpoint.keep,
                               async_save=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise ckpt_lib.CheckpointError(f"{workdir}: no complete checkpoint to load")
    vocab_size = int(ckpt.read_meta(steps[-1])["vocab_size"])
    mesh = sharding.make_mesh(cfg.mesh)
    graphdef, _, abstract, shardings = abstract_state(cfg, vocab_size, mesh)
    restored = ckpt.restore_latest(
        ckpt_lib.with_shardings(abstract, shardings), None, log=log,
        check=lambda meta: check_compatible(meta, cfg, vocab_size, state=abstract))
  finally:
    ckpt.close()
  if restored is None:
    raise ckpt_lib.CheckpointError(f"{workdir}: no usable checkpoint")
  return cfg, graphdef, restored.state.params, restored.step, mesh


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.train", description=__doc__)
  parser.add_argument("--config", required=True, help="YAML config file")
  parser.add_argument("--workdir", required=True, help="run directory")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set train.steps=100 (repeatable)")
  parser.add_argument("--init-from", metavar="PATH", default=None,
                      help="start from another run's params (checkpoint.init_from)")
  return parser.parse_args(argv)


@contextlib.contextmanager
def user_errors():
  """Turns expected failures into one line on stderr and a non-zero exit."""
  try:
    yield
  except (ConfigError, DataError, TrainingError, ckpt_lib.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2 if isinstance(e, ConfigError) else 1) from None


def main(argv: list[str] | None = None, reexec: bool = False) -> None:
  """``reexec``: the command line's own call, which may restart the process with huge
  pages on (``train.host_hugepages``) after the config has been checked."""
  args = parse_args(argv)
  with user_errors():
    overrides = list(args.set)
    if args.init_from:
      overrides.append(f"checkpoint.init_from={args.init_from}")
    cfg = load_config(args.config, overrides)
    if reexec and cfg.train.host_hugepages:
      host_memory.reexec_with_hugepages("ttt_jax.train", argv)
    distributed.initialize_from_env()
    train(cfg, args.workdir)


if __name__ == "__main__":
  main(reexec=True)
