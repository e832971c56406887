"""Embeddings (``model.embedding``), each registered in ``registry.EMBEDDINGS``."""
