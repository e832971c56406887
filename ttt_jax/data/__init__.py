"""Text in, batches out: the data side of training and evaluation.

  corpus.py     ``data.corpus`` sources (stdlib, text globs, .jsonl, packed .bin), the
                train/val split, the content-hash cache, tokenization and packing into
                flat token arrays (``prepare_corpus`` -> ``Corpus``)
  tokenizer.py  the byte-exact sentencepiece BPE tokenizer and its piece byte lengths
  pipeline.py   token windows, the grain training stream, eval batches, document
                segment ids, and per-token batch fields (``batch_annotators``)
  bpb.py        bits per byte

Import the submodule that is needed (``from ttt_jax.data import corpus, pipeline``); the
package itself exports nothing. Its errors are ``ttt_jax.errors.DataError``.
"""
