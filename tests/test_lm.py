"""The decoder LM: slots and registries, logical names, causality, KV-cache decode,
trunk/remat equivalence, the aux channel, pre-sublayers, dtypes, FLOP and parameter
counts, depth-independent compile size."""

import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax import registry
from ttt_jax.config import SLOTS, Config, ModelConfig, Section, load_config
from ttt_jax.data import pipeline
from ttt_jax.models import lm
from ttt_jax.models.context import SequenceContext, default_positions
from ttt_jax.models.ffn.swiglu import SwiGLUConfig
from ttt_jax.models.mixers.attention import Attention, AttentionConfig
from ttt_jax.models.mixers.ttt_linear import PreConv, TTTLinear, TTTLinearConfig
from ttt_jax.models.residuals.plain import PlainResidual
from ttt_jax.models.trunks.stacked import ScanTrunkConfig, UnrolledTrunkConfig
from ttt_jax.training import objectives

VOCAB = 64
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRUNKS = {"scan": ScanTrunkConfig(), "unrolled": UnrolledTrunkConfig()}


def tiny_config(**overrides) -> ModelConfig:
  values = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn=SwiGLUConfig(d_ff=64),
                init_std=0.1)
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


@dataclasses.dataclass(frozen=True)
class AttentionWithAuxConfig(AttentionConfig):
  type: str = "attention_with_aux"
  aux_scale: float = 0.5
  """Scale of the recorded aux loss."""


@registry.MIXERS.register("attention_with_aux")
class AttentionWithAux(Attention):
  """A test mixer: attention that records aux_loss = aux_scale * mean(W_q^2) per layer
  (a function of that layer's parameters only, so the test can recompute it)."""

  Config = AttentionWithAuxConfig

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.aux_scale = cfg.mixer.aux_scale

  def __call__(self, x_BxTxD: jax.Array, ctx: SequenceContext) -> jax.Array:
    self.sow(nnx.Intermediate, objectives.AUX_LOSS,
             self.aux_scale * jnp.mean(jnp.square(self.wq[...].astype(jnp.float32))))
    return super().__call__(x_BxTxD, ctx)


def layer_aux_losses(wq_LxDxN: jax.Array, scale: float) -> np.ndarray:
  """What ``AttentionWithAux`` records in each layer, in float64."""
  return scale * np.mean(np.square(np.asarray(wq_LxDxN, np.float64)), axis=(1, 2))


# ----------------------------------------------------------------------------- structure


def test_every_registered_mechanism_has_a_section_naming_it():
  """One registry per slot is the only list of choices: every entry's ``Config`` is a
  ``Section`` whose default ``type`` is its registered name, and a ModelConfig accepts
  it in its slot."""
  assert tuple(registry.SLOTS) == SLOTS
  for slot, reg in registry.SLOTS.items():
    assert reg.names(), slot
    for name, mechanism in reg.items():
      section = mechanism.Config()
      assert isinstance(section, Section), (slot, name)
      assert section.type == name, (slot, name)
      assert getattr(ModelConfig(**{slot: section}), slot) is section, (slot, name)
  assert set(registry.MIXERS.names()) >= {"attention", "ttt_linear", "cct"}
  assert set(registry.RESIDUALS.names()) >= {"plain", "mhc"}
  assert set(registry.TRUNKS.names()) >= {"scan", "unrolled"}
  for policy in registry.REMAT_POLICIES.names():
    assert ModelConfig(remat=policy).remat == policy


def test_every_param_has_valid_logical_names(model):
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  flat_params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  flat_specs = dict(nnx.to_flat_state(specs))
  assert len(flat_params) > 0
  for path, variable in flat_params:
    names = variable.get_metadata("out_sharding")
    assert names is not None, path
    assert len(names) == variable[...].ndim, (path, names)
    assert set(names) <= set(registry.LOGICAL_AXES.names()), (path, names)
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
  assert names_by_path["head/w"] == ("embed", "vocab")
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
  cfg = tiny_config(n_layers=3, d_model=48, n_heads=6, n_kv_heads=3, head_dim=4,
                    ffn=SwiGLUConfig(d_ff=80))
  abstract = nnx.state(nnx.eval_shape(lambda: lm.LM(cfg, VOCAB, rngs=nnx.Rngs(0))))
  d, h, g, k, f, layers_n = 48, 6, 3, 4, 80, 3
  per_layer = d * h * k + 2 * d * g * k + h * k * d + 3 * d * f + 2 * d
  expected = VOCAB * d + layers_n * per_layer + d + d * VOCAB
  assert lm.count_params(abstract) == expected
  tied = dataclasses.replace(cfg, tie_embeddings=True)
  assert lm.count_params(lm.LM(tied, VOCAB, rngs=nnx.Rngs(0))) == expected - d * VOCAB


