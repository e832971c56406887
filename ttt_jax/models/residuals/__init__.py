"""Residual schemes (``model.residual``), each registered in ``registry.RESIDUALS``."""
