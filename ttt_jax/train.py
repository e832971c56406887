"""Training entry point: ``python -m ttt_jax.train --config C --workdir W [--set k=v]``.

parse -> build (data, mesh, sharded state, jitted steps, resume from the workdir) ->
run (``training.loop.Trainer`` with the NaN guard, progress, metrics, the gate of
``gate.every`` (``training.gates``), eval, checkpoint, profile and stop-on-signal
hooks) -> summary. Other training commands (``python -m
ttt_jax.sdft``) reuse these pieces: ``prepare`` (workdir, corpus, mesh),
``build_state`` (the sharded state with their extra trees) and ``run`` (resume, hooks,
loop, summary) with their own data stream and step. The loop dispatches step t+1 before it
reads step t's metrics, so the host never waits on the device except when it has to
(eval rows, checkpoints, the end).

Messages go to stderr, one a line: set-up's first (so a set-up error prints on a clean
line), then the progress bar on a terminal and plain ``step ...`` lines in a log file
(``logging.plain``), then the run's summary. A resumed run names what changed in its
config; a rerun of a finished run says so and stops before compiling anything.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax import checkpoint as ckpt_lib
from ttt_jax import diagnostics, distributed, host_memory, lora, runs, sharding
from ttt_jax import metrics as metrics_lib
from ttt_jax.config import Config, load_config, to_yaml
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.errors import user_errors
from ttt_jax.eval import lm as eval_lm
from ttt_jax.eval import probes
from ttt_jax.models import lm
from ttt_jax.training import averaging, gates, loop, objectives, optim
from ttt_jax.training import state as state_lib
from ttt_jax.training import step as step_lib


@dataclasses.dataclass
class Setup:
  """What every training command sets up first (``prepare``)."""
  cfg: Config
  """The config, reading text with the tokenizer its params need (``resolve_init_from``)."""
  workdir: Path
  corpus: corpus_lib.Corpus
  """The run's text: its tokenizer, vocabulary and validation split."""
  mesh: jax.sharding.Mesh
  log: Callable[[str], None]
  """Set-up messages on stderr (process 0; a no-op elsewhere)."""
  started: float
  """``time.perf_counter()`` at the start, for the summary's wall and set-up times."""


def prepare(cfg: Config, workdir: str | Path) -> Setup:
  """The workdir, the corpus and the mesh, with the batch sizes checked against it."""
  started = time.perf_counter()
  cfg = runs.resolve_init_from(cfg, workdir)  # before the workdir exists or text is read
  optim.check_swa_starts(cfg.optim, cfg.train.steps)
  workdir = runs.prepare_workdir(workdir)
  log = loop.console if jax.process_index() == 0 else (lambda _: None)

  corpus = corpus_lib.prepare_corpus(cfg.data, log=log)
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_batch(cfg.train.batch_size // cfg.optim.grad_accum_steps, mesh,
                       "train.batch_size / optim.grad_accum_steps")
  sharding.check_batch(eval_batch_size(cfg), mesh, "eval.batch_size")
  axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
  log(f"mesh {axes} over {mesh.devices.size} of {jax.device_count()} devices "
      f"({jax.process_count()} processes); vocab {corpus.vocab_size}")
  log(host_memory.status(cfg.train.host_hugepages))
  return Setup(cfg, workdir, corpus, mesh, log, started)


def eval_batch_size(cfg: Config) -> int:
  return cfg.eval.batch_size or cfg.train.batch_size


def validation_batches(setup: Setup) -> list[dict[str, np.ndarray]]:
  """This process's rows of the validation batches the train loop evaluates."""
  cfg = setup.cfg
  return runs.run_batches(cfg, setup.corpus, train_batch_size=None,
                          eval_batch_size=eval_batch_size(cfg),
                          eval_batches=cfg.eval.batches)[1]


