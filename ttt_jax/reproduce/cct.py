"""Study ``cct``: commitment-constrained training vs its attention baseline, with a
passkey task trained into the text.

Claim (CCT): a model that commits each step of its context to a small summary loses
little perplexity against the same model with full attention, its summaries suffice to
recover the step's hidden state, its working memory is much smaller than a KV cache, and
it can still retrieve a fact from several steps back. Arms: ``configs/cct_tiny.yaml``
(fixed steps of ``data.step_len`` = 16 tokens) and ``configs/cct_tiny_baseline.yaml``
(the same model with causal attention, LM objective), same tokens, same seeds.

Passkey documents. Untrained, both tiny models score 0 on passkey retrieval, so the
study adds ``PASSKEY_DOCS`` synthetic documents of the evaluation's own form
(``evals.passkey_prompt``: filler sentences, the key sentence, more filler, the
question, then the key) to ``data.corpus``, next to the corpus the arms already name.
They are generated from ``CORPUS_SEED`` into ``OUT/passkey/passkey.jsonl`` (the same
file for every arm and seed, so both arms share one tokenizer, trained on the whole train
split, and one eval set). Every document has its own key, and at least
``2 * STEP_LEN`` words (each at least one token: sentencepiece never merges across
spaces) of filler between the key sentence and the question, so the key lies at least
two CCT steps before the question and reaches it only through the commitment summaries.
The eval prompts use keys no training document has (``heldout_keys``).

Budget: 120 steps of 16 x 128 tokens (12 warmup), 4 eval batches: the tiny configs'
300 steps trimmed so that 3 seeds of both arms take about 10 minutes on an idle 2-vCPU
machine (CCT steps cost about twice the baseline's: two forward passes).

Measured per run (``measure``, a few seconds each): the final eval loss; passkey
accuracy on ``PASSKEY_TRIALS`` held-out prompts of ``PASSKEY_LENGTH`` tokens at each of
``PASSKEY_DEPTHS`` (both arms); for the CCT arm the sufficiency probe R^2 with its
brackets (random projection of the head input, shuffled summaries) and the
summary-ablation delta loss on ``SUFFICIENCY_BATCHES`` validation batches, and the
working-memory compression ratio at ``COMPRESSION_CONTEXT`` tokens. ``report`` adds the
perplexity delta of CCT against the baseline of the same seed,
100 (exp(loss_cct - loss_base) - 1) %, and the paired differences CCT - baseline.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ttt_jax.cct import evals
from ttt_jax.config import Config, load_config
from ttt_jax.reproduce import stats
from ttt_jax.reproduce.runner import Arm, Study, values

BASELINE = Arm("baseline", "cct_tiny_baseline.yaml")
CCT = Arm("cct", "cct_tiny.yaml")
STEP_LEN = 16
"""The arms' fixed CCT step (``data.step_len``, ``model.mixer.step_len``)."""
CORPUS_SEED = 0
PASSKEY_DOCS = 16000
"""About 1.4M tokens: a quarter of the train split next to the stdlib's 3.75M."""
KEY_RANGE = (10000, 100000)
"""Keys are five-digit numbers, as in ``evals.passkey_report``."""
FILLER = tuple(s + ". " for s in evals.PASSKEY_FILLER.strip().rstrip(".").split(". "))
"""The filler sentences of ``evals.passkey_prompt``, cycled in this order."""
MAX_BEFORE = 4
"""Filler sentences before the key: 0..MAX_BEFORE."""
MAX_EXTRA_AFTER = 3
"""Filler sentences after the key beyond those that make the 2-step gap: 0..this."""
PASSKEY_FILE = "passkey/passkey.jsonl"
PASSKEY_LENGTH = 96
PASSKEY_DEPTHS = (0.0, 0.2, 0.4)
"""Key positions of the eval prompts: each leaves at least 2 steps of filler after it."""
PASSKEY_TRIALS = 4
SUFFICIENCY_BATCHES = 4
COMPRESSION_CONTEXT = 1024


def words(text: str) -> int:
  return len(text.split())


def passkey_document(key: int, before: int, after: int) -> str:
  """``before`` filler sentences, the key sentence, ``after`` more, the question and the
  key: ``evals.passkey_prompt``'s form followed by its answer."""
  filler = [FILLER[i % len(FILLER)] for i in range(before + after)]
  return ("".join(filler[:before]) + evals.PASSKEY_KEY.format(key=key)
          + "".join(filler[before:]) + f"{evals.PASSKEY_QUESTION} {key}.")


def gap_sentences(before: int, min_words: int) -> int:
  """The fewest filler sentences after the first ``before`` with ``min_words`` words."""
  count, total = 0, 0
  while total < min_words:
    total += words(FILLER[(before + count) % len(FILLER)])
    count += 1
  return count


def passkey_keys(seed: int = CORPUS_SEED, count: int = PASSKEY_DOCS) -> np.ndarray:
  """The distinct keys of the training documents."""
  low, high = KEY_RANGE
  return np.random.default_rng([seed, 0]).choice(high - low, count, replace=False) + low


def passkey_documents(seed: int = CORPUS_SEED, count: int = PASSKEY_DOCS,
                      min_gap_words: int = 2 * STEP_LEN) -> list[tuple[int, str]]:
  """(key, text) of ``count`` training documents, a function of ``seed`` alone."""
  rng = np.random.default_rng([seed, 1])
  documents = []
  for key in passkey_keys(seed, count):
    before = int(rng.integers(0, MAX_BEFORE + 1))
    after = gap_sentences(before, min_gap_words) + int(rng.integers(0, MAX_EXTRA_AFTER + 1))
    documents.append((int(key), passkey_document(int(key), before, after)))
  return documents


