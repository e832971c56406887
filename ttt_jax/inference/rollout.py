"""Rollouts of ragged prompts: left padding, sampling with forbidden ids, completion
masks and the log-probabilities of sampled completions.

A batch of prompts of lengths n_b is left padded to one width P (``left_pad``): row b is
p_b = P - n_b pads, then its prompt. ``ragged_context`` gives such a row the context of
the prompt alone:

    positions   t - p_b          (0 at the first real token; pads negative)
    segment_ids [t >= p_b]       (pads 0, real tokens 1)

so in a full forward the pads never reach a real token (attention masks across segments,
TTT-Linear resets its state and its convs at the first real token), and in a decode
(``LM.decode``) a negative position marks a pad: attention's cache treats its slot as
empty, TTT-Linear and its convs leave it out, so each row's mini-batch grid starts at its
first real token. A padded batch therefore generates what each prompt generates alone.
(In a full forward TTT-Linear's grid stays the token order, so there a row gives its
unpadded outputs exactly only when p_b is a multiple of the mini-batch; attention always
does. ``sequence_logprobs`` does not use this context.)

``sample_rollout`` samples ``max_new_tokens`` tokens after each prompt through the
generate loop (``sampling.decode_loop``); it is pure and traceable inside another jit
(temperature and top-p may be traced), ``rollout`` is its jitted convenience. Forbidden
ids (PAD, BOS) get logit -inf before temperature, top-p and argmax. After a row's first
``eos_id`` it emits ``eos_id``; ``completion_mask`` keeps the first EOS and nothing after.
Token ids stay as sampled (never decoded and re-encoded).

``sequence_logprobs`` scores completions teacher-forced: log p(c_j | prompt, c_<j), float32
log-softmax. It moves every row's real tokens to the front (right padding, ``to_front``),
where a causal model reads nothing after them, so each row gets exactly its unpadded
forward on every model (TTT-Linear's grid included), with the default positions and the
side inputs the decode inputs decide for its tokens (``front_logits``); ``score`` is its
jitted convenience.

Mixers opt in to ragged decoding with a class attribute ``RAGGED_DECODE`` (attention,
TTT-Linear, CCT: its pads enter neither the working memory nor the steps, which count
from each row's first real token); ``sample_rollout`` refuses the others. Decode inputs
(``sampling.DecodeInputs``: CCT's semantic step ids) skip the pads as well.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax import registry
from ttt_jax.errors import DataError
from ttt_jax.inference import sampling
from ttt_jax.models.context import SequenceContext
from ttt_jax.models.lm import LM


class Rollout(NamedTuple):
  """Sampled completions of a left-padded prompt batch."""
  tokens_BxT: jax.Array
  """int32 left-padded prompts followed by the completions, T = P + N."""
  completion_BxN: jax.Array
  """int32 sampled tokens (``eos_id`` after a row's first EOS)."""
  completion_mask_BxN: jax.Array
  """bool: the completion up to and including its first EOS."""
  completion_lens_B: jax.Array
  """int32 number of True entries of the mask per row."""


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [B, P] with each row right-aligned after pads, lengths int32 [B]).
  P is ``length`` or the longest row; a row longer than ``length`` is a DataError."""
  lengths = np.asarray([len(row) for row in rows], np.int32)
  width = int(lengths.max(initial=0)) if length is None else length
  if len(lengths) and int(lengths.max()) > width:
    longest = int(np.argmax(lengths))
    raise DataError(f"prompt {longest} has {lengths[longest]} tokens, more than the padded "
                    f"length {width}")
  tokens = np.full((len(rows), width), pad_id, np.int32)
  for index, row in enumerate(rows):
    if len(row):
      tokens[index, width - len(row):] = np.asarray(row, np.int32)
  return tokens, lengths


def ragged_context(tokens_BxT: jax.Array, prompt_lens_B: jax.Array, prompt_width: int
                   ) -> SequenceContext:
  """The context of left-padded prompts of width P (any T - P tokens after them):
  positions from 0 at each row's first real token (pads negative), pads in segment 0 and
  real tokens in segment 1."""
  batch, length = tokens_BxT.shape
  pads_Bx1 = (prompt_width - jnp.asarray(prompt_lens_B, jnp.int32))[:, None]
  positions_BxT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None],
                                   (batch, length)) - pads_Bx1
  return SequenceContext(positions_BxT, (positions_BxT >= 0).astype(jnp.int32))


def completion_mask(completion_BxN: jax.Array, eos_id: int | None) -> jax.Array:
  """bool [B, N]: every token up to and including the row's first ``eos_id`` (all of
  them without an ``eos_id``)."""
  if eos_id is None:
    return jnp.ones(completion_BxN.shape, bool)
  is_eos_BxN = (completion_BxN == eos_id).astype(jnp.int32)
  return (jnp.cumsum(is_eos_BxN, axis=1) - is_eos_BxN) == 0


def check_ragged_decode(model: LM) -> None:
  """Raises ValueError unless the model's mixer decodes left-padded prompts (its class
  sets ``RAGGED_DECODE``; ``LM.decode``)."""
  mixer = registry.MIXERS.get(model.cfg.mixer.type)
  if not getattr(mixer, "RAGGED_DECODE", False):
    raise ValueError(f"the {model.cfg.mixer.type!r} mixer cannot decode ragged (left-padded) "
                     f"prompts; generate each prompt unpadded with sampling.generate")


def sample_rollout(model: LM, prompt_tokens_BxP: jax.Array, prompt_lens_B: jax.Array,
                   max_new_tokens: int, rng: jax.Array, *, temperature: float | jax.Array,
                   top_p: float | jax.Array = 1.0, eos_id: int | None,
                   forbid_ids: Sequence[int] = (),
                   inputs: tuple[sampling.DecodeInputs, ...] = (),
                   cache_options: tuple[tuple[str, Any], ...] | None = None) -> Rollout:
  """``max_new_tokens`` tokens sampled after each left-padded prompt (temperature 0:
  greedy), pure: traceable inside another jit (and inside a differentiated function:
  no gradient flows into the sampling). Each row generates what its prompt generates
  alone (the module doc). ``inputs``: the run's decode inputs (``sampling.decode_inputs``);
  ``cache_options``: ``sampling.checked_cache_options`` of them, computed here when
  None (the inputs' arrays must then be concrete, not traced)."""
  sampling.check_max_new_tokens(max_new_tokens)
  check_ragged_decode(model)
  graphdef, state = nnx.split(model)  # sampling is not differentiated
  model = nnx.merge(graphdef, jax.lax.stop_gradient(state))
  prompt_tokens_BxP = jnp.asarray(prompt_tokens_BxP, jnp.int32)
  width = prompt_tokens_BxP.shape[1]
  ctx = ragged_context(prompt_tokens_BxP, prompt_lens_B, width)
  if cache_options is None:
    cache_options = sampling.checked_cache_options(model, tuple(inputs),
                                                   width + max_new_tokens)
  tokens_BxT = sampling.decode_loop(
      model, prompt_tokens_BxP, rng, temperature, top_p, tuple(inputs),
      max_new_tokens=max_new_tokens, eos_id=eos_id, cache_options=cache_options,
      prompt_ctx=ctx, forbid_ids=tuple(int(i) for i in forbid_ids))
  completion_BxN = tokens_BxT[:, width:]
  mask_BxN = completion_mask(completion_BxN, eos_id)
  return Rollout(tokens_BxT, completion_BxN, mask_BxN,
                 jnp.sum(mask_BxN, axis=1, dtype=jnp.int32))


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "forbid_ids",
                                   "cache_options"))
