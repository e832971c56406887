"""Run directories: what a run reads from and writes to its workdir, and what a rerun
must match.

A workdir holds ``config.yaml``, ``config_history/``, ``tokenizer.model``,
``metrics.jsonl``, ``tb/``, ``checkpoints/`` and ``profile/``. Rerunning on a workdir
resumes its newest usable
checkpoint (``restore_or_init``) unless that checkpoint was written by another model
(``check_compatible``), another train state form (``_check_state_signature``) or
another sample stream (``stream_identity``: the sampling settings and the content
hashes of the text and the tokenizer); each refusal is one line naming the field, and
leaves the workdir's files as they were (``write_run_files`` runs after the checks).
A resumed run may change the config: ``resume_changes`` names every changed field on
one line, and the learning-rate change at the resume step when a field the schedule
reads changed (``SCHEDULE_FIELDS``); ``write_run_files`` keeps each replaced
``config.yaml`` in ``config_history/``.
``init_from`` starts a new run from another run's params or whole state, and
``load_trained`` gives the params of a finished run to sampling and evaluation.

Params read token ids as the pieces of the tokenizer they were trained with, so that
tokenizer follows them: ``resolve_init_from`` gives a fine-tuning run its source run's
``tokenizer.model`` before any text is tokenized (and refuses ``--init-from`` on a
workdir that already has checkpoints, which would otherwise resume instead), and
``load_trained`` always reads text with the run's own ``tokenizer.model``, whatever
``data.corpus`` names. An explicit ``data.tokenizer`` that is another model (by content
hash) is refused in one line naming both files.

``run_batches`` builds the run's train stream and validation batches, with the
per-token batch fields its mechanisms annotate: every program reads its data through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import numpy as np

from ttt_jax import checkpoint as ckpt_lib
from ttt_jax import diagnostics, lora, sharding
from ttt_jax.config import (Config, ModelConfig, flatten, load_config, model_from_dict,
                            save_config, to_dict)
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.data import pipeline
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.errors import CheckpointError, ConfigError, TrainingError
from ttt_jax.training import averaging, gates, objectives, optim
from ttt_jax.training.state import Built, TrainState, abstract_extras, abstract_state
from ttt_jax.training.step import model_params, model_tree

STREAM_FIELDS = {"seq_len": "data.seq_len", "seed": "train.seed",
                 "worker_count": "data.worker_count", "shuffle": "data.shuffle",
                 "val_fraction": "data.val_fraction", "corpus_hash": "data.corpus",
                 "tokenizer_hash": "data.tokenizer"}
"""Meta keys that fix the sample stream, and the config field each is named by."""
RUN_TOKENIZER = "tokenizer.model"
"""The file in a workdir holding the tokenizer the run's params read token ids with."""


def check_workdir(workdir: str | Path) -> Path:
  """``workdir`` as a Path; a ``ConfigError`` naming ``--workdir`` when it is empty or
  blank (an unset shell variable), which would otherwise mean the current directory."""
  if not str(workdir).strip():
    raise ConfigError(f"--workdir: empty ({str(workdir)!r}); give a run directory "
                      "(an unset shell variable?)")
  return Path(workdir)


