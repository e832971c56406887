"""Sampling from a trained run: ``python -m ttt_jax.generate --workdir W --prompt "..."``.

Loads the newest usable checkpoint of ``W`` and the run's ``tokenizer.model``, prefills
the prompt and decodes with the mixers' caches (attention: a KV cache), using
temperature and nucleus (top-p) sampling. Temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ttt_jax import data as data_lib
from ttt_jax.config import ConfigError
from ttt_jax.models import sampling
from ttt_jax.train import load_trained, user_errors


def generate_text(workdir: str | Path, prompt: str, *, max_new_tokens: int,
                  temperature: float, top_p: float, seed: int, stop_at_eos: bool = True,
                  overrides: list[str] = ()) -> str:
  workdir = Path(workdir)
  tokenizer_path = workdir / "tokenizer.model"
  if not tokenizer_path.exists():
    raise ConfigError(f"{tokenizer_path}: missing; generation needs the run's tokenizer")
  tokenizer = data_lib.Tokenizer(tokenizer_path)
  _, graphdef, params, _, _ = load_trained(workdir, overrides, log=lambda m: print(m, file=sys.stderr))
  prompt_ids = tokenizer.encode(prompt)
  if not prompt_ids:
    raise ConfigError("--prompt: encodes to no tokens; give a non-empty prompt")
  model = nnx.merge(graphdef, params)
  tokens = sampling.generate(model, np.asarray([prompt_ids], np.int32), max_new_tokens,
                             jax.random.key(seed), temperature=temperature, top_p=top_p,
                             eos_id=tokenizer.eos_id if stop_at_eos else None)
  new_ids = [int(t) for t in np.asarray(tokens)[0, len(prompt_ids):]]
  if stop_at_eos and tokenizer.eos_id in new_ids:
    new_ids = new_ids[:new_ids.index(tokenizer.eos_id)]
  return tokenizer.decode(new_ids)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.generate", description=__doc__)
  parser.add_argument("--workdir", required=True, help="run directory with checkpoints")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--max-new-tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  parser.add_argument("--top-p", type=float, default=0.95)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override the run's config (e.g. model.dtype=bfloat16)")
  args = parser.parse_args(argv)
  with user_errors():
    if args.max_new_tokens < 1:
      raise ConfigError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
      raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")
    text = generate_text(args.workdir, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         overrides=args.set)
  sys.stdout.write(args.prompt + text + "\n")


if __name__ == "__main__":
  main()
