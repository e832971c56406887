"""Output heads (``model.head``), each registered in ``registry.HEADS``."""
