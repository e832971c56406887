"""The training core: what any program that trains the LM shares.

- ``state``: the train state (step, params, optimizer state, extra trees), its shapes
  and shardings, and its sharded initialisation;
- ``step``: the train and eval step factories, compiled with a memory analysis;
- ``loop``: the ``Trainer``, which runs a compiled step over a batch iterator and calls
  hooks (eval, checkpoint, metrics, profile, stop-on-signal, NaN guard, progress);
- ``objectives``: what the step minimises, given the batch and one ``StepContext``
  (registered in ``registry.OBJECTIVES``; the LM objective here, a mechanism's its own);
- ``optim``: optimizer chains and learning-rate schedules.

``python -m ttt_jax.train`` assembles them for pretraining; another program (a
fine-tuning or test-time training recipe) drives the same loop with its own step and
hooks.
"""
