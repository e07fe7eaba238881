"""Image classification (ViT, Swin): softmax cross-entropy with label smoothing; the held-out loss
and accuracy as the evaluation.

`train_step(state, batch, rng) -> (state, metrics)` and `eval_step(state, batch)` are pure; the
trainer wraps them in jit or pmap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from train import data as data_lib
from train import steps
from train.tasks.base import (JaxTraining, ParityCase, Task, TorchTraining, image_batches, register,
                              torch_inputs)
from twin_models.presets import example_inputs


def classification_loss(logits, labels, label_smoothing: float = 0.0, mask=None):
    """Mean softmax cross-entropy over (B, K) logits and (B,) int labels, and the accuracy.

    With `mask` (B,) of 0/1 weights both are weighted means over the rows that count."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    if mask is None:
        return losses.mean(), correct.mean()
    count = jnp.maximum(mask.sum(), 1.0)
    return (losses * mask).sum() / count, (correct * mask).sum() / count


def train_step(state: steps.TrainState, batch: dict, rng: jax.Array, *, label_smoothing: float = 0.0,
               axis_name: str | None = None) -> tuple[steps.TrainState, dict]:
    """One update on {'image': (B, H, W, C), 'label': (B,)}. Metrics: loss, accuracy, grad_norm."""
    def loss_fn(params, rng):
        logits = state.apply_fn(state.variables(params), batch["image"], train=True,
                                rngs={"dropout": rng})
        loss, accuracy = classification_loss(logits, batch["label"], label_smoothing)
        return loss, {"accuracy": accuracy}
    return steps.gradient_step(state, loss_fn, rng, axis_name)


@jax.jit
def eval_step(state: steps.TrainState, batch: dict) -> dict:
    """Sums over `batch` (with its 'mask' of real rows): loss_sum, correct, count."""
    logits = state.apply_fn(state.variables(), batch["image"], train=False)
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": (losses * mask).sum(), "correct": (correct * mask).sum(), "count": mask.sum()}


def accuracy_report(totals: dict) -> dict:
    n = max(totals["count"], 1.0)
    return {"eval_loss": totals["loss_sum"] / n, "eval_accuracy": totals["correct"] / n,
            "eval_examples": int(totals["count"])}


def _labels(preset):
    classes = max(1, preset.kwargs.get("num_classes", 1))
    return lambda rs, arrays: (rs.randint(0, classes, size=len(arrays[0])),)


class ClassificationJax(JaxTraining):
    step = staticmethod(train_step)

    def step_kwargs(self, recipe: dict) -> dict:
        return {"label_smoothing": recipe["label_smoothing"]}

    def evaluate(self, model, state, r) -> dict:
        """Held-out loss and accuracy (eval mode, every test image once)."""
        totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        for batch in data_lib.eval_batches(r.test_data, min(512, len(r.test_data))):
            sums = jax.device_get(eval_step(state, batch))
            totals = {k: totals[k] + float(sums[k]) for k in totals}
        return accuracy_report(totals)


class ClassificationTorch(TorchTraining):
    def loss(self, model, batch: dict, recipe: dict):
        logits = model(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"], label_smoothing=recipe["label_smoothing"])
        return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).float().mean()}

    def evaluate(self, trainer, r) -> dict:
        model = trainer.model
        model.eval()
        totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        with torch.no_grad():
            for start in range(0, len(r.test_data), 512):
                images, labels = torch_inputs((r.test_data.images[start:start + 512],
                                               r.test_data.labels[start:start + 512]))
                logits = model(images)
                totals["loss_sum"] += F.cross_entropy(logits, labels, reduction="sum").item()
                totals["correct"] += (logits.argmax(-1) == labels).sum().item()
                totals["count"] += len(labels)
        return accuracy_report(totals)


class ClassificationParity(ParityCase):
    def losses(self, flax_model):
        """Cross-entropy on batches of (images, integer labels)."""
        def torch_loss(model, batch):
            *inputs, y = batch
            return F.cross_entropy(model(*inputs), y)

        def flax_loss(params, variables, batch):
            *inputs, y = batch
            logits = flax_model.apply({**variables, "params": params}, *inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return torch_loss, flax_loss

    def batches(self, preset, n: int, batch_size: int, seed: int = 0):
        return image_batches(preset, n, batch_size, seed, _labels(preset))


@register
class Classification(Task):
    """Images to labels: the preset's model gives (B, num_classes) logits."""

    name = "classification"
    report = ("eval_accuracy", "eval_loss")
    jax_training = ClassificationJax()
    torch_training = ClassificationTorch()
    parity = ClassificationParity()

    def example_batch(self, preset, batch_size: int, seed: int = 0) -> dict:
        images, = example_inputs(preset, batch_size, seed)
        labels = np.random.RandomState(seed + 1).randint(0, preset.kwargs["num_classes"], batch_size)
        return {"image": images, "label": labels.astype(np.int32)}