def prepare_workdir(workdir: str | Path) -> Path:
  """Creates ``workdir``; a ``ConfigError`` if it is empty (``check_workdir``), a
  ``TrainingError`` if it cannot be written."""
  workdir = check_workdir(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise TrainingError(f"{workdir}: workdir is not writable ({e.strerror})") from None
  if not os.access(workdir, os.W_OK):
    raise TrainingError(f"{workdir}: workdir is not writable (permission denied)")
  return workdir


SCHEDULE_FIELDS = ("train.steps", "optim.lr", "optim.schedule", "optim.warmup_steps",
                   "optim.min_lr_ratio", "optim.decay_fraction")
"""The fields ``optim.lr_schedule`` reads (and ``optim.adam_lr`` for Muon's AdamW-routed
params): changing one on resume changes the learning rate from there on."""
CONFIG_HISTORY = "config_history"
"""The workdir's folder of replaced configs: ``config.<n>.step<S>.yaml``, the n-th
config replaced, at step S."""


def saved_config(workdir: Path) -> tuple[Config | None, str | None]:
  """(config, None) of the workdir's ``config.yaml``; (None, why) when it cannot be read
  as a config of this version; (None, None) when there is none."""
  path = Path(workdir) / "config.yaml"
  if not path.exists():
    return None, None
  try:
    return load_config(path, legacy=True), None
  except ConfigError as e:
    return None, str(e)


def config_changes(before: Config, after: Config) -> list[tuple[str, Any, Any]]:
  """(dotted key, before, after) of every field that differs, in config order."""
  old, new = flatten(to_dict(before)), flatten(to_dict(after))
  keys = list(new) + [k for k in old if k not in new]
  return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def show_value(value: Any) -> str:
  """A config value as YAML writes it: 0.001, true, null, [a, b], plain strings."""
  if isinstance(value, bool) or value is None:
    return {True: "true", False: "false", None: "null"}[value]
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (list, tuple)):
    return "[" + ", ".join(show_value(v) for v in value) + "]"
  return str(value)


def lr_after(cfg: Config, step: int) -> float:
  """The learning rate of the update after ``step`` under ``cfg``'s schedule."""
  return float(optim.lr_schedule(cfg.optim, cfg.train.steps)(step))


def resume_changes(saved: Config, cfg: Config, step: int) -> list[str]:
  """The lines telling how ``cfg`` differs from the ``saved`` config of the run it
  resumes at ``step``: every changed field, then (when one the schedule reads changed)
  the learning rate of step ``step + 1`` before -> after. None when nothing changed."""
  changes = config_changes(saved, cfg)
  if not changes:
    return []
  lines = ["resume: config changed: " + ", ".join(
      f"{key} {show_value(old)} -> {show_value(new)}" for key, old, new in changes)]
  schedule_fields = SCHEDULE_FIELDS + (("optim.adam_lr",) if cfg.optim.name == "muon" else ())
  reshaping = [key for key, _, _ in changes if key in schedule_fields]
  if reshaping:
    lines.append(f"resume: the learning-rate schedule changes from step {step + 1} on "
                 f"({', '.join(reshaping)}): lr {lr_after(saved, step):.2e} -> "
                 f"{lr_after(cfg, step):.2e}")
  return lines


def report_resume(cfg: Config, workdir: Path, step: int, log: Callable[[str], None]) -> None:
  """Logs ``resume_changes`` against the workdir's ``config.yaml`` (process 0)."""
  if jax.process_index() != 0:
    return
  saved, why = saved_config(workdir)
  if why is not None:
    log(f"resume: the saved config.yaml cannot be compared with this config ({why}); "
        f"it is kept in {CONFIG_HISTORY}/")
  for line in resume_changes(saved, cfg, step) if saved is not None else ():
    log(line)


def _archive_config(workdir: Path, step: int) -> None:
  """Moves ``config.yaml`` to ``config_history/config.<n>.step<step>.yaml``."""
  history = workdir / CONFIG_HISTORY
  history.mkdir(exist_ok=True)
  numbers = [int(m.group(1)) for p in history.iterdir()
             if (m := re.fullmatch(r"config\.(\d+)\.step\d+\.yaml", p.name))]
  os.replace(workdir / "config.yaml",
             history / f"config.{max(numbers, default=0) + 1}.step{step}.yaml")


def write_run_files(cfg: Config, workdir: Path, tokenizer: Tokenizer | None, *,
                    step: int = 0) -> None:
  """``config.yaml`` and ``tokenizer.model`` (process 0), the run starting at ``step``.
  A ``config.yaml`` that holds another config is first moved to ``config_history/``
  (one that loads as this same config is just rewritten). Call it after the resume
  checks: a refused run must leave the workdir's files as they were."""
  if jax.process_index() != 0:
    return
  saved, why = saved_config(workdir)
  if why is not None or saved is not None and saved != cfg:
    _archive_config(workdir, step)
  save_config(cfg, workdir / "config.yaml")
  if tokenizer is not None:
    tokenizer.save(workdir / "tokenizer.model")


