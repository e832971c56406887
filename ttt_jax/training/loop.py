"""The training loop: a compiled step run over a batch iterator, with hooks.

``Trainer(step_fn, batches, micro_steps=k)`` runs ``state, metrics = step_fn(state,
batch)`` k times per optimizer step (metrics averaged over the k micro-batches, on
device) from ``start_step + 1`` to ``last_step``. Step t+1 is dispatched before step
t's metrics are read, so the host waits on the device only where a hook needs a step's
result. Per step t, in this order:

  1. ``before_step(t)`` of every hook (profile start);
  2. dispatch: k micro-steps inside ``StepTraceAnnotation("train", t)``;
  3. ``after_dispatch(info)``: t is queued, its metrics unread (profile stop);
  4. ``on_metrics(info)`` for step t-1, whose metrics are now read (NaN guard, progress,
     metrics rows); every step's metrics reach these hooks once, in step order;
  5. ``after_step(info)`` of each hook whose ``due(info)`` holds (eval, checkpoint, a
     function added with ``add_hook(fn, every=N)``), after step t's own metrics are
     read (and ``on_metrics`` has run for them); if a stop was requested meanwhile
     (``request_stop``: a signal, or a hook), the hooks it made due run too (the
     checkpoint);
  6. the loop ends after t if a stop was requested, after ``stopped(info)`` of every hook.

A hook may replace the train state: ``start`` and ``after_step`` return None to keep
``info.state``, or a state to go on with instead (same structure and shardings; a gate
undoing a block of updates, ``training.gates``). Hooks after it at that step see the
replacement, and the next step is dispatched from it. The step's metrics stay those of
the state the step returned.

``StepInfo`` is what a hook sees: the step, the run's last step, the state after the
step (not in ``on_metrics``: the next step has consumed it by then), the step's metrics
as floats (not in ``after_dispatch``) and the stop request. ``Trainer.clock`` keeps
evals and other untimed hook work out of the step time; a hook with ``timed = True``
(a checkpoint save's blocking part) is counted.

The hooks of ``python -m ttt_jax.train`` live here too: ``NanGuard``, ``Progress``,
``MetricsLog``, ``Evaluation``, ``Checkpoint``, ``Profile`` and ``StopOnSignal``.
Everything they print goes to stderr, one message a line: the progress bar on a
terminal (``console_modes``), and plain ``step ...`` lines from ``MetricsLog``'s rows
where a log file reads them, so no host sync is added for the console.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from ttt_jax import checkpoint as ckpt_lib
from ttt_jax import metrics as metrics_lib
from ttt_jax.errors import TrainingError


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """What a hook knows of the step it is called for."""
  step: int
  """Optimizer steps done (the start step in ``start``)."""
  last_step: int
  """The step this run ends at (unless stopped earlier)."""
  state: Any = None
  """The train state after ``step``; None in ``on_metrics``."""
  metrics: Mapping[str, float] | None = None
  """The step's metrics; None in ``start`` and ``after_dispatch``."""
  stop_reason: str | None = None
  """Why a stop was requested (e.g. 'SIGTERM'); the loop ends after this step."""


class Hook:
  """A callback of the loop (see the module docstring for when each method runs).
  Every method does nothing by default; ``due`` is never true."""

  timed = False
  """Whether ``after_step``'s time counts as step time."""

  def start(self, info: StepInfo) -> Any:
    """Before the first step, with the start step and state; may return a state that
    replaces it (None: keep it)."""

  def before_step(self, step: int) -> None:
    """Before step ``step`` is dispatched."""

  def after_dispatch(self, info: StepInfo) -> None:
    """Step ``info.step`` is dispatched; its metrics are not read."""

  def on_metrics(self, info: StepInfo) -> None:
    """The metrics of step ``info.step`` were read (every step, once, in order)."""

  def due(self, info: StepInfo) -> bool:
    """Whether ``after_step`` runs at ``info.step``."""
    del info
    return False

  def after_step(self, info: StepInfo) -> Any:
    """Step ``info.step`` is done and its metrics read (when ``due``); may return a
    state that replaces ``info.state`` (None: keep it)."""

  def stopped(self, info: StepInfo) -> None:
    """The loop ends after ``info.step`` because a stop was requested
    (``info.stop_reason``), once every hook due then has run."""

  def close(self) -> None:
    """The loop ended, normally or not."""


