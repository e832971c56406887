"""Metric sinks and the MFU denominator."""

from __future__ import annotations

import json

import jax
import numpy as np

from ttt_jax import metrics


def _mesh(n: int) -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.asarray(jax.devices()[:n]).reshape(n), ("data",))


def test_configured_peak_is_per_device_and_scales_with_the_mesh():
  for n in (1, 4, 8):
    peak, source = metrics.mesh_peak_flops(2.5e12, _mesh(n))
    assert (peak, source) == (n * 2.5e12, "config")


def test_measured_cpu_peak_is_per_host_not_per_simulated_device():
  # the 8 simulated CPU devices share one process's cores: the peak must not grow 8x
  assert jax.devices()[0].device_kind not in metrics.PEAK_FLOPS_BY_KIND
  one, source = metrics.mesh_peak_flops(0.0, _mesh(1))
  eight, source8 = metrics.mesh_peak_flops(0.0, _mesh(8))
  assert source.startswith("measured f32 matmul") and source.endswith("(per host)")
  assert source8 == source
  # two independent best-of-5 measurements: equal up to timing noise, not 8x apart
  assert 0.2 < eight / one < 5.0


def test_measured_peak_is_a_plausible_matmul_rate():
  rate = metrics.measure_peak_flops(size=256, repeats=3)
  assert 1e8 < rate < 1e14


def test_writer_rows_tags_and_truncation_on_resume(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, tensorboard=True, enabled=True)
  for step in (1, 2, 3):
    writer.write(step, {"loss": np.float32(4.0 - step), "mfu": jax.numpy.asarray(0.25),
                        "ttt/inner_loss": 1.5})
  writer.write(3, {"eval_loss": 2.0})
  writer.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 3]
  assert rows[0] == {"step": 1, "loss": 3.0, "mfu": 0.25, "ttt/inner_loss": 1.5}
  assert all(type(v) in (int, float) for r in rows for v in r.values())
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert [metrics._tag(k) for k in ("loss", "mfu", "eval_loss", "ttt/inner_loss", "ce")] == [
      "train/loss", "perf/mfu", "eval/loss", "ttt/inner_loss", "train/ce"]

  # a run resumed from step 1 drops what the interrupted run logged after it
  resumed = metrics.MetricsWriter(tmp_path, tensorboard=False, enabled=True, resume_step=1)
  resumed.write(2, {"loss": 9.0})
  resumed.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r.get("loss")) for r in rows] == [(1, 3.0), (2, 9.0)]


def test_a_row_a_kill_cut_short_is_dropped_on_resume(tmp_path):
  """A process killed mid-write leaves a torn last line; the resume drops it (and any
  other line that is no row) instead of tripping on it."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n\n[1]\n'
                  '{"step": "x"}\n{"step": 3, "lo')
  resumed = metrics.MetricsWriter(tmp_path, tensorboard=False, enabled=True, resume_step=2)
  resumed.write(3, {"loss": 1.0})
  resumed.close()
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 3.0), (2, 2.0), (3, 1.0)]
  assert not list(tmp_path.glob("*.tmp"))


def test_a_disabled_writer_writes_nothing(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, tensorboard=True, enabled=False, resume_step=0)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not list(tmp_path.iterdir())



def test_non_finite_values_are_written_as_null_and_the_file_is_strict_json(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, tensorboard=True, enabled=True)
  writer.write(1, {"loss": np.float32("nan"), "lr": float("inf"), "grad_norm": -np.inf,
                   "ttt/per_layer": [1.0, float("nan")], "mfu": 0.5})
  writer.close()
  text = (tmp_path / "metrics.jsonl").read_text()

  def refuse(constant):
    raise ValueError(f"bare {constant} in metrics.jsonl")

  rows = [json.loads(line, parse_constant=refuse) for line in text.splitlines()]
  assert rows == [{"step": 1, "loss": None, "lr": None, "grad_norm": None,
                   "ttt/per_layer": [1.0, None], "mfu": 0.5}]


ROW = {"loss": 3.41234, "lr": 8.1234e-4, "grad_norm": 0.93, "tokens_per_sec": 41234.0,
       "step_time_s": 0.2, "mfu": 0.03123}


def test_a_train_row_is_one_plain_line_of_rounded_numbers():
  assert metrics.train_line(120, 300, ROW, 72.4) == (
      "step 120/300 loss 3.412 lr 8.1e-04 gnorm 0.930 tok/s 41.2k mfu 3.1% eta 1m12s")
  assert metrics.train_line(7, 9, {**ROW, "skipped_steps": 2.0}, 0.5).endswith(
      "eta 0.5s skipped 2")
  assert metrics.eval_line(30, 60, {"eval_loss": 4.1234, "eval_ppl": 61.75,
                                    "eval_bpb": 1.2}) == (
      "eval step 30/60 loss 4.123 ppl 61.75 bpb 1.200")


def test_durations_and_counts_read_as_a_human_writes_them():
  assert [metrics.format_duration(s) for s in (0.04, 59.9, 61, 3599, 3600 * 5 + 300)] == [
      "0.0s", "59.9s", "1m01s", "59m59s", "5h05m"]
  assert metrics.format_duration(float("inf")) == "?"
  assert [metrics.format_count(x) for x in (812, 41234, 3.05e6, 1.2e9)] == [
      "812", "41.2k", "3.05M", "1.2G"]


def test_the_summary_names_steps_times_losses_and_the_checkpoint(tmp_path):
  lines = metrics.summary_lines(
      start_step=20, final_step=60, total_steps=60, wall_s=83.0, setup_s=12.5, loss=3.4,
      eval_step=60, eval_row={"eval_loss": 3.5, "eval_ppl": 33.1, "eval_bpb": 1.25},
      checkpoint=tmp_path / "checkpoints" / "60")
  assert lines == [
      "done: 40 steps (step 20 -> 60 of 60) in 1m23s (set-up 12.5s, training 1m10s)",
      "final loss 3.400; eval at step 60: loss 3.500 bpb 1.250",
      f"checkpoint: {tmp_path}/checkpoints/60"]
  assert metrics.summary_lines(start_step=0, final_step=1, total_steps=5, wall_s=1.0,
                               setup_s=0.5, loss=None, eval_step=None, eval_row=None,
                               checkpoint=None) == [
      "done: 1 step (step 0 -> 1 of 5) in 1.0s (set-up 0.5s, training 0.5s)",
      "checkpoint: none saved"]