def test_forward_flops_hand_count():
  cfg = tiny_config(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn=SwiGLUConfig(d_ff=64))
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


def test_forward_flops_of_the_quickstart_by_hand():
  cfg = load_config(CONFIGS / "quickstart.yaml")
  model, seq_len, vocab = cfg.model, cfg.data.seq_len, cfg.data.vocab_size
  assert (model.n_layers, model.d_model, model.n_heads, model.kv_heads, model.dim_per_head,
          model.ffn.d_ff, seq_len, vocab) == (4, 192, 4, 4, 48, 512, 128, 2048)
  attention_proj = 2 * (192 * 4 * 48 + 2 * 192 * 4 * 48 + 4 * 48 * 192)
  attention_core = 2 * 2 * 4 * 48 * 128 / 2
  mlp = 2 * 3 * 192 * 512
  head = 2 * 192 * 2048  # tied: the head matmul is counted all the same
  expected = 4 * (attention_proj + attention_core + mlp) + head
  assert expected == 4521984
  assert lm.forward_flops_per_token(model, vocab, seq_len) == expected


@pytest.mark.parametrize("name,flops", [
    ("quickstart", 4521984), ("bench_dense", 11042816), ("ttt_linear_tiny", 1443840),
    ("mhc_tiny", 2605056), ("cct_tiny", 2414592), ("cct_tiny_baseline", 2359296),
    ("mhc_ttt_linear_tiny", 1628160), ("mhc_cct_tiny", 2660352),
])
def test_forward_flops_of_shipped_tiny_configs_are_unchanged(name, flops):
  """The values the flat-config model (one mixer branch per mechanism in lm.py) gave
  for these configs: the per-slot counts (mixer, its pre-sublayers, residuals, ffn,
  head) add up to the same formula."""
  cfg = load_config(CONFIGS / f"{name}.yaml")
  assert lm.forward_flops_per_token(cfg.model, cfg.data.vocab_size, cfg.data.seq_len) == flops


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
  packed_logits = model(packed, SequenceContext.for_tokens(packed, positions, segment_ids))
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
  forward = jax.jit(lambda t, s: model(t, SequenceContext.for_tokens(t, segment_ids_BxT=s)))
  packed = np.asarray(forward(jnp.asarray(rows), jnp.asarray(segment_ids)))
  plain = np.asarray(forward(jnp.asarray(rows), None))
  np.testing.assert_allclose(packed[0, :first], plain[0, :first], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, first:], plain[1, :length - first], rtol=1e-5, atol=1e-5)
  assert not np.allclose(plain[0, first:], plain[1, :length - first], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("mixer", [AttentionConfig(), TTTLinearConfig(mini_batch=4)],
                         ids=["attention", "ttt_linear"])
def test_scan_and_unrolled_trunks_give_identical_logits(mixer):
  cfg = tiny_config(n_layers=3, mixer=mixer)
  assert cfg.trunk == ScanTrunkConfig()  # the default trunk
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(1))
  state = nnx.state(model)
  unrolled_cfg = dataclasses.replace(cfg, trunk=UnrolledTrunkConfig())
  unrolled_model = lm.LM(unrolled_cfg, VOCAB, rngs=nnx.Rngs(1))
  # the trunk holds no parameters: a checkpoint of one runs with the other
  assert jax.tree.structure(nnx.state(unrolled_model)) == jax.tree.structure(state)
  tokens = random_tokens(3, 2, 10)
  scanned = logits_fn(cfg)(state, tokens)
  unrolled = logits_fn(unrolled_cfg)(state, tokens)
  np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(unrolled_model(tokens)), np.asarray(scanned),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_tied_embeddings_use_embedding_as_head():
  cfg = tiny_config(tie_embeddings=True)
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(2))
  assert model.head.w is None
  assert "head" not in nnx.state(model)
  tokens = random_tokens(4, 2, 6)
  features = np.asarray(model.features(tokens), np.float64)
  expected = features @ np.asarray(model.embed.embedding[...], np.float64).T
  np.testing.assert_allclose(np.asarray(model(tokens)), expected, rtol=1e-4, atol=1e-5)
  untied = nnx.state(lm.LM(tiny_config(), VOCAB, rngs=nnx.Rngs(2)))
  assert untied["head"]["w"][...].shape == (32, VOCAB)


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
@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_prefill_then_step_decode_matches_full_forward(trunk):
  cfg = tiny_config(trunk=TRUNKS[trunk])
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(7))
  tokens = random_tokens(7, 2, 9)
  full = model(tokens)
  prompt_len = 4
  cache = model.init_cache(2, 12)
  assert jax.tree.leaves(cache)[0].shape[0] == cfg.n_layers
  decode = jax.jit(lambda c, t, p: model.decode(t, SequenceContext(p), c))
  prompt_logits, cache = decode(cache, tokens[:, :prompt_len],
                                default_positions(tokens[:, :prompt_len]))
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
  for policy in registry.REMAT_POLICIES.names():
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
  unrolled_2 = hlo_op_count(tiny_config(n_layers=2, trunk=UnrolledTrunkConfig()))
  unrolled_8 = hlo_op_count(tiny_config(n_layers=8, trunk=UnrolledTrunkConfig()))
  assert unrolled_8 > 2 * unrolled_2, (unrolled_2, unrolled_8)  # the measure sees depth


