"""Probes (``ttt_jax.eval.probes``): the file format and its one-line refusals, the
aggregates, and each kind scored on a tiny model against what the model does on its
own: the logprob probe against a hand-computed teacher-forced mean, the regex and
substring probes against a greedy completion computed first. (The command on a trained,
gated run: tests/test_gates.py.)"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from ttt_jax import evaluate
from ttt_jax.config import load_config
from ttt_jax.errors import DataError
from ttt_jax.eval import probes
from ttt_jax.inference import sampling
from ttt_jax.models import lm
from ttt_jax.training import objectives
from data_util import prepare_sample

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "probes_python.jsonl"


def _write(path: Path, *records) -> Path:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                          for r in records))
  return path


def test_the_example_file_reads_with_ids_and_defaults(tmp_path):
  read = probes.read_probes(EXAMPLE)
  assert {p.kind for p in read} == set(probes.KINDS)
  path = _write(tmp_path / "p.jsonl", {"kind": "substring", "prompt": "a", "expected": "b"},
                "", {"id": "x", "kind": "logprob", "prompt": "a", "expected": "b"})
  first, second = probes.read_probes(path)
  assert (first.id, first.max_new_tokens, first.target) == ("substring-1", 32, "b")
  assert (second.id, second.max_new_tokens, second.where) == ("x", 0, f"{path}:3")


@pytest.mark.parametrize("line, message", [
    ('{"kind": "regex", "prompt": "a"', r"not a JSON object"),
    ('["regex"]', r"not a JSON object$"),
    ('{"kind": "fuzzy", "prompt": "a", "expected": "b"}', r"field 'kind': 'fuzzy' is not one of"),
    ('{"prompt": "a", "expected": "b"}', r"missing field 'kind'$"),
    ('{"kind": "regex", "prompt": "a"}', r"missing field 'pattern'$"),
    ('{"kind": "regex", "prompt": "a", "pattern": "(unclosed"}',
     r"field 'pattern': '\(unclosed' is not a valid regular expression \(missing \), "),
    ('{"kind": "substring", "prompt": 3, "expected": "b"}',
     r"field 'prompt' must be a string, got 3"),
    ('{"kind": "substring", "prompt": "a", "expected": "b", "max_new_tokens": 0}',
     r"field 'max_new_tokens' must be >= 1, got 0"),
    ('{"kind": "substring", "prompt": "a", "expected": "b", "max_new_tokens": true}',
     r"field 'max_new_tokens' must be an integer, got True"),
    ('{"kind": "logprob", "prompt": "a", "expected": "b", "max_new_tokens": 4}',
     r"unknown field 'max_new_tokens' for kind 'logprob'"),
])
def test_a_bad_probe_is_refused_naming_file_line_and_field(tmp_path, line, message):
  path = _write(tmp_path / "p.jsonl", {"kind": "logprob", "prompt": "a", "expected": "b"}, line)
  with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: {message}") as error:
    probes.read_probes(path)
  assert "\n" not in str(error.value)


def test_an_empty_or_missing_file_is_refused(tmp_path):
  with pytest.raises(DataError, match=r"p.jsonl: holds no probes$"):
    probes.read_probes(_write(tmp_path / "p.jsonl", ""))
  with pytest.raises(DataError, match=r"q.jsonl: no such probes file$"):
    probes.read_probes(tmp_path / "q.jsonl")


def test_lines_are_split_at_newlines_only_and_bad_bytes_are_refused_naming_the_line(tmp_path):
  prompt = "a\u2028b\x85c"  # line separators JSON strings may hold as they are
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps({"kind": "logprob", "prompt": "x", "expected": "y"}) + "\r\n"
                  + json.dumps({"kind": "logprob", "prompt": prompt, "expected": "d"},
                               ensure_ascii=False) + "\n", encoding="utf-8")
  read = probes.read_probes(path)
  assert [(p.id, p.prompt) for p in read] == [("logprob-1", "x"), ("logprob-2", prompt)]
  path.write_bytes(path.read_bytes() + b'{"kind": "logprob", "prompt": "\xff"}\n')
  with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: not UTF-8 text") as error:
    probes.read_probes(path)
  assert "\n" not in str(error.value)


def test_the_command_refuses_a_bad_probes_file_in_one_line(tmp_path, capsys):
  path = _write(tmp_path / "bad.jsonl", {"kind": "regex", "prompt": "a", "pattern": "[z-a]"})
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--workdir", str(tmp_path / "run"), "--task", "probes", "--probes",
                   str(path)])
  assert exit_info.value.code != 0  # evaluate reports a task's ValueError as a config error
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      f"error: {path}:1: field 'pattern': '[z-a]' is not a valid regular expression"), err


def test_aggregates_are_pass_rates_per_kind_and_the_mean_logprob():
  results = [{"kind": "regex", "passed": True}, {"kind": "regex", "passed": False},
             {"kind": "substring", "passed": True}, {"kind": "logprob", "logprob": -1.0},
             {"kind": "logprob", "logprob": -2.0}]
  summary = probes.aggregate(results)
  assert summary["regex"] == {"probes": 2, "passed": 1, "pass_rate": 0.5}
  assert summary["substring"] == {"probes": 1, "passed": 1, "pass_rate": 1.0}
  assert summary["pass_rate"] == 2 / 3 and summary["mean_logprob"] == -1.5
  assert probes.gate_scores({"aggregate": summary}) == {"probe_pass_rate": 2 / 3,
                                                       "probe_logprob": -1.5}
  only_logprob = probes.aggregate(results[3:])
  assert only_logprob["pass_rate"] is None and "regex" not in only_logprob
  scores = probes.gate_scores({"aggregate": only_logprob})
  assert math.isnan(scores["probe_pass_rate"]) and scores["probe_logprob"] == -1.5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  _, corpus, _, _ = prepare_sample(tmp_path_factory.mktemp("probes"))
  return corpus.tokenizer


def test_texts_that_encode_to_nothing_are_refused(tokenizer, tmp_path):
  path = _write(tmp_path / "p.jsonl", {"kind": "logprob", "prompt": "x = ", "expected": ""})
  with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: field 'expected' encodes "
                                      "to no tokens$"):
    probes.encode(probes.read_probes(path), tokenizer)


@pytest.fixture(scope="module")
def model(tokenizer):
  cfg = load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=2",
                           "model.ffn.d_ff=64", "data.seq_len=64"])
  return nnx.split(lm.LM(cfg.model, tokenizer.vocab_size, rngs=nnx.Rngs(3)))


def _mean_logprob(graphdef, params, prompt_ids, expected_ids) -> float:
  """(1/E) sum_i log p(e_i | prompt, e_<i) of one unbatched forward."""
  ids = np.asarray([list(prompt_ids) + list(expected_ids)], np.int32)
  logits = objectives.batch_logits(nnx.merge(graphdef, params), {"inputs": ids[:, :-1]})
  logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))[0]
  start = len(prompt_ids) - 1
  return sum(logp[start + i, e] for i, e in enumerate(expected_ids)) / len(expected_ids)


@pytest.mark.slow
def test_logprob_probes_are_the_teacher_forced_mean_of_the_expected_tokens(tokenizer, model,
                                                                         tmp_path):
  graphdef, params = model
  pairs = [("    def close(", "self):"), ("import ", "json"), ("x = ", "None"),
           ("for i in ", "range(n):")]
  path = _write(tmp_path / "p.jsonl", *[{"kind": "logprob", "prompt": p, "expected": e}
                                        for p, e in pairs])
  items = probes.encode(probes.read_probes(path), tokenizer)
  # prompt and expected are encoded on their own: the ids are not those of the joined text
  assert [i.prompt_ids for i in items] == [tuple(tokenizer.encode(p)) for p, _ in pairs]
  assert [i.target_ids for i in items] == [tuple(tokenizer.encode(e)) for _, e in pairs]
  result = probes.score(graphdef, params, tokenizer, items)
  expected = [_mean_logprob(graphdef, params, i.prompt_ids, i.target_ids) for i in items]
  got = [r["logprob"] for r in result["probes"]]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert all(value < 0 for value in got)
  assert result["aggregate"]["mean_logprob"] == pytest.approx(np.mean(got))
  assert [r["tokens"] for r in result["probes"]] == [len(i.target_ids) for i in items]
  assert probes.score(graphdef, params, tokenizer, items) == result  # deterministic


def _greedy(graphdef, params, tokenizer, prompt: str, max_new_tokens: int) -> str:
  ids = np.asarray([tokenizer.encode(prompt)], np.int32)
  tokens = sampling.generate(nnx.merge(graphdef, params), ids, max_new_tokens,
                             jax.random.key(1), temperature=0.0, eos_id=tokenizer.eos_id)
  new_ids = np.asarray(tokens)[0, ids.shape[1]:].tolist()
  if tokenizer.eos_id in new_ids:
    new_ids = new_ids[:new_ids.index(tokenizer.eos_id)]
  return tokenizer.decode(new_ids)


@pytest.mark.slow
def test_regex_and_substring_probes_check_the_greedy_completion(tokenizer, model, tmp_path):
  graphdef, params = model
  prompts = ["def ", "class Foo", "    return "]
  completions = {p: _greedy(graphdef, params, tokenizer, p, 6) for p in prompts}
  assert all(len(text) >= 2 for text in completions.values()), completions
  records, expected = [], []
  for prompt, text in completions.items():
    for kind, target, passes in (("substring", text[:2], True),
                                 ("substring", text + "\x00", False),
                                 ("regex", re.escape(text[-2:]) + "$", True),
                                 ("regex", "^" + re.escape(text) + "x", False)):
      records.append({"kind": kind, "prompt": prompt, probes.TARGET_FIELD[kind]: target,
                      "max_new_tokens": 6})
      expected.append(passes)
  path = _write(tmp_path / "p.jsonl", *records)
  result = probes.score(graphdef, params, tokenizer,
                        probes.encode(probes.read_probes(path), tokenizer))
  assert [r["completion"] for r in result["probes"]] == [
      completions[r["prompt"]] for r in records]
  assert [r["passed"] for r in result["probes"]] == expected
  assert result["aggregate"]["regex"]["pass_rate"] == 0.5
  assert result["aggregate"]["pass_rate"] == 0.5 and result["aggregate"]["mean_logprob"] is None
