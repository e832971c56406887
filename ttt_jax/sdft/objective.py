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
continuous in beta in between (``log_mixture`` computes log m, exact where p_s = p_t).
The gradient of the reverse KL with respect to the student's logits z is
dK/dz = p_s * (l_s - l_t - K).

The loss is the masked token mean over the batch, L = sum_{b,j} M_bj D_bj / max(sum M, 1),
where M marks the continuation's tokens (up to and including its first EOS) from the
(skip_first + 1)-th on: padding past the end adds nothing and dilutes nothing, and an
empty continuation contributes nothing (a batch of them gives 0, not NaN).

Alignment: the student reads [prompt x | y] and the teacher [template(x, c) | y], each
row's real tokens moved to the front of its (left-padded) sequence so the forward is the
row's unpadded one (``rollout.to_front``); the logits that predict y_j sit at position
n_x - 1 + j in the one and n_xc - 1 + j in the other, n the row's prompt lengths
(``continuation_logits``). The teacher gain, the mean over
M of log p_t(y_j) - log p_s(y_j), is how much more likely the teacher finds the
student's own tokens (it shrinks as the student absorbs the demonstrations).

``objective(cfg, ids)`` is the train step's objective (registered as
``train.objective='sdft'``, whose ``after_update`` is the teacher's EMA): inside the
jitted step it samples y with ``inference.rollout.sample_rollout`` from the params under
``stop_gradient`` (``sdft.temperature``, ``top_p``; PAD and BOS forbidden; EOS ends a
row), runs the student's forward with gradients and the teacher's without, and returns
the loss with its metrics. A model that reads per-token side inputs while decoding (CCT
trained with semantic steps: ``sampling.decode_inputs``) reads them in all three: the
sampling decides them token by token, and each teacher-forced forward gets those of its
own row (``rollout.front_logits``), the prompt's and the template's included, so the
student's steps over [x | y] are the ones it sampled y with.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ttt_jax import registry
from ttt_jax.config import Config
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.errors import ConfigError
from ttt_jax.inference import rollout, sampling
from ttt_jax.models import lm
from ttt_jax.registry import ObjectiveEntry
from ttt_jax.sdft import teacher as teacher_lib
from ttt_jax.training.objectives import Objective, StepContext


def log_probs(logits: jax.Array) -> jax.Array:
  """float32 log_softmax over the last (vocabulary) axis."""
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p || q) over the last axis from log-probabilities; a p(v) = 0 adds 0. Clamped
  at 0, which rounding can undercut for near-equal distributions."""
  return jnp.maximum(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1), 0.0)


def reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """KL(p_s || p_t) per position (module doc); the teacher's logits get no gradient."""
  return _kl(log_probs(student_logits), log_probs(jax.lax.stop_gradient(teacher_logits)))


def forward_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """KL(p_t || p_s) per position; the teacher's logits get no gradient."""
  return _kl(log_probs(jax.lax.stop_gradient(teacher_logits)), log_probs(student_logits))


def log_mixture(l_s: jax.Array, l_t: jax.Array, beta: float) -> jax.Array:
  """log m, m = beta p_t + (1 - beta) p_s, for 0 < beta < 1, written around the larger
  side so it is exact where p_s = p_t: with d = l_t - l_s,
  l_s + log1p(beta expm1(d)) for d <= 0, l_t + log1p((1 - beta) expm1(-d)) otherwise."""
  d = l_t - l_s
  below = l_s + jnp.log1p(beta * jnp.expm1(jnp.minimum(d, 0.0)))
  above = l_t + jnp.log1p((1.0 - beta) * jnp.expm1(jnp.minimum(-d, 0.0)))
  return jnp.where(d <= 0, below, above)


def generalized_jsd(student_logits: jax.Array, teacher_logits: jax.Array,
                    beta: float) -> jax.Array:
  """beta KL(p_s || m) + (1 - beta) KL(p_t || m), m = beta p_t + (1 - beta) p_s, per
  position: forward KL at beta = 0, reverse KL at beta = 1 (computed as those)."""
  if beta <= 0.0:
    return forward_kl(student_logits, teacher_logits)
  if beta >= 1.0:
    return reverse_kl(student_logits, teacher_logits)
  l_s = log_probs(student_logits)
  l_t = log_probs(jax.lax.stop_gradient(teacher_logits))
  l_m = log_mixture(l_s, l_t, beta)
  return beta * _kl(l_s, l_m) + (1.0 - beta) * _kl(l_t, l_m)


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


