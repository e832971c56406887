"""CCT step boundaries: the per-token ``step_ids`` batch field (``data.step_boundaries``).

A CCT model commits a summary at the end of every reasoning step, so each input token
carries the id of its step: 0 at a window's first token and +1 at each boundary.

  fixed     step_ids[t] = t // step_len
  semantic  a step ends before the token holding the first character after a sentence
            end ('. ', '? ', '! ' before a capital) or a paragraph break, and after an
            EOS or ``<STEP>`` piece; boundaries under ``step_min_len`` tokens into a step
            are skipped, and a step is cut after ``step_len`` tokens.

``StepAnnotator`` computes them for a whole window (registered as the ``step_ids`` field
of ``registry.BATCH_FIELDS``); ``StepAnnotator.online_tables`` gives the same semantic
rule as tables of ``sentence_end_automaton``, read one token at a time in generation
(``cct.mixer.StepRule``).
"""

from __future__ import annotations

import re

import numpy as np

from ttt_jax import registry
from ttt_jax.config import Config
from ttt_jax.data.tokenizer import STEP_PIECE, Tokenizer
from ttt_jax.errors import DataError

_SENTENCE_END = re.compile(r"[.?!] (?=[A-Z])|\n\n")
"""A sentence end ('. ', '? ', '! ' before a capital) or a paragraph break; the match's
end is the first character of the next step."""

TEXT_STATES = 5
"""States of ``sentence_end_automaton``: 0 other, 1 after [.?!], 2 after '[.?!] ',
3 after an odd run of newlines, 4 after an even (>= 2) run of newlines."""


def sentence_end_automaton(text: str, state: int) -> tuple[bool, int]:
  """``_SENTENCE_END`` read one piece at a time: (some match of it ends inside ``text``,
  i.e. a character of ``text`` is the first of a step; the state after ``text``), given
  the state after the text before it. Exact: a match end is a capital after '[.?!] ',
  or any character after 2k newlines of a run (finditer splits a run into pairs)."""
  starts = False
  for char in text:
    starts |= (state == 2 and "A" <= char <= "Z") or state == 4
    if char in ".?!":
      state = 1
    elif char == " ":
      state = 2 if state == 1 else 0
    elif char == "\n":
      state = 4 if state == 3 else 3
    else:
      state = 0
  return starts, state


def _piece_texts(tokenizer: Tokenizer) -> list[str]:
  """The text each piece decodes to (byte pieces: their ASCII character or one U+FFFD)."""
  processor = tokenizer.processor
  texts = []
  for piece_id in range(tokenizer.vocab_size):
    piece = processor.id_to_piece(piece_id)
    if processor.is_byte(piece_id):
      byte = int(piece[3:5], 16)
      texts.append(chr(byte) if byte < 128 else "\ufffd")
    elif processor.is_control(piece_id) or processor.is_unknown(piece_id):
      texts.append("")
    else:
      texts.append(piece.replace("\u2581", " "))
  return texts


class StepAnnotator:
  """Per-token step ids of a window of input tokens (``data.step_boundaries``).

  fixed: token t of the window is in step t // step_len.
  semantic: a step ends before the token holding the first character after a sentence
  end or paragraph break (``_SENTENCE_END`` over the pieces' text), and after an EOS or
  ``<STEP>`` piece; a candidate less than ``step_min_len`` tokens into the step is
  skipped, and a step is cut after ``step_len`` tokens.
  """

  def __init__(self, mode: str, step_len: int, step_min_len: int,
               tokenizer: Tokenizer | None = None):
    if mode not in ("fixed", "semantic"):
      raise DataError(f"data.step_boundaries: no annotator for {mode!r}")
    self.mode, self.step_len, self.step_min_len = mode, step_len, step_min_len
    self.piece_texts: list[str] = []
    self.boundary_after: np.ndarray = np.zeros(0, bool)
    if mode == "semantic":
      if tokenizer is None:
        raise DataError("data.step_boundaries=semantic: needs a sentencepiece tokenizer "
                        "(a packed .bin corpus without data.tokenizer has none)")
      self.piece_texts = _piece_texts(tokenizer)
      self.boundary_after = np.zeros(tokenizer.vocab_size, bool)
      self.boundary_after[tokenizer.eos_id] = True
      step_id = tokenizer.processor.piece_to_id(STEP_PIECE)
      if step_id != tokenizer.unk_id:
        self.boundary_after[step_id] = True

  def candidates(self, tokens_T: np.ndarray) -> np.ndarray:
    """semantic: True where a step may start (before filtering by length)."""
    texts = [self.piece_texts[t] for t in tokens_T]
    lengths_T = np.fromiter(map(len, texts), np.int64, len(texts))
    starts_T = np.cumsum(lengths_T) - lengths_T
    text = "".join(texts)
    starts = np.zeros(len(tokens_T), bool)
    for match in _SENTENCE_END.finditer(text):
      if match.end() < len(text):
        starts[np.searchsorted(starts_T, match.end(), side="right") - 1] = True
    starts[1:] |= self.boundary_after[tokens_T[:-1]]
    starts[0] = False
    return starts

  def online_tables(self) -> tuple[np.ndarray, np.ndarray]:
    """semantic: (candidate [TEXT_STATES, V] bool, next state [TEXT_STATES, V] int32) of
    ``sentence_end_automaton`` for every piece and text state, so that the candidates
    can be found one token at a time (``cct.mixer.StepRule``, used in generation)."""
    if self.mode != "semantic":
      raise DataError(f"data.step_boundaries: {self.mode!r} steps have no online tables")
    candidate = np.zeros((TEXT_STATES, len(self.piece_texts)), bool)
    next_state = np.zeros((TEXT_STATES, len(self.piece_texts)), np.int32)
    for state in range(TEXT_STATES):
      for piece_id, text in enumerate(self.piece_texts):
        candidate[state, piece_id], next_state[state, piece_id] = sentence_end_automaton(
            text, state)
    return candidate, next_state

  def __call__(self, tokens_T: np.ndarray) -> np.ndarray:
    tokens_T = np.asarray(tokens_T, np.int64)
    if self.mode == "fixed":
      return (np.arange(len(tokens_T)) // self.step_len).astype(np.int32)
    candidates = self.candidates(tokens_T)
    step_ids = np.zeros(len(tokens_T), np.int32)
    step, length = 0, 0
    for t in range(len(tokens_T)):
      if length >= self.step_len or (candidates[t] and length >= self.step_min_len):
        step, length = step + 1, 0
      step_ids[t] = step
      length += 1
    return step_ids


@registry.BATCH_FIELDS.register("step_ids")
def step_annotator(cfg: Config, tokenizer: Tokenizer | None) -> StepAnnotator | None:
  """The annotator of ``cfg.data.step_boundaries`` (None for 'none')."""
  data = cfg.data
  if data.step_boundaries == "none":
    return None
  return StepAnnotator(data.step_boundaries, data.step_len, data.step_min_len, tokenizer)

