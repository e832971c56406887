r"""Capability probes: prompts with a check of what the model does with them.

A probes file is jsonl, one probe a line (blank lines skipped)::

  {"id": "def", "kind": "regex", "prompt": "def f(", "pattern": "\\):", "max_new_tokens": 16}
  {"kind": "substring", "prompt": "import ", "expected": "os", "max_new_tokens": 8}
  {"kind": "logprob", "prompt": "for i in ", "expected": "range("}

- ``regex``: greedy generation of ``max_new_tokens`` tokens (default 32; cut at the
  first EOS), pass iff ``re.search(pattern, completion)``;
- ``substring``: the same generation, pass iff ``expected`` is in the completion;
- ``logprob``: the mean per-token log p(expected | prompt), teacher-forced: with prompt
  ids p_1..p_P and expected ids e_1..e_E, encoded separately and concatenated (never
  decoded and re-encoded), (1/E) sum_i log p(e_i | p, e_<i). It moves smoothly with the
  weights where a small model passes no generation probe.

``id`` defaults to ``<kind>-<line>``; lines end at '\n' only. A probe that cannot be used
(not UTF-8, bad JSON, a missing or mistyped field, an unknown kind, an invalid regular
expression, a prompt or expected text that encodes to no tokens) is refused in one line
naming ``file:line`` and the field.

Probes are batched without padding: the generation probes grouped by (prompt length,
max_new_tokens), the logprob probes by total length, each group in one call of at most
``BATCH`` rows, so a model compiles once per shape and scoring the same weights twice
gives the same figures. ``score`` gives every probe's result and the aggregates: pass
rate per generation kind and over both (``pass_rate``), and ``mean_logprob`` over the
logprob probes; ``gate_scores`` the two figures a gate compares
(``training.gates``). ``python -m ttt_jax.evaluate --task probes --probes F.jsonl``
scores a run's newest checkpoint (``--weights``, ``--artifact``, ``--adapter`` as for
``lm``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.config import Config
from ttt_jax.data import pipeline
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.errors import ConfigError, DataError
from ttt_jax.eval import lm as eval_lm
from ttt_jax.eval import tasks
from ttt_jax.inference import sampling
from ttt_jax.training import objectives
from ttt_jax.training.state import TrainState
from ttt_jax.training.step import model_params

KINDS = ("regex", "substring", "logprob")
GENERATED = ("regex", "substring")
"""The kinds that pass or fail on a greedy completion."""
TARGET_FIELD = {"regex": "pattern", "substring": "expected", "logprob": "expected"}
"""The field each kind checks the model against."""
DEFAULT_MAX_NEW_TOKENS = 32
BATCH = 64
"""Rows per batched call at most."""


@dataclasses.dataclass(frozen=True)
class Probe:
  id: str
  kind: str
  prompt: str
  target: str
  """The regex ``pattern`` or the ``expected`` text (``TARGET_FIELD``)."""
  max_new_tokens: int
  """Tokens generated (generation kinds; 0 for ``logprob``)."""
  where: str
  """``file:line`` of the probe, for errors."""


def _field(record: dict[str, Any], name: str, kind: type, where: str, default: Any = None
           ) -> Any:
  value = record.get(name, default)
  if value is None:
    raise DataError(f"{where}: missing field '{name}'")
  if not isinstance(value, kind) or isinstance(value, bool):
    what = {str: "a string", int: "an integer"}[kind]
    raise DataError(f"{where}: field '{name}' must be {what}, got {value!r}")
  return value


def parse_probe(line: str, where: str, line_number: int) -> Probe:
  """The probe of one jsonl line (``where``: its ``file:line``)."""
  try:
    record = json.loads(line)
  except ValueError as error:
    raise DataError(f"{where}: not a JSON object ({error})") from None
  if not isinstance(record, dict):
    raise DataError(f"{where}: not a JSON object")
  kind = _field(record, "kind", str, where)
  if kind not in KINDS:
    raise DataError(f"{where}: field 'kind': {kind!r} is not one of {list(KINDS)}")
  unknown = sorted(set(record) - {"id", "kind", "prompt", TARGET_FIELD[kind]}
                   - ({"max_new_tokens"} if kind in GENERATED else set()))
  if unknown:
    raise DataError(f"{where}: unknown field '{unknown[0]}' for kind {kind!r}")
  target = _field(record, TARGET_FIELD[kind], str, where)
  if kind == "regex":
    try:
      re.compile(target)
    except re.error as error:
      raise DataError(f"{where}: field 'pattern': {target!r} is not a valid regular "
                      f"expression ({error})") from None
  max_new_tokens = 0
  if kind in GENERATED:
    max_new_tokens = _field(record, "max_new_tokens", int, where, DEFAULT_MAX_NEW_TOKENS)
    if max_new_tokens < 1:
      raise DataError(f"{where}: field 'max_new_tokens' must be >= 1, got {max_new_tokens}")
  return Probe(_field(record, "id", str, where, f"{kind}-{line_number}"), kind,
               _field(record, "prompt", str, where), target, max_new_tokens, where)


def read_probes(path: str | Path) -> list[Probe]:
  """The probes of a jsonl file, checked (module doc)."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: no such probes file")
  data = path.read_bytes()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as error:
    line = data[:error.start].count(b"\n") + 1
    raise DataError(f"{path}:{line}: not UTF-8 text ({error.reason})") from None
  probes = []
  # lines end at '\n' only: a JSON string may hold U+2028 or U+0085, which splitlines cuts
  for number, line in enumerate(text.split("\n"), start=1):
    if line.strip():
      probes.append(parse_probe(line, f"{path}:{number}", number))
  if not probes:
    raise DataError(f"{path}: holds no probes")
  return probes


