"""Inference: sampling from a trained model with the mixers' decode caches."""
