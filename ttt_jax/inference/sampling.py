"""Temperature + nucleus (top-p) sampling and a jit-compiled KV-cache generate loop.

Sampling from logits z with temperature tau > 0 and nucleus mass p (Holtzman et al., 2020):

    q = softmax(z / tau);  sort q descending: q_(1) >= q_(2) >= ...
    keep token (i) iff sum_{j<i} q_(j) < p   (the smallest prefix with mass >= p; the
                                              most likely token is always kept)
    token ~ q restricted to the kept set, renormalised

tau = 0 is greedy decoding (argmax). Tokens whose logit ties the smallest kept logit are
kept as well. p >= 1 keeps every token (the float32 running sum may reach 1 before a large
vocabulary's tail, which the rule above would then drop).

``generate`` prefills the cache with the prompt in one ``LM.decode`` call, samples the
first new token from the last prompt position, then runs ``jax.lax.scan`` over single-
token decode steps (``decode_loop``, pure and traceable inside another jit; each row
keeps its own position, so ragged left-padded prompts, ``inference/rollout.py``, share
the loop). ``generate`` is pure with respect to the model: the model is split into
(graphdef, state) and merged again inside a jitted function, so it compiles once per
(graphdef, shapes, max_new_tokens, eos_id, cache options, with_state, forbid_ids) and
temperature/top_p (and the decode inputs' arrays) are traced values. Forbidden ids
(PAD, BOS) get logit -inf before temperature, top-p and argmax.
End of sequence: once a row has produced ``eos_id``, every later token of that row is
``eos_id`` (the loop still runs its fixed number of steps).

Decode inputs (``DecodeInputs``, registered in ``registry.DECODE_INPUTS``) give the
per-token side inputs a mechanism reads while decoding, decided on device token by
token, the prompt's included, before each token is decoded (CCT's semantic step ids).
``generate_with_state`` also returns those side inputs and the final cache (for CCT's
commitment hash chain).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax import registry
from ttt_jax.config import Config
from ttt_jax.models.context import SequenceContext, default_positions
from ttt_jax.models.lm import LM, Cache


def top_p_mask(logits_BxV: jax.Array, top_p: float | jax.Array) -> jax.Array:
  """Boolean [B, V]: the tokens of the smallest most-likely set with mass >= top_p
  (every token for top_p >= 1, where the float32 running mass may reach 1 early)."""
  sorted_logits_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)
  sorted_probs_BxV = jax.nn.softmax(sorted_logits_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(sorted_probs_BxV, axis=-1) - sorted_probs_BxV
  kept_BxV = (mass_before_BxV < top_p) | (jnp.asarray(top_p) >= 1.0)
  n_kept_B = jnp.maximum(jnp.sum(kept_BxV, axis=-1), 1)
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


class DecodeInputs(Protocol):
  """A per-token side input of decoding, decided on device as the tokens arrive. An
  instance is a pytree (its arrays are traced; it compiles once per structure)."""

  name: str
  """The side input's name in ``SequenceContext.side``."""

  def check(self, model: LM) -> None:
    """Raises ``ValueError`` where ``model`` cannot decode with these inputs."""

  def cache_options(self, total_len: int) -> dict[str, Any]:
    """What the model's decode cache must hold for ``total_len`` tokens (host side)."""

  def start(self, batch_size: int) -> Any:
    """The state before any token."""

  def next(self, state: Any, tokens_BxS: jax.Array, positions_BxS: jax.Array
           ) -> tuple[jax.Array, Any]:
    """(side input [B, S] of S new tokens, the state after them)."""


def decode_inputs(cfg: Config, tokenizer: Any) -> tuple[DecodeInputs, ...]:
  """The decode inputs a run of ``cfg`` needs: every ``registry.DECODE_INPUTS`` factory
  ``(cfg, tokenizer) -> DecodeInputs | None`` that applies."""
  made = (factory(cfg, tokenizer) for _, factory in registry.DECODE_INPUTS.items())
  return tuple(inputs for inputs in made if inputs is not None)


def sequence_side(inputs: tuple[DecodeInputs, ...], tokens_BxT: jax.Array
                  ) -> dict[str, jax.Array]:
  """The decode inputs' side inputs [B, T] of whole rows of real tokens at positions
  0..T-1, for a teacher-forced forward over them: what decoding the rows token by token
  decides (each input's ``next`` from its ``start`` over all T tokens at once)."""
  positions_BxT = default_positions(tokens_BxT)
  return {item.name: item.next(item.start(tokens_BxT.shape[0]), tokens_BxT, positions_BxT)[0]
          for item in inputs}