def continuation_logits(logits_BxTxV: jax.Array, prompt_lens_B: jax.Array,
                        n_tokens: int) -> jax.Array:
  """The logits [B, N, V] that predict continuation tokens 0..N-1 in a front-aligned
  forward (``rollout.to_front``): row b's at positions n_b - 1 .. n_b + N - 2, n_b its prompt's
  length (at least 1)."""
  index_BxN = prompt_lens_B.astype(jnp.int32)[:, None] - 1 + jnp.arange(n_tokens)[None]
  return jnp.take_along_axis(logits_BxTxV, index_BxN[..., None], axis=1)


def sequence_logits(model: Callable[..., jax.Array], prompt_BxP: jax.Array,
                    prompt_lens_B: jax.Array, continuation_BxN: jax.Array,
                    inputs: tuple[sampling.DecodeInputs, ...] = ()) -> jax.Array:
  """The logits [B, N, V] a model gives each continuation token after its left-padded
  prompt, from the row's unpadded forward (``rollout.to_front``, ``continuation_logits``)
  with the side inputs ``inputs`` decide for its tokens (``rollout.front_logits``)."""
  tokens_BxT = jnp.concatenate([prompt_BxP, continuation_BxN], axis=1)
  logits = rollout.front_logits(
      model, rollout.to_front(tokens_BxT, prompt_lens_B, prompt_BxP.shape[1]), inputs)
  return continuation_logits(logits, prompt_lens_B, continuation_BxN.shape[1])


def sampled_log_probs(logits_BxNxV: jax.Array, tokens_BxN: jax.Array) -> jax.Array:
  """log p(token) per position, float32 [B, N]."""
  return jnp.take_along_axis(log_probs(logits_BxNxV), tokens_BxN[..., None], axis=-1)[..., 0]


def _masked_logits(logits_BxNxV: jax.Array, mask_BxN: jax.Array) -> jax.Array:
  """Zeros outside the mask, so nothing there (not even a NaN) reaches a gradient."""
  return jnp.where(mask_BxN[..., None], logits_BxNxV, jnp.zeros((), logits_BxNxV.dtype))


def sdft_loss(student_BxNxV: jax.Array, teacher_BxNxV: jax.Array, mask_BxN: jax.Array,
              *, divergence: str = "reverse", beta: float = 0.5) -> jax.Array:
  """The masked token mean of the divergence (module doc): the SDFT loss."""
  return masked_mean(token_divergence(_masked_logits(student_BxNxV, mask_BxN),
                                      _masked_logits(teacher_BxNxV, mask_BxN),
                                      divergence, beta), mask_BxN)


def teacher_gain(student_BxNxV: jax.Array, teacher_BxNxV: jax.Array, tokens_BxN: jax.Array,
                 mask_BxN: jax.Array) -> jax.Array:
  """Mean over the mask of log p_t(y) - log p_s(y) on the continuation's tokens y."""
  gain = (sampled_log_probs(_masked_logits(teacher_BxNxV, mask_BxN), tokens_BxN)
          - sampled_log_probs(_masked_logits(student_BxNxV, mask_BxN), tokens_BxN))
  return masked_mean(jax.lax.stop_gradient(gain), mask_BxN)


# ----------------------------------------------------------------------------- the step's


class TokenIds(NamedTuple):
  """The tokenizer's special ids the sampling needs."""
  pad: int
  bos: int
  eos: int


def token_ids(tokenizer: Tokenizer) -> TokenIds:
  return TokenIds(tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)


BATCH_FIELDS = ("prompt", "prompt_lens", "teacher_prompt", "teacher_lens", "replay")
"""The fields of an SDFT batch (``data.Stream``)."""