def run_batches(cfg: Config, corpus: corpus_lib.Corpus, *, train_batch_size: int | None,
                eval_batch_size: int, eval_batches: int
                ) -> tuple[grain.IterDataset | None, list[dict[str, np.ndarray]]]:
  """This process's train stream of ``train_batch_size`` windows per batch (None when
  not asked for) and its rows of the first ``eval_batches`` validation batches, with
  the batch fields the config asks for (step ids, document segment ids)."""
  pi, pc = jax.process_index(), jax.process_count()
  annotators = pipeline.batch_annotators(cfg, corpus.tokenizer)
  eos_id = corpus_lib.document_eos_id(cfg.data, corpus)  # None unless data.document_mask
  dataset = None
  if train_batch_size is not None:
    dataset = pipeline.train_dataset(
        corpus.train_tokens, seq_len=cfg.data.seq_len, global_batch_size=train_batch_size,
        seed=cfg.train.seed, shuffle=cfg.data.shuffle, process_index=pi, process_count=pc,
        worker_count=cfg.data.worker_count, annotators=annotators, eos_id=eos_id)
  batches = pipeline.eval_batches(
      corpus.val_tokens, seq_len=cfg.data.seq_len, batch_size=eval_batch_size,
      num_batches=eval_batches, process_index=pi, process_count=pc, annotators=annotators,
      eos_id=eos_id)
  return dataset, batches


def stream_identity(cfg: Config, corpus_meta: dict[str, Any]) -> dict[str, Any]:
  """What fixes the run's sample stream: the sampling settings, and the content hashes
  of the text and the tokenizer (``data.Corpus.meta``). Saved in each checkpoint."""
  return {"seq_len": cfg.data.seq_len, "seed": cfg.train.seed,
          "worker_count": cfg.data.worker_count, "shuffle": cfg.data.shuffle,
          "val_fraction": cfg.data.val_fraction,
          "corpus_hash": corpus_meta.get("corpus_hash"),
          "tokenizer_hash": corpus_meta.get("tokenizer_hash")}


def model_changes(saved_model: dict[str, Any], model: ModelConfig) -> list[str]:
  """'model.KEY: saved -> current' for every key of ``model`` but the compute-only ones
  whose value differs in ``saved_model`` (a config's saved ``model`` section)."""
  current = flatten(to_dict(model))
  # a field added to ModelConfig after the checkpoint was written had its default then;
  # a checkpoint from before model slots has its flat model upgraded
  try:
    saved_config = model_from_dict(saved_model)
    saved = flatten(to_dict(saved_config))
    compute_only = model.compute_only_keys() & saved_config.compute_only_keys()
  except ConfigError:
    saved, compute_only = flatten(saved_model), model.compute_only_keys()
  return [f"model.{k}: {saved.get(k)!r} -> {current.get(k)!r}"
          for k in sorted(set(current) | set(saved))
          if k not in compute_only and current.get(k) != saved.get(k)]


