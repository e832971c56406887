"""SDFT entry point: ``python -m ttt_jax.sdft --config C --workdir W --init-from BASE
--data demos.jsonl [--replay-data earlier.jsonl] [--set k=v]``.

Self-distillation fine-tuning of the run BASE on demonstrations (``sdft`` config
section, ``train.objective='sdft'``): every step the student samples continuations of
its micro-batch's prompts, and trains to match, token by token, the EMA teacher reading
each prompt with its demonstration (``objective``, ``teacher``, ``data``). It is
``python -m ttt_jax.train``'s run with another data stream and step (``train.prepare``,
``build_state``, ``run``): the same workdir files, resume (rerun the same command: the
state, the teacher and the stream position continue bit-exactly), SIGTERM handling,
NaN guard, checkpoints, metrics.jsonl and tensorboard rows (``kl``, ``teacher_gain``,
``gen_len_*``, ``replay_fraction`` beside the loss) and evaluations, which score the
student on the validation split of ``data.corpus`` (language-model loss: what the
fine-tuning forgets). Full fine-tuning, or with ``lora.enabled`` adapters only (the
teacher is then the EMA of the adapters on the same frozen base).

A workdir without checkpoints needs --init-from (or ``checkpoint.init_from``); rerunning
the same command on a workdir with checkpoints resumes it (--init-from is then unused).
``gate.every`` gates blocks of SDFT updates as it does a train run's
(``training.gates``: the anchor holds the teacher too, so a rejected block undoes its
EMA steps as well), each decision a row of metrics.jsonl (``gate_accepted``, ...);
other hooks join the loop through ``sdft``'s ``extra_hooks``. A CCT base is read with the
steps it was trained with (``steps_read``): fixed, or semantic through the run's decode
inputs (``objective``), so the run's ``data.step_*`` settings must be the base's; a base
trained otherwise is refused before anything is prepared, as are rows longer than the
model's summary slots hold (``objective.check_summary_slots``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import jax

from ttt_jax import checkpoint as ckpt_lib
from ttt_jax import runs, sharding
from ttt_jax import train as train_lib
from ttt_jax.config import Config, load_config
from ttt_jax.errors import ConfigError
from ttt_jax.inference import sampling
from ttt_jax.models import lm
from ttt_jax.sdft import data, objective, teacher
from ttt_jax.training import step as step_lib
from ttt_jax.training.state import TrainState

STREAM_FIELDS = ("replay_ratio", "replay_buffer", "prompt_width", "teacher_width",
                 "overlong")
"""``sdft`` fields that fix the SDFT stream, besides the content of its files."""


def stream_identity(cfg: Config, corpus_meta: dict[str, Any]) -> dict[str, Any]:
  """What fixes an SDFT run's stream (saved in each checkpoint; a resume must match):
  the LM run's (the tokenizer, the validation text), the demonstration files' content
  hashes and ``STREAM_FIELDS``, keyed by their config field."""
  s = cfg.sdft
  return {**runs.stream_identity(cfg, corpus_meta), "sdft.data": data.file_hash(s.data),
          "sdft.replay_data": data.file_hash(s.replay_data) if s.replay_data else "",
          **{f"sdft.{name}": getattr(s, name) for name in STREAM_FIELDS}}


def flops_per_step(cfg: Config, vocab_size: int) -> float:
  """Approximate FLOPs of one optimizer step: the student's forward and backward (3x)
  and its sampling (~1x, prefill plus cached decode) over prompt + continuation, and the
  teacher's forward over its prompt + continuation."""
  s, batch = cfg.sdft, cfg.train.batch_size

  def forward(length: int) -> float:
    return lm.forward_flops_per_token(cfg.model, vocab_size, length) * batch * length

  return (4.0 * forward(s.prompt_width + s.max_new_tokens)
          + forward(s.teacher_width + s.max_new_tokens))


def _with_init_from(cfg: Config, source: str) -> Config:
  return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint,
                                                                 init_from=source))


def steps_read(cfg: Config) -> dict[str, Any]:
  """How a model of ``cfg`` reads CCT steps in SDFT, as the settings that fix it: the
  semantic rule's (``cct.decode``), or fixed steps of model.mixer.step_len (whether the
  run said 'fixed' or 'none'); {} for other mixers."""
  if cfg.model.mixer.type != "cct":
    return {}
  data_cfg = cfg.data
  if data_cfg.step_boundaries != "semantic":
    return {"data.step_boundaries": "none"}
  return {"data.step_boundaries": "semantic", "data.step_len": data_cfg.step_len,
          "data.step_min_len": data_cfg.step_min_len}


def check_base_steps(source: str | Path, cfg: Config) -> None:
  """Refuses a base whose CCT steps were cut otherwise than ``cfg`` would read them
  (``steps_read``): the student and teacher would read steps the model was not trained
  with. The line names the settings to give."""
  run = ckpt_lib.resolve_source(source)[0].parent
  try:
    base = load_config(run / "config.yaml", legacy=True)
  except ConfigError:  # no readable config: nothing recorded to check
    return
  trained, read = steps_read(base), steps_read(cfg)
  if base.model.mixer.type == cfg.model.mixer.type and trained != read:
    flags = " ".join(f"--set {name}={value}" for name, value in trained.items())
    raise ConfigError(f"--init-from: {run} was trained with CCT steps "
                      f"{dict(sorted(trained.items()))}, this run reads "
                      f"{dict(sorted(read.items()))}; give {flags}")


