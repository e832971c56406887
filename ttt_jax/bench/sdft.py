"""``bench sdft``: ``python -m ttt_jax.bench sdft --config C [--init-from W] [--set k=v]
[--rounds R] [--steps N]``.

Where an SDFT step's time goes (``ttt_jax/sdft``): the step samples the student's
continuation of its prompts, runs the student's forward and backward along it and the
teacher's forward over the template and the same continuation, then applies the
optimizer update and the teacher's EMA. Each part is compiled as its own program on the
same inputs (one synthetic micro-batch and one continuation sampled from it):

  generate   ``rollout.sample_rollout``: prefill and cached decode of
             ``sdft.max_new_tokens`` tokens for every prompt
  student    the SDFT loss's value and gradient with respect to the trainable params
             (the continuation and the teacher's logits given)
  teacher    the teacher's forward (``sequence_logits`` of ``teacher.model``)
  step       the whole train step (``objective.objective`` in ``jit_train_step``)

and all four are timed in R interleaved rounds (each round: one untimed call after the
switch of program, then ``--steps`` timed ones), so a busy shared CPU slows every part
alike. It reports per part the median and best time, its share of the step, the
remainder of the step the parts do not cover (the optimizer update, the EMA; below
zero where the parts' own noise exceeds it), and generation tokens/s (batch x
max_new_tokens over the generate time). Prompts are uniform random tokens at full
width (``sdft.prompt_width``, ``sdft.teacher_width``) and no token ends a continuation
early, so every row samples exactly ``max_new_tokens``. ``--init-from W``: the params
(with ``lora.enabled``, the frozen base) of the run W, and its tokenizer's vocabulary
and special ids; otherwise a freshly initialised model of ``data.vocab_size``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax import checkpoint as ckpt_lib
from ttt_jax import lora, runs, sharding
from ttt_jax.bench import common
from ttt_jax.compare import table
from ttt_jax.config import Config, to_dict
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.errors import ConfigError, DataError
from ttt_jax.inference import rollout, sampling
from ttt_jax.sdft import objective, teacher
from ttt_jax.training import step as step_lib
from ttt_jax.training.state import Built, TrainState, build

PARTS = ("generate", "student", "teacher", "step")
"""The timed programs, in the order of the summary (``step`` is the whole train step)."""


def sdft_config(cfg: Config) -> Config:
  """``cfg`` training the SDFT objective."""
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, objective="sdft"))


def synthetic_batch(cfg: Config, vocab_size: int, rng: np.random.Generator
                    ) -> dict[str, np.ndarray]:
  """An SDFT micro-batch of uniform random tokens in [3, vocab) at full widths (above
  the usual special ids), no slot replayed."""
  s = cfg.sdft
  batch = cfg.train.batch_size // cfg.optim.grad_accum_steps // jax.process_count()
  return {"prompt": rng.integers(3, vocab_size, (batch, s.prompt_width), np.int32),
          "prompt_lens": np.full(batch, s.prompt_width, np.int32),
          "teacher_prompt": rng.integers(3, vocab_size, (batch, s.teacher_width), np.int32),
          "teacher_lens": np.full(batch, s.teacher_width, np.int32),
          "replay": np.zeros(batch, np.float32)}


def _source(init_from: str | None, cfg: Config
            ) -> tuple[int, objective.TokenIds, tuple[sampling.DecodeInputs, ...]]:
  """(vocab size, special ids, decode inputs): the run ``init_from``'s tokenizer's,
  else the config's vocabulary with no special id (nothing forbidden, no EOS) and no
  tokenizer."""
  if not init_from:
    try:
      inputs = sampling.decode_inputs(cfg, None)
    except DataError as error:  # e.g. CCT's semantic steps read the tokenizer's pieces
      raise ConfigError(f"--init-from: this config decodes with the tokenizer of a run "
                        f"({error}); give --init-from W") from None
    return cfg.data.vocab_size, objective.TokenIds(-1, -1, -1), inputs
  path = Path(init_from)
  run = path if (path / runs.RUN_TOKENIZER).is_file() else ckpt_lib.resolve_source(path)[0].parent
  if not (run / runs.RUN_TOKENIZER).is_file():
    raise ConfigError(f"--init-from: {init_from} is not a run with a {runs.RUN_TOKENIZER}")
  tokenizer = Tokenizer(run / runs.RUN_TOKENIZER)
  return (tokenizer.vocab_size, objective.token_ids(tokenizer),
          sampling.decode_inputs(cfg, tokenizer))


def _built(cfg: Config, vocab_size: int, mesh: jax.sharding.Mesh, init_from: str | None
           ) -> Built:
  """The SDFT train state (the teacher its params, or ``init_from``'s)."""
  built = build(cfg, vocab_size, mesh, extras_init=teacher.extras_init(cfg),
                extras_shardings=teacher.extras_shardings)
  state = built.state

  def check(meta: dict[str, Any]) -> None:
    runs.check_not_adapter_run(meta, init_from, "--init-from")
    runs.check_compatible(meta, cfg, vocab_size)

  if init_from:
    _, params, _ = ckpt_lib.load_params(
        init_from, ckpt_lib.with_shardings(step_lib.model_tree(cfg, state),
                                           step_lib.model_tree(cfg, built.state_shardings)),
        check=check)
    state = (state._replace(extras={**state.extras, lora.BASE: params}) if cfg.lora.enabled
             else state._replace(params=params))
  built.state = teacher.restart(state, built.state_shardings.extras[teacher.TEACHER])
  return built


def parts(built: Built, ids: objective.TokenIds,
          inputs: tuple[sampling.DecodeInputs, ...] = ()) -> dict[str, Callable[..., Any]]:
  """The jitted parts of the SDFT step (module doc): ``generate(state, batch, rng)``,
  ``student(state, batch, continuation, mask, teacher_logits)`` and
  ``teacher(state, batch, continuation)``; ``inputs``: the run's decode inputs."""
  cfg, graphdef, s = built.cfg, built.graphdef, built.cfg.sdft
  forbid = tuple(i for i in (ids.pad, ids.bos) if 0 <= i)
  eos = ids.eos if ids.eos >= 0 else None

  def student_model(params: Any, state: TrainState) -> Any:
    if cfg.lora.enabled:
      params = lora.merge(state.extras[lora.BASE], params, cfg.lora)
    return nnx.merge(graphdef, params)

  def generate(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array) -> Any:
    return rollout.sample_rollout(
        student_model(state.params, state), batch["prompt"], batch["prompt_lens"],
        s.max_new_tokens, rng, temperature=s.temperature, top_p=s.top_p, eos_id=eos,
        forbid_ids=forbid, inputs=inputs)

  def student(state: TrainState, batch: dict[str, jax.Array], continuation: jax.Array,
              mask: jax.Array, teacher_logits: jax.Array) -> Any:
    def loss(params: Any) -> jax.Array:
      logits = objective.sequence_logits(student_model(params, state), batch["prompt"],
                                         batch["prompt_lens"], continuation, inputs)
      return objective.sdft_loss(logits, teacher_logits, mask, divergence=s.divergence,
                                 beta=s.jsd_beta)

    return jax.value_and_grad(loss)(state.params)

  def teacher_forward(state: TrainState, batch: dict[str, jax.Array],
                      continuation: jax.Array) -> jax.Array:
    model = teacher.model(cfg, student_model(state.params, state), state.extras)
    return objective.sequence_logits(model, batch["teacher_prompt"], batch["teacher_lens"],
                                     continuation, inputs)

  return {"generate": jax.jit(generate), "student": jax.jit(student),
          "teacher": jax.jit(teacher_forward)}


def time_parts(calls: dict[str, Callable[[], Any]], steps: int, rounds: int
               ) -> dict[str, list[float]]:
  """Per name, the times of ``calls[name]()`` over ``rounds`` interleaved rounds of
  ``steps`` timed calls, each round's first call untimed (the switch of program)."""
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      for step in range(steps + 1):
        start = time.perf_counter()
        jax.block_until_ready(call())
        if step:
          times[name].append(time.perf_counter() - start)
  return times


def bench_sdft(cfg: Config, init_from: str | None, steps: int, warmup: int, rounds: int
               ) -> dict:
  """See the module doc."""
  cfg = sdft_config(cfg)
  vocab_size, ids, inputs = _source(init_from, cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  built = _built(cfg, vocab_size, mesh, init_from)
  host = synthetic_batch(cfg, vocab_size, np.random.default_rng(cfg.train.seed))
  batch = sharding.put_batch(host, mesh)
  jitted = parts(built, ids, inputs)
  rng = jax.random.key(cfg.train.seed)
  sample = jitted["generate"](built.state, batch, rng)
  continuation = sample.completion_BxN
  mask = objective.loss_mask(sample.completion_mask_BxN, cfg.sdft.skip_first)
  teacher_logits = jitted["teacher"](built.state, batch, continuation)
  train_step = step_lib.jit_train_step(
      built, objective.objective(cfg, ids, inputs),
      batch_sharding={k: sharding.batch_sharding(mesh, v.ndim) for k, v in host.items()})
  stepped = {"state": jax.tree.map(jnp.copy, built.state)}  # the step donates its own

  def whole_step() -> Any:
    stepped["state"], metrics = train_step(stepped["state"], batch)
    return metrics

  calls = {"generate": lambda: jitted["generate"](built.state, batch, rng),
           "student": lambda: jitted["student"](built.state, batch, continuation, mask,
                                                teacher_logits),
           "teacher": lambda: jitted["teacher"](built.state, batch, continuation),
           "step": whole_step}
  compile_s = {}
  for name, call in calls.items():  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(call())
    compile_s[name] = time.perf_counter() - start
    for _ in range(warmup):
      jax.block_until_ready(call())
  times = time_parts(calls, steps, rounds)
  return {
      "benchmark": "sdft",
      **sdft_summary(times, compile_s, batch=len(host["prompt"]),
                     max_new_tokens=cfg.sdft.max_new_tokens),
      "init_from": init_from or None, "lora": cfg.lora.enabled,
      "steps_per_round": steps, "rounds": rounds, "devices": mesh.devices.size,
      "jax": jax.__version__, "machine": common.machine(processor=True),
      "config": {k: to_dict(getattr(cfg, k)) for k in ("model", "optim", "train", "sdft")},
  }


def sdft_summary(times: dict[str, list[float]], compile_s: dict[str, float], *, batch: int,
                 max_new_tokens: int) -> dict:
  """``bench sdft``'s statistics from each part's timed calls (``PARTS``)."""
  medians = {name: statistics.median(times[name]) for name in PARTS}
  step = medians["step"]
  return {
      "parts": {name: {"time_median_s": medians[name], "time_min_s": min(times[name]),
                       "fraction_of_step": medians[name] / step, "samples": len(times[name]),
                       "first_call_s": compile_s[name]} for name in PARTS},
      "step_time_median_s": step,
      "other_time_s": step - sum(medians[name] for name in PARTS if name != "step"),
      "batch": batch, "max_new_tokens": max_new_tokens,
      "generated_tokens_per_s": batch * max_new_tokens / medians["generate"],
  }


def summary(result: dict) -> list[str]:
  """A table of the parts, then the remainder and the generation rate."""
  columns = ["part", "median s", "best s", "of the step"]
  rows = [[name, f"{p['time_median_s']:.4g}", f"{p['time_min_s']:.4g}",
           f"{100 * p['fraction_of_step']:.0f}%"] for name, p in result["parts"].items()]
  return [f"sdft: batch {result['batch']} x {result['max_new_tokens']} new tokens"
          f"{', lora' if result['lora'] else ''}, {result['rounds']} rounds x "
          f"{result['steps_per_round']} calls",
          table(columns, rows),
          f"step - (generate + student + teacher) = {result['other_time_s']:.4g} s "
          f"(optimizer update, teacher EMA); generation "
          f"{common.human_count(result['generated_tokens_per_s'])} tokens/s"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
  common.add_config_arguments(parser, None)
  parser.add_argument("--init-from", default=None, metavar="W",
                      help="the params (and tokenizer) of the run W; default: a fresh model")
  parser.add_argument("--steps", type=int, default=3, help="timed calls per part and round")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls after compile")


def _run(cfg: Config, args: argparse.Namespace) -> dict:
  return bench_sdft(cfg, args.init_from, args.steps, args.warmup, args.rounds)


BENCH = common.register(common.Bench(
    "sdft", "SDFT step: generate / student / teacher time, generation tokens/s", __doc__,
    _add_arguments, _run, summary,
    counts=(("steps", 1), ("rounds", 1), ("warmup", 0))))
