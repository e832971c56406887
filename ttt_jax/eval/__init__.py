"""Evaluations of trained runs, chosen by ``python -m ttt_jax.evaluate --task NAME``.

- ``lm``: validation loss, perplexity and bits per byte (also what the train loop logs);
- ``sliding``: the same by sliding windows (``eval.stride``), every target scored once;
- ``score_first``: legal score-first test-time training at evaluation (``--task ttt``);
- ``probes``: capability probes (regex / substring checks of greedy completions,
  teacher-forced log-probabilities; ``--task probes``), also what gates score;
- ``tasks``: the ``EvalTask`` interface that every task registers in
  ``registry.EVAL_TASKS`` (mechanisms register their own, e.g. CCT's).
"""