def check_compatible(meta: dict[str, Any], cfg: Config, vocab_size: int, *,
                     stream: dict[str, Any] | None = None, state: Any = None,
                     tokenizer_hash: str | None = None) -> None:
  """A checkpoint from another model config cannot be loaded here; one from another
  sample stream than ``stream`` (given when the data position is resumed) cannot be
  resumed; one whose state (``state_signature``, when the meta has it) differs from
  ``state``, the train state to restore, cannot be restored, which otherwise would look
  like damage; params trained with another tokenizer than ``tokenizer_hash`` (given for
  params-only fine-tuning) would read the token ids as other pieces. Keys a checkpoint
  predates are not compared, nor the tokenizer of a packed .bin run read without one
  (its token ids are the same with or without a tokenizer)."""
  what = ", ".join(model_changes(meta.get("model", {}), cfg.model))
  if what or meta.get("vocab_size") != vocab_size:
    if meta.get("vocab_size") != vocab_size:
      what = ", ".join(filter(None, [what, f"vocab_size: {meta.get('vocab_size')} -> {vocab_size}"]))
    raise CheckpointError(
        f"checkpoint in the workdir was written by a different model ({what}); "
        "use a new --workdir or the original config")
  for key, current_value in (stream or {}).items():
    if key == "tokenizer_hash" and None in (meta.get(key), current_value):
      continue  # a packed .bin run read without a tokenizer: the same token ids either way
    if key in meta and meta[key] != current_value:
      field = STREAM_FIELDS.get(key, key)  # a command's own keys are its fields
      what = {"corpus_hash": "other text", "tokenizer_hash": "another tokenizer"}.get(key)
      detail = (f"was read from {what} (sha256 {str(meta[key])[:12]}..., this run's "
                f"{str(current_value)[:12]}...)" if what else
                f"was made with {field}={meta[key]}, this run has {current_value}")
      raise CheckpointError(
          f"{field}: the checkpoint's sample stream {detail}; resume with the original "
          "value or use a new --workdir (--init-from to start from its params)")
  saved_tokenizer = meta.get("tokenizer_hash")
  if tokenizer_hash and saved_tokenizer and saved_tokenizer != tokenizer_hash:
    raise CheckpointError(
        f"data.tokenizer: the params were trained with another tokenizer (sha256 "
        f"{saved_tokenizer[:12]}..., this run's {tokenizer_hash[:12]}...); set "
        "data.tokenizer to the source run's tokenizer.model to fine-tune with it")
  if state is not None and "state_signature" in meta:
    _check_state_signature(meta, cfg, state)


EXTRAS_PREFIX = ".extras["
"""How ``state_signature`` paths of the train state's extra trees begin."""
PARAMS_PREFIX = ".params["
"""How ``state_signature`` paths of the parameters begin."""


def check_not_adapter_run(meta: dict[str, Any], source: Any, field: str) -> None:
  """Refuses, naming ``field``, a checkpoint (its ``meta``) of an adapter run as a
  source of model params: its params are its adapters."""
  if lora.BASE in _extra_names(meta.get("state_signature", {})):
    raise CheckpointError(
        f"{field}: {source} is an adapter run (lora.enabled); fold its adapters into its "
        f"base first (python -m ttt_jax.lora merge --workdir {source} --out DIR) and "
        "start from DIR")


def _extra_names(signature: dict[str, str]) -> list[str]:
  return sorted({path[len(EXTRAS_PREFIX):].split("]")[0].strip("'\"") for path in signature
                 if path.startswith(EXTRAS_PREFIX)})


def _check_state_signature(meta: dict[str, Any], cfg: Config, state: Any) -> None:
  saved, current = meta["state_signature"], ckpt_lib.state_signature(state)
  if saved == current:
    return
  differing = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  # the parameters first: an optimizer state differs with them
  first = next((k for k in differing if k.startswith(PARAMS_PREFIX)), differing[0])
  detail = (f"{first}: {saved.get(first, 'absent')} in the checkpoint, "
            f"{current.get(first, 'absent')} here")
  saved_lora = lora.BASE in _extra_names(saved)
  if saved_lora != (lora.BASE in _extra_names(current)):
    raise CheckpointError(
        f"lora.enabled: the checkpoint was written with lora.enabled={str(saved_lora).lower()}"
        f"; resume with that or use a new --workdir (--init-from to start from its params)")
  if saved_lora and first.startswith(PARAMS_PREFIX):
    raise CheckpointError(f"lora: the checkpoint's adapters differ from this run's ({detail}); "
                          "resume with its lora.rank and lora.targets or use a new --workdir")
  if first.startswith(PARAMS_PREFIX):
    raise CheckpointError(
        f"model: the checkpoint's parameters are laid out differently from this model's "
        f"although its config matches ({detail}): another version of ttt_jax wrote it "
        "(an untied LM head's weight moved from 'head' to 'head.w'); resume it with that "
        "version or use a new --workdir")
  if first.startswith(EXTRAS_PREFIX):
    saved_skip = "skipped_steps" in _extra_names(saved)
    if saved_skip != ("skipped_steps" in _extra_names(current)):
      modes = {True: "'skip'", False: "'stop'"}
      raise CheckpointError(
          f"train.nonfinite: the checkpoint was written with {modes[saved_skip]}, whose "
          f"train state {'has' if saved_skip else 'lacks'} the skipped_steps counter; "
          f"resume with train.nonfinite={modes[saved_skip]} or use a new --workdir "
          "(--init-from to start from its params)")
    raise CheckpointError(
        f"train state extras: the checkpoint has the extra trees {_extra_names(saved)}, "
        f"this run {_extra_names(current)} ({detail}); resume with the settings that "
        "wrote it or use a new --workdir (--init-from to start from its params)")
  old_optim = {**to_dict(type(cfg.optim)()), **meta.get("optim", {})}
  new_optim = to_dict(cfg.optim)
  changed = [f"optim.{k}: {old_optim.get(k)!r} -> {new_optim.get(k)!r}"
             for k in sorted(new_optim) if old_optim.get(k) != new_optim.get(k)]
  cause = ", ".join(changed) if changed else "no optim field changed; another version?"
  raise CheckpointError(
      f"optim: the checkpoint's train state does not fit this run's ({cause}; {detail}); "
      "resume with the original optim settings or use a new --workdir "
      "(--init-from to start from its params)")


