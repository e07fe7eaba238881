"""Training: data (`train.data`), the recipe and the one gradient step (`train.steps`), the tasks
(`train.tasks`, one module each), the run's config (`train.config`), the one loop
(`train.loop.run`) with an adapter per backend (`train.jax_backend`, `train.torch_backend`),
checkpoints (`train.checkpoint`) and the CLI (`python -m train PRESET ...`)."""
