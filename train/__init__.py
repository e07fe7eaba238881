"""Training: data (`train.data`), the pure steps (`train.steps`), checkpoints
(`train.checkpoint`), the run loop for both backends (`train.train`) and the CLI
(`python -m train PRESET ...`)."""