class Clock:
  """Wall time of the loop without the time set aside as not training."""

  def __init__(self):
    self.reset(0)

  def reset(self, step: int) -> None:
    self._since, self._since_step, self._excluded = time.perf_counter(), step, 0.0

  @contextlib.contextmanager
  def excluded(self) -> Iterator[None]:
    """Time spent inside is not step time (evals, profile writing)."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._excluded += time.perf_counter() - start

  def step_time(self, step: int) -> float:
    """Seconds per step from the previous call (or ``reset``) to now, at ``step``."""
    now = time.perf_counter()
    seconds = (now - self._since - self._excluded) / max(step - self._since_step, 1)
    self._since, self._since_step, self._excluded = now, step, 0.0
    return seconds


class _Every(Hook):
  """``fn(info)`` at the steps that are multiples of ``every``."""

  def __init__(self, fn: Callable[[StepInfo], None], every: int):
    self.fn, self.every = fn, every

  def due(self, info: StepInfo) -> bool:
    return info.step % self.every == 0

  def after_step(self, info: StepInfo) -> None:
    self.fn(info)  # a function added by add_hook never replaces the state


@dataclasses.dataclass(frozen=True)
class Finished:
  """Where ``Trainer.run`` ended: the state after ``step``."""
  state: Any
  step: int


class Trainer:
  """Runs ``step_fn`` (``(state, batch) -> (state, metrics)``, compiled) over ``batches``
  (device batches, fetched lazily, one per micro-step), ``micro_steps`` micro-batches
  per optimizer step, calling its hooks in the order they were added."""

  def __init__(self, step_fn: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]],
               batches: Iterator[Any], *, micro_steps: int = 1):
    self.step_fn, self.batches, self.micro_steps = step_fn, batches, micro_steps
    self.hooks: list[Hook] = []
    self.clock = Clock()
    self.stop_reason: str | None = None
    self._pending: tuple[int, dict[str, jax.Array]] | None = None
    """The step dispatched last and its metrics, until they are read."""

  def add(self, hook: Hook) -> Hook:
    """Adds ``hook``; returns it."""
    self.hooks.append(hook)
    return hook

  def add_hook(self, fn: Callable[[StepInfo], None], *, every: int) -> Hook:
    """Calls ``fn(info)`` after every ``every``-th step (its metrics read)."""
    if every < 1:
      raise ValueError(f"every: must be >= 1, got {every}")
    return self.add(_Every(fn, every))

  def request_stop(self, reason: str) -> None:
    """Ends the loop after the current step's hooks (safe from a signal handler)."""
    self.stop_reason = reason

  def _info(self, step: int, last_step: int, state: Any = None,
            metrics: Mapping[str, float] | None = None) -> StepInfo:
    return StepInfo(step, last_step, state, metrics, self.stop_reason)

  def _dispatch(self, state: Any) -> tuple[Any, dict[str, jax.Array]]:
    micro_metrics = []
    for _ in range(self.micro_steps):
      state, metrics = self.step_fn(state, next(self.batches))
      micro_metrics.append(metrics)
    if self.micro_steps > 1:  # averages over the micro-batches, dispatched, not fetched
      metrics = jax.tree.map(lambda *xs: sum(xs) / self.micro_steps, *micro_metrics)
    return state, metrics

  def _read_pending(self, last_step: int) -> dict[str, float] | None:
    """Reads the metrics of the step dispatched last but not read yet (if any), passes
    them to every ``on_metrics`` and returns them as floats."""
    if self._pending is None:
      return None
    (step, metrics), self._pending = self._pending, None
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    info = self._info(step, last_step, metrics=host)
    for hook in self.hooks:
      hook.on_metrics(info)
    return host

  def _after_step(self, step: int, last_step: int, state: Any) -> tuple[Any, str | None]:
    """Runs the hooks due at ``step``, after reading its metrics, and then those that a
    stop requested meanwhile made due; returns the state (a hook may replace it) and the
    stop request they saw."""
    host, done = None, set()
    while True:
      stop_reason = self.stop_reason
      for index, hook in enumerate(self.hooks):
        if index in done or not hook.due(self._info(step, last_step, state, host)):
          continue
        if host is None:  # a hook never sees a step whose metrics were not checked
          host = self._read_pending(last_step)
        with contextlib.nullcontext() if hook.timed else self.clock.excluded():
          replaced = hook.after_step(self._info(step, last_step, state, host))
        state = state if replaced is None else replaced
        done.add(index)
      if self.stop_reason == stop_reason:
        return state, stop_reason

  def run(self, state: Any, start_step: int, last_step: int) -> Finished:
    """Trains from ``start_step`` (the state's step) to ``last_step``, or to the step
    at which a stop was requested."""
    step, self._pending = start_step, None
    try:
      for hook in self.hooks:
        replaced = hook.start(self._info(start_step, last_step, state))
        state = state if replaced is None else replaced
      self.clock.reset(start_step)
      for step in range(start_step + 1, last_step + 1):
        for hook in self.hooks:
          hook.before_step(step)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = self._dispatch(state)
        for hook in self.hooks:
          hook.after_dispatch(self._info(step, last_step, state))
        self._read_pending(last_step)
        self._pending = (step, metrics)
        state, stop_reason = self._after_step(step, last_step, state)
        if stop_reason is not None:
          for hook in self.hooks:
            hook.stopped(self._info(step, last_step, state))
          break
      self._read_pending(last_step)
    finally:
      with contextlib.ExitStack() as closing:  # every hook is closed, even if one fails
        for hook in reversed(self.hooks):
          closing.callback(hook.close)
    return Finished(state, step)


