"""Commitment-Constrained Training (CCT): step-local attention plus commitment summaries.

From the Commitment-Constrained Training guide. A sequence is cut into steps
(step ids per token, non-decreasing). A boundary between steps is *committed* with
probability p_commit (training curriculum; 1 at inference); merging every uncommitted
boundary into its neighbour gives the *commitment segments*, numbered 0, 1, ... per
sequence, and written ``k(t)`` for token t below.

Commitment head (one per layer, on that layer's normed mixer input x), for segment s
with last token e(s) (pool 'last') or its mean (pool 'mean'):

    u_s       = x_{e(s)}                        or  mean_{t: k(t)=s} x_t
    c_s       = normalize_L2(W_2 tanh(LayerNorm(W_1 u_s + b_1)) + b_2)     [d_summary]
    c~_s      = stop_gradient(c_s)                                          (isolation)

Summary injection: c~_s becomes one virtual key/value ("slot") per kv head,

    ks_s = c~_s W_ks,   vs_s = c~_s W_vs                                    [G, K]

with no rotary position (the slot is content-addressed: the score of a query against it
does not depend on distance, so the summary buffer works at any context length).

CCT attention of query t (q_t = x_t W_q; token keys k_j = rope(x_j W_k), values x_j W_v):

    local    L(t) = { j <= t : k(j) = k(t), same packed document }
    summary  N(t) = { s < k(t) : segment s ends in t's document }
    logits   a_tj = rope(q_t) . k_j / sqrt(K)   (j in L(t))
             b_ts = q_t . ks_s / sqrt(K)         (s in N(t))
    o_t      = softmax over L(t) u N(t) of (a, b) applied to (v, vs)

computed as two partial attentions (block-diagonal causal over tokens, and over the
summary slots) merged exactly with their log-sum-exps:

    lse = logaddexp(lse_L, lse_N),  o = e^{lse_L - lse} o_L + e^{lse_N - lse} o_N

The masks are built on device from the step ids (no host-side T x T mask, no loop over
positions). With p_commit = 0 every token is in segment 0 and this is causal attention.

Gradient isolation: a summary reaches later segments only through c~_s, so the
gradient of segment k's loss with respect to anything of segment k-1 is exactly zero
when the boundary is committed. The head is trained only by its own segment's losses
(here the sufficiency probe, ``sufficiency_probe``: x_mean_s ~ c_s W_p + b_p).

Working-memory decode (``CCTAttention.decode``, every boundary committed) takes the
step of each token either fixed by position (step = position // S, S = model.mixer.step_len;
the default) or given explicitly as absolute step ids (semantic steps: 0 at position 0,
+1 at each boundary, at most S tokens per step). Per layer and row it holds the summary
buffer [N, d_summary] (slot n = step n; N = max_len // S + 1 for fixed steps, or the
``max_steps`` given to ``init_cache``), the current step's K/V [S, G, K] with their
positions (slot = index in the step), the step's pool state [D] (pool 'last': x of its
latest token; 'mean': the running sum of x), its step id and its first position. A token
whose step id differs from the cached one closes that step: its summary (from the pool
state) is written to that step's slot before the token attends, and the local K/V restart.
So step k's summary is written when step k+1's first token arrives, and nothing grows
with context except the summary buffer, by d_summary values per layer per step. A token
at a negative position is a pad (left-padded prompts, ``inference/rollout.py``): it
keeps the cached step id, adds nothing to the pool state or the local K/V and no token
attends to it, so each row's steps count from its first real token (position 0) and
the row decodes what its prompt decodes alone; ``StepRule`` skips pads the same way. In
generation (``sampling.generate``) fixed steps need nothing more; semantic steps come
from ``StepRule``, the online, exact form of ``cct.steps.StepAnnotator``'s semantic rule (per
vocabulary tables of a 5-state sentence-end automaton, plus EOS/<STEP> pieces and the
step_min_len / step_len limits), which decides each new token's step on device; the
buffer then has (T - 1) // step_min_len + 1 slots for T tokens.

Curriculum (``p_commit_schedule``, progress f = step / total): 0 for f < 0.1, then
linear 0.1 -> 0.5 until f = 0.5, linear 0.5 -> 0.9 until f = 0.8, then 1. Loss weights
(``loss_weights``), with w = clip((f - 0.1) / 0.7, 0, 1): alpha = 1 - 0.5 w,
beta = 0.5 w, gamma = 0.3 w, delta = 0.2 w.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax import registry
from ttt_jax.config import (ConfigError, ModelConfig, Section, check_choice,
                            check_non_negative, check_positive)
from ttt_jax.models import lm
from ttt_jax.models.context import SequenceContext
from ttt_jax.models.layers import apply_rope, normal, param
from ttt_jax.models.mixers.attention import Attention
from ttt_jax.registry import AxisInfo

MASKED = -1e30
"""Logit of a masked key: finite, so fully masked rows give zero weight and no NaNs."""

STEP_IDS = "step_ids"
"""The side input (``SequenceContext.side``) holding each token's step id."""
SUMMARIES = "mixer.summaries"
"""Aux key (lm.py's channel) of every layer's ``SummaryAux``."""
SUMMARY_OVERRIDE = "cct.summary_override"
"""Context option: 'none' (default) or 'zero' (every injected summary is 0: ablation)."""