def file_sha256(path: str | Path) -> str:
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Encoded:
  """A probe with its token ids."""
  probe: Probe
  prompt_ids: tuple[int, ...]
  target_ids: tuple[int, ...]
  """The expected text's ids (``logprob``); empty for the generation kinds."""


def encode(probes: Sequence[Probe], tokenizer: Tokenizer) -> list[Encoded]:
  """Every probe's prompt ids (and a logprob probe's expected ids), each text encoded
  on its own."""
  encoded = []
  for probe in probes:
    prompt_ids = tuple(tokenizer.encode(probe.prompt))
    target_ids = tuple(tokenizer.encode(probe.target)) if probe.kind == "logprob" else ()
    if not prompt_ids:
      raise DataError(f"{probe.where}: field 'prompt' encodes to no tokens")
    if probe.kind == "logprob" and not target_ids:
      raise DataError(f"{probe.where}: field 'expected' encodes to no tokens")
    encoded.append(Encoded(probe, prompt_ids, target_ids))
  return encoded


def _batches(items: Sequence[Encoded], key) -> list[list[int]]:
  """Indices of ``items`` grouped by ``key(item)`` (groups in order of first appearance),
  cut into batches of at most ``BATCH``."""
  groups: dict[Any, list[int]] = {}
  for index, item in enumerate(items):
    groups.setdefault(key(item), []).append(index)
  return [indices[i:i + BATCH] for indices in groups.values()
          for i in range(0, len(indices), BATCH)]


@partial(jax.jit, static_argnames="graphdef")
def _target_logprobs(graphdef: nnx.GraphDef, params: nnx.State,
                     batch: dict[str, jax.Array], mask_BxT: jax.Array) -> jax.Array:
  """float32 [B]: sum over the masked positions of log p(target | inputs before it)."""
  logits_BxTxV = objectives.batch_logits(nnx.merge(graphdef, params), batch)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  target_BxT = jnp.take_along_axis(logp_BxTxV, batch["targets"][..., None], axis=-1)[..., 0]
  return jnp.sum(target_BxT * mask_BxT, axis=-1)


