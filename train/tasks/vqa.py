"""Visual question answering on generated scenes (`train/scenes.py`, Sort-of-CLEVR): the preset's
model maps (image, question tokens) to logits over the answer words.

`--data scenes` draws `num_scenes` training and `num_test_scenes` held-out scenes (recipe keys,
e.g. `--recipe num_scenes=2000`) with every question that has a unique answer, or
`questions_per_scene` of them, with `num_objects` objects per scene (`train_num_objects`, when
set, for the training scenes alone: e.g. [3, 6] mixes scenes of 3 to 6 objects, where closest and
furthest cannot be guessed from the other objects' majority shape). The recipe key `nonrelational_steps` is a curriculum: each of the
first `nonrelational_steps` batches is drawn (with replacement, from (seed, step) alone, so a
resumed run draws the same) from the non-relational training questions only, so the model first
learns to find the object a colour names and where it is. `family_weights` (e.g.
`--recipe 'family_weights={"closest_shape": 3, "furthest_shape": 3}'`) draws every batch the same
way, a question of a named family that many times as often as one of another. The summary gives the held-out accuracy overall, on relational and
non-relational questions, and per question family (`accuracy_<family>`); the run's `finish` draws
the confusion matrices of the relational families to WORKDIR/relational_confusion.png.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from train import data as data_lib
from train import distributed
from train import scenes
from train import steps
from train.tasks.base import JaxTraining, Task, TorchTraining, image_batches, register, torch_inputs
from train.tasks.classification import ClassificationParity, classification_loss
from twin_models.presets import example_inputs
from twin_models.tokenizer import split_words

TRAIN_SEED, TEST_SEED = 0, 1  # the fixed split: scenes of seed 0 train, of seed 1 are held out
FAMILIES = tuple(scenes.FAMILIES)


@dataclasses.dataclass(frozen=True)
class QuestionDataset(data_lib.ArrayDataset):
    """Questions about shared images: example i asks about `images[image_index[i]]`; `labels` are
    answer ids, `extras` the question tokens ('question'), 'relational' and 'family' (index in
    `FAMILIES`)."""
    image_index: np.ndarray = None  # (N,) int32

    def __post_init__(self):
        lengths = {k: len(v) for k, v in {"image_index": self.image_index, **self.extras}.items()}
        bad = {k: n for k, n in lengths.items() if n != len(self.labels)}
        if bad:
            raise ValueError(f"{len(self.labels)} questions but arrays of lengths {bad}")

    def rows(self, index) -> dict[str, np.ndarray]:
        return {"image": self.images[self.image_index[index]], "label": self.labels[index],
                **{k: v[index] for k, v in self.extras.items()}}


def question_dataset(vqa: scenes.VQAData) -> QuestionDataset:
    family = np.array([FAMILIES.index(f) for f in vqa.family], np.int32)
    return QuestionDataset(vqa.images, vqa.answers, scenes.ANSWERS,
                           {"question": vqa.tokens, "relational": vqa.relational.astype(np.int32),
                            "family": family}, image_index=vqa.image_index)


def check_preset(preset):
    """The scenes' tokenizer at the preset's context, once the preset is known to fit the scenes'
    vocabulary, longest question and answers."""
    kw = preset.kwargs
    tokenizer = scenes.scenes_tokenizer(kw["context_length"])
    if tokenizer.vocab_size > kw["vocab_size"]:
        raise ValueError(f"the scenes' questions need {tokenizer.vocab_size} token ids; preset "
                         f"{preset.name!r} has vocab_size {kw['vocab_size']}")
    if len(scenes.ANSWERS) > kw["num_answers"]:
        raise ValueError(f"the scenes have {len(scenes.ANSWERS)} answers; preset {preset.name!r} has "
                         f"num_answers {kw['num_answers']}")
    longest = 2 + max(len(split_words(t.format(c))) for c in scenes.COLORS for _, t in scenes.FAMILIES.values())
    if longest > kw["context_length"]:
        raise ValueError(f"the longest question has {longest} tokens; preset {preset.name!r} has "
                         f"context_length {kw['context_length']}")
    return tokenizer


def load_scenes(spec: str, preset, recipe: dict) -> tuple[QuestionDataset, QuestionDataset]:
    """(train, test) for `--data scenes`, checked against the preset's vocabulary, context and
    answers."""
    if spec != "scenes":
        raise ValueError(f"VQA presets train on generated scenes: expected --data scenes, got {spec!r}")
    for key in ("num_scenes", "num_test_scenes"):
        if not isinstance(recipe[key], int) or recipe[key] < 1:
            raise ValueError(f"{key} must be a positive number of scenes; got {recipe[key]!r}")
    tokenizer = check_preset(preset)
    pair = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    objects = pair(recipe["num_objects"])
    train_objects = objects if recipe.get("train_num_objects") is None else pair(recipe["train_num_objects"])
    make = lambda n, seed, k: question_dataset(scenes.make_vqa(  # noqa: E731
        n, seed, preset.image_size, k, cell=recipe.get("cell"),
        questions_per_scene=recipe["questions_per_scene"], tokenizer=tokenizer))
    return make(recipe["num_scenes"], TRAIN_SEED, train_objects), make(recipe["num_test_scenes"], TEST_SEED, objects)


def question_weights(data: QuestionDataset, family_weights: dict | None) -> np.ndarray | None:
    """(N,) each training question's weight in the batches drawn with `family_weights` (its family's
    weight, 1 for a family not named), or None where every question is drawn as often."""
    if not family_weights:
        return None
    return np.array([family_weights.get(f, 1.0) for f in FAMILIES], np.float64)[data.extras["family"]]


def vqa_step(state: steps.TrainState, batch: dict, rng: jax.Array, *, label_smoothing: float = 0.0,
             axis_name: str | None = None) -> tuple[steps.TrainState, dict]:
    """One update on {'image': (B, H, W, C), 'question': (B, L), 'label': (B,)[, 'mask': (B,) 0/1
    weights of the questions in the loss]}. Metrics: loss, accuracy, grad_norm."""
    def loss_fn(params, rng):
        logits = state.apply_fn(state.variables(params), batch["image"], batch["question"], train=True,
                                rngs={"dropout": rng})
        loss, accuracy = classification_loss(logits, batch["label"], label_smoothing, batch.get("mask"))
        return loss, {"accuracy": accuracy}
    return steps.gradient_step(state, loss_fn, rng, axis_name)


@jax.jit
def predict_step(state: steps.TrainState, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(per-question losses, predicted answer ids) in eval mode."""
    logits = state.apply_fn(state.variables(), batch["image"], batch["question"], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]), jnp.argmax(logits, -1)