def _rollout(graphdef: nnx.GraphDef, state: nnx.State, prompt_tokens_BxP: jax.Array,
             prompt_lens_B: jax.Array, rng: jax.Array, temperature: jax.Array,
             top_p: jax.Array, inputs: tuple[sampling.DecodeInputs, ...], *,
             max_new_tokens: int, eos_id: int | None, forbid_ids: tuple[int, ...],
             cache_options: tuple[tuple[str, Any], ...]) -> Rollout:
  return sample_rollout(nnx.merge(graphdef, state), prompt_tokens_BxP, prompt_lens_B,
                        max_new_tokens, rng, temperature=temperature, top_p=top_p,
                        eos_id=eos_id, forbid_ids=forbid_ids, inputs=inputs,
                        cache_options=cache_options)


def rollout(model: LM, prompt_tokens_BxP: jax.Array, prompt_lens_B: jax.Array,
            max_new_tokens: int, rng: jax.Array, *, temperature: float = 1.0,
            top_p: float = 1.0, eos_id: int | None, forbid_ids: Sequence[int] = (),
            inputs: tuple[sampling.DecodeInputs, ...] = ()) -> Rollout:
  """``sample_rollout`` compiled once per (model structure, shapes, max_new_tokens,
  eos_id, forbid_ids, decode inputs' structure); temperature, top_p and the decode
  inputs' arrays are traced. The model is not mutated."""
  sampling.check_max_new_tokens(max_new_tokens)
  check_ragged_decode(model)
  cache_options = sampling.checked_cache_options(
      model, tuple(inputs), jnp.shape(prompt_tokens_BxP)[1] + max_new_tokens)
  graphdef, state = nnx.split(model)
  return _rollout(graphdef, state, jnp.asarray(prompt_tokens_BxP, jnp.int32),
                  jnp.asarray(prompt_lens_B, jnp.int32), rng, jnp.float32(temperature),
                  jnp.float32(top_p), tuple(inputs), max_new_tokens=max_new_tokens,
                  eos_id=eos_id, forbid_ids=tuple(int(i) for i in forbid_ids),
                  cache_options=cache_options)


