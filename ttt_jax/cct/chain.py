"""Commitment hash chain: a tamper-evident log of the summaries a CCT model committed
while generating (the Commitment-Constrained Training guide's optional governance).

    h_0     = SHA-256(HEADER_PREFIX || canonical JSON of the header)
    h_{k+1} = SHA-256(h_k || b_k)                    k = 0 .. K-1 (committed steps)
    b_k     = step k's summary c_k of every layer, layer 0 first, as little-endian
              float32: n_layers * d_summary * 4 bytes, exactly the decode buffer's values

The header names d_summary, the layer count, the summary buffer's dtype (bfloat16 values
are widened to float32 exactly), the step rule and the byte layout. ``hashes[k]`` =
h_{k+1} commits steps 0..k; the head is h_K (h_0 when no step is committed).

Committed steps. The chain is computed on the host after generation from the decode
cache's summary buffer (``CCTCache.summaries_BxNxS``, stacked over layers); nothing runs
on the host inside the jitted loop. A step's summary is written to the buffer when the
first token of the next step is decoded, so the committed steps are 0 .. K-1 with K the
step of the last decoded token (``CCTCache.step_B``). The last sampled token is never
decoded, and the step holding the last decoded token is open: neither enters the chain.

What is verifiable. The summaries a training-form forward computes from the tokens equal
the decode path's only to float tolerance (other reduction orders; ~1e-6 in float32), so
hashes of either one's bytes cannot be recomputed by the other, and rounding both to a
grid before hashing does not fix it: a value within 1e-7 of a rounding boundary still
rounds differently (rarely, but then the whole rest of the chain breaks), and a grid
coarse enough to make that rare hides token changes that move a summary by less than
the grid. So the chain is bitwise over exactly what decode committed, and the record
carries those bytes (``summaries``, base64 per step) next to the hashes. Verification
(``verify_sequence``) checks, step by step: (1) bitwise, that the recorded bytes chain to
the recorded hashes and head (the log was not altered after the fact; anchoring the head
elsewhere makes that binding); (2) to ``tolerance``, that one forward over the decoded
tokens, with the step ids the rule gives, computes those summaries (the tokens are the
ones that produced them). The first step failing either is reported. Limits: (2) only
sees what moves a summary by more than ``tolerance`` (default 2e-5 for float32; a
bfloat16 decode needs ~2^-6, a few bf16 roundings, and is correspondingly blunter); a
token change that leaves every layer's summary unchanged (with pool 'last', one layer:
any token of a step but its last) is invisible to any summary-level check; tokens of the
open last step are not covered; the chain binds summaries, not weights, so verification
assumes the generating checkpoint (another one fails at step 0).
"""

from __future__ import annotations

import base64
import hashlib
import json
import statistics
import time
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.cct import mixer as cct
from ttt_jax.cct.decode import SemanticSteps
from ttt_jax.inference import sampling
from ttt_jax.inference.sampling import Generation
from ttt_jax.models import lm

HEADER_PREFIX = b"ttt_jax.cct_chain/v1\n"
"""Domain separation of h_0 (a header can never be mistaken for a step's bytes)."""
SEQUENCE_FIELDS = frozenset({"tokens", "n_decoded", "n_steps", "summaries", "hashes", "head"})
"""The fields of each sequence of a record."""


def default_tolerance(dtype: str) -> float:
  """Largest accepted |decode - forward| per summary value: float32 paths differ by
  ~1e-6; bfloat16 ones by a few bf16 roundings of values below 1 (2^-8 each)."""
  return 2e-5 if jnp.dtype(dtype) == jnp.float32 else 2.0 ** -6


# ----------------------------------------------------------------------------- the chain


def chain_header(d_summary: int, n_layers: int, dtype: str, steps: str) -> dict[str, Any]:
  """The header fields (``steps``: the step rule, see ``steps_descriptor``)."""
  return {"d_summary": d_summary, "n_layers": n_layers, "dtype": dtype, "steps": steps,
          "bytes": "float32 little-endian, [n_layers, d_summary] row-major"}


