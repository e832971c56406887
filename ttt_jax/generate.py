"""Sampling from a trained run: ``python -m ttt_jax.generate --workdir W --prompt "..."``.

Loads the newest usable checkpoint of ``W`` and the run's ``tokenizer.model``, prefills
the prompt and decodes with the mixers' caches (attention: a KV cache), using
temperature and nucleus (top-p) sampling. Temperature 0 is greedy.

Mechanisms that read per-token side inputs get them from the run's decode inputs
(``inference.sampling.decode_inputs``): CCT runs decode with the run's steps, fixed
(position // model.mixer.step_len) or, for ``data.step_boundaries: semantic``, the
semantic rule applied token by token on device (needs data.step_len <=
model.mixer.step_len, the decode step buffer). ``--hash-chain FILE.json`` (CCT) writes
the commitment hash chain of the generation (``ttt_jax.cct.chain``);
``python -m ttt_jax.cct_chain --workdir W FILE.json`` verifies it. ``--adapter PATH``
folds a LoRA adapter into the params once, before the model is built
(``lora.files.apply_adapter``): decoding runs the same compiled graph as without one.
``--forbid PIECE`` (repeatable; a piece such as ``<pad>`` or ``<s>``, or ``#ID``) is never
sampled: its logit is -inf before temperature, top-p and argmax.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ttt_jax import diagnostics
from ttt_jax.cct import chain as cct_chain
from ttt_jax.cct.decode import semantic_annotator
from ttt_jax.cct.steps import StepAnnotator
from ttt_jax.config import Config
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.errors import ConfigError, user_errors
from ttt_jax.inference import sampling
from ttt_jax.lora import files as lora_files
from ttt_jax.models.lm import LM
from ttt_jax.runs import check_workdir, load_trained


def load_for_generation(workdir: str | Path, overrides: list[str] = (), adapter: str = ""
                        ) -> tuple[Config, LM, Tokenizer, StepAnnotator | None]:
  """(config, model, tokenizer, the semantic step annotator of a CCT run or None);
  ``adapter``: a LoRA adapter folded into the run's params."""
  workdir = check_workdir(workdir)
  tokenizer_path = workdir / "tokenizer.model"
  if not tokenizer_path.exists():
    raise ConfigError(f"{tokenizer_path}: missing; generation needs the run's tokenizer")
  tokenizer = Tokenizer(tokenizer_path)
  log = lambda m: print(m, file=sys.stderr)  # noqa: E731
  cfg, graphdef, params, _, _ = load_trained(workdir, overrides, log=log)
  if adapter:
    params = lora_files.apply_adapter(adapter, cfg, params, tokenizer.sha256, log=log)
  return cfg, nnx.merge(graphdef, params), tokenizer, semantic_annotator(cfg, tokenizer)


def forbidden_ids(tokenizer: Tokenizer, pieces: list[str]) -> tuple[int, ...]:
  """The ids of ``--forbid``'s pieces: a piece of the vocabulary, or ``#ID``; anything
  else is a one-line error."""
  ids = []
  for piece in pieces:
    if piece.startswith("#") and piece[1:].isascii() and piece[1:].isdigit():
      piece_id = int(piece[1:])
      if piece_id >= tokenizer.vocab_size:
        raise ConfigError(f"--forbid: {piece} is past the vocabulary of "
                          f"{tokenizer.vocab_size} pieces")
    else:
      piece_id = tokenizer.processor.piece_to_id(piece)
      if piece_id == tokenizer.unk_id and piece != tokenizer.processor.id_to_piece(piece_id):
        raise ConfigError(f"--forbid: {piece!r} is not a piece of the run's tokenizer "
                          f"(give a piece such as <pad>, or #ID)")
    ids.append(piece_id)
  return tuple(sorted(set(ids)))


def generate_text(workdir: str | Path, prompt: str, *, max_new_tokens: int,
                  temperature: float, top_p: float, seed: int, stop_at_eos: bool = True,
                  overrides: list[str] = (), hash_chain: str | Path | None = None,
                  adapter: str = "", forbid: list[str] = ()) -> str:
  """The generated text (after the prompt). ``hash_chain``: also write the commitment
  hash chain record (``cct_chain.generation_record``) there (CCT runs); ``adapter``: a
  LoRA adapter folded in (``load_for_generation``); ``forbid``: pieces never sampled
  (``forbidden_ids``)."""
  if hash_chain is not None and not Path(hash_chain).parent.is_dir():
    raise ConfigError(f"--hash-chain: directory {Path(hash_chain).parent} does not exist")
  cfg, model, tokenizer, annotator = load_for_generation(workdir, overrides, adapter)
  if hash_chain is not None and cfg.model.mixer.type != "cct":
    raise ConfigError(f"--hash-chain: needs a CCT run (model.mixer.type='cct'), got "
                      f"{cfg.model.mixer.type!r}")
  forbid_ids = forbidden_ids(tokenizer, list(forbid))
  prompt_ids = tokenizer.encode(prompt)
  if not prompt_ids:
    raise ConfigError("--prompt: encodes to no tokens; give a non-empty prompt")
  prompt_BxP = np.asarray([prompt_ids], np.int32)
  rng = jax.random.key(seed)
  eos_id = tokenizer.eos_id if stop_at_eos else None
  inputs = sampling.decode_inputs(cfg, tokenizer)
  if hash_chain is None:
    tokens = sampling.generate(model, prompt_BxP, max_new_tokens, rng, temperature, top_p,
                               eos_id, inputs, forbid_ids)
  else:
    generation = sampling.generate_with_state(model, prompt_BxP, max_new_tokens, rng,
                                              temperature, top_p, eos_id, inputs, forbid_ids)
    tokens = generation.tokens_BxT
    record = cct_chain.generation_record(model, generation, annotator)
    Path(hash_chain).write_text(json.dumps(record, indent=1) + "\n")
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
  parser.add_argument("--hash-chain", metavar="FILE.json", default=None,
                      help="CCT: write the commitment hash chain of the generation here")
  parser.add_argument("--adapter", metavar="PATH", default="",
                      help="fold this LoRA adapter (an adapter directory or an adapter run) "
                           "into the run's params")
  parser.add_argument("--forbid", action="append", default=[], metavar="PIECE",
                      help="never sample this piece (e.g. <pad>, <s>) or #ID; repeatable")
  args = parser.parse_args(argv)
  with user_errors():
    if args.max_new_tokens < 1:
      raise ConfigError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:  # NaN too
      raise ConfigError(f"--temperature: must be >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
      raise ConfigError(f"--top-p: must be in (0, 1], got {args.top_p}")
    diagnostics.library_logs_until_exit(diagnostics.run_log(check_workdir(args.workdir)))
    text = generate_text(args.workdir, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         overrides=args.set, hash_chain=args.hash_chain,
                         adapter=args.adapter, forbid=args.forbid)
  sys.stdout.write(args.prompt + text + "\n")


if __name__ == "__main__":
  main()
