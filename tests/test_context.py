"""The sequence context (models/context.py): default positions, the context of a batch
(its extra per-token fields become side inputs), side inputs and options."""

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.models.context import SequenceContext, default_positions


def test_default_positions_count_from_the_offset_in_every_row():
  tokens = jnp.zeros((3, 5), jnp.int32)
  positions = default_positions(tokens)
  assert positions.shape == (3, 5) and positions.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(positions), np.tile(np.arange(5), (3, 1)))
  np.testing.assert_array_equal(np.asarray(default_positions(tokens[:, :2], 7)),
                                np.tile([7, 8], (3, 1)))
  traced = jax.jit(default_positions)(tokens[:, :1], jnp.int32(4))
  np.testing.assert_array_equal(np.asarray(traced), np.full((3, 1), 4))


def test_for_tokens_defaults_to_one_document_without_side_inputs():
  tokens = jnp.ones((2, 4), jnp.int32)
  ctx = SequenceContext.for_tokens(tokens)
  np.testing.assert_array_equal(np.asarray(ctx.positions_BxT), np.tile(np.arange(4), (2, 1)))
  assert ctx.segment_ids_BxT is None
  assert dict(ctx.side) == {} and ctx.options == ()
  assert ctx.side_input("step_ids") is None
  positions = jnp.full((2, 4), 9, jnp.int32)
  given = SequenceContext.for_tokens(tokens, positions_BxT=positions,
                                     options=(("mode", "zero"),))
  assert given.positions_BxT is positions
  assert given.option("mode") == "zero"
  assert given.option("other", "default") == "default"


def test_from_batch_puts_extra_fields_in_side_and_excludes_inputs_targets_segments():
  inputs = jnp.arange(8, dtype=jnp.int32).reshape(2, 4)
  batch = {"inputs": inputs, "targets": inputs + 1,
           "segment_ids": jnp.array([[0, 0, 1, 1], [0, 1, 1, 1]], jnp.int32),
           "step_ids": jnp.array([[0, 1, 1, 2], [0, 0, 0, 1]], jnp.int32),
           "hash_ids": jnp.full((2, 4), 3, jnp.int32)}
  ctx = SequenceContext.from_batch(batch, options=(("ablation", True),))
  assert set(ctx.side) == {"step_ids", "hash_ids"}
  assert ctx.side_input("step_ids") is batch["step_ids"]
  assert ctx.side_input("hash_ids") is batch["hash_ids"]
  assert ctx.segment_ids_BxT is batch["segment_ids"]
  np.testing.assert_array_equal(np.asarray(ctx.positions_BxT), np.tile(np.arange(4), (2, 1)))
  assert ctx.option("ablation") is True
  plain = SequenceContext.from_batch({"inputs": inputs, "targets": inputs})
  assert plain.segment_ids_BxT is None and dict(plain.side) == {}


def test_replace_side_sets_and_removes_without_touching_the_original():
  tokens = jnp.zeros((1, 3), jnp.int32)
  step_ids, hash_ids = jnp.array([[0, 0, 1]]), jnp.array([[5, 6, 7]])
  ctx = SequenceContext.for_tokens(tokens, side={"step_ids": step_ids})
  added = ctx.replace_side(hash_ids=hash_ids)
  assert set(added.side) == {"step_ids", "hash_ids"} and added.side["hash_ids"] is hash_ids
  assert set(ctx.side) == {"step_ids"}
  replaced = added.replace_side(step_ids=hash_ids, hash_ids=None)
  assert set(replaced.side) == {"step_ids"} and replaced.side["step_ids"] is hash_ids
  assert replaced.positions_BxT is ctx.positions_BxT


def test_context_is_a_pytree_whose_options_are_static():
  tokens = jnp.zeros((1, 3), jnp.int32)
  ctx = SequenceContext.for_tokens(tokens, segment_ids_BxT=jnp.zeros((1, 3), jnp.int32),
                                   side={"step_ids": jnp.ones((1, 3), jnp.int32)},
                                   options=(("mode", "zero"),))
  assert len(jax.tree.leaves(ctx)) == 3  # positions, segment ids, one side input

  @jax.jit
  def read(ctx):
    assert ctx.option("mode") == "zero"  # static: visible at trace time
    return ctx.positions_BxT + ctx.side_input("step_ids")

  np.testing.assert_array_equal(np.asarray(read(ctx)), [[1, 2, 3]])
