"""The SDFT divergences and loss: against float64 brute force, their gradient's closed
form, continuity between forward KL, JSD and reverse KL, masking and alignment."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.cct.mixer import StepRule
from ttt_jax.sdft import objective

V = 37


def _logits(seed: int, shape=(5, V), scale=3.0) -> np.ndarray:
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _extreme_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
  """Logit rows of +-50: one-hot peaks on different tokens, and random signs."""
  rng = np.random.default_rng(7)
  peaked_s, peaked_t = np.full(V, -50.0, np.float32), np.full(V, -50.0, np.float32)
  peaked_s[3], peaked_t[11] = 50.0, 50.0
  signs_s = rng.choice([-50.0, 50.0], V).astype(np.float32)
  signs_t = rng.choice([-50.0, 50.0], V).astype(np.float32)
  return [(peaked_s, peaked_t), (signs_s, signs_t), (_logits(1)[0], _logits(2)[0])]


def _log_softmax64(z: np.ndarray) -> np.ndarray:
  z = z.astype(np.float64)
  shifted = z - z.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _kl64(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def brute_force(student: np.ndarray, teacher: np.ndarray, divergence: str,
                beta: float = 0.5) -> np.ndarray:
  """The divergence in float64, term by term over the vocabulary."""
  l_s, l_t = _log_softmax64(student), _log_softmax64(teacher)
  if divergence == "reverse":
    return _kl64(l_s, l_t)
  if divergence == "forward":
    return _kl64(l_t, l_s)
  l_m = np.log(beta * np.exp(l_t) + (1 - beta) * np.exp(l_s))
  return beta * _kl64(l_s, l_m) + (1 - beta) * _kl64(l_t, l_m)


def divergence(student, teacher, kind, beta=0.5) -> np.ndarray:
  return np.asarray(objective.token_divergence(jnp.asarray(student), jnp.asarray(teacher),
                                               kind, beta))


@pytest.mark.parametrize("kind,beta", [("reverse", 0.5), ("forward", 0.5), ("jsd", 0.5),
                                       ("jsd", 0.1), ("jsd", 0.9)])
def test_divergence_equals_float64_brute_force_even_at_logits_of_50(kind, beta):
  pairs = _extreme_pairs()
  student = np.stack([s for s, _ in pairs] + list(_logits(3)))
  teacher = np.stack([t for _, t in pairs] + list(_logits(4)))
  got = divergence(student, teacher, kind, beta)
  want = brute_force(student, teacher, kind, beta)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # the peaked pair is far apart (JSD is at most log 2): the check is not vacuous
  assert want[0] > (10 if kind != "jsd" else 0.5)


@pytest.mark.parametrize("kind", ["reverse", "forward", "jsd"])
def test_divergence_is_non_negative_zero_for_equal_logits_and_shift_invariant(kind):
  student, teacher = _logits(5, (64, V)), _logits(6, (64, V))
  values = divergence(student, teacher, kind)
  assert (values >= 0).all() and (values > 1e-3).all()
  near = student + np.random.default_rng(0).normal(size=student.shape).astype(np.float32) * 1e-3
  assert (divergence(student, near, kind) >= 0).all()
  assert (divergence(student, student, kind) == 0).all()
  for shift_s, shift_t in ((7.5, 0.0), (0.0, -12.25), (3.0, 3.0)):
    np.testing.assert_allclose(divergence(student + shift_s, teacher + shift_t, kind),
                               values, rtol=1e-5, atol=1e-6)


def test_reverse_kl_gradient_is_the_closed_form():
  student, teacher = _logits(8, (6, V)), _logits(9, (6, V))
  grad = jax.grad(lambda z: jnp.sum(objective.reverse_kl(z, jnp.asarray(teacher))))(
      jnp.asarray(student))
  l_s, l_t = _log_softmax64(student), _log_softmax64(teacher)
  kl = _kl64(l_s, l_t)[:, None]
  np.testing.assert_allclose(np.asarray(grad), np.exp(l_s) * (l_s - l_t - kl), atol=2e-6)


def test_teacher_logits_get_no_gradient():
  student, teacher = jnp.asarray(_logits(10)), jnp.asarray(_logits(11))
  for kind in ("reverse", "forward", "jsd"):
    grad = jax.grad(lambda t: jnp.sum(objective.token_divergence(student, t, kind)))(teacher)
    assert not np.asarray(grad).any()


def test_jsd_is_continuous_into_forward_and_reverse_kl():
  student, teacher = _logits(12, (8, V), 1.5), _logits(13, (8, V), 1.5)
  forward = divergence(student, teacher, "forward")
  reverse = divergence(student, teacher, "reverse")
  assert not np.allclose(forward, reverse, rtol=0.05)  # the endpoints are told apart
  np.testing.assert_allclose(divergence(student, teacher, "jsd", 1e-6), forward, rtol=1e-4)
  np.testing.assert_allclose(divergence(student, teacher, "jsd", 1 - 1e-6), reverse, rtol=1e-4)
  np.testing.assert_array_equal(divergence(student, teacher, "jsd", 0.0), forward)
  np.testing.assert_array_equal(divergence(student, teacher, "jsd", 1.0), reverse)
  # swapping the two sides is swapping beta for 1 - beta; 0.5 is symmetric
  np.testing.assert_allclose(divergence(teacher, student, "jsd", 0.3),
                             divergence(student, teacher, "jsd", 0.7), rtol=1e-5)
  np.testing.assert_allclose(divergence(teacher, student, "jsd", 0.5),
                             divergence(student, teacher, "jsd", 0.5), rtol=1e-5)


def test_masked_mean_ignores_padding_and_empty_continuations():
  student, teacher = _logits(14, (2, 5, V)), _logits(15, (2, 5, V))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
  loss = float(objective.sdft_loss(student, teacher, mask))
  want = brute_force(student, teacher, "reverse")[mask].mean()
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  # more padding: longer rows of garbage (NaN) logits, and an empty continuation row
  pad_s = np.concatenate([student, np.full((2, 3, V), np.nan, np.float32)], axis=1)
  pad_t = np.concatenate([teacher, np.full((2, 3, V), np.nan, np.float32)], axis=1)
  pad_mask = np.concatenate([mask, np.zeros((2, 3), bool)], axis=1)
  empty_s = np.concatenate([pad_s, np.full((1, 8, V), np.nan, np.float32)])
  empty_t = np.concatenate([pad_t, np.zeros((1, 8, V), np.float32)])
  empty_mask = np.concatenate([pad_mask, np.zeros((1, 8), bool)])
  assert float(objective.sdft_loss(empty_s, empty_t, empty_mask)) == loss
  grad = jax.grad(lambda z: objective.sdft_loss(z, empty_t, empty_mask))(
      jnp.asarray(np.nan_to_num(empty_s)))
  assert np.isfinite(np.asarray(grad)).all()
  # a batch of empty continuations: a zero loss, no NaN
  none = np.zeros((2, 5), bool)
  assert float(objective.sdft_loss(student, teacher, none)) == 0.0
  assert float(objective.teacher_gain(student, teacher, np.zeros((2, 5), np.int32), none)) == 0


def test_loss_mask_skips_the_first_tokens():
  mask = np.array([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(objective.loss_mask(jnp.asarray(mask), 2),
                                [[0, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(objective.loss_mask(jnp.asarray(mask), 0), mask)


def test_student_and_teacher_logits_align_on_the_same_continuation_tokens():
  """A 'model' whose logits at position t one-hot encode the token at t: the logits
  chosen for continuation token j must then encode the token right before it, however
  long each row's prompt is and however wide its padding."""
  pad = 0

  def model(tokens):
    return jax.nn.one_hot(tokens, V)

  continuation = jnp.asarray([[21, 22, 23], [31, 32, 33]], jnp.int32)
  for rows, width in (([[5, 6], [7]], 4), ([[8, 9, 10, 11, 12], [13, 14]], 6)):
    prompt = np.full((2, width), pad, np.int32)
    for b, row in enumerate(rows):
      prompt[b, width - len(row):] = row
    lens = jnp.asarray([len(r) for r in rows], jnp.int32)
    logits = objective.sequence_logits(model, jnp.asarray(prompt), lens, continuation)
    previous = np.argmax(np.asarray(logits), axis=-1)
    want = [[row[-1], *np.asarray(continuation)[b, :-1]] for b, row in enumerate(rows)]
    np.testing.assert_array_equal(previous, want)


