"""ttt_jax.bench (mhc, io, train, lora, sdft): the mHC comparison's statistics on a tiny model, the
checkpoint-stall benchmark, argument errors, the help of every flag, the summaries on
stderr and the pinned MFU peak."""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.bench import io as bench_io
from ttt_jax.bench import lora as bench_lora
from ttt_jax.bench import mhc as bench_mhc
from ttt_jax.bench import sdft as bench_sdft
from ttt_jax import checkpoint as ckpt_lib
from ttt_jax import lora, registry, sharding
from ttt_jax.bench import __main__ as bench_main
from ttt_jax.bench import common as bench_common
from ttt_jax.config import ConfigError, load_config
from train_util import copy_stdlib_corpus, tiny_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.ffn.d_ff=64",
        "data.seq_len=16", "data.vocab_size=64", "train.batch_size=8", "mesh.data=8"]


@pytest.mark.slow
def test_bench_mhc_runs_every_variant_on_a_tiny_model():
  cfg = load_config(str(REPO / "configs" / "bench_dense.yaml"), TINY)
  result = bench_mhc.bench_mhc(cfg, steps=2, warmup=0, rounds=2, reference_tokens_per_sec=100.0,
                           replicas=1)
  assert set(result["variants"]) == set(bench_mhc.MHC_VARIANTS)
  for variant in result["variants"].values():
    assert variant["step_time_min_s"] <= variant["step_time_median_s"]
    assert variant["switch_step_time_median_s"] > 0
    assert variant["replica_spread"] == 0.0 and variant["compile_s"] > 0
  assert result["identical_program_spread"] is None
  assert result["overhead_remat_paired"]["rounds"] == 2
  assert result["mhc_peak_bytes_remat_vs_none"] > 0  # the policy's effect: tests/test_mhc.py
  assert result["speedup_vs_pytorch_reference_remat_median"] == (
      result["variants"]["mhc_remat"]["tokens_per_sec_median"] / 100.0)