def restore_or_init(cfg: Config, built: Built, ckpt: ckpt_lib.Checkpointer, data_iter: Any,
                    stream: dict[str, Any], log: Callable[[str], None]
                    ) -> tuple[TrainState, int, bool]:
  """(state, start step, resumed): the newest usable checkpoint of this run (which also
  moves ``data_iter`` to its position), else ``checkpoint.init_from``'s, else the fresh
  ``built.state`` at step 0. ``resumed``: the run continues its own checkpoint."""
  state = built.state
  restored = ckpt.restore_latest(ckpt_lib.with_shardings(state, built.state_shardings),
                                 data_iter, log=log,
                                 check=lambda meta: check_compatible(
                                     meta, cfg, built.vocab_size, stream=stream, state=state))
  if restored is not None:
    log(f"resumed from checkpoint at step {restored.step}")
    return restored.state, restored.step, True
  if cfg.checkpoint.init_from:
    return (*init_from(cfg, built, data_iter, stream, log), False)
  return state, 0, False


def init_from(cfg: Config, built: Built, data_iter: Any, stream: dict[str, Any],
              log: Callable[[str], None]) -> tuple[TrainState, int]:
  """(state, start step) of a new run initialised from ``cfg.checkpoint.init_from``:
  params only (fresh optimizer, extras and data stream), or with
  ``checkpoint.init_from_full`` the whole state and data position."""
  source, state, vocab_size = cfg.checkpoint.init_from, built.state, built.vocab_size
  if cfg.checkpoint.init_from_full:
    directory, step = ckpt_lib.resolve_source(source)
    other = ckpt_lib.Checkpointer(directory, keep=cfg.checkpoint.keep, async_save=False,
                                  cleanup=False)  # another run's, perhaps training now
    try:
      steps = other.all_steps()
      step = step if step is not None else (steps or [None])[-1]
      if step is None:
        raise CheckpointError(f"{directory}: no complete checkpoint to initialise from")
      with ckpt_lib.reading_source(directory, step, steps):  # its refusals pass through
        check_compatible(other.read_meta(step), cfg, vocab_size, stream=stream, state=state)
        restored = other.restore(step, ckpt_lib.with_shardings(state, built.state_shardings),
                                 data_iter)
    finally:
      other.close()
    log(f"initialised from {directory}/{step}: params, optimizer state and data position")
    return restored.state, restored.step
  def check(meta: dict[str, Any]) -> None:
    check_not_adapter_run(meta, source, "checkpoint.init_from")
    check_compatible(meta, cfg, vocab_size, tokenizer_hash=stream["tokenizer_hash"])

  # with lora.enabled the source's params are the frozen base the adapters train on
  step, params, _ = ckpt_lib.load_params(
      source, ckpt_lib.with_shardings(model_tree(cfg, state),
                                      model_tree(cfg, built.state_shardings)), check=check)
  log(f"initialised params from {source} (step {step}); optimizer and data start fresh")
  if cfg.lora.enabled:
    return state._replace(extras={**state.extras, lora.BASE: params}), 0
  return state._replace(params=params), 0