def accuracy_report(data: QuestionDataset, losses: np.ndarray, predictions: np.ndarray) -> dict:
    """eval_accuracy, accuracy_relational, accuracy_nonrelational, accuracy_<family> and eval_loss
    over the held-out questions."""
    correct = predictions == data.labels
    relational = data.extras["relational"].astype(bool)
    family = data.extras["family"]
    out = {"eval_accuracy": float(correct.mean()),
           "accuracy_relational": float(correct[relational].mean()) if relational.any() else None,
           "accuracy_nonrelational": float(correct[~relational].mean()) if (~relational).any() else None}
    for i, name in enumerate(FAMILIES):
        out[f"accuracy_{name}"] = float(correct[family == i].mean()) if (family == i).any() else None
    return {**out, "eval_loss": float(losses.mean()), "eval_examples": int(len(correct))}


CONFUSION_FIGURE = "relational_confusion.png"


def confusion(data: QuestionDataset, predictions: np.ndarray, family: str) -> tuple[list[str], np.ndarray]:
    """(answer words, counts[true, predicted]) of one family's held-out questions, over the answers
    that occur there as truth or prediction."""
    rows = data.extras["family"] == FAMILIES.index(family)
    truth, pred = data.labels[rows], predictions[rows]
    ids = np.union1d(truth, pred).astype(int)
    counts = np.zeros((len(ids), len(ids)), np.int64)
    np.add.at(counts, (np.searchsorted(ids, truth), np.searchsorted(ids, pred)), 1)
    return [scenes.ANSWERS[i] for i in ids], counts


