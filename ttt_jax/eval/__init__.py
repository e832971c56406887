"""Evaluations of trained runs, chosen by ``python -m ttt_jax.evaluate --task NAME``.

- ``lm``: validation loss, perplexity and bits per byte (also what the train loop logs);
- ``tasks``: the ``EvalTask`` interface that every task registers in
  ``registry.EVAL_TASKS`` (mechanisms register their own, e.g. CCT's).
"""