def _run(times: list[float], peak: int = 100) -> dict:
  return {"times": times, "switch_times": [9.0], "compile_s": 1.0,
          "memory": {"peak_bytes": peak, "temp_size_in_bytes": peak // 2}}


def test_mhc_summary_pairs_replica_k_with_replica_k_round_by_round():
  # 2 replicas x 3 rounds x 2 timed steps. Round ratios mhc/plain - 1: replica 0
  # 0.2, 0.1, 0.2 (its third round is slow for both variants); replica 1 0.3 each.
  plain = [[1.0, 1.0, 1.0, 1.0, 2.0, 2.0], [1.0] * 6]
  mhc = [[1.2, 1.2, 1.1, 1.1, 2.4, 2.4], [1.3] * 6]
  runs = {}
  for k in range(2):
    runs["plain", k] = runs["plain_remat", k] = _run(plain[k])
    runs["mhc", k] = _run(mhc[k], peak=400)
    runs["mhc_remat", k] = _run([2 * t for t in mhc[k]], peak=200)
  result = bench_mhc.mhc_summary(runs, steps=2, tokens=10, reference_tokens_per_sec=2.0)

  paired = result["overhead_paired"]
  assert paired["rounds"] == 3 and paired["replicas"] == 2
  assert paired["per_replica"] == pytest.approx([0.5 / 3, 0.3])
  assert paired["mean"] == pytest.approx(1.4 / 6)
  assert paired["median"] == pytest.approx(0.25)
  assert paired["stderr"] == pytest.approx(
      statistics.stdev([0.2, 0.1, 0.2, 0.3, 0.3, 0.3]) / 6 ** 0.5)
  assert result["overhead_remat_paired"]["mean"] == pytest.approx(2 * (1 + 1.4 / 6) - 1)

  mhc_stats = result["variants"]["mhc"]
  assert mhc_stats["replica_step_time_medians_s"] == pytest.approx([1.2, 1.3])
  assert mhc_stats["step_time_median_s"] == pytest.approx(1.3)  # of all 12 timed steps
  assert mhc_stats["step_time_min_s"] == pytest.approx(1.1)
  assert mhc_stats["replica_spread"] == pytest.approx(0.1 / 1.3)
  assert mhc_stats["switch_step_time_median_s"] == 9.0
  assert mhc_stats["tokens_per_sec_median"] == pytest.approx(10 / 1.3)
  assert result["identical_program_spread"] == pytest.approx(
      max(v["replica_spread"] for v in result["variants"].values()))
  assert result["overhead_median"] == pytest.approx(1.3 / 1.0 - 1)
  assert result["mhc_peak_bytes_remat_vs_none"] == pytest.approx(0.5)
  assert result["speedup_vs_pytorch_reference_median"] == pytest.approx(10 / 1.3 / 2.0)


class _Position:
  def get_state(self) -> dict:
    return {"next_index": 3}


def test_save_cost_times_saves_that_land_as_complete_checkpoints(tmp_path):
  state = {"w": jnp.arange(4096, dtype=jnp.float32)}
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=5)
  try:
    cost = bench_io.save_cost(ckpt, state, _Position(), {"process_count": 1}, saves=3,
                           first_step=10)
    assert ckpt.all_steps() == [10, 11, 12]
    restored = ckpt.restore(12, {"w": jax.ShapeDtypeStruct((4096,), np.float32,
                                                           sharding=state["w"].sharding)},
                            data_iter=None)
  finally:
    ckpt.close()
  np.testing.assert_array_equal(restored.state["w"], state["w"])
  assert cost["save_alone_wall_s"] > 0 and cost["save_alone_cpu_s"] > 0


def test_checksum_cost_times_the_checksums_and_a_verified_restore(tmp_path):
  state = {"w": jnp.arange(4096, dtype=jnp.float32)}
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=5)
  try:
    ckpt.save(3, state, _Position(), {"process_count": 1})
    ckpt.wait()
    cost = bench_io.checksum_cost(ckpt, state, 3, repeats=2)
  finally:
    ckpt.close()
  assert set(cost) == {"checksum_wall_s", "checksum_cpu_s", "restore_wall_s",
                       "restore_cpu_s"}
  assert all(value > 0 for value in cost.values())


@pytest.mark.slow
def test_bench_io_reports_the_stall_the_save_cost_and_the_data_rate(tmp_path):
  cfg = tiny_config(copy_stdlib_corpus(tmp_path / "src"), tmp_path / "cache", "data.seq_len=16")
  result = bench_io.bench_io(cfg, steps=4, saves=2)
  assert result["steps_per_interval"] == 2 and len(result["save_call_s"]) == 2
  assert len(result["interval_wall_s"]["with_save"]) == 2
  assert result["stall_fraction_of_step"] == pytest.approx(
      result["stall_per_save_s"] / result["step_time_s"])
  assert result["save_alone_cpu_fraction_of_step"] == pytest.approx(
      result["save_alone_cpu_s"] / result["step_time_s"])
  assert result["save_alone_wall_s"] > 0 and result["checkpoint_bytes"] > 0
  assert result["checksum_cpu_fraction_of_save"] == pytest.approx(
      result["checksum_cpu_s"] / result["save_alone_cpu_s"])
  assert result["checksum_first_call_wall_s"] > 0 and result["restore_wall_s"] > 0
  assert result["trainer_tokens_per_sec"] == pytest.approx(8 * 16 / result["step_time_s"])
  assert result["data_over_trainer"] == pytest.approx(
      result["data_tokens_per_sec"] / result["trainer_tokens_per_sec"])