def draw_confusion(data: QuestionDataset, predictions: np.ndarray, path: str) -> dict:
    """Writes one confusion matrix per relational family (rows: the true answer, columns: the
    model's; each cell its count and share of the row) to `path`; a failure to draw is reported
    in the returned summary entries, never raised."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [f for f in FAMILIES if scenes.FAMILIES[f][0] and (data.extras["family"] == FAMILIES.index(f)).any()]
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
        for ax, name in zip(axes[0], names):
            words, counts = confusion(data, predictions, name)
            share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
            ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
            for (i, j), n in np.ndenumerate(counts):
                if n:
                    ax.text(j, i, f"{n}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.6 else "black")
            ax.set_xticks(range(len(words)), words, rotation=45)
            ax.set_yticks(range(len(words)), words)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"{name}: {np.trace(counts) / counts.sum():.1%} of {counts.sum()}")
        fig.suptitle("held-out relational questions")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return {"confusion_figure": os.path.abspath(path)}
    except Exception as e:  # noqa: BLE001 - a figure never ends a finished run
        return {"confusion_figure": None, "confusion_figure_error": f"{type(e).__name__}: {e}"}


def finish_report(r, predictions: np.ndarray) -> dict:
    if not distributed.is_primary():
        return {}
    return draw_confusion(r.test_data, predictions, os.path.join(r.workdir, CONFUSION_FIGURE))


EVAL_BATCH = 512


class VQAJax(JaxTraining):
    step = staticmethod(vqa_step)

    def step_kwargs(self, recipe: dict) -> dict:
        return {"label_smoothing": recipe["label_smoothing"]}

    def predict(self, state, r) -> tuple[np.ndarray, np.ndarray]:
        losses, predictions = [], []
        for batch in data_lib.eval_batches(r.test_data, min(EVAL_BATCH, len(r.test_data))):
            n = int(batch["mask"].sum())
            loss, pred = jax.device_get(predict_step(state, {k: batch[k] for k in ("image", "question", "label")}))
            losses.append(loss[:n])
            predictions.append(pred[:n])
        return np.concatenate(losses), np.concatenate(predictions)

    def evaluate(self, model, state, r) -> dict:
        return accuracy_report(r.test_data, *self.predict(state, r))

    def finish(self, model, state, r) -> dict:
        return finish_report(r, self.predict(state, r)[1])


class VQATorch(TorchTraining):
    def loss(self, model, batch: dict, recipe: dict):
        logits = model(batch["image"], batch["question"])
        losses = F.cross_entropy(logits.float(), batch["label"], label_smoothing=recipe["label_smoothing"],
                                 reduction="none")
        correct = (logits.argmax(-1) == batch["label"]).float()
        mask = batch.get("mask")
        if mask is None:
            return losses.mean(), {"accuracy": correct.mean()}
        mask = mask.to(losses.dtype)
        count = mask.sum().clamp(min=1.0)
        return (losses * mask).sum() / count, {"accuracy": (correct * mask).sum() / count}

    def predict(self, trainer, r) -> tuple[np.ndarray, np.ndarray]:
        model = trainer.model
        model.eval()
        losses, predictions = [], []
        with torch.no_grad():
            for start in range(0, len(r.test_data), EVAL_BATCH):
                rows = r.test_data.rows(slice(start, start + EVAL_BATCH))
                images, questions, labels = torch_inputs((rows["image"], rows["question"], rows["label"]))
                logits = model(images, questions).float()
                losses.append(F.cross_entropy(logits, labels, reduction="none").numpy())
                predictions.append(logits.argmax(-1).numpy())
        return np.concatenate(losses), np.concatenate(predictions)

    def evaluate(self, trainer, r) -> dict:
        return accuracy_report(r.test_data, *self.predict(trainer, r))

    def finish(self, trainer, r) -> dict:
        return finish_report(r, self.predict(trainer, r)[1])


class VQAParity(ClassificationParity):
    """Cross-entropy on batches of (images, questions, answer ids)."""

    def batches(self, preset, n: int, batch_size: int, seed: int = 0):
        answers = preset.kwargs["num_answers"]
        return image_batches(preset, n, batch_size, seed, lambda rs, arrays: (rs.randint(0, answers, len(arrays[0])),))


@register
class VQA(Task):
    """Scenes and questions to answer words: the preset's model gives (B, num_answers) logits of
    (image, question)."""

    name = "vqa"
    report = ("accuracy_nonrelational", "accuracy_relational", "eval_accuracy")
    jax_training = VQAJax()
    torch_training = VQATorch()
    parity = VQAParity()

    def load_data(self, spec: str, preset, recipe: dict):
        return load_scenes(spec, preset, recipe)

    def check(self, r) -> None:
        check_preset(r.preset)

    def setup(self, r) -> tuple[dict, dict]:
        check_preset(r.preset)
        return {}, {}

    def batch(self, batch: dict, step: int, r) -> dict:
        weights = question_weights(r.train_data, r.recipe.get("family_weights"))
        rs = np.random.default_rng((r.config.seed, jax.process_index(), step))
        pick = None
        if step < (r.recipe.get("nonrelational_steps") or 0):
            nonrelational = r.train_data.extras["relational"] == 0
            if weights is None or not weights[nonrelational].any():
                pick = rs.choice(np.flatnonzero(nonrelational), len(batch["label"]))
            else:
                weights = np.where(nonrelational, weights, 0.0)
        if pick is None and weights is not None:
            pick = rs.choice(len(weights), len(batch["label"]), p=weights / weights.sum())
        if pick is not None:
            batch = r.train_data.rows(np.sort(pick))
        return {"image": batch["image"], "question": batch["question"], "label": batch["label"],
                "mask": np.ones(len(batch["label"]), np.float32)}

    def example_batch(self, preset, batch_size: int, seed: int = 0) -> dict:
        images, questions = example_inputs(preset, batch_size, seed)
        labels = np.random.RandomState(seed + 1).randint(0, preset.kwargs["num_answers"], batch_size)
        return {"image": images, "question": questions.astype(np.int32), "label": labels.astype(np.int32),
                "mask": np.ones(batch_size, np.float32)}
