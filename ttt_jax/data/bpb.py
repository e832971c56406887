"""Bits per byte: a tokenizer-independent measure of next-token loss.

  bpb = sum_t NLL_t / (ln 2 * bytes),   bytes = sum_t piece_bytes[target_t]

where ``piece_bytes[i]`` is the number of UTF-8 bytes piece ``i`` adds to decoded text
(``tokenizer.Tokenizer.piece_bytes``), so the denominator is the byte length of the
text the predicted tokens decode to.
"""

from __future__ import annotations

import math

import numpy as np


def count_bytes(targets: np.ndarray, piece_bytes: np.ndarray) -> int:
  """UTF-8 bytes of the decoded ``targets`` (the bits-per-byte denominator)."""
  return int(np.asarray(piece_bytes, np.int64)[np.asarray(targets)].sum())


def bits_per_byte(total_nll_nats: float, total_bytes: int) -> float:
  """Summed next-token NLL (nats) over the bytes those tokens decode to; NaN without bytes."""
  if total_bytes <= 0:
    return math.nan
  return total_nll_nats / (math.log(2) * total_bytes)
