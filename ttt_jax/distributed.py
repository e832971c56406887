"""Multi-process start-up through JAX's own distributed runtime.

``launch/*.sh`` export ``TTT_JAX_COORDINATOR`` (host:port), ``TTT_JAX_NUM_PROCESSES``
and ``TTT_JAX_PROCESS_ID``; under SLURM with more than one task, JAX's cluster
detection reads the SLURM variables itself. On CPU, collectives go through gloo.
"""

from __future__ import annotations

import os

import jax

from ttt_jax.config import ConfigError

_VARS = ("TTT_JAX_COORDINATOR", "TTT_JAX_NUM_PROCESSES", "TTT_JAX_PROCESS_ID")


def initialize_from_env() -> bool:
  """Joins the process group described by the environment; False for a single process."""
  present = [v for v in _VARS if os.environ.get(v)]
  if present:
    missing = [v for v in _VARS if not os.environ.get(v)]
    if missing:
      raise ConfigError(f"distributed launch: {', '.join(missing)} not set "
                        f"(have {', '.join(present)})")
    try:
      num_processes = int(os.environ["TTT_JAX_NUM_PROCESSES"])
      process_id = int(os.environ["TTT_JAX_PROCESS_ID"])
    except ValueError:
      raise ConfigError("distributed launch: TTT_JAX_NUM_PROCESSES and TTT_JAX_PROCESS_ID "
                        "must be integers") from None
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"distributed launch: TTT_JAX_PROCESS_ID={process_id} is not in "
                        f"[0, {num_processes})")
    jax.distributed.initialize(coordinator_address=os.environ["TTT_JAX_COORDINATOR"],
                               num_processes=num_processes, process_id=process_id)
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SLURM_JOB_ID"):
    jax.distributed.initialize()
    return True
  return False