def _semantic_rule() -> StepRule:
  """A synthetic semantic step rule over ids < 64: a step may start at a multiple of 5
  read in text state 0 (a multiple of 3 moves to state 1, where none may) or after the
  piece 7; steps of 2 to 4 tokens."""
  ids = np.arange(64)
  candidate = np.stack([ids % 5 == 0, np.zeros(64, bool)])
  next_state = np.stack([(ids % 3 == 0).astype(np.int32), np.zeros(64, np.int32)])
  return StepRule(jnp.asarray(candidate), jnp.asarray(next_state), jnp.asarray(ids == 7),
                  jnp.int32(4), jnp.int32(2))


def _reference_steps(rule: StepRule, row: list[int]) -> np.ndarray:
  """The rule's step ids of one unpadded row, read token by token on the host."""
  candidate, next_state = np.asarray(rule.candidate_QxV), np.asarray(rule.next_state_QxV)
  after = np.asarray(rule.boundary_after_V)
  steps, step, length, state, previous = [], 0, 0, 0, 0
  for token in row:
    starts = length >= int(rule.step_len) or (
        (candidate[state, token] or after[previous]) and length >= int(rule.step_min_len))
    step, length = step + int(starts), 1 if starts else length + 1
    state, previous = next_state[state, token], token
    steps.append(step)
  return np.asarray(steps, np.int32)


