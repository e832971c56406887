"""Tests of ttt_jax/data/pipeline.py: token windows, the grain training stream (order,
epochs, processes, workers, resumption), eval batches, document segment ids, per-token
batch fields."""

import pickle

import numpy as np
import pytest

from data_util import prepare_sample
from ttt_jax import errors, registry
from ttt_jax.config import Config, DataConfig
from ttt_jax.data import pipeline


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
  """A small real-source corpus, prepared once: (config, corpus, texts, log)."""
  return prepare_sample(tmp_path_factory.mktemp("sample"))


SEQ = 4


def window_ids(batch: dict[str, np.ndarray]) -> list[int]:
  """Window index of each row, for a token stream ``arange(n)``."""
  return (batch["inputs"][:, 0] // SEQ).tolist()


def take(dataset, steps: int) -> list[dict[str, np.ndarray]]:
  iterator = iter(dataset)
  return [next(iterator) for _ in range(steps)]


def make_dataset(num_windows: int = 12, **overrides):
  tokens = np.arange(num_windows * SEQ + 1, dtype=np.uint16)
  kwargs = dict(seq_len=SEQ, global_batch_size=4, seed=0, shuffle=True, process_index=0,
                process_count=1, worker_count=0)
  return pipeline.train_dataset(tokens, **{**kwargs, **overrides})


def test_windows_are_shifted_pairs_sharing_one_boundary_token():
  tokens = np.arange(3 * SEQ + 2, dtype=np.uint16)
  source = pipeline.TokenWindows(tokens, SEQ)
  assert len(source) == 3
  np.testing.assert_array_equal(source[1]["inputs"], [4, 5, 6, 7])
  np.testing.assert_array_equal(source[1]["targets"], [5, 6, 7, 8])
  batch = take(make_dataset(shuffle=False), 1)[0]
  assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (4, SEQ)
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


def test_order_is_a_function_of_the_seed():
  first = [window_ids(b) for b in take(make_dataset(seed=3), 6)]
  assert first == [window_ids(b) for b in take(make_dataset(seed=3), 6)]
  assert first != [window_ids(b) for b in take(make_dataset(seed=4), 6)]
  assert [window_ids(b) for b in take(make_dataset(shuffle=False), 4)] == [
      [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [0, 1, 2, 3]]


def test_iterates_epochs_each_a_fresh_permutation():
  stream = [i for b in take(make_dataset(), 9) for i in window_ids(b)]
  epochs = [stream[i:i + 12] for i in range(0, 36, 12)]
  assert all(sorted(epoch) == list(range(12)) for epoch in epochs)
  assert len({tuple(epoch) for epoch in epochs}) == 3


@pytest.mark.parametrize("num_windows", [16, 13])
def test_processes_split_each_global_batch(num_windows):
  """Each step, the processes' batches together are the single-process global batch,
  also across epoch boundaries (13 windows: a batch may then hold a window twice)."""
  steps = 8
  single = take(make_dataset(num_windows), steps)
  per_process = [take(make_dataset(num_windows, process_index=p, process_count=2), steps)
                 for p in range(2)]
  for step in range(steps):
    a, b = (window_ids(per_process[p][step]) for p in range(2))
    assert len(a) == len(b) == 2
    assert sorted(a + b) == sorted(window_ids(single[step]))
    if num_windows == 16:  # epochs align with steps: no window twice in a step
      assert not set(a) & set(b)
  with pytest.raises(errors.DataError, match="global batch size 5.*process count 2"):
    make_dataset(global_batch_size=5, process_count=2)


def test_iterator_state_round_trip():
  iterator = iter(make_dataset(seed=7))
  for _ in range(5):
    next(iterator)
  state = iterator.get_state()
  expected = [window_ids(next(iterator)) for _ in range(6)]
  resumed = iter(make_dataset(seed=7))  # a fresh pipeline, as after a restart
  resumed.set_state(state)
  assert [window_ids(next(resumed)) for _ in range(6)] == expected


def test_worker_processes_are_deterministic_and_resumable():
  dataset = make_dataset(40, worker_count=2)
  iterator = iter(dataset)
  first = [window_ids(next(iterator)) for _ in range(3)]
  state = iterator.get_state()
  expected = [window_ids(next(iterator)) for _ in range(12)]
  iterator.close()
  resumed = iter(dataset)
  resumed.set_state(state)
  assert [window_ids(next(resumed)) for _ in range(12)] == expected
  resumed.close()
  stream = [i for ids in first + expected for i in ids]
  assert sorted(stream[:40]) == list(range(40))


def test_memmap_source_pickles_by_reference(tmp_path):
  np.arange(100, dtype=np.uint16).tofile(tmp_path / "t.bin")
  tokens = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r", offset=20, shape=(50,))
  source = pipeline.TokenWindows(tokens, SEQ)
  blob = pickle.dumps(source)
  assert len(blob) < 400
  clone = pickle.loads(blob)
  np.testing.assert_array_equal(clone[3]["inputs"], [22, 23, 24, 25])


def test_eval_batches_in_order_and_split_across_processes():
  tokens = np.arange(10 * SEQ + 1, dtype=np.uint16)  # 10 windows
  kwargs = dict(seq_len=SEQ, batch_size=4, num_batches=5)
  single = pipeline.eval_batches(tokens, process_index=0, process_count=1, **kwargs)
  assert [window_ids(b) for b in single] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # only 2 full
  halves = [pipeline.eval_batches(tokens, process_index=p, process_count=2, **kwargs)
            for p in range(2)]
  for i, batch in enumerate(single):
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(
          np.concatenate([halves[0][i][key], halves[1][i][key]]), batch[key])
  np.testing.assert_array_equal(single[1]["targets"][-1], [29, 30, 31, 32])
  with pytest.raises(errors.DataError, match="fewer than one eval batch of 16"):
    pipeline.eval_batches(tokens, seq_len=SEQ, batch_size=16, num_batches=1,
                          process_index=0, process_count=1)


def expected_segment_ids(inputs: np.ndarray, eos_id: int) -> list[int]:
  """Loop reference: the number of EOS tokens among inputs[0..t-1]."""
  ids, count = [], 0
  for token in inputs:
    ids.append(count)
    count += int(token == eos_id)
  return ids


def test_segment_ids_count_the_eos_before_each_input_token():
  eos = 0
  #          window 0 (inputs 0..7)    | window 1                 | window 2
  tokens = [eos, 3, 4, eos, eos, 5, 6, 7, 8, eos, 1, 2, 3, 4, 5, eos, 9, 9, eos, 9, 9, 9, 9, 9, 9]
  source = pipeline.TokenWindows(np.asarray(tokens, np.uint16), 8, eos_id=eos)
  assert len(source) == 3
  expected = [[0, 1, 1, 1, 2, 3, 3, 3],  # an EOS first: the next token starts document 1
              [0, 0, 1, 1, 1, 1, 1, 1],  # the window's last input is an EOS: no id for it
              [0, 0, 0, 1, 1, 1, 1, 1]]
  for index, ids in enumerate(expected):
    example = source[index]
    assert example["segment_ids"].dtype == np.int32
    np.testing.assert_array_equal(example["segment_ids"], ids)
    assert ids == expected_segment_ids(example["inputs"], eos)
  assert "segment_ids" not in pipeline.TokenWindows(np.asarray(tokens, np.uint16), 8)[0]
  batch = take(make_dataset(), 1)[0]
  assert set(batch) == {"inputs", "targets"}
  # The same windows in the same order, and the same (position-only) iterator state, so
  # checkpoints resume with the option on or off.
  plain, masked = iter(make_dataset(seed=7)), iter(make_dataset(seed=7, eos_id=5))
  for _ in range(3):
    a, b = next(plain), next(masked)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert b["segment_ids"].tolist() == [expected_segment_ids(row, 5) for row in b["inputs"]]
  assert plain.get_state() == masked.get_state()
  resumed = iter(make_dataset(seed=7, eos_id=5))
  resumed.set_state(plain.get_state())
  for _ in range(3):
    a, b = next(masked), next(resumed)
    for key in ("inputs", "targets", "segment_ids"):
      np.testing.assert_array_equal(a[key], b[key])


def test_segment_ids_of_train_windows_and_eval_batches_agree_on_real_text(sample):
  _, corpus, _, _ = sample
  eos, seq_len = corpus.tokenizer.eos_id, 32
  tokens = corpus.train_tokens[:10000]  # the first few documents
  source = pipeline.TokenWindows(tokens, seq_len, eos_id=eos)
  steps = len(source) // 4  # every full batch of the val split
  train = take(pipeline.train_dataset(tokens, seq_len=seq_len, global_batch_size=4, seed=0,
                                      shuffle=False, process_index=0, process_count=1,
                                      worker_count=0, eos_id=eos), steps)
  evals = pipeline.eval_batches(tokens, seq_len=seq_len, batch_size=4, num_batches=steps,
                                process_index=0, process_count=1, eos_id=eos)
  plain = pipeline.eval_batches(tokens, seq_len=seq_len, batch_size=4, num_batches=1,
                                process_index=0, process_count=1)
  assert len(evals) == steps and "segment_ids" not in plain[0]
  resets = 0
  for step in range(steps):
    for key in ("inputs", "targets", "segment_ids"):
      np.testing.assert_array_equal(train[step][key], evals[step][key])
    for row in range(4):
      window = source[4 * step + row]
      np.testing.assert_array_equal(train[step]["segment_ids"][row], window["segment_ids"])
      assert window["segment_ids"].tolist() == expected_segment_ids(window["inputs"], eos)
      resets += int(window["segment_ids"][-1])
  assert resets > 0  # some windows hold a document end


def parity(tokens_T: np.ndarray) -> np.ndarray:
  """A per-token batch field for the tests: each input token's parity."""
  return (np.asarray(tokens_T) % 2).astype(np.int32)


def running_count(tokens_T: np.ndarray) -> np.ndarray:
  """A field that depends on the whole window: tokens before each one."""
  return np.arange(len(tokens_T), dtype=np.int32)


def test_annotators_add_one_field_each_and_keep_the_order_and_state():
  annotators = {"parity": parity, "count": running_count}
  example = pipeline.TokenWindows(np.arange(3 * SEQ + 1, dtype=np.uint16), SEQ, annotators)[2]
  assert list(example) == ["inputs", "targets", "parity", "count"]
  np.testing.assert_array_equal(example["parity"], [0, 1, 0, 1])
  np.testing.assert_array_equal(example["count"], [0, 1, 2, 3])
  plain, annotated = iter(make_dataset(seed=7)), iter(make_dataset(seed=7, annotators=annotators))
  for _ in range(5):
    a, b = next(plain), next(annotated)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(b["parity"], b["inputs"] % 2)
    np.testing.assert_array_equal(b["count"], np.tile(np.arange(SEQ), (4, 1)))
  assert plain.get_state() == annotated.get_state()
  tokens = np.arange(10 * SEQ + 1, dtype=np.uint16)
  for batch in pipeline.eval_batches(tokens, seq_len=SEQ, batch_size=4, num_batches=2,
                                     process_index=0, process_count=1,
                                     annotators=annotators):
    assert batch["parity"].shape == batch["count"].shape == batch["inputs"].shape
    np.testing.assert_array_equal(batch["parity"], batch["inputs"] % 2)


def test_annotators_travel_with_the_source_to_grain_workers():
  source = pipeline.TokenWindows(np.arange(3 * SEQ + 1, dtype=np.uint16), SEQ,
                                 {"parity": parity})
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[1]["parity"], [0, 1, 0, 1])


def test_batch_annotators_keep_the_fields_a_config_uses(monkeypatch):
  fields = registry.Registry("batch field", "batch field")
  fields.register("parity", lambda cfg, tokenizer: parity if cfg.data.seq_len == 8 else None)
  fields.register("unused", lambda cfg, tokenizer: None)
  monkeypatch.setattr(registry, "BATCH_FIELDS", fields)
  assert pipeline.batch_annotators(Config(data=DataConfig(seq_len=8)), None) == {
      "parity": parity}
  assert pipeline.batch_annotators(Config(data=DataConfig(seq_len=16)), None) == {}
