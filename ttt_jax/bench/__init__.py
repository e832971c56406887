"""Benchmarks: ``python -m ttt_jax.bench <subject> ...`` prints one JSON object.

One module per subject (``train``, ``io``, ``ttt``, ``mhc``; a mechanism registers its
own, e.g. ``ttt_jax/cct/bench.py``), each registering a ``common.Bench`` in
``registry.BENCHES``; ``__main__`` dispatches the command line to it. Record results,
with the machine, in ``benchmarks/RESULTS.md``.
"""
