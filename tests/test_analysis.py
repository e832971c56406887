"""Weight-space analysis: the closed forms, scipy's principal angles, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import ortho_group

from tests.train_util import copy_stdlib_corpus, pretokenized_corpus, tiny_config
from ttt_jax import analysis, train


def test_a_rotated_subspace_has_cosines_one_and_its_complement_zero():
  q = ortho_group.rvs(12, random_state=0)
  basis, complement = q[:, :4], q[:, 4:8]
  rotated = basis @ ortho_group.rvs(4, random_state=1)  # the same span, another basis
  np.testing.assert_allclose(analysis.subspace_cosines(basis, rotated), np.ones(4), atol=1e-12)
  np.testing.assert_allclose(analysis.subspace_cosines(basis, complement), np.zeros(4),
                             atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_principal_angles_match_scipy(seed):
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=(20, 5)), rng.normal(size=(20, 5))
  qa, qb = np.linalg.qr(a)[0], np.linalg.qr(b)[0]
  ours = np.sort(analysis.subspace_cosines(qa, qb))
  theirs = np.sort(np.cos(scipy.linalg.subspace_angles(a, b)))
  np.testing.assert_allclose(ours, theirs, atol=1e-10)


def test_top_subspaces_are_the_singular_vectors():
  """M_b = M_a with its spectrum rescaled keeps every singular subspace: cosines 1."""
  rng = np.random.default_rng(3)
  u, _, vt = np.linalg.svd(rng.normal(size=(10, 7)), full_matrices=False)
  m_a = u @ np.diag([7, 6, 5, 4, 3, 2, 1.0]) @ vt
  m_b = u @ np.diag([14, 11, 9, 4.5, 3, 2, 1.0]) @ vt
  left, right = analysis.top_subspace_cosines(m_a, m_b, k=3)
  np.testing.assert_allclose(left, 1.0, atol=1e-10)
  np.testing.assert_allclose(right, 1.0, atol=1e-10)


def test_stable_rank_operator_norm_and_condition_closed_forms():
  n = 9
  eye = analysis.spectrum_stats(np.eye(n))
  assert eye["stable_rank"] == pytest.approx(n) and eye["op_norm"] == pytest.approx(1.0)
  assert eye["condition"] == pytest.approx(1.0)
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=6), rng.normal(size=4)
  rank1 = analysis.spectrum_stats(np.outer(x, y))
  assert rank1["stable_rank"] == pytest.approx(1.0)
  assert rank1["op_norm"] == pytest.approx(np.linalg.norm(x) * np.linalg.norm(y))
  assert rank1["condition"] > 1e12  # singular (inf, or rounding's tiny last value)
  diag = analysis.spectrum_stats(np.diag([4.0, 2.0, 1.0]))
  assert diag["condition"] == pytest.approx(4.0)
  assert diag["stable_rank"] == pytest.approx(21 / 16)


def test_matrix_view_splits_batch_reduction_and_output_axes():
  x = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)  # [layers, in, heads, d]
  view = analysis.matrix_view(x, reduction=(1,), output=(2, 3))
  assert view.shape == (2, 3, 20)
  np.testing.assert_array_equal(view[1], x[1].reshape(3, 20))
  wo = analysis.matrix_view(x, reduction=(2, 3), output=(1,))  # [layers, out, heads, d]
  np.testing.assert_array_equal(wo[0], x[0].reshape(3, 20).T)


def test_whole_tensor_figures():
  a = np.array([3.0, 4.0])
  row = analysis.compare_tensors(a, 2 * a, None, top_k=2)
  assert row["cosine"] == pytest.approx(1.0) and row["rel_l2"] == pytest.approx(1.0)
  row = analysis.compare_tensors(a, np.array([-4.0, 3.0]), None, top_k=2)
  assert row["cosine"] == pytest.approx(0.0)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("analysis")
  corpus = copy_stdlib_corpus(root / "src"), root / "cache"
  runs = []
  for seed in (0, 1):
    workdir = root / f"run{seed}"
    train.train(tiny_config(*corpus, "train.steps=10", "train.eval_every=0",
                            f"train.seed={seed}", "logging.tensorboard=false"), workdir)
    runs.append(workdir)
  return runs


@pytest.mark.slow
def test_a_run_against_itself_is_identical_with_no_barrier(two_runs, tmp_path, capsys):
  out = tmp_path / "self.json"
  analysis.main(["--a", str(two_runs[0]), "--b", str(two_runs[0]), "--batches", "2",
                 "--out", str(out)])
  result = json.loads(out.read_text())
  for name, row in result["params"].items():
    assert row["cosine"] == pytest.approx(1.0) and row["rel_l2"] == 0.0, name
    if "subspace_cos_left_min" in row:
      assert row["subspace_cos_left_min"] == pytest.approx(1.0, abs=1e-6), name
  assert result["barrier"]["barrier"] == 0.0
  assert "loss barrier at the midpoint: +0.0000" in capsys.readouterr().out


@pytest.mark.slow
def test_two_seeds_differ_and_the_table_names_every_param(two_runs, tmp_path, capsys):
  out = tmp_path / "pair.json"
  analysis.main(["--a", str(two_runs[0]), "--b", str(two_runs[1]), "--batches", "2",
                 "--out", str(out)])
  result = json.loads(out.read_text())
  printed = capsys.readouterr().out
  assert all(name in printed for name in result["params"])
  wq = result["params"]["blocks/mixer/wq"]
  assert wq["cosine"] < 0.5 and wq["subspace_cos_left_mean"] < 0.9  # other seeds' inits
  barrier = result["barrier"]
  assert barrier["barrier"] == pytest.approx(
      barrier["loss_mid"] - (barrier["loss_a"] + barrier["loss_b"]) / 2)


@pytest.mark.slow
def test_another_model_is_refused_in_one_line(two_runs, tmp_path, capsys):
  other = tmp_path / "other"
  root = two_runs[0].parent
  train.train(tiny_config(str(root / "src" / "*.py"), root / "cache", "train.steps=2",
                          "train.eval_every=0", "model.n_layers=1",
                          "logging.tensorboard=false"), other)
  with pytest.raises(SystemExit) as exit_info:
    analysis.main(["--a", str(two_runs[0]), "--b", str(other), "--no-barrier"])
  assert exit_info.value.code == 2
  assert "another model than --a" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_runs_of_another_vocabulary_without_a_tokenizer_are_refused_in_one_line(tmp_path,
                                                                                capsys):
  """Pre-tokenized corpora leave no tokenizer.model to compare: the vocabulary is told
  apart by the params' shapes, not by a reshape traceback."""
  workdirs = []
  for vocab in (300, 400):
    workdirs.append(tmp_path / f"run{vocab}")
    train.train(tiny_config(pretokenized_corpus(tmp_path, vocab), tmp_path / "cache",
                            "train.steps=2", "train.eval_every=0", "checkpoint.every=2",
                            "logging.tensorboard=false"), workdirs[-1])
  assert not (workdirs[0] / "tokenizer.model").exists()
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    analysis.main(["--a", str(workdirs[0]), "--b", str(workdirs[1]), "--no-barrier"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: --b ") and "[400, 64], [300, 64]" in err[-1], err


@pytest.mark.slow
def test_a_run_differing_only_in_compute_settings_is_compared(two_runs, tmp_path, capsys):
  """remat and the compute dtype change how the step computes, not the params."""
  other = tmp_path / "remat"
  root = two_runs[0].parent
  train.train(tiny_config(str(root / "src" / "*.py"), root / "cache", "train.steps=10",
                          "train.eval_every=0", "train.seed=0", "model.remat=full",
                          "model.dtype=bfloat16", "logging.tensorboard=false"), other)
  out = tmp_path / "remat.json"
  analysis.main(["--a", str(two_runs[0]), "--b", str(other), "--no-barrier",
                 "--out", str(out)])
  params = json.loads(out.read_text())["params"]
  assert params and all(row["cosine"] > 0.9 for row in params.values()), params


def test_roundtrip_error_of_a_quantized_matrix_is_bounded_by_half_a_step():
  """Per-row int6: each row's error is at most s/2 per value inside its clip, so the
  relative MSE is at most (clip / 31 / 2)^2 / mean square; rows of one value are exact."""
  from jax.sharding import PartitionSpec as P
  rng = np.random.default_rng(5)
  w = rng.normal(size=(128, 64)).astype(np.float32)
  rel = analysis.roundtrip_rel_mse(w, P("embed", "mlp"))
  bound = np.mean((np.abs(w).max(axis=0) / 31 / 2) ** 2) / np.mean(w ** 2)
  assert 0 < rel <= bound
  assert analysis.roundtrip_rel_mse(np.ones((128, 64), np.float32), P("embed", "mlp")) == 0.0
