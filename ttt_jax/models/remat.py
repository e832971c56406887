"""Rematerialisation of a block: named ``jax.checkpoint`` policies (``model.remat``).

The core policies are registered here; a mechanism registers a policy that saves its
own named intermediates where it defines them (attention: 'save_qkv_proj'; mHC:
'mhc_streams').

    none            no checkpointing: the backward reads every saved activation
    full            save nothing but the block's inputs; recompute the whole block
    dots            save every matmul output
    dots_no_batch   save the matmul outputs without batch dimensions (weight matmuls)
"""

from __future__ import annotations

from typing import Callable

import jax

from ttt_jax import registry

registry.REMAT_POLICIES.register("none", None)
registry.REMAT_POLICIES.register("full", None)
registry.REMAT_POLICIES.register("dots", jax.checkpoint_policies.dots_saveable)
registry.REMAT_POLICIES.register("dots_no_batch",
                                 jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def remat(fn: Callable, policy_name: str, *, prevent_cse: bool = True) -> Callable:
  """``fn`` wrapped in ``jax.checkpoint`` with the named policy ('none': unchanged)."""
  if policy_name == "none":
    return fn
  return jax.checkpoint(fn, policy=registry.REMAT_POLICIES.get(policy_name),
                        prevent_cse=prevent_cse)