def heldout_keys(seed: int, count: int) -> tuple[int, ...]:
  """``count`` distinct keys of run seed ``seed`` that no training document has."""
  pool = np.setdiff1d(np.arange(*KEY_RANGE), passkey_keys())
  return tuple(int(k) for k in
               np.random.default_rng([CORPUS_SEED, 2, seed]).choice(pool, count, replace=False))


def prepare(out: Path, cfg: Config) -> tuple[str, ...]:
  """Writes the passkey corpus into ``out`` (unless it is already there) and adds it to
  ``data.corpus``."""
  path = (Path(out) / PASSKEY_FILE).resolve()
  text = "".join(json.dumps({"text": doc}) + "\n" for _, doc in passkey_documents())
  if not path.is_file() or path.read_text() != text:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)
  return ("data.corpus=" + json.dumps([*cfg.data.corpus, str(path)]),)


def measure(workdir: Path) -> dict[str, Any]:
  """Passkey accuracy on held-out keys; for CCT also sufficiency and compression."""
  cfg = load_config(f"{workdir}/config.yaml", [], legacy=True)
  cells = len(PASSKEY_DEPTHS) * PASSKEY_TRIALS
  passkey = evals.run_passkey(workdir, [], [PASSKEY_LENGTH], list(PASSKEY_DEPTHS),
                              PASSKEY_TRIALS, heldout_keys(cfg.train.seed, cells))
  row = passkey["lengths"][str(PASSKEY_LENGTH)]
  result: dict[str, Any] = {"passkey_accuracy": row["accuracy"],
                            "passkey_by_depth": row["by_depth"]}
  if cfg.model.mixer.type == "cct":
    sufficiency = evals.run_sufficiency(workdir, [], SUFFICIENCY_BATCHES)
    compression = evals.run_compression(workdir, [], [COMPRESSION_CONTEXT])
    result.update(
        sufficiency_r2=sufficiency["sufficiency_probe_r2"],
        random_projection_r2=sufficiency["random_projection_r2"],
        shuffled_summary_r2=sufficiency["shuffled_summary_r2"],
        ablation_delta_loss=sufficiency["summary_ablation"]["delta_loss"],
        compression_ratio=compression["contexts"][COMPRESSION_CONTEXT]["ratio"])
  return result


def perplexity_delta(results: dict[str, Any]) -> list[float]:
  """Per seed: CCT's perplexity over the baseline's, minus 1, in percent."""
  return [100.0 * (math.exp(c - b) - 1.0) for b, c in
          zip(values(results, BASELINE.name, "eval_loss"), values(results, CCT.name, "eval_loss"))]


CCT_MEASURES = (("sufficiency_r2", "sufficiency probe R²"),
                ("random_projection_r2", "random projection R²"),
                ("shuffled_summary_r2", "shuffled summaries R²"),
                ("ablation_delta_loss", "summary ablation Δ loss"),
                ("compression_ratio", f"compression @ {COMPRESSION_CONTEXT}"))
PAIRED = (("eval_loss", "eval loss"), ("passkey_accuracy", "passkey accuracy"))


def report(results: dict[str, Any]) -> str:
  """Per-arm means ± SE, CCT's own measures, then the paired differences CCT - baseline."""
  fmt = stats.format_mean_se
  arms = [BASELINE.name, CCT.name]
  depths = [str(d) for d in PASSKEY_DEPTHS]
  rows = [[arm, str(values(results, arm, "n_params")[0]),
           fmt(stats.mean_se(values(results, arm, "eval_loss"))),
           fmt(stats.mean_se(values(results, arm, "passkey_accuracy")), 3)]
          + [fmt(stats.mean_se([v[d] for v in values(results, arm, "passkey_by_depth")]), 3)
             for d in depths] for arm in arms]
  ours = [["perplexity Δ vs baseline (%)", fmt(stats.mean_se(perplexity_delta(results)), 2,
                                                 signed=True)]]
  ours += [[label, fmt(stats.mean_se(values(results, CCT.name, key)), 3)]
           for key, label in CCT_MEASURES]
  paired = [[label, fmt(stats.paired_difference(values(results, BASELINE.name, key),
                                                values(results, CCT.name, key)), 4,
                        signed=True)] for key, label in PAIRED]
  seeds, steps = len(results["seeds"]), results["schedule"]["steps"]
  return "\n".join([
      f"### cct: {seeds} seeds, {steps} steps of 16 x 128 tokens, passkey documents in "
      "the text", "",
      f"Eval loss and passkey accuracy on {len(depths) * PASSKEY_TRIALS} held-out prompts "
      f"of {PASSKEY_LENGTH} tokens (mean ± SE over seeds), overall and by key depth:", "",
      stats.markdown_table(["arm", "params", "eval loss", "passkey accuracy"]
                           + [f"passkey @ depth {d}" for d in depths], rows), "",
      "CCT's measures (mean ± SE over seeds; R² of a linear probe from a step's summary "
      "to its mean hidden state, with its brackets):", "",
      stats.markdown_table(["CCT measure", "value"], ours), "",
      stats.markdown_table(["paired difference cct - baseline", "value"], paired), ""])


STUDY = Study(
    name="cct", summary="CCT vs its attention baseline with a passkey task in the text: "
                        "eval loss, perplexity delta, sufficiency, compression, passkey",
    arms=(BASELINE, CCT), steps=120, warmup_steps=12, eval_batches=4, report=report,
    measure=measure, prepare=prepare)
