"""``python -m ttt_jax.export`` and ``evaluate --task lm --artifact``: on a trained tiny
model the quantized artifacts cost little loss and few bytes, exports are reproducible,
and a bad artifact file is refused in one line naming it."""

from __future__ import annotations

import json

from pathlib import Path

import jax
import numpy as np
from flax import nnx
import pytest

from ttt_jax import evaluate, export, quant, runs, train
from train_util import copy_stdlib_corpus, tiny_config

EVAL_BATCHES = "4"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 60-step tiny run (tests/train_util.py) with a wider FFN, so that, as in any real
  model, the int6 matrices hold most of the params (131k of 164k; the tied [512, 64]
  int8 embedding 33k). With the default d_ff=128 the embedding is 28% of the params and
  the artifact about 21.7% of their float32 bytes, too close to the bound to test."""
  root = tmp_path_factory.mktemp("exported")
  train.train(tiny_config(copy_stdlib_corpus(root / "src"), root / "cache",
                          "train.eval_every=0", "checkpoint.every=60", "model.ffn.d_ff=256"),
              root / "run")
  return root / "run"


def _export(capsys, *argv: str) -> dict:
  export.main(list(argv))
  return json.loads(capsys.readouterr().out)


def _eval_loss(capsys, workdir, *argv: str) -> float:
  evaluate.main(["--workdir", str(workdir), "--batches", EVAL_BATCHES, *argv])
  return json.loads(capsys.readouterr().out)["eval_loss"]


def _one_error_line(capsys, main, argv: list[str]) -> str:
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


@pytest.mark.slow
def test_int6_and_int8_artifacts_cost_little_loss_and_int6_few_bytes(run, capsys):
  int6 = _export(capsys, "--workdir", str(run))
  int8 = _export(capsys, "--workdir", str(run), "--bits-matrix", "8", "--out",
                 str(run / "int8.ttq"))
  params = runs.load_trained(run, log=lambda _: None)[2]
  for result in (int6, int8):
    assert result["bytes"] == Path(result["artifact"]).stat().st_size
    assert result["fp32_param_bytes"] == sum(4 * x.size for x in jax.tree.leaves(params))
  assert int6["bits"] == {"matrix": 6, "embedding": 8} and int6["step"] == 60
  assert int6["bytes"] <= 0.22 * int6["fp32_param_bytes"], int6
  assert int6["bytes"] < int8["bytes"]
  raw = _eval_loss(capsys, run)
  loss6 = _eval_loss(capsys, run, "--artifact", int6["artifact"])
  loss8 = _eval_loss(capsys, run, "--artifact", int8["artifact"])
  assert abs(loss6 - raw) <= 0.02 and abs(loss8 - raw) <= 0.005, (raw, loss6, loss8)
  assert loss6 != raw  # the artifact, not the checkpoint, was scored


@pytest.mark.slow
def test_exports_are_byte_identical_and_load_as_their_in_memory_dequantization(
    run, capsys, tmp_path):
  first = _export(capsys, "--workdir", str(run), "--out", str(tmp_path / "a.ttq"))
  second = _export(capsys, "--workdir", str(run), "--out", str(tmp_path / "b.ttq"))
  assert (tmp_path / "a.ttq").read_bytes() == (tmp_path / "b.ttq").read_bytes()
  assert first["bytes"] == second["bytes"]
  _, _, params, step, _ = runs.load_trained(run, log=lambda _: None)
  loaded, loaded_step = quant.load_artifact(tmp_path / "a.ttq", params)
  assert loaded_step == step
  expected = {path: quant.decode(enc) for path, enc in quant.encode_params(params).items()}
  for path, var in nnx.to_flat_state(loaded):
    np.testing.assert_array_equal(np.asarray(var.get_value()), expected[tuple(path)])


@pytest.mark.slow
def test_a_bad_artifact_is_refused_in_one_line_naming_it(run, capsys, tmp_path):
  good = _export(capsys, "--workdir", str(run), "--out", str(tmp_path / "good.ttq"))
  data = (tmp_path / "good.ttq").read_bytes()
  (tmp_path / "garbage.ttq").write_bytes(b"not an artifact at all")
  (tmp_path / "truncated.ttq").write_bytes(data[:len(data) // 2])
  flipped = bytearray(data)
  flipped[len(data) // 2] ^= 0xFF
  (tmp_path / "flipped.ttq").write_bytes(bytes(flipped))
  for name in ("garbage.ttq", "truncated.ttq", "flipped.ttq", "missing.ttq"):
    line = _one_error_line(capsys, evaluate.main, ["--workdir", str(run), "--artifact",
                                                   str(tmp_path / name)])
    assert str(tmp_path / name) in line, line
  assert good["bytes"] == len(data)
  line = _one_error_line(capsys, export.main, ["--workdir", str(run), "--bits-matrix", "9"])
  assert "--bits-matrix" in line


@pytest.mark.slow
def test_an_artifact_of_another_model_with_the_same_shapes_is_refused(run, capsys, tmp_path):
  """An artifact exported from a run whose model differs only where no parameter shape
  shows it (here rope_theta) is not scored as this run's model."""
  _export(capsys, "--workdir", str(run), "--out", str(tmp_path / "good.ttq"))
  data = (tmp_path / "good.ttq").read_bytes()
  body = quant.lzma.decompress(data[len(quant.MAGIC):])
  (length,) = quant.struct.unpack_from("<Q", body)
  header = json.loads(body[8:8 + length])
  header["config"]["model"]["rope_theta"] *= 2
  text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
  other = quant.struct.pack("<Q", len(text)) + text + body[8 + length:]
  (tmp_path / "other.ttq").write_bytes(
      quant.MAGIC + quant.lzma.compress(other, format=quant.lzma.FORMAT_XZ))
  with pytest.raises(SystemExit) as exit_info:  # after the run's loading messages
    evaluate.main(["--workdir", str(run), "--artifact", str(tmp_path / "other.ttq")])
  assert exit_info.value.code != 0
  line = capsys.readouterr().err.strip().splitlines()[-1]
  assert line.startswith(f"error: {tmp_path / 'other.ttq'}: ") and "rope_theta" in line, line
  assert np.isfinite(_eval_loss(capsys, run, "--artifact", str(tmp_path / "good.ttq")))


