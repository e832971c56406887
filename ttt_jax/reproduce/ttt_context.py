"""Study ``ttt_context``: TTT-Linear vs attention as the context grows.

Claim (TTT paper, Sun et al. 2024): TTT-Linear keeps lowering its loss as it conditions
on more tokens (its hidden state is a model trained on the context), where Mamba's
plateaus. There is no Mamba mixer here, so the arms are TTT-Linear with both of its
backbones (``model.mixer.backbone``: ``mamba``, its conv + gate design, and
``transformer``) against causal attention, which keeps every token of its context.
Every arm is ``configs/ttt_linear_tiny.yaml`` (2 layers, d128, 4 heads, SwiGLU 384: the
three mixers come within 3% of each other's parameter count, reported) with the mixer
swapped, trained at two context lengths with the same tokens per step: 128 (batch 16)
and 512 (batch 4), for 150 steps of 2048 tokens (20 warmup) and evaluated on 8 batches
of 2048 validation tokens. ``data.document_mask`` is off, so a target's position in its
window is the number of tokens it sees.

Reported per arm: the final eval loss (mean ± SE over seeds) and the loss by position
(``eval.positions``, on the checkpoint, bucketed [0, 8), [8, 16), ... [256, 512)); then
for each mixer the late-context gain of the 512-token runs, loss over positions
[64, 128) minus loss over [256, 512) (positive: still improving with context), and its
paired difference against attention's, and the change in eval loss from 128 to 512.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from ttt_jax.eval import lm as eval_lm
from ttt_jax.eval import positions
from ttt_jax.reproduce import plots, stats
from ttt_jax.reproduce.runner import Arm, Study, values

CONFIG = "ttt_linear_tiny.yaml"
MIXERS = (("attention", ("model.mixer=attention",)),
          ("ttt_mamba", ("model.mixer.backbone=mamba",)),
          ("ttt_transformer", ("model.mixer.backbone=transformer",)))
CONTEXTS = ((128, 16), (512, 4))
"""(data.seq_len, train and eval batch size): 2048 tokens per batch at both lengths."""
NEAR, FAR = (64, 128), (256, 512)
"""Position ranges whose loss difference is the late-context gain (512-token runs)."""


def arm_name(mixer: str, seq_len: int) -> str:
  return f"{mixer}-{seq_len}"


ARMS = tuple(
    Arm(arm_name(mixer, seq_len), CONFIG,
        (*overrides, "data.document_mask=false", f"data.seq_len={seq_len}",
         f"train.batch_size={batch}", f"eval.batch_size={batch}"))
    for seq_len, batch in CONTEXTS for mixer, overrides in MIXERS)


def measure(workdir: Path) -> dict[str, Any]:
  """The loss by position of the run's newest checkpoint on its eval batches."""
  loaded = eval_lm.load_weights(workdir, [])
  batches, _ = eval_lm.validation_batches(loaded.cfg, loaded.corpus, loaded.mesh)
  step_fn = jax.jit(positions.make_position_eval_step(loaded.graphdef))
  losses = positions.evaluate_positions(step_fn, loaded.params, batches)
  buckets = positions.log_buckets(loaded.cfg.data.seq_len)
  return {"buckets": [list(b) for b in buckets],
          "position_loss": positions.bucket_losses(losses, buckets),
          "position_mean": losses.mean()}


def bucket_values(results: dict[str, Any], arm: str, bucket: tuple[int, int]) -> list[float]:
  """The loss over one position range of ``arm``, per seed."""
  index = results["runs"][arm][str(results["seeds"][0])]["buckets"].index(list(bucket))
  return [v[index] for v in values(results, arm, "position_loss")]


def late_gain(results: dict[str, Any], mixer: str) -> list[float]:
  """Per seed: loss over positions NEAR minus over FAR, 512-token runs."""
  arm = arm_name(mixer, CONTEXTS[-1][0])
  return [n - f for n, f in zip(bucket_values(results, arm, NEAR),
                                bucket_values(results, arm, FAR))]


def report(results: dict[str, Any]) -> str:
  fmt = stats.format_mean_se
  arms = list(results["arms"])
  first = results["runs"][arms[-1]][str(results["seeds"][0])]["buckets"]
  header = ["arm", "params", "eval loss"] + [f"pos {s}-{e - 1}" for s, e in first]
  rows = []
  for arm in arms:
    width = len(values(results, arm, "position_loss")[0])
    rows.append([arm, str(values(results, arm, "n_params")[0]),
                 fmt(stats.mean_se(values(results, arm, "eval_loss")))]
                + [fmt(stats.mean_se([v[i] for v in values(results, arm, "position_loss")]))
                   for i in range(width)] + ["-"] * (len(first) - width))
  short, long = (seq_len for seq_len, _ in CONTEXTS)
  attention = late_gain(results, MIXERS[0][0])
  gains = []
  for mixer, _ in MIXERS:
    gain = late_gain(results, mixer)
    versus = ("-" if mixer == MIXERS[0][0] else
              fmt(stats.paired_difference(attention, gain), signed=True))
    change = stats.paired_difference(values(results, arm_name(mixer, short), "eval_loss"),
                                     values(results, arm_name(mixer, long), "eval_loss"))
    gains.append([mixer, fmt(stats.mean_se(gain), signed=True), versus,
                  fmt(change, signed=True)])
  return "\n".join([
      f"### ttt_context: {len(results['seeds'])} seeds, {results['schedule']['steps']} "
      "steps of 2048 tokens", "",
      "Eval loss and loss by token position (mean ± SE over seeds):", "",
      stats.markdown_table(header, rows), "",
      f"Late-context gain at {long} tokens: loss over positions {NEAR[0]}-{NEAR[1] - 1} "
      f"minus over {FAR[0]}-{FAR[1] - 1} (positive: still improving), its paired "
      f"difference against attention, and eval loss at {long} minus at {short}:", "",
      stats.markdown_table(["mixer", "late-context gain", "gain - attention's",
                            f"eval loss {long} - {short}"], gains), ""])


def figures(results: dict[str, Any], out: Path) -> list[Path]:
  path = out / "positions.png"
  plots.position_curves(results, path, f"ttt_context: loss by position, "
                        f"{len(results['seeds'])} seed(s)")
  return [path]


STUDY = Study(
    name="ttt_context", summary="TTT-Linear (mamba and transformer backbones) vs attention "
                                "at 128 and 512 tokens: eval loss and loss by position",
    arms=ARMS, steps=150, warmup_steps=20, eval_batches=8, report=report, measure=measure,
    figures=figures)