def genesis_hash(header: dict[str, Any]) -> bytes:
  """h_0 = SHA-256(HEADER_PREFIX || canonical JSON of the header)."""
  canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
  return hashlib.sha256(HEADER_PREFIX + canonical).digest()


def step_bytes(summary_LxS: np.ndarray) -> bytes:
  """b_k: one step's summary of every layer, layer 0 first, little-endian float32."""
  return np.ascontiguousarray(summary_LxS, dtype="<f4").tobytes()


def next_hash(previous: bytes, step: bytes) -> bytes:
  return hashlib.sha256(previous + step).digest()


def chain_hashes(genesis: bytes, summaries_KxLxS: np.ndarray) -> list[bytes]:
  """[h_1, ..., h_K] of K committed steps' summaries."""
  hashes, previous = [], genesis
  for summary_LxS in summaries_KxLxS:
    previous = next_hash(previous, step_bytes(summary_LxS))
    hashes.append(previous)
  return hashes


# ----------------------------------------------------------------------------- generation


def steps_descriptor(model: lm.LM, annotator: Any | None) -> str:
  """The step rule a chain was made under: 'fixed/S' (position // S) or 'semantic/L/m'
  (``data.StepAnnotator`` with step_len L, step_min_len m)."""
  if annotator is not None and annotator.mode == "semantic":
    return f"semantic/{annotator.step_len}/{annotator.step_min_len}"
  return f"fixed/{model.cfg.mixer.step_len}"


def model_header(model: lm.LM, annotator: Any | None) -> dict[str, Any]:
  cfg = model.cfg
  return chain_header(cfg.mixer.d_summary, cfg.n_layers, str(jnp.dtype(cfg.dtype)),
                      steps_descriptor(model, annotator))


def committed_summaries(cache: cct.CCTCache) -> list[np.ndarray]:
  """Per row, the committed steps' summaries [K, n_layers, d_summary] (float32) held in
  a model-level decode cache (``CCTCache`` arrays stacked on a leading layers axis)."""
  summaries_LxBxNxS = np.asarray(cache.summaries_BxNxS).astype(np.float32)
  committed_B = np.asarray(cache.step_B[0])
  return [np.transpose(summaries_LxBxNxS[:, row, :int(k)], (1, 0, 2))
          for row, k in enumerate(committed_B)]


def generation_record(model: lm.LM, generation: Generation, annotator: Any | None = None
                      ) -> dict[str, Any]:
  """The chain of every row of a ``sampling.generate_with_state`` result, as JSON data:
  header, h_0 and per sequence its tokens, the decoded count, the committed step count,
  each step's bytes b_k (base64), the hashes (hex) and the head."""
  header = model_header(model, annotator)
  genesis = genesis_hash(header)
  tokens_BxT = np.asarray(generation.tokens_BxT)
  sequences = []
  for tokens_T, summaries_KxLxS in zip(tokens_BxT, committed_summaries(generation.cache)):
    hashes = chain_hashes(genesis, summaries_KxLxS)
    sequences.append({
        "tokens": [int(t) for t in tokens_T], "n_decoded": len(tokens_T) - 1,
        "n_steps": len(hashes),
        "summaries": [base64.b64encode(step_bytes(s)).decode() for s in summaries_KxLxS],
        "hashes": [h.hex() for h in hashes],
        "head": (hashes[-1] if hashes else genesis).hex()})
  return {"format": HEADER_PREFIX.decode().strip(), "header": header,
          "genesis": genesis.hex(), "sequences": sequences}


