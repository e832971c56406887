"""mHC: manifold-constrained hyper-connections (Xie et al., 2025, arXiv 2512.24880).

The residual stream is widened to n parallel streams X in R^{n x D} per token (shape
[B, T, n, D]; n = ``model.residual.streams``). It is expanded **once** after the embedding and
reduced **once** before the final norm:

    X_0[i] = x_0 + e_i                   copy plus a learnable per-stream embedding e [n, D]
    x_out  = (1/n) sum_i X_L[i]          mean over streams

Each block has two mHC sites, around the mixer and around the MLP (Eq. 3 of HC with the
constrained maps of mHC); the sublayer F keeps its own pre-norm on the collapsed input:

    X' = H_res X + H_post^T F(rms_norm(H_pre X))          H_pre, H_post in R^{1 x n}

Eq. 7, dynamic plus static maps from the flattened stream x = vec(X) in R^{nD}:

    x'      = x / rms(x)                               (RMSNorm over nD, no gain)
    H~_pre  = a_pre  * (x' phi_pre)      + b_pre       phi_pre  in R^{nD x n}
    H~_post = a_post * (x' phi_post)     + b_post      phi_post in R^{nD x n}
    H~_res  = a_res  * mat(x' phi_res)   + b_res       phi_res  in R^{nD x n^2}

The three projections are one matmul with phi = [phi_pre | phi_post | phi_res] in
R^{nD x (2n + n^2)}, and the normalisation is applied after it, (x phi) / rms(x), so
the nD-wide x' is never formed (an RMSNorm gain would be a diagonal reparametrisation
of phi, so none is kept).

Eq. 8, the constrained maps (logits clamped to [-c, c] first, which keeps every map
finite and H_pre, H_post strictly inside their open intervals in float32):

    H_pre  = sigmoid(H~_pre)              in (0, 1)
    H_post = 2 sigmoid(H~_post)           in (0, 2)
    H_res  = SinkhornKnopp(H~_res)        doubly stochastic (Birkhoff polytope)

Eq. 9, Sinkhorn-Knopp, always in float32, t_max alternating column/row normalisations:

    M^(0) = exp(clamp(H~_res, -c, c))
    M^(t) = T_r(T_c(M^(t-1))),   T_c(M)_ij = M_ij / (sum_k M_kj + eps),
                                 T_r(M)_ij = M_ij / (sum_k M_ik + eps)

A doubly stochastic H_res preserves the per-token mean over streams:
(1/n) 1^T H_res X = (1/n) 1^T X. Rows are exact after the last T_r; columns converge
at a rate set by the spread of the logits (measured in tests/test_mhc.py).

Bias initialisation (``INIT_CONVENTIONS``, chosen by ``init``); a = ``alpha_init``
(0.01), phi ~ N(0, init_std^2):

    'seed'         b_pre = logit(1/n), b_post = logit(1/(2n)), b_res = +2 on the
                   diagonal and -2 off it (H_pre = H_post = 1/n, H_res ~ 0.948 I + 0.017
                   off-diagonal): the handoff's choice (its section 6) and the default.
    'seed_uniform' as 'seed' but b_res = 0 (H_res = 11^T / n, full mixing).
    'unit_post'    as 'seed' but b_post = 0 (H_post = 1): with equal streams the site is
                   exactly the plain pre-norm residual x + F(rms_norm(x)) when a = 0.

With 'seed', H_pre X is the mean stream and each stream receives F/n, so the mean
stream evolves as a plain pre-norm residual whose sublayer outputs are scaled by 1/n.

FLOPs (matmul convention of lm.py, 2 per multiply-add) per token and site:
2 nD (2n + n^2) for the phi projection, 2 n^2 D for H_res X, 2 n D for H_pre X and
2 n D for H_post^T F (the outer product and its add into the stream). Sinkhorn, the
RMS statistics and the expand/reduce are elementwise and not counted.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ttt_jax import registry
from ttt_jax.config import (ConfigError, ModelConfig, Section, check_choice, check_positive)
from ttt_jax.models.layers import RMSNorm, normal, param
from ttt_jax.registry import AxisInfo

MHC_COEFFS = "mhc_coeffs"
"""``checkpoint_name`` of H_pre, H_post and H_res (n + n + n^2 floats per token per
site), saved by the 'mhc_streams' remat policy: the block's recomputation in the
backward pass then needs no second RMS/Sinkhorn forward to get the maps back."""

INIT_CONVENTIONS = ("seed", "seed_uniform", "unit_post")
"""Named bias initialisations (module docstring), chosen by ``MHCConfig.init``."""

registry.REMAT_POLICIES.register("mhc_streams", jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(MHC_COEFFS)))
"""'mhc_streams' keeps the weight-matmul outputs (at most max(D, d_ff, 2n + n^2) wide per
token) and the mHC maps (2n + n^2), and recomputes every n*D-wide stream tensor of the
block in the backward pass."""

for _name, _info in {
    "streams": AxisInfo("the mHC residual streams", vector=True, shardable=False),
    "mhc_flat": AxisInfo("the flattened n*D mHC stream", shardable=False),
    "mhc_coeffs": AxisInfo("the 2n + n^2 mHC map logits"),
    "mhc_gates": AxisInfo("the three mHC alpha gates"),
}.items():
  registry.LOGICAL_AXES.register(_name, _info)


@dataclasses.dataclass(frozen=True)
class MHCConfig(Section):
  """``model.residual: {type: mhc, ...}``: the streams, the maps' init and the
  Sinkhorn projection."""
  type: str = "mhc"
  streams: int = 4
  """Expansion rate n, the number of parallel residual streams (at least 2)."""
  alpha_init: float = 0.01
  """Initial value of the gates a_pre, a_post, a_res on the dynamic (phi) terms."""
  init: str = "seed"
  """Bias init convention: 'seed' (H_pre = H_post = 1/n, H_res ~ identity from diagonal
  +2 / off-diagonal -2 logits), 'seed_uniform' (as seed, H_res uniform 1/n) or
  'unit_post' (as seed, H_post = 1)."""
  sinkhorn_iters: int = 20
  """Sinkhorn-Knopp iterations t_max (each a column then a row normalisation)."""
  sinkhorn_eps: float = 1e-6
  """Epsilon added to the Sinkhorn column/row sums."""
  logit_clamp: float = 15.0
  """The H~_pre/H~_post/H~_res logits are clamped to [-c, c] before sigmoid/exp."""

  def __post_init__(self):
    check_choice("model.residual", "init", self.init, INIT_CONVENTIONS)
    check_positive("model.residual", self, "streams", "sinkhorn_iters", "sinkhorn_eps",
                   "logit_clamp")
    if self.streams < 2:
      raise ConfigError(f"model.residual.streams: mhc needs at least 2 streams, got "
                        f"{self.streams} (its init sets H_pre = 1/n through a sigmoid, "
                        f"which has no finite logit at n = 1; use model.residual=plain)")


# ----------------------------------------------------------------------------- pure math


def logit(p: float) -> float:
  return math.log(p / (1.0 - p))


def init_biases(convention: str, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(b_pre [n], b_post [n], b_res [n, n]) in float32 for a named init convention."""
  if convention not in INIT_CONVENTIONS:
    raise ValueError(f"unknown mHC init {convention!r}; choose from {INIT_CONVENTIONS}")
  b_pre_N = jnp.full((n,), logit(1.0 / n), jnp.float32)
  if convention == "unit_post":
    b_post_N = jnp.zeros((n,), jnp.float32)
  else:
    b_post_N = jnp.full((n,), logit(1.0 / (2 * n)), jnp.float32)
  if convention == "seed_uniform":
    b_res_NxN = jnp.zeros((n, n), jnp.float32)
  else:
    b_res_NxN = jnp.where(jnp.eye(n, dtype=bool), 2.0, -2.0).astype(jnp.float32)
  return b_pre_N, b_post_N, b_res_NxN


