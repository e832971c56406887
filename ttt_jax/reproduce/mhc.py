"""Study ``mhc``: manifold-constrained hyper-connections vs a plain residual.

Claim (mHC paper): with n = 4 residual streams mixed by doubly stochastic (Sinkhorn)
matrices, a language model reaches a lower loss than with the plain residual at the
same tokens. Arms: ``configs/mhc_tiny.yaml`` (4 layers, d128, attention + SwiGLU, n = 4
streams) and the same config with ``model.residual=plain``; the tiny budget of every tiny
config (300 steps of 16 x 128 tokens, 30 warmup steps, 8 eval batches of 16 x 128).
Reported: the final eval loss and bits per byte of each arm (mean ± SE over seeds) and
the paired difference mHC - plain (negative: mHC is better).
"""

from __future__ import annotations

from typing import Any

from ttt_jax.reproduce import stats
from ttt_jax.reproduce.runner import Arm, Study, values

PLAIN = Arm("plain", "mhc_tiny.yaml", ("model.residual=plain", "model.remat=none"))
MHC = Arm("mhc", "mhc_tiny.yaml")
MEASURES = (("eval_loss", "final eval loss"), ("eval_bpb", "final eval bits per byte"))


def report(results: dict[str, Any]) -> str:
  """Per-arm means ± SE, then the paired difference mHC - plain."""
  arms = list(results["arms"])
  rows = [[arm, str(values(results, arm, "n_params")[0])]
          + [stats.format_mean_se(stats.mean_se(values(results, arm, key)))
             for key, _ in MEASURES] for arm in arms]
  lines = [f"### mhc: {len(results['seeds'])} seeds, {results['schedule']['steps']} steps",
           "", stats.markdown_table(["arm", "params"] + [label for _, label in MEASURES],
                                    rows), "",
           stats.markdown_table(
               ["paired difference", *(label for _, label in MEASURES)],
               [["mhc - plain"] + [stats.format_mean_se(stats.paired_difference(
                   values(results, PLAIN.name, key), values(results, MHC.name, key)),
                   signed=True) for key, _ in MEASURES]]), ""]
  return "\n".join(lines)


STUDY = Study(
    name="mhc", summary="mHC (n = 4 streams) vs plain residual at equal tokens: final "
                        "eval loss and the paired difference",
    arms=(PLAIN, MHC), steps=300, warmup_steps=30, eval_batches=8, report=report)
