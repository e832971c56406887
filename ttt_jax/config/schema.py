"""The config tree: frozen dataclasses, one section per concern, one per model slot.

Every field carries a docstring (the string literal right below it); ``describe()``
prints them. Values are validated in ``__post_init__``; a bad one raises
``ConfigError`` naming the dotted key.

The model has slots (``SLOTS``: embedding, mixer, residual, ffn, trunk, head), each
filled by a mechanism chosen by name from its registry (``ttt_jax.registry``). A slot's
section is that mechanism's own frozen dataclass, a ``Section`` whose ``type`` field
names it and whose other fields are the mechanism's settings, documented where the
mechanism is defined::

    model:
      mixer: {type: ttt_linear, mini_batch: 16}
      residual: {type: mhc, streams: 4}

Checks that span sections go through one hook, ``Section.check(cfg)`` (and the
objective's ``check``), called once the whole ``Config`` exists.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from typing import Any, ClassVar

from ttt_jax import registry
from ttt_jax.errors import ConfigError

SLOTS = ("embedding", "mixer", "residual", "ffn", "trunk", "head")
"""The model's slots, in the order a block meets them; each is a ``ModelConfig`` field."""


def field_docs(cls: type) -> dict[str, str]:
  """Maps field name -> the string literal written right below the field, over ``cls``
  and its dataclass bases."""
  docs: dict[str, str] = {}
  for klass in reversed(cls.__mro__):
    if not dataclasses.is_dataclass(klass):
      continue
    try:
      tree = ast.parse(inspect.getsource(klass))
    except (OSError, TypeError):
      continue
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
      if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
          and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
          and isinstance(nxt.value.value, str)):
        docs[node.target.id] = " ".join(nxt.value.value.split())
  return docs


def check_choice(section: str, name: str, value: Any, choices: tuple) -> None:
  if value not in choices:
    raise ConfigError(f"{section}.{name}: {value!r} is not one of {list(choices)}")


def check_positive(section: str, obj: Any, *names: str) -> None:
  for name in names:
    if not getattr(obj, name) > 0:  # NaN too
      raise ConfigError(f"{section}.{name}: must be > 0, got {getattr(obj, name)!r}")


def check_non_negative(section: str, obj: Any, *names: str) -> None:
  for name in names:
    if not getattr(obj, name) >= 0:  # NaN too
      raise ConfigError(f"{section}.{name}: must be >= 0, got {getattr(obj, name)!r}")


@dataclasses.dataclass(frozen=True)
class Section:
  """The config of one model slot: ``type`` names the registered mechanism, the
  subclass's other fields are its settings."""

  type: str
  """The registered name of the mechanism in this slot."""

  COMPUTE_ONLY: ClassVar[tuple[str, ...]] = ()
  """Fields that change how the step computes, not what the parameters are: they may
  differ between a checkpoint and the run that resumes it."""

  def check(self, cfg: Any) -> None:
    """Checks against the rest of the config (``cfg``: the whole ``Config``); raises
    ``ConfigError``. A section with no cross-section constraint keeps this one."""
    del cfg

  def check_platform(self, platform: str) -> None:
    """Raises ``ConfigError`` where this setting cannot run on devices of ``platform``
    ('cpu', 'gpu', 'tpu'); called once the mesh is known."""
    del platform


def default_section(slot: str, name: str) -> Section:
  """The section of the mechanism registered as ``name`` in ``slot``, with its defaults."""
  return registry.SLOTS[slot].get(name).Config()


