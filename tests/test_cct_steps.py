"""Tests of ttt_jax/cct/steps.py: CCT step boundaries (StepAnnotator, the <STEP> piece),
the step_ids batch field, and the annotator's online form (cct/mixer.py StepRule)."""

from __future__ import annotations

import glob

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.cct import steps
from ttt_jax.config import Config, ConfigError, DataConfig
from ttt_jax.data import pipeline
from ttt_jax.data.tokenizer import STEP_PIECE, train_tokenizer, trainer_settings
from ttt_jax.cct import mixer as cct
from train_util import copy_stdlib_corpus


@pytest.fixture(scope="module")
def corpus_texts(tmp_path_factory):
  corpus = copy_stdlib_corpus(tmp_path_factory.mktemp("corpus") / "src")
  return [open(path).read() for path in sorted(glob.glob(corpus))]


@pytest.fixture(scope="module")
def tokenizer(corpus_texts):
  return train_tokenizer(corpus_texts, 512, 100000, (STEP_PIECE,))


def step_texts(tokenizer, ids, step_ids):
  return [tokenizer.decode([i for i, s in zip(ids, step_ids) if s == k])
          for k in range(int(step_ids.max()) + 1)]


def test_step_piece_is_one_user_defined_token(tokenizer):
  step_id = tokenizer.processor.piece_to_id(STEP_PIECE)
  assert step_id != tokenizer.unk_id
  ids = tokenizer.encode("x = 1<STEP>y = 2")
  assert ids.count(step_id) == 1
  assert tokenizer.decode(ids) == "x = 1<STEP>y = 2"


def test_tokenizer_cache_key_unchanged_without_step_symbols():
  assert "user_symbols" not in trainer_settings(512, 10)
  assert trainer_settings(512, 10, (STEP_PIECE,))["user_symbols"] == [STEP_PIECE]


def test_fixed_steps_every_step_len_tokens():
  annotate = steps.StepAnnotator("fixed", 5, 1)
  np.testing.assert_array_equal(annotate(np.zeros(12, np.int32)),
                                [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2])


def test_semantic_steps_at_sentence_ends_and_paragraphs(tokenizer):
  text = "Hello there. The sky is blue! What now? Yes.\n\nnew paragraph. lower case. End"
  ids = np.asarray(tokenizer.encode(text))
  step_ids = steps.StepAnnotator("semantic", 100, 1, tokenizer)(ids)
  assert step_texts(tokenizer, ids, step_ids) == [
      "Hello there. ", "The sky is blue! ", "What now? ", "Yes.\n\n",
      "new paragraph. lower case. ", "End"]  # '. e'/'. l': no capital, no boundary


def test_semantic_min_and_max_step_lengths(tokenizer):
  text = "A b. C d. E f. G h. " * 6
  ids = np.asarray(tokenizer.encode(text))
  short = steps.StepAnnotator("semantic", 100, 1, tokenizer)(ids)
  long_min = steps.StepAnnotator("semantic", 100, 12, tokenizer)(ids)
  capped = steps.StepAnnotator("semantic", 4, 4, tokenizer)(ids)
  assert short.max() == 23  # 24 sentences
  lengths = np.bincount(long_min)
  assert lengths[:-1].min() >= 12 and long_min.max() < short.max()
  assert np.bincount(capped).max() <= 4
  for step_ids in (short, long_min, capped):
    assert step_ids[0] == 0 and set(np.diff(step_ids)) <= {0, 1}


def test_semantic_boundaries_after_eos_and_step_piece(tokenizer):
  step_id = tokenizer.processor.piece_to_id(STEP_PIECE)
  ids = np.asarray(tokenizer.encode("x = 1") + [step_id] + tokenizer.encode("y = 2")
                   + [tokenizer.eos_id] + tokenizer.encode("z = 3"))
  step_ids = steps.StepAnnotator("semantic", 100, 1, tokenizer)(ids)
  assert step_texts(tokenizer, ids, step_ids) == ["x = 1<STEP>", "y = 2", "z = 3"]


