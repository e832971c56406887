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
(graphdef, shapes, max_new_tokens, eos_id) and temperature/top_p are traced values.
End of sequence: once a row has produced ``eos_id``, every later token of that row is
``eos_id`` (the loop still runs its fixed number of steps).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.models.lm import LM, default_positions


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


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, prompt_tokens_BxP: jax.Array,
              rng: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
              max_new_tokens: int, eos_id: int | None) -> jax.Array:
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt_tokens_BxP.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits_BxPxV, cache = model.decode(prompt_tokens_BxP, default_positions(prompt_tokens_BxP),
                                     cache)
  first_rng, loop_rng = jax.random.split(rng)
  token_B = sample_token(logits_BxPxV[:, -1], first_rng, temperature, top_p)
  done_B = jnp.zeros((batch,), bool) if eos_id is None else token_B == eos_id

  def step(carry, step_rng):
    token_B, done_B, cache, position = carry
    positions_Bx1 = jnp.full((batch, 1), position, jnp.int32)
    logits_Bx1xV, cache = model.decode(token_B[:, None], positions_Bx1, cache)
    next_B = sample_token(logits_Bx1xV[:, 0], step_rng, temperature, top_p)
    if eos_id is not None:
      next_B = jnp.where(done_B, eos_id, next_B)
      done_B = done_B | (next_B == eos_id)
    return (next_B, done_B, cache, position + 1), next_B

  step_rngs = jax.random.split(loop_rng, max_new_tokens - 1)
  carry = (token_B, done_B, cache, jnp.int32(prompt_len))
  _, later_tokens_NxB = jax.lax.scan(step, carry, step_rngs)
  new_tokens_BxN = jnp.concatenate([token_B[:, None], later_tokens_NxB.T], axis=1)
  return jnp.concatenate([prompt_tokens_BxP.astype(jnp.int32), new_tokens_BxN], axis=1)


def generate(model: LM, prompt_tokens_BxP: jax.Array, max_new_tokens: int, rng: jax.Array,
             temperature: float = 1.0, top_p: float = 1.0, eos_id: int | None = None
             ) -> jax.Array:
  """Prompt followed by ``max_new_tokens`` sampled tokens: int32 [B, P + N].

  All prompts share one length P (positions 0..P-1). Rows that emitted ``eos_id`` are
  padded with ``eos_id``. The model is not mutated.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt_tokens_BxP), rng,
                   jnp.float32(temperature), jnp.float32(top_p),
                   max_new_tokens=max_new_tokens, eos_id=eos_id)
