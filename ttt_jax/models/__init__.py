"""The model: ``lm`` (the LM and its block, built from named slots), ``context`` (the
sequence context every sublayer reads), ``layers`` (shared math and the parameter
helper), ``remat`` (checkpoint policies); the mechanisms that fill the slots live in
``mixers/``, ``residuals/``, ``ffn/``, ``trunks/``, ``embeddings/`` and ``heads/``.
"""