def _slot_field(slot: str, name: str) -> Any:
  return dataclasses.field(default_factory=lambda: default_section(slot, name),
                           metadata={"slot": slot})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  n_layers: int = 4
  """Number of decoder blocks; their parameters are stacked on a leading 'layers' axis
  that the trunk runs over."""
  d_model: int = 256
  """Width of the residual stream."""
  n_heads: int = 4
  """Number of query heads (every mixer is multi-head)."""
  n_kv_heads: int = 0
  """Number of key/value heads for grouped-query attention; 0 means n_heads."""
  head_dim: int = 0
  """Per-head width; 0 means d_model // n_heads."""
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
  """Rematerialisation of each block, a name in ``registry.REMAT_POLICIES``: none | full |
  dots | dots_no_batch | save_qkv_proj (attention's q/k/v projections) | mhc_streams
  (dots_no_batch plus the mHC maps; recomputes every n-stream-wide tensor)."""
  embedding: Section = _slot_field("embedding", "token")
  """Token embedding slot: 'token' (a [V, D] table)."""
  mixer: Section = _slot_field("mixer", "attention")
  """Token mixer of every block: 'attention' (causal GQA softmax attention),
  'ttt_linear' (TTT-Linear, a linear inner model trained at test time) or 'cct'
  (commitment-constrained attention over step summaries). A bare name is the section
  with its defaults."""
  residual: Section = _slot_field("residual", "plain")
  """Residual scheme around each sublayer: 'plain' (pre-norm x + f(norm(x))) or 'mhc'
  (manifold-constrained hyper-connections over parallel streams)."""
  ffn: Section = _slot_field("ffn", "swiglu")
  """Feed-forward sublayer of every block: 'swiglu'."""
  trunk: Section = _slot_field("trunk", "scan")
  """How the blocks run: 'scan' (jax.lax.scan over the stacked blocks: compile time
  independent of depth) or 'unrolled' (a Python loop over them)."""
  head: Section = _slot_field("head", "linear")
  """Output head: 'linear' (final hidden states to vocabulary logits; E^T when
  tie_embeddings)."""

  def __post_init__(self):
    check_choice("model", "dtype", self.dtype, ("float32", "bfloat16"))
    check_choice("model", "param_dtype", self.param_dtype, ("float32", "bfloat16"))
    check_non_negative("model", self, "head_dim", "n_kv_heads")
    check_positive("model", self, "n_layers", "d_model", "n_heads", "rope_theta", "norm_eps",
                   "init_std")
    registry.REMAT_POLICIES.get(self.remat)
    for slot in SLOTS:
      section = getattr(self, slot)
      expected = registry.SLOTS[slot].get(section.type).Config
      if type(section) is not expected:
        raise ConfigError(f"model.{slot}: a {type(section).__name__} is not the config of "
                          f"the {slot} {section.type!r} ({expected.__name__})")
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

  def compute_only_keys(self) -> frozenset[str]:
    """Dotted keys under ``model`` that may differ between a checkpoint and the run that
    resumes it (``Section.COMPUTE_ONLY`` of every slot, plus dtype and remat)."""
    keys = {"dtype", "remat"}
    for slot in SLOTS:
      keys.update(f"{slot}.{name}" for name in getattr(self, slot).COMPUTE_ONLY)
    return frozenset(keys)


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
    check_positive("data", self, "seq_len", "vocab_size", "tokenizer_max_sentences",
                    "step_len", "step_min_len")
    check_choice("data", "step_boundaries", self.step_boundaries, ("none", "fixed", "semantic"))
    if self.step_min_len > self.step_len:
      raise ConfigError(f"data.step_min_len: {self.step_min_len} exceeds data.step_len="
                        f"{self.step_len}")
    if not self.corpus:
      raise ConfigError("data.corpus: must name at least one source")
    if not 0.0 < self.val_fraction < 1.0:
      raise ConfigError(f"data.val_fraction: must be in (0, 1), got {self.val_fraction}")
    check_non_negative("data", self, "worker_count")


