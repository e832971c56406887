"""``ttt_jax.reproduce``: the seed statistics and tables, the loss by position, and (slow)
whole studies at a tiny budget: outputs, determinism, resuming after an interruption."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_util import copy_stdlib_corpus
from ttt_jax import compare
from ttt_jax.cct import evals as cct_evals
from ttt_jax.eval import positions
from ttt_jax.models import lm
from ttt_jax.reproduce import __main__ as cli
from ttt_jax.reproduce import cct as reproduce_cct
from ttt_jax.reproduce import mhc, runner, stats, ttt_context
from ttt_jax.train import train

# ----------------------------------------------------------------------------- statistics


def test_mean_se_matches_the_definition():
  values = [4.1, 4.3, 3.9, 4.6]
  mean = sum(values) / 4
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
  result = stats.mean_se(values)
  assert result.mean == pytest.approx(mean) and result.n == 4
  assert result.se == pytest.approx(sd / 2)
  assert stats.mean_se([2.5]) == stats.MeanSE(2.5, None, 1)
  with pytest.raises(ValueError):
    stats.mean_se([])


def test_paired_difference_cancels_what_the_seeds_share():
  a = [4.0, 5.0, 6.0]
  b = [x + d for x, d in zip(a, [-0.1, -0.2, -0.3])]
  paired = stats.paired_difference(a, b)
  assert paired.mean == pytest.approx(-0.2)
  assert paired.se == pytest.approx(0.1 / math.sqrt(3))
  unpaired_se = math.hypot(stats.mean_se(a).se, stats.mean_se(b).se)
  assert paired.se < unpaired_se / 5  # the seed offsets cancel only when paired
  with pytest.raises(ValueError):
    stats.paired_difference([1.0], [1.0, 2.0])


def test_formatting_and_markdown_table():
  assert stats.format_mean_se(stats.MeanSE(4.32101, 0.01234, 3)) == "4.3210 ± 0.0123"
  assert stats.format_mean_se(stats.MeanSE(0.05, 0.01, 3), signed=True) == "+0.0500 ± 0.0100"
  assert stats.format_mean_se(stats.MeanSE(-0.05, None, 1), signed=True) == "-0.0500"
  assert stats.markdown_table(["a", "b"], [["1", "x|y"]]).splitlines() == [
      "| a | b |", "| --- | --- |", "| 1 | x\\|y |"]
  assert stats.overlaps(stats.MeanSE(1.0, 0.1, 3), stats.MeanSE(1.15, 0.1, 3))
  assert not stats.overlaps(stats.MeanSE(1.0, 0.1, 3), stats.MeanSE(1.25, 0.1, 3))


def test_budget_scales_steps_warmup_and_eval_batches():
  full = runner.budget(mhc.STUDY, 1.0)
  assert (full.steps, full.warmup_steps, full.eval_batches) == (300, 30, 8)
  small = runner.budget(mhc.STUDY, 0.05)
  assert (small.steps, small.warmup_steps, small.eval_batches) == (15, 2, 1)
  tiny = runner.budget(mhc.STUDY, 1e-6)
  assert tiny.steps == runner.MIN_STEPS and tiny.warmup_steps < tiny.steps
  assert 1 <= tiny.eval_every <= tiny.steps
  with pytest.raises(Exception, match="--budget"):
    runner.budget(mhc.STUDY, 0.0)


def test_an_invalid_budget_leaves_the_output_folder_usable(tmp_path):
  """A refused --budget records nothing, so the same --out then takes a valid one."""
  for bad in (0.0, -1.0, math.inf, math.nan):
    with pytest.raises(Exception, match="--budget"):
      runner.run_study(mhc.STUDY, tmp_path / "out", [0], bad, log=lambda m: None)
  assert not (tmp_path / "out").exists()
  runner.check_out(tmp_path / "out", mhc.STUDY, 0.05, ())
  assert json.loads((tmp_path / "out" / "settings.json").read_text())["budget"] == 0.05


def test_every_arm_config_loads():
  for study in (mhc.STUDY, ttt_context.STUDY):
    plan = runner.budget(study, 0.05)
    for arm in study.arms:
      cfg = runner.run_config(arm, 1, plan)
      assert cfg.train.steps == plan.steps and cfg.train.seed == 1
  cfgs = {arm.name: runner.run_config(arm, 0, runner.budget(ttt_context.STUDY, 1.0))
          for arm in ttt_context.ARMS}
  assert {c.train.batch_size * c.data.seq_len for c in cfgs.values()} == {2048}
  assert cfgs["ttt_transformer-512"].model.mixer.backbone == "transformer"
  assert cfgs["attention-128"].model.mixer.type == "attention"


def test_list_names_every_study(capsys):
  cli.main(["--list"])
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in lines] == ["mhc", "ttt_context", "cct"]


def test_unknown_study_is_one_line(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["nope", "--out", "/nonexistent/never"])
  assert exit_info.value.code != 0
  assert capsys.readouterr().err.strip().startswith("error: unknown study 'nope'")

def test_a_run_stopped_by_a_signal_stops_the_study(tmp_path, monkeypatch, capsys):
  plan = runner.budget(mhc.STUDY, 0.05)
  monkeypatch.setattr(runner, "train", lambda cfg, workdir: {"final_step": 3})
  with pytest.raises(runner.Stopped, match="plain/seed0 stopped at step 3 of 15; rerun"):
    runner.run_one(mhc.STUDY, mhc.PLAIN, 0, plan, tmp_path)
  assert not (runner.run_dir(tmp_path, mhc.PLAIN, 0) / runner.RESULT_FILE).exists()

  def stopped(*args, **kwargs):
    raise runner.Stopped("study mhc: run plain/seed0 stopped at step 3 of 15")

  monkeypatch.setattr(runner, "run_study", stopped)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["mhc", "--out", str(tmp_path / "out")])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == "study mhc: run plain/seed0 stopped at step 3 of 15\n"


# ----------------------------------------------------------------------------- loss by position


def test_position_losses_average_to_the_eval_loss():
  keys = jax.random.split(jax.random.key(0), 6)
  batches = [{"logits": jax.random.normal(keys[i], (3, 20, 11)) * 2.0,
              "targets": jax.random.randint(keys[i + 3], (3, 20), 0, 11)} for i in range(3)]
  step_fn = lambda params, batch: positions.position_sums(batch["logits"], batch["targets"])  # noqa: E731
  losses = positions.evaluate_positions(step_fn, None, batches)
  sums = [lm.cross_entropy_loss(b["logits"], b["targets"]) for b in batches]
  eval_loss = float(sum(s[1] for s in sums) / sum(s[2] for s in sums))
  assert losses.mean() == pytest.approx(eval_loss, rel=1e-6)
  np.testing.assert_array_equal(losses.tokens, np.full(20, 9.0))
  t = 7  # one position by hand
  by_hand = np.mean([float(-jax.nn.log_softmax(b["logits"][i, t])[b["targets"][i, t]])
                     for b in batches for i in range(3)])
  assert losses.sum_nll[t] / losses.tokens[t] == pytest.approx(by_hand, rel=1e-5)


def test_log_buckets_and_bucket_means():
  assert positions.log_buckets(512) == [(0, 8), (8, 16), (16, 32), (32, 64), (64, 128),
                                        (128, 256), (256, 512)]
  assert positions.log_buckets(100) == [(0, 8), (8, 16), (16, 32), (32, 64), (64, 100)]
  assert positions.log_buckets(8) == [(0, 8)]
  losses = positions.PositionLosses(np.array([2.0, 4.0, 9.0, 3.0]), np.array([1.0, 1.0, 3.0, 1.0]))
  assert positions.bucket_losses(losses, [(0, 2), (2, 4)]) == [3.0, 3.0]
  assert losses.mean() == pytest.approx(18.0 / 6.0)
  with pytest.raises(ValueError):
    positions.evaluate_positions(lambda p, b: None, None, [])

# ----------------------------------------------------------------------------- whole studies


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[str, ...]:
  """Overrides for every run: a 2-layer d64 model on a small real corpus (own cache)."""
  root = tmp_path_factory.mktemp("corpus")
  glob = copy_stdlib_corpus(root / "text")
  return (f"data.corpus=[{glob}]", f"data.cache_dir={root / 'cache'}",
          "data.vocab_size=512", "data.val_fraction=0.15", "model.n_layers=2",
          "model.d_model=64", "model.n_heads=4", "model.ffn.d_ff=128",
          "train.peak_flops=1e11")


MHC_BUDGET = 0.02  # 6 steps, 1 eval batch


@pytest.fixture(scope="module")
def mhc_run(tmp_path_factory, quick) -> Path:
  out = tmp_path_factory.mktemp("mhc_a")
  runner.run_study(mhc.STUDY, out, [0, 1], MHC_BUDGET, quick, log=lambda m: None)
  return out


def png_shape(path: Path) -> tuple[int, ...]:
  image = pytest.importorskip("matplotlib.image")
  return image.imread(path).shape


@pytest.mark.slow
def test_mhc_study_writes_results_table_and_plot(mhc_run):
  results = json.loads((mhc_run / "results.json").read_text())
  assert results["seeds"] == [0, 1] and set(results["runs"]) == {"plain", "mhc"}
  for arm in ("plain", "mhc"):
    for seed in ("0", "1"):
      run = results["runs"][arm][seed]
      assert math.isfinite(run["eval_loss"]) and run["n_params"] > 0
  assert results["runs"]["mhc"]["0"]["n_params"] > results["runs"]["plain"]["0"]["n_params"]
  assert results["runs"]["plain"]["0"]["eval_loss"] != results["runs"]["plain"]["1"]["eval_loss"]
  table = (mhc_run / "table.md").read_text()
  diff = stats.paired_difference(runner.values(results, "plain", "eval_loss"),
                                 runner.values(results, "mhc", "eval_loss"))
  assert f"| mhc - plain | {stats.format_mean_se(diff, signed=True)} |" in table
  assert stats.format_mean_se(stats.mean_se(runner.values(results, "mhc", "eval_loss"))) in table
  shape = png_shape(mhc_run / "curves.png")
  assert shape[:2] == (540, 1440) and (mhc_run / "curves.png").stat().st_size > 20_000


@pytest.mark.slow
def test_same_seeds_give_identical_json_and_finished_runs_are_not_retrained(
    mhc_run, tmp_path, quick, monkeypatch):
  runner.run_study(mhc.STUDY, tmp_path, [0, 1], MHC_BUDGET, quick, log=lambda m: None)
  assert (tmp_path / "results.json").read_bytes() == (mhc_run / "results.json").read_bytes()
  assert (tmp_path / "table.md").read_text() == (mhc_run / "table.md").read_text()

  def no_training(cfg, workdir):
    raise AssertionError(f"retrained {workdir}")

  monkeypatch.setattr(runner, "train", no_training)
  runner.run_study(mhc.STUDY, tmp_path, [0, 1], MHC_BUDGET, quick, log=lambda m: None)
  assert (tmp_path / "results.json").read_bytes() == (mhc_run / "results.json").read_bytes()
  with pytest.raises(Exception, match="another study or --budget"):
    runner.run_study(mhc.STUDY, tmp_path, [0], 0.5, quick)


@pytest.mark.slow
def test_an_interrupted_study_resumes_to_the_same_json(mhc_run, tmp_path, quick, monkeypatch):
  plan = runner.budget(mhc.STUDY, MHC_BUDGET)
  arm = mhc.STUDY.arms[0]
  stopped_cfg = runner.run_config(arm, 0, plan, quick + ("train.stop_after=4",))
  summary = train(stopped_cfg, runner.run_dir(tmp_path, arm, 0))  # killed mid-run
  assert summary["final_step"] == 4 < plan.steps
  messages = []
  monkeypatch.setattr(compare, "have_matplotlib", lambda: False)
  runner.run_study(mhc.STUDY, tmp_path, [0, 1], MHC_BUDGET, quick, log=messages.append)
  assert (tmp_path / "results.json").read_bytes() == (mhc_run / "results.json").read_bytes()
  assert not (tmp_path / "curves.png").exists()
  assert any("pip install -e '.[plots]'" in m for m in messages)


@pytest.mark.slow
def test_ttt_context_study_reports_loss_by_position(tmp_path, quick):
  results = runner.run_study(ttt_context.STUDY, tmp_path, [0], 0.04, quick,
                             log=lambda m: None)
  assert json.loads((tmp_path / "results.json").read_text()) == results
  assert set(results["runs"]) == {arm.name for arm in ttt_context.ARMS}
  for arm in ttt_context.ARMS:
    run = results["runs"][arm.name]["0"]
    # the per-position eval of the checkpoint averages to the train loop's final eval
    assert run["position_mean"] == pytest.approx(run["eval_loss"], rel=1e-5)
    seq_len = 512 if arm.name.endswith("512") else 128
    assert run["buckets"] == [list(b) for b in positions.log_buckets(seq_len)]
    assert len(run["position_loss"]) == len(run["buckets"])
  params = {arm.name: results["runs"][arm.name]["0"]["n_params"] for arm in ttt_context.ARMS}
  assert params["attention-128"] == params["attention-512"]
  table = (tmp_path / "table.md").read_text()
  assert "late-context gain" in table and "pos 256-511" in table
  assert png_shape(tmp_path / "positions.png")[:2] == (540, 720)
  assert png_shape(tmp_path / "curves.png")[:2] == (540, 1440)


# ----------------------------------------------------------------------------- cct


def test_cct_step_len_is_the_arms_step():
  for arm in reproduce_cct.STUDY.arms:
    cfg = runner.run_config(arm, 0, runner.budget(reproduce_cct.STUDY, 1.0))
    assert cfg.data.step_boundaries == "fixed"
    assert cfg.data.step_len == reproduce_cct.STEP_LEN
  assert runner.run_config(reproduce_cct.CCT, 0, runner.budget(
      reproduce_cct.STUDY, 1.0)).model.mixer.step_len == reproduce_cct.STEP_LEN


def test_passkey_documents_are_deterministic_and_of_the_eval_form():
  first = reproduce_cct.passkey_documents(seed=3, count=200)
  assert first == reproduce_cct.passkey_documents(seed=3, count=200)
  assert first != reproduce_cct.passkey_documents(seed=4, count=200)
  keys = [key for key, _ in first]
  assert len(set(keys)) == len(keys)
  for key, text in first:
    key_sentence = cct_evals.PASSKEY_KEY.format(key=key)
    assert text.count(key_sentence) == 1
    assert text.endswith(f"{cct_evals.PASSKEY_QUESTION} {key}.")
    start = text.index(key_sentence)
    assert set(text[:start].replace(". ", ".|").split("|")) <= set(
        s.strip() for s in reproduce_cct.FILLER) | {""}


def test_passkey_key_lies_at_least_two_steps_before_the_question():
  gaps = []
  for key, text in reproduce_cct.passkey_documents(seed=0, count=300):
    key_end = text.index(cct_evals.PASSKEY_KEY.format(key=key)) + len(
        cct_evals.PASSKEY_KEY.format(key=key))
    gap = text[key_end:text.index(cct_evals.PASSKEY_QUESTION)]
    gaps.append(len(gap.split()))  # each word is at least one sentencepiece token
  assert min(gaps) >= 2 * reproduce_cct.STEP_LEN
  assert max(gaps) > min(gaps)  # the gap varies


def test_heldout_passkey_keys_differ_from_every_training_key():
  training = set(reproduce_cct.passkey_keys().tolist())
  assert len(training) == reproduce_cct.PASSKEY_DOCS
  for seed in range(3):
    held = reproduce_cct.heldout_keys(seed, 50)
    assert held == reproduce_cct.heldout_keys(seed, 50) and len(set(held)) == 50
    assert not training & set(held)
    assert all(reproduce_cct.KEY_RANGE[0] <= k < reproduce_cct.KEY_RANGE[1] for k in held)
  assert reproduce_cct.heldout_keys(0, 50) != reproduce_cct.heldout_keys(1, 50)


@pytest.mark.slow
def test_cct_study_trains_in_the_passkey_corpus_and_reports(tmp_path, quick):
  results = runner.run_study(reproduce_cct.STUDY, tmp_path, [0, 1], 0.05, quick,
                             log=lambda m: None)
  assert json.loads((tmp_path / "results.json").read_text()) == results
  corpus = tmp_path / reproduce_cct.PASSKEY_FILE
  assert corpus.is_file()
  cfg = json.loads((runner.run_dir(tmp_path, reproduce_cct.CCT, 0) / "result.json")
                   .read_text())["overrides"]
  assert any(o.startswith("data.corpus=") and str(corpus.resolve()) in o for o in cfg)
  for arm in ("baseline", "cct"):
    for seed in ("0", "1"):
      run = results["runs"][arm][seed]
      assert math.isfinite(run["eval_loss"]) and 0.0 <= run["passkey_accuracy"] <= 1.0
      assert set(run["passkey_by_depth"]) == {str(d) for d in reproduce_cct.PASSKEY_DEPTHS}
  cct_run = results["runs"]["cct"]["0"]
  assert cct_run["compression_ratio"] > 1.0
  assert all(math.isfinite(cct_run[k]) for k in
             ("sufficiency_r2", "random_projection_r2", "shuffled_summary_r2"))
  assert "sufficiency_r2" not in results["runs"]["baseline"]["0"]
  table = (tmp_path / "table.md").read_text()
  diff = stats.paired_difference(runner.values(results, "baseline", "eval_loss"),
                                 runner.values(results, "cct", "eval_loss"))
  assert f"| eval loss | {stats.format_mean_se(diff, signed=True)} |" in table
  delta = stats.mean_se(reproduce_cct.perplexity_delta(results))
  assert stats.format_mean_se(delta, 2, signed=True) in table
  assert png_shape(tmp_path / "curves.png")[:2] == (540, 1440)
