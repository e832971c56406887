"""A synthetic key-value task whose demonstration holds the answer: the test bed of
self-distillation (SDFT), where a teacher that sees a demonstration should know more
than the student that sees only the prompt.

The task. Key words and value words (pseudo-words, disjoint) and a secret mapping
f: key -> value drawn from the seed. A prompt lists ``slots`` distinct keys and its
answer their values:

  prompt  = "Q k1 k2 k3 k4\n"    answer = "A f(k1) f(k2) f(k3) f(k4)"

The teacher reads ``TEACHER_TEMPLATE`` (the prompt, then a demonstration, then the
request for its own response), the student only ``STUDENT_TEMPLATE`` (the prompt
alone, as in SDFT, which is why the prompt ends in a newline); the response follows
either.

Pretraining (``pretrain_documents``) teaches the model to copy, never f itself:

- copy documents: the teacher template filled with a demonstration under a random
  per-document mapping, and the demonstration copied as the response;
- student documents: a prompt and an answer of random values (the student format is
  known, the secret mapping is not);
- general documents: sentences from a small grammar, whose held-out loss measures
  forgetting.

SDFT gets demonstrations under the secret mapping (``demos.jsonl``: ``{"prompt",
"demonstration"}``) and a held-out test set of new key combinations (``test.jsonl``,
the same fields); an SFT baseline trains on ``sft.jsonl`` (the demos' prompts with their
secret answers in the student format, as plain ``text`` documents). ``write_kit`` (or
``python -m ttt_jax.data.keyvalue --out DIR [--seed S]``) writes them all, with
``pretrain.jsonl`` and ``general_test.jsonl``; everything is a pure function of the
seed.

Measurements on a trained model (``measure``):

  teacher gain = mean over test items and answer tokens of
                 log p(answer | teacher context with the demo) - log p(answer | prompt)
  exact match  = fraction of test prompts whose greedy continuation starts with the
                 answer's tokens
  general loss = mean next-token NLL of the held-out general documents

Answer tokens are those of the whole text (context + answer) after the context's own
tokens (``answer_tokens``), so they are the tokens the model trained on. Log-probs come
from teacher-forced forwards of right-padded batches (a causal model's scores of a
token do not see later padding); greedy decoding runs on unpadded prompts grouped by
token length.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax import runs
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.errors import ConfigError, user_errors
from ttt_jax.inference import sampling
from ttt_jax.models import lm
from ttt_jax.sdft import data as sdft_data

TEACHER_TEMPLATE = sdft_data.TEMPLATE
"""The teacher's context, SDFT's own template; its response follows it directly."""
STUDENT_TEMPLATE = "{prompt}"
"""The student's context: the prompt alone (it ends in a newline); its response follows
it directly."""
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_GENERAL_WORDS = {
    "det": ("the", "a", "every", "one"),
    "adj": ("small", "green", "quiet", "bright", "old", "heavy", "quick", "round"),
    "noun": ("river", "window", "farmer", "engine", "garden", "letter", "mountain", "teacher",
             "bridge", "basket"),
    "verb": ("sees", "carries", "finds", "follows", "paints", "opens", "builds", "watches"),
    "prep": ("near", "under", "behind", "beside", "over"),
}
FILES = ("pretrain.jsonl", "general_test.jsonl", "demos.jsonl", "test.jsonl", "sft.jsonl")
"""What ``write_kit`` writes."""


@dataclasses.dataclass(frozen=True)
class Task:
  """The key words, the value words (disjoint) and the secret mapping between them."""
  keys: tuple[str, ...]
  values: tuple[str, ...]
  secret: dict[str, str]
  """f: key -> value."""
  slots: int
  """Keys per prompt."""


@dataclasses.dataclass(frozen=True)
class Sizes:
  """How many items of each kind ``write_kit`` writes."""
  copy_docs: int = 1600
  """Pretraining: teacher-template documents whose response copies the demonstration."""
  student_docs: int = 400
  """Pretraining: student-format documents with random values."""
  general_docs: int = 500
  """Pretraining: general text."""
  general_test_docs: int = 64
  """Held-out general text (``general_test.jsonl``)."""
  demos: int = 256
  """Prompts with secret answers for SDFT (``demos.jsonl``) and SFT (``sft.jsonl``)."""
  test: int = 64
  """New key combinations (``test.jsonl``)."""


def words(count: int, rng: np.random.Generator) -> list[str]:
  """``count`` distinct pseudo-words (consonant-vowel-consonant-vowel), shuffled by ``rng``."""
  pool = ["".join(w) for w in itertools.product(_CONSONANTS, _VOWELS, _CONSONANTS, _VOWELS)]
  return [pool[i] for i in rng.permutation(len(pool))[:count]]


def make_task(seed: int, n_keys: int = 16, n_values: int = 16, slots: int = 4) -> Task:
  """Keys, values and the secret mapping (each key a value drawn uniformly) of ``seed``."""
  if slots > n_keys:
    raise ConfigError(f"keyvalue: slots ({slots}) must not exceed the keys ({n_keys})")
  rng = np.random.default_rng([seed, 0])
  vocabulary = words(n_keys + n_values, rng)
  keys, values = tuple(vocabulary[:n_keys]), tuple(vocabulary[n_keys:])
  secret = {k: values[i] for k, i in zip(keys, rng.integers(0, n_values, n_keys))}
  return Task(keys, values, secret, slots)


def prompt_text(keys: Sequence[str]) -> str:
  """'Q k1 ... kn' and a newline: the student's whole context (SDFT's student sees the
  prompt alone), so its answer starts a line as the teacher's does."""
  return "Q " + " ".join(keys) + "\n"