def coefficient_logits(stream_BxTxNxD: jax.Array, phi_FxM: jax.Array, alpha_3: jax.Array,
                       b_pre_N: jax.Array, b_post_N: jax.Array, b_res_NxN: jax.Array,
                       eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Eq. 7: float32 (H~_pre [B,T,n], H~_post [B,T,n], H~_res [B,T,n,n]).

  One fused matmul of the flattened stream (F = nD) with phi [F, M = 2n + n^2], in the
  stream's dtype with float32 accumulation; the RMS normalisation divides its output.
  ``alpha_3`` holds (a_pre, a_post, a_res).

  The matmul reads phi transposed, [M, F], behind an optimization barrier: XLA:CPU then
  computes the weight gradient as [M, F] = g^T x, measured ~1.5x faster (forward plus
  backward) than producing the tall [F, M] = x^T g directly.
  """
  batch, length, n, d_model = stream_BxTxNxD.shape
  x_BxTxF = stream_BxTxNxD.reshape(batch, length, n * d_model)
  phi_MxF = jax.lax.optimization_barrier(phi_FxM.astype(x_BxTxF.dtype).T)
  proj_BxTxM = jnp.einsum("btf,mf->btm", x_BxTxF, phi_MxF,
                          preferred_element_type=jnp.float32)
  mean_square_BxTx1 = jnp.mean(jnp.square(x_BxTxF.astype(jnp.float32)), axis=-1,
                               keepdims=True)
  proj_BxTxM = proj_BxTxM * jax.lax.rsqrt(mean_square_BxTx1 + eps)
  alpha_3 = alpha_3.astype(jnp.float32)
  gate_M = jnp.concatenate([jnp.broadcast_to(alpha_3[0], (n,)),
                            jnp.broadcast_to(alpha_3[1], (n,)),
                            jnp.broadcast_to(alpha_3[2], (n * n,))])
  bias_M = jnp.concatenate([b_pre_N.astype(jnp.float32), b_post_N.astype(jnp.float32),
                            b_res_NxN.astype(jnp.float32).reshape(n * n)])
  logits_BxTxM = proj_BxTxM * gate_M + bias_M
  pre_BxTxN = logits_BxTxM[..., :n]
  post_BxTxN = logits_BxTxM[..., n:2 * n]
  res_BxTxNxN = logits_BxTxM[..., 2 * n:].reshape(batch, length, n, n)
  return pre_BxTxN, post_BxTxN, res_BxTxNxN


def _unrolled_sum(x: jax.Array, axis: int) -> jax.Array:
  """``jnp.sum(x, axis, keepdims=True)`` as adds of the slices: one elementwise fusion,
  no reduce kernel."""
  return sum(jax.lax.index_in_dim(x, i, axis) for i in range(x.shape[axis]))


def _reduce_sum(x: jax.Array, axis: int) -> jax.Array:
  return jnp.sum(x, axis=axis, keepdims=True)


def _sinkhorn_step_parts(matrix_NxNxX: jax.Array, eps: float,
                         axis_sum: Callable[[jax.Array, int], jax.Array]
                         ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(column sums + eps, T_c(M), row sums + eps, T_r(T_c(M))) on [n, n, ...]."""
  column_1xNxX = axis_sum(matrix_NxNxX, 0) + eps
  normalised_NxNxX = matrix_NxNxX / column_1xNxX  # T_c
  row_Nx1xX = axis_sum(normalised_NxNxX, 1) + eps
  return column_1xNxX, normalised_NxNxX, row_Nx1xX, normalised_NxNxX / row_Nx1xX  # T_r


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sinkhorn_step(matrix_NxNxX: jax.Array, eps: float) -> jax.Array:
  """One iteration T_r(T_c(M)) on [n, n, ...], with unrolled sums (one fusion)."""
  return _sinkhorn_step_parts(matrix_NxNxX, eps, _unrolled_sum)[3]


def _sinkhorn_step_fwd(matrix_NxNxX, eps):
  return _sinkhorn_step(matrix_NxNxX, eps), matrix_NxNxX


def _sinkhorn_step_bwd(eps, matrix_NxNxX, g_NxNxX):
  """The VJP of a normalisation y = M / (s + eps), s the sums over one axis, is
  (g - <g, y>) / (s + eps), with <g, y> summed over that axis. The step is recomputed
  from its input M, the only residual the scan stacks, with reduce kernels (inside the
  backward scan they are faster than unrolled sums)."""
  column, normalised, row, out = _sinkhorn_step_parts(matrix_NxNxX, eps, _reduce_sum)
  g_normalised = (g_NxNxX - _reduce_sum(g_NxNxX * out, 1)) / row
  return ((g_normalised - _reduce_sum(g_normalised * normalised, 0)) / column,)


_sinkhorn_step.defvjp(_sinkhorn_step_fwd, _sinkhorn_step_bwd)


def sinkhorn_knopp(logits_XxNxN: jax.Array, iters: int, eps: float, clamp: float) -> jax.Array:
  """Eq. 9 in float32 over the last two axes: exp of the clamped logits, then ``iters``
  column-then-row normalisations. Result is non-negative with rows summing to 1 (up to
  eps) and columns to 1 as the iteration converges.

  The iteration runs as a ``lax.scan`` on the matrices moved to [n, n, ...] (the
  batch axes minor): on CPU this is ~3x faster than unrolled normalisations over the
  two minor axes of size n, forward plus backward. Each step carries a hand-written VJP
  (``_sinkhorn_step_bwd``): autodiff of the step stacked six per-iteration tensors
  (two [n, n] and four [n] per token) and read them back through slow dynamic-slice
  fusions, while the VJP stacks only the step's input and recomputes the rest with
  reduce kernels. Forward plus rematerialised backward (2048 tokens, n = 4, t_max = 20,
  2 CPU threads, median): 2.3-2.5 ms against 3.4-3.9 ms with autodiff; unrolled adds
  in the backward took 36 ms. The gradient is autodiff's up to rounding (tests/test_mhc.py
  compares both with a float64 reference).
  """
  matrix_NxNxX = jnp.moveaxis(jnp.exp(jnp.clip(logits_XxNxN.astype(jnp.float32), -clamp, clamp)),
                              (-2, -1), (0, 1))
  matrix_NxNxX, _ = jax.lax.scan(lambda matrix, _: (_sinkhorn_step(matrix, eps), None),
                                 matrix_NxNxX, None, length=iters)
  return jnp.moveaxis(matrix_NxNxX, (0, 1), (-2, -1))


def constrained_maps(pre_logits: jax.Array, post_logits: jax.Array, res_logits: jax.Array,
                     *, iters: int, eps: float, clamp: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Eq. 8: float32 (H_pre in (0,1), H_post in (0,2), H_res doubly stochastic)."""
  h_pre = jax.nn.sigmoid(jnp.clip(pre_logits.astype(jnp.float32), -clamp, clamp))
  h_post = 2.0 * jax.nn.sigmoid(jnp.clip(post_logits.astype(jnp.float32), -clamp, clamp))
  # Rematerialised: its iters saved iterates are n^2 floats per token each (n^2 * iters
  # = 320 for n = 4, a third of the n*D = 1024 stream floats at D = 256), so backward
  # recomputes them; measured no slower on CPU.
  h_res = jax.checkpoint(sinkhorn_knopp, static_argnums=(1, 2, 3))(res_logits, iters, eps,
                                                                   clamp)
  return h_pre, h_post, h_res


# The two stream ops below carry hand-written VJPs. Their forward passes are unrolled
# sums over the n streams (one elementwise pass over X each), and so are the stream
# cotangents of their backward passes; only the per-token contractions over D (the map
# gradients) stay batched dots. Autodiff of the einsum forms instead runs B*T tiny
# [n, n] x [n, D] batched matmuls for H_res X and its transpose: at the bench shapes
# (B*T = 2048, n = 4, D = 256, float32, 2 CPU threads) aggregate took 2.7 ms forward
# plus backward against 1.1 ms here, and mix_and_distribute 9.4 ms against 6.0 ms.
# In the bench_dense training step (4 layers, 8 sites) the two ops and the unrolled
# Sinkhorn sums together cut the mHC step by 57 and 82 ms in two interleaved A/B runs,
# 5-7% of a 1.1 s step (benchmarks/RESULTS.md, mHC, session 7). The math is unchanged:
# tests/test_mhc.py compares both ops and Sinkhorn with float64 references, values and
# gradients.


def _weighted_stream_sum(weights_XxN: jax.Array, stream_XxNxD: jax.Array) -> jax.Array:
  """sum_m w[..., m] X[..., m, :] in float32, as an unrolled elementwise sum."""
  return sum(weights_XxN[..., m, None] * stream_XxNxD[..., m, :].astype(jnp.float32)
             for m in range(stream_XxNxD.shape[-2]))


def _mixed_streams(h_res_XxNxN: jax.Array, stream_XxNxD: jax.Array) -> jax.Array:
  """(H X)[..., i, :] = sum_m H[..., i, m] X[..., m, :] in float32, unrolled over m."""
  return sum(h_res_XxNxN[..., :, m, None] * stream_XxNxD[..., None, m, :].astype(jnp.float32)
             for m in range(stream_XxNxD.shape[-2]))


@jax.custom_vjp
def aggregate(h_pre_BxTxN: jax.Array, stream_BxTxNxD: jax.Array) -> jax.Array:
  """H_pre X: [B, T, D] in the stream's dtype (summed in float32).

  VJP for the cotangent g [B, T, D]: dH_pre[n] = <g, X_n> and dX_n = H_pre[n] g.
  """
  return _weighted_stream_sum(h_pre_BxTxN, stream_BxTxNxD).astype(stream_BxTxNxD.dtype)


def _aggregate_fwd(h_pre_BxTxN, stream_BxTxNxD):
  return aggregate(h_pre_BxTxN, stream_BxTxNxD), (h_pre_BxTxN, stream_BxTxNxD)


def _aggregate_bwd(residuals, g_BxTxD):
  h_pre_BxTxN, stream_BxTxNxD = residuals
  g_BxTxD = g_BxTxD.astype(jnp.float32)
  d_h_pre = jnp.einsum("...d,...nd->...n", g_BxTxD, stream_BxTxNxD.astype(jnp.float32))
  d_stream = h_pre_BxTxN[..., :, None] * g_BxTxD[..., None, :]
  return d_h_pre.astype(h_pre_BxTxN.dtype), d_stream.astype(stream_BxTxNxD.dtype)


aggregate.defvjp(_aggregate_fwd, _aggregate_bwd)


@jax.custom_vjp
def mix_and_distribute(h_res_BxTxNxN: jax.Array, stream_BxTxNxD: jax.Array,
                       h_post_BxTxN: jax.Array, y_BxTxD: jax.Array) -> jax.Array:
  """H_res X + H_post^T y: [B, T, n, D] in the stream's dtype (computed in float32).

  VJP for the cotangent G [B, T, n, D]: dH_res[i, m] = <G_i, X_m>, dH_post[i] = <G_i, y>,
  dX_m = sum_i H_res[i, m] G_i (= H_res^T G) and dy = sum_i H_post[i] G_i.
  """
  update_BxTxNxD = h_post_BxTxN[..., :, None] * y_BxTxD[..., None, :].astype(jnp.float32)
  return (_mixed_streams(h_res_BxTxNxN, stream_BxTxNxD) + update_BxTxNxD
          ).astype(stream_BxTxNxD.dtype)


def _mix_fwd(h_res_BxTxNxN, stream_BxTxNxD, h_post_BxTxN, y_BxTxD):
  return (mix_and_distribute(h_res_BxTxNxN, stream_BxTxNxD, h_post_BxTxN, y_BxTxD),
          (h_res_BxTxNxN, stream_BxTxNxD, h_post_BxTxN, y_BxTxD))


def _mix_bwd(residuals, g_BxTxNxD):
  h_res_BxTxNxN, stream_BxTxNxD, h_post_BxTxN, y_BxTxD = residuals
  g_BxTxNxD = g_BxTxNxD.astype(jnp.float32)
  d_h_res = jnp.einsum("...id,...md->...im", g_BxTxNxD, stream_BxTxNxD.astype(jnp.float32))
  d_h_post = jnp.einsum("...id,...d->...i", g_BxTxNxD, y_BxTxD.astype(jnp.float32))
  d_stream = _mixed_streams(jnp.swapaxes(h_res_BxTxNxN, -1, -2), g_BxTxNxD)
  d_y = _weighted_stream_sum(h_post_BxTxN, g_BxTxNxD)
  return (d_h_res.astype(h_res_BxTxNxN.dtype), d_stream.astype(stream_BxTxNxD.dtype),
          d_h_post.astype(h_post_BxTxN.dtype), d_y.astype(y_BxTxD.dtype))


mix_and_distribute.defvjp(_mix_fwd, _mix_bwd)


def mhc_site(stream_BxTxNxD: jax.Array, sublayer: Callable[[jax.Array], jax.Array],
             h_pre_BxTxN: jax.Array, h_post_BxTxN: jax.Array,
             h_res_BxTxNxN: jax.Array) -> jax.Array:
  """X' = H_res X + H_post^T F(H_pre X); ``sublayer`` maps [B, T, D] -> [B, T, D]."""
  y_BxTxD = sublayer(aggregate(h_pre_BxTxN, stream_BxTxNxD))
  return mix_and_distribute(h_res_BxTxNxN, stream_BxTxNxD, h_post_BxTxN, y_BxTxD)


def expand_streams(x_BxTxD: jax.Array, embedding_NxD: jax.Array) -> jax.Array:
  """X_0[i] = x + e_i: [B, T, n, D] in x's dtype."""
  return x_BxTxD[..., None, :] + embedding_NxD.astype(x_BxTxD.dtype)


def reduce_streams(stream_BxTxNxD: jax.Array) -> jax.Array:
  """Mean over streams: [B, T, D] (accumulated in float32)."""
  return jnp.mean(stream_BxTxNxD.astype(jnp.float32), axis=-2).astype(stream_BxTxNxD.dtype)


def site_flops_per_token(n: int, d_model: int) -> float:
  """Forward matmul FLOPs of one mHC site beyond its sublayer (module docstring)."""
  return float(2 * n * d_model * (2 * n + n * n) + 2 * n * n * d_model + 4 * n * d_model)


# ----------------------------------------------------------------------------- modules


class MHCStreams(nnx.Module):
  """Model-level entry/exit of the n streams: holds the per-stream embedding e [n, D]
  ('streams', 'embed'), init N(0, init_std^2)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.embedding = param(normal(rngs.params(), (cfg.residual.streams, cfg.d_model), cfg.init_std,
                                  jnp.dtype(cfg.param_dtype)), ("streams", "embed"))

  def expand(self, x_BxTxD: jax.Array) -> jax.Array:
    return expand_streams(x_BxTxD, self.embedding[...])

  def reduce(self, stream_BxTxNxD: jax.Array) -> jax.Array:
    return reduce_streams(stream_BxTxNxD)


@registry.RESIDUALS.register("mhc")
class MHCResidual(nnx.Module):
  """One mHC site (``Residual`` interface of lm.py): the sublayer's pre-norm [D], the fused
  phi [nD, 2n + n^2] ('mhc_flat', 'mhc_coeffs'), the gates alpha = (a_pre, a_post, a_res)
  [3] ('mhc_gates') and the biases b_pre, b_post [n] ('streams'), b_res [n, n]
  ('streams', 'streams').

  With Muon, phi is a hidden matrix (Muon); the biases carry a 'streams' axis and alpha
  a single matrix axis, so both go to AdamW without weight decay (optim.param_group).
  """

  Config = MHCConfig
  streams = MHCStreams

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    section = cfg.residual
    n, d_model = section.streams, cfg.d_model
    param_dtype = jnp.dtype(cfg.param_dtype)
    self.n_streams = n
    self.iters = section.sinkhorn_iters
    self.sinkhorn_eps = section.sinkhorn_eps
    self.clamp = section.logit_clamp
    self.norm_eps = cfg.norm_eps
    self.norm = RMSNorm(d_model, cfg.norm_eps, param_dtype)
    self.phi = param(normal(rngs.params(), (n * d_model, 2 * n + n * n), cfg.init_std,
                            param_dtype), ("mhc_flat", "mhc_coeffs"))
    self.alpha = param(jnp.full((3,), section.alpha_init, param_dtype), ("mhc_gates",))
    b_pre_N, b_post_N, b_res_NxN = init_biases(section.init, n)
    self.b_pre = param(b_pre_N.astype(param_dtype), ("streams",))
    self.b_post = param(b_post_N.astype(param_dtype), ("streams",))
    self.b_res = param(b_res_NxN.astype(param_dtype), ("streams", "streams"))

  def maps(self, stream_BxTxNxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(H_pre [B,T,n], H_post [B,T,n], H_res [B,T,n,n]) in float32 (Eqs. 7-9)."""
    logits = coefficient_logits(stream_BxTxNxD, self.phi[...], self.alpha[...], self.b_pre[...],
                                self.b_post[...], self.b_res[...], self.norm_eps)
    h_pre, h_post, h_res = constrained_maps(*logits, iters=self.iters,
                                            eps=self.sinkhorn_eps, clamp=self.clamp)
    return (checkpoint_name(h_pre, MHC_COEFFS), checkpoint_name(h_post, MHC_COEFFS),
            checkpoint_name(h_res, MHC_COEFFS))

  def __call__(self, stream_BxTxNxD: jax.Array, sublayer: Callable[[jax.Array], jax.Array]
               ) -> jax.Array:
    h_pre, h_post, h_res = self.maps(stream_BxTxNxD)
    return mhc_site(stream_BxTxNxD, lambda x_BxTxD: sublayer(self.norm(x_BxTxD)),
                    h_pre, h_post, h_res)

  @staticmethod
  def flops_per_token(cfg: ModelConfig) -> float:
    return site_flops_per_token(cfg.residual.streams, cfg.d_model)
