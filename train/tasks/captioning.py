"""The captioning task: teacher-forced next-token cross-entropy (padding masked out) on images and
their captions, and evaluation by generating captions for held-out images in either backend.

`caption_step(state, batch, rng) -> (state, metrics)` is pure, like the other tasks' steps: under
pmap the loss divides each device's summed token losses by the token count of the whole global
batch (`lax.psum`), so the pmean'd gradient is the gradient of the whole batch's mean, whatever
the padding of each shard. `Captioning` (the task) hands it, and its eager torch twin, to the
shared trainer: `python -m train caption-scenes [--backend torch] [--data coco:DIR]` reports the
exact-match rate and corpus BLEU-4 of the captions generated for the held-out images (JAX: the
compiled `jax_models.captioning.generate`; torch: `ImageCaptioningModel.generate` with its
cache), writes WORKDIR/tokenizer.json and a picture of a few held-out images with their generated
captions (WORKDIR/captions.png).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from jax_models import captioning as J
from torch_reference import captioning as T
from train import captions as caption_data
from train import scenes
from train import steps
from train.tasks.base import JaxTraining, ParityCase, Task, TorchTraining, image_batches, register
from twin_models.presets import example_inputs
from twin_models.tokenizer import Tokenizer

PAD = 0               # the tokenizer's padding id, masked out of the loss
EVAL_BATCH = 256      # images per generate call in evaluation (one compiled shape)
SHOWN = 8             # held-out images in captions.png
UNUSED = "<unused{}>"  # filler words that no text can produce (keep the ids of bos and eos)


def caption_tokenizer(spec: str, references, vocab_size: int, context_length: int) -> Tokenizer:
    """The word-level tokenizer of a caption data set, with exactly `vocab_size` ids, so that its
    `<start_of_text>` and `<end_of_text>` (the last two) are the decoder's bos and eos:

    - scenes: `train.scenes.scenes_tokenizer`'s fixed vocabulary (an error if the model has fewer
      ids than it needs);
    - otherwise the most frequent words of the training captions (`references`: per image a tuple
      of captions) that fit; the rest become `<unk>`.

    A vocabulary short of `vocab_size` is filled with `<unused0>`, `<unused1>`, ... (never
    produced by a text)."""
    room = vocab_size - 4
    if spec == "scenes":
        words = scenes.scenes_tokenizer(context_length).vocab[2:-2]
        if len(words) > room:
            raise ValueError(f"the scenes' captions need a vocabulary of {len(words) + 4} ids; the model has "
                             f"vocab_size {vocab_size}")
    else:
        if room < 1:
            raise ValueError(f"vocab_size {vocab_size} leaves no id for a word (4 are special)")
        words = Tokenizer.from_texts((c for refs in references for c in refs), context_length,
                                     max_words=room).vocab[2:-2]
    return Tokenizer([*words, *(UNUSED.format(i) for i in range(room - len(words)))], context_length)


def caption_sums(logits, captions, pad_token_id: int = PAD):
    """Sums over the targets captions[:, 1:] that are not padding, of the next-token
    cross-entropy of logits[:, :-1] and of correct argmaxes, and their count."""
    targets = captions[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), targets)
    weight = (targets != pad_token_id).astype(jnp.float32)
    correct = (jnp.argmax(logits[:, :-1], -1) == targets).astype(jnp.float32)
    return (ce * weight).sum(), (correct * weight).sum(), weight.sum()


def caption_step(state: steps.TrainState, batch: dict, rng: jax.Array, *, pad_token_id: int = PAD,
                 axis_name: str | None = None) -> tuple[steps.TrainState, dict]:
    """One update on {'image': (B, H, W, C), 'caption': (B, T) ids, bos first, padded}: teacher
    forcing, the mean cross-entropy over the non-padding targets of the global batch. Metrics:
    loss, token_accuracy, grad_norm."""
    def loss_fn(params, rng):
        logits = state.apply_fn(state.variables(params), batch["image"], batch["caption"], train=True,
                                rngs={"dropout": rng})
        ce, correct, count = caption_sums(logits, batch["caption"], pad_token_id)
        if axis_name is not None:   # pmean of these is the global sum over the global count
            devices = jax.lax.psum(1, axis_name)
            count = jax.lax.psum(count, axis_name) / devices
        count = jnp.maximum(count, 1.0)
        return ce / count, {"token_accuracy": correct / count}
    return steps.gradient_step(state, loss_fn, rng, axis_name)


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(model, variables, images, captions):
    return caption_sums(model.apply(variables, images, captions), captions)


def caption_report(hypotheses: list[str], references: list[tuple[str, ...]], objects=None) -> dict:
    """exact_match and corpus BLEU-4 of generated captions (text) against their references; on
    scenes (`objects`: each image's object list) the exact-match rate per number of objects."""
    bleu = caption_data.corpus_bleu([h.split() for h in hypotheses],
                                    [[r.split() for r in refs] for refs in references])
    out = {"exact_match": caption_data.exact_match(hypotheses, references), "bleu4": bleu["bleu"],
           "bleu_precisions": [round(p, 4) for p in bleu["precisions"]],
           "bleu_brevity_penalty": bleu["brevity_penalty"], "eval_examples": len(hypotheses)}
    if objects is not None:
        by = {}
        for h, refs, objs in zip(hypotheses, references, objects):
            by.setdefault(len(objs), []).append(h in refs)
        out["exact_match_by_objects"] = {str(k): round(float(np.mean(v)), 4) for k, v in sorted(by.items())}
    return out


def save_caption_grid(images: np.ndarray, hypotheses, references, path: str, scale: int = 3) -> str:
    """A PNG of `images` (N, H, W, C) in [-1, 1], each beside its generated caption (green when it
    equals a reference, red otherwise, with the first reference under it in gray)."""
    n, h, w, c = images.shape
    font = ImageFont.load_default(size=14)
    text_w, pad = 620, 6
    tile_h = max(h * scale, 56) + pad
    canvas = Image.new("RGB", (w * scale + text_w + 2 * pad, n * tile_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (im, hyp, refs) in enumerate(zip(images, hypotheses, references)):
        pixels = np.round((np.asarray(im, np.float32) + 1) * 127.5).clip(0, 255).astype(np.uint8)
        tile = Image.fromarray(pixels[..., 0] if c == 1 else pixels).convert("RGB")
        y = pad + i * tile_h
        canvas.paste(tile.resize((w * scale, h * scale), Image.NEAREST), (pad, y))
        draw.rectangle((pad - 1, y - 1, pad + w * scale, y + h * scale), outline=(160, 160, 160))
        ok = hyp in refs
        x = w * scale + 2 * pad
        draw.text((x, y + 4), hyp or "(empty)", fill=(0, 128, 0) if ok else (200, 0, 0), font=font)
        draw.text((x, y + 24), ("= " if ok else "reference: ") + refs[0], fill=(110, 110, 110), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return os.path.abspath(path)


def decode_settings(r) -> dict:
    return dict(max_length=r.recipe["max_length"], num_beams=r.recipe.get("num_beams", 1),
                length_penalty=r.recipe.get("length_penalty", 1.0))


def decode_name(r) -> str:
    d = decode_settings(r)
    return (f"beam-{d['num_beams']}" if d["num_beams"] > 1 else "greedy") + f", max_length {d['max_length']}"


def eval_chunks(r):
    """(start, count, images padded to the chunk size) over the held-out set."""
    data = r.test_data
    size = min(EVAL_BATCH, len(data))
    for start in range(0, len(data), size):
        x = data.images[start:start + size]
        n = len(x)
        if n < size:
            x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])
        yield start, n, x


def evaluation(ids: np.ndarray, sums, r) -> dict:
    """The report of generated `ids` (N, T) and the teacher-forced (ce, correct, count) sums."""
    hyps = [r.context["tokenizer"].decode(row) for row in ids]
    out = caption_report(hyps, r.context["references"], r.test_data.extras.get("objects"))
    ce, correct, count = sums
    out["eval_loss"] = ce / max(count, 1.0)
    out["eval_token_accuracy"] = correct / max(count, 1.0)
    return out


def shown_captions(ids: np.ndarray, r) -> dict:
    """The summary's picture (WORKDIR/captions.png) and examples of the first held-out images'
    generated captions `ids` (the first evaluation chunk's, decoded again at the end)."""
    hyps = [r.context["tokenizer"].decode(row) for row in ids]
    references = r.context["references"]
    k = min(SHOWN, len(hyps))
    path = save_caption_grid(r.test_data.images[:k], hyps[:k], references[:k],
                             os.path.join(r.workdir, "captions.png"))
    return {"grid": path, "examples": [{"generated": h, "reference": refs[0]}
                                       for h, refs in zip(hyps[:4], references[:4])]}


class CaptioningJax(JaxTraining):
    step = staticmethod(caption_step)

    def evaluate(self, model, state, r) -> dict:
        variables, test_tokens = state.variables(), r.context["test_tokens"]
        ids, sums = [], np.zeros(3)
        for start, n, x in eval_chunks(r):
            x = jnp.asarray(x)
            ids.append(np.asarray(J.generate(model, variables, x, **decode_settings(r)))[:n])
            c = np.zeros((len(x), test_tokens.shape[1]), np.int32)
            c[:n] = test_tokens[start:start + n]
            sums += np.asarray(jax.device_get(_eval_sums(model, variables, x, jnp.asarray(c))), np.float64)
        return evaluation(np.concatenate(ids), sums, r)

    def finish(self, model, state, r) -> dict:
        _, n, x = next(eval_chunks(r))
        return shown_captions(np.asarray(J.generate(model, state.variables(), jnp.asarray(x),
                                                    **decode_settings(r)))[:n], r)


class CaptioningTorch(TorchTraining):
    def loss(self, model, batch: dict, recipe: dict):
        captions = batch["caption"]
        logits = model(batch["image"], captions).float()
        targets = captions[:, 1:]
        mask = targets != PAD
        correct = ((logits[:, :-1].argmax(-1) == targets) & mask).sum()
        return T.caption_loss(logits, captions, PAD), {"token_accuracy": correct / mask.sum().clamp(min=1).to(torch.float32)}

    def evaluate(self, trainer, r) -> dict:
        model, test_tokens = trainer.model, r.context["test_tokens"]
        model.eval()
        ids, sums = [], np.zeros(3)
        with torch.no_grad():
            for start, n, x in eval_chunks(r):
                x = torch.from_numpy(np.ascontiguousarray(x[:n].transpose(0, 3, 1, 2)))
                ids.append(model.generate(x, **decode_settings(r)).numpy())
                c = torch.from_numpy(test_tokens[start:start + n].astype(np.int64))
                logits = model(x, c).float()
                targets = c[:, 1:]
                mask = targets != PAD
                ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     ignore_index=PAD, reduction="sum")
                sums += [ce.item(), ((logits[:, :-1].argmax(-1) == targets) & mask).sum().item(), mask.sum().item()]
        return evaluation(np.concatenate(ids), sums, r)

    def finish(self, trainer, r) -> dict:
        _, n, x = next(eval_chunks(r))
        trainer.model.eval()
        with torch.no_grad():
            ids = trainer.model.generate(torch.from_numpy(np.ascontiguousarray(x[:n].transpose(0, 3, 1, 2))),
                                         **decode_settings(r)).numpy()
        return shown_captions(ids, r)


class CaptioningParity(ParityCase):
    def losses(self, flax_model):
        """The teacher-forced `caption_loss` (padding masked) on batches of (images, captions)."""
        pad = flax_model.text_decoder.config.pad_token_id

        def torch_loss(model, batch):
            x, c = batch
            return T.caption_loss(model(x, c), c, pad)

        def flax_loss(params, variables, batch):
            x, c = batch
            return J.caption_loss(flax_model.apply({**variables, "params": params}, x, c), c, pad)

        return torch_loss, flax_loss

    def batches(self, preset, n: int, batch_size: int, seed: int = 0):
        return image_batches(preset, n, batch_size, seed)


@register
class Captioning(Task):
    """Images to captions: the preset's `ImageCaptioningModel` trained by teacher forcing, held
    out by greedy (or beam, `num_beams` in the recipe) decoding of up to `max_length` tokens."""

    name = "captioning"
    report = ("exact_match", "bleu4")
    eval_by_default = False     # generation on the held-out set: at the end, or every --eval-every
    jax_training = CaptioningJax()
    torch_training = CaptioningTorch()
    parity = CaptioningParity()

    def load_data(self, spec: str, preset, recipe: dict):
        return caption_data.load(spec, preset.image_size, preset.in_channels, recipe)

    def check(self, r) -> None:
        self._tokenizer(r)

    def setup(self, r) -> tuple[dict, dict]:
        """The context: the tokenizer, the held-out references as it decodes them, and the first
        reference of each held-out image tokenized (the evaluation's teacher-forced loss)."""
        tokenizer = self._tokenizer(r)
        test_refs = r.test_data.extras["references"]
        context = {"tokenizer": tokenizer,
                   "references": [tuple(tokenizer.decode(tokenizer(c)[0]) for c in refs) for refs in test_refs],
                   "test_tokens": tokenizer([refs[0] for refs in test_refs]).astype(np.int32)}
        os.makedirs(r.workdir, exist_ok=True)
        return context, {"tokenizer": tokenizer.save(r.workdir), "train_examples": len(r.train_data),
                         "decode": decode_name(r)}

    def _tokenizer(self, r):
        """The run's tokenizer, checked against the decoder: max_length within its positions, the
        same bos, eos and pad ids."""
        kw = r.preset.kwargs
        max_length = r.recipe["max_length"]
        if not 1 <= max_length < kw["max_positions"]:
            raise ValueError(f"recipe max_length {max_length} must be in [1, max_positions - 1 = "
                             f"{kw['max_positions'] - 1}]: bos and max_length tokens fill the positions")
        tokenizer = caption_tokenizer(r.recipe["data"], r.train_data.extras["references"],
                                      kw["vocab_size"], max_length + 1)
        config = J.decoder_config(kw["vocab_size"], kw["max_positions"], kw.get("bos_token_id"),
                                  kw.get("eos_token_id"), kw.get("pad_token_id", 0))
        if (config.bos_token_id, config.eos_token_id, config.pad_token_id) != (
                tokenizer.sot_id, tokenizer.eot_id, tokenizer.pad_id):
            raise ValueError(f"the decoder's bos, eos, pad ids {config.bos_token_id}, {config.eos_token_id}, "
                             f"{config.pad_token_id} are not the tokenizer's {tokenizer.sot_id}, "
                             f"{tokenizer.eot_id}, {tokenizer.pad_id}")
        return tokenizer

    def batch(self, batch: dict, step: int, r) -> dict:
        """Images and one of each image's captions (drawn from (seed, step) when it has several),
        tokenized: bos, words, eos, padding."""
        rng = np.random.default_rng([r.config.seed, step, 3])
        texts = [refs[rng.integers(len(refs))] if len(refs) > 1 else refs[0] for refs in batch["references"]]
        return {"image": batch["image"], "caption": r.context["tokenizer"](texts).astype(np.int32)}

    def example_batch(self, preset, batch_size: int, seed: int = 0) -> dict:
        images, tokens = example_inputs(preset, batch_size, seed)
        return {"image": images, "caption": tokens.astype(np.int32)}
