"""Self-distillation fine-tuning (SDFT): continual learning from demonstrations.

The student, the model being trained, samples a continuation of a prompt; a teacher,
the exponential moving average of the student reading the prompt together with a
demonstration, scores every token of it; the student minimises a per-token divergence
from the teacher (reverse KL by default) along its own continuation. ``objective``
holds the divergence math and the step's objective (registered as
``train.objective='sdft'``), ``teacher`` the EMA teacher in the train state, ``data``
the demonstrations, their tokenization and the replay-mixed stream, and ``__main__``
the command line ``python -m ttt_jax.sdft``.
"""