registry.LOGICAL_AXES.register("summary", AxisInfo("the CCT commitment head's bottleneck "
                                                   "and summary widths"))


@dataclasses.dataclass(frozen=True)
class CCTConfig(Section):
  """``model.mixer: {type: cct, ...}``: the commitment summaries and the steps."""
  type: str = "cct"
  d_summary: int = 16
  """Width of a commitment summary (d_summary; the guide uses 16-64)."""
  step_len: int = 50
  """Tokens per step when no step ids are given (evaluation without them, generation of
  runs without semantic steps: step = position // S), and the longest step
  working-memory decoding holds (its local K/V buffer; semantic generation needs
  data.step_len <= model.mixer.step_len)."""
  d_bottleneck: int = 0
  """Hidden width of the commitment head; 0 means 2 * d_summary."""
  pool: str = "last"
  """Commitment head input: 'last' (the step's last token) or 'mean' (its mean)."""
  max_steps: int = 0
  """Summary slots per training sequence; 0 means one per token (always enough). Set it
  >= the most steps a window can hold: steps beyond it get no summary slot. It sizes the
  forward's buffers, not the params, so a run may change it from its checkpoint's."""

  COMPUTE_ONLY = ("max_steps",)

  def __post_init__(self):
    check_choice("model.mixer", "pool", self.pool, ("last", "mean"))
    check_positive("model.mixer", self, "d_summary", "step_len")
    check_non_negative("model.mixer", self, "d_bottleneck", "max_steps")

  @property
  def bottleneck(self) -> int:
    return self.d_bottleneck or 2 * self.d_summary

  def check(self, cfg: Any) -> None:
    if cfg.data.step_boundaries == "fixed" and cfg.data.step_len != self.step_len:
      raise ConfigError(f"data.step_len: fixed steps of {cfg.data.step_len} tokens differ "
                        f"from model.mixer.step_len={self.step_len}, the decode step length")


# ----------------------------------------------------------------------------- schedules


def p_commit_schedule(step: jax.Array | int, total_steps: int) -> jax.Array:
  """The 4-phase commitment probability at optimizer step ``step`` (0-based)."""
  f = jnp.asarray(step, jnp.float32) / float(total_steps)
  return jnp.where(f < 0.1, 0.0,
                   jnp.where(f < 0.5, 0.1 + (f - 0.1) / 0.4 * 0.4,
                             jnp.where(f < 0.8, 0.5 + (f - 0.5) / 0.3 * 0.4, 1.0)))


def loss_weights(step: jax.Array | int, total_steps: int) -> dict[str, jax.Array]:
  """alpha (standard), beta (validity), gamma (conclusion), delta (sufficiency)."""
  f = jnp.asarray(step, jnp.float32) / float(total_steps)
  w = jnp.clip((f - 0.1) / 0.7, 0.0, 1.0)
  return {"alpha": 1.0 - 0.5 * w, "beta": 0.5 * w, "gamma": 0.3 * w, "delta": 0.2 * w}


# ----------------------------------------------------------------------------- step ids


def fixed_step_ids(positions_BxT: jax.Array, step_len: int) -> jax.Array:
  """Step of each token when a boundary falls every ``step_len`` positions."""
  return positions_BxT.astype(jnp.int32) // step_len


class StepRule(NamedTuple):
  """The semantic step rule of ``cct.steps.StepAnnotator`` applied one token at a time, on
  device (generation: a new token's step must be known before it is decoded)."""
  candidate_QxV: jax.Array
  """bool: in text state q, piece v holds the first character of a sentence or paragraph
  (``cct.steps.sentence_end_automaton``)."""
  next_state_QxV: jax.Array
  """int32 text state after piece v read in state q."""
  boundary_after_V: jax.Array
  """bool: a step starts after piece v (EOS, <STEP>)."""
  step_len: jax.Array
  """int32: the longest step (a boundary is forced after it)."""
  step_min_len: jax.Array
  """int32: the shortest step (a candidate closer to the step's start is skipped)."""


class StepRuleState(NamedTuple):
  """Per-row state of ``StepRule`` after the tokens read so far."""
  step_B: jax.Array
  """int32 step of the latest token."""
  length_B: jax.Array
  """int32 tokens in the current step (0 before any token)."""
  text_state_B: jax.Array
  """int32 state of the sentence-end automaton."""
  previous_token_B: jax.Array
  """int32 latest token."""