def answer_text(values: Sequence[str]) -> str:
  return "A " + " ".join(values)


def secret_answer(task: Task, keys: Sequence[str]) -> str:
  return answer_text([task.secret[k] for k in keys])


def teacher_context(prompt: str, demonstration: str) -> str:
  return sdft_data.teacher_text(sdft_data.Example(prompt, demonstration))


def student_context(prompt: str) -> str:
  return STUDENT_TEMPLATE.format(prompt=prompt)


def _random_keys(task: Task, rng: np.random.Generator) -> tuple[str, ...]:
  return tuple(task.keys[i] for i in rng.choice(len(task.keys), task.slots, replace=False))


def _random_answer(task: Task, rng: np.random.Generator) -> str:
  return answer_text([task.values[i] for i in rng.integers(0, len(task.values), task.slots)])


def general_document(rng: np.random.Generator, sentences: int = 3) -> str:
  """Sentences '<det> <adj> <noun> <verb> <det> <noun> <prep> <det> <adj> <noun>.'"""
  def pick(kind: str) -> str:
    options = _GENERAL_WORDS[kind]
    return options[rng.integers(len(options))]

  return " ".join(
      f"{pick('det').capitalize()} {pick('adj')} {pick('noun')} {pick('verb')} {pick('det')} "
      f"{pick('noun')} {pick('prep')} {pick('det')} {pick('adj')} {pick('noun')}."
      for _ in range(sentences))


def pretrain_documents(task: Task, seed: int, sizes: Sizes = Sizes()) -> list[str]:
  """Copy, student and general documents (module doc), in a seeded order."""
  rng = np.random.default_rng([seed, 1])
  documents = []
  for _ in range(sizes.copy_docs):  # a random mapping per document: only copying helps
    prompt, demonstration = prompt_text(_random_keys(task, rng)), _random_answer(task, rng)
    documents.append(teacher_context(prompt, demonstration) + demonstration)
  for _ in range(sizes.student_docs):
    documents.append(student_context(prompt_text(_random_keys(task, rng)))
                     + _random_answer(task, rng))
  documents += [general_document(rng) for _ in range(sizes.general_docs)]
  return [documents[i] for i in rng.permutation(len(documents))]


def split_prompts(task: Task, seed: int, n_demos: int, n_test: int
                  ) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
  """Distinct key combinations: ``n_demos`` for the demos, ``n_test`` new ones for the
  test; every key appears in some demo (so the mapping is learnable from them)."""
  combinations = math.perm(len(task.keys), task.slots)
  if n_demos + n_test > combinations // 2:
    raise ConfigError(f"keyvalue: {n_demos} demos + {n_test} test prompts need more than half "
                      f"of the {combinations} key combinations")
  rng = np.random.default_rng([seed, 2])
  order = [task.keys[i] for i in rng.permutation(len(task.keys))]
  chosen = [tuple(order[i:i + task.slots])
            for i in range(0, len(order) - task.slots + 1, task.slots)]
  seen = set(chosen)
  while len(chosen) < n_demos + n_test:
    keys = _random_keys(task, rng)
    if keys not in seen:
      seen.add(keys)
      chosen.append(keys)
  return chosen[:n_demos], chosen[n_demos:]


