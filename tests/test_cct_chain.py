"""Commitment hash chain (cct/chain.py) and, through the generation it records,
semantic-step working-memory generation (sampling.generate with CCT's decode input,
cct/decode.py)."""

from __future__ import annotations

import base64
import copy
import dataclasses
import glob
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.cct import steps
from ttt_jax.cct import chain as cct_chain
from ttt_jax.cct import mixer as cct
from ttt_jax.cct.decode import SemanticSteps, semantic_annotator
from ttt_jax.cct.mixer import CCTConfig
from ttt_jax.config import Config, ConfigError, ModelConfig, load_config
from ttt_jax.inference import sampling
from ttt_jax.models import lm
from ttt_jax.models.context import SequenceContext
from ttt_jax.models.ffn.swiglu import SwiGLUConfig
from ttt_jax.data.tokenizer import STEP_PIECE, train_tokenizer
from train_util import copy_stdlib_corpus

PROMPT = "Hello there. The sky is blue! What now? Yes. Then we go on."


def random_summaries(seed: int, steps: int = 6, layers: int = 2, width: int = 8) -> np.ndarray:
  summaries = np.random.default_rng(seed).normal(size=(steps, layers, width))
  return (summaries / np.linalg.norm(summaries, axis=-1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- the chain


def test_chain_is_deterministic_and_each_step_commits_its_predecessors():
  header = cct_chain.chain_header(8, 2, "float32", "fixed/4")
  genesis = cct_chain.genesis_hash(header)
  assert genesis == cct_chain.genesis_hash(dict(reversed(list(header.items()))))
  assert genesis != cct_chain.genesis_hash({**header, "n_layers": 3})
  summaries = random_summaries(0)
  hashes = cct_chain.chain_hashes(genesis, summaries)
  assert hashes == cct_chain.chain_hashes(genesis, summaries.copy()) and len(hashes) == 6
  assert len(set(hashes)) == 6 and all(len(h) == 32 for h in hashes)
  changed = summaries.copy()
  changed[3, 1, 5] = np.nextafter(changed[3, 1, 5], np.float32(2))  # one ulp of one value
  other = cct_chain.chain_hashes(genesis, changed)
  assert other[:3] == hashes[:3]
  assert all(a != b for a, b in zip(other[3:], hashes[3:]))
  # b_k: every layer's summary, layer 0 first, little-endian float32
  assert cct_chain.step_bytes(summaries[0]) == summaries[0].astype("<f4").tobytes()
  assert len(cct_chain.step_bytes(summaries[0])) == 2 * 8 * 4
  assert hashes[0] == hashlib.sha256(genesis + summaries[0].astype("<f4").tobytes()).digest()


# ----------------------------------------------------------------------------- generation


def random_model(cfg: ModelConfig, vocab_size: int, seed: int) -> lm.LM:
  """An LM with every parameter drawn from N(0, 0.3^2) on the host: ``nnx.eval_shape``
  traces the constructor without compiling its initialisers (most of a test's time on a
  2-core CPU otherwise)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: lm.LM(cfg, vocab_size,
                                                               rngs=nnx.Rngs(seed))))
  rng = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree.map(
      lambda leaf: jnp.asarray(0.3 * rng.normal(size=leaf.shape), leaf.dtype), abstract))


MODEL = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn=SwiGLUConfig(d_ff=64),
                    mixer=CCTConfig(step_len=6, d_summary=8))
"""The tiny CCT model of the generation tests."""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  corpus = copy_stdlib_corpus(tmp_path_factory.mktemp("corpus") / "src")
  return train_tokenizer([open(p).read() for p in sorted(glob.glob(corpus))], 512, 100000,
                         (STEP_PIECE,))


@pytest.fixture(scope="module")
def semantic(tokenizer):
  """A tiny CCT model generating with semantic steps (rule of step_len 6, min 2)."""
  annotator = steps.StepAnnotator("semantic", 6, 2, tokenizer)
  model = random_model(MODEL, tokenizer.vocab_size, 0)
  prompt = np.asarray([tokenizer.encode(PROMPT)[:20]] * 2, np.int32)
  prompt[1, 8] = tokenizer.eos_id
  rule = cct.step_rule(annotator)
  generation = sampling.generate_with_state(model, prompt, 24, jax.random.key(0),
                                            temperature=0.0, inputs=(SemanticSteps(rule),))
  return model, annotator, rule, prompt, generation


@pytest.mark.slow
def generated_step_ids(generation: sampling.Generation) -> np.ndarray:
  assert set(generation.side) == {cct.STEP_IDS}
  return np.asarray(generation.side[cct.STEP_IDS])


def test_semantic_generation_steps_and_decode_match_the_full_forward(semantic):
  model, annotator, _, prompt, generation = semantic
  tokens, step_ids = np.asarray(generation.tokens_BxT), generated_step_ids(generation)
  assert tokens.shape == step_ids.shape == (2, 44)
  np.testing.assert_array_equal(tokens[:, :20], prompt)
  for row in range(2):  # the on-device rule is the annotator's, token by token
    np.testing.assert_array_equal(step_ids[row], annotator(tokens[row]))
  assert step_ids[:, -1].min() >= 7 and np.bincount(step_ids[0]).max() <= 6
  # greedy decoding picked the argmax of the training-form forward with these step ids
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens, step_ids: nnx.merge(graphdef, state)(
      tokens, SequenceContext.for_tokens(tokens, side={cct.STEP_IDS: step_ids})))
  logits = np.asarray(forward(state, tokens, step_ids))
  np.testing.assert_array_equal(np.argmax(logits, -1)[:, 19:-1], tokens[:, 20:])
  # the decode state: every closed step's summary, in every layer, as that forward
  # computes it
  cache = generation.cache
  np.testing.assert_array_equal(np.asarray(cache.step_B[0]), step_ids[:, -2])
  for row in range(2):
    closed = int(step_ids[row, -2])
    forward = cct_chain.forward_summaries(model, tokens[row, :-1], step_ids[row, :-1])
    assert forward.shape == (closed + 1, 2, 8)
    np.testing.assert_allclose(cct_chain.committed_summaries(cache)[row], forward[:closed],
                               atol=1e-5)


@pytest.mark.slow
def test_record_holds_only_committed_steps(semantic):
  model, annotator, _, _, generation = semantic
  record = cct_chain.generation_record(model, generation, annotator)
  assert record["header"]["steps"] == "semantic/6/2"
  step_ids = generated_step_ids(generation)
  for row, sequence in enumerate(record["sequences"]):
    # the last sampled token is not decoded; the last decoded token's step is open
    assert sequence["n_decoded"] == 43 and sequence["n_steps"] == step_ids[row, -2]
    assert len(sequence["hashes"]) == sequence["n_steps"] == len(set(sequence["hashes"]))
    assert sequence["head"] == sequence["hashes"][-1]
    summaries = cct_chain.committed_summaries(generation.cache)[row]
    assert summaries.shape == (sequence["n_steps"], 2, 8)
    assert [h.hex() for h in cct_chain.chain_hashes(bytes.fromhex(record["genesis"]),
                                                    summaries)] == sequence["hashes"]
    assert [base64.b64decode(b) for b in sequence["summaries"]] == [
        cct_chain.step_bytes(s) for s in summaries]


def inside_a_step(step_ids_BxT: np.ndarray, start: int) -> int:
  """The first position >= start that does not begin a step in any row."""
  inside = np.all(step_ids_BxT[:, 1:] == step_ids_BxT[:, :-1], axis=0)
  return start + int(np.argmax(inside[start - 1:]))


@pytest.mark.slow
def test_changing_a_prompt_token_changes_its_step_hash_and_later_ones(semantic):
  model, annotator, rule, prompt, generation = semantic
  record = cct_chain.generation_record(model, generation, annotator)
  step_ids = generated_step_ids(generation)
  position = inside_a_step(step_ids, 10)
  assert position < 20
  changed_prompt = prompt.copy()
  changed_prompt[:, position] = (prompt[:, position] + 1) % 100 + 10
  changed = sampling.generate_with_state(model, changed_prompt, 24, jax.random.key(0),
                                         temperature=0.0, inputs=(SemanticSteps(rule),))
  other = cct_chain.generation_record(model, changed, annotator)
  for row in range(2):
    step = int(step_ids[row, position])
    before, after = record["sequences"][row]["hashes"], other["sequences"][row]["hashes"]
    assert 0 < step and before[:step] == after[:step]
    assert all(a != b for a, b in zip(before[step:], after[step:]))


@pytest.mark.slow
def test_verify_accepts_the_record_and_finds_a_tampered_token(semantic):
  model, annotator, _, _, generation = semantic
  record = cct_chain.generation_record(model, generation, annotator)
  results = cct_chain.verify_record(model, record, annotator)
  assert all(r.ok and r.first_mismatch is None for r in results), results
  step_ids = generated_step_ids(generation)
  position = inside_a_step(step_ids, 25)  # a generated token of a committed step
  assert step_ids[0, position] < record["sequences"][0]["n_steps"]
  tampered = copy.deepcopy(record)
  tokens = tampered["sequences"][0]["tokens"]
  tokens[position] = (tokens[position] + 1) % 500
  result = cct_chain.verify_record(model, tampered, annotator)[0]
  assert not result.ok and result.first_mismatch == step_ids[0, position], result
  # a config with fewer training summary slots verifies the same (every step gets one)
  graphdef, state = nnx.split(model)
  few_slots = nnx.merge(graphdef, state)
  few_slots.blocks.mixer.max_steps = 2
  assert cct_chain.verify_record(few_slots, record, annotator)[1].ok
  forged = copy.deepcopy(record)
  forged["sequences"][1]["hashes"][2] = "00" * 32
  assert cct_chain.verify_record(model, forged, annotator)[1].first_mismatch == 2
  # a consistent chain over summaries the tokens do not produce
  summaries = cct_chain.committed_summaries(generation.cache)[1].copy()
  summaries[3, 0, 0] += 1e-3
  sequence = forged["sequences"][1]
  hashes = cct_chain.chain_hashes(bytes.fromhex(record["genesis"]), summaries)
  sequence["summaries"] = [base64.b64encode(cct_chain.step_bytes(s)).decode()
                           for s in summaries]
  sequence["hashes"], sequence["head"] = [h.hex() for h in hashes], hashes[-1].hex()
  result = cct_chain.verify_record(model, forged, annotator)[1]
  assert result.first_mismatch == 3 and "differs by 0.001" in result.reason, result
  # another step rule (header) mismatches before any step
  fixed = cct_chain.verify_record(model, record, None)[0]
  assert not fixed.ok and fixed.first_mismatch == 0 and "header" in fixed.reason


def test_semantic_decode_annotator_only_for_semantic_cct_runs_that_fit_the_buffer():
  """None for other mixers and fixed steps; a clear error when semantic steps exceed the
  decode step buffer (checked before any tokenizer is used)."""
  semantic = ["data.step_boundaries=semantic", "data.step_len=6", "data.step_min_len=2"]
  attention = load_config(None, semantic + ["model.mixer=attention"])
  assert semantic_annotator(attention, None) is None
  assert sampling.decode_inputs(attention, None) == ()
  fixed = load_config(None, ["model.mixer=cct", "model.mixer.step_len=50",
                             "data.step_boundaries=fixed"])
  assert semantic_annotator(fixed, None) is None
  assert sampling.decode_inputs(fixed, None) == ()
  too_long = load_config(None, semantic + ["model.mixer=cct", "model.mixer.step_len=4"])
  with pytest.raises(ConfigError, match="^data.step_len: semantic steps of up to 6 tokens exceed "
                                        "model.mixer.step_len=4, the decode step buffer; "
                                        "--set model.mixer.step_len=6$"):
    semantic_annotator(too_long, None)
  with pytest.raises(ConfigError, match="data.step_len"):
    sampling.decode_inputs(too_long, None)


def test_decode_inputs_of_a_semantic_run_are_its_step_rule(semantic, tokenizer):
  """The registered decode input of a semantic CCT run generates exactly what the step
  rule given by hand does."""
  model, _, _, prompt, generation = semantic
  cfg = Config(model=MODEL, data=load_config(None, [
      "data.step_boundaries=semantic", "data.step_len=6", "data.step_min_len=2"]).data)
  inputs = sampling.decode_inputs(cfg, tokenizer)
  assert len(inputs) == 1 and isinstance(inputs[0], SemanticSteps)
  assert inputs[0].name == cct.STEP_IDS
  assert inputs[0].cache_options(44) == {"max_steps": 43 // 2 + 1}
  again = sampling.generate_with_state(model, prompt, 24, jax.random.key(0), temperature=0.0,
                                       inputs=inputs)
  np.testing.assert_array_equal(np.asarray(again.tokens_BxT), np.asarray(generation.tokens_BxT))
  np.testing.assert_array_equal(generated_step_ids(again), generated_step_ids(generation))
  too_short = random_model(dataclasses.replace(MODEL, mixer=CCTConfig(step_len=4, d_summary=8)),
                           tokenizer.vocab_size, 0)
  with pytest.raises(ValueError, match="exceed the decode step buffer, model.mixer.step_len=4"):
    sampling.generate(too_short, prompt, 2, jax.random.key(0), inputs=inputs)
  not_cct = random_model(ModelConfig(n_layers=1, d_model=32, n_heads=4), tokenizer.vocab_size, 0)
  with pytest.raises(ValueError, match="semantic step ids need model.mixer.type='cct'"):
    sampling.generate(not_cct, prompt, 2, jax.random.key(0), inputs=inputs)


def test_fixed_step_generation_has_no_step_side_input_and_verifies(semantic):
  """Without decode inputs a CCT model decodes fixed steps (position // step_len): the
  generation carries no step ids, and its record verifies under the fixed rule."""
  model, _, _, prompt, _ = semantic
  generation = sampling.generate_with_state(model, prompt, 10, jax.random.key(1),
                                            temperature=0.0)
  assert generation.side == {}
  record = cct_chain.generation_record(model, generation, None)
  assert record["header"]["steps"] == "fixed/6"
  assert [s["n_steps"] for s in record["sequences"]] == [(30 - 1) // 6] * 2
  results = cct_chain.verify_record(model, record, None)
  assert all(r.ok for r in results), results
