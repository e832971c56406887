"""Commitment-Constrained Training, registered like any other mechanism.

- ``mixer``: the CCT mixer (``model.mixer: cct``), its config, the curriculum, the
  commitment segments and the on-device step rule used in generation;
- ``steps``: the step annotator that adds ``step_ids`` to every batch
  (``data.step_boundaries``);
- ``objective``: the CCT training objective (``train.objective: cct``);
- ``evals``: ``evaluate --task sufficiency | compression | passkey | perplexity |
  governance | all``;
- ``chain``: the commitment hash chain of a generation, and its verification;
- ``decode``: the step ids of generated tokens (``registry.DECODE_INPUTS``);
- ``bench``: ``bench cct``.
"""
