"""One config tree of frozen dataclasses, loaded from YAML and ``--set`` overrides.

Every field carries a docstring (the string literal right below it); ``describe()``
prints them. Loading is strict: an unknown key or a value of the wrong type raises
``ConfigError`` with a one-line message naming the dotted key and close matches.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import inspect
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ttt_jax.errors import ConfigError


def _field_docs(cls: type) -> dict[str, str]:
  """Maps field name -> the string literal written right below the field."""
  try:
    tree = ast.parse(inspect.getsource(cls))
  except (OSError, TypeError):
    return {}
  body = tree.body[0].body
  docs = {}
  for node, nxt in zip(body, body[1:]):
    if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
        and isinstance(nxt.value.value, str)):
      docs[node.target.id] = " ".join(nxt.value.value.split())
  return docs


def _check_choice(section: str, name: str, value: Any, choices: tuple) -> None:
  if value not in choices:
    raise ConfigError(f"{section}.{name}: {value!r} is not one of {list(choices)}")


def _check_positive(section: str, obj: Any, *names: str) -> None:
  for name in names:
    if getattr(obj, name) <= 0:
      raise ConfigError(f"{section}.{name}: must be > 0, got {getattr(obj, name)!r}")


def _check_non_negative(section: str, obj: Any, *names: str) -> None:
  for name in names:
    if getattr(obj, name) < 0:
      raise ConfigError(f"{section}.{name}: must be >= 0, got {getattr(obj, name)!r}")


MIXERS = ("attention", "ttt_linear", "cct")
"""Registered token mixers; later mechanisms append to this in ``models/lm.py``."""
OBJECTIVES = ("lm", "cct")
"""Registered training objectives (``ttt_jax.objectives``)."""
RESIDUALS = ("plain", "mhc")
"""Registered residual schemes."""
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv_proj", "mhc_streams")
MHC_INITS = ("seed", "seed_uniform", "unit_post")
"""Named mHC bias initialisations (defined in ``ttt_jax.models.mhc``)."""
UNSHARDED_AXES = ("streams", "mhc_flat")
"""Logical axes that no mesh rule may map: the mHC stream axis (alone or folded into
the flattened n*D input of phi)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  mixer: str = "attention"
  """Token mixer of every block: 'attention' (causal GQA softmax attention),
  'ttt_linear' (TTT-Linear, a linear inner model trained at test time; ttt_* fields) or
  'cct' (commitment-constrained attention over step summaries; cct_* fields)."""
  residual: str = "plain"
  """Residual scheme around each sublayer: 'plain' (pre-norm x + f(norm(x))) or 'mhc'
  (manifold-constrained hyper-connections over mhc_streams parallel streams)."""
  n_layers: int = 4
  """Number of decoder blocks (stacked and run with a scan)."""
  d_model: int = 256
  """Width of the residual stream."""
  n_heads: int = 4
  """Number of query heads."""
  n_kv_heads: int = 0
  """Number of key/value heads for grouped-query attention; 0 means n_heads."""
  head_dim: int = 0
  """Per-head width; 0 means d_model // n_heads."""
  d_ff: int = 688
  """Hidden width of the SwiGLU MLP."""
  rope_theta: float = 10000.0
  """RoPE base frequency."""
  norm_eps: float = 1e-5
  """Epsilon inside RMSNorm."""
  tie_embeddings: bool = False
  """Use the transposed token embedding as the LM head."""
  init_std: float = 0.02
  """Std of the normal init of matrices; output projections are scaled by 1/sqrt(2*n_layers)."""
  dtype: str = "float32"
  """Compute (activation) dtype: 'float32' or 'bfloat16'. Params stay in param_dtype."""
  param_dtype: str = "float32"
  """Storage dtype of the parameters."""
  remat: str = "none"
  """Rematerialisation of each scanned block: none | full | dots | dots_no_batch |
  save_qkv_proj | mhc_streams (dots_no_batch plus the mHC maps; recomputes every
  n-stream-wide tensor)."""
  attention_impl: str = "xla"
  """Implementation for jax.nn.dot_product_attention: 'xla' or 'cudnn' (GPU only; needs
  mixer=attention and dtype=bfloat16)."""
  scan_layers: bool = True
  """Run the blocks with jax.lax.scan (compile time independent of depth); False unrolls."""
  mhc_streams: int = 4
  """mhc: expansion rate n, the number of parallel residual streams."""
  mhc_alpha_init: float = 0.01
  """mhc: initial value of the gates a_pre, a_post, a_res on the dynamic (phi) terms."""
  mhc_init: str = "seed"
  """mhc: bias init convention: 'seed' (H_pre = H_post = 1/n, H_res ~ identity from
  diagonal +2 / off-diagonal -2 logits), 'seed_uniform' (as seed, H_res uniform 1/n) or
  'unit_post' (as seed, H_post = 1)."""
  mhc_sinkhorn_iters: int = 20
  """mhc: Sinkhorn-Knopp iterations t_max (each a column then a row normalisation)."""
  mhc_sinkhorn_eps: float = 1e-6
  """mhc: epsilon added to the Sinkhorn column/row sums."""
  mhc_logit_clamp: float = 15.0
  """mhc: the H~_pre/H~_post/H~_res logits are clamped to [-c, c] before sigmoid/exp."""
  ttt_backbone: str = "mamba"
  """ttt_linear: 'mamba' (shared Q/K projection, causal depthwise convs for Q and K, output
  gate gelu(x W_g), and a causal conv sublayer before the mixer in every block) or
  'transformer' (separate Q, K, V projections, no convs, no gate)."""
  ttt_mini_batch: int = 16
  """ttt_linear: inner mini-batch size b (anchored mini-batch GD; the last mini-batch of a
  sequence may be shorter)."""
  ttt_base_lr: float = 1.0
  """ttt_linear: eta_base of the inner learning rate eta_j = eta_base*sigmoid(x_j w_lr + b_lr)/head_dim."""
  ttt_remat_group: int = 0
  """ttt_linear: rematerialise the inner scan in groups of this many mini-batches (the
  backward recomputes a group from its carried fast weights); 0 disables."""
  ttt_conv_width: int = 4
  """ttt_linear, mamba backbone: width of the causal depthwise convolutions."""
  cct_d_summary: int = 16
  """cct: width of a commitment summary (d_summary; the guide uses 16-64)."""
  cct_d_bottleneck: int = 0
  """cct: hidden width of the commitment head; 0 means 2 * cct_d_summary."""
  cct_pool: str = "last"
  """cct: commitment head input: 'last' (the step's last token) or 'mean' (its mean)."""
  cct_step_len: int = 50
  """cct: tokens per step when no step ids are given (evaluation without them,
  generation of runs without semantic steps: step = position // S), and the longest step
  working-memory decoding holds (its local K/V buffer; semantic generation needs
  data.step_len <= cct_step_len)."""
  cct_max_steps: int = 0
  """cct: summary slots per training sequence; 0 means one per token (always enough).
  Set it >= the most steps a window can hold: steps beyond it get no summary slot."""

  def __post_init__(self):
    _check_choice("model", "mixer", self.mixer, MIXERS)
    _check_choice("model", "residual", self.residual, RESIDUALS)
    _check_choice("model", "remat", self.remat, REMAT_POLICIES)
    _check_choice("model", "dtype", self.dtype, ("float32", "bfloat16"))
    _check_choice("model", "param_dtype", self.param_dtype, ("float32", "bfloat16"))
    _check_choice("model", "attention_impl", self.attention_impl, ("xla", "cudnn"))
    _check_choice("model", "mhc_init", self.mhc_init, MHC_INITS)
    _check_choice("model", "ttt_backbone", self.ttt_backbone, ("mamba", "transformer"))
    _check_choice("model", "cct_pool", self.cct_pool, ("last", "mean"))
    _check_positive("model", self, "cct_d_summary", "cct_step_len")
    _check_non_negative("model", self, "cct_d_bottleneck", "cct_max_steps", "ttt_remat_group",
                        "head_dim", "n_kv_heads")
    _check_positive("model", self, "ttt_mini_batch", "ttt_base_lr", "ttt_conv_width",
                    "n_layers", "d_model", "n_heads", "d_ff", "rope_theta", "norm_eps",
                    "init_std", "mhc_streams", "mhc_sinkhorn_iters", "mhc_sinkhorn_eps",
                    "mhc_logit_clamp")
    if self.attention_impl == "cudnn" and (self.mixer, self.dtype) != ("attention", "bfloat16"):
      raise ConfigError(f"model.attention_impl: 'cudnn' is the fused kernel of "
                        f"mixer=attention in bfloat16, got mixer={self.mixer!r}, "
                        f"dtype={self.dtype!r}")
    if self.residual == "mhc" and self.mhc_streams < 2:
      raise ConfigError(f"model.mhc_streams: mhc needs at least 2 streams, got "
                        f"{self.mhc_streams} (its init sets H_pre = 1/n through a sigmoid, "
                        f"which has no finite logit at n = 1; use model.residual=plain)")
    if self.head_dim == 0 and self.d_model % self.n_heads:
      raise ConfigError(f"model.n_heads: d_model={self.d_model} is not divisible by "
                        f"n_heads={self.n_heads}; set model.head_dim explicitly")
    if self.dim_per_head % 2:  # every mixer rotates its queries and keys
      raise ConfigError(f"model.head_dim: RoPE needs an even head_dim, got "
                        f"{self.dim_per_head} (d_model={self.d_model}, n_heads={self.n_heads})")
    if self.n_heads % self.kv_heads:
      raise ConfigError(f"model.n_kv_heads: n_heads={self.n_heads} is not a multiple "
                        f"of n_kv_heads={self.kv_heads}")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def cct_bottleneck(self) -> int:
    return self.cct_d_bottleneck or 2 * self.cct_d_summary

  @property
  def ttt_pre_conv(self) -> bool:
    """Blocks run a causal conv sublayer before the mixer (TTT-Linear, mamba backbone)."""
    return self.mixer == "ttt_linear" and self.ttt_backbone == "mamba"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  corpus: tuple[str, ...] = ("stdlib",)
  """'stdlib' (the running Python's standard-library .py files), or paths/globs of
  .txt/.md/.py/... text files, .jsonl files with a 'text' field, or one packed .bin
  token file with a .json sidecar."""
  seq_len: int = 256
  """Tokens per training window (each sample holds seq_len + 1 tokens)."""
  vocab_size: int = 8192
  """Vocabulary size of the trained sentencepiece tokenizer (or of the .bin file)."""
  tokenizer: str = ""
  """Path of an existing sentencepiece .model to load; empty trains one on the train split."""
  val_fraction: float = 0.05
  """Fraction of documents (chosen by a hash of their path) held out for validation."""
  stdlib_include_tests: bool = False
  """Include the stdlib's test/tests packages in the 'stdlib' corpus."""
  tokenizer_max_sentences: int = 300000
  """Lines sampled by sentencepiece when training the tokenizer (keeps it to seconds)."""
  cache_dir: str = ""
  """Cache of trained tokenizers and packed tokens (by content hash); empty means
  $TTT_JAX_CACHE or ~/.cache/ttt_jax."""
  worker_count: int = 0
  """grain worker processes; pinned because element order depends on it."""
  shuffle: bool = True
  """Seeded global shuffle of the training windows."""
  step_boundaries: str = "none"
  """Per-token step ids in every batch ('step_ids', for CCT): 'none', 'fixed' (a boundary
  every step_len tokens of the window) or 'semantic' (sentence ends '. '/'? '/'! ' before
  a capital, paragraph breaks, document ends and <STEP> pieces, found from the
  sentencepiece pieces). Any mode but 'none' adds the user-defined piece <STEP> to a
  trained tokenizer."""
  step_len: int = 50
  """fixed: tokens per step. semantic: the longest step (a boundary is forced after it)."""
  step_min_len: int = 8
  """semantic: the shortest step; a sentence end closer to the step's start is skipped."""
  document_mask: bool = False
  """Per-token document ids in every batch ('segment_ids', int32 [seq_len] of the inputs):
  the id of input token t is the number of EOS tokens among inputs 0..t-1 of its window,
  so ids start at 0 in every window and the EOS belongs to the document it ends. With
  them attention does not cross documents, and TTT fast weights (and the causal convs)
  reset to their learned initial state at each document's first token. The loss is
  unchanged: the target of an EOS input (the next document's first token) stays in it.
  Needs an EOS id: the sentencepiece tokenizer's, or 'eos_id' in a packed .bin's sidecar."""

  def __post_init__(self):
    _check_positive("data", self, "seq_len", "vocab_size", "tokenizer_max_sentences",
                    "step_len", "step_min_len")
    _check_choice("data", "step_boundaries", self.step_boundaries, ("none", "fixed", "semantic"))
    if self.step_min_len > self.step_len:
      raise ConfigError(f"data.step_min_len: {self.step_min_len} exceeds data.step_len="
                        f"{self.step_len}")
    if not self.corpus:
      raise ConfigError("data.corpus: must name at least one source")
    if not 0.0 < self.val_fraction < 1.0:
      raise ConfigError(f"data.val_fraction: must be in (0, 1), got {self.val_fraction}")
    _check_non_negative("data", self, "worker_count")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  name: str = "adamw"
  """Optimizer: adamw | sgd | muon (Muon for hidden matrices, AdamW for the rest)."""
  lr: float = 3e-3
  """Peak learning rate (for Muon: of the Muon-routed matrices)."""
  schedule: str = "cosine"
  """'cosine' (warmup, cosine to min_lr_ratio*lr), 'wsd' (warmup, constant, linear
  warmdown over the last decay_fraction) or 'constant' (warmup then constant)."""
  warmup_steps: int = 100
  """Linear warmup steps from 0 to lr."""
  min_lr_ratio: float = 0.1
  """Final lr as a fraction of peak (cosine floor, wsd end point)."""
  decay_fraction: float = 0.2
  """wsd: fraction of total steps spent in the final linear warmdown."""
  b1: float = 0.9
  """Adam beta1."""
  b2: float = 0.95
  """Adam beta2."""
  eps: float = 1e-8
  """Adam epsilon."""
  weight_decay: float = 0.1
  """Decoupled weight decay; never applied to norms, biases, scalars or 1-D params."""
  momentum: float = 0.9
  """SGD momentum (0 disables); Muon momentum (beta) for Muon params."""
  nesterov: bool = False
  """Nesterov momentum for SGD and Muon."""
  adam_lr: float = 0.0
  """muon: peak lr of the AdamW-routed params (embeddings, head, norms, scalars); 0 means lr."""
  adam_b1: float = 0.9
  """muon: beta1 of the AdamW-routed params."""
  adam_b2: float = 0.95
  """muon: beta2 of the AdamW-routed params."""
  ns_steps: int = 5
  """muon: Newton-Schulz iterations."""
  clip_norm: float = 1.0
  """Global gradient-norm clip; 0 disables."""
  grad_accum_steps: int = 1
  """Micro-batches accumulated per optimizer update (optax.MultiSteps)."""

  def __post_init__(self):
    _check_choice("optim", "name", self.name, ("adamw", "sgd", "muon"))
    _check_choice("optim", "schedule", self.schedule, ("cosine", "wsd", "constant"))
    _check_positive("optim", self, "lr", "grad_accum_steps", "ns_steps")
    _check_non_negative("optim", self, "warmup_steps", "weight_decay", "clip_norm", "adam_lr",
                        "eps")
    for name in ("min_lr_ratio", "decay_fraction", "b1", "b2", "adam_b1", "adam_b2",
                 "momentum"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ConfigError(f"optim.{name}: must be in [0, 1], got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  """Total optimizer steps."""
  seed: int = 0
  """Seed of parameter init, data shuffle and dropout-free sampling."""
  batch_size: int = 8
  """Global batch size in sequences per step (summed over processes and micro-batches)."""
  log_every: int = 10
  """Write train metrics every N steps."""
  eval_every: int = 100
  """Evaluate on the validation split every N steps (and at the last step); 0 disables."""
  peak_flops: float = 0.0
  """Peak FLOP/s per device for MFU; 0 measures a large f32 matmul once at startup."""
  objective: str = "lm"
  """What the step minimises (``ttt_jax.objectives.OBJECTIVES``): 'lm' (next-token
  cross-entropy) or 'cct' (commitment-constrained training: curriculum p_commit and the
  standard/validity/conclusion/sufficiency losses; needs model.mixer='cct')."""
  stop_after: int = 0
  """Stop (saving a checkpoint) after this many steps in this invocation; 0 runs to
  train.steps. The schedule still spans train.steps, so a run of time-limited jobs
  (rerun on the same workdir) equals one uninterrupted run."""
  host_hugepages: bool = True
  """``python -m ttt_jax.train`` / ``ttt_jax.bench`` restart themselves once with glibc's
  ``glibc.malloc.hugetlb=1`` tunable (``ttt_jax.host_memory``), so XLA:CPU's per-step
  temporary buffer is mapped in 2 MiB pages instead of page-faulting in 4 KiB at a time
  every step: quickstart steps ~20% faster on CPU. A no-op off glibc or with THP off in
  the kernel; false runs with the system default."""

  def __post_init__(self):
    _check_positive("train", self, "steps", "batch_size", "log_every")
    _check_choice("train", "objective", self.objective, OBJECTIVES)
    _check_non_negative("train", self, "eval_every", "peak_flops", "stop_after")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  batches: int = 8
  """Validation batches per evaluation (fixed, unshuffled, the same every time)."""
  batch_size: int = 0
  """Sequences per validation batch; 0 means train.batch_size."""

  def __post_init__(self):
    _check_positive("eval", self, "batches")
    _check_non_negative("eval", self, "batch_size")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 0
  """Save a checkpoint every N steps; 0 saves only at the end (and on SIGTERM/SIGINT).
  Rerunning on the same workdir resumes from the newest complete checkpoint."""
  keep: int = 3
  """Keep the last K checkpoints."""
  keep_every: int = 0
  """Also keep every checkpoint whose step is a multiple of M; 0 disables."""
  async_save: bool = True
  """Write checkpoints in the background while training continues."""
  device_snapshot: bool = True
  """With async_save in a single-process run: copy the state on device and start orbax's
  save on a low-priority background thread, so a save costs the step loop only that
  copy. The copy holds one extra params + optimizer state in device memory until its
  host transfer ends; set false where that does not fit, and orbax's save call (with its
  synchronous device-to-host transfer) runs on the training thread instead."""
  compress: bool = True
  """zstd-compress the saved arrays (orbax's default). Trained float32 weights and
  moments shrink only ~11% (quickstart: 26 -> 23 MB), for ~15% of a save's CPU time
  (benchmarks/RESULTS.md), which matters where the step keeps every host core busy;
  checkpoints of either kind restore the same way."""
  init_from: str = ""
  """Start a new run (a workdir without checkpoints) from another run's parameters: its
  run directory, checkpoints directory or one step directory (also ``--init-from``).
  The optimizer, step and data start fresh unless init_from_full."""
  init_from_full: bool = False
  """With init_from: also take the optimizer state, step and data position, branching
  the source run into this workdir (the model and sample stream must match)."""

  def __post_init__(self):
    _check_non_negative("checkpoint", self, "every", "keep_every")
    _check_positive("checkpoint", self, "keep")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = 1
  """Data-parallel axis size; -1 fills the remaining devices."""
  fsdp: int = -1
  """Fully-sharded data-parallel axis size (params and batch sharded); -1 fills."""
  tensor: int = 1
  """Tensor-parallel axis size (heads / mlp / vocab sharded); -1 fills."""
  num_devices: int = 0
  """Devices the mesh spans; 0 means all of them. A smaller number uses the first N
  devices (single-process runs only), e.g. 1 to reproduce a one-device run."""
  rules: tuple[tuple[str, str], ...] = (
      ("batch", "data+fsdp"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("vocab", "tensor"),
      ("fast", "fsdp"),
  )
  """Logical axis -> mesh axes ('+'-joined, or '' for replicated). Logical axes not
  listed (layers, head_dim, norm, ...) are replicated. 'fast' is the output axis of
  TTT's learned initial fast weights W0 [H, K, K] and b0 [H, K]."""

  def __post_init__(self):
    sizes = (self.data, self.fsdp, self.tensor)
    _check_non_negative("mesh", self, "num_devices")
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
      raise ConfigError(f"mesh: sizes must be positive or a single -1, got "
                        f"data={self.data} fsdp={self.fsdp} tensor={self.tensor}")
    for logical, mesh_axes in self.rules:
      if logical in UNSHARDED_AXES and mesh_axes:
        raise ConfigError(f"mesh.rules[{logical}]: the mHC stream axis is never sharded; "
                          f"map it to '' or drop the rule")
      for axis in filter(None, mesh_axes.split("+")):
        _check_choice("mesh", f"rules[{logical}]", axis, ("data", "fsdp", "tensor"))


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  progress_bar: bool = True
  """Show a tqdm progress bar on process 0."""
  tensorboard: bool = True
  """Write tensorboardX events under WORKDIR/tb (process 0)."""
  profile_start: int = -1
  """First step of the jax.profiler trace window (into WORKDIR/profile); -1 disables."""
  profile_steps: int = 5
  """Number of steps traced."""

  def __post_init__(self):
    _check_positive("logging", self, "profile_steps")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  """Model architecture."""
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  """Corpus, tokenizer and pipeline."""
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  """Optimizer and learning-rate schedule."""
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  """Training loop."""
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  """Validation."""
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  """Checkpointing."""
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  """Device mesh and sharding rules."""
  logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
  """Logging and profiling."""

  def __post_init__(self):
    if self.train.batch_size % self.optim.grad_accum_steps:
      raise ConfigError(f"optim.grad_accum_steps: train.batch_size={self.train.batch_size} "
                        f"is not divisible by {self.optim.grad_accum_steps}")
    if self.train.objective == "cct" and self.model.mixer != "cct":
      raise ConfigError(f"train.objective: 'cct' needs model.mixer='cct', got "
                        f"{self.model.mixer!r}")
    if (self.model.mixer == "cct" and self.data.step_boundaries == "fixed"
        and self.data.step_len != self.model.cct_step_len):
      raise ConfigError(f"data.step_len: fixed steps of {self.data.step_len} tokens differ from "
                        f"model.cct_step_len={self.model.cct_step_len}, the decode step length")


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, tp: Any, value: Any) -> Any:
  """Checks ``value`` against annotation ``tp``; returns it converted (lists -> tuples)."""
  origin = typing.get_origin(tp)
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, dict):
      raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return _build(tp, value, key)
  if origin in (typing.Union, types.UnionType):
    errors = []
    for arg in typing.get_args(tp):
      if arg is type(None):
        if value is None:
          return None
        continue
      try:
        return _coerce(key, arg, value)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{key}: expected {_type_name(tp)}")
  if origin is Literal:
    if value not in typing.get_args(tp):
      raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
    return value
  if origin is tuple:
    args = typing.get_args(tp)
    if isinstance(value, str) and args[-1] is Ellipsis:
      value = [value]  # a single string for a list-of-strings field
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
    if args[-1] is Ellipsis:
      return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
    if len(value) != len(args):
      raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
    return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise ConfigError(f"{key}: expected true/false, got {value!r}")
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
      try:
        return float(value)
      except ValueError:
        pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")
  if tp is str:
    if isinstance(value, str):
      return value
    raise ConfigError(f"{key}: expected a string, got {value!r}")
  raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  kwargs = {}
  for name, value in values.items():
    key = f"{prefix}.{name}" if prefix else str(name)
    if name not in names:
      close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
      dot = f"{prefix}." if prefix else ""
      hint = f"; did you mean {', '.join(dot + c for c in close)}?" if close else ""
      raise ConfigError(f"unknown config key '{key}'{hint}")
    kwargs[name] = _coerce(key, hints[name], value)
  try:
    return cls(**kwargs)
  except TypeError as e:  # pragma: no cover - dataclass signature mismatch
    raise ConfigError(f"{prefix or 'config'}: {e}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
  parts = dotted.split(".")
  node = tree
  for part in parts[:-1]:
    child = node.setdefault(part, {})
    if not isinstance(child, dict):
      raise ConfigError(f"--set {dotted}: '{part}' is not a section")
    node = child
  node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
  """Splits ``a.b=value``; the value is parsed as a YAML scalar/list."""
  if "=" not in text:
    raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=100")
  key, raw = text.split("=", 1)
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError:
    value = raw
  return key.strip(), value


def to_dict(cfg: Any) -> Any:
  """Config -> plain dict/list/scalars (tuples become lists)."""
  if dataclasses.is_dataclass(cfg):
    return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
  if isinstance(cfg, tuple):
    return [to_dict(v) for v in cfg]
  return cfg


def from_dict(values: dict) -> Config:
  if not isinstance(values, dict):
    raise ConfigError(f"config: expected a mapping at the top level, got {type(values).__name__}")
  return _build(Config, values)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
  """Reads a YAML file (optional), applies ``a.b=value`` overrides, validates."""
  values: dict = {}
  if path is not None:
    path = Path(path)
    try:
      text = path.read_text()
    except OSError as e:
      raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
      loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
      line = getattr(getattr(e, "problem_mark", None), "line", None)
      where = f" line {line + 1}" if line is not None else ""
      raise ConfigError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    if loaded is not None and not isinstance(loaded, dict):
      raise ConfigError(f"{path}: expected a mapping at the top level")
    values = loaded or {}
  for override in overrides:
    key, value = parse_override(override)
    _set_dotted(values, key, value)
  return from_dict(values)


def save_config(cfg: Config, path: str | Path) -> None:
  """Writes ``cfg`` as YAML, atomically (a crash never leaves a half-written file)."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
  os.replace(tmp, path)


def config_hash(cfg: Any) -> str:
  """Stable short hash of a (sub)config, for checkpoint metadata and caches."""
  blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def describe(cls: type = Config, prefix: str = "") -> list[str]:
  """Lines 'key (type, default): doc' for every field, recursively."""
  lines = []
  docs = _field_docs(cls)
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    key = f"{prefix}{f.name}"
    if dataclasses.is_dataclass(hints[f.name]):
      lines.extend(describe(hints[f.name], key + "."))
    else:
      default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
      lines.append(f"{key} ({_type_name(hints[f.name])}, default {to_dict(default)!r}): "
                   f"{docs.get(f.name, '')}")
  return lines
