"""Evaluations of the CCT thesis (``python -m ttt_jax.evaluate --task ...``).

- ``sufficiency``: per layer, R^2 of a linear probe from each complete step's commitment
  summary c_s to the step's mean hidden state (the layer's normed input), fitted by
  gradient descent on 70% of held-out (validation-split) steps with early stopping on
  15%, scored on the last 15%:  R^2 = 1 - sum (y - y^)^2 / sum (y - mean_test y)^2.
  Brackets: the same probe from a random Gaussian projection, of the same width, of the
  head's input (the step's full last-token hidden state), and from summaries shuffled
  across steps (lower bound). Also the summary-ablation delta loss: validation loss with
  every injected summary zeroed minus the loss with them.
- ``compression``: live decode-state bytes (sum of ``nbytes`` of every array of the
  state after actually decoding L tokens) of the CCT working memory against a causal
  attention KV cache of the same model shape, at several contexts.
- ``passkey``: the standard passkey-retrieval prompt (``passkey_prompt``), greedy
  decoding (a run with semantic steps decodes with them: ``cct.StepRule``), accuracy by
  length and depth.
- ``perplexity``: validation perplexity of the CCT run (every boundary committed) and of
  a baseline run, and the delta in percent.

Each task, ``governance`` and ``all`` too, registers itself in ``registry.EVAL_TASKS``
with its own flags (end of this module).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ttt_jax.cct import chain as cct_chain
from ttt_jax.cct import mixer as cct
from ttt_jax.cct.decode import semantic_annotator, semantic_steps
from ttt_jax.config import ModelConfig, load_config
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.data import pipeline
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.eval import tasks
from ttt_jax.eval.lm import evaluate_lm
from ttt_jax.inference.sampling import DecodeInputs, generate
from ttt_jax.models import lm
from ttt_jax.models.context import SequenceContext, default_positions
from ttt_jax.models.mixers.attention import AttentionConfig
from ttt_jax.runs import load_trained

PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_KEY = "The pass key is {key}. Remember it. {key} is the pass key. "
"""The key sentence (``str.format(key=...)``)."""

TIER1_CRITERIA = {"sufficiency_probe_r2": (">", 0.85), "perplexity_delta_pct": ("<", 10.0),
                  "compression_ratio_4k": (">", 50.0), "passkey_accuracy_1k": (">", 0.90),
                  "passkey_accuracy_4k": (">", 0.70)}
"""The guide's Tier-1 pass criteria (perplexity delta in percent)."""


# ----------------------------------------------------------------------------- probes


def r2_score(target_NxD: np.ndarray, predicted_NxD: np.ndarray) -> float:
  """1 - SSE / SST over all features, SST around the per-feature mean of the target."""
  sse = float(np.sum((target_NxD - predicted_NxD) ** 2))
  sst = float(np.sum((target_NxD - target_NxD.mean(axis=0)) ** 2))
  return 1.0 - sse / max(sst, 1e-12)