def overhead_report(model: lm.LM, prompt_tokens_BxP: np.ndarray, new_tokens: int,
                    rounds: int, annotator: Any | None = None) -> dict[str, Any]:
  """The chain's governance overhead (the guide's < 2% target): greedy generation time per
  token with ``sampling.generate`` against ``generate_with_state`` plus
  ``generation_record``, timed in ``rounds`` interleaved rounds after one compiling run
  of each (a busy shared CPU slows both alike). ``annotator`` (semantic steps) decides
  the steps on device in both variants and names the rule in the record."""
  inputs = () if annotator is None else (SemanticSteps(cct.step_rule(annotator)),)
  rng = jax.random.key(0)
  chain_s: list[float] = []
  records: list[dict[str, Any]] = []

  def without_chain() -> None:
    jax.block_until_ready(sampling.generate(model, prompt_tokens_BxP, new_tokens, rng, 0.0,
                                            inputs=inputs))

  def with_chain() -> None:
    generation = sampling.generate_with_state(model, prompt_tokens_BxP, new_tokens, rng, 0.0,
                                              inputs=inputs)
    jax.block_until_ready(generation)
    start = time.perf_counter()
    records.append(generation_record(model, generation, annotator))
    chain_s.append(time.perf_counter() - start)

  variants = {"without_chain": without_chain, "with_chain": with_chain}
  compile_s = {}
  for name, run in variants.items():
    start = time.perf_counter()
    run()
    compile_s[name] = time.perf_counter() - start
  chain_s.clear()
  times: dict[str, list[float]] = {name: [] for name in variants}
  for _ in range(rounds):
    for name, run in variants.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  per_token = {name: {"median_ms": 1e3 * statistics.median(t) / new_tokens,
                      "best_ms": 1e3 * min(t) / new_tokens} for name, t in times.items()}
  overhead = {key: per_token["with_chain"][key] / per_token["without_chain"][key] - 1.0
              for key in ("median_ms", "best_ms")}
  paired = [w / wo - 1.0 for w, wo in zip(times["with_chain"], times["without_chain"])]
  return {
      "per_token": per_token,
      "overhead_pct_median": 100.0 * overhead["median_ms"],
      "overhead_pct_best": 100.0 * overhead["best_ms"],
      "overhead_pct_paired_median": 100.0 * statistics.median(paired),
      "chain_host_ms_median": 1e3 * statistics.median(chain_s),
      "chain_host_pct_of_generation": 100.0 * statistics.median(chain_s)
                                      / statistics.median(times["without_chain"]),
      "target_pct": 2.0,
      "committed_steps_per_sequence": [s["n_steps"] for s in records[-1]["sequences"]],
      "compile_and_first_run_s": compile_s,
      "shape": {"batch": int(prompt_tokens_BxP.shape[0]),
                "prompt_len": int(prompt_tokens_BxP.shape[1]), "new_tokens": new_tokens,
                "rounds": rounds, "steps": records[-1]["header"]["steps"]},
  }


# ----------------------------------------------------------------------------- verification


class Verification(NamedTuple):
  """The result of checking one sequence's record against its tokens."""
  ok: bool
  first_mismatch: int | None
  """The first step (0-based) that fails; None when ok."""
  n_steps: int
  """Committed steps recomputed from the tokens."""
  reason: str


