"""Trunks (``model.trunk``): how the blocks run, each registered in ``registry.TRUNKS``."""