def step_rule(annotator: Any) -> StepRule:
  """The ``StepRule`` of a semantic ``cct.steps.StepAnnotator``."""
  candidate_QxV, next_state_QxV = annotator.online_tables()
  return StepRule(jnp.asarray(candidate_QxV), jnp.asarray(next_state_QxV, jnp.int32),
                  jnp.asarray(annotator.boundary_after), jnp.int32(annotator.step_len),
                  jnp.int32(annotator.step_min_len))


def step_rule_start(batch_size: int) -> StepRuleState:
  zeros_B = jnp.zeros((batch_size,), jnp.int32)
  return StepRuleState(zeros_B, zeros_B, zeros_B, zeros_B)


def step_rule_next(rule: StepRule, state: StepRuleState, token_B: jax.Array
                   ) -> tuple[jax.Array, StepRuleState]:
  """(step id [B] of ``token``, the state after it), exactly as ``StepAnnotator``: a step
  starts at a candidate at least step_min_len tokens into the current step, or after
  step_len tokens (never at the first token: its length is 0)."""
  token_B = token_B.astype(jnp.int32)
  candidate_B = (rule.candidate_QxV[state.text_state_B, token_B]
                 | rule.boundary_after_V[state.previous_token_B])
  new_step_B = ((state.length_B >= rule.step_len)
                | (candidate_B & (state.length_B >= rule.step_min_len)))
  step_B = state.step_B + new_step_B.astype(jnp.int32)
  return step_B, StepRuleState(
      step_B, jnp.where(new_step_B, 1, state.length_B + 1),
      rule.next_state_QxV[state.text_state_B, token_B], token_B)


def step_rule_ids(rule: StepRule, state: StepRuleState, tokens_BxT: jax.Array,
                  real_BxT: jax.Array | None = None) -> tuple[jax.Array, StepRuleState]:
  """``step_rule_next`` over T tokens: (step ids [B, T], the state after them). A token
  where ``real`` is False (a pad of a left-padded prompt) is skipped: it leaves the state
  as it is and gets the current step id."""
  if real_BxT is None:
    real_BxT = jnp.ones(tokens_BxT.shape, bool)

  def next_token(state, token_and_real):
    token_B, real_B = token_and_real
    step_B, after = step_rule_next(rule, state, token_B)
    after = jax.tree.map(lambda new, old: jnp.where(real_B, new, old), after, state)
    return after, jnp.where(real_B, step_B, state.step_B)

  state, steps_TxB = jax.lax.scan(next_token, state, (tokens_BxT.T, real_BxT.T))
  return steps_TxB.T, state


def commitment_segments(step_ids_BxT: jax.Array, committed_BxT: jax.Array) -> jax.Array:
  """Segment ids 0, 1, ... where only committed boundaries separate segments.

  A boundary sits before token t when step_ids[t] != step_ids[t-1]; ``committed[t]``
  says whether that boundary is committed (ignored where there is no boundary).
  """
  boundary_BxT = jnp.concatenate(
      [jnp.zeros_like(step_ids_BxT[:, :1], bool),
       step_ids_BxT[:, 1:] != step_ids_BxT[:, :-1]], axis=1)
  return jnp.cumsum(boundary_BxT & committed_BxT, axis=1, dtype=jnp.int32)


def sample_segments(step_ids_BxT: jax.Array, p_commit: jax.Array, rng: jax.Array) -> jax.Array:
  """``commitment_segments`` with each boundary committed independently w.p. p_commit."""
  committed_BxT = jax.random.uniform(rng, step_ids_BxT.shape) < p_commit
  return commitment_segments(step_ids_BxT, committed_BxT)


def segment_end_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """True at the last token of each segment within the sequence."""
  return jnp.concatenate([segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1],
                          jnp.ones_like(segment_ids_BxT[:, :1], bool)], axis=1)