def fit_linear_probe(x_NxS: np.ndarray, y_NxD: np.ndarray, *, seed: int = 0,
                     max_epochs: int = 2000, patience: int = 50, lr: float = 1e-2
                     ) -> dict[str, float]:
  """Linear probe y ~ x W + b by full-batch Adam on a 70/15/15 split of the rows, early
  stopped on the middle 15%; R^2 on the last 15% (and on the fitting rows)."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(x_NxS))
  n_fit, n_stop = int(0.7 * len(order)), int(0.15 * len(order))
  fit, stop, test = order[:n_fit], order[n_fit:n_fit + n_stop], order[n_fit + n_stop:]
  x_mean, x_std = x_NxS[fit].mean(0), x_NxS[fit].std(0) + 1e-6
  xs = jnp.asarray((x_NxS - x_mean) / x_std, jnp.float32)
  ys = jnp.asarray(y_NxD, jnp.float32)
  params = {"w": jnp.zeros((x_NxS.shape[1], y_NxD.shape[1])), "b": jnp.asarray(y_NxD[fit].mean(0))}
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  def mse(p, rows):
    return jnp.mean(jnp.square(xs[rows] @ p["w"] + p["b"] - ys[rows]))

  @jax.jit
  def update(p, s):
    grads = jax.grad(mse)(p, fit)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, mse(p, stop)

  best, best_params, since = math.inf, params, 0
  for _ in range(max_epochs):
    params, opt_state, stop_loss = update(params, opt_state)
    stop_loss = float(stop_loss)
    if stop_loss < best - 1e-7:
      best, best_params, since = stop_loss, params, 0
    else:
      since += 1
      if since >= patience:
        break
  predict = lambda rows: np.asarray(xs[rows] @ best_params["w"] + best_params["b"])  # noqa: E731
  return {"r2_test": r2_score(y_NxD[test], predict(test)),
          "r2_fit": r2_score(y_NxD[fit], predict(fit)),
          "n_fit": int(len(fit)), "n_test": int(len(test))}


def collect_steps(model: lm.LM, batches: list[dict[str, np.ndarray]], step_len: int
                  ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """Per layer, the complete steps' summaries, head inputs and mean hidden states over
  ``batches`` (every boundary committed), plus the validation loss with and without
  the summaries."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, inputs, targets, step_ids, segment_ids):
    m = nnx.merge(graphdef, state)
    logits, aux = cct.logits_and_summaries(m, inputs, step_ids, segment_ids_BxT=segment_ids)
    zero_logits, _ = cct.logits_and_summaries(m, inputs, step_ids, "zero", segment_ids)
    in_model = jnp.einsum("lbns,lsd->lbnd", aux.summary_BxNxS,
                          m.blocks.mixer.probe_w[...]) + m.blocks.mixer.probe_b[...][:, None, None]
    return (aux, in_model, lm.cross_entropy_loss(logits, targets)[1],
            lm.cross_entropy_loss(zero_logits, targets)[1])

  rows: dict[str, list] = {"summary": [], "head_input": [], "mean": [], "in_model": []}
  nll, zero_nll, n_tokens = 0.0, 0.0, 0
  for batch in batches:
    step_ids = batch.get("step_ids")
    if step_ids is None:
      step_ids = np.asarray(cct.fixed_step_ids(default_positions(batch["inputs"]), step_len))
    segments = cct.commitment_segments(jnp.asarray(step_ids), jnp.ones(step_ids.shape, bool))
    aux, in_model, batch_nll, batch_zero = run(state, batch["inputs"], batch["targets"], segments,
                                               batch.get("segment_ids"))
    keep = np.asarray(aux.complete_BxN[0])  # the same for every layer
    rows["summary"].append(np.asarray(aux.summary_BxNxS)[:, keep])
    rows["head_input"].append(np.asarray(aux.head_input_BxNxD)[:, keep])
    rows["mean"].append(np.asarray(aux.step_mean_BxNxD)[:, keep])
    rows["in_model"].append(np.asarray(in_model)[:, keep])
    nll, zero_nll = nll + float(batch_nll), zero_nll + float(batch_zero)
    n_tokens += batch["targets"].size
  steps = {k: np.concatenate(v, axis=1) for k, v in rows.items()}  # [layers, steps, ...]
  loss = {"loss": nll / n_tokens, "loss_summaries_zeroed": zero_nll / n_tokens}
  return steps, loss


def sufficiency_report(steps: dict[str, np.ndarray], loss: dict[str, float], seed: int = 0
                       ) -> dict[str, Any]:
  layers = []
  rng = np.random.default_rng(seed)
  for layer in range(steps["summary"].shape[0]):
    summary, target = steps["summary"][layer], steps["mean"][layer]
    head_input = steps["head_input"][layer]
    width = summary.shape[1]
    projection = rng.normal(size=(head_input.shape[1], width)) / math.sqrt(head_input.shape[1])
    shuffled = summary[rng.permutation(len(summary))]
    layers.append({
        "layer": layer,
        "summary_probe": fit_linear_probe(summary, target, seed=seed),
        "random_projection_probe": fit_linear_probe(head_input @ projection, target, seed=seed),
        "shuffled_summary_probe": fit_linear_probe(shuffled, target, seed=seed),
        "in_model_probe_r2": r2_score(target, steps["in_model"][layer]),
    })
  mean = lambda key: float(np.mean([row[key]["r2_test"] for row in layers]))  # noqa: E731
  return {
      "sufficiency_probe_r2": mean("summary_probe"),
      "random_projection_r2": mean("random_projection_probe"),
      "shuffled_summary_r2": mean("shuffled_summary_probe"),
      "in_model_probe_r2": float(np.mean([row["in_model_probe_r2"] for row in layers])),
      "n_steps": int(steps["summary"].shape[1]),
      "d_summary": int(steps["summary"].shape[2]),
      "summary_ablation": {**loss, "delta_loss": loss["loss_summaries_zeroed"] - loss["loss"]},
      "layers": layers,
  }


