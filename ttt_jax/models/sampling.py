"""Temperature + nucleus (top-p) sampling and a jit-compiled KV-cache generate loop.

Sampling from logits z with temperature tau > 0 and nucleus mass p (Holtzman et al., 2020):

    q = softmax(z / tau);  sort q descending: q_(1) >= q_(2) >= ...
    keep token (i) iff sum_{j<i} q_(j) < p   (the smallest prefix with mass >= p; the
                                              most likely token is always kept)
    token ~ q restricted to the kept set, renormalised

tau = 0 is greedy decoding (argmax). Tokens whose logit ties the smallest kept logit are
kept as well.

``generate`` prefills the cache with the prompt in one ``LM.decode`` call, samples the
first new token from the last prompt position, then runs ``jax.lax.scan`` over single-
token decode steps. It is pure with respect to the model: the model is split into
(graphdef, state) and merged again inside a jitted function, so it compiles once per
(graphdef, shapes, max_new_tokens, eos_id, max_steps, with_state) and temperature/top_p
(and a step rule's tables) are traced values.
End of sequence: once a row has produced ``eos_id``, every later token of that row is
``eos_id`` (the loop still runs its fixed number of steps).

CCT models decode with per-token step ids: fixed (position // cct_step_len) by default,
or, with a ``cct.StepRule`` (semantic steps), decided on device token by token, the
prompt's included, before each token is decoded. ``generate_with_state`` also returns
the step ids and the final cache (for the commitment hash chain, ``ttt_jax.cct_chain``).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.models import cct
from ttt_jax.models.lm import LM, Cache, default_positions


def top_p_mask(logits_BxV: jax.Array, top_p: float | jax.Array) -> jax.Array:
  """Boolean [B, V]: the tokens of the smallest most-likely set with mass >= top_p."""
  sorted_logits_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)
  sorted_probs_BxV = jax.nn.softmax(sorted_logits_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(sorted_probs_BxV, axis=-1) - sorted_probs_BxV
  n_kept_B = jnp.maximum(jnp.sum(mass_before_BxV < top_p, axis=-1), 1)
  threshold_Bx1 = jnp.take_along_axis(sorted_logits_BxV, (n_kept_B - 1)[:, None], axis=-1)
  return logits_BxV >= threshold_Bx1


def sample_token(logits_BxV: jax.Array, rng: jax.Array, temperature: float | jax.Array,
                 top_p: float | jax.Array) -> jax.Array:
  """int32 tokens [B]: argmax when temperature == 0, else temperature + top-p sampling."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  greedy_B = jnp.argmax(logits_BxV, axis=-1)
  scaled_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
  masked_BxV = jnp.where(top_p_mask(scaled_BxV, top_p), scaled_BxV, -jnp.inf)
  sampled_B = jax.random.categorical(rng, masked_BxV, axis=-1)
  return jnp.where(temperature <= 0, greedy_B, sampled_B).astype(jnp.int32)