def objective(cfg: Config, ids: TokenIds,
              inputs: tuple[sampling.DecodeInputs, ...] = ()) -> Objective:
  """The SDFT objective of the train step (module doc): sample the student's
  continuation of ``batch['prompt']`` (current params under ``stop_gradient``,
  ``sdft.temperature`` / ``top_p``, PAD and BOS forbidden, ending at EOS), then the
  student's forward with gradients and the teacher's (``ctx.extras``) without, and the
  masked divergence. ``inputs``: the run's decode inputs (``sampling.decode_inputs``;
  CCT trained with semantic steps: its step rule), which the sampling and both forwards
  read, so student and teacher see the steps the run was trained with. Metrics: ``kl`` (the divergence), ``teacher_gain``,
  ``gen_len_mean`` / ``_min`` / ``_max`` (continuation tokens, EOS included) and
  ``replay_fraction`` (of the batch's slots)."""
  s = cfg.sdft
  forbid = tuple(i for i in (ids.pad, ids.bos) if 0 <= i)
  eos = ids.eos if ids.eos >= 0 else None

  def sdft_objective(model: lm.LM, batch: dict[str, jax.Array], ctx: StepContext
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    missing = [name for name in BATCH_FIELDS if name not in batch]
    if missing:
      raise ConfigError(f"train.objective: 'sdft' trains on demonstrations (batch fields "
                        f"{', '.join(missing)} missing): run python -m ttt_jax.sdft")
    sample = rollout.sample_rollout(  # its params under stop_gradient
        model, batch["prompt"], batch["prompt_lens"], s.max_new_tokens, ctx.rng,
        temperature=s.temperature, top_p=s.top_p, eos_id=eos, forbid_ids=forbid,
        inputs=inputs)
    continuation = sample.completion_BxN
    student = sequence_logits(model, batch["prompt"], batch["prompt_lens"], continuation,
                              inputs)
    teacher = jax.lax.stop_gradient(sequence_logits(
        teacher_lib.model(cfg, model, ctx.extras), batch["teacher_prompt"],
        batch["teacher_lens"], continuation, inputs))
    mask = loss_mask(sample.completion_mask_BxN, s.skip_first)
    loss = sdft_loss(student, teacher, mask, divergence=s.divergence, beta=s.jsd_beta)
    lengths = sample.completion_lens_B.astype(jnp.float32)
    return loss, {
        "kl": jax.lax.stop_gradient(loss),
        "teacher_gain": teacher_gain(student, teacher, continuation, mask),
        "gen_len_mean": jnp.mean(lengths), "gen_len_min": jnp.min(lengths),
        "gen_len_max": jnp.max(lengths),
        "replay_fraction": jnp.mean(batch["replay"].astype(jnp.float32))}

  return sdft_objective


def check(cfg: Config) -> None:
  """What train.objective='sdft' cannot serve: a fake-quantized student (the teacher
  is not) and document ids, a per-token batch field the demonstrations lack (CCT's step
  ids need none: the objective decides them as decoding does)."""
  if cfg.quant.qat_lr_ratio:
    raise ConfigError("quant.qat_lr_ratio: late QAT is not supported with "
                      "train.objective='sdft'; set it to 0")
  if cfg.data.document_mask:
    raise ConfigError("data.document_mask: 'sdft' batches are one prompt and its "
                      "continuation a row, with no document ids; set it to false")


def check_summary_slots(cfg: Config) -> None:
  """Refuses CCT rows longer than model.mixer.max_steps summary slots hold: the forward
  of such a row (the student's or the teacher's) gives its later steps no summary, where
  decoding the same tokens reads one. Every step but a row's last has at least
  data.step_min_len tokens (semantic) or model.mixer.step_len (fixed)."""
  mixer, s = cfg.model.mixer, cfg.sdft
  if mixer.type != "cct" or not mixer.max_steps:
    return
  shortest = (cfg.data.step_min_len if cfg.data.step_boundaries == "semantic"
              else mixer.step_len)
  longest = max(s.prompt_width, s.teacher_width) + s.max_new_tokens
  if longest > mixer.max_steps * shortest:
    raise ConfigError(
        f"model.mixer.max_steps: {mixer.max_steps} summary slots hold rows of up to "
        f"{mixer.max_steps * shortest} tokens (steps of >= {shortest}), but SDFT rows "
        f"have up to {longest} (max(sdft.prompt_width, sdft.teacher_width) + "
        "sdft.max_new_tokens), whose later steps' summaries the forward would drop "
        f"and decoding reads; --set model.mixer.max_steps={-(-longest // shortest)} "
        "(it sizes buffers only) or make the rows shorter")


def _registered(cfg: Config) -> Objective:
  """The objective from the config alone: the special ids and decode inputs of
  ``data.tokenizer``."""
  if not cfg.data.tokenizer:
    raise ConfigError("data.tokenizer: train.objective='sdft' samples with the run's "
                      "tokenizer; --init-from a run that has one")
  tokenizer = corpus_lib.load_tokenizer(cfg.data.tokenizer)
  return objective(cfg, token_ids(tokenizer), sampling.decode_inputs(cfg, tokenizer))


registry.OBJECTIVES.register("sdft", ObjectiveEntry(
    _registered, check, after_update=lambda cfg: teacher_lib.follow(cfg.sdft.teacher_decay),
    extras=lambda cfg: (teacher_lib.extras_init(cfg), teacher_lib.extras_shardings)))
