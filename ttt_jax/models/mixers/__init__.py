"""Token mixers (``model.mixer``), each registered in ``registry.MIXERS``."""