# ----------------------------------------------------------------------------- memory


def decode_state_bytes(cfg: ModelConfig, vocab_size: int, context: int, *, chunk: int,
                       decode_tokens: int = 0, seed: int = 0,
                       step_ids_T: np.ndarray | None = None) -> dict[str, Any]:
  """Decodes ``context`` random tokens (chunks of ``chunk``; only the first
  ``decode_tokens`` if nonzero) into a decode state sized for ``context`` of a randomly
  initialised model of ``cfg``, and returns the bytes of every array of the state then
  held (the measured live state), with the wall time. Both caches here have static
  shapes fixed at ``init_cache(max_len=context)``, so decoding fewer tokens changes
  what the arrays hold, not their size.

  ``step_ids_T`` (CCT with semantic steps): the context's step ids, from the run's step
  rule on real text. The summary buffer then has a slot per step of that text plus one,
  as fixed steps have (``CCTAttention.init_cache``), and each chunk ends at the first
  step boundary at least ``chunk`` tokens after its start."""
  model = lm.LM(cfg, vocab_size, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, cache, tokens_BxC, start, step_ids_BxC):
    m = nnx.merge(graphdef, state)
    side = {} if step_ids_BxC is None else {cct.STEP_IDS: step_ids_BxC}
    ctx = SequenceContext(default_positions(tokens_BxC, start), side=side)
    logits, cache = m.decode(tokens_BxC, ctx, cache)
    return logits[:, -1], cache

  decoded = min(decode_tokens or context, context)
  tokens = np.random.default_rng(seed).integers(0, vocab_size, (1, decoded), np.int32)
  if step_ids_T is None:
    cache = model.init_cache(1, context)
    bounds = list(range(0, decoded, chunk)) + [decoded]
  else:
    if len(step_ids_T) != context:
      raise ValueError(f"step ids for {len(step_ids_T)} tokens, context {context}")
    cache = model.init_cache(1, context, {"max_steps": int(step_ids_T[-1]) + 2})
    starts = np.flatnonzero(np.diff(step_ids_T[:decoded], prepend=-1))  # step starts
    bounds = [0]
    while bounds[-1] < decoded:
      later = starts[starts >= bounds[-1] + chunk]
      bounds.append(int(later[0]) if later.size else decoded)
  step_ids = (None if step_ids_T is None else
              np.asarray(step_ids_T[None, :decoded], np.int32))
  start_time = time.perf_counter()
  for start, end in zip(bounds[:-1], bounds[1:]):
    _, cache = step(state, cache, tokens[:, start:end], jnp.int32(start),
                    None if step_ids is None else step_ids[:, start:end])
  jax.block_until_ready(cache)
  leaves = jax.tree_util.tree_leaves_with_path(cache)
  summaries = getattr(cache, "summaries_BxNxS", None)  # CCT: [layers, B, slots, S]
  return {"bytes": int(sum(leaf.nbytes for _, leaf in leaves)),
          "summary_slots": None if summaries is None else int(summaries.shape[2]),
          "arrays": {jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype)]
                     for path, leaf in leaves},
          "decoded_tokens": decoded, "decode_s": time.perf_counter() - start_time}


