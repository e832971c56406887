"""CCT evaluations (cct/evals.py): passkey prompts, the sufficiency probe, memory
measurement and the tier verdict."""

from __future__ import annotations

import glob

import numpy as np
import pytest

from ttt_jax.cct import evals as cct_eval
from ttt_jax.cct.mixer import CCTConfig
from ttt_jax.config import ModelConfig
from ttt_jax.models.ffn.swiglu import SwiGLUConfig
from ttt_jax.data.tokenizer import train_tokenizer
from train_util import copy_stdlib_corpus


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  corpus = copy_stdlib_corpus(tmp_path_factory.mktemp("corpus") / "src")
  return train_tokenizer([open(p).read() for p in sorted(glob.glob(corpus))], 512, 100000)


@pytest.mark.parametrize("length", [200, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_puts_the_key_at_the_requested_depth_and_length(tokenizer, length, depth):
  key = 48213
  ids, key_index = cct_eval.passkey_prompt(tokenizer, length, depth, key)
  text = tokenizer.decode(ids)
  longest_sentence = max(len(tokenizer.encode(s + ". "))
                         for s in cct_eval.PASSKEY_FILLER.split(". "))
  assert length - longest_sentence <= len(ids) <= length
  assert text.endswith(cct_eval.PASSKEY_QUESTION)
  assert tokenizer.decode(ids[key_index:]).startswith(
      f"The pass key is {key}. Remember it. {key} is the pass key. ")
  filler_tokens = len(ids) - len(tokenizer.encode(
      f"The pass key is {key}. Remember it. {key} is the pass key. ")) - len(
          tokenizer.encode(cct_eval.PASSKEY_QUESTION))
  assert abs(key_index / filler_tokens - depth) <= longest_sentence / filler_tokens
  assert text.count("The grass is green.") >= 1 and text.count(str(key)) == 2


def test_probe_r2_is_high_for_a_linear_map_and_low_for_noise():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(600, 8))
  w = rng.normal(size=(8, 20))
  clean = cct_eval.fit_linear_probe(x, x @ w + 0.01 * rng.normal(size=(600, 20)))
  assert clean["r2_test"] > 0.99
  noise = cct_eval.fit_linear_probe(x, rng.normal(size=(600, 20)))
  assert noise["r2_test"] < 0.05
  assert clean["n_fit"] == 420 and clean["n_test"] == 90


@pytest.mark.slow
def test_measured_state_bytes_cct_bounded_baseline_linear():
  cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, ffn=SwiGLUConfig(d_ff=32),
                    mixer=CCTConfig(step_len=8, d_summary=4))
  report = cct_eval.compression_report(cfg, 64, [64, 256], log=lambda _: None)
  small, large = report["contexts"][64], report["contexts"][256]
  # KV cache: 2 layers x (K and V: L x 4 heads x 8 x 4 bytes + positions L x 4 bytes
  # + the int32 fill counter)
  for context, row in ((64, small), (256, large)):
    assert row["baseline_bytes"] == 2 * (2 * context * 32 * 4 + context * 4 + 4)
  # CCT: only the summary buffer grows, by d_summary floats per layer per step
  assert large["cct_bytes"] - small["cct_bytes"] == 2 * (256 // 8 - 64 // 8) * 4 * 4
  assert large["ratio"] > small["ratio"] > 1
  assert large["cct_decoded_tokens"] == 256
  # semantic steps: the summary buffer holds the text's steps (here 3 to 5 tokens each,
  # shorter than model.mixer.step_len), so it is larger than with fixed steps; chunks end at step
  # starts
  lengths = np.resize([3, 5, 4], 64)
  step_ids = np.repeat(np.arange(64), lengths)[:64]
  semantic = cct_eval.compression_report(cfg, 64, [64], log=lambda _: None,
                                         step_ids_of=lambda context: step_ids[:context])
  row = semantic["contexts"][64]
  # a slot per step of the context plus one, for both
  assert row["cct_summary_slots"] == step_ids[-1] + 2 and small["cct_summary_slots"] == 9
  assert row["cct_bytes"] - small["cct_bytes"] == 2 * (row["cct_summary_slots"] - 9) * 4 * 4
  assert row["baseline_bytes"] == small["baseline_bytes"]
  assert semantic["model"]["steps"].startswith("semantic")
  chunked = cct_eval.decode_state_bytes(cfg, 64, 64, chunk=16, step_ids_T=step_ids)
  assert chunked["bytes"] == row["cct_bytes"] and chunked["decoded_tokens"] == 64


def test_tier_verdict_reports_each_criterion():
  lines, verdict = cct_eval.tier_verdict(
      {"sufficiency_probe_r2": 0.9, "perplexity_delta_pct": 25.0, "compression_ratio_4k": None},
      {"sufficiency_probe_r2": (">", 0.85), "perplexity_delta_pct": ("<", 10.0),
       "compression_ratio_4k": (">", 50.0)})
  assert lines["sufficiency_probe_r2"].startswith("PASS")
  assert lines["perplexity_delta_pct"].startswith("FAIL")
  assert lines["compression_ratio_4k"].startswith("NOT MEASURED")
  assert verdict == "FAIL"