def pool_segments(x_BxTxD: jax.Array, segments_BxT: jax.Array, n_slots: int, pool: str
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(head input u [B, N, D], mean of x [B, N, D] (float32), token count [B, N]) of each
  segment; segments >= n_slots are dropped."""
  x_f32 = x_BxTxD.astype(jnp.float32)
  sums = jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_segments=n_slots))
  count_BxN = sums(jnp.ones(segments_BxT.shape, jnp.float32), segments_BxT)
  mean_BxNxD = sums(x_f32, segments_BxT) / jnp.maximum(count_BxN, 1.0)[..., None]
  if pool == "mean":
    return mean_BxNxD.astype(x_BxTxD.dtype), mean_BxNxD, count_BxN
  end_BxT = segment_end_mask(segments_BxT)
  last_BxNxD = sums(jnp.where(end_BxT[..., None], x_f32, 0.0), segments_BxT)
  return last_BxNxD.astype(x_BxTxD.dtype), mean_BxNxD, count_BxN


# ----------------------------------------------------------------------------- head


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
  """LayerNorm over the last axis, in float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def commitment_head(u_xD: jax.Array, w1_DxH: jax.Array, b1_H: jax.Array, ln_scale_H: jax.Array,
                    ln_bias_H: jax.Array, w2_HxS: jax.Array, b2_S: jax.Array) -> jax.Array:
  """c = normalize_L2(W_2 tanh(LayerNorm(W_1 u + b_1)) + b_2), float32 [..., d_summary]."""
  u = u_xD.astype(jnp.float32)
  hidden = jnp.tanh(layer_norm(u @ w1_DxH.astype(jnp.float32) + b1_H, ln_scale_H, ln_bias_H))
  summary = hidden @ w2_HxS.astype(jnp.float32) + b2_S
  return summary * jax.lax.rsqrt(jnp.sum(jnp.square(summary), -1, keepdims=True) + 1e-12)


# ----------------------------------------------------------------------------- attention


def merged_attention(q_rot_BxTxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
                     local_mask_BxTxL: jax.Array, q_BxTxHxK: jax.Array,
                     summary_k_BxNxGxK: jax.Array, summary_v_BxNxGxK: jax.Array,
                     summary_mask_BxTxN: jax.Array) -> jax.Array:
  """Softmax attention over (token keys under ``local_mask``) u (summary slots under
  ``summary_mask``), as two partial attentions merged by log-sum-exp. Logits and
  softmax in float32; output [B, T, H, K] in q's dtype."""
  batch, length, n_heads, head_dim = q_rot_BxTxHxK.shape
  n_kv = k_BxLxGxK.shape[2]
  group = n_heads // n_kv
  scale = 1.0 / np.sqrt(head_dim)

  def partial(q, k, v, mask_BxTxL):
    q_BxTxGxRxK = q.reshape(batch, length, n_kv, group, head_dim).astype(jnp.float32)
    logits = jnp.einsum("btgrk,blgk->bgrtl", q_BxTxGxRxK, k.astype(jnp.float32)) * scale
    logits = jnp.where(mask_BxTxL[:, None, None], logits, MASKED)
    lse_BxGxRxT = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse_BxGxRxT[..., None])
    out_BxGxRxTxK = jnp.einsum("bgrtl,blgk->bgrtk", probs, v.astype(jnp.float32))
    return out_BxGxRxTxK, lse_BxGxRxT

  out_local, lse_local = partial(q_rot_BxTxHxK, k_BxLxGxK, v_BxLxGxK, local_mask_BxTxL)
  out_summary, lse_summary = partial(q_BxTxHxK, summary_k_BxNxGxK, summary_v_BxNxGxK,
                                     summary_mask_BxTxN)
  lse = jnp.logaddexp(lse_local, lse_summary)
  out = (jnp.exp(lse_local - lse)[..., None] * out_local
         + jnp.exp(lse_summary - lse)[..., None] * out_summary)
  out_BxTxHxK = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, length, n_heads, head_dim)
  return out_BxTxHxK.astype(q_BxTxHxK.dtype)