class Generation(NamedTuple):
  """What ``generate_with_state`` returns."""
  tokens_BxT: jax.Array
  """int32 prompt followed by the new tokens, T = P + N."""
  step_ids_BxT: jax.Array | None
  """int32 step of every token (CCT: fixed by position, or the ``step_rule``'s); None
  for other mixers."""
  cache: Cache
  """The decode cache after the first T - 1 tokens (the last sampled token is never fed
  back into the model)."""


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "max_steps",
                                   "with_state"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, prompt_tokens_BxP: jax.Array,
              rng: jax.Array, temperature: jax.Array, top_p: jax.Array,
              rule: cct.StepRule | None, *, max_new_tokens: int, eos_id: int | None,
              max_steps: int | None, with_state: bool) -> jax.Array | Generation:
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt_tokens_BxP.shape
  total_len = prompt_len + max_new_tokens
  cache = model.init_cache(batch, total_len, max_steps)
  prompt_steps_BxP = rule_state = None  # None: a CCT mixer's own fixed steps
  if rule is not None:
    prompt_steps_BxP, rule_state = cct.step_rule_ids(rule, cct.step_rule_start(batch),
                                                     prompt_tokens_BxP)
  logits_BxPxV, cache = model.decode(prompt_tokens_BxP, default_positions(prompt_tokens_BxP),
                                     cache, prompt_steps_BxP)
  first_rng, loop_rng = jax.random.split(rng)
  token_B = sample_token(logits_BxPxV[:, -1], first_rng, temperature, top_p)
  done_B = jnp.zeros((batch,), bool) if eos_id is None else token_B == eos_id

  def token_step(token_B, rule_state):
    """Step id [B, 1] of ``token`` from the rule (None without one)."""
    if rule is None:
      return None, rule_state
    step_B, rule_state = cct.step_rule_next(rule, rule_state, token_B)
    return step_B[:, None], rule_state

  def step(carry, step_rng):
    token_B, done_B, cache, position, rule_state = carry
    positions_Bx1 = jnp.full((batch, 1), position, jnp.int32)
    step_Bx1, rule_state = token_step(token_B, rule_state)
    logits_Bx1xV, cache = model.decode(token_B[:, None], positions_Bx1, cache, step_Bx1)
    next_B = sample_token(logits_Bx1xV[:, 0], step_rng, temperature, top_p)
    if eos_id is not None:
      next_B = jnp.where(done_B, eos_id, next_B)
      done_B = done_B | (next_B == eos_id)
    return (next_B, done_B, cache, position + 1, rule_state), (next_B, step_Bx1)

  step_rngs = jax.random.split(loop_rng, max_new_tokens - 1)
  carry = (token_B, done_B, cache, jnp.int32(prompt_len), rule_state)
  (last_B, _, cache, _, rule_state), (later_tokens_NxB, later_steps) = jax.lax.scan(
      step, carry, step_rngs)
  new_tokens_BxN = jnp.concatenate([token_B[:, None], later_tokens_NxB.T], axis=1)
  tokens_BxT = jnp.concatenate([prompt_tokens_BxP.astype(jnp.int32), new_tokens_BxN], axis=1)
  if not with_state:
    return tokens_BxT
  step_ids_BxT = None  # a rule implies a CCT model (checked by _run)
  if rule is not None:
    last_step_Bx1, _ = token_step(last_B, rule_state)
    step_ids_BxT = jnp.concatenate(
        [prompt_steps_BxP, later_steps[:, :, 0].T, last_step_Bx1], axis=1)
  elif model.cfg.mixer == "cct":
    step_ids_BxT = cct.fixed_step_ids(default_positions(tokens_BxT), model.cfg.cct_step_len)
  return Generation(tokens_BxT, step_ids_BxT, cache)


def _run(model: LM, prompt_tokens_BxP: jax.Array, max_new_tokens: int, rng: jax.Array,
         temperature: float, top_p: float, eos_id: int | None, step_rule: cct.StepRule | None,
         with_state: bool) -> jax.Array | Generation:
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  max_steps = None
  if step_rule is not None:
    if model.cfg.mixer != "cct":
      raise ValueError(f"a step rule needs model.mixer='cct', got {model.cfg.mixer!r}")
    if int(step_rule.step_len) > model.cfg.cct_step_len:
      raise ValueError(f"steps of up to {int(step_rule.step_len)} tokens exceed the decode "
                       f"step buffer, model.cct_step_len={model.cfg.cct_step_len}")
    # every step but the last has >= step_min_len tokens
    total_len = prompt_tokens_BxP.shape[1] + max_new_tokens
    max_steps = (total_len - 1) // int(step_rule.step_min_len) + 1
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt_tokens_BxP), rng,
                   jnp.float32(temperature), jnp.float32(top_p), step_rule,
                   max_new_tokens=max_new_tokens, eos_id=eos_id, max_steps=max_steps,
                   with_state=with_state)


def generate(model: LM, prompt_tokens_BxP: jax.Array, max_new_tokens: int, rng: jax.Array,
             temperature: float = 1.0, top_p: float = 1.0, eos_id: int | None = None,
             step_rule: cct.StepRule | None = None) -> jax.Array:
  """Prompt followed by ``max_new_tokens`` sampled tokens: int32 [B, P + N].

  All prompts share one length P (positions 0..P-1). Rows that emitted ``eos_id`` are
  padded with ``eos_id``. The model is not mutated. ``step_rule`` (CCT models trained
  with semantic steps): the step of every token, prompt included, is decided by the
  rule on device; without it CCT steps are fixed, position // cct_step_len.
  """
  return _run(model, prompt_tokens_BxP, max_new_tokens, rng, temperature, top_p, eos_id,
              step_rule, with_state=False)


def generate_with_state(model: LM, prompt_tokens_BxP: jax.Array, max_new_tokens: int,
                        rng: jax.Array, temperature: float = 1.0, top_p: float = 1.0,
                        eos_id: int | None = None, step_rule: cct.StepRule | None = None
                        ) -> Generation:
  """``generate`` that also returns the step ids and the final decode cache (a separate
  compilation: ``generate`` itself returns only the tokens)."""
  return _run(model, prompt_tokens_BxP, max_new_tokens, rng, temperature, top_p, eos_id,
              step_rule, with_state=True)