@pytest.mark.slow
def test_a_semantic_cct_student_and_teacher_read_the_steps_of_their_own_rows(monkeypatch):
  """The SDFT objective on CCT with semantic steps (a decode input): its divergence
  equals a float64 one over each row's unpadded forwards, student [prompt | y] and teacher
  [template | y], each with the step ids the rule gives that row on the host; read with
  fixed steps, the same continuations give another."""
  from flax import nnx

  from ttt_jax.cct.decode import SemanticSteps
  from ttt_jax.config import load_config
  from ttt_jax.inference import rollout
  from ttt_jax.models import lm
  from ttt_jax.models.context import SequenceContext
  from ttt_jax.sdft import teacher as teacher_lib
  from ttt_jax.training.objectives import StepContext

  cfg = load_config(None, [
      "model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
      "model.ffn.d_ff=64", "model.init_std=0.3",
      "model.mixer={type: cct, d_summary: 8, step_len: 4}", "sdft.max_new_tokens=7"])
  rule = _semantic_rule()
  inputs = (SemanticSteps(rule),)
  student = lm.LM(cfg.model, 64, rngs=nnx.Rngs(1))
  extras = {teacher_lib.TEACHER: nnx.split(lm.LM(cfg.model, 64, rngs=nnx.Rngs(2)))[1]}
  prompts = ([5, 9, 3, 17, 33, 12, 8], [10], [11, 4, 20, 6, 15], [30, 12, 3, 9, 9, 41, 25, 13, 50])
  templates = [[40, 7, 20, 45, 3, 60, *p, 7, 35] for p in prompts]
  batch = {}
  for name, rows in (("prompt", prompts), ("teacher_prompt", templates)):
    tokens, lens = rollout.left_pad(rows, 0)
    batch[name], batch[name.replace("prompt", "lens")] = jnp.asarray(tokens), jnp.asarray(lens)
  batch["prompt_lens"] = batch.pop("lens")
  batch["replay"] = jnp.zeros(len(prompts), jnp.float32)
  samples = []

  def recorded(*args, **kwargs):
    assert kwargs["inputs"] is inputs
    samples.append(sampled(*args, **kwargs))
    return samples[-1]

  sampled = rollout.sample_rollout
  monkeypatch.setattr(rollout, "sample_rollout", recorded)
  ctx = StepContext(jnp.int32(0), jax.random.key(4), extras)
  ids = objective.TokenIds(0, 1, -1)
  _, metrics = objective.objective(cfg, ids, inputs)(student, batch, ctx)
  continuation = np.asarray(samples[-1].completion_BxN)
  teacher_model = teacher_lib.model(cfg, student, extras)

  def row_log_probs(model, row: list[int]) -> np.ndarray:
    tokens = jnp.asarray([row], jnp.int32)
    steps = jnp.asarray(_reference_steps(rule, row))[None]
    logits = model(tokens, SequenceContext.for_tokens(tokens, side={"step_ids": steps}))
    return _log_softmax64(np.asarray(logits[0]))

  divergences, differ = [], 0
  for b, (prompt, template) in enumerate(zip(prompts, templates)):
    y = continuation[b].tolist()
    l_s = row_log_probs(student, prompt + y)[len(prompt) - 1:-1]
    l_t = row_log_probs(teacher_model, template + y)[len(template) - 1:-1]
    divergences.append(_kl64(l_s, l_t))
    for row in (prompt + y, template + y):  # rows whose steps are not fixed ones
      steps = _reference_steps(rule, row)
      differ += not np.array_equal(steps, np.arange(len(steps)) // 4)
  assert differ >= 4
  want = np.mean(divergences)
  np.testing.assert_allclose(float(metrics["kl"]), want, rtol=1e-5)
  fixed = np.mean([_kl64(  # the same continuations read with fixed steps
      _log_softmax64(np.asarray(student(jnp.asarray([p + y])))[0])[len(p) - 1:-1],
      _log_softmax64(np.asarray(teacher_model(jnp.asarray([t + y])))[0])[len(t) - 1:-1])
      for p, t, y in zip(prompts, templates, continuation.tolist())])
  assert abs(fixed - want) > 1e-3 * want  # the steps matter


def test_teacher_gain_is_the_mean_log_probability_difference_of_the_sampled_tokens():
  student, teacher = _logits(16, (2, 4, V)), _logits(17, (2, 4, V))
  tokens = np.random.default_rng(3).integers(0, V, (2, 4)).astype(np.int32)
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  l_s, l_t = _log_softmax64(student), _log_softmax64(teacher)
  pick = lambda l: np.take_along_axis(l, tokens[..., None], -1)[..., 0]  # noqa: E731
  want = (pick(l_t) - pick(l_s))[mask].mean()
  got = float(objective.teacher_gain(student, teacher, tokens, mask))
  np.testing.assert_allclose(got, want, rtol=1e-5)