def training_masks(segments_BxT: jax.Array, n_slots: int,
                   documents_BxT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(local mask [B, T, T], summary mask [B, T, N]) of a whole sequence."""
  length = segments_BxT.shape[1]
  index_T = jnp.arange(length)
  causal_TxT = index_T[:, None] >= index_T[None, :]
  local = (segments_BxT[:, :, None] == segments_BxT[:, None, :]) & causal_TxT
  slot_N = jnp.arange(n_slots)
  summary = slot_N[None, None, :] < segments_BxT[:, :, None]
  if documents_BxT is not None:
    local &= documents_BxT[:, :, None] == documents_BxT[:, None, :]
    slot_document_BxN = jax.vmap(lambda d, s: jax.ops.segment_max(
        d, s, num_segments=n_slots))(documents_BxT, segments_BxT)
    summary &= slot_document_BxN[:, None, :] == documents_BxT[:, :, None]
  return local, summary


def cct_attention_reference(q_rot: np.ndarray, k: np.ndarray, v: np.ndarray, q: np.ndarray,
                            summary_k: np.ndarray, summary_v: np.ndarray,
                            segments: np.ndarray) -> np.ndarray:
  """Float64 oracle: one dense boolean mask over [T token keys | N summary slots] built
  entry by entry, logits concatenated, one softmax. Shapes as ``merged_attention``."""
  q_rot, k, v, q, summary_k, summary_v = (np.asarray(a, np.float64) for a in
                                          (q_rot, k, v, q, summary_k, summary_v))
  batch, length, n_heads, head_dim = q.shape
  n_slots = summary_k.shape[1]
  group = n_heads // k.shape[2]
  mask = np.zeros((batch, length, length + n_slots), bool)
  for b in range(batch):
    for t in range(length):
      for j in range(length):
        mask[b, t, j] = j <= t and segments[b, j] == segments[b, t]
      for s in range(n_slots):
        mask[b, t, length + s] = s < segments[b, t]
  keys_h = np.repeat(k, group, axis=2)
  vals_h = np.repeat(v, group, axis=2)
  skeys_h = np.repeat(summary_k, group, axis=2)
  svals_h = np.repeat(summary_v, group, axis=2)
  logits = np.concatenate([np.einsum("bthk,bjhk->bhtj", q_rot, keys_h),
                           np.einsum("bthk,bshk->bhts", q, skeys_h)], -1) / np.sqrt(head_dim)
  logits = np.where(mask[:, None], logits, -np.inf)
  logits -= logits.max(-1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhtj,bjhk->bthk", probs, np.concatenate([vals_h, svals_h], 1))


# ----------------------------------------------------------------------------- module


class CCTCache(NamedTuple):
  """Working memory of one CCT layer (stacked over layers in lm.py)."""
  summaries_BxNxS: jax.Array
  """Commitment summaries of closed steps, slot n = step n (compute dtype). A step is
  closed, and its summary written, when the first token of the next step is decoded."""
  local_k_BxSxGxK: jax.Array
  """Rotated keys of the current step's tokens, slot = the token's index in its step."""
  local_v_BxSxGxK: jax.Array
  """Values of the current step's tokens."""
  local_positions_BxS: jax.Array
  """int32 position held in each local slot; -1 marks an empty slot."""
  step_pool_BxD: jax.Array
  """float32 pool state of the current step: x of its latest token (pool 'last') or the
  sum of x over its tokens (pool 'mean')."""
  step_B: jax.Array
  """int32 step id of the latest decoded token (0 before any token)."""
  step_start_B: jax.Array
  """int32 position of the current step's first token."""


class SummaryAux(NamedTuple):
  """Per-segment values of one layer's forward, for the sufficiency loss and probes."""
  summary_BxNxS: jax.Array
  """c_s (float32, before stop_gradient)."""
  step_mean_BxNxD: jax.Array
  """Mean of the layer's normed input over the segment's tokens (float32)."""
  head_input_BxNxD: jax.Array
  """u_s, the commitment head's input (float32)."""
  complete_BxN: jax.Array
  """The segment exists and is not the sequence's last one (it was committed)."""


@registry.MIXERS.register("cct")
class CCTAttention(Attention):
  """CCT mixer: the GQA projections of ``Attention`` plus, per layer, the commitment
  head (W_1, b_1, LayerNorm, W_2, b_2), the summary key/value projections W_ks, W_vs
  and the sufficiency probe (W_p, b_p). Reads the side input ``step_ids`` and records
  each layer's ``SummaryAux`` in the aux channel (``SUMMARIES``)."""

  Config = CCTConfig
  RAGGED_DECODE = True
  """Decodes left-padded prompts: a token at a negative position (a pad) enters neither
  the working memory nor the steps, which count from each row's first real token."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs, implementation="xla")
    dtype = jnp.dtype(cfg.param_dtype)
    section = cfg.mixer
    d_model, d_summary, d_bottleneck = cfg.d_model, section.d_summary, section.bottleneck
    self.step_len = section.step_len
    self.max_steps = section.max_steps
    self.pool = section.pool
    self.head_w1 = param(normal(rngs.params(), (d_model, d_bottleneck), d_model ** -0.5, dtype),
                         ("embed", "summary"))
    self.head_b1 = param(jnp.zeros((d_bottleneck,), dtype), ("summary",))
    self.head_ln_scale = param(jnp.ones((d_bottleneck,), dtype), ("summary",))
    self.head_ln_bias = param(jnp.zeros((d_bottleneck,), dtype), ("summary",))
    self.head_w2 = param(normal(rngs.params(), (d_bottleneck, d_summary), d_bottleneck ** -0.5,
                                dtype), ("summary", "summary"))
    self.head_b2 = param(jnp.zeros((d_summary,), dtype), ("summary",))
    kv_std = cfg.init_std * d_model ** 0.5  # unit-norm summaries -> token-sized keys
    kv_width = self.n_kv_heads * self.head_dim
    self.summary_wk = param(normal(rngs.params(), (d_summary, kv_width), kv_std, dtype),
                            ("summary", "kv_heads"))
    self.summary_wv = param(normal(rngs.params(), (d_summary, kv_width), kv_std, dtype),
                            ("summary", "kv_heads"))
    self.probe_w = param(normal(rngs.params(), (d_summary, d_model), cfg.init_std, dtype),
                         ("summary", "embed"))
    self.probe_b = param(jnp.zeros((d_model,), dtype), ("embed",))

  # -- pieces

  def summarize(self, u_xD: jax.Array) -> jax.Array:
    return commitment_head(u_xD, self.head_w1[...], self.head_b1[...], self.head_ln_scale[...],
                           self.head_ln_bias[...], self.head_w2[...], self.head_b2[...])

  def probe(self, summary_xS: jax.Array) -> jax.Array:
    """Sufficiency probe: the step's mean hidden state predicted from its summary."""
    return summary_xS @ self.probe_w[...].astype(jnp.float32) + self.probe_b[...]

  def summary_kv(self, summary_BxNxS: jax.Array, dtype: jnp.dtype
                 ) -> tuple[jax.Array, jax.Array]:
    """Virtual keys and values [B, N, G, K] of (already isolated) summaries."""
    batch, n_slots, _ = summary_BxNxS.shape
    s = summary_BxNxS.astype(dtype)
    k = jnp.einsum("bns,sm->bnm", s, self.summary_wk[...].astype(dtype))
    v = jnp.einsum("bns,sm->bnm", s, self.summary_wv[...].astype(dtype))
    shape = (batch, n_slots, self.n_kv_heads, self.head_dim)
    return k.reshape(shape), v.reshape(shape)

  def project(self, x_BxTxD: jax.Array, positions_BxT: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(q, rope(q) [B,T,H,K], rope(k), v [B,T,G,K]) in x's dtype."""
    batch, length, _ = x_BxTxD.shape
    dtype = x_BxTxD.dtype
    q = jnp.einsum("btd,dn->btn", x_BxTxD, self.wq[...].astype(dtype))
    k = jnp.einsum("btd,dm->btm", x_BxTxD, self.wk[...].astype(dtype))
    v = jnp.einsum("btd,dm->btm", x_BxTxD, self.wv[...].astype(dtype))
    q = q.reshape(batch, length, self.n_heads, self.head_dim)
    k = k.reshape(batch, length, self.n_kv_heads, self.head_dim)
    v = v.reshape(batch, length, self.n_kv_heads, self.head_dim)
    return (q, apply_rope(q, positions_BxT, self.rope_theta),
            apply_rope(k, positions_BxT, self.rope_theta), v)

  def n_slots(self, length: int) -> int:
    return min(self.max_steps, length) if self.max_steps else length

  # -- full sequence

  def forward(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
              segment_ids_BxT: jax.Array | None = None, step_ids_BxT: jax.Array | None = None,
              summary_override: str = "none") -> tuple[jax.Array, SummaryAux]:
    """(y [B, T, D], per-segment aux). ``step_ids`` are commitment segments (every change
    of id is a committed boundary); None means fixed steps of step_len by position.
    ``summary_override``: 'none', or 'zero' (ablation: every injected summary is 0)."""
    if step_ids_BxT is None:
      step_ids_BxT = fixed_step_ids(positions_BxT, self.step_len)
    segments_BxT = (step_ids_BxT - step_ids_BxT[:, :1]).astype(jnp.int32)
    n_slots = self.n_slots(x_BxTxD.shape[1])
    u_BxNxD, mean_BxNxD, count_BxN = pool_segments(x_BxTxD, segments_BxT, n_slots, self.pool)
    summary_BxNxS = self.summarize(u_BxNxD)
    injected_BxNxS = jax.lax.stop_gradient(summary_BxNxS)
    if summary_override == "zero":
      injected_BxNxS = jnp.zeros_like(injected_BxNxS)
    elif summary_override != "none":
      raise ValueError(f"summary_override {summary_override!r} is not 'none' or 'zero'")
    summary_k, summary_v = self.summary_kv(injected_BxNxS, x_BxTxD.dtype)
    q, q_rot, k_rot, v = self.project(x_BxTxD, positions_BxT)
    local_mask, summary_mask = training_masks(segments_BxT, n_slots, segment_ids_BxT)
    o_BxTxHxK = merged_attention(q_rot, k_rot, v, local_mask, q, summary_k, summary_v,
                                 summary_mask)
    last_segment_B = segments_BxT[:, -1]
    complete_BxN = (count_BxN > 0) & (jnp.arange(n_slots)[None, :] < last_segment_B[:, None])
    aux = SummaryAux(summary_BxNxS, mean_BxNxD, u_BxNxD.astype(jnp.float32), complete_BxN)
    return self.output_projection(o_BxTxHxK), aux

  def __call__(self, x_BxTxD: jax.Array, ctx: SequenceContext) -> jax.Array:
    """``forward`` with the context's step ids and summary override; the aux is
    recorded under ``SUMMARIES``."""
    y_BxTxD, aux = self.forward(x_BxTxD, ctx.positions_BxT, ctx.segment_ids_BxT,
                                ctx.side_input(STEP_IDS), ctx.option(SUMMARY_OVERRIDE, "none"))
    self.sow(nnx.Intermediate, "summaries", aux)
    return y_BxTxD

  # -- working-memory decode

  def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype,
                 options: dict[str, Any] | None = None) -> CCTCache:
    """Empty working memory. ``options['max_steps']``: summary slots, the most steps a
    decoded sequence may have (default: fixed steps, max_len // step_len + 1)."""
    max_steps = (options or {}).get("max_steps")
    n_steps = max_len // self.step_len + 1 if max_steps is None else max_steps
    local = (batch_size, self.step_len, self.n_kv_heads, self.head_dim)
    return CCTCache(
        summaries_BxNxS=jnp.zeros((batch_size, n_steps, self.head_w2.shape[1]), dtype),
        local_k_BxSxGxK=jnp.zeros(local, dtype),
        local_v_BxSxGxK=jnp.zeros(local, dtype),
        local_positions_BxS=jnp.full((batch_size, self.step_len), -1, jnp.int32),
        step_pool_BxD=jnp.zeros((batch_size, self.head_w1.shape[0]), jnp.float32),
        step_B=jnp.zeros((batch_size,), jnp.int32),
        step_start_B=jnp.zeros((batch_size,), jnp.int32))

  def decode(self, x_BxCxD: jax.Array, ctx: SequenceContext, cache: CCTCache
             ) -> tuple[jax.Array, CCTCache]:
    """C new tokens at consecutive positions (any number of steps) given the working
    memory of all earlier ones. The side input ``step_ids``: the absolute step of each
    token (0 at position 0, non-decreasing, +1 at a boundary, at most step_len tokens
    per step; not checked); without it fixed steps, position // step_len."""
    batch, chunk, _ = x_BxCxD.shape
    positions_BxC = ctx.positions_BxT.astype(jnp.int32)
    step_ids_BxC = ctx.side_input(STEP_IDS)
    real_BxC = positions_BxC >= 0  # a negative position is a pad: it changes nothing
    steps_BxC = (fixed_step_ids(positions_BxC, self.step_len) if step_ids_BxC is None
                 else step_ids_BxC.astype(jnp.int32))
    steps_BxC = jax.lax.cummax(jnp.where(real_BxC, steps_BxC, cache.step_B[:, None]), axis=1)
    n_steps = cache.summaries_BxNxS.shape[1]
    rows_Bx1 = jnp.arange(batch)[:, None]
    index_C = jnp.arange(chunk, dtype=jnp.int32)
    previous_steps_BxC = jnp.concatenate([cache.step_B[:, None], steps_BxC[:, :-1]], axis=1)
    starts_BxC = steps_BxC != previous_steps_BxC  # begins a step, closing the previous one
    first_BxC = jax.lax.cummax(jnp.where(starts_BxC, index_C, -1), axis=1)  # -1: began before
    began_before_BxC = first_BxC < 0
    first_BxC = jnp.maximum(first_BxC, 0)
    step_start_BxC = jnp.where(began_before_BxC, cache.step_start_B[:, None],
                               jnp.take_along_axis(positions_BxC, first_BxC, axis=1))
    # 1. pool state after each token, and the summaries of the steps closed in this chunk
    #    (closed at token t, which starts a step: from the pool state after token t-1)
    x_f32 = jnp.where(real_BxC[..., None], x_BxCxD.astype(jnp.float32), 0.0)
    if self.pool == "mean":
      cumsum_BxCxD = jnp.cumsum(x_f32, axis=1)
      before_BxCxD = jnp.take_along_axis(cumsum_BxCxD - x_f32, first_BxC[..., None], axis=1)
      pool_BxCxD = (cumsum_BxCxD - before_BxCxD
                    + jnp.where(began_before_BxC[..., None], cache.step_pool_BxD[:, None], 0.0))
      u_BxCxD = pool_BxCxD / jnp.maximum(positions_BxC - step_start_BxC + 1, 1)[..., None]
      carried_count_B = jnp.maximum(positions_BxC[:, 0] - cache.step_start_B, 1)
      carried_u_BxD = cache.step_pool_BxD / carried_count_B[:, None]
    else:
      pool_BxCxD = u_BxCxD = x_f32
      carried_u_BxD = cache.step_pool_BxD
    closed_u_BxCxD = jnp.concatenate([carried_u_BxD[:, None], u_BxCxD[:, :-1]], axis=1)
    closed_BxCxS = self.summarize(closed_u_BxCxD.astype(x_BxCxD.dtype))
    slot_BxC = jnp.where(starts_BxC, previous_steps_BxC, n_steps)  # n_steps: dropped
    summaries_BxNxS = cache.summaries_BxNxS.at[rows_Bx1, slot_BxC].set(
        closed_BxCxS.astype(cache.summaries_BxNxS.dtype), mode="drop")
    # 2. attention over (current step's cached tokens + chunk) and earlier summaries
    q, q_rot, k_rot, v = self.project(x_BxCxD, positions_BxC)
    dtype = x_BxCxD.dtype
    keys = jnp.concatenate([cache.local_k_BxSxGxK.astype(dtype), k_rot], axis=1)
    values = jnp.concatenate([cache.local_v_BxSxGxK.astype(dtype), v], axis=1)
    cached_mask_BxCxS = ((cache.local_positions_BxS[:, None, :] >= 0)
                         & (steps_BxC == cache.step_B[:, None])[:, :, None])
    chunk_mask_BxCxC = ((index_C[:, None] >= index_C[None, :])[None]
                        & (steps_BxC[:, :, None] == steps_BxC[:, None, :])
                        & real_BxC[:, None, :])
    local_mask = jnp.concatenate([cached_mask_BxCxS, chunk_mask_BxCxC], axis=2)
    summary_mask = jnp.arange(n_steps)[None, None, :] < steps_BxC[:, :, None]
    summary_k, summary_v = self.summary_kv(jax.lax.stop_gradient(summaries_BxNxS), dtype)
    o_BxCxHxK = merged_attention(q_rot, keys, values, local_mask, q, summary_k, summary_v,
                                 summary_mask)
    # 3. keep only the last step's tokens as local memory
    last_step_B = steps_BxC[:, -1]
    kept_positions_BxS = jnp.where((last_step_B == cache.step_B)[:, None],
                                   cache.local_positions_BxS, -1)
    local_slot_BxC = jnp.where((steps_BxC == last_step_B[:, None]) & real_BxC,
                               positions_BxC - step_start_BxC, self.step_len)  # S: dropped
    new_cache = CCTCache(
        summaries_BxNxS=summaries_BxNxS,
        local_k_BxSxGxK=cache.local_k_BxSxGxK.at[rows_Bx1, local_slot_BxC].set(
            k_rot.astype(cache.local_k_BxSxGxK.dtype), mode="drop"),
        local_v_BxSxGxK=cache.local_v_BxSxGxK.at[rows_Bx1, local_slot_BxC].set(
            v.astype(cache.local_v_BxSxGxK.dtype), mode="drop"),
        local_positions_BxS=kept_positions_BxS.at[rows_Bx1, local_slot_BxC].set(
            positions_BxC, mode="drop"),
        step_pool_BxD=pool_BxCxD[:, -1],
        step_B=last_step_B,
        step_start_B=step_start_BxC[:, -1])
    return self.output_projection(o_BxCxHxK), new_cache

  @staticmethod
  def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Attention's projections and dense causal logits/values (the block-diagonal mask is
    applied to a dense T x T product), plus 2*2*H*K*N for the N summary slots and the
    head 2*(D*Db + Db*Ds) evaluated at every token (sufficiency probe excluded)."""
    section = cfg.mixer
    n_slots = min(section.max_steps, seq_len) if section.max_steps else seq_len
    summary_attention = 2 * 2 * cfg.n_heads * cfg.dim_per_head * n_slots
    head = 2 * (cfg.d_model * section.bottleneck + section.bottleneck * section.d_summary)
    return Attention.flops_per_token(cfg, seq_len) + summary_attention + head


# ----------------------------------------------------------------------------- model level


def logits_and_summaries(model: lm.LM, tokens_BxT: jax.Array, step_ids_BxT: jax.Array,
                         summary_override: str = "none",
                         segment_ids_BxT: jax.Array | None = None
                         ) -> tuple[jax.Array, SummaryAux]:
  """Logits [B, T, V] of a CCT ``lm.LM`` whose commitment segments are ``step_ids``,
  and every layer's ``SummaryAux`` stacked on a leading layers axis (taken from the aux
  channel). ``summary_override='zero'`` zeroes every injected summary (ablation);
  ``segment_ids`` are packed documents."""
  ctx = SequenceContext.for_tokens(tokens_BxT, segment_ids_BxT=segment_ids_BxT,
                                   side={STEP_IDS: step_ids_BxT},
                                   options=((SUMMARY_OVERRIDE, summary_override),))
  logits_BxTxV, aux = model.forward(tokens_BxT, ctx)
  return logits_BxTxV, aux[SUMMARIES]


def sufficiency_loss(model: Any, aux: SummaryAux) -> jax.Array:
  """Mean over layers and complete segments of ||probe(c_s) - sg(mean x_s)||^2 / D."""
  probe_w = model.blocks.mixer.probe_w[...].astype(jnp.float32)  # [layers, S, D]
  probe_b = model.blocks.mixer.probe_b[...].astype(jnp.float32)  # [layers, D]
  predicted = jnp.einsum("lbns,lsd->lbnd", aux.summary_BxNxS, probe_w) + probe_b[:, None, None]
  target = jax.lax.stop_gradient(aux.step_mean_BxNxD)
  error_LxBxN = jnp.mean(jnp.square(predicted - target), axis=-1)
  weight = aux.complete_BxN.astype(jnp.float32)
  return jnp.sum(error_LxBxN * weight) / jnp.maximum(jnp.sum(weight), 1.0)
