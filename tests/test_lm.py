"""The decoder LM: registries, logical names, causality, KV-cache decode, scan/remat
equivalence, dtypes, FLOP and parameter counts, depth-independent compile size."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax import config as config_lib
from ttt_jax.config import ModelConfig
from ttt_jax.data import pipeline
from ttt_jax.models import layers, lm

VOCAB = 64


def tiny_config(**overrides) -> ModelConfig:
  values = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, init_std=0.1)
  values.update(overrides)
  return ModelConfig(**values)


def random_tokens(seed: int, batch: int, length: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length)),
                     jnp.int32)


@pytest.fixture(scope="module")
def model() -> lm.LM:
  return lm.LM(tiny_config(), VOCAB, rngs=nnx.Rngs(0))


def count_leaves(tree) -> int:
  return len(jax.tree.leaves(tree))


def logits_fn(cfg: ModelConfig):
  """A jitted (state, tokens) -> logits for models of this config."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: lm.LM(cfg, VOCAB, rngs=nnx.Rngs(0))))
  return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))


# ----------------------------------------------------------------------------- structure


def test_registries_match_config_choices():
  assert set(lm.MIXERS) == set(config_lib.MIXERS)
  assert set(lm.RESIDUALS) == set(config_lib.RESIDUALS)
  assert set(lm.REMAT_POLICIES) == set(config_lib.REMAT_POLICIES)


def test_every_param_has_valid_logical_names(model):
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  flat_params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  flat_specs = dict(nnx.to_flat_state(specs))
  assert len(flat_params) > 0
  for path, variable in flat_params:
    names = variable.get_metadata("out_sharding")
    assert names is not None, path
    assert len(names) == variable[...].ndim, (path, names)
    assert set(names) <= set(layers.LOGICAL_AXES), (path, names)
    stacked = path[0] == "blocks"
    assert (names[0] == "layers") == stacked, (path, names)
    assert names.count("layers") == (1 if stacked else 0), (path, names)
    assert tuple(flat_specs[path].get_value()) == names
  names_by_path = {"/".join(map(str, p)): v.get_metadata("out_sharding") for p, v in flat_params}
  assert names_by_path["blocks/mixer/wq"] == ("layers", "embed", "heads")
  assert names_by_path["blocks/mixer/wk"] == ("layers", "embed", "kv_heads")
  assert names_by_path["blocks/mixer/wo"] == ("layers", "heads", "embed")
  assert names_by_path["blocks/mlp/w_down"] == ("layers", "mlp", "embed")
  assert names_by_path["blocks/mixer_residual/norm/scale"] == ("layers", "norm")
  assert names_by_path["embed/embedding"] == ("vocab", "embed")
  assert names_by_path["head"] == ("embed", "vocab")
  assert names_by_path["final_norm/scale"] == ("norm",)


def test_state_holds_only_params(model):
  assert count_leaves(nnx.state(model)) == count_leaves(nnx.state(model, nnx.Param))


def test_init_is_deterministic_given_seed():
  cfg = tiny_config()
  a = nnx.state(lm.LM(cfg, VOCAB, rngs=nnx.Rngs(3)))
  b = nnx.state(lm.LM(cfg, VOCAB, rngs=nnx.Rngs(3)))
  c = nnx.state(lm.LM(cfg, VOCAB, rngs=nnx.Rngs(4)))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  wq = np.asarray(a["blocks"]["mixer"]["wq"][...])
  assert not np.array_equal(wq, np.asarray(c["blocks"]["mixer"]["wq"][...]))
  assert not np.array_equal(wq[0], wq[1])  # the layers get different weights


def test_abstract_init_and_param_count_formula():
  cfg = tiny_config(n_layers=3, d_model=48, n_heads=6, n_kv_heads=3, head_dim=4, d_ff=80)
  abstract = nnx.state(nnx.eval_shape(lambda: lm.LM(cfg, VOCAB, rngs=nnx.Rngs(0))))
  d, h, g, k, f, layers_n = 48, 6, 3, 4, 80, 3
  per_layer = d * h * k + 2 * d * g * k + h * k * d + 3 * d * f + 2 * d
  expected = VOCAB * d + layers_n * per_layer + d + d * VOCAB
  assert lm.count_params(abstract) == expected
  tied = dataclasses.replace(cfg, tie_embeddings=True)
  assert lm.count_params(lm.LM(tied, VOCAB, rngs=nnx.Rngs(0))) == expected - d * VOCAB


def test_forward_flops_hand_count():
  cfg = tiny_config(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64)
  seq_len, d, h, g, k, f = 16, 32, 4, 2, 8, 64
  attention_proj = 2 * (d * h * k + 2 * d * g * k + h * k * d)  # 2*(1024+1024+1024)
  attention_core = 2 * 2 * h * k * seq_len / 2  # QK^T and AV over T/2 keys on average
  mlp = 2 * 3 * d * f
  head = 2 * d * VOCAB
  expected = 2 * (attention_proj + attention_core + mlp) + head
  assert expected == 2 * (6144 + 1024 + 12288) + 4096
  assert lm.forward_flops_per_token(cfg, VOCAB, seq_len) == expected
  tied = dataclasses.replace(cfg, tie_embeddings=True)
  assert lm.forward_flops_per_token(tied, VOCAB, seq_len) == expected  # head matmul remains