def step_ids_of(model: lm.LM, tokens_T: np.ndarray, annotator: Any | None) -> np.ndarray:
  """Step ids of a whole sequence under the rule generation used."""
  if annotator is not None and annotator.mode == "semantic":
    return np.asarray(annotator(np.asarray(tokens_T)), np.int32)
  return (np.arange(len(tokens_T)) // model.cfg.mixer.step_len).astype(np.int32)


@partial(jax.jit, static_argnames=("graphdef",))
def _forward_summaries(graphdef: nnx.GraphDef, state: nnx.State, tokens_1xT: jax.Array,
                       step_ids_1xT: jax.Array) -> jax.Array:
  model = nnx.merge(graphdef, state)
  _, aux = cct.logits_and_summaries(model, tokens_1xT, step_ids_1xT)
  return aux.summary_BxNxS[:, 0].astype(model.dtype).astype(jnp.float32)


def forward_summaries(model: lm.LM, tokens_T: np.ndarray, step_ids_T: np.ndarray
                      ) -> np.ndarray:
  """Every step's summary [n_steps, n_layers, d_summary] of the training-form forward
  with every boundary committed, rounded to the decode buffer's dtype, as float32."""
  graphdef, state = nnx.split(model)
  unlimited = nnx.merge(graphdef, state)
  unlimited.blocks.mixer.max_steps = 0  # a summary slot for every step, whatever the config
  graphdef, state = nnx.split(unlimited)
  summaries_LxNxS = _forward_summaries(graphdef, state, jnp.asarray(tokens_T, jnp.int32)[None],
                                       jnp.asarray(step_ids_T, jnp.int32)[None])
  return np.transpose(np.asarray(summaries_LxNxS), (1, 0, 2))[:int(step_ids_T[-1]) + 1]


def verify_sequence(model: lm.LM, record: dict[str, Any], sequence: dict[str, Any],
                    annotator: Any | None = None, tolerance: float | None = None
                    ) -> Verification:
  """Checks one sequence of a ``generation_record`` (``record``: the whole record, for
  its header): the recorded bytes chain to the recorded hashes (bitwise), and a forward
  over the decoded tokens computes those summaries (to ``tolerance``; None: the dtype's
  ``default_tolerance``). Reports the first step that fails."""
  header = model_header(model, annotator)
  genesis = genesis_hash(header)
  if header != record["header"] or genesis.hex() != record["genesis"]:
    return Verification(False, 0, 0, f"header differs: recorded {record['header']}, "
                                     f"this model and step rule give {header}")
  if tolerance is None:
    tolerance = default_tolerance(header["dtype"])
  tokens_T = np.asarray(sequence["tokens"][:sequence["n_decoded"]], np.int64)
  if not 1 <= sequence["n_decoded"] <= len(sequence["tokens"]) or not (
      (tokens_T >= 0) & (tokens_T < model.vocab_size)).all():
    return Verification(False, 0, 0, f"tokens: {len(sequence['tokens'])} tokens, "
                                     f"{sequence['n_decoded']} decoded, or ids outside "
                                     f"[0, {model.vocab_size})")
  step_ids_T = step_ids_of(model, tokens_T, annotator)
  n_steps = int(step_ids_T[-1])  # the last decoded token's step is open
  recomputed_KxLxS = forward_summaries(model, tokens_T, step_ids_T)[:n_steps]
  shape = recomputed_KxLxS.shape[1:]
  previous = genesis
  for step, (encoded, recorded_hash) in enumerate(zip(sequence["summaries"],
                                                      sequence["hashes"])):
    try:
      committed, recorded_hash = base64.b64decode(encoded), bytes.fromhex(recorded_hash)
    except ValueError:
      return Verification(False, step, n_steps, f"step {step}: malformed base64 or hex")
    if next_hash(previous, committed) != recorded_hash:
      return Verification(False, step, n_steps,
                          f"step {step}: recorded summary does not give the recorded hash")
    if step >= n_steps:
      break
    if len(committed) != 4 * int(np.prod(shape)):
      return Verification(False, step, n_steps, f"step {step}: recorded summary has "
                                                f"{len(committed)} bytes, not float32 {shape}")
    summary_LxS = np.frombuffer(committed, "<f4").reshape(shape)
    error = float(np.max(np.abs(summary_LxS - recomputed_KxLxS[step])))
    if not error <= tolerance:  # NaN fails too
      return Verification(False, step, n_steps, f"step {step}: summary recomputed from the "
                                                f"tokens differs by {error:.3g} > {tolerance:.3g}")
    previous = recorded_hash
  recorded_steps = min(len(sequence["summaries"]), len(sequence["hashes"]))
  if recorded_steps != n_steps or len(sequence["hashes"]) != len(sequence["summaries"]):
    return Verification(False, min(recorded_steps, n_steps), n_steps,
                        f"{len(sequence['hashes'])} hashes and {len(sequence['summaries'])} "
                        f"summaries recorded, the tokens commit {n_steps} steps")
  if sequence["head"] != previous.hex():
    return Verification(False, n_steps, n_steps, "head is not the last hash")
  return Verification(True, None, n_steps, f"{n_steps} committed steps verified")


def verify_record(model: lm.LM, record: dict[str, Any], annotator: Any | None = None,
                  tolerance: float | None = None) -> list[Verification]:
  return [verify_sequence(model, record, sequence, annotator, tolerance)
          for sequence in record["sequences"]]