class Generation(NamedTuple):
  """What ``generate_with_state`` returns."""
  tokens_BxT: jax.Array
  """int32 prompt followed by the new tokens, T = P + N."""
  side: dict[str, jax.Array]
  """The decode inputs' side inputs of every token, [B, T] each (empty without any)."""
  cache: Cache
  """The decode cache after the first T - 1 tokens (the last sampled token is never fed
  back into the model)."""


def forbid(logits_BxV: jax.Array, forbid_ids: tuple[int, ...]) -> jax.Array:
  """``logits`` with the ids in ``forbid_ids`` set to -inf (never sampled, never argmax)."""
  if not forbid_ids:
    return logits_BxV
  return logits_BxV.at[:, jnp.asarray(forbid_ids, jnp.int32)].set(-jnp.inf)


def decode_loop(model: LM, prompt_tokens_BxP: jax.Array, rng: jax.Array,
                temperature: float | jax.Array, top_p: float | jax.Array,
                inputs: tuple[DecodeInputs, ...] = (), *, max_new_tokens: int,
                eos_id: int | None, cache_options: tuple[tuple[str, Any], ...] = (),
                with_state: bool = False, prompt_ctx: SequenceContext | None = None,
                forbid_ids: tuple[int, ...] = ()) -> jax.Array | Generation:
  """The generate loop on a model (pure, traceable inside another jit): prefill, then a
  scan of one-token decode steps; returns what ``generate`` (or, ``with_state``,
  ``generate_with_state``) does.

  ``prompt_ctx``: the prompt's context when it is not positions 0..P-1 of every row
  (ragged prompts: pads at negative positions, which decode inputs skip); each row
  continues from its last prompt position. ``forbid_ids`` are never sampled (their
  logits are -inf before temperature, top-p and argmax).
  """
  batch, prompt_len = prompt_tokens_BxP.shape
  total_len = prompt_len + max_new_tokens
  cache = model.init_cache(batch, total_len, dict(cache_options))

  def side_inputs(states: tuple, tokens_BxS: jax.Array, positions_BxS: jax.Array
                  ) -> tuple[dict[str, jax.Array], tuple]:
    """Every decode input's values for new tokens, and their states after them."""
    stepped = [item.next(item_state, tokens_BxS, positions_BxS)
               for item, item_state in zip(inputs, states)]
    return ({item.name: values for item, (values, _) in zip(inputs, stepped)},
            tuple(item_state for _, item_state in stepped))

  def sample(logits_BxV: jax.Array, step_rng: jax.Array) -> jax.Array:
    return sample_token(forbid(logits_BxV, forbid_ids), step_rng, temperature, top_p)

  input_states = tuple(item.start(batch) for item in inputs)
  if prompt_ctx is None:
    prompt_ctx = SequenceContext(default_positions(prompt_tokens_BxP))
  prompt_side, input_states = side_inputs(input_states, prompt_tokens_BxP,
                                          prompt_ctx.positions_BxT)
  logits_BxPxV, cache = model.decode(prompt_tokens_BxP, prompt_ctx.replace_side(**prompt_side),
                                     cache)
  first_rng, loop_rng = jax.random.split(rng)
  token_B = sample(logits_BxPxV[:, -1], first_rng)
  done_B = jnp.zeros((batch,), bool) if eos_id is None else token_B == eos_id

  def step(carry, step_rng):
    token_B, done_B, cache, position_B, input_states = carry
    positions_Bx1 = position_B[:, None]
    side, input_states = side_inputs(input_states, token_B[:, None], positions_Bx1)
    logits_Bx1xV, cache = model.decode(token_B[:, None],
                                       SequenceContext(positions_Bx1, side=side), cache)
    next_B = sample(logits_Bx1xV[:, 0], step_rng)
    if eos_id is not None:
      next_B = jnp.where(done_B, eos_id, next_B)
      done_B = done_B | (next_B == eos_id)
    return (next_B, done_B, cache, position_B + 1, input_states), (next_B, side)

  step_rngs = jax.random.split(loop_rng, max_new_tokens - 1)
  first_position_B = prompt_ctx.positions_BxT[:, -1].astype(jnp.int32) + 1
  carry = (token_B, done_B, cache, first_position_B, input_states)
  (last_B, _, cache, last_position_B, input_states), (later_tokens_NxB, later_side) = (
      jax.lax.scan(step, carry, step_rngs))
  new_tokens_BxN = jnp.concatenate([token_B[:, None], later_tokens_NxB.T], axis=1)
  tokens_BxT = jnp.concatenate([prompt_tokens_BxP.astype(jnp.int32), new_tokens_BxN], axis=1)
  if not with_state:
    return tokens_BxT
  last_side, _ = side_inputs(input_states, last_B[:, None], last_position_B[:, None])
  side_BxT = {name: jnp.concatenate([prompt_side[name], later_side[name][:, :, 0].T,
                                     last_side[name]], axis=1) for name in prompt_side}
  return Generation(tokens_BxT, side_BxT, cache)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "cache_options",
                                   "with_state", "forbid_ids"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, prompt_tokens_BxP: jax.Array,
              rng: jax.Array, temperature: jax.Array, top_p: jax.Array,
              inputs: tuple[DecodeInputs, ...], *, max_new_tokens: int, eos_id: int | None,
              cache_options: tuple[tuple[str, Any], ...], with_state: bool,
              forbid_ids: tuple[int, ...]) -> jax.Array | Generation:
  return decode_loop(nnx.merge(graphdef, state), prompt_tokens_BxP, rng, temperature, top_p,
                     inputs, max_new_tokens=max_new_tokens, eos_id=eos_id,
                     cache_options=cache_options, with_state=with_state,
                     forbid_ids=forbid_ids)