MAX_LR = 1e10
"""The largest learning rate accepted: beyond it, float32 arithmetic on the updates (an
lr of 1e39 is inf in float32) makes every step non-finite."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  name: str = "adamw"
  """Optimizer: adamw | sgd | muon (Muon for hidden matrices, AdamW for the rest)."""
  lr: float = 3e-3
  """Peak learning rate (for Muon: of the Muon-routed matrices); finite and at most
  ``MAX_LR`` (1e10)."""
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
  """muon: peak lr of the AdamW-routed params (embeddings, head, norms, scalars); 0 means lr.
  Finite and at most ``MAX_LR``."""
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
  ema_decay: float = 0.0
  """Exponential moving average of the weights, e_t = d e_{t-1} + (1 - d) p_t once per
  optimizer update from e_0 = the initial params (time constant 1/(1 - d) updates), in
  [0, 1); 0 disables. Kept in float32 in the optimizer state (``training/averaging.py``):
  sharded like the params and checkpointed; ``eval.weights`` scores it."""
  swa_every: int = 0
  """Stochastic weight averaging: a snapshot of the weights every swa_every optimizer
  updates once the lr has fallen to swa_start_lr_ratio x peak, averaged uniformly
  (float32, in the optimizer state; before the first snapshot it follows the weights);
  0 disables."""
  swa_start_lr_ratio: float = 0.2
  """SWA starts at the first update past the warmup whose lr is at most this fraction of
  the peak lr; in (0, 1] and at least the schedule's final ratio (min_lr_ratio; 1 for
  'constant'), else it would never start. The schedule reaches that ratio only after the
  last update, so training refuses a ratio at which no snapshot would be taken
  (``training.optim.check_swa_starts``)."""

  def __post_init__(self):
    check_choice("optim", "name", self.name, ("adamw", "sgd", "muon"))
    check_choice("optim", "schedule", self.schedule, ("cosine", "wsd", "constant"))
    check_positive("optim", self, "lr", "grad_accum_steps", "ns_steps")
    check_non_negative("optim", self, "warmup_steps", "weight_decay", "clip_norm", "adam_lr",
                        "eps", "swa_every")
    for name in ("lr", "adam_lr"):
      if not getattr(self, name) <= MAX_LR:  # inf and NaN too
        raise ConfigError(f"optim.{name}: must be <= {MAX_LR:g} (far outside float32's "
                          f"useful range), got {getattr(self, name)!r}")
    for name in ("min_lr_ratio", "decay_fraction", "b1", "b2", "adam_b1", "adam_b2",
                 "momentum"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ConfigError(f"optim.{name}: must be in [0, 1], got {getattr(self, name)}")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ConfigError(f"optim.ema_decay: must be in [0, 1) (0 disables), got {self.ema_decay}")
    if not 0.0 < self.swa_start_lr_ratio <= 1.0:
      raise ConfigError(f"optim.swa_start_lr_ratio: must be in (0, 1], got "
                        f"{self.swa_start_lr_ratio}")
    final_ratio = 1.0 if self.schedule == "constant" else self.min_lr_ratio
    if self.swa_every and self.swa_start_lr_ratio < final_ratio:
      raise ConfigError(f"optim.swa_start_lr_ratio: {self.swa_start_lr_ratio} is below the "
                        f"{self.schedule} schedule's final lr ratio {final_ratio}, so SWA "
                        "would never start")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  """Total optimizer steps."""
  seed: int = 0
  """Seed of parameter init, data shuffle and the step's randomness (fold_in(key(seed),
  step)): the same seed and config give the same losses on one machine."""
  batch_size: int = 8
  """Global batch size in sequences per step (summed over processes and micro-batches)."""
  log_every: int = 10
  """Write train metrics every N steps."""
  eval_every: int = 100
  """Evaluate on the validation split every N steps (and at the last step); 0 disables."""
  peak_flops: float = 0.0
  """Peak FLOP/s per device for MFU; 0 measures a large f32 matmul once at startup."""
  objective: str = "lm"
  """What the step minimises, a name in ``registry.OBJECTIVES``: 'lm' (next-token
  cross-entropy), 'cct' (commitment-constrained training: curriculum p_commit and the
  standard/validity/conclusion/sufficiency losses; needs model.mixer.type='cct') or
  'sdft' (self-distillation on demonstrations: ``python -m ttt_jax.sdft``)."""
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
  nonfinite: str = "stop"
  """What a step whose loss, gradient norm or updated params/optimizer state is
  non-finite does (the step reports the state's finiteness from one on-device
  reduction, and a checkpoint is never saved from a non-finite state): 'stop' ends the
  run naming the step and the newest checkpoint, which is finite, so a rerun resumes
  from it; 'skip' keeps the params and optimizer state as they were (the step counter
  and the data stream still advance) and counts the step in ``skipped_steps``
  (metrics.jsonl; checkpointed as the train state's extra tree 'skipped_steps', so a
  workdir resumes only with the mode that wrote it). 'skip' needs
  optim.grad_accum_steps=1."""

  def __post_init__(self):
    check_positive("train", self, "steps", "batch_size", "log_every")
    registry.OBJECTIVES.get(self.objective)
    check_non_negative("train", self, "eval_every", "peak_flops", "stop_after")
    check_choice("train", "nonfinite", self.nonfinite, ("stop", "skip"))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  batches: int = 8
  """Validation batches per evaluation (fixed, unshuffled, the same every time)."""
  batch_size: int = 0
  """Sequences per validation batch; 0 means train.batch_size."""
  stride: int = 0
  """Sliding-window evaluation (``evaluate --task lm``; ``ttt_jax.eval.sliding``): over
  the tokens the validation batches cover, a window of data.seq_len tokens starts every
  ``stride`` tokens and scores only its last ``stride`` targets (the first window all of
  its targets), so each target is scored once with at least seq_len - stride tokens of
  context. 0 means data.seq_len: the non-overlapping windows the train loop evaluates.
  At most data.seq_len; cost grows as seq_len / stride."""
  weights: str = "raw"
  """Weights the train loop evaluates: 'raw' (the params: eval_loss, eval_bpb, ...),
  'ema' or 'swa' (the raw ones and that average side by side: ema_eval_loss, ...; needs
  optim.ema_decay / optim.swa_every) or 'all' (raw and every average the run keeps)."""

  def __post_init__(self):
    check_positive("eval", self, "batches")
    check_non_negative("eval", self, "batch_size", "stride")
    check_choice("eval", "weights", self.weights, ("raw", "ema", "swa", "all"))


@dataclasses.dataclass(frozen=True)
class TTTEvalConfig:
  """Legal score-first test-time training at evaluation (``evaluate --task ttt``;
  ``ttt_jax.eval.score_first``): the validation stream is cut into chunks; each chunk's
  sliding windows are scored with the current weights, then (all but the last chunk)
  the weights train on that chunk's tokens. No token is trained on before it is scored;
  the adapted weights are never saved."""

  chunk_tokens: int = 2048
  """Targets per chunk, rounded down to whole scoring batches (stride x eval batch size
  targets each, the first batch seq_len - stride more), at least one batch."""
  epochs: int = 4
  """Passes of SGD over each scored chunk's tokens (0: no adaptation, the sliding
  figure). The defaults of epochs, lr, momentum and cosine are the parameter-golf
  record's score-first settings."""
  lr: float = 0.004
  """SGD learning rate (of the first chunk with ``cosine``)."""
  momentum: float = 0.9
  """SGD momentum in [0, 1); the velocity carries across chunks."""
  cosine: bool = True
  """Decay the learning rate by a cosine over the chunks: lr * (1 + cos(pi * c /
  (chunks - 1))) / 2 for chunk c."""
  grad_clip: float = 1.0
  """Global gradient-norm clip of each SGD step; 0 disables."""
  params: str = "all"
  """Which parameters adapt: 'all', 'matrices' (the optimizer's 'matrix' group: hidden
  weight matrices, not embeddings, norms, biases or gates) or a regular expression
  searched in each parameter's '/'-joined path (e.g. 'blocks/mlp/')."""
  stride: int = 0
  """Sliding-window stride of the scoring; 0 means eval.stride (whose 0 is
  data.seq_len). At most data.seq_len."""
  max_tokens: int = 0
  """Tokens of the validation split evaluated, from its start; 0 means the tokens the
  validation batches cover (eval.batches x batch x seq_len + 1, as ``--task lm``)."""

  def __post_init__(self):
    check_positive("ttt_eval", self, "chunk_tokens")
    check_non_negative("ttt_eval", self, "epochs", "lr", "grad_clip", "stride",
                       "max_tokens")
    if not 0.0 <= self.momentum < 1.0:
      raise ConfigError(f"ttt_eval.momentum: must be in [0, 1), got {self.momentum!r}")
    if not self.lr <= MAX_LR:
      raise ConfigError(f"ttt_eval.lr: must be <= {MAX_LR:g}, got {self.lr!r}")
    if self.params not in ("all", "matrices"):
      try:
        re.compile(self.params)
      except re.error as e:
        raise ConfigError(f"ttt_eval.params: {self.params!r} is neither 'all', 'matrices' "
                          f"nor a regular expression ({e})") from None


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
    check_non_negative("checkpoint", self, "every", "keep_every")
    check_positive("checkpoint", self, "keep")


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
    check_non_negative("mesh", self, "num_devices")
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
      raise ConfigError(f"mesh: sizes must be positive or a single -1, got "
                        f"data={self.data} fsdp={self.fsdp} tensor={self.tensor}")
    for logical, mesh_axes in self.rules:
      if mesh_axes and logical in registry.LOGICAL_AXES:
        axis = registry.LOGICAL_AXES.get(logical)
        if not axis.shardable:
          raise ConfigError(f"mesh.rules[{logical}]: {axis.doc} is never sharded; map it "
                            f"to '' or drop the rule")
      for axis in filter(None, mesh_axes.split("+")):
        check_choice("mesh", f"rules[{logical}]", axis, ("data", "fsdp", "tensor"))


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  progress_bar: bool = True
  """Show a tqdm progress bar on process 0, from the first step on (set-up messages
  come before it, on lines of their own); off where ``plain`` prints lines instead."""
  plain: str = "auto"
  """Plain progress lines on stderr every ``train.log_every`` steps (step, loss, lr,
  grad norm, tokens/s, MFU, ETA), readable in a log file: 'auto' when stderr is not a
  terminal (a cluster job's log; the bar is then off) or the bar is off, 'always'
  (under the bar on a terminal), 'never'."""
  tensorboard: bool = True
  """Write tensorboardX events under WORKDIR/tb (process 0)."""
  profile_start: int = -1
  """First step of the jax.profiler trace window (into WORKDIR/profile); -1 disables."""
  profile_steps: int = 5
  """Number of steps traced."""

  def __post_init__(self):
    check_positive("logging", self, "profile_steps")
    check_choice("logging", "plain", self.plain, ("auto", "always", "never"))


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  qat_lr_ratio: float = 0.0
  """Late quantization-aware training (``ttt_jax.quant``): once past the warmup, the
  first optimizer step whose learning rate is below qat_lr_ratio * optim.lr, and every
  step after it, runs the forward pass on fake-quantized matrices (per-row symmetric,
  qat_bits, clip = the row's max |w|; straight-through gradient). 0 = off. A schedule
  that never falls below the ratio ('constant', or a floor optim.min_lr_ratio at or
  above it) never switches it on."""
  qat_bits: int = 6
  """Bits of the fake-quantized matrices (2..8): values in [-(2^(bits-1) - 1),
  2^(bits-1) - 1], as ``python -m ttt_jax.export --bits-matrix`` stores them."""
  gptq: bool = False
  """Export (``python -m ttt_jax.export``, ``--gptq``) with GPTQ codes (``ttt_jax.gptq``):
  each matrix's int codes chosen on calibration inputs, same scales and format."""
  calib_seqs: int = 64
  """GPTQ's calibration: sequences sampled from the model itself (``--calib-seqs``)."""
  calib_len: int = 0
  """Their length in tokens (``--calib-len``); 0 = data.seq_len."""
  calib_seed: int = 0
  """The seed of their sampling (``--calib-seed``)."""
  gptq_damp: float = 0.01
  """GPTQ's damping: this fraction of mean(diag(H)) added to diag(H)."""
  gptq_act_order: bool = True
  """GPTQ quantizes the inputs by descending diag(H) (else in index order)."""

  def __post_init__(self):
    check_positive("quant", self, "calib_seqs")
    check_non_negative("quant", self, "calib_len", "gptq_damp")
    if self.calib_len == 1:
      raise ConfigError("quant.calib_len: must be 0 (data.seq_len) or >= 2, got 1")
    if not 0.0 <= self.qat_lr_ratio <= 1.0:
      raise ConfigError(f"quant.qat_lr_ratio: must be in [0, 1], got {self.qat_lr_ratio}")
    if not 2 <= self.qat_bits <= 8:
      raise ConfigError(f"quant.qat_bits: must be in [2, 8], got {self.qat_bits}")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  enabled: bool = False
  """Train low-rank adapters on a frozen base instead of the params (``ttt_jax.lora``):
  each targeted weight W becomes W + (alpha / rank) * A @ B. The train state's params
  are the adapters (AdamW with optim.lr and its schedule, weight decay 0, never Muon),
  the base lives in its extras; start from a trained run with --init-from BASE."""
  rank: int = 16
  """r: the inner dimension of A [batch..., in, r] and B [batch..., r, out]."""
  alpha: float = 32.0
  """The adapter's scale is alpha / rank."""
  targets: tuple[str, ...] = (r"mixer/(wq|wk|wv|wo)$", r"mlp/(w_gate|w_up|w_down)$")
  """Regular expressions searched in each weight's '/'-joined path (e.g.
  'blocks/mixer/wq'); every weight matrix a pattern matches gets an adapter. Defaults:
  the mixer's q/k/v/o projections (attention, TTT-Linear, CCT) and the FFN's three."""
  init_std: float = 0.02
  """A ~ N(0, init_std^2); B = 0, so a fresh adapter leaves the model unchanged."""

  def __post_init__(self):
    check_positive("lora", self, "rank", "alpha")
    check_non_negative("lora", self, "init_std")
    if not self.targets:
      raise ConfigError("lora.targets: must name at least one pattern")
    for pattern in self.targets:
      try:
        re.compile(pattern)
      except re.error as error:
        raise ConfigError(f"lora.targets: {pattern!r} is not a regular expression ({error})"
                          ) from None


