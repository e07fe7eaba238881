"""What a preset trains on, for both backends: the one place the trainer's machinery meets a task.

The loops in `jax_backend` and `torch_backend` (data order, devices, checkpoints, resume, logs,
progress, export) are the same for every preset; a `Task` gives them the model, the batch, the
step, the evaluation and the final report. `get_task(preset)` picks it from `preset.task`:
'classification' (here), 'contrastive' (`train.contrastive`), 'diffusion' (`train.diffusion`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Task:
    """The classification task; the others override what differs.

    JAX: `flax_model`, `init_args`, `create_state`, `jax_step` (pure: (state, batch, rng, *,
    axis_name, **step_kwargs) -> (state, metrics)), `jax_evaluate`, `jax_finish`, `jax_export`.
    Torch: `torch_model`, `torch_init`, `torch_loss`, `torch_after_step`, `torch_evaluate`, `torch_finish`,
    `torch_export`, and `torch_extra_state` for what a checkpoint must hold beyond the model
    and optimizer. Both: `setup` (once, before training) and `batch` (host side, per step)."""

    name = "classification"
    report = ("eval_accuracy", "eval_loss")  # the summary entries the CLI prints first
    eval_by_default = True                   # evaluate once per epoch unless --eval-every
    defaults: dict[str, Any] = dict(lr=3e-4, weight_decay=0.3, warmup_steps=0, batch_size=128,
                                    epochs=10, label_smoothing=0.0, grad_clip=1.0, data="digits")

    def __init__(self):
        self._jitted: dict[str, Any] = {}

    def setup(self, r) -> dict:
        """Checks and files before training; returns entries for the summary."""
        return {}

    def batch(self, batch: dict, step: int, r) -> dict:
        """The training batch of `step` from the data's {'image', 'label'} (numpy)."""
        return batch

    # -- JAX ------------------------------------------------------------------------------------

    def flax_model(self, preset):
        import jax_models
        return jax_models.create_model(preset)

    def init_args(self, preset) -> tuple:
        """Example inputs for `model.init` (batch of one)."""
        return (np.zeros((1, *preset.input_shape_nhwc), np.float32),)

    def create_state(self, model, variables, tx, rng):
        from train import steps
        return steps.create_state(model, variables, tx, rng)

    def step_kwargs(self, recipe: dict) -> dict:
        return {"label_smoothing": recipe["label_smoothing"]}

    @property
    def jax_step(self):
        from train import steps
        return steps.train_step

    def jax_evaluate(self, model, state, r) -> dict:
        """Held-out loss and accuracy (eval mode, every test image once)."""
        import jax

        from train import data as data_lib
        from train import steps

        fn = self._jitted.setdefault("eval", jax.jit(steps.eval_step))
        totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        for batch in data_lib.eval_batches(r.test_data, min(512, len(r.test_data))):
            sums = jax.device_get(fn(state, batch))
            totals = {k: totals[k] + float(sums[k]) for k in totals}
        return _accuracy_report(totals)

    def jax_finish(self, model, state, r) -> dict:
        """Work after the last step (sampling, say); returns entries for the summary."""
        return {}

    def jax_export(self, state) -> dict:
        """The torch-keyed state dict `--export` writes."""
        import jax

        from bridge import flax_to_torch
        return flax_to_torch(jax.device_get(state.variables()))

    # -- PyTorch --------------------------------------------------------------------------------

    def torch_model(self, preset):
        import torch_reference
        return torch_reference.create_model(preset)

    def torch_loss(self, model, batch: dict, recipe: dict):
        """(loss, metrics) of the torch model in train mode on a `batch` from `torch_batch`."""
        import torch.nn.functional as F

        logits = model(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"],
                               label_smoothing=recipe["label_smoothing"])
        return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).float().mean()}

    def torch_compile(self, model):
        """`torch.compile` (in place) the modules whose forward `torch_loss` calls."""
        model.compile()

    def torch_init(self, trainer):
        """Runs once the trainer holds the initial weights (e.g. to start a moving average)."""

    def torch_after_step(self, trainer) -> dict | None:
        """Runs after each optimizer step (clamps, moving averages); may return metrics."""

    def torch_extra_state(self, trainer) -> dict:
        return {}

    def load_torch_extra_state(self, trainer, tree: dict):
        pass

    def torch_evaluate(self, trainer, r) -> dict:
        import torch
        import torch.nn.functional as F

        from train.torch_backend import torch_batch

        model = trainer.model
        model.eval()
        totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        with torch.no_grad():
            for start in range(0, len(r.test_data), 512):
                b = torch_batch({"image": r.test_data.images[start:start + 512],
                                 "label": r.test_data.labels[start:start + 512]})
                logits = model(b["image"])
                totals["loss_sum"] += F.cross_entropy(logits, b["label"], reduction="sum").item()
                totals["correct"] += (logits.argmax(-1) == b["label"]).sum().item()
                totals["count"] += len(b["label"])
        return _accuracy_report(totals)

    def torch_finish(self, trainer, r) -> dict:
        return {}

    def torch_export(self, trainer) -> dict:
        return {k: v.detach().numpy() for k, v in trainer.model.state_dict().items()}


def _accuracy_report(totals: dict) -> dict:
    n = max(totals["count"], 1.0)
    return {"eval_loss": totals["loss_sum"] / n, "eval_accuracy": totals["correct"] / n,
            "eval_examples": int(totals["count"])}


def get_task(preset) -> Task:
    """A fresh `Task` for `preset.task`."""
    if preset.task == "classification":
        return Task()
    if preset.task == "contrastive":
        from train.contrastive import ContrastiveTask
        return ContrastiveTask()
    if preset.task == "diffusion":
        from train.diffusion import DiffusionTask
        return DiffusionTask()
    raise ValueError(f"preset {preset.name!r} has task {preset.task!r}; the trainer knows "
                     "classification, contrastive and diffusion")