def state_is_finite(metrics: Mapping[str, float]) -> bool:
  """Whether a step's metrics say the state it returned is finite (its
  ``finite_state``, averaged over micro-steps, is 1); true for a step that does not
  report it."""
  return metrics.get("finite_state", 1.0) == 1.0


class NanGuard(Hook):
  """Stops the run before anything saves a non-finite state: on a step whose returned
  params or optimizer state are non-finite (its ``finite_state`` metric) and, unless
  ``skip`` (the step then drops such an update itself), on a non-finite loss.
  ``newest_checkpoint()`` gives the newest checkpoint step of the workdir (None: none),
  named in the error."""

  def __init__(self, *, skip: bool = False,
               newest_checkpoint: Callable[[], int | None] | None = None):
    self.skip, self.newest_checkpoint = skip, newest_checkpoint

  def on_metrics(self, info: StepInfo) -> None:
    loss, metrics = info.metrics["loss"], info.metrics
    finite_state = state_is_finite(metrics)
    if finite_state and (self.skip or math.isfinite(loss)):
      return
    what = "train state" if not finite_state else "loss"
    detail = f"loss {loss:.4g}"
    if "grad_norm" in metrics:
      detail += f", grad_norm {metrics['grad_norm']:.4g}"
    message = f"non-finite {what} at step {info.step} ({detail}); stopping"
    if self.newest_checkpoint is not None:
      newest = self.newest_checkpoint()
      message += ("; no checkpoint was saved in this workdir" if newest is None else
                  f"; the newest checkpoint, step {newest}, is finite: rerun to resume "
                  "from it")
    raise TrainingError(message)


def console_modes(progress_bar: bool, plain: str, terminal: bool) -> tuple[bool, bool]:
  """(bar, plain lines) for ``logging.progress_bar`` and ``logging.plain`` when stderr
  is (``terminal``) or is not a terminal: 'auto' prints plain lines, and no bar, where
  stderr is a file (a bar there is one long line of carriage returns), and plain lines
  where the bar is off; 'always' both; 'never' the bar alone."""
  auto_file = plain == "auto" and not terminal
  return (progress_bar and not auto_file,
          plain == "always" or plain == "auto" and (auto_file or not progress_bar))


def console(text: str) -> None:
  """One message line on stderr (set-up messages, and those printed without a bar)."""
  print(text, file=sys.stderr, flush=True)


class Progress(Hook):
  """A tqdm progress bar on stderr with the latest loss (``enabled``), and the log
  lines that must not break it. Make it when set-up is done: the bar shows at once."""

  def __init__(self, enabled: bool, total: int, initial: int = 0):
    self._bar = None
    if enabled:
      from tqdm import tqdm  # optional dependency
      self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step",
                       file=sys.stderr)

  def start(self, info: StepInfo) -> None:
    self.update(info.step)

  def on_metrics(self, info: StepInfo) -> None:
    self.update(info.step, info.metrics["loss"])

  def update(self, step: int, loss: float | None = None) -> None:
    if self._bar is not None:
      self._bar.n = step
      if loss is not None:
        self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
      self._bar.refresh()

  def write(self, text: str) -> None:
    if self._bar is not None:
      self._bar.write(text, file=sys.stderr)
    else:
      console(text)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class MetricsLog(Hook):
  """Train rows of ``metrics.jsonl`` every ``log_every`` steps and at ``final_step``:
  loss, lr, grad_norm, tokens/s, step time, MFU and the objective's own metrics; each
  row also goes to ``echo`` (None: nowhere) as a plain line with the ETA to
  ``final_step`` at the row's step time. ``losses``: every step's loss."""

  def __init__(self, writer: metrics_lib.MetricsWriter, clock: Clock, *, log_every: int,
               final_step: int, lr_by_step: np.ndarray, tokens_per_step: int,
               flops_per_step: float, peak_flops: float,
               echo: Callable[[str], None] | None = None):
    self.writer, self.clock, self.echo = writer, clock, echo
    self.log_every, self.final_step = log_every, final_step
    self.lr_by_step = lr_by_step
    self.tokens_per_step, self.flops_per_step, self.peak_flops = (
        tokens_per_step, flops_per_step, peak_flops)
    self.losses: dict[int, float] = {}

  def on_metrics(self, info: StepInfo) -> None:
    step, metrics = info.step, info.metrics
    self.losses[step] = metrics["loss"]
    if step % self.log_every == 0 or step == self.final_step:
      step_time = self.clock.step_time(step)
      extra = {k: v for k, v in metrics.items() if k not in ("loss", "grad_norm")}
      row = {"loss": metrics["loss"], "lr": float(self.lr_by_step[step - 1]),
             "grad_norm": metrics["grad_norm"],
             "tokens_per_sec": self.tokens_per_step / step_time, "step_time_s": step_time,
             "mfu": self.flops_per_step / (step_time * self.peak_flops), **extra}
      self.writer.write(step, row)
      if self.echo is not None:
        eta = step_time * max(self.final_step - step, 0)
        self.echo(metrics_lib.train_line(step, self.final_step, row, eta))