def logprobs(graphdef: nnx.GraphDef, params: nnx.State, items: Sequence[Encoded],
             annotators: Mapping[str, pipeline.Annotator] = {}) -> list[float]:
  """The mean per-token log p(expected | prompt) of each logprob probe (module doc);
  ``annotators``: the run's per-token batch fields."""
  means = [0.0] * len(items)
  for indices in _batches(items, lambda e: len(e.prompt_ids) + len(e.target_ids)):
    rows = np.asarray([items[i].prompt_ids + items[i].target_ids for i in indices], np.int32)
    mask = np.zeros(rows[:, 1:].shape, np.float32)
    for row, i in enumerate(indices):  # target t predicts token t + 1
      mask[row, len(items[i].prompt_ids) - 1:] = 1.0
    batch = pipeline.annotate_rows({"inputs": rows[:, :-1], "targets": rows[:, 1:]},
                                   annotators, None)
    sums = np.asarray(_target_logprobs(graphdef, params, batch, mask))
    for row, i in enumerate(indices):
      means[i] = float(sums[row]) / len(items[i].target_ids)
  return means


def completions(graphdef: nnx.GraphDef, params: nnx.State, items: Sequence[Encoded],
                tokenizer: Tokenizer, inputs: tuple[sampling.DecodeInputs, ...] = ()
                ) -> list[str]:
  """The greedy completion of each generation probe, cut at the first EOS; ``inputs``:
  the run's decode inputs (``sampling.decode_inputs``)."""
  model = nnx.merge(graphdef, params)
  eos_id = tokenizer.eos_id if tokenizer.eos_id >= 0 else None
  texts = [""] * len(items)
  for indices in _batches(items, lambda e: (len(e.prompt_ids), e.probe.max_new_tokens)):
    first = items[indices[0]]
    prompts = np.asarray([items[i].prompt_ids for i in indices], np.int32)
    tokens = sampling.generate(model, prompts, first.probe.max_new_tokens, jax.random.key(0),
                               temperature=0.0, eos_id=eos_id, inputs=inputs)
    for row, new_ids in zip(indices, np.asarray(tokens)[:, prompts.shape[1]:].tolist()):
      if eos_id is not None and eos_id in new_ids:
        new_ids = new_ids[:new_ids.index(eos_id)]
      texts[row] = tokenizer.decode(new_ids)
  return texts


def _passes(probe: Probe, completion: str) -> bool:
  if probe.kind == "regex":
    return re.search(probe.target, completion) is not None
  return probe.target in completion


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Pass rate per generation kind and over both (``pass_rate``, None without any) and
  the mean of the logprob probes' ``logprob`` (``mean_logprob``, None without any)."""
  summary: dict[str, Any] = {"probes": len(results)}
  for kind in KINDS:
    of_kind = [r for r in results if r["kind"] == kind]
    if kind in GENERATED and of_kind:
      passed = sum(r["passed"] for r in of_kind)
      summary[kind] = {"probes": len(of_kind), "passed": passed,
                       "pass_rate": passed / len(of_kind)}
    elif of_kind:
      summary[kind] = {"probes": len(of_kind),
                       "mean_logprob": float(np.mean([r["logprob"] for r in of_kind]))}
  generated = [r for r in results if r["kind"] in GENERATED]
  summary["pass_rate"] = (sum(r["passed"] for r in generated) / len(generated)
                          if generated else None)
  summary["mean_logprob"] = summary.get("logprob", {}).get("mean_logprob")
  return summary


def score(graphdef: nnx.GraphDef, params: nnx.State, tokenizer: Tokenizer,
          items: Sequence[Encoded], *, annotators: Mapping[str, pipeline.Annotator] = {},
          inputs: tuple[sampling.DecodeInputs, ...] = ()) -> dict[str, Any]:
  """Every probe's result (in file order) and the ``aggregate``."""
  generated = [i for i, e in enumerate(items) if e.probe.kind in GENERATED]
  scored = [i for i, e in enumerate(items) if e.probe.kind == "logprob"]
  texts = dict(zip(generated, completions(graphdef, params, [items[i] for i in generated],
                                          tokenizer, inputs)))
  means = dict(zip(scored, logprobs(graphdef, params, [items[i] for i in scored],
                                    annotators)))
  results = []
  for index, item in enumerate(items):
    probe = item.probe
    result = {"id": probe.id, "kind": probe.kind, "prompt": probe.prompt,
              TARGET_FIELD[probe.kind]: probe.target}
    if probe.kind in GENERATED:
      result.update(completion=texts[index], passed=_passes(probe, texts[index]))
    else:
      result.update(logprob=means[index], tokens=len(item.target_ids))
    results.append(result)
  return {"aggregate": aggregate(results), "probes": results}


