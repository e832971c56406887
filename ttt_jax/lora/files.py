"""Adapters on disk, and folding them into runs.

An adapter directory holds ``adapter.json`` (the metadata: rank, alpha, targets,
init_std, the adapted weights, the trainable count, the base's model hashes
(``config_hash(model)``, and ``params_hash``: the same without the compute-only keys
such as dtype and remat, which a run may change over the same params), the step and
the tokenizer's sha256) and ``adapters/``, the
adapter tree as an orbax PyTree checkpoint. ``export_adapter`` writes one from an
adapter run (a run trained with ``lora.enabled``: its newest checkpoint's params);
``load_adapter`` reads one, or an adapter run directory directly, and refuses it for a
base with another model config or tokenizer (one line naming both hashes).
``apply_adapter`` folds it into a base's params once (``--adapter`` of ``generate``
and ``evaluate``: the model is merged once and sampled with the same compiled graph).
``merge_run`` writes an ordinary run directory (config with ``lora.enabled: false``,
tokenizer, checkpoint at the adapter run's step with a fresh optimizer state and its
data position) whose params are an adapter run's adapters folded into its base, or an
adapter folded into a run's params (``--adapter``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ttt_jax import checkpoint as ckpt_lib
from ttt_jax import runs
from ttt_jax.config import Config, LoRAConfig, ModelConfig, config_hash, flatten, to_dict
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.errors import CheckpointError, ConfigError
from ttt_jax.lora import adapters as lora
from ttt_jax.training import gates
from ttt_jax.training import state as state_lib
from ttt_jax.training.step import model_params

META_FILE = "adapter.json"
"""The adapter directory's metadata."""
TREE_DIR = "adapters"
"""The adapter directory's orbax checkpoint of the adapter tree."""


def params_hash(model: ModelConfig) -> str:
  """``config_hash`` of the model config without its compute-only keys (dtype, remat,
  ...; ``ModelConfig.compute_only_keys``): the same for every run over the same params,
  as ``checkpoint.init_from`` and resuming compare them."""
  compute_only = model.compute_only_keys()
  return config_hash({k: v for k, v in flatten(to_dict(model)).items()
                      if k not in compute_only})


def metadata(lora_cfg: LoRAConfig, targets: list[lora.Target], *, model: ModelConfig,
             step: int, tokenizer_hash: str | None) -> dict[str, Any]:
  """What ``adapter.json`` records; ``model``: the adapter run's model config."""
  return {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "targets": list(lora_cfg.targets),
          "init_std": lora_cfg.init_std, "adapted": [t.name for t in targets],
          "trainable": lora.trainable_count(targets, lora_cfg.rank),
          "model_config_hash": config_hash(model), "model_params_hash": params_hash(model),
          "step": step, "tokenizer_hash": tokenizer_hash}


def lora_config(meta: dict[str, Any]) -> LoRAConfig:
  """The adapter's settings from its metadata."""
  return LoRAConfig(enabled=True, rank=meta["rank"], alpha=meta["alpha"],
                    targets=tuple(meta["targets"]), init_std=meta["init_std"])