def to_front(tokens_BxT: jax.Array, prompt_lens_B: jax.Array, prompt_width: int) -> jax.Array:
  """Rows of [prompt left-padded to ``prompt_width`` | continuation] with their real
  tokens moved to the front: row b's token t + p_b moves to t, p_b = P - n_b its pads,
  which wrap to the end, after everything a causal model reads."""
  length = tokens_BxT.shape[1]
  pads_Bx1 = (prompt_width - jnp.asarray(prompt_lens_B, jnp.int32))[:, None]
  return jnp.take_along_axis(tokens_BxT, (jnp.arange(length)[None] + pads_Bx1) % length,
                             axis=1)


def front_logits(model: Callable[..., jax.Array], front_BxT: jax.Array,
                 inputs: tuple[sampling.DecodeInputs, ...] = ()) -> jax.Array:
  """The logits of rows whose real tokens are at the front (``to_front``): each row's
  unpadded forward, with the default positions and the decode inputs' side inputs of its
  tokens (``sampling.sequence_side``: CCT's semantic steps), so a teacher-forced forward
  reads what decoding the same tokens reads."""
  if not inputs:
    return model(front_BxT)
  return model(front_BxT, SequenceContext.for_tokens(
      front_BxT, side=sampling.sequence_side(inputs, front_BxT)))


def sequence_logprobs(model: LM, tokens_BxT: jax.Array, prompt_lens_B: jax.Array,
                      prompt_width: int, completion_mask_BxN: jax.Array,
                      inputs: tuple[sampling.DecodeInputs, ...] = ()
                      ) -> tuple[jax.Array, jax.Array]:
  """(log p(completion token j | prompt, completion[:j]) float32 [B, N], their sum over
  the mask [B]) for left-padded prompts of width P followed by N = T - P completion
  tokens. Masked entries are 0, as is a first completion token with no token before it
  (an empty prompt). ``inputs``: the run's decode inputs (``sampling.decode_inputs``).
  Differentiable in the model's parameters."""
  n_new = tokens_BxT.shape[1] - prompt_width
  prompt_lens_B = jnp.asarray(prompt_lens_B, jnp.int32)
  front_BxT = to_front(tokens_BxT, prompt_lens_B, prompt_width)
  log_probs_BxTxV = jax.nn.log_softmax(
      front_logits(model, front_BxT, inputs).astype(jnp.float32), axis=-1)
  next_BxT1 = jnp.take_along_axis(log_probs_BxTxV[:, :-1], front_BxT[:, 1:, None],
                                  axis=2)[..., 0]  # log p(token t+1 | tokens <= t)
  # Completion token j sits at n_b + j of the moved row, predicted at n_b + j - 1.
  source_BxN = prompt_lens_B[:, None] + jnp.arange(n_new, dtype=jnp.int32)[None] - 1
  per_token_BxN = jnp.take_along_axis(next_BxT1, jnp.maximum(source_BxN, 0), axis=1)
  keep_BxN = jnp.asarray(completion_mask_BxN, bool) & (source_BxN >= 0)
  per_token_BxN = jnp.where(keep_BxN, per_token_BxN, 0.0)
  return per_token_BxN, jnp.sum(per_token_BxN, axis=1)


@partial(jax.jit, static_argnames=("graphdef", "prompt_width"))
def _sequence_logprobs(graphdef: nnx.GraphDef, state: nnx.State, tokens_BxT: jax.Array,
                       prompt_lens_B: jax.Array, completion_mask_BxN: jax.Array,
                       inputs: tuple[sampling.DecodeInputs, ...], *, prompt_width: int
                       ) -> tuple[jax.Array, jax.Array]:
  return sequence_logprobs(nnx.merge(graphdef, state), tokens_BxT, prompt_lens_B,
                           prompt_width, completion_mask_BxN, inputs)


def score(model: LM, tokens_BxT: jax.Array, prompt_lens_B: jax.Array, prompt_width: int,
          completion_mask_BxN: jax.Array, inputs: tuple[sampling.DecodeInputs, ...] = ()
          ) -> tuple[jax.Array, jax.Array]:
  """``sequence_logprobs`` compiled once per (model structure, shapes, prompt_width,
  decode inputs' structure)."""
  for item in inputs:
    item.check(model)
  graphdef, state = nnx.split(model)
  return _sequence_logprobs(graphdef, state, jnp.asarray(tokens_BxT, jnp.int32),
                            jnp.asarray(prompt_lens_B, jnp.int32),
                            jnp.asarray(completion_mask_BxN, bool), tuple(inputs),
                            prompt_width=prompt_width)
