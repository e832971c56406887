"""Feed-forward sublayers (``model.ffn``), each registered in ``registry.FFNS``."""