def sdft(cfg: Config, workdir: str | Path,
         extra_hooks: train_lib.HookFactory | None = None) -> dict[str, Any]:
  """Runs SDFT (module doc); returns ``train.run``'s summary. ``extra_hooks``: the
  caller's own loop hooks (``train.HookFactory``), whose rows (``writer.write(step,
  {...})``) join the SDFT metrics in metrics.jsonl."""
  if not cfg.sdft.data:
    raise ConfigError("--data: give the demonstrations file (sdft.data)")
  source = cfg.checkpoint.init_from
  resuming = bool(runs.checkpoint_steps(runs.check_workdir(workdir)))
  if not resuming and not source:
    raise ConfigError(f"--init-from: {workdir} has no checkpoint to resume; SDFT fine-tunes "
                      "a trained run: give --init-from BASE")
  s = cfg.sdft
  files = {path: data.read_examples(path) for path in filter(None, (s.data, s.replay_data))}
  if not resuming:
    objective.check_summary_slots(cfg)
    if source:
      check_base_steps(source, cfg)
  if resuming and source:  # rerunning the command that started the run resumes it
    cfg = _with_init_from(cfg, "")
  setup = train_lib.prepare(cfg, workdir)
  if resuming and source:  # kept in the config, as the run's config.yaml has it
    setup.cfg = _with_init_from(setup.cfg, source)
  cfg, corpus, log = setup.cfg, setup.corpus, setup.log
  if corpus.tokenizer is None:
    raise ConfigError("data.tokenizer: SDFT reads its demonstrations with the run's "
                      "tokenizer; this corpus has none (give data.tokenizer)")
  accum = cfg.optim.grad_accum_steps
  encoded = {}
  for path, examples in files.items():
    log(f"sdft: {len(examples)} examples from {path}")
    encoded[path] = data.encode(examples, corpus.tokenizer, s, path, log)
  stream = data.Stream(
      encoded[s.data], encoded[s.replay_data] if s.replay_data else None,
      seed=cfg.train.seed, batch_size=cfg.train.batch_size // accum,
      replay_ratio=s.replay_ratio, replay_buffer=s.replay_buffer,
      process_index=jax.process_index(), process_count=jax.process_count())
  log(f"sdft: divergence {s.divergence}, teacher decay {s.teacher_decay}, replay "
      f"{s.replay_ratio:g} from {s.replay_data or 'the examples already trained on'}")
  built = train_lib.build_state(setup)  # with the teacher (the objective's extras)
  batch_shardings = {name: sharding.batch_sharding(setup.mesh, value.ndim)
                     for name, value in stream.batch(0).items()}
  train_step = step_lib.jit_train_step(
      built, objective.objective(cfg, objective.token_ids(corpus.tokenizer),
                                 sampling.decode_inputs(cfg, corpus.tokenizer)),
      batch_sharding=batch_shardings)

  def started(state: TrainState, start_step: int, resumed: bool) -> TrainState:
    stream.position = start_step * accum  # the stream is a function of the step
    if resumed or cfg.checkpoint.init_from_full:
      return state  # the checkpoint's teacher
    return teacher.restart(state, built.state_shardings.extras[teacher.TEACHER])

  return train_lib.run(setup, built, train_step, stream, train_lib.validation_batches(setup),
                       stream_identity(cfg, corpus.meta),
                       flops_per_step=flops_per_step(cfg, corpus.vocab_size),
                       tokens_per_step=cfg.train.batch_size * s.max_new_tokens,
                       started=started, extra_hooks=extra_hooks)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = train_lib.command_parser(
      "python -m ttt_jax.sdft", __doc__,
      epilog="The sdft section's fields: python -m ttt_jax.config --section sdft.")
  parser.add_argument("--data", metavar="FILE.jsonl", default=None,
                      help="demonstrations: one {\"prompt\": ..., \"demonstration\": ...} "
                           "object a line (sdft.data)")
  parser.add_argument("--replay-data", metavar="FILE.jsonl", default=None,
                      help="an earlier demonstrations file to replay (sdft.replay_data)")
  return train_lib.parse(parser, argv)


def check(cfg: Config) -> None:
  if cfg.train.objective != "sdft":
    raise ConfigError(f"train.objective: python -m ttt_jax.sdft trains 'sdft', got "
                      f"{cfg.train.objective!r}")


def main(argv: list[str] | None = None, reexec: bool = False) -> None:
  """``reexec``: the command line's own call (``train.launch``)."""
  args = parse_args(argv)
  overrides = ["train.objective=sdft", *train_lib.overrides_of(args)]
  if args.data is not None:
    overrides.append(f"sdft.data={args.data}")
  if args.replay_data is not None:
    overrides.append(f"sdft.replay_data={args.replay_data}")
  train_lib.launch(args, overrides, "ttt_jax.sdft", sdft, argv, reexec, check)


if __name__ == "__main__":
  main(reexec=True)
