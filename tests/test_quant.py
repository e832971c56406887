"""``ttt_jax.quant``: per-row quantization against brute-force references, which tensors
are quantized along which axes, the artifact container, and late QAT (fake quantization
with a straight-through gradient, switched on by the schedule without recompiling)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ttt_jax import export, quant, train
from ttt_jax.config import load_config
from ttt_jax.errors import CheckpointError
from ttt_jax.training import objectives, optim, state, step
from ttt_jax.training.objectives import StepContext
from train_util import copy_stdlib_corpus, read_metrics, tiny_config

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.ffn.d_ff=128",
        "data.vocab_size=512", "data.seq_len=16", "mesh.num_devices=1", "mesh.fsdp=1"]


def _heavy_tailed(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  """Student-t samples (3 dof): outliers make the clip search matter."""
  return np.random.default_rng(seed).standard_t(3, shape).astype(np.float32) * 0.02


def _tiny_params(*overrides: str) -> nnx.State:
  cfg = load_config(None, TINY + list(overrides))
  return nnx.state(state.model_fn(cfg, cfg.data.vocab_size)())


# ----------------------------------------------------------------------------- per-row math


@pytest.mark.parametrize("bits", [6, 8])
def test_codes_lie_in_range_and_the_error_inside_the_clip_is_at_most_half_a_step(bits):
  w = _heavy_tailed(0, (3, 40, 24))
  q, scale = quant.quantize(w, (1,), bits)
  assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (3, 1, 24)
  assert np.abs(q.astype(np.int32)).max() <= quant.qmax(bits)
  assert np.abs(q.astype(np.int32)).max() == quant.qmax(bits)  # the range is used
  error = np.abs(quant.dequantize(q, scale) - w)
  inside = np.abs(w) <= quant.qmax(bits) * scale
  assert inside.mean() > 0.9
  half_step = np.broadcast_to(scale / 2, w.shape)
  assert (error[inside] <= half_step[inside] * (1 + 1e-6)).all()


def _brute_force_row(row: np.ndarray, bits: int) -> tuple[float, list[float]]:
  """The least MSE over the candidate clips of one row, and every candidate's scale."""
  limit, best, scales = quant.qmax(bits), np.inf, []
  for p in quant.PERCENTILES:
    clip = float(np.quantile(np.abs(row).astype(np.float64), p))
    s = np.float32(clip / limit) if clip > 0 else np.float32(1)
    scales.append(s)
    q = np.clip(np.round(row / s), -limit, limit)
    best = min(best, float(np.mean((q * s - row).astype(np.float64) ** 2)))
  return best, scales


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_the_clip_search_finds_the_brute_force_minimum(bits):
  w = _heavy_tailed(bits, (2, 48, 16))  # rows: [layer, :, output]
  q, scale = quant.quantize(w, (1,), bits)
  chosen = quant.dequantize(q, scale)
  better_than_max = 0
  for layer in range(2):
    for out in range(16):
      row = w[layer, :, out]
      best, scales = _brute_force_row(row, bits)
      mse = float(np.mean((chosen[layer, :, out] - row).astype(np.float64) ** 2))
      assert mse == pytest.approx(best, rel=1e-5), (layer, out)
      assert np.isclose(scale[layer, 0, out], scales, rtol=1e-6).any()
      better_than_max += not np.isclose(scale[layer, 0, out], scales[-1], rtol=1e-6)
  assert better_than_max > 0  # heavy tails: some rows clip below their max


def test_large_tensors_are_quantized_in_slices_with_the_same_result(monkeypatch):
  w = _heavy_tailed(5, (3, 20, 7))
  whole = quant.quantize(w, (1,), 6)
  monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 100)  # 3 x 20 x 7 x 6 candidates: 3 slices
  for expected, sliced in zip(whole, quant.quantize(w, (1,), 6)):
    np.testing.assert_array_equal(sliced, expected)


def test_an_all_zero_row_stays_zero():
  w = _heavy_tailed(1, (8, 4))
  w[:, 2] = 0
  q, scale = quant.quantize(w, (0,), 6)
  assert (q[:, 2] == 0).all() and np.isfinite(scale).all()