def gate_scores(scored: Mapping[str, Any]) -> dict[str, float]:
  """The figures of ``score``'s result a gate compares: ``probe_pass_rate`` and
  ``probe_logprob`` (NaN where there is no probe of that sort)."""
  total = scored["aggregate"]
  return {name: float("nan") if value is None else float(value)
          for name, value in (("probe_pass_rate", total["pass_rate"]),
                              ("probe_logprob", total["mean_logprob"]))}


def gate_scorer(cfg: Config, graphdef: nnx.GraphDef, eval_fn: Callable,
                eval_batches: Sequence[dict[str, jax.Array]], piece_bytes: jax.Array,
                tokenizer: Tokenizer | None) -> Callable[[TrainState], dict[str, float]]:
  """What a gate scores a train state by (``training.gates``): the eval loss of its
  model params (``training.step.model_params``) over the fixed ``eval_batches``
  (``eval_fn``: a jitted eval step) and, with ``gate.probes``, that file's
  ``gate_scores``. The file is read and encoded here: a bad one fails before training."""
  items, annotators, inputs = [], {}, ()
  if cfg.gate.probes:
    if tokenizer is None:
      raise ConfigError("gate.probes: the run has no tokenizer to encode the probes with")
    items = encode(read_probes(cfg.gate.probes), tokenizer)
    annotators = pipeline.batch_annotators(cfg, tokenizer)
    inputs = sampling.decode_inputs(cfg, tokenizer)

  def scores(state: TrainState) -> dict[str, float]:
    params = model_params(cfg, state)
    row = {"eval_loss": eval_lm.evaluate(eval_fn, params, eval_batches, piece_bytes)["eval_loss"]}
    if items:
      row.update(gate_scores(score(graphdef, params, tokenizer, items, annotators=annotators,
                                   inputs=inputs)))
    return row

  return scores


def evaluate_probes(workdir: Path, overrides: list[str], probes_file: str,
                    weights: str = tasks.RAW_WEIGHTS, artifact: str = "",
                    adapter: str = "") -> dict[str, Any]:
  """``score`` of ``eval.lm.load_weights``'s weights on the probes of ``probes_file``,
  with what was scored (``eval.lm.run_record``) and the file's sha256."""
  probes = read_probes(probes_file)  # a bad file is refused before anything loads
  cfg, graphdef, params, step, _, corpus, weights = eval_lm.load_weights(
      workdir, overrides, weights, artifact, adapter)
  if corpus.tokenizer is None:
    raise ConfigError("--probes: the run has no tokenizer to encode the probes with")
  items = encode(probes, corpus.tokenizer)
  scored = score(graphdef, params, corpus.tokenizer, items,
                 annotators=pipeline.batch_annotators(cfg, corpus.tokenizer),
                 inputs=sampling.decode_inputs(cfg, corpus.tokenizer))
  return {"task": "probes", **eval_lm.run_record(workdir, cfg, corpus, step, weights),
          "probes_file": str(probes_file), "probes_sha256": file_sha256(probes_file),
          **scored}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--probes", required=True, metavar="F.jsonl",
                      help="the probes file (jsonl: kind regex | substring | logprob)")
  eval_lm.add_weights_arguments(parser, batches=False)


def _run(args: argparse.Namespace) -> dict[str, Any]:
  return evaluate_probes(Path(args.workdir), args.set, args.probes, args.weights,
                         args.artifact, args.adapter)


PROBES = tasks.register(tasks.EvalTask("probes", _run, add_arguments))
"""``evaluate --task probes --probes F.jsonl [--weights raw|ema|swa | --artifact F]
[--adapter A]``."""