# ----------------------------------------------------------------------------- forward


@pytest.mark.slow
def test_logits_shape_dtype_and_causality(model):
  tokens = random_tokens(0, 2, 12)
  logits = model(tokens)
  assert logits.shape == (2, 12, VOCAB) and logits.dtype == jnp.float32
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % VOCAB)
  changed_logits = model(changed)
  np.testing.assert_array_equal(np.asarray(logits[:, :7]), np.asarray(changed_logits[:, :7]))
  assert not np.allclose(np.asarray(logits[:, 7:]), np.asarray(changed_logits[:, 7:]))


@pytest.mark.slow
def test_segment_ids_isolate_packed_documents(model):
  first, second = random_tokens(1, 1, 5), random_tokens(2, 1, 7)
  packed = jnp.concatenate([first, second], axis=1)
  segment_ids = jnp.array([[0] * 5 + [1] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  packed_logits = model(packed, positions, segment_ids)
  np.testing.assert_allclose(np.asarray(packed_logits[:, 5:]), np.asarray(model(second)),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_pipeline_segment_ids_make_a_packed_window_equal_its_documents_alone(model):
  """[docA, EOS, docB] with ``pipeline.document_segment_ids`` and the default window
  positions (what training feeds): docA+EOS and docB (positions 7.., RoPE is relative)
  give exactly their standalone logits; without segment ids docB's differ."""
  eos, first, length = 0, 7, 37  # docA: 6 tokens + EOS; docB: 30 tokens
  rng = np.random.default_rng(11)
  doc_a, doc_b = rng.integers(1, VOCAB, size=first - 1), rng.integers(1, VOCAB, size=length - first)
  rows = np.stack([np.concatenate([doc_a, [eos], doc_b]),
                   np.concatenate([doc_b, doc_a, [eos]])])  # docB alone, then anything
  segment_ids = pipeline.document_segment_ids(rows, eos)
  assert segment_ids[0].tolist() == [0] * first + [1] * (length - first)
  forward = jax.jit(lambda t, s: model(t, segment_ids_BxT=s))
  packed = np.asarray(forward(jnp.asarray(rows), jnp.asarray(segment_ids)))
  plain = np.asarray(forward(jnp.asarray(rows), None))
  np.testing.assert_allclose(packed[0, :first], plain[0, :first], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, first:], plain[1, :length - first], rtol=1e-5, atol=1e-5)
  assert not np.allclose(plain[0, first:], plain[1, :length - first], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_scan_and_unrolled_give_identical_logits():
  cfg = tiny_config(n_layers=3)
  state = nnx.state(lm.LM(cfg, VOCAB, rngs=nnx.Rngs(1)))
  tokens = random_tokens(3, 2, 10)
  scanned = logits_fn(cfg)(state, tokens)
  unrolled = logits_fn(dataclasses.replace(cfg, scan_layers=False))(state, tokens)
  np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_tied_embeddings_use_embedding_as_head():
  cfg = tiny_config(tie_embeddings=True)
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(2))
  assert model.head is None
  assert "head" not in nnx.state(model)
  tokens = random_tokens(4, 2, 6)
  features = np.asarray(model.features(tokens), np.float64)
  expected = features @ np.asarray(model.embed.embedding[...], np.float64).T
  np.testing.assert_allclose(np.asarray(model(tokens)), expected, rtol=1e-4, atol=1e-5)
  assert "head" in nnx.state(lm.LM(tiny_config(), VOCAB, rngs=nnx.Rngs(2)))


@pytest.mark.slow
def test_bf16_compute_is_finite_and_close_to_fp32():
  cfg = tiny_config()
  state = nnx.state(lm.LM(cfg, VOCAB, rngs=nnx.Rngs(5)))
  tokens = random_tokens(5, 2, 16)
  fp32 = logits_fn(cfg)(state, tokens)
  bf16 = logits_fn(dataclasses.replace(cfg, dtype="bfloat16"))(state, tokens)
  assert bf16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(bf16)))
  # bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2% per op); through two
  # blocks the logits (|logits| ~ 1 here) drift by a few 1e-2 at most.
  scale = float(jnp.max(jnp.abs(fp32)))
  assert float(jnp.max(jnp.abs(bf16 - fp32))) < 0.05 * max(scale, 1.0)
  loss_fp32 = lm.cross_entropy_loss(fp32, tokens)[0]
  loss_bf16 = lm.cross_entropy_loss(bf16, tokens)[0]
  np.testing.assert_allclose(float(loss_bf16), float(loss_fp32), rtol=1e-2)


@pytest.mark.slow
def test_bf16_params_are_stored_in_bf16_and_run():
  cfg = tiny_config(dtype="bfloat16", param_dtype="bfloat16")
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(6))
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.bfloat16)}
  logits = model(random_tokens(6, 1, 5))
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