def checkpoint_steps(workdir: Path) -> list[int]:
  """The steps of the checkpoint directories in ``workdir/checkpoints`` (sorted; a save
  still in progress has another name)."""
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _check_given_tokenizer(given: str, sha256: str, whose: str) -> None:
  """An explicit ``data.tokenizer`` (``given``, or '') must be the model of content hash
  ``sha256``, ``whose`` the params were trained with."""
  if not given:
    return
  other = corpus_lib.load_tokenizer(given)
  if other.sha256 != sha256:
    raise ConfigError(
        f"data.tokenizer: {given} (sha256 {other.sha256[:12]}...) is not {whose} "
        f"(sha256 {sha256[:12]}...), whose token ids the params were trained on; leave "
        "data.tokenizer unset to use it")


def _with_tokenizer(cfg: Config, path: Path, whose: str, given: str) -> Config:
  """``cfg`` reading text with the tokenizer at ``path`` (and its vocab size); ``given``,
  an explicit ``data.tokenizer`` (or ''), must be the same model, compared by content."""
  tokenizer = corpus_lib.load_tokenizer(str(path))
  _check_given_tokenizer(given, tokenizer.sha256, f"{whose} tokenizer {path}")
  data = dataclasses.replace(cfg.data, tokenizer=str(path), vocab_size=tokenizer.vocab_size)
  return dataclasses.replace(cfg, data=data)


def _run_tokenizer(cfg: Config, workdir: Path, given: str, trained_with: str | None
                   ) -> Config:
  """``cfg`` reading text with the run's own ``tokenizer.model``; ``given``: an explicit
  ``data.tokenizer`` override (or ''); ``trained_with``: the tokenizer hash the newest
  checkpoint records (None: a packed .bin run without a tokenizer)."""
  path = workdir / RUN_TOKENIZER
  if path.is_file():
    return _with_tokenizer(cfg, path, "the run's", given)
  if trained_with is None:
    return cfg
  if not given:
    raise ConfigError(f"{path}: missing; the run's params read token ids with its "
                      f"tokenizer (sha256 {trained_with[:12]}...): put it back, or --set "
                      "data.tokenizer to a copy")
  _check_given_tokenizer(given, trained_with, "the run's tokenizer")
  return cfg


def resolve_init_from(cfg: Config, workdir: str | Path) -> Config:
  """The config a training run on ``workdir`` reads its text with, before the corpus is
  prepared. With ``checkpoint.init_from``: the workdir must hold no checkpoint yet, and
  the source run's ``tokenizer.model`` (SRC may be a run, its checkpoints or one step
  directory) replaces the one the run would train, unless ``data.tokenizer`` is given,
  which must then be the same model. Resuming a run that was given a tokenizer (as an
  ``--init-from`` run is) keeps its own ``tokenizer.model`` when ``data.tokenizer`` is
  unset. Otherwise ``cfg`` unchanged."""
  workdir = check_workdir(workdir)
  steps = checkpoint_steps(workdir)
  if not cfg.checkpoint.init_from:
    return _resumed_tokenizer(cfg, workdir) if steps and not cfg.data.tokenizer else cfg
  if steps:
    raise ConfigError(
        f"--init-from: {workdir} already has checkpoints (newest at step {steps[-1]}); "
        "rerun without --init-from (checkpoint.init_from) to resume it, or use a fresh "
        "--workdir")
  source_run = ckpt_lib.resolve_source(cfg.checkpoint.init_from)[0].parent
  if not (source_run / RUN_TOKENIZER).is_file():  # a packed .bin run without one
    return cfg
  return _with_tokenizer(cfg, source_run / RUN_TOKENIZER,
                         f"the --init-from run's ({source_run})", cfg.data.tokenizer)


