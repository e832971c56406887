"""Study figures beyond the loss curves (``runner.plot_curves``), headless like
``compare``'s (matplotlib's Agg canvas via ``compare.new_figure``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ttt_jax import compare
from ttt_jax.reproduce import stats
from ttt_jax.reproduce.runner import arm_colors, values


def position_curves(results: dict[str, Any], path: Path, title: str) -> None:
  """Each arm's loss by position bucket (mean over seeds, ± SE bars) against the
  bucket's middle position, on a log axis: one PNG at ``path``."""
  figure = compare.new_figure(1, "reproduce")
  axes = figure.subplots()
  colors = arm_colors(list(results["arms"]))
  for arm in results["arms"]:
    buckets = results["runs"][arm][str(results["seeds"][0])]["buckets"]
    per_seed = values(results, arm, "position_loss")
    summaries = [stats.mean_se([v[i] for v in per_seed]) for i in range(len(buckets))]
    middles = [(start + end - 1) / 2 for start, end in buckets]
    axes.errorbar(middles, [s.mean for s in summaries],
                  yerr=[s.se or 0.0 for s in summaries], marker="o", markersize=3,
                  capsize=2, color=colors[arm], label=arm)
  axes.set_xscale("log", base=2)
  axes.set_xlabel("token position in the window (bucket middle)")
  axes.set_ylabel("eval loss")
  axes.grid(alpha=0.3)
  axes.legend(fontsize="small")
  figure.suptitle(title)
  compare.save_figure(figure, path, "reproduce")
