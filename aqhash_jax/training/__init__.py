"""Training job internals. `load_trained_model` loads a finished run for the inference tools."""

from aqhash_jax.training.export import load_trained_model

__all__ = ["load_trained_model"]