class Evaluation(Hook):
  """``evaluate(state) -> row`` at step 0 of a fresh run, every ``every`` steps and at
  ``final_step`` (``every`` 0: never); rows go to the writer and ``rows``, and a line
  (``metrics.eval_line``) to ``log``."""

  def __init__(self, evaluate: Callable[[Any], dict[str, float]],
               writer: metrics_lib.MetricsWriter, *, every: int, final_step: int,
               log: Callable[[str], None]):
    self.evaluate, self.writer, self.log = evaluate, writer, log
    self.every, self.final_step = every, final_step
    self.rows: dict[int, dict[str, float]] = {}

  def start(self, info: StepInfo) -> None:
    if self.every and info.step == 0:
      self.after_step(info)

  def due(self, info: StepInfo) -> bool:
    return bool(self.every) and (info.step % self.every == 0 or info.step == self.final_step)

  def after_step(self, info: StepInfo) -> None:
    row = self.evaluate(info.state)
    self.writer.write(info.step, row)
    self.rows[info.step] = row
    self.log(metrics_lib.eval_line(info.step, self.final_step, row))


class Checkpoint(Hook):
  """Saves the state and the data position every ``every`` steps (0: never), at the
  run's last step and when a stop is requested. Its blocking part is step time."""

  timed = True

  def __init__(self, ckpt: ckpt_lib.Checkpointer, data_iter: Any, meta: dict[str, Any], *,
               every: int, log: Callable[[str], None]):
    self.ckpt, self.data_iter, self.meta = ckpt, data_iter, meta
    self.every, self.log = every, log
    self.newest_step: int | None = None

  def start(self, info: StepInfo) -> None:
    steps = self.ckpt.all_steps()
    self.newest_step = steps[-1] if steps else None

  def newest(self) -> int | None:
    """The newest checkpoint of the workdir: this run's last save, or the one it
    resumed from (None: there is none)."""
    return self.newest_step

  def due(self, info: StepInfo) -> bool:
    return (bool(self.every) and info.step % self.every == 0 or info.step == info.last_step
            or info.stop_reason is not None)

  def after_step(self, info: StepInfo) -> None:
    # the loop read this step's metrics (and ran the NaN guard) before any due hook;
    # this refusal is the second line of defence, for loops run without the guard
    if info.metrics is None or not state_is_finite(info.metrics):
      raise TrainingError(f"step {info.step}: refusing to save a checkpoint of a train state "
                          "that is not known to be finite")
    self.ckpt.save(info.step, info.state, self.data_iter, self.meta)
    self.newest_step = info.step

  def stopped(self, info: StepInfo) -> None:
    # due at every stop, so the step's checkpoint exists (saved in this pass or the first)
    self.log(f"received {info.stop_reason}; saved a checkpoint at step {info.step} "
             "and stopped; rerun the same command to continue")


class Profile(Hook):
  """A ``jax.profiler`` trace of steps ``first .. first + steps - 1`` in ``directory``
  (``first`` 0: none); writing it is not step time."""

  def __init__(self, directory: Path, first: int, steps: int, clock: Clock,
               log: Callable[[str], None]):
    self.directory, self.first, self.steps = directory, first, steps
    self.clock, self.log = clock, log

  def before_step(self, step: int) -> None:
    if step == self.first:
      jax.profiler.start_trace(str(self.directory))

  def after_dispatch(self, info: StepInfo) -> None:
    if self.first > 0 and info.step == self.first + self.steps - 1:
      jax.block_until_ready(info.state)
      with self.clock.excluded():
        jax.profiler.stop_trace()
      self.log(f"wrote profile of steps {self.first}..{info.step} to {self.directory}")


class StopOnSignal(Hook):
  """Turns SIGTERM/SIGINT into ``request_stop`` (honoured at the next step boundary)
  while the loop runs; the previous handlers are restored when it ends."""

  def __init__(self, request_stop: Callable[[str], None]):
    self.request_stop = request_stop
    self._previous = {}

  def start(self, info: StepInfo) -> None:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    self.request_stop(signal.Signals(signum).name)

  def close(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
