"""SDFT end to end on the synthetic key-value kit (``ttt_jax.data.keyvalue``): a tiny
model pretrained to copy a demonstration, not the secret mapping, has a teacher that
knows much more than its student; SDFT (``ttt_jax.sdft``, ``configs/sdft_keyvalue.yaml``)
with the kit's demonstrations, full fine-tuning and LoRA, teaches the student the
mapping on held-out key combinations (exact match >= 80% or at least half the initial
teacher gain closed) while the held-out general loss rises by at most 0.05 nats. The SFT
baseline on the same data runs beside each for comparison (printed, not asserted: its
acceptance is tests/test_keyvalue.py's)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ttt_jax import train as train_lib
from ttt_jax.config import load_config
from ttt_jax.data import keyvalue as kv
from ttt_jax.sdft import __main__ as sdft_cli

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "configs" / "keyvalue_tiny.yaml")
SDFT = str(REPO / "configs" / "sdft_keyvalue.yaml")
LORA = ["lora.enabled=true", "optim.lr=7e-4", "train.steps=300", "checkpoint.every=300"]
"""The LoRA run's settings on top of the config (its full fine-tuning's)."""
MIN_GAIN, MAX_MATCH_BEFORE = 1.0, 0.1
MIN_MATCH, MIN_CLOSED, MAX_FORGETTING = 0.8, 0.5, 0.05


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """(kit, cache, base run, its measurements): the kit's model pretrained once for the
  module."""
  root = tmp_path_factory.mktemp("sdft_e2e")
  kit, cache = root / "kit", root / "cache"
  kv.write_kit(kit, seed=0)
  train_lib.train(load_config(PRETRAIN, kv.pretrain_overrides(kit, cache)), root / "base")
  before = kv.measure(root / "base", kit)
  return kit, cache, root / "base", before


def closed(before: dict[str, float], after: dict[str, float]) -> float:
  """The fraction of the initial teacher gain the student closed: its rise in
  log p(answer | prompt) over the gain before."""
  return (after["student_log_prob"] - before["student_log_prob"]) / before["gain"]


def row(name: str, before: dict[str, float], after: dict[str, float], wall: float) -> str:
  return (f"| {name} | {before['exact_match']:.3f} -> {after['exact_match']:.3f} | "
          f"{closed(before, after):.3f} | {after['general_loss'] - before['general_loss']:+.4f} "
          f"| {wall:.1f} s |")


@pytest.mark.slow
def test_the_pretrained_teacher_knows_what_the_student_does_not(pretrained):
  *_, before = pretrained
  print(f"pretrained: {before}")
  assert before["gain"] >= MIN_GAIN
  assert before["exact_match"] <= MAX_MATCH_BEFORE


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sdft_learns_the_mapping_and_keeps_the_general_loss(pretrained, tmp_path, lora):
  kit, cache, base, before = pretrained
  cfg = load_config(SDFT, [f"sdft.data={kit / 'demos.jsonl'}", f"checkpoint.init_from={base}",
                           f"data.corpus=[{kit / 'general_test.jsonl'}]",
                           f"data.cache_dir={cache}", *(LORA if lora else [])])
  start = time.perf_counter()
  sdft_cli.sdft(cfg, tmp_path / "sdft")
  sdft_wall = time.perf_counter() - start
  after = kv.measure(tmp_path / "sdft", kit)

  start = time.perf_counter()  # the SFT baseline on the same demonstrations
  train_lib.train(load_config(PRETRAIN, kv.sft_overrides(kit, cache, base, lora=lora)),
                  tmp_path / "sft")
  sft_wall = time.perf_counter() - start
  sft = kv.measure(tmp_path / "sft", kit)
  kind = "LoRA" if lora else "full"
  print(f"\nSDFT {kind}: {after}\nSFT {kind}: {sft}\n"
        "| run | exact match | teacher gain closed | general loss change | wall |\n"
        + row(f"SDFT {kind}", before, after, sdft_wall) + "\n"
        + row(f"SFT {kind}", before, sft, sft_wall))
  assert after["exact_match"] >= MIN_MATCH or closed(before, after) >= MIN_CLOSED
  assert after["general_loss"] - before["general_loss"] <= MAX_FORGETTING