def build_state(setup: Setup) -> state_lib.Built:
  """The sharded train state (``state.build``) with the extra trees of
  ``train.objective`` and of ``train.nonfinite='skip'``, and the log line naming the
  model."""
  cfg, mesh, log = setup.cfg, setup.mesh, setup.log
  extras_init, extras_shardings = objectives.build_extras(cfg)  # an EMA teacher, ...
  skip_extras = step_lib.skip_extras(cfg)  # train.nonfinite='skip' keeps a counter
  if skip_extras is not None:
    given_init, given_shardings = extras_init, extras_shardings

    def extras_init(params):
      return {**skip_extras, **(given_init(params) if given_init is not None else {})}

    def extras_shardings(param_shardings):
      given = (given_shardings(param_shardings) if callable(given_shardings)
               else given_shardings or {})
      return {**{name: sharding.replicated(mesh) for name in skip_extras}, **given}

  built = state_lib.build(cfg, setup.corpus.vocab_size, mesh, extras_init=extras_init,
                          extras_shardings=extras_shardings)
  if cfg.gate.every:  # the state carries the gate's anchor (training.gates)
    built = gates.add_gate(built)
  log(f"model: {lm.count_params(step_lib.model_tree(cfg, built.state)) / 1e6:.2f}M params, "
      f"mixer={cfg.model.mixer.type}, residual={cfg.model.residual.type}, "
      f"optimizer={'adamw (lora)' if cfg.lora.enabled else cfg.optim.name}")
  if cfg.lora.enabled:  # n_params counts the adapters: what trains; the base is frozen
    log(lora.summary_line(cfg.lora, lora.find_targets(cfg.lora, built.state.extras[lora.BASE])))
  return built


Started = Callable[[state_lib.TrainState, int, bool], state_lib.TrainState]
"""``(state, start step, resumed) -> state``: a command's own adjustment of the state a
run starts from (after the resume or ``checkpoint.init_from``)."""
HookFactory = Callable[[metrics_lib.MetricsWriter, Callable[[str], None]], list[loop.Hook]]
"""``(writer, log) -> hooks``: a command's own loop hooks, run after the gate and before
eval and checkpoint (which see a state they replace); they log rows through ``writer``."""


