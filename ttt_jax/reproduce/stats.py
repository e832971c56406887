"""Summary statistics over seeds, and the markdown tables a study writes.

For per-seed values x_1..x_n of one arm:

  mean = (1/n) sum_i x_i,   SE = s / sqrt(n),   s^2 = (1/(n-1)) sum_i (x_i - mean)^2

(no SE from a single seed). Two arms trained on the same seeds (same init seed and data
order) are compared by the paired difference d_i = b_i - a_i, whose mean and SE are
those of the d_i: the seed-to-seed variation both arms share cancels out of it.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence


class MeanSE(NamedTuple):
  mean: float
  se: float | None
  """None with fewer than two values."""
  n: int


def mean_se(values: Sequence[float]) -> MeanSE:
  """Mean and standard error of ``values`` (at least one)."""
  if not values:
    raise ValueError("mean_se: no values")
  n = len(values)
  mean = math.fsum(values) / n
  if n < 2:
    return MeanSE(mean, None, n)
  variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
  return MeanSE(mean, math.sqrt(variance / n), n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> MeanSE:
  """``mean_se`` of b_i - a_i over seeds (same length, seed i in both)."""
  if len(a) != len(b):
    raise ValueError(f"paired_difference: {len(a)} vs {len(b)} values")
  return mean_se([y - x for x, y in zip(a, b)])


def format_mean_se(value: MeanSE, digits: int = 4, signed: bool = False) -> str:
  """'4.3210 ± 0.0123' ('+' on positive means with ``signed``; no SE: the mean alone)."""
  mean = f"{value.mean:+.{digits}f}" if signed else f"{value.mean:.{digits}f}"
  return mean if value.se is None else f"{mean} ± {value.se:.{digits}f}"


def overlaps(a: MeanSE, b: MeanSE) -> bool:
  """Whether the intervals mean ± SE of ``a`` and ``b`` overlap (True without SEs)."""
  if a.se is None or b.se is None:
    return True
  return abs(a.mean - b.mean) <= a.se + b.se


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub markdown table (cells as given; '|' escaped)."""
  def line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
  return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])
