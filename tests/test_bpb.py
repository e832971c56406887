"""Tests of ttt_jax/data/bpb.py: byte counts of decoded tokens and bits per byte."""

import math

import numpy as np
import pytest

from data_util import prepare_sample
from ttt_jax.data import bpb


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
  """A small real-source corpus, prepared once: (config, corpus, texts, log)."""
  return prepare_sample(tmp_path_factory.mktemp("sample"))


def test_bits_per_byte_on_known_numbers(sample):
  tokenizer = sample[1].tokenizer
  text = "héllo wörld\n"
  assert bpb.count_bytes(np.asarray(tokenizer.encode(text)), tokenizer.piece_bytes) == 14
  assert bpb.count_bytes(np.asarray([[tokenizer.eos_id, tokenizer.pad_id]]),
                         tokenizer.piece_bytes) == 0
  assert bpb.bits_per_byte(100 * math.log(2), 100) == pytest.approx(1.0)
  assert bpb.bits_per_byte(8.0, 4) == pytest.approx(2.0 / math.log(2))
  assert math.isnan(bpb.bits_per_byte(1.0, 0))