def test_each_layer_and_output_row_has_its_own_scale():
  w = _heavy_tailed(2, (2, 32, 8))
  scaled = w.copy()
  scaled[1] *= 100.0      # another layer
  scaled[0, :, 3] *= 7.0  # another output row of the same layer
  q, scale = quant.quantize(w, (1,), 6)
  q2, scale2 = quant.quantize(scaled, (1,), 6)
  np.testing.assert_array_equal(q, q2)
  np.testing.assert_allclose(scale2[1], scale[1] * 100.0, rtol=1e-6)
  np.testing.assert_allclose(scale2[0, 0, 3], scale[0, 0, 3] * 7.0, rtol=1e-6)
  np.testing.assert_array_equal(scale2[0, 0, :3], scale[0, 0, :3])


# ----------------------------------------------------------------------------- which tensors


@pytest.mark.parametrize("spec, shape, kind, axes", [
    (P("layers", "embed", "mlp"), (2, 64, 128), quant.MATRIX, (1,)),       # up projection
    (P("layers", "mlp", "embed"), (2, 128, 64), quant.MATRIX, (1,)),       # down projection
    (P("layers", "heads", "embed"), (2, 64, 64), quant.MATRIX, (1,)),      # attention out
    (P("embed", "heads", "head_dim"), (64, 4, 16), quant.MATRIX, (0,)),    # [D, H, Dh] in
    (P("heads", "head_dim", "embed"), (4, 16, 64), quant.MATRIX, (0, 1)),  # [H, Dh, D] out
    (P("vocab", "embed"), (512, 64), quant.EMBEDDING, (1,)),               # one row a token
    (P("embed", "vocab"), (64, 512), quant.EMBEDDING, (0,)),               # untied head
    (P("layers", "norm"), (64, 64), quant.RAW, None),                      # a vector axis
    (P("layers", "embed", "mlp"), (2, 32, 32), quant.RAW, None),           # small
    (P(), (64, 128), quant.RAW, None),                                     # unnamed axes
])
def test_kinds_and_rows_follow_the_logical_axes(spec, shape, kind, axes):
  assert quant.tensor_kind(spec, shape) == kind
  if axes is not None:
    assert quant.reduction_axes(spec, kind) == axes
    if kind == quant.MATRIX:  # the optimizer's reduction axes
      assert axes == tuple(optim.muon_dimension_numbers(spec).reduction_axis)


def test_raw_tensors_are_float16_only_where_it_only_rounds():
  assert quant.raw_dtype(np.ones(4)) == np.float16
  assert quant.raw_dtype(np.zeros(4)) == np.float16
  assert quant.raw_dtype(np.array([1.0, 2.0 ** -14])) == np.float16
  assert quant.raw_dtype(np.array([1.0, 7e4])) == np.float32     # overflow
  assert quant.raw_dtype(np.array([1.0, 1e-6])) == np.float32    # subnormal in float16
  assert quant.raw_dtype(np.array([1.0, np.inf])) == np.float32


# ----------------------------------------------------------------------------- the artifact


def test_serialized_artifacts_decode_bitwise_as_in_memory_and_are_deterministic(tmp_path):
  params = _tiny_params()
  encoded = quant.encode_params(params)
  kinds = {path[-2:]: enc.kind for path, enc in encoded.items()}
  assert kinds[("mlp", "w_up")] == quant.MATRIX and kinds[("embed", "embedding")] == \
      quant.EMBEDDING and kinds[("final_norm", "scale")] == quant.RAW
  meta = {"step": 3, "note": "x"}
  data = quant.serialize(encoded, meta)
  assert data == quant.serialize(quant.encode_params(params), meta)
  (tmp_path / "a.ttq").write_bytes(data)
  artifact = quant.read_artifact(tmp_path / "a.ttq")
  assert artifact.header["step"] == 3 and artifact.header["format"] == quant.FORMAT_VERSION
  assert list(artifact.tensors) == list(encoded)
  for path, enc in encoded.items():
    np.testing.assert_array_equal(quant.decode(artifact.tensors[path]), quant.decode(enc))
    assert artifact.tensors[path].values.dtype == enc.values.dtype
  loaded, step_ = quant.load_artifact(tmp_path / "a.ttq", params)
  assert step_ == 3
  for path, var in nnx.to_flat_state(loaded):
    np.testing.assert_array_equal(np.asarray(var.get_value()), quant.decode(encoded[path]))


