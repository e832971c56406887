"""The SDFT objective: a per-token divergence between the student and a
demonstration-conditioned teacher along the student's own sampled continuation.

For a prompt x with demonstration c, the student pi_theta(. | x) samples a continuation
y = (y_1 .. y_N) (on-policy, with the current params under ``stop_gradient``). At every
continuation position j both models give a distribution over the whole vocabulary V
from the same prefix y_<j: the student from x, the teacher (the EMA of the student,
``teacher.py``) from the template holding x and c (``data.teacher_text``). With
log-probabilities l = log_softmax(logits) in float32 and p = exp(l) (the teacher's
under ``stop_gradient``), the token divergence D_j is, by ``sdft.divergence``:

  reverse   KL(p_s || p_t) = sum_v p_s(v) (l_s(v) - l_t(v))          (SDFT's objective)
  forward   KL(p_t || p_s) = sum_v p_t(v) (l_t(v) - l_s(v))
  jsd       beta KL(p_s || m) + (1 - beta) KL(p_t || m),  m = beta p_t + (1 - beta) p_s

computed analytically over V (not estimated from the sampled token). The generalized
JSD is forward KL at beta = 0 and reverse KL at beta = 1 (m is then p_s, resp. p_t), and
continuous in beta in between; log m = logaddexp(log beta + l_t, log(1 - beta) + l_s).
The gradient of the reverse KL with respect to the student's logits z is
dK/dz = p_s * (l_s - l_t - K).

The loss is the masked token mean over the batch, L = sum_{b,j} M_bj D_bj / max(sum M, 1),
where M marks the continuation's tokens (up to and including its first EOS) from the
(skip_first + 1)-th on: padding past the end adds nothing and dilutes nothing, and an
empty continuation contributes nothing (a batch of them gives 0, not NaN).

Alignment: the student reads [prompt left-padded to P | y] and the teacher [template
left-padded to Q | y]; the logits that predict y_j sit at position P - 1 + j in the one
and Q - 1 + j in the other (``continuation_logits``). The teacher gain, the mean over
M of log p_t(y_j) - log p_s(y_j), is how much more likely the teacher finds the
student's own tokens (it shrinks as the student absorbs the demonstrations).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def log_probs(logits: jax.Array) -> jax.Array:
  """float32 log_softmax over the last (vocabulary) axis."""
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p || q) over the last axis from log-probabilities; a p(v) = 0 adds 0."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """KL(p_s || p_t) per position (module doc); the teacher's logits get no gradient."""
  return _kl(log_probs(student_logits), log_probs(jax.lax.stop_gradient(teacher_logits)))


def forward_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """KL(p_t || p_s) per position; the teacher's logits get no gradient."""
  return _kl(log_probs(jax.lax.stop_gradient(teacher_logits)), log_probs(student_logits))


def generalized_jsd(student_logits: jax.Array, teacher_logits: jax.Array,
                    beta: float) -> jax.Array:
  """beta KL(p_s || m) + (1 - beta) KL(p_t || m), m = beta p_t + (1 - beta) p_s, per
  position: forward KL at beta = 0, reverse KL at beta = 1."""
  l_s = log_probs(student_logits)
  l_t = log_probs(jax.lax.stop_gradient(teacher_logits))
  log_beta, log_rest = jnp.log(jnp.float32(beta)), jnp.log1p(-jnp.float32(beta))
  l_m = jnp.logaddexp(log_beta + l_t, log_rest + l_s)  # -inf + l where a weight is 0
  # a zero weight drops its term outright: its KL may be inf where m has no mass
  terms = []
  if beta > 0:
    terms.append(beta * _kl(l_s, l_m))
  if beta < 1:
    terms.append((1.0 - beta) * _kl(l_t, l_m))
  return sum(terms[1:], terms[0])


def token_divergence(student_logits: jax.Array, teacher_logits: jax.Array,
                     divergence: str = "reverse", beta: float = 0.5) -> jax.Array:
  """The ``sdft.divergence`` per position: logits [..., V] -> float32 [...]."""
  if divergence == "reverse":
    return reverse_kl(student_logits, teacher_logits)
  if divergence == "forward":
    return forward_kl(student_logits, teacher_logits)
  if divergence == "jsd":
    return generalized_jsd(student_logits, teacher_logits, beta)
  raise ValueError(f"divergence: {divergence!r} is not one of reverse, forward, jsd")


def loss_mask(completion_mask_BxN: jax.Array, skip_first: int) -> jax.Array:
  """The continuation tokens in the loss: ``completion_mask`` from position
  ``skip_first`` on."""
  position_N = jnp.arange(completion_mask_BxN.shape[-1])
  return completion_mask_BxN & (position_N >= skip_first)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """sum(values where mask) / max(sum(mask), 1), float32; values outside the mask (even
  NaN) never reach the result."""
  total = jnp.sum(jnp.where(mask, values.astype(jnp.float32), 0.0))
  return total / jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)


def continuation_logits(logits_BxTxV: jax.Array, prompt_width: int,
                        n_tokens: int) -> jax.Array:
  """The logits [B, N, V] that predict continuation tokens 0..N-1 of a sequence whose
  first ``prompt_width`` tokens are the (left-padded) prompt: positions P-1 .. P+N-2."""
  return jax.lax.slice_in_dim(logits_BxTxV, prompt_width - 1, prompt_width - 1 + n_tokens,
                              axis=1)


def sampled_log_probs(logits_BxNxV: jax.Array, tokens_BxN: jax.Array) -> jax.Array:
  """log p(token) per position, float32 [B, N]."""
  return jnp.take_along_axis(log_probs(logits_BxNxV), tokens_BxN[..., None], axis=-1)[..., 0]


def sdft_loss(student_BxNxV: jax.Array, teacher_BxNxV: jax.Array, mask_BxN: jax.Array,
              *, divergence: str = "reverse", beta: float = 0.5) -> jax.Array:
  """The masked token mean of the divergence (module doc): the SDFT loss."""
  return masked_mean(token_divergence(student_BxNxV, teacher_BxNxV, divergence, beta),
                     mask_BxN)


def teacher_gain(student_BxNxV: jax.Array, teacher_BxNxV: jax.Array, tokens_BxN: jax.Array,
                 mask_BxN: jax.Array) -> jax.Array:
  """Mean over the mask of log p_t(y) - log p_s(y) on the continuation's tokens y."""
  gain = (sampled_log_probs(teacher_BxNxV, tokens_BxN)
          - sampled_log_probs(student_BxNxV, tokens_BxN))
  return masked_mean(jax.lax.stop_gradient(gain), mask_BxN)