def save_adapter(directory: str | Path, adapters: dict[str, Any], meta: dict[str, Any]) -> Path:
  """Writes the adapter tree and ``adapter.json`` into ``directory`` (a new one)."""
  directory = Path(directory).absolute()
  if directory.exists() and any(directory.iterdir()):
    raise ConfigError(f"{directory}: exists and is not empty; give a new adapter directory")
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(directory / TREE_DIR, adapters)
  (directory / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
  return directory


def _check_base(path: Path, meta: dict[str, Any], base_cfg: Config,
                tokenizer_hash: str | None) -> None:
  """Refuses an adapter trained on another base: one line naming both hashes. The model
  configs compare without their compute-only keys (``params_hash``; an adapter written
  before it recorded that hash compares the whole model config)."""
  key, hash_of = (("model_params_hash", params_hash) if "model_params_hash" in meta else
                  ("model_config_hash", config_hash))
  base_hash = hash_of(base_cfg.model)
  if meta[key] != base_hash:
    raise CheckpointError(f"--adapter {path}: trained on another base model (model hash "
                          f"{meta[key]}, this base's {base_hash})")
  if meta.get("tokenizer_hash") and tokenizer_hash and meta["tokenizer_hash"] != tokenizer_hash:
    raise CheckpointError(f"--adapter {path}: trained with another tokenizer (sha256 "
                          f"{meta['tokenizer_hash'][:12]}..., this base's "
                          f"{tokenizer_hash[:12]}...)")


def _run_adapter(workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
  """(adapters, metadata) of an adapter run's newest checkpoint."""
  cfg, _, restored, _ = runs.restore_newest(workdir, log=lambda _: None)
  if not cfg.lora.enabled:
    raise ConfigError(f"{workdir}: not an adapter run (its lora.enabled is false)")
  targets = lora.find_targets(cfg.lora, restored.state.extras[lora.BASE])
  return restored.state.params, metadata(
      cfg.lora, targets, model=cfg.model, step=restored.step,
      tokenizer_hash=restored.meta.get("tokenizer_hash"))


def load_adapter(path: str | Path, base_cfg: Config, base_params: nnx.State,
                 tokenizer_hash: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
  """(adapters, metadata) of an adapter directory or an adapter run's directory, checked
  against the base (``base_cfg``'s model and ``tokenizer_hash``) it will be folded into."""
  path = Path(path)
  if (path / META_FILE).is_file():
    meta = json.loads((path / META_FILE).read_text())
    _check_base(path, meta, base_cfg, tokenizer_hash)
    targets = lora.find_targets(lora_config(meta), base_params)
    abstract = jax.eval_shape(lambda: lora.init(lora_config(meta), targets, jax.random.key(0)))
    with ocp.PyTreeCheckpointer() as checkpointer:
      adapters = checkpointer.restore(
          (path / TREE_DIR).absolute(),
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
    return adapters, meta
  if (path / "config.yaml").is_file():
    adapters, meta = _run_adapter(path)
    _check_base(path, meta, base_cfg, tokenizer_hash)
    return adapters, meta
  raise ConfigError(f"--adapter {path}: neither an adapter directory ({META_FILE}) nor a "
                    "run directory")


def apply_adapter(path: str | Path, base_cfg: Config, base_params: nnx.State,
                  tokenizer_hash: str | None, log=print) -> nnx.State:
  """``base_params`` with the adapter at ``path`` folded in (``load_adapter``); logs
  which weights it adapts and its trainable count."""
  adapters, meta = load_adapter(path, base_cfg, base_params, tokenizer_hash)
  cfg = lora_config(meta)
  targets = lora.find_targets(cfg, base_params)
  log(lora.summary_line(cfg, targets) + f" (adapter {path}, step {meta['step']})")
  return jax.jit(lambda base, ab: lora.merge(base, ab, cfg, targets))(base_params, adapters)


def export_adapter(workdir: str | Path, out: str | Path) -> Path:
  """Writes the adapter of the adapter run ``workdir`` (newest checkpoint) into ``out``."""
  adapters, meta = _run_adapter(runs.check_workdir(workdir))
  return save_adapter(out, adapters, meta)


class _DataPosition:
  """A data position carried from one checkpoint to another (grain's restore sets it,
  the save reads it): the iterator state of a non-grain iterator."""

  def __init__(self):
    self.state = None

  def set_state(self, state: bytes | dict[str, Any]) -> None:
    """grain's JSON bytes, or the state rescaled to another process count."""
    self.state = json.loads(state) if isinstance(state, (bytes, str)) else state

  def start_prefetch(self) -> None:
    """Nothing to prefetch: no data is read."""

  def get_state(self) -> Any:
    return self.state


def _folded_extras(cfg: Config, state: state_lib.TrainState) -> dict[str, Any]:
  """The extra trees of an adapter run's merged state: the frozen base and a gated
  block's start (the merged run starts with a fresh optimizer and gating off) dropped,
  and a tree shaped like the adapters (the SDFT teacher, their EMA) folded into the base
  like them, in its own dtype, so it is the params-shaped tree a run without adapters
  has."""
  base, adapters = state.extras.get(lora.BASE), jax.tree.structure(state.params)

  def fold(tree: Any) -> Any:
    dtype = jax.tree.leaves(tree)[0].dtype
    return jax.tree.map(lambda x: x.astype(dtype), lora.merge(base, tree, cfg.lora))

  return {k: fold(v) if base is not None and jax.tree.structure(v) == adapters else v
          for k, v in state.extras.items() if k not in (lora.BASE, gates.GATE)}


def merge_run(workdir: str | Path, out: str | Path, adapter: str | Path | None = None,
              log=print) -> Path:
  """An ordinary run directory at ``out`` whose params are the adapter run ``workdir``'s
  adapters folded into its base (module doc), or with ``adapter`` that adapter folded
  into the run ``workdir``'s params."""
  out = Path(out).absolute()
  if (out / "checkpoints").exists() or (out / "config.yaml").exists():
    raise ConfigError(f"--out {out}: already a run directory; give a new one")
  position = _DataPosition()
  cfg, _, restored, mesh = runs.restore_newest(workdir, log=log, data_iter=position)
  if not cfg.lora.enabled and adapter is None:
    raise ConfigError(f"--workdir {workdir}: not an adapter run (its lora.enabled is false); "
                      "give --adapter to fold an adapter into it")
  merged_cfg = dataclasses.replace(
      cfg, lora=dataclasses.replace(cfg.lora, enabled=False),
      gate=dataclasses.replace(cfg.gate, every=0, probes=""),
      checkpoint=dataclasses.replace(cfg.checkpoint, init_from=""))
  vocab_size = int(restored.meta["vocab_size"])
  extras = _folded_extras(cfg, restored.state)
  _, tx, _, shardings = state_lib.abstract_state(
      merged_cfg, vocab_size, mesh, jax.eval_shape(lambda: extras),
      jax.tree.map(lambda x: x.sharding, extras))
  params = model_params(cfg, restored.state)
  if adapter is not None:
    params = apply_adapter(adapter, cfg, params, restored.meta.get("tokenizer_hash"), log=log)
  state = jax.jit(lambda p: state_lib.TrainState(restored.state.step, p, tx.init(p), extras),
                  out_shardings=shardings)(params)
  runs.prepare_workdir(out)
  tokenizer_path = Path(workdir) / runs.RUN_TOKENIZER
  runs.write_run_files(merged_cfg, out,
                       Tokenizer(tokenizer_path) if tokenizer_path.is_file() else None)
  meta = {k: v for k, v in restored.meta.items() if k != "state_checksums"}
  meta.update(ckpt_lib.run_metadata(merged_cfg, mesh, vocab_size, state, {}))
  ckpt = ckpt_lib.Checkpointer(out / "checkpoints", keep=cfg.checkpoint.keep, async_save=False)
  try:
    ckpt.save(restored.step, state, position, meta)
    ckpt.wait()
  finally:
    ckpt.close()
  log(f"wrote {out}: an ordinary run at step {restored.step} with the adapter folded in")
  return out