def _one_line(error: pytest.ExceptionInfo, path) -> None:
  message = str(error.value)
  assert "\n" not in message and str(path) in message, message


def test_bad_artifact_files_are_refused_in_one_line_naming_the_file(tmp_path):
  params = _tiny_params()
  data = quant.serialize(quant.encode_params(params), {"step": 1})
  flipped = bytearray(data)
  flipped[len(data) // 2] ^= 0x55
  other = quant.serialize(quant.encode_params(_tiny_params("model.d_model=32")), {"step": 1})
  files = {"garbage": b"hello", "empty": b"", "truncated": data[:len(data) // 2],
           "flipped": bytes(flipped), "magic_only": quant.MAGIC,
           "other_model": other}
  for name, content in files.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError) as error:
      quant.load_artifact(tmp_path / name, params)
    _one_line(error, tmp_path / name)
  with pytest.raises(CheckpointError) as error:
    quant.load_artifact(tmp_path / "absent", params)
  _one_line(error, tmp_path / "absent")


def test_an_artifact_of_another_tokenizer_is_refused(tmp_path):
  params = _tiny_params()
  encoded = quant.encode_params(params)
  (tmp_path / "a.ttq").write_bytes(quant.serialize(encoded, {"step": 1,
                                                             "tokenizer_hash": "ab" * 32}))
  assert quant.load_artifact(tmp_path / "a.ttq", params, "ab" * 32)[1] == 1
  with pytest.raises(CheckpointError) as error:
    quant.load_artifact(tmp_path / "a.ttq", params, "cd" * 32)
  _one_line(error, tmp_path / "a.ttq")
  assert "another tokenizer" in str(error.value)


def test_a_header_with_wrong_offsets_is_refused_not_read_out_of_bounds(tmp_path):
  encoded = {("w",): quant.Encoded(quant.RAW, np.ones((4,), np.float16))}
  data = quant.serialize(encoded, {"step": 0})
  header, tensors = quant.deserialize(data, tmp_path / "ok")
  assert header["tensors"][0]["nbytes"] == 8
  body = quant.lzma.decompress(data[len(quant.MAGIC):])
  bad = body.replace(b'"nbytes":8', b'"nbytes":9')
  broken = quant.MAGIC + quant.lzma.compress(bad, format=quant.lzma.FORMAT_XZ)
  with pytest.raises(CheckpointError) as error:
    quant.deserialize(broken, tmp_path / "bad")
  _one_line(error, tmp_path / "bad")


def test_bytes_after_the_compressed_data_are_refused(tmp_path):
  """An artifact with anything appended (junk, or a second artifact) is not intact."""
  data = quant.serialize({("w",): quant.Encoded(quant.RAW, np.ones((4,), np.float16))},
                         {"step": 0})
  quant.deserialize(data, tmp_path / "ok")
  for name, extra in (("junk", b"0123456789abcdef" * 4), ("twice", data)):
    with pytest.raises(CheckpointError, match="after its compressed data") as error:
      quant.deserialize(data + extra, tmp_path / name)
    _one_line(error, tmp_path / name)


def _repacked(data: bytes, old: bytes, new: bytes) -> bytes:
  """``data`` with its (decompressed) body edited and compressed again: an intact xz
  stream around an altered header or blob."""
  body = quant.lzma.decompress(data[len(quant.MAGIC):])
  assert old in body
  return quant.MAGIC + quant.lzma.compress(body.replace(old, new), format=quant.lzma.FORMAT_XZ)


def test_a_header_without_its_step_is_refused_in_one_line(tmp_path):
  data = quant.serialize({("w",): quant.Encoded(quant.RAW, np.ones((4,), np.float16))},
                         {"step": 3})
  for name, new in (("missing", b'"stap":3'), ("text", b'"step":"3"')):
    with pytest.raises(CheckpointError, match="damaged artifact header") as error:
      quant.deserialize(_repacked(data, b'"step":3', new), tmp_path / name)
    _one_line(error, tmp_path / name)


def test_scales_that_do_not_fit_their_codes_or_are_not_finite_are_refused(tmp_path):
  w = _heavy_tailed(0, (64, 128))
  encoded = {("w",): quant.encode(w, P("embed", "mlp"), 6, 8)}
  assert encoded[("w",)].scale.shape == (1, 128)
  data = quant.serialize(encoded, {"step": 0})
  bad_shape = _repacked(data, b'"shape":[1,128]', b'"shape":[128,1]')
  scale = encoded[("w",)].scale
  bad_value = _repacked(data, scale.tobytes(), np.full_like(scale, np.nan).tobytes())
  for name, content in (("shape", bad_shape), ("nan", bad_value)):
    with pytest.raises(CheckpointError, match="scales") as error:
      quant.deserialize(content, tmp_path / name)
    _one_line(error, tmp_path / name)


def test_a_tensor_to_quantize_with_a_non_finite_value_is_refused_naming_it():
  """One inf or NaN would make its whole row's scale (so every dequantized value of the
  row) NaN; raw tensors keep theirs as float32."""
  params = _tiny_params()
  flat = list(nnx.to_flat_state(params))
  path, var = next((p, v) for p, v in flat if p[-2:] == ("mlp", "w_up"))
  value = np.array(var.get_value())
  value.flat[7] = np.inf
  broken = nnx.from_flat_state([(p, v.replace(jnp.asarray(value)) if p == path else v)
                                for p, v in flat])
  with pytest.raises(CheckpointError, match="w_up") as error:
    quant.encode_params(broken)
  assert "\n" not in str(error.value) and "not finite" in str(error.value)
  norm_path, norm = next((p, v) for p, v in flat if p[-2:] == ("final_norm", "scale"))
  raw = nnx.from_flat_state([(p, v.replace(v.get_value().at[0].set(jnp.nan))
                              if p == norm_path else v) for p, v in flat])
  assert np.isnan(quant.decode(quant.encode_params(raw)[norm_path])[0])


# ----------------------------------------------------------------------------- late QAT


def _assert_dequantized(forward: np.ndarray, q: np.ndarray, scale: np.ndarray) -> None:
  """``forward`` is q s up to XLA's last-bit arithmetic: every value on the grid of
  ``scale``, the codes those of numpy but where w / s lies within an ulp of a rounding
  tie (at most one code in 1000, one step away)."""
  codes = np.round(forward / scale)
  np.testing.assert_allclose(forward / scale, codes, atol=1e-4)
  assert np.abs(codes - q).max() <= 1 and (codes != q).mean() <= 1e-3
  same = codes == q
  np.testing.assert_allclose(forward[same], quant.dequantize(q, scale)[same], rtol=1e-6)


@pytest.mark.parametrize("axes", [(0,), (1,), (0, 1)])
def test_fake_quant_forward_is_the_max_clip_dequantization_and_its_gradient_the_identity(
    axes):
  w = _heavy_tailed(3, (24, 12))
  q, scale = quant.quantize(w, axes, 6, percentiles=(1.0,))
  forward = np.asarray(jax.jit(quant.fake_quant, static_argnums=(1, 2))(jnp.asarray(w),
                                                                         axes, 6))
  _assert_dequantized(forward, q, scale)
  cotangent = jnp.asarray(_heavy_tailed(4, w.shape))
  grad = jax.grad(lambda x: jnp.sum(quant.fake_quant(x, axes, 6) * cotangent))(jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(cotangent))


def test_fake_quant_params_touches_only_the_exported_matrices():
  params = _tiny_params()
  on = jax.jit(lambda p: quant.fake_quant_params(p, jnp.bool_(True), 6))(params)
  off = jax.jit(lambda p: quant.fake_quant_params(p, jnp.bool_(False), 6))(params)
  specs = {tuple(k): v.get_value() for k, v in nnx.to_flat_state(nnx.get_partition_spec(params))}
  original = {tuple(k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(params)}
  for (path, var), (_, var_off) in zip(nnx.to_flat_state(on), nnx.to_flat_state(off)):
    path, w = tuple(path), original[tuple(path)]
    np.testing.assert_array_equal(np.asarray(var_off.get_value()), w)
    kind = quant.tensor_kind(specs[path], w.shape)
    if kind == quant.MATRIX:
      q, s = quant.quantize(w, quant.reduction_axes(specs[path], kind), 6, percentiles=(1.0,))
      _assert_dequantized(np.asarray(var.get_value()), q, s)
    else:
      np.testing.assert_array_equal(np.asarray(var.get_value()), w)


@pytest.mark.parametrize("schedule, ratio", [("cosine", 0.5), ("wsd", 0.3), ("cosine", 0.05)])
def test_qat_switches_on_at_the_first_step_under_the_threshold(schedule, ratio):
  cfg = load_config(None, TINY + [f"optim.schedule={schedule}", "optim.warmup_steps=5",
                                  "train.steps=40", f"quant.qat_lr_ratio={ratio}"])
  lr = optim.lr_schedule(cfg.optim, cfg.train.steps)
  expected = next((s for s in range(5, 40) if float(lr(s)) < ratio * cfg.optim.lr), None)
  start = quant.qat_start_step(cfg)
  assert start == expected
  assert (start is None) == (ratio < cfg.optim.min_lr_ratio)
  if start is not None:
    active = [bool(quant.qat_active(cfg, jnp.int32(s))) for s in range(40)]
    assert active == [s >= start for s in range(40)]


def test_qat_is_off_by_default_and_never_on_under_a_constant_schedule():
  assert quant.qat_transform(load_config(None, TINY)) is None
  cfg = load_config(None, TINY + ["optim.schedule=constant", "quant.qat_lr_ratio=0.9"])
  assert quant.qat_start_step(cfg) is None


@pytest.mark.slow
def test_the_train_step_switches_to_fake_quantization_without_recompiling():
  cfg = load_config(None, TINY + ["optim.warmup_steps=2", "train.steps=12",
                                  "train.batch_size=2", "quant.qat_lr_ratio=0.6"])
  start = quant.qat_start_step(cfg)
  assert start is not None and 2 < start < 11
  graphdef, params = nnx.split(state.model_fn(cfg, cfg.data.vocab_size)())
  logical = nnx.get_partition_spec(params)
  tx = optim.build_optimizer(cfg.optim, cfg.train.steps, logical)
  train_step = jax.jit(step.make_train_step(cfg, graphdef, tx))
  current = state.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), {})
  tokens = np.random.default_rng(0).integers(0, 512, (2, 17), dtype=np.int32)
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
  flags = []
  for _ in range(12):
    current, metrics = train_step(current, batch)
    flags.append(float(metrics[quant.QAT_METRIC]))
  assert flags == [float(s >= start) for s in range(12)]
  assert train_step._cache_size() == 1
  # on a step past the switch, the loss is that of the fake-quantized model
  fixed = current._replace(step=jnp.int32(start))
  _, metrics = train_step(fixed, batch)
  assert train_step._cache_size() == 1
  model_params = quant.fake_quant_params(current.params, jnp.bool_(True), 6)
  ctx = StepContext(jnp.int32(start), jax.random.fold_in(jax.random.key(0), start), {})
  expected, _ = jax.jit(lambda p: objectives.build(cfg)(nnx.merge(graphdef, p), batch, ctx))(
      model_params)
  np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)


@pytest.mark.slow
def test_a_run_with_late_qat_logs_the_switch_and_exports(tmp_path, capsys):
  cfg = tiny_config(copy_stdlib_corpus(tmp_path / "src"), tmp_path / "cache",
                    "train.steps=16", "train.eval_every=0", "checkpoint.every=16",
                    "optim.warmup_steps=2", "quant.qat_lr_ratio=0.5")
  start = quant.qat_start_step(cfg)
  assert start is not None and 2 < start < 15
  train.train(cfg, tmp_path / "run")
  flags = {row["step"]: row[quant.QAT_METRIC] for row in read_metrics(tmp_path / "run")
           if quant.QAT_METRIC in row}
  # a row's step counts the steps done: row k reports optimizer step k - 1
  assert flags == {k: float(k - 1 >= start) for k in range(1, 17)}
  capsys.readouterr()
  export.main(["--workdir", str(tmp_path / "run")])
  assert json.loads(capsys.readouterr().out)["step"] == 16
