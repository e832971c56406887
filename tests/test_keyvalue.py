"""ttt_jax.data.keyvalue: the task and its files are pure functions of the seed, the
documents follow the templates, answer tokens are split where training sees them,
padded log-probs equal unpadded ones; end to end (slow), pretraining on the kit teaches
copying from the demonstration but not the secret mapping, and the SFT baseline learns
the mapping while its general loss rises."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax import train as train_lib
from ttt_jax.config import ModelConfig, load_config
from ttt_jax.data import keyvalue as kv
from ttt_jax.data.tokenizer import train_tokenizer
from ttt_jax.errors import ConfigError
from ttt_jax.models.lm import LM

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "keyvalue_tiny.yaml")
SMALL = kv.Sizes(copy_docs=40, student_docs=20, general_docs=20, general_test_docs=5,
                 demos=12, test=6)


def test_task_is_a_pure_function_of_the_seed():
  task = kv.make_task(3)
  assert task == kv.make_task(3) and task != kv.make_task(4)
  assert len(set(task.keys)) == 16 and len(set(task.values)) == 16
  assert not set(task.keys) & set(task.values)
  assert set(task.secret) == set(task.keys) and set(task.secret.values()) <= set(task.values)
  with pytest.raises(ConfigError, match="slots"):
    kv.make_task(0, n_keys=3, slots=4)


def test_documents_follow_the_teacher_and_student_templates():
  task = kv.make_task(0)
  documents = kv.pretrain_documents(task, 0, SMALL)
  assert len(documents) == SMALL.copy_docs + SMALL.student_docs + SMALL.general_docs
  copies = [d for d in documents if d.startswith("<Question>\n")]
  students = [d for d in documents if d.startswith("Q ")]
  assert len(copies) == SMALL.copy_docs and len(students) == SMALL.student_docs
  for document in copies:  # the response is the demonstration copied
    context, response = document.rsplit("\n", 1)
    prompt = context.split("\n")[1] + "\n"
    demonstration = context.split("<Demonstration>\n")[1].split("\n")[0]
    assert document == kv.teacher_context(prompt, demonstration) + response
    assert response == demonstration and response.startswith("A ")
    assert all(word in task.values for word in response.split()[1:])
    assert all(word in task.keys for word in prompt.split()[1:])
  for document in students:
    prompt, answer = document.split("\n")
    assert document == kv.student_context(prompt + "\n") + answer
    assert len(prompt.split()) == len(answer.split()) == 1 + task.slots
  assert kv.TEACHER_TEMPLATE.format(prompt="P", demonstration="D") + "R" == (
      "<Question>\nP\n\nThis is an example for a response to the question:\n"
      "<Demonstration>\nD\n\nNow answer with a response of your own, including the thinking "
      "process:\nR")


def test_test_prompts_are_new_combinations_and_demos_cover_every_key():
  task = kv.make_task(1)
  demos, test = kv.split_prompts(task, 1, 20, 10)
  assert len(set(demos)) == 20 and len(set(test)) == 10 and not set(demos) & set(test)
  assert {k for keys in demos for k in keys} == set(task.keys)
  assert all(len(set(keys)) == task.slots for keys in demos + test)
  assert (demos, test) == kv.split_prompts(task, 1, 20, 10)
  records = kv.items(task, test)
  assert records[0]["demonstration"] == kv.answer_text([task.secret[k] for k in test[0]])
  with pytest.raises(ConfigError, match="key combinations"):
    kv.split_prompts(task, 1, 30000, 10)


def test_kit_files_are_identical_for_a_seed(tmp_path):
  first = kv.write_kit(tmp_path / "a", 5, SMALL)
  second = kv.write_kit(tmp_path / "b", 5, SMALL)
  assert list(first) == list(kv.FILES)
  for name in kv.FILES:
    assert first[name].read_bytes() == second[name].read_bytes(), name
  assert first["demos.jsonl"].read_bytes() != kv.write_kit(
      tmp_path / "c", 6, SMALL)["demos.jsonl"].read_bytes()
  demos = kv.read_jsonl(first["demos.jsonl"])
  assert len(demos) == SMALL.demos and set(demos[0]) == {"prompt", "demonstration"}
  assert [r["text"] for r in kv.read_jsonl(first["sft.jsonl"])] == [
      r["prompt"] + r["demonstration"] for r in demos]
  assert demos[0]["prompt"].startswith("Q ") and demos[0]["prompt"].endswith("\n")
  assert len(kv.read_jsonl(first["test.jsonl"])) == SMALL.test
  assert all(set(json.loads(line)) == {"text"}
             for line in first["pretrain.jsonl"].read_text().splitlines())


def test_command_line_writes_the_kit(tmp_path, capsys):
  kv.main(["--out", str(tmp_path), "--seed", "2"])
  assert capsys.readouterr().out.split() == [str(tmp_path / name) for name in kv.FILES]
  assert kv.read_jsonl(tmp_path / "demos.jsonl") == kv.items(
      kv.make_task(2), kv.split_prompts(kv.make_task(2), 2, kv.Sizes().demos,
                                        kv.Sizes().test)[0])


@pytest.fixture(scope="module")
def tokenizer():
  return train_tokenizer(kv.pretrain_documents(kv.make_task(0), 0, kv.Sizes(copy_docs=200)),
                         vocab_size=400, max_sentences=10000)


def test_answer_tokens_are_the_whole_texts_tokens_after_the_context(tokenizer):
  record = kv.items(kv.make_task(0), kv.split_prompts(kv.make_task(0), 0, 1, 1)[1])[0]
  for context in (kv.teacher_context(record["prompt"], record["demonstration"]),
                  kv.student_context(record["prompt"])):
    context_ids, answer_ids = kv.answer_tokens(tokenizer, context, record["demonstration"])
    assert context_ids + answer_ids == tokenizer.encode(context + record["demonstration"])
    assert tokenizer.decode(answer_ids) == record["demonstration"]
  text = kv.student_context(record["prompt"]) + record["demonstration"]
  ids = tokenizer.encode(text)
  long = next(i for i, t in enumerate(ids) if len(tokenizer.decode([t])) >= 2)
  cut = len(tokenizer.decode(ids[:long])) + 1  # inside that piece
  with pytest.raises(ValueError, match="crosses the end of the context"):
    kv.answer_tokens(tokenizer, text[:cut], text[cut:])


@pytest.mark.slow
def test_padded_log_probs_equal_each_sequences_own_forward():
  model = LM(ModelConfig(n_layers=1, d_model=32, n_heads=2), 50, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  sequences = [(rng.integers(0, 50, p).tolist(), rng.integers(0, 50, s).tolist())
               for p, s in ((3, 4), (7, 2), (1, 9), (5, 5), (2, 1))]
  scores = kv.scored_log_probs(model, sequences, batch_size=2, pad_multiple=8)
  for (prefix, scored), got in zip(sequences, scores):
    tokens = jnp.asarray([prefix + scored])
    log_probs = jax.nn.log_softmax(model(tokens[:, :-1]), axis=-1)[0]
    want = [log_probs[len(prefix) - 1 + i, t] for i, t in enumerate(scored)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_teacher_gain_is_the_difference_of_mean_answer_log_probs(tokenizer):
  model = LM(ModelConfig(n_layers=1, d_model=32, n_heads=2), tokenizer.vocab_size,
             rngs=nnx.Rngs(1))
  records = kv.items(kv.make_task(0), kv.split_prompts(kv.make_task(0), 0, 2, 3)[1])
  gain = kv.teacher_gain(model, tokenizer, records)
  student = [kv.answer_tokens(tokenizer, kv.student_context(r["prompt"]), r["demonstration"])
             for r in records]
  want = np.mean(np.concatenate(kv.scored_log_probs(model, student)))
  assert gain["student_log_prob"] == pytest.approx(want, rel=1e-6)
  assert gain["gain"] == pytest.approx(gain["teacher_log_prob"] - gain["student_log_prob"])
  assert 0.0 <= kv.exact_match(model, tokenizer, records) <= 1.0


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """(kit, cache, base run) of ``configs/keyvalue_tiny.yaml`` pretrained on a kit."""
  root = tmp_path_factory.mktemp("keyvalue")
  kit = root / "kit"
  kv.write_kit(kit, seed=0)
  cfg = load_config(CONFIG, kv.pretrain_overrides(kit, root / "cache"))
  train_lib.train(cfg, root / "base")
  return kit, root / "cache", root / "base"


@pytest.mark.slow
def test_pretraining_teaches_copying_from_the_demonstration_not_the_mapping(pretrained):
  kit, _, base = pretrained
  result = kv.measure(base, kit)
  print(f"pretrained: {result}")
  assert result["gain"] >= 1.0
  assert result["exact_match"] <= 0.1


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_baseline_learns_the_mapping_and_its_general_loss_rises(pretrained, tmp_path, lora):
  kit, cache, base = pretrained
  before = kv.measure(base, kit)
  cfg = load_config(CONFIG, kv.sft_overrides(kit, cache, base, lora=lora))
  train_lib.train(cfg, tmp_path / "sft")
  after = kv.measure(tmp_path / "sft", kit)
  print(f"SFT ({'lora' if lora else 'full'}): {after}; general loss "
        f"{before['general_loss']:.3f} -> {after['general_loss']:.3f}")
  # 150 steps: full SFT ~1, LoRA ~0.5-0.8 (the general loss rises ~6x either way)
  assert after["exact_match"] >= 0.25 > before["exact_match"]
  assert after["general_loss"] > before["general_loss"]