def test_online_step_rule_agrees_with_the_annotator_on_every_token(tokenizer, corpus_texts):
  """cct.StepRule (one token at a time, on device, as in generation) gives exactly the
  annotator's step ids: on the real corpus, on text made of sentence/paragraph marks,
  and on random tokens (byte pieces, EOS, <STEP>)."""
  rng = np.random.default_rng(0)
  marks = "".join(rng.choice(list(". \n\n\n?!Aab"), 4000))
  step_id = tokenizer.processor.piece_to_id(STEP_PIECE)
  random_ids = rng.integers(0, tokenizer.vocab_size, 4000)
  random_ids[rng.random(4000) < 0.02] = step_id
  sequences = [np.concatenate([tokenizer.encode(text) + [tokenizer.eos_id]
                               for text in corpus_texts]),
               np.asarray(tokenizer.encode(marks)), random_ids]
  rule_ids = jax.jit(cct.step_rule_ids)
  for step_len, step_min_len in ((100, 1), (12, 4)):
    annotator = steps.StepAnnotator("semantic", step_len, step_min_len, tokenizer)
    rule = cct.step_rule(annotator)
    for ids in sequences:
      expected = annotator(ids)
      got, _ = rule_ids(rule, cct.step_rule_start(1), jnp.asarray(ids, jnp.int32)[None])
      np.testing.assert_array_equal(np.asarray(got[0]), expected)
      assert expected[-1] > len(ids) // step_len  # boundaries besides the forced ones
  assert len(sequences[0]) > 100000


def test_windows_and_eval_batches_carry_step_ids(tokenizer):
  tokens = np.asarray(tokenizer.encode("One two. Three four. " * 40), np.uint16)
  annotate = steps.StepAnnotator("semantic", 50, 2, tokenizer)
  example = pipeline.TokenWindows(tokens, 32, {"step_ids": annotate})[1]
  assert example["step_ids"].shape == (32,) and example["step_ids"].dtype == np.int32
  np.testing.assert_array_equal(example["step_ids"], annotate(example["inputs"]))
  batches = pipeline.eval_batches(tokens, seq_len=16, batch_size=2, num_batches=2,
                                  process_index=0, process_count=1,
                                  annotators={"step_ids": annotate})
  for batch in batches:
    assert batch["step_ids"].shape == batch["inputs"].shape
    for row, ids in zip(batch["inputs"], batch["step_ids"]):
      np.testing.assert_array_equal(ids, annotate(row))
  assert "step_ids" not in pipeline.TokenWindows(tokens, 32)[1]


def test_step_ids_is_the_batch_field_of_step_boundaries(tokenizer):
  assert steps.step_annotator(Config(), tokenizer) is None
  assert "step_ids" not in pipeline.batch_annotators(Config(), tokenizer)
  semantic = Config(data=DataConfig(step_boundaries="semantic", step_len=50, step_min_len=2))
  annotators = pipeline.batch_annotators(semantic, tokenizer)
  annotate = annotators["step_ids"]
  assert isinstance(annotate, steps.StepAnnotator)
  assert (annotate.mode, annotate.step_len, annotate.step_min_len) == ("semantic", 50, 2)
  fixed = Config(data=DataConfig(step_boundaries="fixed", step_len=5, step_min_len=1))
  np.testing.assert_array_equal(pipeline.batch_annotators(fixed, None)["step_ids"](
      np.zeros(7, np.int32)), [0, 0, 0, 0, 0, 1, 1])


def test_step_config_is_validated():
  with pytest.raises(ConfigError, match="step_boundaries"):
    DataConfig(step_boundaries="sentences")
  with pytest.raises(ConfigError, match="step_min_len"):
    DataConfig(step_len=4, step_min_len=8)