# ----------------------------------------------------------------------------- decode


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
def test_prefill_then_step_decode_matches_full_forward(scan_layers):
  cfg = tiny_config(scan_layers=scan_layers)
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(7))
  tokens = random_tokens(7, 2, 9)
  full = model(tokens)
  prompt_len = 4
  cache = model.init_cache(2, 12)
  assert jax.tree.leaves(cache)[0].shape[0] == cfg.n_layers
  decode = jax.jit(lambda c, t, p: model.decode(t, p, c))
  prompt_logits, cache = decode(cache, tokens[:, :prompt_len],
                                lm.default_positions(tokens[:, :prompt_len]))
  step_logits = [prompt_logits]
  for t in range(prompt_len, 9):
    logits, cache = decode(cache, tokens[:, t:t + 1], jnp.full((2, 1), t, jnp.int32))
    step_logits.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(step_logits, axis=1)),
                             np.asarray(full), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- loss, grads


def test_cross_entropy_matches_reference_and_is_stable():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(2, 5, 7)) * 3 + 1000.0  # a large shift must not overflow
  targets = rng.integers(0, 7, size=(2, 5))
  mask = rng.integers(0, 2, size=(2, 5)).astype(np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  mean, total, count = lm.cross_entropy_loss(jnp.asarray(logits, jnp.float32),
                                             jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(float(total), (nll * mask).sum(), rtol=1e-4)
  np.testing.assert_allclose(float(count), mask.sum())
  np.testing.assert_allclose(float(mean), (nll * mask).sum() / mask.sum(), rtol=1e-4)
  unmasked_mean, _, unmasked_count = lm.cross_entropy_loss(jnp.asarray(logits, jnp.float32),
                                                           jnp.asarray(targets))
  np.testing.assert_allclose(float(unmasked_mean), nll.mean(), rtol=1e-4)
  assert float(unmasked_count) == 10


@pytest.mark.slow
def test_every_remat_policy_gives_same_loss_and_grads():
  base = tiny_config()
  graphdef_state = nnx.split(lm.LM(base, VOCAB, rngs=nnx.Rngs(9)))
  state = graphdef_state[1]
  tokens = random_tokens(9, 2, 8)
  results = {}
  for policy in config_lib.REMAT_POLICIES:
    cfg = dataclasses.replace(base, remat=policy)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda cfg=cfg: lm.LM(cfg, VOCAB, rngs=nnx.Rngs(0))))

    def loss_fn(state, graphdef=graphdef):
      logits = nnx.merge(graphdef, state)(tokens[:, :-1])
      return lm.cross_entropy_loss(logits, tokens[:, 1:])[0]

    results[policy] = jax.jit(jax.value_and_grad(loss_fn))(state)
  reference_loss, reference_grads = results["none"]
  assert isinstance(reference_grads, nnx.State)
  assert float(jnp.abs(reference_grads["blocks"]["mixer"]["wq"][...]).sum()) > 0
  for policy, (loss, grads) in results.items():
    np.testing.assert_allclose(float(loss), float(reference_loss), rtol=1e-6, err_msg=policy)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-7,
                                 err_msg=policy)


def test_save_qkv_proj_policy_saves_the_tagged_projections():
  cfg = tiny_config(remat="save_qkv_proj")
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(10))
  graphdef, state = nnx.split(model)
  tokens = random_tokens(10, 1, 6)

  def loss_fn(state):
    return lm.cross_entropy_loss(nnx.merge(graphdef, state)(tokens), tokens)[0]

  jaxpr_text = str(jax.make_jaxpr(jax.grad(loss_fn))(state))
  for name in ("query_proj", "key_proj", "value_proj"):
    assert name in jaxpr_text


# ----------------------------------------------------------------------------- compile size


def hlo_op_count(cfg: ModelConfig) -> int:
  graphdef, state = nnx.split(nnx.eval_shape(lambda: lm.LM(cfg, VOCAB, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)

  def loss_fn(state, tokens):
    return lm.cross_entropy_loss(nnx.merge(graphdef, state)(tokens), tokens)[0]

  compiled = jax.jit(jax.grad(loss_fn)).lower(state, tokens).compile()
  return len(re.findall(r"^\s*(?:ROOT\s+)?%?\S+\s*=", compiled.as_text(), flags=re.MULTILINE))


@pytest.mark.slow
def test_compiled_program_size_does_not_grow_with_depth_under_scan():
  scanned_2 = hlo_op_count(tiny_config(n_layers=2))
  scanned_8 = hlo_op_count(tiny_config(n_layers=8))
  assert scanned_8 <= 1.1 * scanned_2, (scanned_2, scanned_8)
  unrolled_2 = hlo_op_count(tiny_config(n_layers=2, scan_layers=False))
  unrolled_8 = hlo_op_count(tiny_config(n_layers=8, scan_layers=False))
  assert unrolled_8 > 2 * unrolled_2, (unrolled_2, unrolled_8)  # the measure sees depth