SDFT_DIVERGENCES = ("reverse", "forward", "jsd")
"""``sdft.divergence``: KL(student || teacher), KL(teacher || student), or the
generalized JSD between them (``ttt_jax.sdft.objective``)."""


@dataclasses.dataclass(frozen=True)
class SDFTConfig:
  data: str = ""
  """Demonstrations to learn from (``python -m ttt_jax.sdft --data``): a .jsonl file, one
  object a line with string fields 'prompt' and 'demonstration' (other fields are
  ignored)."""
  replay_data: str = ""
  """Replay buffer source: an earlier demonstrations file (same format; its last
  replay_buffer examples). Empty: the examples of this run's own stream already trained
  on (the last replay_buffer of them before the step)."""
  replay_ratio: float = 0.2
  """Probability that a batch slot holds a replayed example instead of the stream's next
  one, in [0, 1); drawn per (train.seed, micro-step, slot), so a resumed run draws the
  same examples."""
  replay_buffer: int = 50000
  """Cap of the replay buffer in examples (> 0)."""
  divergence: str = "reverse"
  """Per-token divergence along the student's continuation, over the full vocabulary:
  'reverse' KL(p_student || p_teacher) (the SDFT objective), 'forward' KL(p_teacher ||
  p_student), or 'jsd' (the generalized JSD with jsd_beta)."""
  jsd_beta: float = 0.5
  """jsd: beta in [0, 1]; 0 is forward KL, 1 reverse KL, 0.5 the symmetric JSD."""
  teacher_decay: float = 0.99
  """EMA decay of the teacher, t_k = d t_{k-1} + (1 - d) theta_k after every optimizer
  step, in [0, 1]. The official SDFT code uses 0.99 (the default); the design notes
  suggest 0.999 (slower teacher). 1 keeps the teacher frozen at the initial model."""
  temperature: float = 1.0
  """Sampling temperature of the student's continuation (> 0: on-policy samples)."""
  top_p: float = 1.0
  """Nucleus sampling threshold of the continuation, in (0, 1]; 1 samples the full
  distribution."""
  max_new_tokens: int = 64
  """Tokens sampled per continuation (it ends early at EOS, which it includes)."""
  prompt_width: int = 128
  """Student prompt tokens (left-padded to this width)."""
  teacher_width: int = 256
  """Teacher prompt tokens (the template with the prompt and the demonstration,
  left-padded to this width)."""
  overlong: str = "truncate"
  """A prompt longer than its width: 'truncate' keeps its last tokens (the ones next to
  the continuation; the count is logged) or 'error' refuses the file naming the line."""
  skip_first: int = 0
  """Leave the first k continuation tokens out of the loss (they still condition the
  rest)."""

  def __post_init__(self):
    check_choice("sdft", "divergence", self.divergence, SDFT_DIVERGENCES)
    check_choice("sdft", "overlong", self.overlong, ("truncate", "error"))
    check_positive("sdft", self, "replay_buffer", "temperature", "max_new_tokens",
                   "prompt_width", "teacher_width")
    check_non_negative("sdft", self, "skip_first")
    for name, low, high, closed in (("replay_ratio", 0.0, 1.0, False),
                                    ("jsd_beta", 0.0, 1.0, True),
                                    ("teacher_decay", 0.0, 1.0, True)):
      value = getattr(self, name)
      if not (low <= value <= high if closed else low <= value < high):
        raise ConfigError(f"sdft.{name}: must be in [{low:g}, {high:g}{']' if closed else ')'}"
                          f", got {value!r}")
    if not 0.0 < self.top_p <= 1.0:
      raise ConfigError(f"sdft.top_p: must be in (0, 1], got {self.top_p!r}")
    if self.skip_first >= self.max_new_tokens:
      raise ConfigError(f"sdft.skip_first: {self.skip_first} leaves none of "
                        f"sdft.max_new_tokens={self.max_new_tokens} tokens in the loss")


