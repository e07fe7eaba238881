"""The contrastive task: CLIP on the digits with captions drawn from templates, in JAX.

`contrastive_step(state, batch, rng) -> (state, metrics)` is pure, like the classification step:
under pmap (`axis_name` set) the features are gathered over the device axis so every image meets
every caption of the global batch as a negative, and gradients are averaged with `lax.pmean`.
`Contrastive` (the task) hands it, and its eager torch twin, to the shared trainer (`python -m train
clip-digits`), which reports zero-shot accuracy on the held-out digits from text prompts alone,
and image->text / text->image recall@1, in WORKDIR/summary.json.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jax_models.clip import clip_loss, contrastive_loss, encode, zero_shot_classify
from torch_reference import clip as T
from train import steps
from train.tasks.base import JaxTraining, ParityCase, Task, TorchTraining, image_batches, register, torch_inputs
from twin_models.presets import example_inputs
from twin_models.tokenizer import Tokenizer

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a photo of the number {}", "a handwritten {}", "a photo of a {}", "the digit {}",
             "an image of the number {}", "a drawing of a handwritten {}", "the number {}", "{}")
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature at 100


def caption_texts(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """One caption per label: a random template around the number's word or its numeral
    ("a photo of the number seven", "a handwritten 7")."""
    templates = rng.integers(0, len(TEMPLATES), len(labels))
    as_word = rng.random(len(labels)) < 0.5
    return [TEMPLATES[t].format(NUMBER_WORDS[y] if w else str(y)) for y, t, w in zip(labels, templates, as_word)]


def digits_tokenizer(context_length: int) -> Tokenizer:
    """The word-level vocabulary of every caption the templates can make."""
    texts = [t.format(n) for t in TEMPLATES for y in range(10) for n in (NUMBER_WORDS[y], str(y))]
    return Tokenizer.from_texts(texts, context_length)


def with_captions(batch: dict, tokenizer: Tokenizer, seed: int, step: int) -> dict:
    """`batch` plus 'tokens' (B, context_length) int32 for captions drawn from (seed, step)."""
    texts = caption_texts(batch["label"], np.random.default_rng([seed, step, 1]))
    return {**batch, "tokens": tokenizer(texts).astype(np.int32)}


def contrastive_step(state: steps.TrainState, batch: dict, rng: jax.Array, *,
                     axis_name: str | None = None) -> tuple[steps.TrainState, dict]:
    """One update on {'image': (B, H, W, C), 'tokens': (B, L)}; the logit scale is then clipped to
    [0, log 100] as in CLIP. Under pmap the features are gathered over the axis (every image meets
    every caption of the global batch). Metrics: loss, logit_scale, grad_norm."""
    def loss_fn(params, rng):
        features = state.apply_fn(state.variables(params), batch["image"], batch["tokens"], train=True,
                                  rngs={"dropout": rng}, method="features")
        return contrastive_loss(*features, axis_name=axis_name), {}

    state, metrics = steps.gradient_step(state, loss_fn, rng, axis_name)
    params = {**state.params, "logit_scale": jnp.clip(state.params["logit_scale"], 0.0, MAX_LOGIT_SCALE)}
    return state.replace(params=params), {**metrics, "logit_scale": jnp.exp(params["logit_scale"])}


def retrieval_report(labels: np.ndarray, class_probs: np.ndarray, image_features: np.ndarray,
                     text_features: np.ndarray) -> dict:
    """zero_shot_accuracy: each image's class from the prompts of all templates alone (prompt
    ensembling over the number words); image_to_text_recall@1 / text_to_image_recall@1: one
    caption per image, and the best-scoring caption (image) counts when it names the same digit
    (captions of two sevens cannot be told apart)."""
    sims = image_features @ text_features.T
    return {"zero_shot_accuracy": float(np.mean(np.argmax(class_probs, -1) == labels)),
            "image_to_text_recall@1": float(np.mean(labels[np.argmax(sims, 1)] == labels)),
            "text_to_image_recall@1": float(np.mean(labels[np.argmax(sims, 0)] == labels)),
            "eval_examples": int(len(labels))}


def eval_captions(labels: np.ndarray, tokenizer: Tokenizer, seed: int) -> np.ndarray:
    """One caption per held-out image, the same for both backends."""
    return tokenizer(caption_texts(labels, np.random.default_rng([seed, 2]))).astype(np.int32)


class ContrastiveJax(JaxTraining):
    step = staticmethod(contrastive_step)

    def evaluate(self, model, state, r) -> dict:
        tokenizer, variables, data = r.context["tokenizer"], state.variables(), r.test_data
        probs = zero_shot_classify(model, variables, jnp.asarray(data.images), NUMBER_WORDS,
                                   TEMPLATES, tokenizer=tokenizer, batch_size=512)
        images = encode(model, "encode_image", variables, jnp.asarray(data.images))
        texts = encode(model, "encode_text", variables,
                       jnp.asarray(eval_captions(data.labels, tokenizer, r.config.seed)))
        return retrieval_report(np.asarray(data.labels), np.asarray(probs), np.asarray(images),
                                np.asarray(texts))


class ContrastiveTorch(TorchTraining):
    def loss(self, model, batch: dict, recipe: dict):
        return T.contrastive_loss(*model.features(batch["image"], batch["tokens"])), {}

    def compile(self, model):
        model.image_encoder.compile()
        model.text_encoder.compile()

    def after_step(self, trainer) -> dict:
        with torch.no_grad():
            scale = trainer.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        return {"logit_scale": float(scale.detach().exp())}

    def evaluate(self, trainer, r) -> dict:
        model, data, tokenizer = trainer.model, r.test_data, r.context["tokenizer"]
        model.eval()
        images, tokens = torch_inputs((data.images, eval_captions(data.labels, tokenizer, r.config.seed)))
        with torch.no_grad():
            probs = T.zero_shot_classify(model, images, NUMBER_WORDS, TEMPLATES, tokenizer=tokenizer,
                                         batch_size=512)
            image_features, text_features = model.encode_image(images), model.encode_text(tokens)
        return retrieval_report(np.asarray(data.labels), probs.numpy(), image_features.numpy(),
                                text_features.numpy())


class ContrastiveParity(ParityCase):
    def losses(self, flax_model):
        """CLIP's symmetric cross-entropy over the (image, tokens) pairs of a batch."""
        def torch_loss(model, batch):
            return model.contrastive_loss(*batch)

        def flax_loss(params, variables, batch):
            return clip_loss(*flax_model.apply({**variables, "params": params}, *batch))

        return torch_loss, flax_loss

    def batches(self, preset, n: int, batch_size: int, seed: int = 0):
        return image_batches(preset, n, batch_size, seed)


