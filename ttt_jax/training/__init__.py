"""The training core: objectives (what the step minimises)."""