@pytest.mark.slow
def test_bench_mhc_rejects_a_bad_count_in_one_line():
  proc = subprocess.run([sys.executable, "-m", "ttt_jax.bench", "mhc", "--replicas", "0"],
                        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip() == "error: --replicas: must be >= 1, got 0"


def test_subjects_are_dispatched_from_the_bench_table(capsys):
  assert registry.BENCHES.names() == ["cct", "io", "lora", "mhc", "sdft", "train", "ttt"]
  with pytest.raises(SystemExit) as exit_info:
    bench_main.main(["cct", "--config", str(REPO / "configs" / "quickstart.yaml"),
                     "--hash-chain"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.startswith("error: model.mixer.type: --hash-chain needs 'cct'")


def test_every_bench_flag_has_help_text():
  for name, bench in registry.BENCHES.items():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for action in parser._actions:  # argparse keeps no public list of a parser's flags
      assert action.help and action.help.strip(), (name, action.option_strings)


def test_mhc_summary_is_a_table_of_the_variants_and_the_overheads():
  runs = {}
  for k in range(2):
    runs["plain", k] = runs["plain_remat", k] = _run([1.0] * 4)
    runs["mhc", k] = runs["mhc_remat", k] = _run([1.25] * 4, peak=3 * 2**20)
  result = {**bench_mhc.mhc_summary(runs, steps=2, tokens=100, reference_tokens_per_sec=40.0),
            "mhc_streams": 4, "rounds": 2, "steps_per_round": 2, "replicas": 2}
  lines = "\n".join(bench_mhc.summary(result)).splitlines()
  assert lines[0] == "mhc: 4 streams, 2 rounds x 2 steps, 2 replicas"
  assert lines[2].split() == ["plain", "1", "1", "100", "0.0%", "100", "B"]
  assert lines[3].split() == ["mhc", "1.25", "1.25", "80", "0.0%", "3.0", "MiB"]
  assert lines[6].startswith("mHC overhead: +25.0% (paired +25.0% +- 0.0%), with remat +25.0%")
  assert lines[6].endswith("2.00x the PyTorch reference's 40 tokens/s")


def test_peak_flops_flag_pins_the_config_peak_or_is_refused():
  cfg = load_config(None, [])
  assert bench_common.pinned_peak_flops(cfg, None) is cfg
  assert bench_common.pinned_peak_flops(cfg, 2.5e11).train.peak_flops == 2.5e11
  with pytest.raises(ConfigError, match=r"^--peak-flops: must be > 0, got 0.0$"):
    bench_common.pinned_peak_flops(cfg, 0.0)


@pytest.mark.slow
def test_bench_train_summary_line_pinned_peak_and_profile(tmp_path, capsys):
  bench_main.main(["train", "--config", str(REPO / "configs" / "quickstart.yaml"),
                   *(arg for o in TINY for arg in ("--set", o)), "--steps", "2", "--warmup",
                   "0", "--peak-flops", "1.5e11", "--profile", str(tmp_path / "profile")])
  out, err = capsys.readouterr()
  result = json.loads(out)  # stdout is the JSON alone
  devices = result["devices"]
  assert result["peak_source"] == "config"
  assert result["peak_flops_mesh"] == 1.5e11 * devices
  assert result["mfu"] == pytest.approx(
      result["train_flops_per_step"] / (result["step_time_s"] * 1.5e11 * devices))
  lines = err.splitlines()
  assert lines[-2].startswith(f"train: {result['step_time_s']:.4g} s/step (best ")
  assert (f"MFU {100 * result['mfu']:.2f}% of {150 * devices:.1f} GFLOP/s (config)"
          in lines[-2])
  assert lines[-1] == f"profile of the 2 timed steps: {tmp_path / 'profile'}"
  assert list((tmp_path / "profile").rglob("*.trace.json.gz"))


@pytest.mark.slow
def test_bench_ttt_prints_a_table_of_its_variants_on_stderr(capsys):
  bench_main.main(["ttt", "--batch", "1", "--seq", "16", "--width", "16", "--heads", "2",
                   "--mini-batch", "8", "--iters", "1", "--warmup", "0"])
  out, err = capsys.readouterr()
  result = json.loads(out)
  lines = err.splitlines()[-8:]
  assert lines[0].startswith("ttt: one TTT-Linear layer (mamba), batch 1 x seq 16, width 16")
  assert lines[1].split()[:3] == ["variant", "median", "ms"]
  assert [line.split()[0] for line in lines[2:7]] == list(result["results"])
  assert lines[2].split()[1] == f"{result['results']['dual_fwd_bwd']['median_ms']:.3f}"
  assert lines[1].split()[-5:] == ["XLA", "flops", "XLA", "bytes", "temp"]
  for name, r in result["results"].items():  # XLA's view of every compiled variant
    assert r["xla_flops"] > 0 and r["xla_bytes_accessed"] > 0 and r["temp_bytes"] > 0, name
  dual = result["results"]["dual_fwd_bwd"]
  assert lines[2].endswith(bench_common.human_bytes(dual["temp_bytes"]))
  assert dual["xla_flops"] > result["results"]["dual_fwd"]["xla_flops"]  # + the backward
  assert lines[7].startswith(f"dual form vs primal: {result['dual_speedup_fwd_bwd']:.2f}x")


def test_lora_sizes_follow_the_trainable_count_arithmetic():
  cfg = load_config(str(REPO / "configs" / "quickstart.yaml"), TINY + ["lora.rank=2"])
  sizes = bench_lora.sizes(cfg, sharding.make_mesh(cfg.mesh))
  # Full: every parameter of the 1-layer d32 model (tied embeddings, SwiGLU d_ff 64).
  d, ff, vocab = 32, 64, 64
  assert sizes["full"]["trainable"] == vocab * d + 4 * d * d + 3 * d * ff + 3 * d
  # LoRA: r * (in + out) per adapted matrix (wq wk wv wo: 32 -> 32; FFN: 32 <-> 64).
  assert sizes["lora"]["trainable"] == 2 * (4 * (d + d) + 3 * (d + ff))
  for name in bench_lora.VARIANTS:  # AdamW: two float32 moments per trainable parameter
    counters = sizes[name]["opt_state_bytes"] - 2 * 4 * sizes[name]["trainable"]
    assert 0 <= counters <= 16, name  # the optimizer's int32 step counters
  ratio = sizes["lora"]["opt_state_bytes"] / sizes["full"]["opt_state_bytes"]
  assert ratio == pytest.approx(sizes["lora"]["trainable"] / sizes["full"]["trainable"], rel=1e-3)


def test_lora_summary_pairs_rounds_and_reports_both_targets():
  def run(times):
    return {"times": times, "switch_times": [5.0], "compile_s": 1.0, "peak_bytes": 10}
  # 2 replicas x 2 rounds x 2 steps; per-round LoRA / full: 1.0, 1.2 (replica 0), 0.5, 0.5.
  runs = {("full", 0): run([1.0, 1.0, 1.0, 1.0]), ("lora", 0): run([1.0, 1.0, 1.2, 1.2]),
          ("full", 1): run([2.0] * 4), ("lora", 1): run([1.0] * 4)}
  sizes = {"full": {"trainable": 1000, "opt_state_bytes": 8008},
           "lora": {"trainable": 100, "opt_state_bytes": 808}}
  result = bench_lora.lora_summary(runs, steps=2, sizes=sizes)
  assert result["variants"]["lora"] == {
      "step_time_median_s": 1.0, "step_time_min_s": 1.0, "switch_step_time_median_s": 5.0,
      "trainable": 100, "opt_state_bytes": 808, "peak_bytes": 10, "xla_flops": None,
      "compile_s": 1.0}
  assert result["variants"]["full"]["step_time_median_s"] == 1.5
  assert result["step_time_ratio"] == pytest.approx(1 / 1.5)
  paired = result["step_time_ratio_paired"]
  assert paired["pairs"] == 4 and paired["mean"] == pytest.approx(0.8)
  assert paired["median"] == pytest.approx(0.75)
  assert result["opt_state_bytes_ratio"] == pytest.approx(808 / 8008)
  assert result["trainable_ratio"] == pytest.approx(0.1)
  assert result["meets_step_time_target"] and result["meets_opt_bytes_target"]
  slow = bench_lora.lora_summary({**runs, ("lora", 1): run([2.4] * 4)}, steps=2, sizes=sizes)
  assert not slow["meets_step_time_target"]


@pytest.mark.slow
def test_bench_lora_times_both_variants_of_a_tiny_model(capsys):
  bench_main.main(["lora", "--config", str(REPO / "configs" / "quickstart.yaml"),
                   *(arg for o in TINY for arg in ("--set", o)), "--steps", "1", "--rounds",
                   "2", "--replicas", "1", "--warmup", "0"])
  out, err = capsys.readouterr()
  result = json.loads(out)
  assert set(result["variants"]) == {"full", "lora"}
  for variant in result["variants"].values():
    assert 0 < variant["step_time_min_s"] <= variant["step_time_median_s"]
    assert variant["compile_s"] > 0 and variant["peak_bytes"] > 0 and variant["xla_flops"] > 0
  assert result["step_time_ratio_paired"]["pairs"] == 2
  assert result["trainable_ratio"] < 1 and result["opt_state_bytes_ratio"] < 1
  lines = err.splitlines()
  assert lines[-1].startswith(f"LoRA / full: step time {result['step_time_ratio']:.3f}x")
  assert [line.split()[0] for line in lines[-3:-1]] == ["full", "lora"]


def test_sdft_summary_splits_the_step_into_its_parts():
  times = {"generate": [0.5, 0.4, 0.6], "student": [0.3, 0.2, 0.3], "teacher": [0.1] * 3,
           "step": [1.0, 1.2, 1.1]}
  result = bench_sdft.sdft_summary(times, {name: 2.0 for name in times}, batch=4,
                                   max_new_tokens=8)
  assert list(result["parts"]) == list(bench_sdft.PARTS)
  assert result["parts"]["generate"] == {"time_median_s": 0.5, "time_min_s": 0.4,
                                         "fraction_of_step": 0.5 / 1.1, "samples": 3,
                                         "first_call_s": 2.0}
  assert result["step_time_median_s"] == 1.1
  assert result["other_time_s"] == pytest.approx(1.1 - 0.5 - 0.3 - 0.1)
  assert result["generated_tokens_per_s"] == pytest.approx(4 * 8 / 0.5)


@pytest.mark.slow
def test_bench_sdft_times_each_part_of_a_tiny_sdft_step(capsys):
  bench_main.main(["sdft", "--config", str(REPO / "configs" / "sdft_tiny.yaml"),
                   *(arg for o in TINY[:-1] + ["train.batch_size=2", "sdft.max_new_tokens=4",
                                               "sdft.prompt_width=8", "sdft.teacher_width=16",
                                               "mesh.num_devices=1", "mesh.fsdp=1"]
                     for arg in ("--set", o)), "--steps", "2", "--rounds", "2", "--warmup", "0"])
  out, err = capsys.readouterr()
  result = json.loads(out)
  assert result["benchmark"] == "sdft" and list(result["parts"]) == list(bench_sdft.PARTS)
  for part in result["parts"].values():
    assert 0 < part["time_min_s"] <= part["time_median_s"] and part["samples"] == 4
    assert part["first_call_s"] > 0
  assert result["batch"] == 2 and result["max_new_tokens"] == 4
  assert result["generated_tokens_per_s"] == pytest.approx(
      8 / result["parts"]["generate"]["time_median_s"])
  lines = err.splitlines()
  assert lines[-1].startswith("step - (generate + student + teacher) = ")
  assert [line.split()[0] for line in lines[-5:-1]] == list(bench_sdft.PARTS)


def test_bench_sdft_without_a_run_refuses_a_config_that_decodes_with_its_tokenizer(capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench_main.main(["sdft", "--config", str(REPO / "configs" / "sdft_tiny.yaml"),
                     "--set", "model.mixer={type: cct, d_summary: 8, step_len: 16}",
                     "--set", "data.step_boundaries=semantic", "--set", "data.step_len=16"])
  assert exit_info.value.code != 0
  err = capsys.readouterr().err
  assert err.startswith("error: --init-from: this config decodes with the tokenizer of a "
                        "run (") and err.endswith("give --init-from W\n") and err.count("\n") == 1