# ----------------------------------------------------------------------------- aux channel


@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_aux_channel_stacks_what_each_layer_records(trunk):
  cfg = tiny_config(n_layers=3, mixer=AttentionWithAuxConfig(), trunk=TRUNKS[trunk])
  model = lm.LM(cfg, VOCAB, rngs=nnx.Rngs(12))
  tokens = random_tokens(12, 2, 8)
  logits, aux = model.forward(tokens)
  assert set(aux) == {"mixer.aux_loss"}
  assert aux["mixer.aux_loss"].shape == (3,)
  expected = layer_aux_losses(model.blocks.mixer.wq[...], 0.5)
  assert len(set(expected.tolist())) == 3  # the layers differ: the order is checked
  np.testing.assert_allclose(np.asarray(aux["mixer.aux_loss"]), expected, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(logits))
  # recording changes nothing else: plain attention with the same parameters
  plain = lm.LM(dataclasses.replace(cfg, mixer=AttentionConfig()), VOCAB, rngs=nnx.Rngs(12))
  plain_logits, plain_aux = plain.forward(tokens)
  np.testing.assert_array_equal(np.asarray(plain_logits), np.asarray(logits))
  assert plain_aux == {}


@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_aux_channel_leaves_a_jitted_rematerialised_forward(trunk):
  cfg = tiny_config(n_layers=2, mixer=AttentionWithAuxConfig(aux_scale=3.0),
                    trunk=TRUNKS[trunk], remat="full")
  graphdef, state = nnx.split(lm.LM(cfg, VOCAB, rngs=nnx.Rngs(13)))

  @jax.jit
  def forward(state, tokens):
    model = nnx.merge(graphdef, state)
    return model.forward(tokens)

  _, aux = forward(state, random_tokens(13, 1, 6))
  np.testing.assert_allclose(np.asarray(aux["mixer.aux_loss"]),
                             layer_aux_losses(state["blocks"]["mixer"]["wq"][...], 3.0),
                             rtol=1e-5)


