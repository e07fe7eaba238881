"""XLA (jitted JAX) against eager PyTorch on the same models and weights."""
