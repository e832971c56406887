"""Run directories: the workdir, the checks a resumed or fine-tuned run must pass, the
tokenizer a fine-tuning run reads its text with, and the refusals' one-line messages."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from ttt_jax import checkpoint as ckpt_lib
from ttt_jax import runs, sharding, train
from ttt_jax.config import MeshConfig, load_config
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.data.tokenizer import train_tokenizer
from ttt_jax.errors import CheckpointError, ConfigError, TrainingError
from ttt_jax.training.state import abstract_state
from data_util import write_stdlib_sample
from train_util import copy_stdlib_corpus, tiny_config


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(TrainingError, match="workdir is not writable"):
    runs.prepare_workdir(blocker / "run")
  assert runs.prepare_workdir(tmp_path / "a" / "b").is_dir()


def test_check_compatible_allows_new_fields_and_compute_choices():
  cfg = load_config(None, ["model.d_model=64"])
  mesh = sharding.make_mesh(MeshConfig(num_devices=1, fsdp=1))
  state = abstract_state(cfg, 512, mesh)[2]
  text = {"corpus_hash": "ab" * 32, "tokenizer_hash": "cd" * 32}
  stream = lambda c, **other: runs.stream_identity(c, {**text, **other})
  meta = ckpt_lib.run_metadata(cfg, mesh, 512, state, stream(cfg))
  del meta["model"]["rope_theta"]  # written before the field existed: had the default
  del meta["shuffle"]  # likewise: not compared
  runs.check_compatible(meta, cfg, 512, stream=stream(cfg))
  runs.check_compatible(meta, load_config(None, ["model.d_model=64", "model.remat=full"]), 512)
  with pytest.raises(CheckpointError, match="model.rope_theta: 10000.0 -> 500.0"):
    runs.check_compatible(meta, load_config(None, ["model.d_model=64",
                                                    "model.rope_theta=500"]), 512)
  reseeded = load_config(None, ["model.d_model=64", "train.seed=3"])
  with pytest.raises(CheckpointError, match="train.seed: the checkpoint's sample"):
    runs.check_compatible(meta, reseeded, 512, stream=stream(reseeded))
  runs.check_compatible(meta, reseeded, 512)  # params only: the stream is not compared
  with pytest.raises(CheckpointError,
                     match=r"data.corpus: the checkpoint's sample stream was read from other "
                           r"text \(sha256 abababababab..., this run's efefefefefef...\)"):
    runs.check_compatible(meta, cfg, 512, stream=stream(cfg, corpus_hash="ef" * 32))
  with pytest.raises(CheckpointError, match=r"data.tokenizer: .* another tokenizer"):
    runs.check_compatible(meta, cfg, 512, stream=stream(cfg, tokenizer_hash="00" * 32))
  with pytest.raises(CheckpointError, match=r"data.val_fraction: .*=0.05, this run "
                                                     r"has 0.2"):
    frac = load_config(None, ["model.d_model=64", "data.val_fraction=0.2"])
    runs.check_compatible(meta, frac, 512, stream=stream(frac))
  # the optimizer state's form: momentum 0 drops SGD's trace; another lr keeps the form
  sgd = load_config(None, ["model.d_model=64", "optim.name=sgd"])
  sgd_meta = ckpt_lib.run_metadata(sgd, mesh, 512, abstract_state(sgd, 512, mesh)[2],
                                   stream(sgd))
  relaxed = load_config(None, ["model.d_model=64", "optim.name=sgd", "optim.lr=1e-4"])
  runs.check_compatible(sgd_meta, relaxed, 512, state=abstract_state(relaxed, 512, mesh)[2])
  plain = load_config(None, ["model.d_model=64", "optim.name=sgd", "optim.momentum=0"])
  with pytest.raises(CheckpointError, match=r"optim.momentum: 0.9 -> 0.0; "):
    runs.check_compatible(sgd_meta, plain, 512, state=abstract_state(plain, 512, mesh)[2])
  runs.check_compatible(sgd_meta, plain, 512)  # no state given: nothing to compare


def test_a_packed_run_resumes_with_a_tokenizer_added_or_dropped():
  """A packed .bin run without a tokenizer (its stream's tokenizer_hash is None) reads
  the same token ids with one given for bits per byte, and the other way round; a text
  run's tokenizer is compared."""
  cfg = load_config(None, ["model.d_model=64"])
  mesh = sharding.make_mesh(MeshConfig(num_devices=1, fsdp=1))
  state = abstract_state(cfg, 512, mesh)[2]
  packed = {"corpus_hash": "ab" * 32, "tokenizer_hash": None}
  with_tokenizer = {**packed, "tokenizer_hash": "cd" * 32}
  for saved, current in ((packed, with_tokenizer), (with_tokenizer, packed)):
    meta = ckpt_lib.run_metadata(cfg, mesh, 512, state, runs.stream_identity(cfg, saved))
    runs.check_compatible(meta, cfg, 512, stream=runs.stream_identity(cfg, current))
  meta = ckpt_lib.run_metadata(cfg, mesh, 512, state, runs.stream_identity(cfg, with_tokenizer))
  with pytest.raises(CheckpointError, match=r"data.tokenizer: .* another tokenizer"):
    runs.check_compatible(meta, cfg, 512, stream=runs.stream_identity(
        cfg, {**packed, "tokenizer_hash": "00" * 32}))


def test_a_checkpoint_with_other_extra_trees_is_refused_naming_them():
  cfg = load_config(None, ["model.d_model=64"])
  mesh = sharding.make_mesh(MeshConfig(num_devices=1, fsdp=1))
  plain = abstract_state(cfg, 512, mesh)[2]
  ema = {"ema": jax.ShapeDtypeStruct((3,), jnp.float32)}
  with_ema = abstract_state(cfg, 512, mesh, ema, {"ema": sharding.replicated(mesh)})[2]
  meta = ckpt_lib.run_metadata(cfg, mesh, 512, with_ema, {})
  runs.check_compatible(meta, cfg, 512, state=with_ema)
  with pytest.raises(CheckpointError, match=r"train state extras: the checkpoint has the "
                                            r"extra trees \['ema'\], this run \[\] "):
    runs.check_compatible(meta, cfg, 512, state=plain)
  plain_meta = ckpt_lib.run_metadata(cfg, mesh, 512, plain, {})
  with pytest.raises(CheckpointError, match=r"extra trees \[\], this run \['ema'\]"):
    runs.check_compatible(plain_meta, cfg, 512, state=with_ema)


def _tokenizer_file(path: Path, texts: list[str], vocab_size: int) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  train_tokenizer(texts, vocab_size, max_sentences=5000).save(path)
  return path


def test_init_from_reads_text_with_the_source_runs_tokenizer(tmp_path):
  texts = write_stdlib_sample(tmp_path / "text")
  source = tmp_path / "source"
  (source / "checkpoints" / "5" / "state").mkdir(parents=True)
  model = _tokenizer_file(source / "tokenizer.model", texts, 400)
  other = _tokenizer_file(tmp_path / "other.model", texts, 420)
  cfg = load_config(None, ["data.vocab_size=2048"])
  assert runs.resolve_init_from(cfg, tmp_path / "plain") == cfg  # no --init-from
  for form in (source, source / "checkpoints", source / "checkpoints" / "5"):
    tuned = runs.resolve_init_from(
        load_config(None, ["data.vocab_size=2048", f"checkpoint.init_from={form}"]),
        tmp_path / "tuned")
    assert (tuned.data.tokenizer, tuned.data.vocab_size) == (str(model), 400)
  copy = tmp_path / "copy.model"
  copy.write_bytes(model.read_bytes())
  same = load_config(None, [f"checkpoint.init_from={source}", f"data.tokenizer={copy}"])
  assert runs.resolve_init_from(same, tmp_path / "tuned").data.tokenizer == str(model)
  mismatched = load_config(None, [f"checkpoint.init_from={source}", f"data.tokenizer={other}"])
  with pytest.raises(ConfigError, match=rf"^data.tokenizer: {other} \(sha256 .*\) is not the "
                                        rf"--init-from run's \({source}\) tokenizer {model} "):
    runs.resolve_init_from(mismatched, tmp_path / "tuned")
  assert not (tmp_path / "tuned").exists()


def test_init_from_on_a_workdir_with_checkpoints_is_an_error(tmp_path):
  texts = write_stdlib_sample(tmp_path / "text")
  source = tmp_path / "source"
  (source / "checkpoints" / "5" / "state").mkdir(parents=True)
  _tokenizer_file(source / "tokenizer.model", texts, 400)
  workdir = tmp_path / "run"
  for step in ("3", "7", "9.orbax-checkpoint-tmp-1"):  # the last: a save in progress
    (workdir / "checkpoints" / step).mkdir(parents=True)
  cfg = load_config(None, [f"checkpoint.init_from={source}"])
  with pytest.raises(ConfigError, match=rf"^--init-from: {workdir} already has checkpoints "
                                        r"\(newest at step 7\); rerun without --init-from "
                                        r"\(checkpoint.init_from\) to resume it, or use a "
                                        r"fresh --workdir$"):
    runs.resolve_init_from(cfg, workdir)


@pytest.mark.slow
def test_fine_tuning_on_other_text_just_works_and_resumes(tmp_path):
  cache = tmp_path / "cache"
  source_cfg = tiny_config(copy_stdlib_corpus(tmp_path / "src"), cache, "train.steps=2",
                           "train.eval_every=0", "checkpoint.every=2")
  train.train(source_cfg, tmp_path / "source")
  write_stdlib_sample(tmp_path / "other")
  tokenizers = sorted((cache / "tokenizers").iterdir())
  overrides = ("train.steps=4", "train.eval_every=0", "checkpoint.every=2",
               "checkpoint.async_save=false")
  tuned_cfg = tiny_config(str(tmp_path / "other" / "*.py"), cache, *overrides,
                          "train.stop_after=2", f"checkpoint.init_from={tmp_path / 'source'}")
  tuned = train.train(tuned_cfg, tmp_path / "tuned")
  assert (tuned["start_step"], tuned["final_step"]) == (0, 2)
  # the source's tokenizer, taken before the text was read: none trained for the new text
  assert sorted((cache / "tokenizers").iterdir()) == tokenizers
  assert ((tmp_path / "tuned" / "tokenizer.model").read_bytes()
          == (tmp_path / "source" / "tokenizer.model").read_bytes())
  with pytest.raises(ConfigError, match="already has checkpoints \\(newest at step 2\\)"):
    train.train(tuned_cfg, tmp_path / "tuned")
  # rerun without --init-from: resumes, still with the source's tokenizer
  resumed = train.train(tiny_config(str(tmp_path / "other" / "*.py"), cache, *overrides),
                        tmp_path / "tuned")
  assert (resumed["start_step"], resumed["final_step"]) == (2, 4)
  assert sorted((cache / "tokenizers").iterdir()) == tokenizers


def test_replaced_configs_are_kept_in_the_history_and_an_unchanged_one_adds_nothing(
    tmp_path):
  first = load_config(None, ["optim.lr=0.001", "train.steps=300"])
  runs.write_run_files(first, tmp_path, None)
  runs.write_run_files(first, tmp_path, None, step=100)  # a resume without changes
  assert not (tmp_path / runs.CONFIG_HISTORY).exists()
  second = load_config(None, ["optim.lr=0.002", "train.steps=300"])
  runs.write_run_files(second, tmp_path, None, step=300)
  third = load_config(None, ["optim.lr=0.002", "train.steps=600"])
  runs.write_run_files(third, tmp_path, None, step=450)
  runs.write_run_files(third, tmp_path, None, step=500)
  history = tmp_path / runs.CONFIG_HISTORY
  assert sorted(p.name for p in history.iterdir()) == [
      "config.1.step300.yaml", "config.2.step450.yaml"]
  assert load_config(history / "config.1.step300.yaml") == first
  assert load_config(history / "config.2.step450.yaml") == second
  assert load_config(tmp_path / "config.yaml") == third


def test_a_config_yaml_this_version_cannot_read_is_kept_too(tmp_path):
  (tmp_path / "config.yaml").write_text("train: {retired_field: 1}\n")
  runs.write_run_files(load_config(None), tmp_path, None, step=7)
  kept = tmp_path / runs.CONFIG_HISTORY / "config.1.step7.yaml"
  assert kept.read_text() == "train: {retired_field: 1}\n"
  assert load_config(tmp_path / "config.yaml") == load_config(None)
