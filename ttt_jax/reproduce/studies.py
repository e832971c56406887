"""The named studies of ``python -m ttt_jax.reproduce`` (one module each)."""

from __future__ import annotations

from ttt_jax.reproduce import cct, mhc, ttt_context
from ttt_jax.reproduce.runner import Study

STUDIES: dict[str, Study] = {study.name: study for study in (mhc.STUDY, ttt_context.STUDY,
                                                          cct.STUDY)}