def run(setup: Setup, built: state_lib.Built, train_step: Callable, data_iter: Any,
        eval_host_batches: list[dict[str, np.ndarray]], stream: dict[str, Any], *,
        flops_per_step: float, tokens_per_step: int, started: Started | None = None,
        extra_hooks: HookFactory | None = None) -> dict[str, Any]:
  """Trains ``built.state`` with the jitted ``train_step`` over ``data_iter`` (host
  batches, one per micro-step, whose position the checkpoints save), resuming the
  workdir's newest checkpoint of the sample stream ``stream``, through ``loop.Trainer``
  with the NaN guard, progress, metrics, gate (``gate.every``), ``extra_hooks``, eval,
  checkpoint, profile and stop-on-signal hooks; returns the summary (final losses, timings) for callers and
  tests."""
  cfg, workdir, corpus, mesh = setup.cfg, setup.workdir, setup.corpus, setup.mesh
  is_main, log = jax.process_index() == 0, setup.log
  accum = cfg.optim.grad_accum_steps
  n_params = lm.count_params(built.state.params)
  eval_step = step_lib.jit_eval_step(built)
  eval_batches = [sharding.put_batch(b, mesh) for b in eval_host_batches]
  piece_bytes = eval_lm.piece_bytes(corpus, mesh)
  gate_scores = (probes.gate_scorer(cfg, built.graphdef, eval_step, eval_batches, piece_bytes,
                                    corpus.tokenizer) if cfg.gate.every else None)

  # the whole schedule once, on the host: reading it per step would sync with the device
  schedule = optim.lr_schedule(cfg.optim, cfg.train.steps)
  lr_by_step = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(cfg.train.steps)))
  peak, peak_source = metrics_lib.mesh_peak_flops(cfg.train.peak_flops, mesh)
  log(f"MFU peak {peak / 1e9:.1f} GFLOP/s over the mesh ({peak_source}); "
      f"{flops_per_step / 1e9:.2f} GFLOP per step")

  with contextlib.ExitStack() as resources:
    resources.enter_context(diagnostics.library_logs(diagnostics.run_log(workdir)))
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=cfg.checkpoint.keep,
                                 keep_every=cfg.checkpoint.keep_every,
                                 async_save=cfg.checkpoint.async_save,
                                 device_snapshot=cfg.checkpoint.device_snapshot,
                                 compress=cfg.checkpoint.compress)
    resources.callback(ckpt.close)
    state, start_step, resumed = runs.restore_or_init(cfg, built, ckpt, data_iter, stream, log)
    if started is not None:
      state = started(state, start_step, resumed)
    if resumed:
      runs.report_resume(cfg, workdir, start_step, log)
    if start_step >= cfg.train.steps:
      log(f"run already complete at step {start_step} (train.steps={cfg.train.steps}); "
          "raise train.steps to extend it")
      return {"compile_s": None, "memory": None, "n_params": n_params, "losses": {},
              "eval": {}, "start_step": start_step, "final_step": start_step,
              "state": state}
    runs.write_run_files(cfg, workdir, corpus.tokenizer, step=start_step)
    # rows an earlier, interrupted attempt logged past the starting step are dropped
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=cfg.logging.tensorboard,
                                       enabled=is_main,
                                       resume_step=start_step if resumed else -1)
    resources.callback(writer.close)
    run_meta = ckpt_lib.run_metadata(cfg, mesh, corpus.vocab_size, built.state, stream)

    batches = (sharding.put_batch(batch, mesh) for batch in data_iter)
    first_batch = next(batches)
    compiled_step, compile_s, memory = step_lib.compile_step(train_step, state, first_batch,
                                                             log=log)
    trainer = loop.Trainer(compiled_step, itertools.chain([first_batch], batches),
                           micro_steps=accum)
    bar, plain = loop.console_modes(cfg.logging.progress_bar, cfg.logging.plain,
                                    sys.stderr.isatty())
    progress = loop.Progress(is_main and bar, cfg.train.steps, initial=start_step)
    log = progress.write if is_main else log
    metrics_log = loop.MetricsLog(
        writer, trainer.clock, log_every=cfg.train.log_every, final_step=cfg.train.steps,
        lr_by_step=lr_by_step, tokens_per_step=tokens_per_step,
        flops_per_step=flops_per_step, peak_flops=peak,
        echo=log if is_main and plain else None)
    evaluation = loop.Evaluation(
        lambda s: averaging.evaluate_each(
            lambda params: eval_lm.evaluate(eval_step, params, eval_batches, piece_bytes),
            step_lib.model_params(cfg, s), s.opt_state, averaging.eval_weights(cfg)), writer,
        every=cfg.train.eval_every, final_step=cfg.train.steps, log=log)
    checkpoint = loop.Checkpoint(ckpt, data_iter, run_meta, every=cfg.checkpoint.every,
                                 log=log)
    nan_guard = loop.NanGuard(skip=cfg.train.nonfinite == "skip",
                              newest_checkpoint=checkpoint.newest)
    gate = [gates.Gate(cfg.gate, gate_scores, final_step=cfg.train.steps,
                       state_shardings=built.state_shardings,
                       workdir=workdir if is_main else None, writer=writer, log=log)
            ] if cfg.gate.every else []  # before eval and checkpoint: they see its decision
    own_hooks = extra_hooks(writer, log) if extra_hooks is not None else []
    for hook in (nan_guard, progress, metrics_log, *gate, *own_hooks, evaluation, checkpoint,
                 loop.Profile(workdir / "profile", cfg.logging.profile_start,
                              cfg.logging.profile_steps, trainer.clock, log),
                 loop.StopOnSignal(trainer.request_stop)):
      trainer.add(hook)
    last_step = cfg.train.steps
    if cfg.train.stop_after:
      last_step = min(last_step, start_step + cfg.train.stop_after)
    setup_s = time.perf_counter() - setup.started
    finished = trainer.run(state, start_step, last_step)
  newest = checkpoint.newest()
  last_eval = max(evaluation.rows, default=None)
  for line in metrics_lib.summary_lines(
      start_step=start_step, final_step=finished.step, total_steps=cfg.train.steps,
      wall_s=time.perf_counter() - setup.started, setup_s=setup_s,
      loss=metrics_log.losses.get(finished.step),
      eval_step=last_eval, eval_row=evaluation.rows.get(last_eval),
      checkpoint=None if newest is None else ckpt.directory / str(newest)):
    log(line)
  if finished.step < cfg.train.steps and trainer.stop_reason is None:
    log(f"stopped after {finished.step - start_step} steps at step {finished.step} "
        "(train.stop_after); rerun the same command to continue")
  return {"compile_s": compile_s, "memory": memory, "n_params": n_params,
          "losses": metrics_log.losses, "eval": evaluation.rows, "start_step": start_step,
          "final_step": finished.step, "state": finished.state}