@register
class Contrastive(Task):
    """CLIP on images and template captions of their labels (the digits)."""

    name = "contrastive"
    report = ("zero_shot_accuracy", "image_to_text_recall@1", "text_to_image_recall@1")
    jax_training = ContrastiveJax()
    torch_training = ContrastiveTorch()
    parity = ContrastiveParity()

    def check(self, r) -> None:
        if r.recipe["data"] != "digits":
            raise ValueError(f"contrastive presets train on the digits' captions; --data "
                             f"{r.recipe['data']!r} has no captions")
        tokenizer = digits_tokenizer(r.preset.kwargs["context_length"])
        if tokenizer.vocab_size > r.preset.kwargs["vocab_size"]:
            raise ValueError(f"--set vocab_size={r.preset.kwargs['vocab_size']}: the captions need "
                             f"{tokenizer.vocab_size} token ids; vocab_size must be at least {tokenizer.vocab_size}")

    def setup(self, r) -> tuple[dict, dict]:
        self.check(r)
        tokenizer = digits_tokenizer(r.preset.kwargs["context_length"])
        os.makedirs(r.workdir, exist_ok=True)
        return {"tokenizer": tokenizer}, {"tokenizer": tokenizer.save(r.workdir)}

    def batch(self, batch: dict, step: int, r) -> dict:
        batch = with_captions(batch, r.context["tokenizer"], r.config.seed, step)
        return {"image": batch["image"], "tokens": batch["tokens"]}

    def example_batch(self, preset, batch_size: int, seed: int = 0) -> dict:
        images, tokens = example_inputs(preset, batch_size, seed)
        return {"image": images, "tokens": tokens.astype(np.int32)}
