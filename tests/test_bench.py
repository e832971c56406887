"""ttt_jax.bench: the mHC comparison's statistics on a tiny model, and its argument errors."""

import subprocess
import sys
from pathlib import Path

from ttt_jax import bench
from ttt_jax.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
        "data.seq_len=16", "data.vocab_size=64", "train.batch_size=8", "mesh.data=8"]


def test_bench_mhc_times_every_replica_and_pairs_them():
  cfg = load_config(str(REPO / "configs" / "bench_dense.yaml"), TINY)
  result = bench.bench_mhc(cfg, steps=2, warmup=0, rounds=3, reference_tokens_per_sec=100.0,
                           replicas=2)
  assert set(result["variants"]) == set(bench.MHC_VARIANTS)
  for variant in result["variants"].values():
    medians = variant["replica_step_time_medians_s"]
    assert len(medians) == 2 and all(m > 0 for m in medians)
    assert variant["step_time_min_s"] <= min(medians)
    assert variant["switch_step_time_median_s"] > 0
    assert variant["replica_spread"] == (max(medians) - min(medians)) / variant[
        "step_time_median_s"]
  assert result["identical_program_spread"] == max(
      v["replica_spread"] for v in result["variants"].values())
  for key in ("overhead_paired", "overhead_remat_paired"):
    paired = result[key]
    assert paired["rounds"] == 3 and paired["replicas"] == 2
    assert len(paired["per_replica"]) == 2
    assert abs(sum(paired["per_replica"]) / 2 - paired["mean"]) < 1e-12
  assert result["mhc_peak_bytes_remat_vs_none"] > 0
  assert result["speedup_vs_pytorch_reference_remat_median"] == (
      result["variants"]["mhc_remat"]["tokens_per_sec_median"] / 100.0)


def test_bench_mhc_rejects_a_bad_count_in_one_line():
  proc = subprocess.run([sys.executable, "-m", "ttt_jax.bench", "mhc", "--replicas", "0"],
                        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip() == "error: --replicas: must be >= 1, got 0"