def train(cfg: Config, workdir: str | Path) -> dict[str, Any]:
  """Runs training; returns a summary (final losses, timings) for callers and tests."""
  setup = prepare(cfg, workdir)
  cfg, corpus = setup.cfg, setup.corpus
  dataset, eval_host_batches = runs.run_batches(
      cfg, corpus, train_batch_size=cfg.train.batch_size // cfg.optim.grad_accum_steps,
      eval_batch_size=eval_batch_size(cfg), eval_batches=cfg.eval.batches)
  built = build_state(setup)
  return run(setup, built, step_lib.jit_train_step(built), iter(dataset), eval_host_batches,
             runs.stream_identity(cfg, corpus.meta),
             flops_per_step=step_lib.train_flops_per_step(cfg, corpus.vocab_size),
             tokens_per_step=cfg.train.batch_size * cfg.data.seq_len)


def command_parser(prog: str, description: str | None, epilog: str | None = None
                   ) -> argparse.ArgumentParser:
  """The flags every training command has: --config, --workdir, --set, --init-from,
  --print-config (``parse`` checks them)."""
  parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
  parser.add_argument("--config", required=True, help="YAML config file")
  parser.add_argument("--workdir", help="run directory (required unless --print-config)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set train.steps=100 (repeatable)")
  parser.add_argument("--init-from", metavar="PATH", default=None,
                      help="start from another run's params (checkpoint.init_from)")
  parser.add_argument("--print-config", action="store_true",
                      help="print the resolved config (file, --set, defaults) as YAML and exit")
  return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
  args = parser.parse_args(argv)
  if args.workdir is None and not args.print_config:
    parser.error("the following arguments are required: --workdir")
  return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  return parse(command_parser(
      "python -m ttt_jax.train", __doc__,
      epilog="Every config field with its type, default and documentation: python -m "
             "ttt_jax.config [--section model.mixer]. Compare finished runs: python -m "
             "ttt_jax.compare RUN..."), argv)


def overrides_of(args: argparse.Namespace) -> list[str]:
  """The config overrides of the shared flags: every --set, then --init-from's."""
  overrides = list(args.set)
  if args.init_from:
    overrides.append(f"checkpoint.init_from={args.init_from}")
  return overrides


def launch(args: argparse.Namespace, overrides: list[str], module: str,
           run_command: Callable[[Config, str], Any], argv: list[str] | None, reexec: bool,
           check: Callable[[Config], None] | None = None) -> None:
  """A training command's body, inside ``user_errors``: the run log, the config (file
  and ``overrides``; ``check``ed), --print-config, the huge-pages restart of ``python
  -m module`` (``reexec``), the distributed start-up, then ``run_command(cfg,
  workdir)``."""
  with user_errors():
    if not args.print_config:
      diagnostics.library_logs_until_exit(diagnostics.run_log(runs.check_workdir(args.workdir)))
    cfg = load_config(args.config, overrides)
    if check is not None:
      check(cfg)
    if args.print_config:
      print(to_yaml(cfg), end="")
      return
    if reexec and cfg.train.host_hugepages:
      host_memory.reexec_with_hugepages(module, argv)
    distributed.initialize_from_env()
    run_command(cfg, args.workdir)


def main(argv: list[str] | None = None, reexec: bool = False) -> None:
  """``reexec``: the command line's own call, which may restart the process with huge
  pages on (``train.host_hugepages``) after the config has been checked."""
  args = parse_args(argv)
  launch(args, overrides_of(args), "ttt_jax.train", train, argv, reexec)


if __name__ == "__main__":
  main(reexec=True)