def compression_report(cct_cfg: ModelConfig, vocab_size: int, contexts: list[int],
                       baseline_decode_tokens: int = 0,
                       log: Callable[[str], None] | None = None,
                       step_ids_of: Callable[[int], np.ndarray] | None = None
                       ) -> dict[str, Any]:
  """Measured bytes and ratio (attention KV cache / CCT working memory) per context.
  The CCT state always decodes the whole context; the baseline only its first
  ``baseline_decode_tokens`` if nonzero (its full-context attention is the slow part).
  ``step_ids_of(context)`` (semantic steps): the step ids of a context of real text;
  without it steps are fixed, model.mixer.step_len tokens."""
  log = log or _stderr
  baseline_cfg = dataclasses.replace(cct_cfg, mixer=AttentionConfig())
  rows = {}
  for context in contexts:
    step = cct_cfg.mixer.step_len
    step_ids = step_ids_of(context) if step_ids_of else None
    ours = decode_state_bytes(cct_cfg, vocab_size, context, chunk=step * max(1, 512 // step),
                              step_ids_T=step_ids)
    theirs = decode_state_bytes(baseline_cfg, vocab_size, context, chunk=512,
                                decode_tokens=baseline_decode_tokens)
    rows[context] = {"cct_bytes": ours["bytes"], "baseline_bytes": theirs["bytes"],
                     "ratio": theirs["bytes"] / ours["bytes"], "cct_arrays": ours["arrays"],
                     "baseline_arrays": theirs["arrays"], "cct_decode_s": ours["decode_s"],
                     "baseline_decode_s": theirs["decode_s"],
                     "cct_decoded_tokens": ours["decoded_tokens"],
                     "baseline_decoded_tokens": theirs["decoded_tokens"],
                     "cct_summary_slots": ours["summary_slots"]}
    log(f"compression @ {context}: CCT {ours['bytes']:,} B vs KV cache {theirs['bytes']:,} B "
        f"= {rows[context]['ratio']:.1f}x")
  return {"model": {"n_layers": cct_cfg.n_layers, "d_model": cct_cfg.d_model,
                    "n_heads": cct_cfg.n_heads, "kv_heads": cct_cfg.kv_heads,
                    "dtype": cct_cfg.dtype, "d_summary": cct_cfg.mixer.d_summary,
                    "step_len": cct_cfg.mixer.step_len,
                    "steps": "semantic (the run's rule on its validation text)"
                             if step_ids_of else f"fixed/{cct_cfg.mixer.step_len}"},
          "contexts": rows}


# ----------------------------------------------------------------------------- passkey


def passkey_prompt(tokenizer: Tokenizer, length: int, depth: float, key: int
                   ) -> tuple[list[int], int]:
  """(prompt ids of at most ``length`` tokens, index of the key sentence's first token).

  Filler sentences are repeated; the key sentence is placed after the filler sentence
  nearest to fraction ``depth`` of them; the prompt ends with ``PASSKEY_QUESTION``.
  """
  sentences = [s + ". " for s in PASSKEY_FILLER.strip().rstrip(".").split(". ")]
  key_ids = tokenizer.encode(PASSKEY_KEY.format(key=key))
  question_ids = tokenizer.encode(PASSKEY_QUESTION)
  sentence_ids = [tokenizer.encode(s) for s in sentences]
  budget = length - len(key_ids) - len(question_ids)
  filler: list[list[int]] = []
  used = 0
  while used + len(sentence_ids[len(filler) % len(sentences)]) <= budget:
    filler.append(sentence_ids[len(filler) % len(sentences)])
    used += len(filler[-1])
  if not filler:
    raise ValueError(f"passkey length {length} leaves no room for filler")
  split = int(round(depth * len(filler)))
  before = [t for s in filler[:split] for t in s]
  after = [t for s in filler[split:] for t in s]
  return before + key_ids + after + question_ids, len(before)


def passkey_report(model: lm.LM, tokenizer: Tokenizer, lengths: list[int],
                   depths: list[float], trials: int, seed: int = 0,
                   inputs: tuple[DecodeInputs, ...] = (), keys: tuple[int, ...] = ()
                   ) -> dict[str, Any]:
  """Greedy accuracy: the first generated digits equal the key. ``inputs``: the run's
  decode inputs (CCT with semantic steps; none: fixed steps). ``keys``: the key of every
  trial, length by length and depth by depth (default: drawn from ``seed``)."""
  rng = np.random.default_rng(seed)
  given = iter(keys)
  by_length: dict[str, Any] = {}
  for length in lengths:
    row = {}
    for depth in depths:
      correct = 0
      for _ in range(trials):
        key = next(given) if keys else int(rng.integers(10000, 100000))
        prompt, _ = passkey_prompt(tokenizer, length, depth, key)
        out = generate(model, np.asarray([prompt], np.int32), 8, jax.random.key(0),
                       temperature=0.0, inputs=inputs)
        text = tokenizer.decode(np.asarray(out)[0, len(prompt):].tolist())
        digits = "".join(ch for ch in text.strip().split(" ")[0] if ch.isdigit())
        correct += digits == str(key)
      row[str(depth)] = correct / trials
    by_length[str(length)] = {"by_depth": row, "accuracy": float(np.mean(list(row.values())))}
  return {"trials_per_cell": trials, "lengths": by_length}


# ----------------------------------------------------------------------------- verdict


def tier_verdict(values: dict[str, float | None], criteria: dict[str, tuple[str, float]]
                 ) -> tuple[dict[str, str], str]:
  """PASS/FAIL/NOT MEASURED per criterion, and PASS only if all pass."""
  lines = {}
  for name, (op, threshold) in criteria.items():
    value = values.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
      lines[name] = f"NOT MEASURED (needs {op} {threshold})"
      continue
    ok = value > threshold if op == ">" else value < threshold
    lines[name] = f"{'PASS' if ok else 'FAIL'}: {value:.4g} (needs {op} {threshold})"
  verdict = "PASS" if all(v.startswith("PASS") for v in lines.values()) else "FAIL"
  return lines, verdict


# ----------------------------------------------------------------------------- run level

BASELINE_DECODE_TOKENS = 4096
"""compression: tokens actually decoded into the baseline's (static-shape) KV cache."""
GOVERNANCE_SHAPE = {"batch": 1, "prompt_len": 32, "new_tokens": 256, "rounds": 10}
"""governance: the generation timed with and without the hash chain (the
``bench cct --hash-chain`` defaults), prompts taken from the validation split."""


def _stderr(message: str) -> None:
  print(message, file=sys.stderr)


def _load_model(workdir, overrides):
  cfg, graphdef, params, step, _ = load_trained(workdir, overrides, log=_stderr)
  corpus = corpus_lib.prepare_corpus(cfg.data, log=_stderr)
  return cfg, nnx.merge(graphdef, params), step, corpus


def run_sufficiency(workdir, overrides: list[str], batches: int) -> dict[str, Any]:
  cfg, model, step, corpus = _load_model(workdir, overrides)
  if cfg.model.mixer.type != "cct":
    raise ValueError(f"{workdir}: sufficiency needs a CCT run (model.mixer='cct')")
  val = pipeline.eval_batches(
      corpus.val_tokens, seq_len=cfg.data.seq_len,
      batch_size=cfg.eval.batch_size or cfg.train.batch_size, num_batches=batches,
      process_index=0, process_count=1,
      annotators=pipeline.batch_annotators(cfg, corpus.tokenizer),
      eos_id=corpus_lib.document_eos_id(cfg.data, corpus))
  steps, loss = collect_steps(model, val, cfg.model.mixer.step_len)
  return {"task": "sufficiency", "workdir": str(workdir), "step": step,
          **sufficiency_report(steps, loss, seed=cfg.train.seed)}


def run_compression(workdir, overrides: list[str], contexts: list[int]) -> dict[str, Any]:
  """Working memory vs KV cache of the run's model shape. Semantic runs count the steps
  their rule makes on the validation text (repeated to the context length if shorter)."""
  cfg = load_config(f"{workdir}/config.yaml", overrides, legacy=True)
  if cfg.model.mixer.type != "cct":
    raise ValueError(f"{workdir}: compression needs a CCT run (model.mixer='cct')")
  step_ids_of = None
  if cfg.data.step_boundaries == "semantic":
    corpus = corpus_lib.prepare_corpus(cfg.data, log=_stderr)
    if corpus.tokenizer is None:
      raise ValueError(f"{workdir}: semantic compression needs the run's tokenizer")
    annotator = semantic_annotator(cfg, corpus.tokenizer)
    text = np.asarray(corpus.val_tokens, np.int32)

    def step_ids_of(context: int) -> np.ndarray:
      return np.asarray(annotator(np.resize(text, context)))

  return {"task": "compression", "workdir": str(workdir),
          **compression_report(cfg.model, cfg.data.vocab_size, contexts,
                               baseline_decode_tokens=BASELINE_DECODE_TOKENS, log=_stderr,
                               step_ids_of=step_ids_of)}


def run_passkey(workdir, overrides: list[str], lengths: list[int], depths: list[float],
                trials: int, keys: tuple[int, ...] = ()) -> dict[str, Any]:
  cfg, model, step, corpus = _load_model(workdir, overrides)
  if corpus.tokenizer is None:
    raise ValueError(f"{workdir}: passkey needs the run's sentencepiece tokenizer")
  steps = semantic_steps(cfg, corpus.tokenizer)
  report = passkey_report(model, corpus.tokenizer, lengths, depths, trials, cfg.train.seed,
                          () if steps is None else (steps,), keys)
  return {"task": "passkey", "workdir": str(workdir), "step": step,
          "mixer": cfg.model.mixer.type, "train_seq_len": cfg.data.seq_len, **report}


def run_governance(workdir, overrides: list[str], shape: dict[str, int] | None = None
                   ) -> dict[str, Any]:
  """The commitment hash chain's overhead per generated token on the trained model, with
  the run's step rule (``cct_chain.overhead_report``)."""
  shape = {**GOVERNANCE_SHAPE, **(shape or {})}
  cfg, model, step, corpus = _load_model(workdir, overrides)
  if cfg.model.mixer.type != "cct":
    raise ValueError(f"{workdir}: governance needs a CCT run (model.mixer='cct')")
  batch, prompt_len = shape["batch"], shape["prompt_len"]
  val = np.asarray(corpus.val_tokens)
  if val.size < batch * prompt_len:
    raise ValueError(f"{workdir}: the validation split has {val.size} tokens, fewer than "
                     f"the {batch} x {prompt_len} governance prompts")
  prompts = val[:batch * prompt_len].reshape(batch, prompt_len).astype(np.int32)
  annotator = semantic_annotator(cfg, corpus.tokenizer)
  report = cct_chain.overhead_report(model, prompts, shape["new_tokens"], shape["rounds"],
                                     annotator)
  return {"task": "governance", "workdir": str(workdir), "step": step, **report}


def run_perplexity(workdir, baseline, overrides: list[str], batches: int,
                   evaluate_lm: Callable) -> dict[str, Any]:
  ours = evaluate_lm(workdir, overrides, batches)
  row = {"task": "perplexity", "workdir": str(workdir), "cct": ours["eval_ppl"],
         "cct_loss": ours["eval_loss"], "baseline": None, "delta_pct": None}
  if baseline:
    theirs = evaluate_lm(baseline, overrides, batches)
    row.update(baseline_workdir=str(baseline), baseline=theirs["eval_ppl"],
               baseline_loss=theirs["eval_loss"],
               delta_pct=100.0 * (ours["eval_ppl"] / theirs["eval_ppl"] - 1.0))
  return row


def final_losses(workdir) -> dict[str, Any]:
  """The last logged train row's losses, in the Results JSON names."""
  rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "loss" in r]
  last = train_rows[-1] if train_rows else {}
  return {"step": last.get("step"), "total": last.get("loss"),
          "standard": last.get("loss_standard"), "validity": last.get("loss_validity"),
          "conclusion": last.get("loss_conclusion"),
          "sufficiency": last.get("loss_sufficiency"), "p_commit": last.get("p_commit")}