def check_max_new_tokens(max_new_tokens: int) -> None:
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def checked_cache_options(model: LM, inputs: tuple[DecodeInputs, ...], total_len: int
                          ) -> tuple[tuple[str, Any], ...]:
  """The decode cache options ``inputs`` need for ``total_len`` tokens (sorted), after
  checking that ``model`` decodes with each of them."""
  cache_options = {}
  for item in inputs:
    item.check(model)
    cache_options.update(item.cache_options(total_len))
  return tuple(sorted(cache_options.items()))


def _run(model: LM, prompt_tokens_BxP: jax.Array, max_new_tokens: int, rng: jax.Array,
         temperature: float, top_p: float, eos_id: int | None,
         inputs: tuple[DecodeInputs, ...], with_state: bool, forbid_ids: Sequence[int]
         ) -> jax.Array | Generation:
  check_max_new_tokens(max_new_tokens)
  total_len = prompt_tokens_BxP.shape[1] + max_new_tokens
  cache_options = checked_cache_options(model, inputs, total_len)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt_tokens_BxP), rng,
                   jnp.float32(temperature), jnp.float32(top_p), tuple(inputs),
                   max_new_tokens=max_new_tokens, eos_id=eos_id,
                   cache_options=cache_options, with_state=with_state,
                   forbid_ids=tuple(int(i) for i in forbid_ids))


def generate(model: LM, prompt_tokens_BxP: jax.Array, max_new_tokens: int, rng: jax.Array,
             temperature: float = 1.0, top_p: float = 1.0, eos_id: int | None = None,
             inputs: tuple[DecodeInputs, ...] = (), forbid_ids: Sequence[int] = ()
             ) -> jax.Array:
  """Prompt followed by ``max_new_tokens`` sampled tokens: int32 [B, P + N].

  All prompts share one length P (positions 0..P-1). Rows that emitted ``eos_id`` are
  padded with ``eos_id``. The model is not mutated. ``inputs``: the decode inputs of
  the run (``decode_inputs``; CCT with semantic steps: the step of every token, prompt
  included, decided by its rule on device); without them a mixer uses its defaults
  (CCT: fixed steps, position // step_len). ``forbid_ids`` (PAD, BOS) are never sampled.
  """
  return _run(model, prompt_tokens_BxP, max_new_tokens, rng, temperature, top_p, eos_id,
              inputs, with_state=False, forbid_ids=forbid_ids)


def generate_with_state(model: LM, prompt_tokens_BxP: jax.Array, max_new_tokens: int,
                        rng: jax.Array, temperature: float = 1.0, top_p: float = 1.0,
                        eos_id: int | None = None, inputs: tuple[DecodeInputs, ...] = (),
                        forbid_ids: Sequence[int] = ()) -> Generation:
  """``generate`` that also returns the decode inputs' side inputs and the final decode
  cache (a separate compilation: ``generate`` itself returns only the tokens)."""
  return _run(model, prompt_tokens_BxP, max_new_tokens, rng, temperature, top_p, eos_id,
              inputs, with_state=True, forbid_ids=forbid_ids)
