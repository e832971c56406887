"""Low-rank adapters (LoRA) in parameter space, trained on a frozen base.

The mixers read raw weights inside their einsums, so nothing wraps a layer: the model
is merged from ``W + (alpha / r) * A @ B`` for every targeted weight W, formed in
float32 and cast to W's dtype just before ``nnx.merge`` (``adapters.merge``), and the
base stays frozen. ``adapters`` holds the pure functions (targets, layout, init,
merge, counts); ``files`` saves and loads an adapter next to its metadata and folds it
into an ordinary run directory; ``python -m ttt_jax.lora`` is the command line.
"""

from ttt_jax.lora.adapters import (BASE, Target, delta, find_targets, init, logical_axes,
                                   merge, optimizer_config, summary_line, trainable_count)

__all__ = ["BASE", "Target", "delta", "find_targets", "init", "logical_axes", "merge",
           "optimizer_config", "summary_line", "trainable_count"]