def _context_key(n: int) -> str:
  return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def run_all(workdir, baseline, overrides: list[str], batches: int, contexts: list[int],
            lengths: list[int], depths: list[float], trials: int,
            evaluate_lm: Callable) -> dict[str, Any]:
  """Every task, assembled into the guide's "Results JSON" shape (tier 1 criteria)."""
  cfg = load_config(f"{workdir}/config.yaml", overrides)
  sufficiency = run_sufficiency(workdir, overrides, batches)
  compression = run_compression(workdir, overrides, contexts)
  perplexity = run_perplexity(workdir, baseline, overrides, batches, evaluate_lm)
  passkey = run_passkey(workdir, overrides, lengths, depths, trials)
  governance = run_governance(workdir, overrides)
  baseline_passkey = (run_passkey(baseline, overrides, lengths, depths, trials)
                      if baseline else None)
  ratios = {_context_key(c): row["ratio"] for c, row in compression["contexts"].items()}
  accuracy = {_context_key(int(n)): row["accuracy"] for n, row in passkey["lengths"].items()}
  values = {"sufficiency_probe_r2": sufficiency["sufficiency_probe_r2"],
            "perplexity_delta_pct": perplexity["delta_pct"],
            "compression_ratio_4k": ratios.get("4k"),
            "passkey_accuracy_1k": accuracy.get("1k"),
            "passkey_accuracy_4k": accuracy.get("4k")}
  criteria, verdict = tier_verdict(values, TIER1_CRITERIA)
  for name, line in criteria.items():
    _stderr(f"tier-1 {name}: {line}")
  losses = final_losses(workdir)
  return {
      "tier": 0,
      "model": f"cct-{cfg.model.n_layers}L-d{cfg.model.d_model} ({workdir})",
      "baseline": str(baseline) if baseline else None,
      "training": {"total_steps": cfg.train.steps,
                   "tokens_seen": cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len,
                   "gpu_hours": None, "cost_usd": None,
                   "final_loss": {k: losses[k] for k in
                                  ("total", "standard", "validity", "conclusion", "sufficiency")}},
      "results": {
          "sufficiency_probe_r2": sufficiency["sufficiency_probe_r2"],
          "compression_ratio": ratios,
          "perplexity": {"cct": perplexity["cct"], "baseline": perplexity["baseline"],
                         "delta_pct": perplexity["delta_pct"]},
          "passkey_accuracy": accuracy,
          "benchmarks": {"hellaswag": None, "arc_easy": None, "winogrande": None},
          "governance_overhead_pct": governance["overhead_pct_paired_median"],
      },
      "conclusion": verdict,
      "next_action": ("tier-1 criteria all met" if verdict == "PASS" else
                      "see criteria: the thesis is not supported at this scale"),
      "criteria": criteria,
      "details": {"sufficiency": sufficiency, "compression": compression,
                  "perplexity": perplexity, "passkey": passkey, "governance": governance,
                  "baseline_passkey": baseline_passkey},
  }