@dataclasses.dataclass(frozen=True)
class GateConfig:
  """Gated update blocks (``ttt_jax.training.gates``): every ``every`` optimizer steps
  form a block, scored before and after on the run's fixed validation batches (eval
  loss) and the probes of ``probes``; a block that regresses past a threshold is undone
  (params, optimizer state and every extra tree back to the block's start, bit for bit)
  while the step counter and the data stream go on. The thresholds' defaults are our
  choice (no source gives any). The state then carries the block's start as an extra
  tree: one more params + optimizer state in memory and in every checkpoint, so a run
  resumes with gating on or off as it started (--init-from takes the params across)."""

  every: int = 0
  """Optimizer steps per block; 0 = off. The run's last step ends a block too."""
  probes: str = ""
  """A probes file (jsonl, ``ttt_jax.eval.probes``) scored with the eval loss; empty:
  the eval loss alone."""
  max_eval_loss_increase: float = 0.02
  """A block whose validation loss rises by more than this (nats per token) is undone."""
  max_probe_pass_drop: float = 0.0
  """... whose pass rate over the regex and substring probes falls by more than this
  (a fraction, 0..1; 0: no block may lose a passing probe on balance)."""
  max_logprob_drop: float = 0.05
  """... whose mean per-token log-probability over the logprob probes falls by more
  than this (nats)."""

  def __post_init__(self):
    check_non_negative("gate", self, "every", "max_eval_loss_increase", "max_logprob_drop")
    if not 0.0 <= self.max_probe_pass_drop <= 1.0:
      raise ConfigError(f"gate.max_probe_pass_drop: must be in [0, 1], got "
                        f"{self.max_probe_pass_drop!r}")
    if self.probes and not self.every:
      raise ConfigError("gate.probes: scored only by gated blocks; set gate.every > 0")


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
  ttt_eval: TTTEvalConfig = dataclasses.field(default_factory=TTTEvalConfig)
  """Score-first test-time training at evaluation (``evaluate --task ttt``)."""
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  """Checkpointing."""
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  """Device mesh and sharding rules."""
  logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
  """Logging and profiling."""
  quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
  """Late quantization-aware training (export: ``python -m ttt_jax.export``)."""
  lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
  """Low-rank adapters trained on a frozen base (``ttt_jax.lora``)."""
  sdft: SDFTConfig = dataclasses.field(default_factory=SDFTConfig)
  """Self-distillation fine-tuning (``python -m ttt_jax.sdft``, train.objective='sdft')."""
  gate: GateConfig = dataclasses.field(default_factory=GateConfig)
  """Gated update blocks: undo a block of updates that regresses (off by default)."""

  def __post_init__(self):
    if self.train.batch_size % self.optim.grad_accum_steps:
      raise ConfigError(f"optim.grad_accum_steps: train.batch_size={self.train.batch_size} "
                        f"is not divisible by {self.optim.grad_accum_steps}")
    if self.train.nonfinite == "skip" and self.optim.grad_accum_steps > 1:
      raise ConfigError("train.nonfinite: 'skip' drops one micro-batch's update, which "
                        "would shift optim.grad_accum_steps's accumulation; use 'stop' "
                        f"or optim.grad_accum_steps=1 (got {self.optim.grad_accum_steps})")
    enabling = {"ema": ("optim.ema_decay", self.optim.ema_decay),
                "swa": ("optim.swa_every", self.optim.swa_every)}
    wanted = [w for w in enabling if self.eval.weights in (w, "all")]
    if wanted and not any(enabling[w][1] for w in wanted):
      raise ConfigError(f"eval.weights: {self.eval.weights!r} needs "
                        f"{' or '.join(enabling[w][0] for w in wanted)} > 0")
    if self.lora.enabled and (self.optim.ema_decay or self.optim.swa_every):
      raise ConfigError("lora.enabled: weight averaging (optim.ema_decay, optim.swa_every) "
                        "of adapters is not supported; set both to 0")
    for key, stride in (("eval.stride", self.eval.stride),
                        ("ttt_eval.stride", self.ttt_eval.stride)):
      if stride > self.data.seq_len:
        raise ConfigError(f"{key}: must be <= data.seq_len={self.data.seq_len}, got {stride}")
    # the one hook for checks across sections: each model slot's, then the objective's
    for slot in SLOTS:
      getattr(self.model, slot).check(self)
    objective = registry.OBJECTIVES.get(self.train.objective)
    if objective.check is not None:
      objective.check(self)