def items(task: Task, prompts: Sequence[Sequence[str]]) -> list[dict[str, str]]:
  """``{"prompt", "demonstration"}`` records under the secret mapping."""
  return [{"prompt": prompt_text(keys), "demonstration": secret_answer(task, keys)}
          for keys in prompts]


def sft_documents(records: Sequence[dict[str, str]]) -> list[str]:
  """The records' prompts with their answers, in the student format."""
  return [student_context(r["prompt"]) + r["demonstration"] for r in records]


def _write_jsonl(path: Path, records: Sequence[dict[str, str]]) -> Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return path


def write_kit(out: str | Path, seed: int = 0, sizes: Sizes = Sizes()) -> dict[str, Path]:
  """Writes ``FILES`` into ``out`` (created); returns their paths by name."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  task = make_task(seed)
  demo_prompts, test_prompts = split_prompts(task, seed, sizes.demos, sizes.test)
  demos = items(task, demo_prompts)
  general_rng = np.random.default_rng([seed, 3])
  texts = {"pretrain.jsonl": pretrain_documents(task, seed, sizes),
           "general_test.jsonl": [general_document(general_rng)
                                  for _ in range(sizes.general_test_docs)],
           "sft.jsonl": sft_documents(demos)}
  paths = {name: _write_jsonl(out / name, [{"text": t} for t in docs])
           for name, docs in texts.items()}
  paths["demos.jsonl"] = _write_jsonl(out / "demos.jsonl", demos)
  paths["test.jsonl"] = _write_jsonl(out / "test.jsonl", items(task, test_prompts))
  return {name: paths[name] for name in FILES}


def pretrain_overrides(kit: str | Path, cache_dir: str | Path) -> list[str]:
  """``--set`` values pretraining ``configs/keyvalue_tiny.yaml`` on the kit ``kit``."""
  return [f"data.corpus=[{Path(kit) / 'pretrain.jsonl'}]", f"data.cache_dir={cache_dir}"]


def sft_overrides(kit: str | Path, cache_dir: str | Path, base: str | Path,
                  lora: bool = False) -> list[str]:
  """``--set`` values of the SFT baseline on ``configs/keyvalue_tiny.yaml``: ordinary
  training from the pretrained run ``base`` on the kit's ``sft.jsonl`` (short windows:
  the corpus is small), all weights at lr 3e-3 or, with ``lora``, adapters at 1e-2."""
  return [f"data.corpus=[{Path(kit) / 'sft.jsonl'}]", f"data.cache_dir={cache_dir}",
          f"checkpoint.init_from={base}", "data.seq_len=64", "data.val_fraction=0.1",
          "eval.batch_size=2", "eval.batches=1", "train.steps=150", "train.eval_every=150",
          "checkpoint.every=150", "optim.warmup_steps=10",
          f"optim.lr={1e-2 if lora else 3e-3}", f"lora.enabled={str(lora).lower()}"]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
  return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
          if line.strip()]


# ------------------------------------------------------------------------ measurement


def answer_tokens(tokenizer: Tokenizer, context: str, answer: str) -> tuple[list[int], list[int]]:
  """(context tokens, answer tokens): the tokens of ``context + answer`` split after the
  context's own tokens; ValueError when the whole's tokens do not start with them (a
  piece across the boundary)."""
  context_ids, whole = tokenizer.encode(context), tokenizer.encode(context + answer)
  if whole[:len(context_ids)] != context_ids:
    raise ValueError(f"keyvalue: a token crosses the end of the context {context[-20:]!r} "
                     f"into the answer {answer[:20]!r}")
  return context_ids, whole[len(context_ids):]


@partial(jax.jit, static_argnames="graphdef")
def _token_log_probs(graphdef: nnx.GraphDef, state: nnx.State, tokens_BxT: jax.Array
                     ) -> jax.Array:
  """log p(tokens[:, t + 1] | tokens[:, :t + 1]): float32 [B, T - 1]."""
  logits_BxTxV = nnx.merge(graphdef, state)(tokens_BxT[:, :-1]).astype(jnp.float32)
  log_probs_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  return jnp.take_along_axis(log_probs_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]


def scored_log_probs(model: lm.LM, sequences: Sequence[tuple[list[int], list[int]]],
                     batch_size: int = 32, pad_multiple: int = 16) -> list[np.ndarray]:
  """Per sequence (prefix tokens, scored tokens), the log-probs of its scored tokens
  given everything before them. Batches are right-padded to a multiple of
  ``pad_multiple`` (fewer compilations); a causal model's scores ignore the padding."""
  graphdef, state = nnx.split(model)
  scores = []
  for start in range(0, len(sequences), batch_size):
    chunk = sequences[start:start + batch_size]
    width = max(len(p) + len(s) for p, s in chunk)
    width = -(-width // pad_multiple) * pad_multiple
    tokens = np.zeros((len(chunk), width), np.int32)
    for row, (prefix, scored) in enumerate(chunk):
      tokens[row, :len(prefix) + len(scored)] = prefix + scored
    log_probs = np.asarray(_token_log_probs(graphdef, state, jnp.asarray(tokens)))
    for row, (prefix, scored) in enumerate(chunk):
      scores.append(log_probs[row, len(prefix) - 1:len(prefix) - 1 + len(scored)])
  return scores


def teacher_gain(model: lm.LM, tokenizer: Tokenizer, records: Sequence[dict[str, str]]
                 ) -> dict[str, float]:
  """Mean per-token log p(answer | teacher context with the demonstration) and
  log p(answer | student context) over ``records`` (the demonstration is the answer),
  and their difference ``gain``."""
  teacher = [answer_tokens(tokenizer, teacher_context(r["prompt"], r["demonstration"]),
                           r["demonstration"]) for r in records]
  student = [answer_tokens(tokenizer, student_context(r["prompt"]), r["demonstration"])
             for r in records]
  teacher_lp = float(np.mean(np.concatenate(scored_log_probs(model, teacher))))
  student_lp = float(np.mean(np.concatenate(scored_log_probs(model, student))))
  return {"teacher_log_prob": teacher_lp, "student_log_prob": student_lp,
          "gain": teacher_lp - student_lp}


def exact_match(model: lm.LM, tokenizer: Tokenizer, records: Sequence[dict[str, str]]
                ) -> float:
  """Fraction of ``records`` whose greedy continuation of the student context starts
  with the answer's tokens; prompts of one token length are decoded together."""
  groups: dict[int, list[tuple[list[int], list[int]]]] = {}
  for r in records:
    context, answer = answer_tokens(tokenizer, student_context(r["prompt"]), r["demonstration"])
    groups.setdefault(len(context), []).append((context, answer))
  correct = 0
  for length, group in sorted(groups.items()):
    new_tokens = max(len(answer) for _, answer in group)
    generated = np.asarray(sampling.generate(
        model, np.asarray([context for context, _ in group], np.int32), new_tokens,
        jax.random.key(0), temperature=0.0))
    correct += sum(list(row[length:length + len(answer)]) == answer
                   for row, (_, answer) in zip(generated, group))
  return correct / len(records)


def general_loss(model: lm.LM, tokenizer: Tokenizer, texts: Sequence[str]) -> float:
  """Mean next-token NLL (nats) over ``texts``, each scored from its first token, with
  its closing EOS as the last target."""
  sequences = [(ids[:1], ids[1:] + [tokenizer.eos_id]) for ids in map(tokenizer.encode, texts)]
  return -float(np.mean(np.concatenate(scored_log_probs(model, sequences))))


def load_model(workdir: str | Path) -> tuple[lm.LM, Tokenizer]:
  """The newest checkpoint's model of a run (an adapter run's adapters folded in) and
  the run's tokenizer."""
  workdir = runs.check_workdir(workdir)
  _, graphdef, params, _, _ = runs.load_trained(workdir, log=lambda _: None)
  return nnx.merge(graphdef, params), Tokenizer(workdir / runs.RUN_TOKENIZER)


def measure(workdir: str | Path, kit: str | Path) -> dict[str, float]:
  """Teacher gain, student exact match and general loss (module doc) of the run
  ``workdir`` on the kit directory ``kit``'s test and general test sets."""
  model, tokenizer = load_model(workdir)
  kit = Path(kit)
  test = read_jsonl(kit / "test.jsonl")
  return {**teacher_gain(model, tokenizer, test),
          "exact_match": exact_match(model, tokenizer, test),
          "general_loss": general_loss(
              model, tokenizer, [r["text"] for r in read_jsonl(kit / "general_test.jsonl")])}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.data.keyvalue",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="directory to write the kit's files into")
  parser.add_argument("--seed", type=int, default=0, help="the seed of everything (default 0)")
  args = parser.parse_args(argv)
  with user_errors():
    for path in write_kit(args.out, args.seed).values():
      print(path)


if __name__ == "__main__":
  main()