# ----------------------------------------------------------------------------- tasks


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v]


def _depths(args: argparse.Namespace) -> list[float]:
  return [float(v) for v in args.passkey_depths.split(",") if v]


def _add_baseline(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--baseline", default="", help="perplexity/all: the baseline run")


def _add_contexts(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--contexts", default="1024,4096,8192,32768",
                      help="compression/all: context lengths")


def _add_passkey(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--passkey-lengths", default="512,1024")
  parser.add_argument("--passkey-depths", default="0,0.25,0.5,0.75,1")
  parser.add_argument("--passkey-trials", type=int, default=2)


def _add_all(parser: argparse.ArgumentParser) -> None:
  for add in (tasks.add_batches_argument, _add_baseline, _add_contexts, _add_passkey):
    add(parser)


def _add_perplexity(parser: argparse.ArgumentParser) -> None:
  tasks.add_batches_argument(parser)
  _add_baseline(parser)


tasks.register(tasks.EvalTask(
    "sufficiency", lambda a: run_sufficiency(Path(a.workdir), a.set, tasks.batches(a) or 8),
    tasks.add_batches_argument))
tasks.register(tasks.EvalTask(
    "compression", lambda a: run_compression(Path(a.workdir), a.set, _ints(a.contexts)),
    _add_contexts))
tasks.register(tasks.EvalTask(
    "passkey", lambda a: run_passkey(Path(a.workdir), a.set, _ints(a.passkey_lengths),
                                     _depths(a), a.passkey_trials), _add_passkey))
tasks.register(tasks.EvalTask("governance", lambda a: run_governance(Path(a.workdir), a.set)))
tasks.register(tasks.EvalTask(
    "perplexity", lambda a: run_perplexity(Path(a.workdir), a.baseline, a.set,
                                           tasks.batches(a), evaluate_lm), _add_perplexity))
tasks.register(tasks.EvalTask(
    "all", lambda a: run_all(Path(a.workdir), a.baseline, a.set, tasks.batches(a) or 8,
                             _ints(a.contexts), _ints(a.passkey_lengths), _depths(a),
                             a.passkey_trials, evaluate_lm), _add_all))
