"""TTT-Linear: a token mixer whose hidden state is a linear model trained at test time.

Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States"
(arXiv 2407.04620), sections 2.1-2.7 and appendix A (the dual form).

Per head h (H heads of width K; the head index is dropped below), token x_t in R^D:

  Projections. Transformer backbone: q_t = x_t θ_Q, k_t = x_t θ_K, v_t = x_t θ_V.
    Mamba backbone: u_t = x_t θ_QK (shared), q = conv_Q(u), k = conv_K(u) (causal
    depthwise convs of width 4), v_t = x_t θ_V, and an output gate gelu(x_t θ_G);
    each block also runs a causal depthwise conv sublayer before the mixer
    (``PreConv``; lm.py: s <- s + conv(norm(s)), then s <- s + TTT(norm(s))).
    RoPE rotates q and k by the position *inside the mini-batch* (below).

  Inner model (fast weights W in R^{KxK}, b in R^K; LN with scale γ, shift β per head):
      f(k; W, b) = k + LN(k W + b)
      ℓ_j(W, b)  = ½ ‖LN(k_j W + b) - (v_j - k_j)‖²
  Inner learning rate (token dependent):
      η_j = η_base · σ(x_j θ_lr,h + β_h) / K
  Per-position scale s_i (learnable, i = 0..b-1, init 1/(i+1), used as max(s_i, 0)).

  Anchored mini-batch GD (training and prefill). Tokens are cut into mini-batches of
  b tokens (the last one may be shorter). With (W, b) the state at the start of the
  mini-batch (the anchor), every gradient is taken at the anchor:
      G_j  = ∇_{(W,b)} ℓ_j(W, b),     g_j = ∂ℓ_j/∂z at z = k_j W + b
      W_i  = W - s_i Σ_{j≤i} η_j k_jᵀ g_j,   b_i = b - s_i Σ_{j≤i} η_j g_j
      out_i = f(q_i; W_i, b_i)
  and the state passed to the next mini-batch is (W_{m-1}, b_{m-1}) of its last token.
  With s_i = 1/(i+1) the update is the η-weighted *mean* of the gradients of the
  tokens seen so far (mean reduction over the mini-batch, gradient scaled by 1/b).

  Dual form (appendix A): with g from one LN forward/backward at the anchor,
      Z = Q W + b - (E ∘ (Q Kᵀ + 1)) G,   E_ij = s_i η_j [j ≤ i]
      W' = W - Kᵀ (e ∘ G),  b' = b - eᵀ G,  e_j = E_{m-1, j}
  only matmuls. Layout of the computation: q, k, v, η are cut into mini-batches once,
  token-major ([n, B, b, H, K]: one copy each, which also applies RoPE to q and k and
  forms v - k); a ``jax.lax.scan`` carries the fp32 state and its body brings one
  mini-batch to head-major order and forms everything of it (G, E ∘ (Q Kᵀ + 1), Z,
  out = q + LN(Z) and the update), so no per-mini-batch tensor is materialised for the
  whole sequence and each one is read back while it is still in cache. At these sizes
  XLA:CPU's cost is per op, not per FLOP, so the body is written to be few ops in
  sequence (e.g. the inner LayerNorms' statistics E[x] and E[x²] are two independent
  reductions, not mean then variance), and LN_post runs on the mini-batch layout, fused
  into the copy of the outputs back to sequence order. The backward recomputes each
  mini-batch from its anchor and inputs (the scan saves nothing else): on CPU, re-running
  the small matmuls is cheaper than storing and re-reading their intermediates. Groups
  of ``remat_group`` mini-batches can in addition be rematerialised from the group's
  first anchor (less memory, one more forward). A remainder mini-batch (T mod b tokens) is
  padded with η = 0 tokens and left open (anchor + running sums) at the end.

  Output: y = (gelu(x θ_G) ∘) LN_post(concat_h out_h) θ_O  (gate: Mamba backbone only).

Mini-batch grid and document boundaries. The grid is the token order: mini-batch c is
tokens c·b .. c·b+b-1 of the sequence (for decode, of everything the cache has seen).
With ``segment_ids`` (packed documents), the fast-weight state resets to the learned
(W0, b0) at the first token of every document, so no document reads another's tokens
(the causal convolutions are masked the same way). A document that starts inside a
grid mini-batch begins with a *short* mini-batch: the fragment up to the grid boundary
is a mini-batch of its own, with scales s_0.., RoPE positions 0.. and its update
committed at the grid boundary with s of its last token (exactly like the remainder
mini-batch at the end of a sequence). Documents aligned to the grid are processed
exactly as they would be alone.

Where segment ids come from in training: ``data.document_mask`` (on in
``configs/ttt_linear_*.yaml``) makes the data pipeline emit ``segment_ids`` with every
window, the count of EOS tokens before each input token (data/pipeline.py), which the objective
and the eval step pass to the model. Nothing else is needed: the per-document positions
(the ``rel`` of ``minibatch_layout``, for RoPE and s_i) are derived here from the segment
ids, so the pipeline emits no positions. A document that starts mid-mini-batch therefore
gives exactly its standalone outputs up to the next grid boundary (the whole document
when it ends by then), and outputs that never depend on earlier documents after it.

Decode. ``ttt_linear_decode_step`` takes one token at a time with the same anchored
semantics, so prefill + decode reproduces the full-sequence forward: the state keeps
the anchor (W, b), the running sums Σ η_j k_jᵀ g_j and Σ η_j g_j of the unfinished
mini-batch and each row's position in it, and commits at the end of each mini-batch.
Memory per token is O(1) (no KV cache). Ragged prompts (left padded, pads at negative
positions, ``inference/rollout.py``): each row's grid starts at its first real token, so
a prefill leaves every row at its own slot; pads update nothing and the convs see zeros
in their place, so each row decodes exactly as it would alone. With ``mini_batch = 1``
this is plain online GD, u_t computed at the current W_t (the seed's decode invariant);
for b > 1 decoding by online GD would not reproduce the model that was trained, so it is
not used.

Precision (cast points, C1-C4):
  C1  The state (W, b, running sums) is float32 always; it is cast to the compute
      dtype only as an operand of the matmuls k W and q W (float32 accumulation).
  C2  q Kᵀ runs in the compute dtype with float32 accumulation.
  C3  The inner LN forward/backward, g, η, s and every product with them (E∘(QKᵀ+1)) G,
      Kᵀ(e∘G), q·(running sums)) are float32; compute-dtype operands are upcast.
  C4  Outputs out_i are formed in float32 and cast to the compute dtype once; the
      returned state is float32.

``ttt_linear_primal_anchored`` is the token-by-token reference of the same semantics:
it takes each g_j by autodiff of ℓ_j (not the hand-derived LN backward of the dual).

Config: ``model.mixer: {type: ttt_linear, backbone, mini_batch, base_lr, remat_group,
conv_width}`` (``TTTLinearConfig``); the mamba backbone's pre-convolution is the
mixer's pre-sublayer ``pre_conv`` (``PreConv``), which lm.py's block runs inside its
own residual before the mixer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax import registry
from ttt_jax.config import ModelConfig, Section, check_choice, check_non_negative, check_positive
from ttt_jax.models.context import SequenceContext
from ttt_jax.models.layers import dense, normal, param, rope_angles, rope_rotate
from ttt_jax.registry import AxisInfo

F32 = jnp.float32
INNER_LN_EPS = 1e-6
"""Epsilon of the per-head inner LayerNorm."""
POST_LN_EPS = 1e-6
"""Epsilon of the post-LayerNorm over the concatenated heads."""

registry.LOGICAL_AXES.register("conv", AxisInfo("the taps of a causal depthwise "
                                                "convolution", vector=True))
registry.LOGICAL_AXES.register("fast", AxisInfo("the output axis of TTT's learned initial "
                                                "fast weights W0, b0", vector=True))
registry.LOGICAL_AXES.register("gate", AxisInfo("TTT's inner learning-rate gate", vector=True))


@dataclasses.dataclass(frozen=True)
class TTTLinearConfig(Section):
  type: str = "ttt_linear"
  backbone: str = "mamba"
  """'mamba' (shared Q/K projection, causal depthwise convs for Q and K, output gate
  gelu(x W_g), and a causal conv sublayer before the mixer in every block) or
  'transformer' (separate Q, K, V projections, no convs, no gate)."""
  mini_batch: int = 16
  """Inner mini-batch size b (anchored mini-batch GD; the last mini-batch of a sequence
  may be shorter)."""
  base_lr: float = 1.0
  """eta_base of the inner learning rate eta_j = eta_base*sigmoid(x_j w_lr + b_lr)/head_dim."""
  remat_group: int = 0
  """Rematerialise the inner scan in groups of this many mini-batches (the backward
  recomputes a group from its first anchor, so only every g-th anchor is kept); 0: every
  anchor is kept (the backward always recomputes each mini-batch from its anchor)."""
  conv_width: int = 4
  """Mamba backbone: width of the causal depthwise convolutions."""

  COMPUTE_ONLY = ("remat_group",)

  def __post_init__(self):
    check_choice("model.mixer", "backbone", self.backbone, ("mamba", "transformer"))
    check_positive("model.mixer", self, "mini_batch", "base_lr", "conv_width")
    check_non_negative("model.mixer", self, "remat_group")


# ----------------------------------------------------------------------------- containers


class InnerParams(NamedTuple):
  """Parameters of the inner (fast-weight) model of every head."""
  w0_HxKxK: jax.Array
  """Learned initial fast weights W0."""
  b0_HxK: jax.Array
  """Learned initial fast bias b0."""
  ln_scale_HxK: jax.Array
  """γ of the inner LayerNorm."""
  ln_bias_HxK: jax.Array
  """β of the inner LayerNorm."""
  position_scale_M: jax.Array
  """s_i for positions 0..b-1 inside a mini-batch (used as max(s_i, 0))."""


class FastWeights(NamedTuple):
  """Per-row fast-weight state, float32: the anchor and the unfinished mini-batch's sums."""
  w_BxHxKxK: jax.Array
  """W at the start of the current mini-batch (the anchor)."""
  b_BxHxK: jax.Array
  """b at the start of the current mini-batch."""
  grad_w_BxHxKxK: jax.Array
  """Σ η_j k_jᵀ g_j over the tokens of the current mini-batch seen so far (unscaled)."""
  grad_b_BxHxK: jax.Array
  """Σ η_j g_j over the same tokens."""