@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_language_modeling_objective_adds_the_layer_mean_of_aux_losses(trunk):
  cfg = tiny_config(n_layers=3, mixer=AttentionWithAuxConfig(aux_scale=2.0),
                    trunk=TRUNKS[trunk])
  objective = objectives.build(Config(model=cfg))
  graphdef, state = nnx.split(lm.LM(cfg, VOCAB, rngs=nnx.Rngs(14)))
  tokens = random_tokens(14, 2, 9)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  step = objectives.StepContext(jnp.int32(0), jax.random.key(0), {})

  def loss_fn(state, graphdef=graphdef):
    return objective(nnx.merge(graphdef, state), batch, step)

  def cross_entropy(state):
    logits = nnx.merge(graphdef, state)(batch["inputs"])
    return lm.cross_entropy_loss(logits, batch["targets"])[0]

  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state)
  ce, ce_grads = jax.jit(jax.value_and_grad(cross_entropy))(state)
  wq = np.asarray(state["blocks"]["mixer"]["wq"][...], np.float64)
  aux_mean = float(np.mean(layer_aux_losses(wq, 2.0)))
  assert set(metrics) == {"mixer.aux_loss"}
  np.testing.assert_allclose(float(metrics["mixer.aux_loss"]), aux_mean, rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(ce) + aux_mean, rtol=1e-5)
  # the aux loss is differentiated too: d/dW_q of 2 * mean_l mean(W_q,l^2) = 4 W_q / |W_q|
  np.testing.assert_allclose(np.asarray(grads["blocks"]["mixer"]["wq"][...]),
                             np.asarray(ce_grads["blocks"]["mixer"]["wq"][...]) + 4 * wq / wq.size,
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(grads["blocks"]["mlp"]["w_up"][...]),
                             np.asarray(ce_grads["blocks"]["mlp"]["w_up"][...]), rtol=1e-5,
                             atol=1e-8)
  # a model that records nothing: the loss is the cross-entropy alone
  plain_graphdef, _ = nnx.split(lm.LM(dataclasses.replace(cfg, mixer=AttentionConfig()),
                                      VOCAB, rngs=nnx.Rngs(14)))
  plain_loss, plain_metrics = jax.jit(lambda state: loss_fn(state, plain_graphdef))(state)
  assert plain_metrics == {}
  np.testing.assert_allclose(float(plain_loss), float(ce), rtol=1e-6)


# ----------------------------------------------------------------------------- pre-sublayers


def test_pre_sublayers_get_an_attribute_and_a_residual_of_their_own():
  mamba = tiny_config(mixer=TTTLinearConfig(backbone="mamba", mini_batch=4))
  assert TTTLinear.pre_sublayers(mamba) == (("pre_conv", PreConv),)
  block = lm.Block(mamba, rngs=nnx.Rngs(0))
  assert block.pre_sublayers == ("pre_conv",)
  assert isinstance(block.pre_conv, PreConv)
  assert isinstance(block.pre_conv_residual, PlainResidual)
  assert block.pre_conv_residual is not block.mixer_residual
  transformer = tiny_config(mixer=TTTLinearConfig(backbone="transformer", mini_batch=4))
  assert TTTLinear.pre_sublayers(transformer) == ()
  assert Attention.pre_sublayers(tiny_config()) == ()
  for cfg in (transformer, tiny_config()):
    block = lm.Block(cfg, rngs=nnx.Rngs(0))
    assert block.pre_sublayers == ()
    assert not hasattr(block, "pre_conv") and not hasattr(block, "pre_conv_residual")
  paths = {"/".join(map(str, path)) for path, _ in
           nnx.to_flat_state(nnx.state(lm.LM(mamba, VOCAB, rngs=nnx.Rngs(0)), nnx.Param))}
  assert {p for p in paths if "pre_conv" in p} == {
      "blocks/pre_conv/filter", "blocks/pre_conv/bias", "blocks/pre_conv_residual/norm/scale"}
  transformer_paths = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(
      nnx.state(lm.LM(transformer, VOCAB, rngs=nnx.Rngs(0)), nnx.Param))}
  assert not any("pre_conv" in p for p in transformer_paths)


def test_block_runs_pre_sublayers_then_mixer_then_ffn_each_in_its_residual():
  cfg = tiny_config(mixer=TTTLinearConfig(backbone="mamba", mini_batch=4))
  block = lm.Block(cfg, rngs=nnx.Rngs(1))
  x = jnp.asarray(np.random.default_rng(15).normal(size=(2, 8, 32)), jnp.float32)
  ctx = SequenceContext.for_tokens(jnp.zeros((2, 8), jnp.int32))
  after_conv = x + block.pre_conv(block.pre_conv_residual.norm(x), ctx)
  after_mixer = after_conv + block.mixer(block.mixer_residual.norm(after_conv), ctx)
  expected = after_mixer + block.mlp(block.mlp_residual.norm(after_mixer), ctx)
  np.testing.assert_allclose(np.asarray(block(x, ctx)), np.asarray(expected), rtol=1e-6,
                             atol=1e-6)
  # the decode cache is (pre-sublayer caches..., mixer cache), and the mixer's alone without
  cache = block.init_cache(2, 8, jnp.float32, {})
  assert isinstance(cache, tuple) and len(cache) == 2
  assert cache[0].shape == (2, cfg.mixer.conv_width - 1, 32)
  plain_cache = lm.Block(tiny_config(), rngs=nnx.Rngs(1)).init_cache(2, 8, jnp.float32, {})
  assert type(plain_cache).__name__ == "KVCache"