def test_export_of_a_directory_without_a_run_is_one_line(capsys, tmp_path):
  line = _one_error_line(capsys, export.main, ["--workdir", str(tmp_path)])
  assert str(tmp_path) in line


@pytest.mark.slow
def test_gptq_export_changes_only_matrix_codes_is_reproducible_and_scores_close(
    run, capsys, tmp_path):
  calibration = ["--gptq", "--calib-seqs", "8", "--calib-len", "32", "--calib-seed", "3"]
  first = _export(capsys, "--workdir", str(run), "--out", str(tmp_path / "g1.ttq"),
                  *calibration)
  _export(capsys, "--workdir", str(run), "--out", str(tmp_path / "g2.ttq"), *calibration)
  _export(capsys, "--workdir", str(run), "--out", str(tmp_path / "rtn.ttq"))
  assert (tmp_path / "g1.ttq").read_bytes() == (tmp_path / "g2.ttq").read_bytes()
  summary = first["gptq"]
  assert summary["round_to_nearest"] == {}
  assert set(summary["weights"]) == {f"blocks/{name}" for name in (
      "mixer/wq", "mixer/wk", "mixer/wv", "mixer/wo", "mlp/w_gate", "mlp/w_up", "mlp/w_down")}
  assert (summary["calib_seqs"], summary["calib_len"], summary["calib_seed"]) == (8, 32, 3)
  gptq_tensors = quant.read_artifact(tmp_path / "g1.ttq").tensors
  rtn_tensors = quant.read_artifact(tmp_path / "rtn.ttq").tensors
  assert gptq_tensors.keys() == rtn_tensors.keys()
  for path, enc in gptq_tensors.items():
    rtn = rtn_tensors[path]
    assert (enc.kind, enc.bits) == (rtn.kind, rtn.bits)
    if enc.scale is not None:
      np.testing.assert_array_equal(enc.scale, rtn.scale)
    if "/".join(map(str, path)) in summary["weights"]:
      assert np.mean(enc.values != rtn.values) > 0.01, path
    else:
      np.testing.assert_array_equal(enc.values, rtn.values)
  raw = _eval_loss(capsys, run)
  loss = _eval_loss(capsys, run, "--artifact", str(tmp_path / "g1.ttq"))
  assert abs(loss - raw) <= 0.02 and loss != raw, (raw, loss)
  line = _one_error_line(capsys, export.main, ["--workdir", str(run), "--gptq",
                                               "--calib-seqs", "0"])
  assert "quant.calib_seqs" in line, line
