"""``bench cct``: ``python -m ttt_jax.bench cct [--config configs/cct_tier1_160m.yaml]
[--contexts 1024,4096,8192,32768]``.

Measures the live decode state of CCT working memory (summary buffer + current step's
K/V) against the KV cache of the same model with causal attention: bytes of the arrays
actually held after decoding each context of random tokens through a randomly
initialised model (``ttt_jax.cct.evals``). With ``--hash-chain`` it instead measures the
governance overhead (the guide's < 2% target): time per generated token of
``sampling.generate`` against ``generate_with_state`` plus the host-side commitment hash
chain (``ttt_jax.cct.chain.overhead_report``), fixed steps, greedy, on a randomly
initialised model of the config, in interleaved rounds.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.bench import common
from ttt_jax.cct import chain as cct_chain
from ttt_jax.cct import evals as cct_eval
from ttt_jax.config import Config
from ttt_jax.errors import ConfigError
from ttt_jax.models import lm


def bench_hash_chain(cfg: Config, batch: int, prompt_len: int, new_tokens: int, rounds: int
                     ) -> dict:
  """Generation time per token without and with the commitment hash chain
  (``cct_chain.overhead_report``) on a randomly initialised model of the config."""
  model = lm.LM(cfg.model, cfg.data.vocab_size, rngs=nnx.Rngs(cfg.train.seed))
  prompt = np.random.default_rng(cfg.train.seed).integers(
      0, cfg.data.vocab_size, (batch, prompt_len), np.int32)
  report = cct_chain.overhead_report(model, prompt, new_tokens, rounds)
  report["shape"].update(n_layers=cfg.model.n_layers, d_model=cfg.model.d_model,
                         d_summary=cfg.model.mixer.d_summary, step_len=cfg.model.mixer.step_len,
                         dtype=str(jnp.dtype(cfg.model.dtype)), vocab=cfg.data.vocab_size)
  return {"benchmark": "cct_hash_chain", **report, "machine": common.machine(),
          "jax": jax.__version__, "backend": jax.default_backend()}


def bench_memory(cfg: Config, contexts: list[int], baseline_decode_tokens: int) -> dict:
  """Working memory vs KV cache bytes (``cct_eval.compression_report``)."""
  report = cct_eval.compression_report(cfg.model, cfg.data.vocab_size, contexts,
                                      baseline_decode_tokens)
  return {"benchmark": "cct", **report, "machine": common.machine(),
          "jax": jax.__version__, "backend": jax.default_backend()}


def summary(result: dict) -> list[str]:
  """A line per context (bytes and ratio), or the hash chain's overhead."""
  if result["benchmark"] == "cct_hash_chain":
    return [f"cct hash chain: {result['overhead_pct_median']:+.2f}% time per generated token "
            f"(paired {result['overhead_pct_paired_median']:+.2f}%; target < "
            f"{result['target_pct']:.0f}%), chain host time "
            f"{result['chain_host_ms_median']:.3f} ms"]
  return [f"cct @ {context} tokens: working memory {common.human_bytes(row['cct_bytes'])} vs "
          f"KV cache {common.human_bytes(row['baseline_bytes'])} = {row['ratio']:.1f}x"
          for context, row in result["contexts"].items()]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
  common.add_config_arguments(parser, "configs/cct_tier1_160m.yaml")
  parser.add_argument("--contexts", default="1024,4096,8192,32768",
                      help="comma-separated context lengths (tokens) to decode and measure")
  parser.add_argument("--baseline-decode-tokens", type=int, default=0,
                      help="decode only this many tokens into the baseline's cache (0: all)")
  parser.add_argument("--hash-chain", action="store_true",
                      help="measure the commitment hash chain's overhead instead of memory")
  parser.add_argument("--batch", type=int, default=1, help="--hash-chain: sequences")
  parser.add_argument("--prompt-len", type=int, default=32, help="--hash-chain: prompt tokens")
  parser.add_argument("--new-tokens", type=int, default=256,
                      help="--hash-chain: generated tokens per sequence")
  parser.add_argument("--rounds", type=int, default=10, help="--hash-chain: timing rounds")


def _contexts(text: str) -> list[int]:
  """``--contexts 1024,4096``: positive token counts, or a ConfigError naming the flag."""
  try:
    contexts = [int(c) for c in text.split(",")]
  except ValueError:
    raise ConfigError(f"--contexts: expected comma-separated integers, got {text!r}") from None
  if min(contexts) < 1:
    raise ConfigError(f"--contexts: every context must be >= 1, got {text!r}")
  return contexts


def _run(cfg: Config, args: argparse.Namespace) -> dict:
  if not args.hash_chain:
    return bench_memory(cfg, _contexts(args.contexts), args.baseline_decode_tokens)
  if cfg.model.mixer.type != "cct":
    raise ConfigError(f"model.mixer.type: --hash-chain needs 'cct', got "
                      f"{cfg.model.mixer.type!r}")
  return bench_hash_chain(cfg, args.batch, args.prompt_len, args.new_tokens, args.rounds)


BENCH = common.register(common.Bench(
    "cct", "CCT working memory vs KV cache: measured bytes", __doc__, _add_arguments, _run,
    summary,
    counts=(("baseline_decode_tokens", 0), ("batch", 1), ("prompt_len", 1),
            ("new_tokens", 1), ("rounds", 1))))