class TTTState(NamedTuple):
  fast: FastWeights
  index: jax.Array
  """int32: tokens of the current mini-batch seen so far (0..b-1); a scalar shared by the
  rows after a forward, one per row [B] in a decode cache (ragged prompts)."""


class TTTCache(NamedTuple):
  """Decode state of one TTT-Linear layer: O(1) in the sequence length."""
  state: TTTState
  qk_history_BxPxN: jax.Array | None
  """Mamba backbone: the last conv_width-1 shared Q/K projections (compute dtype)."""


class TTTLinearParams(NamedTuple):
  """Every array of one TTT-Linear layer (None where the backbone has no such part)."""
  wq_DxN: jax.Array
  """θ_Q (transformer) or the shared θ_QK (mamba)."""
  wk_DxN: jax.Array | None
  wv_DxN: jax.Array
  wo_NxD: jax.Array
  conv_q_WxN: jax.Array | None
  conv_q_bias_N: jax.Array | None
  conv_k_WxN: jax.Array | None
  conv_k_bias_N: jax.Array | None
  wg_DxN: jax.Array | None
  """Output gate θ_G (mamba)."""
  lr_gate_DxH: jax.Array
  lr_bias_H: jax.Array
  inner: InnerParams
  post_scale_N: jax.Array
  post_bias_N: jax.Array


@dataclasses.dataclass(frozen=True)
class TTTSpec:
  """Static hyperparameters of a TTT-Linear layer."""
  n_heads: int
  head_dim: int
  mini_batch: int
  base_lr: float
  backbone: str
  conv_width: int
  remat_group: int
  rope_theta: float

  @classmethod
  def from_config(cls, cfg: ModelConfig) -> "TTTSpec":
    mixer = cfg.mixer
    return cls(n_heads=cfg.n_heads, head_dim=cfg.dim_per_head, mini_batch=mixer.mini_batch,
               base_lr=mixer.base_lr, backbone=mixer.backbone, conv_width=mixer.conv_width,
               remat_group=mixer.remat_group, rope_theta=cfg.rope_theta)

  @property
  def width(self) -> int:
    return self.n_heads * self.head_dim


# ----------------------------------------------------------------------------- inner model


def _means(*xs: jax.Array) -> tuple[jax.Array, ...]:
  """The means over the last axis (keepdims) of arrays computed from the same inputs, as
  independent reductions (none waits for another's result; XLA fuses each one's
  elementwise producer into it). At the sizes of a mini-batch a reduction costs its
  kernel's fixed cost, so the number of them in sequence is what counts."""
  return tuple(jnp.mean(x, axis=-1, keepdims=True) for x in xs)


def _normalize(x: jax.Array, eps: float, one_pass: bool) -> tuple[jax.Array, jax.Array]:
  """(x̂ = (x - μ)/σ, 1/σ) over the last axis, float32. ``one_pass``: σ² = E[x²] - μ², the
  two means independent reductions (fewer ops in sequence, for the scan body; accurate
  while |μ| is not orders of magnitude above σ, which holds for the inner model's z: the
  LN gradients that train it have zero mean, so nothing gives z a mean). Otherwise the
  mean, then the mean square of x - μ."""
  x = x.astype(F32)
  if one_pass:
    mean, mean_square = _means(x, jnp.square(x))
    variance = jnp.maximum(mean_square - jnp.square(mean), 0.0)
    centered = x - mean
  else:
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(variance + eps)
  return centered * rstd, rstd


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, *,
               one_pass: bool = False) -> jax.Array:
  """LayerNorm over the last axis in float32 (scale and bias broadcast against x);
  ``one_pass`` as in ``_normalize``."""
  x_hat, _ = _normalize(x, eps, one_pass)
  return x_hat * scale.astype(F32) + bias.astype(F32)


def inner_loss(z: jax.Array, target: jax.Array, ln_scale: jax.Array, ln_bias: jax.Array
               ) -> jax.Array:
  """Σ over every leading index of ½ ‖LN(z) - target‖² (the inner loss at z = k W + b)."""
  return 0.5 * jnp.sum(jnp.square(layer_norm(z, ln_scale, ln_bias, INNER_LN_EPS) - target))


def inner_loss_grad(z: jax.Array, target: jax.Array, ln_scale: jax.Array,
                    ln_bias: jax.Array) -> jax.Array:
  """g = ∂ℓ/∂z of ``inner_loss`` in closed form (LN backward), float32:

      x̂ = (z - μ)/σ,  r = γ x̂ + β - target,  u = γ r
      g = (u - mean(u) - x̂ mean(u x̂)) / σ
  """
  x_hat, rstd = _normalize(z, INNER_LN_EPS, one_pass=True)
  scale = ln_scale.astype(F32)
  u = scale * (scale * x_hat + ln_bias.astype(F32) - target)
  mean_u, mean_ux = _means(u, u * x_hat)
  return rstd * (u - mean_u - x_hat * mean_ux)


def position_scales(inner: InnerParams) -> jax.Array:
  """max(s_i, 0), float32 [b]."""
  return jnp.maximum(inner.position_scale_M.astype(F32), 0.0)


def init_fast_weights(inner: InnerParams, batch_size: int) -> FastWeights:
  """Every row starts at the learned (W0, b0), float32, with empty running sums."""
  heads, k, _ = inner.w0_HxKxK.shape
  w_BxHxKxK = jnp.broadcast_to(inner.w0_HxKxK.astype(F32)[None], (batch_size, heads, k, k))
  b_BxHxK = jnp.broadcast_to(inner.b0_HxK.astype(F32)[None], (batch_size, heads, k))
  return FastWeights(w_BxHxKxK, b_BxHxK, jnp.zeros_like(w_BxHxKxK), jnp.zeros_like(b_BxHxK))


