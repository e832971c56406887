"""A tiny CCT model trained on real text: the loss goes down, every term and p_commit
are logged along the curriculum, and the CCT evaluations, generation with its
commitment hash chain and the chain's verification run on the result."""

from __future__ import annotations

import json
import math

import pytest

from ttt_jax import cct_chain, generate, train
from ttt_jax.cct import evals as cct_eval
from ttt_jax.cct import mixer as cct
from ttt_jax.cct.mixer import CCTConfig
from train_util import copy_stdlib_corpus, eval_losses, read_metrics, tiny_config

pytestmark = pytest.mark.slow  # every test trains a CCT model

STEPS = 60


CCT_OVERRIDES = ("model.mixer=cct", "train.objective=cct", "data.step_boundaries=fixed",
                 "data.step_len=8", "model.mixer.step_len=8", "model.mixer.max_steps=8",
                 "model.mixer.d_summary=8", f"train.steps={STEPS}", "train.eval_every=30",
                 "checkpoint.every=0", "logging.tensorboard=false")


def train_cct(root, *overrides: str):
  corpus = copy_stdlib_corpus(root / "src")
  cfg = tiny_config(corpus, root / "cache", *CCT_OVERRIDES, *overrides)
  assert cfg.model.mixer == CCTConfig(step_len=8, max_steps=8, d_summary=8)
  workdir = root / "run"
  return cfg, workdir, train.train(cfg, workdir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  return train_cct(tmp_path_factory.mktemp("cct"))


def check_cct_loss_goes_down(trained):
  cfg, workdir, _ = trained
  evals = eval_losses(workdir)
  assert sorted(evals) == [0, 30, STEPS]
  assert evals[0] > 0.95 * math.log(cfg.data.vocab_size)
  # evaluation commits every boundary: 8-token steps plus summaries as the only context
  assert evals[STEPS] < evals[0] - 0.75


def test_cct_loss_goes_down_on_real_text(trained):
  check_cct_loss_goes_down(trained)


def test_cct_with_the_mhc_residual_loss_goes_down_on_real_text(tmp_path):
  """The CCT objective (all four terms) through mHC's n streams and its remat policy."""
  trained = train_cct(tmp_path, "model.residual=mhc", "model.remat=mhc_streams")
  cfg, workdir, _ = trained
  assert (cfg.model.residual.type, cfg.model.remat) == ("mhc", "mhc_streams")
  check_cct_loss_goes_down(trained)
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  sufficiency = [r["loss_sufficiency"] for r in rows]
  assert all(math.isfinite(v) for v in sufficiency) and sufficiency[-1] < sufficiency[0]


def test_every_term_and_p_commit_logged_along_the_curriculum(trained):
  _, workdir, _ = trained
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  for row in rows:
    expected_p = float(cct.p_commit_schedule(row["step"] - 1, STEPS))
    assert row["p_commit"] == pytest.approx(expected_p, abs=1e-6)
    weights = {k: float(v) for k, v in cct.loss_weights(row["step"] - 1, STEPS).items()}
    total = (weights["alpha"] * row["loss_standard"] + weights["beta"] * row["loss_validity"]
             + weights["gamma"] * row["loss_conclusion"]
             + weights["delta"] * row["loss_sufficiency"])
    assert row["loss"] == pytest.approx(total, rel=1e-4)
  assert rows[0]["p_commit"] == 0.0 and rows[-1]["p_commit"] == 1.0
  # once every boundary is committed both passes see the same masks
  committed = [r for r in rows if r["p_commit"] == 1.0]
  assert committed and all(r["loss_standard"] == pytest.approx(r["loss_validity"], rel=0.2)
                           for r in committed)


def test_sufficiency_task_runs_on_the_trained_run(trained):
  _, workdir, _ = trained
  result = cct_eval.run_sufficiency(workdir, [], batches=2)
  assert result["n_steps"] > 20 and result["d_summary"] == 8
  assert len(result["layers"]) == 2
  assert result["shuffled_summary_r2"] < result["sufficiency_probe_r2"]
  assert math.isfinite(result["summary_ablation"]["delta_loss"])


def test_governance_task_times_the_hash_chain_on_the_trained_run(trained):
  _, workdir, _ = trained
  result = cct_eval.run_governance(workdir, [], {"prompt_len": 8, "new_tokens": 24,
                                                 "rounds": 2})
  assert result["shape"]["steps"] == "fixed/8" and result["shape"]["new_tokens"] == 24
  # 8 + 24 tokens, 31 decoded: the last decoded token's step (3) is open
  assert result["committed_steps_per_sequence"] == [3]
  for variant in result["per_token"].values():
    assert 0 < variant["best_ms"] <= variant["median_ms"]
  assert result["chain_host_ms_median"] > 0
  assert math.isfinite(result["overhead_pct_median"])


def test_generate_writes_the_hash_chain_and_verify_finds_a_tampered_token(trained, tmp_path,
                                                                           capsys):
  _, workdir, _ = trained
  path = tmp_path / "chain.json"
  generate.main(["--workdir", str(workdir), "--prompt", "def f(x):", "--max-new-tokens", "24",
                 "--temperature", "0", "--hash-chain", str(path)])
  record = json.loads(path.read_text())
  assert record["header"]["steps"] == "fixed/8" and record["header"]["n_layers"] == 2
  (sequence,) = record["sequences"]
  assert sequence["n_decoded"] == len(sequence["tokens"]) - 1
  # committed: the steps before the last decoded token's (fixed steps of 8)
  assert sequence["n_steps"] == (sequence["n_decoded"] - 1) // 8 == len(sequence["hashes"])
  assert sequence["n_steps"] >= 3 and sequence["head"] == sequence["hashes"][-1]
  capsys.readouterr()
  cct_chain.main(["--workdir", str(workdir), str(path)])
  assert capsys.readouterr().out == (
      f"sequence 0: OK: {sequence['n_steps']} committed steps verified\n")
  sequence["tokens"][12] = (sequence["tokens"][12] + 1) % 512  # step 1
  path.write_text(json.dumps(record))
  with pytest.raises(SystemExit) as exit_info:
    cct_chain.main(["--workdir", str(workdir), str(path)])
  assert exit_info.value.code == 1
  assert capsys.readouterr().out.startswith("sequence 0: MISMATCH: step 1: ")
  with pytest.raises(SystemExit) as exit_info:
    generate.main(["--workdir", str(workdir), "--prompt", "x",
                   "--hash-chain", str(tmp_path / "missing" / "chain.json")])
  assert exit_info.value.code == 2
  assert "--hash-chain: directory" in capsys.readouterr().err
