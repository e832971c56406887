"""Reproductions of the papers' directional claims at tiny scale:
``python -m ttt_jax.reproduce NAME [--seeds 3] [--out DIR] [--budget F]``.

Each study (``studies.STUDIES``, one module each) trains its arms with the ordinary
training code on the same data, token budget and seeds (``runner``), evaluates them and
writes per-seed results, mean ± SE tables (``stats``) and loss-curve plots (``plots``).
"""