def _resumed_tokenizer(cfg: Config, workdir: Path) -> Config:
  """``cfg`` with the workdir's own tokenizer when its saved config names one."""
  try:
    saved = load_config(workdir / "config.yaml", legacy=True)
  except ConfigError:  # no (readable) config.yaml: nothing recorded to keep
    return cfg
  if not saved.data.tokenizer or not (workdir / RUN_TOKENIZER).is_file():
    return cfg
  return _with_tokenizer(cfg, workdir / RUN_TOKENIZER, "the run's", "")


def _newest_meta(ckpt: ckpt_lib.Checkpointer, workdir: Path) -> dict[str, Any]:
  """The metadata of the newest checkpoint that has readable metadata (an unreadable one
  is reported and moved aside by ``restore_latest``)."""
  steps = ckpt.all_steps()
  if not steps:
    raise CheckpointError(f"{workdir}: no complete checkpoint to load")
  for step in reversed(steps):
    try:
      return ckpt.read_meta(step)
    except Exception:  # noqa: BLE001 - any read failure: a damaged step
      continue
  raise CheckpointError(f"{workdir}: no checkpoint with readable metadata")


def restore_newest(workdir: str | Path, overrides: list[str] = (), log=print,
                   data_iter: Any | None = None):
  """(config, graphdef, restored train state, mesh) of the newest usable checkpoint in
  ``workdir``, read as ``load_trained`` reads it; ``data_iter`` is moved to its data
  position when given."""
  workdir = check_workdir(workdir)
  if not (workdir / "config.yaml").exists():
    raise ConfigError(f"{workdir}: no config.yaml here; is this a ttt_jax run directory?")
  cfg = load_config(workdir / "config.yaml", overrides, legacy=True)
  saved = load_config(workdir / "config.yaml", legacy=True)
  given = cfg.data.tokenizer if cfg.data.tokenizer != saved.data.tokenizer else ""
  with contextlib.ExitStack() as resources:
    resources.enter_context(diagnostics.library_logs(diagnostics.run_log(workdir)))
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=cfg.checkpoint.keep,
                                 async_save=False, cleanup=False)  # it may be training now
    resources.callback(ckpt.close)
    meta = _newest_meta(ckpt, workdir)
    cfg = _run_tokenizer(cfg, workdir, given, meta.get("tokenizer_hash"))
    vocab_size = int(meta["vocab_size"])
    mesh = sharding.make_mesh(cfg.mesh)
    extras_init, extras_shardings = objectives.build_extras(cfg)  # a teacher, ...
    graphdef, _, abstract, shardings = abstract_state(
        cfg, vocab_size, mesh, abstract_extras(cfg, vocab_size, extras_init), extras_shardings)
    if cfg.gate.every:  # a gated run's state carries its anchor
      abstract, shardings = gates.add_abstract(abstract, shardings, sharding.replicated(mesh))
    restored = ckpt.restore_latest(
        ckpt_lib.with_shardings(abstract, shardings), data_iter, log=log,
        check=lambda meta: check_compatible(meta, cfg, vocab_size, state=abstract))
  if restored is None:
    raise CheckpointError(f"{workdir}: no usable checkpoint")
  return cfg, graphdef, restored, mesh


def load_trained(workdir: str | Path, overrides: list[str] = (), log=print,
                 weights: str = averaging.RAW):
  """(config, graphdef, params, step, mesh) of the newest usable checkpoint in ``workdir``;
  ``weights`` 'ema' / 'swa' gives that average of the params (``averaging.weights``).
  The config reads text with the run's own ``tokenizer.model`` whatever ``data.corpus``
  is; an explicit ``data.tokenizer`` override must be the same model. An adapter run's
  (``lora.enabled``) params are its adapters folded into its base."""
  cfg, graphdef, restored, mesh = restore_newest(workdir, overrides, log)
  params = averaging.weights(restored.state.params, restored.state.opt_state, weights)
  if cfg.lora.enabled:
    params = model_params(cfg, restored.state._replace(params=params))
  return cfg, graphdef, params, restored.step, mesh