def init_state(inner: InnerParams, batch_size: int) -> TTTState:
  return TTTState(init_fast_weights(inner, batch_size), jnp.zeros((), jnp.int32))


def _select_rows(mask_B: jax.Array, on_true, on_false):
  """Row-wise jnp.where over two pytrees whose leaves start with the batch axis."""
  def pick(a, b):
    b = jnp.broadcast_to(b, a.shape)
    return jnp.where(mask_B.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(pick, on_true, on_false)


# ----------------------------------------------------------------------------- mini-batch grid


def minibatch_layout(batch: int, length: int, mini_batch: int,
                     segment_ids_BxT: jax.Array | None = None,
                     offset: int | jax.Array = 0) -> tuple[jax.Array, jax.Array]:
  """(rel [B, T] int32, continues [B, T] bool) of every token on the mini-batch grid.

  Token t sits in grid slot (offset + t) mod b. ``rel`` is its position inside its
  mini-batch fragment (the slot, or the distance from its document's first token when
  the document started inside the same grid mini-batch). ``continues`` is False for
  tokens of a document that started inside their grid mini-batch after the sequence's
  first token: their anchor is (W0, b0), not the carried state.
  """
  t_T = jnp.arange(length, dtype=jnp.int32)
  slot_T = (t_T + offset) % mini_batch
  if segment_ids_BxT is None:
    rel_BxT = jnp.broadcast_to(slot_T[None], (batch, length))
    return rel_BxT, jnp.ones((batch, length), bool)
  chunk_start_T = t_T - slot_T
  is_start_BxT = jnp.concatenate(
      [jnp.ones((batch, 1), bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  doc_start_BxT = jax.lax.cummax(jnp.where(is_start_BxT, t_T[None], 0), axis=1)
  fragment_start_BxT = jnp.maximum(doc_start_BxT, chunk_start_T[None])
  rel_BxT = (t_T[None] - fragment_start_BxT).astype(jnp.int32)
  continues_BxT = (doc_start_BxT < chunk_start_T[None]) | (doc_start_BxT == 0)
  return rel_BxT, continues_BxT


# ----------------------------------------------------------------------------- dual form


class MiniBatches(NamedTuple):
  """The inputs of n mini-batches of m tokens in the scan's layout (leading axis n). The
  per-token arrays keep the token-major order of the sequence ([N, B, M, H, ...]: one
  copy swaps B and N); the scan body brings each mini-batch to head-major order itself,
  inside the op that slices it out. RoPE and v - k are applied in those copies; the body
  forms everything else of one mini-batch, so nothing of size n x (per-mini-batch work)
  is materialised outside the scan."""
  q_NxBxMxHxK: jax.Array
  """Queries (compute dtype)."""
  k_NxBxMxHxK: jax.Array
  """Keys (compute dtype)."""
  target_NxBxMxHxK: jax.Array
  """v - k, the inner model's regression target, float32."""
  eta_NxBxMxH: jax.Array
  """Inner learning rates η_j, float32."""
  eta_last_NxBxMxH: jax.Array
  """e_j: η_j where token j's update reaches the mini-batch's last token, else 0; float32."""
  scale_NxBxM: jax.Array
  """s at each token's position inside its mini-batch fragment, float32."""
  segment_ids_NxBxM: jax.Array | None
  """Document of each token (tokens see only their own document's); None: one document."""
  continues_NxBxM: jax.Array | None
  """Token continues the carried state (else its anchor is (W0, b0)); None: all do."""
  commit_N: jax.Array | None
  """Traced: whether the mini-batch closes at its last slot ([N], or [N, B] per row); None:
  the caller's static choice."""


def minibatch_inputs(q_NxBxMxHxK: jax.Array, k_NxBxMxHxK: jax.Array, v_NxBxMxHxK: jax.Array,
                     eta_NxBxMxH: jax.Array, scale_NxBxM: jax.Array,
                     rope_theta: float | None = None, rel_NxBxM: jax.Array | None = None,
                     segment_ids_NxBxM: jax.Array | None = None,
                     continues_NxBxM: jax.Array | None = None,
                     commit_N: jax.Array | None = None) -> MiniBatches:
  """The scan's inputs from the chunked q, k, v, η; with ``rope_theta``, q and k are
  rotated at ``rel`` (None: slots 0..b-1) here, in the copies that chunk them."""
  if rope_theta is not None:
    m = q_NxBxMxHxK.shape[2]
    q_NxBxMxHxK, k_NxBxMxHxK = (minibatch_rope(x, rel_NxBxM, m, rope_theta)
                                for x in (q_NxBxMxHxK, k_NxBxMxHxK))
  last_visible_NxBxMx1 = True
  if segment_ids_NxBxM is not None:
    last_visible_NxBxMx1 = (segment_ids_NxBxM == segment_ids_NxBxM[..., -1:])[..., None]
  return MiniBatches(
      q_NxBxMxHxK, k_NxBxMxHxK, v_NxBxMxHxK.astype(F32) - k_NxBxMxHxK.astype(F32),
      eta_NxBxMxH, jnp.where(last_visible_NxBxMx1, eta_NxBxMxH, 0.0), scale_NxBxM,
      segment_ids_NxBxM, continues_NxBxM, commit_N)


def chunked_scales(inner: InnerParams, n: int, batch: int, m: int,
                   rel_NxBxM: jax.Array | None = None) -> jax.Array:
  """s at every token's ``rel`` (None: positions 0..m-1), float32 [N, B, M]."""
  scales_M = position_scales(inner)
  if rel_NxBxM is None:
    return jnp.broadcast_to(scales_M[:m], (n, batch, m))
  return scales_M[rel_NxBxM]


def mixing_matrix(q_BxHxMxK: jax.Array, k_BxHxMxK: jax.Array, eta_BxHxM: jax.Array,
                  scale_BxM: jax.Array, segment_ids_BxM: jax.Array | None) -> jax.Array:
  """E ∘ (Q Kᵀ + 1) [B, H, M, M] with E_ij = s_i η_j [j ≤ i, same document], float32."""
  m = q_BxHxMxK.shape[2]
  visible = jnp.tril(jnp.ones((m, m), bool))                                   # [M, M]
  if segment_ids_BxM is not None:
    same_BxMxM = segment_ids_BxM[:, :, None] == segment_ids_BxM[:, None, :]
    visible = (visible & same_BxMxM)[:, None]                                  # [B,1,M,M]
  scores = jnp.einsum("bhik,bhjk->bhij", q_BxHxMxK, k_BxHxMxK,
                      preferred_element_type=F32) + 1.0                        # C2
  return jnp.where(visible, scale_BxM[:, None, :, None] * eta_BxHxM[:, :, None, :] * scores,
                   0.0)


def anchor_affine(inner: InnerParams, fast: FastWeights, x_BxHxMxK: jax.Array,
                  continues_BxM: jax.Array | None) -> jax.Array:
  """x W + b at each token's anchor, float32 [B, H, M, K]: the carried (W, b), or (W0, b0)
  for tokens that do not continue it. Matmul operands in the compute dtype (C1)."""
  dtype = x_BxHxMxK.dtype
  z = jnp.einsum("bhmk,bhkl->bhml", x_BxHxMxK, fast.w_BxHxKxK.astype(dtype),
                 preferred_element_type=F32) + fast.b_BxHxK[:, :, None, :]
  if continues_BxM is None:
    return z
  z0 = jnp.einsum("bhmk,hkl->bhml", x_BxHxMxK, inner.w0_HxKxK.astype(dtype),
                  preferred_element_type=F32) + inner.b0_HxK.astype(F32)[:, None, :]
  return jnp.where(continues_BxM[:, None, :, None], z, z0)


def minibatch_step(inner: InnerParams, fast: FastWeights, mb: MiniBatches, *,
                   commit: bool = True, partial: bool = False
                   ) -> tuple[FastWeights, jax.Array]:
  """One mini-batch of the dual form (``mb`` without its n axis): the inner gradients G
  at the anchor, the outputs and the state after the mini-batch. Returns (new state,
  out [B, M, H, K] in the compute dtype).

  ``partial``: the incoming running sums may be non-zero (a mini-batch continued from a
  cache). ``commit``: close the mini-batch (W <- W - s_last Σ, sums <- 0) or keep the
  anchor and the sums; ``mb.commit_N``, when given, decides instead (traced).
  """
  head_major = lambda x: jnp.swapaxes(x, 1, 2)  # [B, M, H, ...] -> [B, H, M, ...]
  q, k = head_major(mb.q_NxBxMxHxK), head_major(mb.k_NxBxMxHxK)
  dtype = q.dtype
  ln_scale, ln_bias = inner.ln_scale_HxK[None, :, None, :], inner.ln_bias_HxK[None, :, None, :]
  continues_BxM = mb.continues_NxBxM
  scale_BxM = mb.scale_NxBxM
  # G: one LN forward/backward at the anchor (C3).
  g_BxHxMxK = inner_loss_grad(anchor_affine(inner, fast, k, continues_BxM),
                              head_major(mb.target_NxBxMxHxK), ln_scale, ln_bias)
  # Z = Q W + b - (E ∘ (Q Kᵀ + 1)) G, out = q + LN(Z) (C3, C4).
  mix_BxHxMxM = mixing_matrix(q, k, head_major(mb.eta_NxBxMxH), scale_BxM,
                              mb.segment_ids_NxBxM)
  z = anchor_affine(inner, fast, q, continues_BxM) - jnp.einsum(
      "bhij,bhjl->bhil", mix_BxHxMxM, g_BxHxMxK)
  if partial:  # the open mini-batch's earlier tokens, through the running sums
    carried = (jnp.einsum("bhmk,bhkl->bhml", q.astype(F32), fast.grad_w_BxHxKxK)
               + fast.grad_b_BxHxK[:, :, None, :])
    if continues_BxM is not None:
      carried = jnp.where(continues_BxM[:, None, :, None], carried, 0.0)
    z = z - scale_BxM[:, None, :, None] * carried
  out = (q.astype(F32) + layer_norm(z, ln_scale, ln_bias, INNER_LN_EPS, one_pass=True)
         ).astype(dtype)
  out_BxMxHxK = head_major(out)
  # Running sums of the last token's fragment, on top of its anchor's: Kᵀ(e ∘ G) and
  # eᵀ G, as one matmul [(e ∘ K)ᵀ; eᵀ] G. The left operand [B, H, K+1, M] is materialised
  # in one pass from the token-major keys (the barrier keeps XLA from folding the
  # transpose into the matmul): XLA:CPU's fast matmul path wants the contracted axis last
  # on the left operand.
  eta_last_BxMxHx1 = mb.eta_last_NxBxMxH[..., None]
  weighted_kt_BxHxK1xM = jax.lax.optimization_barrier(jnp.transpose(jnp.concatenate(
      [mb.k_NxBxMxHxK.astype(F32) * eta_last_BxMxHx1, eta_last_BxMxHx1], axis=-1),
      (0, 2, 3, 1)))
  grads = jnp.einsum("bhkm,bhml->bhkl", weighted_kt_BxHxK1xM, g_BxHxMxK)
  grad_w, grad_b = grads[:, :, :-1], grads[:, :, -1]
  anchor = fast
  if continues_BxM is not None:
    anchor = _select_rows(continues_BxM[:, -1], fast,
                          init_fast_weights(inner, fast.w_BxHxKxK.shape[0]))
  if partial or continues_BxM is not None:
    grad_w = grad_w + anchor.grad_w_BxHxKxK
    grad_b = grad_b + anchor.grad_b_BxHxK
  pending = FastWeights(anchor.w_BxHxKxK, anchor.b_BxHxK, grad_w, grad_b)
  if mb.commit_N is None and not commit:
    return pending, out_BxMxHxK
  scale_last_B = scale_BxM[:, -1]
  committed = FastWeights(anchor.w_BxHxKxK - scale_last_B[:, None, None, None] * grad_w,
                          anchor.b_BxHxK - scale_last_B[:, None, None] * grad_b,
                          jnp.zeros_like(grad_w), jnp.zeros_like(grad_b))
  if mb.commit_N is not None:
    commit_B = jnp.broadcast_to(mb.commit_N, scale_last_B.shape)
    committed = _select_rows(commit_B, committed, pending)
  return committed, out_BxMxHxK


def scan_minibatches(body: Callable, carry, xs, remat_group: int):
  """``jax.lax.scan(body, carry, xs)``; with remat_group g > 0 the mini-batches run in
  groups of g, each group rematerialised in the backward pass from its carried state
  (a shorter tail group runs without remat)."""
  n = jax.tree.leaves(xs)[0].shape[0]
  if remat_group <= 0 or n < 2:
    return jax.lax.scan(body, carry, xs)
  group = min(remat_group, n)
  n_groups, tail = divmod(n, group)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def group_body(carry, group_xs):
    return jax.lax.scan(body, carry, group_xs)

  head = jax.tree.map(lambda a: a[:n_groups * group].reshape((n_groups, group) + a.shape[1:]),
                      xs)
  carry, ys = jax.lax.scan(group_body, carry, head)
  ys = jax.tree.map(lambda a: a.reshape((n_groups * group,) + a.shape[2:]), ys)
  if tail:
    carry, tail_ys = jax.lax.scan(body, carry, jax.tree.map(lambda a: a[n_groups * group:], xs))
    ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, tail_ys)
  return carry, ys


def run_minibatches(inner: InnerParams, fast: FastWeights, mbs: MiniBatches, *,
                    commit: bool = True, partial: bool = False, remat_group: int = 0
                    ) -> tuple[FastWeights, jax.Array]:
  """Scans ``minibatch_step`` over the n mini-batches: (state after them, out
  [N, B, M, H, K] compute dtype)."""
  body = lambda fast, mb: minibatch_step(inner, fast, mb, commit=commit, partial=partial)
  # The backward recomputes each mini-batch from its anchor and inputs (all the scan
  # saves): cheaper than storing and re-reading its intermediates.
  body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable,
                        prevent_cse=False)
  return scan_minibatches(body, fast, mbs, remat_group)


def _to_chunks(x_BxTx: jax.Array, n: int, size: int) -> jax.Array:
  """[B, n*size, ...] -> [n, B, size, ...]."""
  batch = x_BxTx.shape[0]
  return jnp.moveaxis(x_BxTx.reshape((batch, n, size) + x_BxTx.shape[2:]), 1, 0)


def _from_chunks(x_NxBxMx: jax.Array) -> jax.Array:
  """[n, B, size, ...] -> [B, n*size, ...]."""
  n, batch, size = x_NxBxMx.shape[:3]
  return jnp.moveaxis(x_NxBxMx, 0, 1).reshape((batch, n * size) + x_NxBxMx.shape[3:])


def _post_norm(out_NxBxMxHxK: jax.Array, post_norm: tuple[jax.Array, jax.Array] | None
               ) -> jax.Array:
  """LN_post over the concatenated heads [n, B, M, N] (None: out unchanged)."""
  if post_norm is None:
    return out_NxBxMxHxK
  x_NxBxMxN = out_NxBxMxHxK.reshape(out_NxBxMxHxK.shape[:3] + (-1,))
  return layer_norm(x_NxBxMxN, *post_norm, POST_LN_EPS).astype(out_NxBxMxHxK.dtype)


def ttt_linear_dual(inner: InnerParams, q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array,
                    v_BxTxHxK: jax.Array, eta_BxTxH: jax.Array, *, mini_batch: int,
                    remat_group: int = 0, segment_ids_BxT: jax.Array | None = None,
                    state: TTTState | None = None, rope_theta: float | None = None,
                    post_norm: tuple[jax.Array, jax.Array] | None = None,
                    valid_BxT: jax.Array | None = None) -> tuple[jax.Array, TTTState]:
  """Anchored mini-batch TTT over a whole sequence in the dual form.

  Returns the outputs out_t [B, T, H, K] (compute dtype) and the float32 state after the
  last token (a trailing partial mini-batch is left open: anchor + running sums).
  Without ``state`` the rows start at (W0, b0) on the grid's slot 0; a remainder
  mini-batch is padded to b tokens with η = 0 (padding updates nothing; its outputs are
  dropped) and left open. With ``state`` (a cache, no segment ids) the tokens continue
  each row's open mini-batch; ``valid_BxT`` (with a state only) leaves out the tokens
  where it is False (pads: no update, zero outputs). With ``rope_theta``, q and k are
  first rotated by RoPE at their positions inside their mini-batches (in the same pass
  that cuts them into mini-batches).
  With ``post_norm`` = (scale [N], shift [N]) the outputs are LN_post(concat heads out_t)
  [B, T, N] instead (the layer's post-LayerNorm, applied before the outputs are copied
  back to sequence order, so the copy and the normalisation are one pass).
  """
  batch, length, _, _ = q_BxTxHxK.shape
  size = mini_batch
  if state is not None:
    if segment_ids_BxT is not None:
      raise ValueError("ttt_linear_dual: segment_ids cannot be combined with a carried state")
    return _dual_from_state(inner, q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, eta_BxTxH, size,
                            remat_group, state, rope_theta, post_norm, valid_BxT)
  if valid_BxT is not None:
    raise ValueError("ttt_linear_dual: valid_BxT needs a carried state (decode)")
  n_full, remainder = divmod(length, size)
  n_chunks = n_full + (remainder > 0)
  pad = n_chunks * size - length

  def chunks(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
    return _to_chunks(x, n_chunks, size)

  rel = segments = continues = None
  if segment_ids_BxT is not None:  # padding continues the last document
    segment_ids_BxS = jnp.pad(segment_ids_BxT, ((0, 0), (0, pad)), mode="edge")
    rel_BxS, continues_BxS = minibatch_layout(batch, length + pad, size, segment_ids_BxS)
    rel, continues, segments = (_to_chunks(x, n_chunks, size)
                                for x in (rel_BxS, continues_BxS, segment_ids_BxS))
  mbs = minibatch_inputs(
      chunks(q_BxTxHxK), chunks(k_BxTxHxK), chunks(v_BxTxHxK), chunks(eta_BxTxH.astype(F32)),
      chunked_scales(inner, n_chunks, batch, size, rel), rope_theta, rel, segments, continues,
      commit_N=jnp.arange(n_chunks) < n_full if remainder else None)
  fast, out_NxBxMxHxK = run_minibatches(inner, init_fast_weights(inner, batch), mbs,
                                        remat_group=remat_group)
  out_BxTx = _from_chunks(_post_norm(out_NxBxMxHxK, post_norm))[:, :length]
  return out_BxTx, TTTState(fast, jnp.asarray(remainder, jnp.int32))


def _dual_from_state(inner: InnerParams, q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, eta_BxTxH,
                     size: int, remat_group: int, state: TTTState,
                     rope_theta: float | None,
                     post_norm: tuple[jax.Array, jax.Array] | None,
                     valid_BxT: jax.Array | None = None) -> tuple[jax.Array, TTTState]:
  """Each row's tokens are placed at slots index_b.. of a buffer of whole mini-batches (so
  a token's slot in its mini-batch is its RoPE position), the invalid ones (pads) left
  out; empty slots have η = 0 (no update), and a row's mini-batch closes only if its
  last slot is filled."""
  batch, length = q_BxTxHxK.shape[:2]
  offset_B = jnp.broadcast_to(state.index, (batch,))
  n_chunks = -(-(length + size - 1) // size)
  span = n_chunks * size
  if valid_BxT is None:
    count = length
    slot_BxT = offset_B[:, None] + jnp.arange(length, dtype=jnp.int32)[None]
  else:
    rank_BxT = jnp.cumsum(valid_BxT, axis=1, dtype=jnp.int32) - 1
    count = rank_BxT[:, -1] + 1
    slot_BxT = jnp.where(valid_BxT, offset_B[:, None] + rank_BxT, span)  # span: dropped
  rows_Bx1 = jnp.arange(batch)[:, None]

  def place(x):
    buffer = jnp.zeros((batch, span) + x.shape[2:], x.dtype)
    return _to_chunks(buffer.at[rows_Bx1, slot_BxT].set(x, mode="drop"), n_chunks, size)

  last_slot_N = jnp.arange(n_chunks, dtype=jnp.int32) * size + size - 1
  mbs = minibatch_inputs(place(q_BxTxHxK), place(k_BxTxHxK), place(v_BxTxHxK),
                         place(eta_BxTxH.astype(F32)),
                         chunked_scales(inner, n_chunks, batch, size), rope_theta,
                         commit_N=last_slot_N[:, None] < (offset_B + count)[None])
  fast, out_NxBxMxHxK = run_minibatches(inner, state.fast, mbs, partial=True,
                                        remat_group=remat_group)
  out_BxSx = _from_chunks(_post_norm(out_NxBxMxHxK, post_norm))
  out_BxTx = out_BxSx[rows_Bx1, jnp.minimum(slot_BxT, span - 1)]
  if valid_BxT is not None:
    out_BxTx = jnp.where(valid_BxT.reshape(valid_BxT.shape + (1,) * (out_BxTx.ndim - 2)),
                         out_BxTx, 0)
  return out_BxTx, TTTState(fast, ((state.index + count) % size).astype(jnp.int32))


# ----------------------------------------------------------------------------- primal form


def anchored_token_step(inner: InnerParams, fast: FastWeights, q_BxHxK: jax.Array,
                        k_BxHxK: jax.Array, v_BxHxK: jax.Array, eta_BxH: jax.Array,
                        rel_B: jax.Array, commit_B: jax.Array
                        ) -> tuple[FastWeights, jax.Array]:
  """One token of anchored mini-batch GD, primal form: g by autodiff at the anchor,
  added to the running sums; output from W_i = W - s_rel Σ; close the mini-batch
  (W <- W_i, sums <- 0) where ``commit``. Output in the compute dtype."""
  dtype = q_BxHxK.dtype
  ln_scale, ln_bias = inner.ln_scale_HxK[None], inner.ln_bias_HxK[None]
  zk_BxHxK = jnp.einsum("bhk,bhkl->bhl", k_BxHxK, fast.w_BxHxKxK.astype(dtype),
                        preferred_element_type=F32) + fast.b_BxHxK                # C1
  target = v_BxHxK.astype(F32) - k_BxHxK.astype(F32)
  g_BxHxK = jax.grad(inner_loss)(zk_BxHxK, target, ln_scale, ln_bias)
  eta_BxH = eta_BxH.astype(F32)
  grad_w = fast.grad_w_BxHxKxK + jnp.einsum(
      "bhk,bhl->bhkl", k_BxHxK.astype(F32) * eta_BxH[..., None], g_BxHxK)
  grad_b = fast.grad_b_BxHxK + eta_BxH[..., None] * g_BxHxK
  scale_B = position_scales(inner)[rel_B]
  w_now = fast.w_BxHxKxK - scale_B[:, None, None, None] * grad_w
  b_now = fast.b_BxHxK - scale_B[:, None, None] * grad_b
  zq_BxHxK = jnp.einsum("bhk,bhkl->bhl", q_BxHxK, w_now.astype(dtype),
                        preferred_element_type=F32) + b_now
  out_BxHxK = q_BxHxK.astype(F32) + layer_norm(zq_BxHxK, ln_scale, ln_bias, INNER_LN_EPS)
  closed = FastWeights(w_now, b_now, jnp.zeros_like(grad_w), jnp.zeros_like(grad_b))
  open_ = FastWeights(fast.w_BxHxKxK, fast.b_BxHxK, grad_w, grad_b)
  return _select_rows(commit_B, closed, open_), out_BxHxK.astype(dtype)


def ttt_linear_primal_anchored(inner: InnerParams, q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array,
                               v_BxTxHxK: jax.Array, eta_BxTxH: jax.Array, *,
                               mini_batch: int, segment_ids_BxT: jax.Array | None = None,
                               state: TTTState | None = None) -> tuple[jax.Array, TTTState]:
  """Token-by-token reference of ``ttt_linear_dual`` (same arguments and results).

  A ``jax.lax.scan`` over tokens; at a document's first token (t > 0) the row is reset
  to (W0, b0); a mini-batch closes at grid slot b-1.
  """
  batch, length = q_BxTxHxK.shape[:2]
  size = mini_batch
  if state is None:
    state = init_state(inner, batch)
  offset = state.index
  rel_BxT, _ = minibatch_layout(batch, length, size, segment_ids_BxT, offset)
  if segment_ids_BxT is None:
    new_doc_BxT = jnp.zeros((batch, length), bool)
  else:
    new_doc_BxT = jnp.concatenate(
        [jnp.zeros((batch, 1), bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  slot_T = (jnp.arange(length, dtype=jnp.int32) + offset) % size
  fresh = init_fast_weights(inner, batch)

  def step(fast, token):
    q, k, v, eta, rel, new_doc, slot = token
    fast = _select_rows(new_doc, fresh, fast)
    commit_B = jnp.broadcast_to(slot == size - 1, (batch,))
    return anchored_token_step(inner, fast, q, k, v, eta, rel, commit_B)

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  xs = tuple(map(time_major, (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, eta_BxTxH, rel_BxT,
                              new_doc_BxT))) + (slot_T,)
  fast, out_TxBxHxK = jax.lax.scan(step, state.fast, xs)
  index = ((offset + length) % size).astype(jnp.int32)
  return jnp.moveaxis(out_TxBxHxK, 0, 1), TTTState(fast, index)


# ----------------------------------------------------------------------------- layer


def causal_depthwise_conv(x_BxTxN: jax.Array, filter_WxN: jax.Array, bias_N: jax.Array,
                          history_BxPxN: jax.Array | None = None,
                          segment_ids_BxT: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """y_t = bias + Σ_{τ<W} filter[τ] ∘ x_{t-W+1+τ}, as W shifted multiply-adds (float32
  accumulation). Inputs before t = 0 come from ``history`` (the previous W-1 inputs;
  zeros if None); with segment ids a tap reading another document is dropped.
  Returns (y in x's dtype, the last W-1 inputs for the next call)."""
  batch, length, width_n = x_BxTxN.shape
  width = filter_WxN.shape[0]
  if history_BxPxN is None:
    history_BxPxN = jnp.zeros((batch, width - 1, width_n), x_BxTxN.dtype)
  x_ext = jnp.concatenate([history_BxPxN.astype(x_BxTxN.dtype), x_BxTxN], axis=1)
  y_BxTxN = jnp.broadcast_to(bias_N.astype(F32), (batch, length, width_n))
  for tau in range(width):
    shift = width - 1 - tau
    tap_BxTxN = x_ext[:, tau:tau + length].astype(F32)
    if segment_ids_BxT is not None and shift:
      earlier = jnp.pad(segment_ids_BxT, ((0, 0), (shift, 0)), mode="edge")[:, :length]
      tap_BxTxN = jnp.where((earlier == segment_ids_BxT)[..., None], tap_BxTxN, 0.0)
    y_BxTxN = y_BxTxN + filter_WxN[tau].astype(F32) * tap_BxTxN
  return y_BxTxN.astype(x_BxTxN.dtype), x_ext[:, x_ext.shape[1] - (width - 1):]


def history_without_pads(history_BxPxN: jax.Array, valid_BxS: jax.Array) -> jax.Array:
  """A conv history after a decode chunk with the pads' inputs zeroed. Pads lead the
  first chunk of a fresh cache, so this is the history of the real tokens alone (zeros
  before a sequence's first token)."""
  batch, width = history_BxPxN.shape[:2]
  valid_BxP = jnp.concatenate([jnp.ones((batch, width), bool), valid_BxS], axis=1)[:, -width:]
  return jnp.where(valid_BxP[..., None], history_BxPxN, jnp.zeros((), history_BxPxN.dtype))


def pad_segments(valid_BxS: jax.Array | None) -> jax.Array | None:
  """Segment ids that keep a conv's taps of real tokens off the pads (None: no pads)."""
  return None if valid_BxS is None else valid_BxS.astype(jnp.int32)


def inner_learning_rate(lr_logits_BxTxH: jax.Array, bias_H: jax.Array, base_lr: float,
                        head_dim: int) -> jax.Array:
  """η = η_base σ(x θ_lr + β) / K from the logits x θ_lr, float32 [B, T, H]."""
  return base_lr * jax.nn.sigmoid(lr_logits_BxTxH.astype(F32) + bias_H.astype(F32)) / head_dim


class Projected(NamedTuple):
  """The layer's per-token inputs to the inner model and the output gate."""
  q_BxTxHxK: jax.Array
  """Queries after the Q conv (mamba) and RoPE (when asked for), compute dtype."""
  k_BxTxHxK: jax.Array
  v_BxTxHxK: jax.Array
  eta_BxTxH: jax.Array
  """Inner learning rates, float32."""
  gate_BxTxN: jax.Array | None
  """gelu(x θ_G) (mamba) or None."""
  qk_history_BxPxN: jax.Array | None
  """The conv input history after these tokens (mamba) or None."""


def minibatch_rope(x_xMxHxK: jax.Array, rel_xM: jax.Array | None, mini_batch: int,
                   theta: float) -> jax.Array:
  """RoPE at the positions inside the mini-batch (``rel``, 0..b-1; None: x's token axis
  is one whole mini-batch, slots 0..b-1). The cos and sin of those b positions are a
  table computed while tracing and gathered at ``rel``, so no cos or sin runs per token
  (or, once XLA fuses them into their consumers, per element)."""
  with jax.ensure_compile_time_eval():
    angles_MxK2 = rope_angles(jnp.arange(mini_batch)[None], x_xMxHxK.shape[-1], theta)[0]
    cos_MxK2, sin_MxK2 = jnp.cos(angles_MxK2), jnp.sin(angles_MxK2)
  if rel_xM is not None:
    cos_MxK2, sin_MxK2 = cos_MxK2[rel_xM], sin_MxK2[rel_xM]
  return rope_rotate(x_xMxHxK, cos_MxK2[..., None, :], sin_MxK2[..., None, :])


def project_inputs(params: TTTLinearParams, spec: TTTSpec, x_BxTxD: jax.Array,
                   rel_BxT: jax.Array | None, history_BxPxN: jax.Array | None,
                   segment_ids_BxT: jax.Array | None = None) -> Projected:
  """Every input projection (θ_Q, θ_K or θ_QK, θ_V, θ_G, θ_lr; float32 accumulation),
  then the convs and RoPE at ``rel`` (None: no RoPE; the dual form rotates q and k
  itself, in the copy that cuts them into mini-batches)."""
  batch, length, _ = x_BxTxD.shape
  dtype = x_BxTxD.dtype
  mamba = spec.backbone == "mamba"
  weights = ([params.wq_DxN, params.wv_DxN, params.wg_DxN] if mamba
             else [params.wq_DxN, params.wk_DxN, params.wv_DxN])
  # One matmul per projection: XLA:CPU runs three [D, N] products faster than one
  # [D, 3N + H] product over the concatenated weights.
  parts = [dense(x_BxTxD, w.astype(dtype), preferred_element_type=F32).astype(dtype)
           for w in weights]
  lr_logits_BxTxH = dense(x_BxTxD, params.lr_gate_DxH.astype(dtype), preferred_element_type=F32)
  gate_BxTxN = None
  if mamba:
    qk_BxTxN, v_BxTxN, gate_BxTxN = parts
    gate_BxTxN = jax.nn.gelu(gate_BxTxN)
    q_BxTxN, _ = causal_depthwise_conv(qk_BxTxN, params.conv_q_WxN, params.conv_q_bias_N,
                                       history_BxPxN, segment_ids_BxT)
    k_BxTxN, history_BxPxN = causal_depthwise_conv(qk_BxTxN, params.conv_k_WxN,
                                                   params.conv_k_bias_N, history_BxPxN,
                                                   segment_ids_BxT)
  else:
    q_BxTxN, k_BxTxN, v_BxTxN = parts
    history_BxPxN = None
  heads = (batch, length, spec.n_heads, spec.head_dim)
  q_BxTxHxK, k_BxTxHxK = q_BxTxN.reshape(heads), k_BxTxN.reshape(heads)
  if rel_BxT is not None:
    q_BxTxHxK = minibatch_rope(q_BxTxHxK, rel_BxT, spec.mini_batch, spec.rope_theta)
    k_BxTxHxK = minibatch_rope(k_BxTxHxK, rel_BxT, spec.mini_batch, spec.rope_theta)
  eta_BxTxH = inner_learning_rate(lr_logits_BxTxH, params.lr_bias_H, spec.base_lr,
                                  spec.head_dim)
  return Projected(q_BxTxHxK, k_BxTxHxK, v_BxTxN.reshape(heads), eta_BxTxH, gate_BxTxN,
                   history_BxPxN)


def post_norm(params: TTTLinearParams, spec: TTTSpec, out_BxTxHxK: jax.Array) -> jax.Array:
  """LN_post(concat heads) [B, T, N], in the outputs' dtype (the dual form applies it
  itself, see ``ttt_linear_dual``)."""
  batch, length = out_BxTxHxK.shape[:2]
  return layer_norm(out_BxTxHxK.reshape(batch, length, spec.width), params.post_scale_N,
                    params.post_bias_N, POST_LN_EPS).astype(out_BxTxHxK.dtype)


def output_projection(params: TTTLinearParams, gate_BxTxN: jax.Array | None,
                      z_BxTxN: jax.Array) -> jax.Array:
  """(gate ∘) z θ_O for z = LN_post(concat heads), in z's dtype."""
  dtype = z_BxTxN.dtype
  if gate_BxTxN is not None:
    z_BxTxN = gate_BxTxN * z_BxTxN
  return dense(z_BxTxN, params.wo_NxD.astype(dtype))


def ttt_linear_forward(params: TTTLinearParams, spec: TTTSpec, x_BxTxD: jax.Array,
                       segment_ids_BxT: jax.Array | None = None,
                       cache: TTTCache | None = None, inner_form: str = "dual",
                       valid_BxT: jax.Array | None = None) -> tuple[jax.Array, TTTCache]:
  """The layer over a sequence: (y [B, T, D], cache after it). ``cache`` continues a
  decode (prefill); ``inner_form`` 'dual' (default) or 'primal' (the reference).
  ``valid_BxT`` (dual form with a cache): False marks pads, leading a fresh cache's first
  chunk (ragged prompts), which neither update the state nor reach the convs."""
  batch, length, _ = x_BxTxD.shape
  offset = 0 if cache is None else cache.state.index
  history = None if cache is None else cache.qk_history_BxPxN
  if inner_form not in ("dual", "primal"):
    raise ValueError(f"inner_form must be 'dual' or 'primal', got {inner_form!r}")
  rel_BxT = None  # the dual form applies RoPE itself
  if inner_form == "primal":
    rel_BxT, _ = minibatch_layout(batch, length, spec.mini_batch, segment_ids_BxT, offset)
  if valid_BxT is not None and segment_ids_BxT is not None:
    raise ValueError("ttt_linear_forward: segment_ids cannot be combined with valid_BxT")
  if valid_BxT is not None:
    segment_ids_BxT = pad_segments(valid_BxT)  # for the convs only
  inputs = project_inputs(params, spec, x_BxTxD, rel_BxT, history, segment_ids_BxT)
  q, k, v, eta = inputs.q_BxTxHxK, inputs.k_BxTxHxK, inputs.v_BxTxHxK, inputs.eta_BxTxH
  state = None if cache is None else cache.state
  if inner_form == "dual":
    z_BxTxN, state = ttt_linear_dual(params.inner, q, k, v, eta, mini_batch=spec.mini_batch,
                                     remat_group=spec.remat_group,
                                     segment_ids_BxT=(None if valid_BxT is not None
                                                      else segment_ids_BxT),
                                     state=state, rope_theta=spec.rope_theta,
                                     post_norm=(params.post_scale_N, params.post_bias_N),
                                     valid_BxT=valid_BxT)
  else:
    out_BxTxHxK, state = ttt_linear_primal_anchored(params.inner, q, k, v, eta,
                                                    mini_batch=spec.mini_batch,
                                                    segment_ids_BxT=segment_ids_BxT,
                                                    state=state)
    z_BxTxN = post_norm(params, spec, out_BxTxHxK)
  y_BxTxD = output_projection(params, inputs.gate_BxTxN, z_BxTxN)
  history = inputs.qk_history_BxPxN
  if valid_BxT is not None and history is not None:
    history = history_without_pads(history, valid_BxT)
  return y_BxTxD, TTTCache(state, history)


def init_cache(params: TTTLinearParams, spec: TTTSpec, batch_size: int,
               dtype: jnp.dtype) -> TTTCache:
  """Empty decode state: every row at (W0, b0), slot 0 (a slot per row), zero conv
  history."""
  history = None
  if spec.backbone == "mamba":
    history = jnp.zeros((batch_size, spec.conv_width - 1, spec.width), dtype)
  state = TTTState(init_fast_weights(params.inner, batch_size),
                   jnp.zeros((batch_size,), jnp.int32))
  return TTTCache(state, history)


def ttt_linear_decode_step(params: TTTLinearParams, spec: TTTSpec, cache: TTTCache,
                           x_BxD: jax.Array, valid_B: jax.Array | None = None
                           ) -> tuple[TTTCache, jax.Array]:
  """One token through the layer, O(1) memory: (new cache, y [B, D]). Each row is at its
  own slot of its mini-batch (the cache's index, scalar or [B]); where ``valid_B`` is
  False (a pad) the row's state is left as it was."""
  batch = x_BxD.shape[0]
  index_B = jnp.broadcast_to(cache.state.index, (batch,)).astype(jnp.int32)
  x_Bx1xD = x_BxD[:, None, :]
  valid_Bx1 = None if valid_B is None else valid_B[:, None]
  inputs = project_inputs(params, spec, x_Bx1xD, index_B[:, None], cache.qk_history_BxPxN,
                          pad_segments(valid_Bx1))
  commit_B = index_B == spec.mini_batch - 1
  fast, out_BxHxK = anchored_token_step(
      params.inner, cache.state.fast, inputs.q_BxTxHxK[:, 0], inputs.k_BxTxHxK[:, 0],
      inputs.v_BxTxHxK[:, 0], inputs.eta_BxTxH[:, 0], index_B, commit_B)
  y_BxD = output_projection(params, inputs.gate_BxTxN,
                            post_norm(params, spec, out_BxHxK[:, None]))[:, 0]
  index = ((cache.state.index + 1) % spec.mini_batch).astype(jnp.int32)
  history = inputs.qk_history_BxPxN
  if valid_B is not None:
    fast = _select_rows(valid_B, fast, cache.state.fast)
    index = jnp.where(valid_B, index, cache.state.index)
    if history is not None:
      history = history_without_pads(history, valid_Bx1)
  return TTTCache(TTTState(fast, index), history), y_BxD


def flops_per_token(spec: TTTSpec, d_model: int) -> float:
  """Forward matmul FLOPs per token of one layer (2 per multiply-add):
  projections (θ_Q, θ_K or θ_QK, θ_V, θ_O, θ_G for mamba, θ_lr) plus per head the
  dual form's k W, q W and Kᵀ G (3 · 2K²) and q Kᵀ, (E∘·) G (2 · 2bK)."""
  n = spec.width
  projections = 2 * 4 * d_model * n + 2 * d_model * spec.n_heads  # (q,k,v,o) | (qk,v,g,o)
  inner = spec.n_heads * (3 * 2 * spec.head_dim ** 2 + 2 * 2 * spec.mini_batch * spec.head_dim)
  return float(projections + inner)


# ----------------------------------------------------------------------------- modules


@registry.MIXERS.register("ttt_linear")
class TTTLinear(nnx.Module):
  """TTT-Linear mixer (lm.py's ``Mixer`` interface); holds the parameters and calls the
  functions above. ``positions`` are not read: the mini-batch grid is the token order.

  Inits: projections N(0, init_std²), θ_O scaled by 1/sqrt(2 n_layers); W0 N(0,
  init_std²), b0 0; conv filters N(0, 1/W) (variance-preserving), biases 0; inner and
  post LN scale 1, shift 0; θ_lr N(0, init_std²), β 0; s_i = 1/(i+1).
  Logical axes: projections ('embed', 'heads') / ('heads', 'embed'); W0 ('heads',
  'head_dim', 'fast') and b0 ('heads', 'fast'): 'fast' marks the inner model's learned
  initial state (Adam, no weight decay; sharded over fsdp by the default rules); θ_lr
  ('embed', 'gate') and β, s ('gate'): the inner learning-rate gate (no weight decay).
  """

  Config = TTTLinearConfig
  RAGGED_DECODE = True
  """Decodes left-padded prompts (pads at negative positions update nothing)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    spec = TTTSpec.from_config(cfg)
    self.spec = spec
    d, n, heads, k = cfg.d_model, spec.width, spec.n_heads, spec.head_dim
    dtype = jnp.dtype(cfg.param_dtype)
    std = cfg.init_std
    out_std = std / (2 * cfg.n_layers) ** 0.5
    conv_std = 1.0 / math.sqrt(spec.conv_width)
    mamba = spec.backbone == "mamba"
    self.wq = param(normal(rngs.params(), (d, n), std, dtype), ("embed", "heads"))
    self.wk = (None if mamba else
               param(normal(rngs.params(), (d, n), std, dtype), ("embed", "heads")))
    self.wv = param(normal(rngs.params(), (d, n), std, dtype), ("embed", "heads"))
    self.wo = param(normal(rngs.params(), (n, d), out_std, dtype), ("heads", "embed"))
    if mamba:
      self.conv_q = param(normal(rngs.params(), (spec.conv_width, n), conv_std, dtype),
                          ("conv", "heads"))
      self.conv_q_bias = param(jnp.zeros((n,), dtype), ("heads",))
      self.conv_k = param(normal(rngs.params(), (spec.conv_width, n), conv_std, dtype),
                          ("conv", "heads"))
      self.conv_k_bias = param(jnp.zeros((n,), dtype), ("heads",))
      self.wg = param(normal(rngs.params(), (d, n), std, dtype), ("embed", "heads"))
    else:
      self.conv_q = self.conv_q_bias = self.conv_k = self.conv_k_bias = self.wg = None
    self.lr_gate = param(normal(rngs.params(), (d, heads), std, dtype), ("embed", "gate"))
    self.lr_bias = param(jnp.zeros((heads,), dtype), ("gate",))
    self.w0 = param(normal(rngs.params(), (heads, k, k), std, dtype),
                    ("heads", "head_dim", "fast"))
    self.b0 = param(jnp.zeros((heads, k), dtype), ("heads", "fast"))
    self.ln_scale = param(jnp.ones((heads, k), dtype), ("heads", "norm"))
    self.ln_bias = param(jnp.zeros((heads, k), dtype), ("heads", "norm"))
    self.position_scale = param(
        (1.0 / jnp.arange(1, spec.mini_batch + 1, dtype=F32)).astype(dtype), ("gate",))
    self.post_scale = param(jnp.ones((n,), dtype), ("heads",))
    self.post_bias = param(jnp.zeros((n,), dtype), ("heads",))

  def params(self) -> TTTLinearParams:
    value = lambda p: None if p is None else p[...]
    return TTTLinearParams(
        wq_DxN=value(self.wq), wk_DxN=value(self.wk), wv_DxN=value(self.wv),
        wo_NxD=value(self.wo), conv_q_WxN=value(self.conv_q),
        conv_q_bias_N=value(self.conv_q_bias), conv_k_WxN=value(self.conv_k),
        conv_k_bias_N=value(self.conv_k_bias), wg_DxN=value(self.wg),
        lr_gate_DxH=value(self.lr_gate), lr_bias_H=value(self.lr_bias),
        inner=InnerParams(value(self.w0), value(self.b0), value(self.ln_scale),
                          value(self.ln_bias), value(self.position_scale)),
        post_scale_N=value(self.post_scale), post_bias_N=value(self.post_bias))

  @staticmethod
  def pre_sublayers(cfg: ModelConfig) -> tuple[tuple[str, type], ...]:
    """The mamba backbone's causal conv sublayer."""
    return (("pre_conv", PreConv),) if cfg.mixer.backbone == "mamba" else ()

  def __call__(self, x_BxTxD: jax.Array, ctx: SequenceContext) -> jax.Array:
    # positions are not read: the mini-batch grid is the token order
    y_BxTxD, _ = ttt_linear_forward(self.params(), self.spec, x_BxTxD, ctx.segment_ids_BxT)
    return y_BxTxD

  def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype,
                 options: dict | None = None) -> TTTCache:
    del max_len, options  # O(1) state
    return init_cache(self.params(), self.spec, batch_size, dtype)

  def decode(self, x_BxSxD: jax.Array, ctx: SequenceContext, cache: TTTCache
             ) -> tuple[jax.Array, TTTCache]:
    """S = 1: one primal anchored step; S > 1 (prefill): the dual form continuing each
    row's open mini-batch. Tokens at negative positions are pads (ragged prompts, left
    padded): they leave the state and the conv history untouched."""
    valid_BxS = ctx.positions_BxT >= 0
    if x_BxSxD.shape[1] == 1:
      cache, y_BxD = ttt_linear_decode_step(self.params(), self.spec, cache, x_BxSxD[:, 0],
                                            valid_BxS[:, 0])
      return y_BxD[:, None], cache
    y_BxSxD, cache = ttt_linear_forward(self.params(), self.spec, x_BxSxD, cache=cache,
                                        valid_BxT=valid_BxS)
    return y_BxSxD, cache

  @staticmethod
  def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    del seq_len  # linear in the sequence length
    return flops_per_token(TTTSpec.from_config(cfg), cfg.d_model)


class PreConv(nnx.Module):
  """Mamba-backbone pre-convolution sublayer: a causal depthwise conv over the (normed)
  residual stream, run by lm.py's Block before the mixer. Filter [W, D] ('conv',
  'embed'), init N(0, 1/(W · 2 n_layers)) (an output into the residual stream); bias 0.
  Decode keeps the last W-1 inputs."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.param_dtype)
    width = cfg.mixer.conv_width
    std = 1.0 / math.sqrt(width * 2 * cfg.n_layers)
    self.width = width
    self.filter = param(normal(rngs.params(), (width, cfg.d_model), std, dtype),
                        ("conv", "embed"))
    self.bias = param(jnp.zeros((cfg.d_model,), dtype), ("embed",))

  def __call__(self, x_BxTxD: jax.Array, ctx: SequenceContext) -> jax.Array:
    y_BxTxD, _ = causal_depthwise_conv(x_BxTxD, self.filter[...], self.bias[...], None,
                                       ctx.segment_ids_BxT)
    return y_BxTxD

  def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype,
                 options: dict | None = None) -> jax.Array:
    del max_len, options  # the last W-1 inputs
    return jnp.zeros((batch_size, self.width - 1, self.filter.shape[1]), dtype)

  def decode(self, x_BxSxD: jax.Array, ctx: SequenceContext, history_BxPxD: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    """The history is the causal context; pads (negative positions) are left out of it."""
    valid_BxS = ctx.positions_BxT >= 0
    y_BxSxD, history_BxPxD = causal_depthwise_conv(x_BxSxD, self.filter[...], self.bias[...],
                                                   history_BxPxD, pad_segments(valid_BxS))
    return y_BxSxD, history_without_pads(history_BxPxD, valid_BxS)

  @staticmethod
  def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """A depthwise convolution: no matmul FLOPs (the module docstring of lm.py)."""
    del cfg, seq_len
    return 0.0
