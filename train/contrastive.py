"""The contrastive task: CLIP on the digits with captions drawn from templates, in JAX.

`contrastive_step(state, batch, rng) -> (state, metrics)` is pure, like the classification step:
under pmap (`axis_name` set) the features are gathered over the device axis so every image meets
every caption of the global batch as a negative, and gradients are averaged with `lax.pmean`.
`train(...)` runs it (jit or pmap) and reports zero-shot accuracy on the held-out digits from
text prompts alone, and image->text / text->image recall@1, in WORKDIR/summary.json;
`python -m train.contrastive clip-digits` is its command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from tokenizer import Tokenizer
from train import data as data_lib
from train import steps

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
    """One AdamW update on {'image': (B, H, W, C), 'tokens': (B, L)}; the logit scale is then
    clipped to [0, log 100] as in CLIP. Metrics: loss, logit_scale, grad_norm."""
    from jax_models.clip import contrastive_loss

    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def loss_fn(params):
        features = state.apply_fn(state.variables(params), batch["image"], batch["tokens"], train=True,
                                  rngs={"dropout": rng}, method="features")
        return contrastive_loss(*features, axis_name=axis_name)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        loss = jax.lax.pmean(loss, axis_name)
    state = state.apply_gradients(grads=grads)
    params = {**state.params, "logit_scale": jnp.clip(state.params["logit_scale"], 0.0, MAX_LOGIT_SCALE)}
    metrics = {"loss": loss, "logit_scale": jnp.exp(params["logit_scale"]),
               "grad_norm": jax.numpy.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(grads)))}
    return state.replace(params=params), metrics


def evaluate(model, variables, dataset: data_lib.ArrayDataset, tokenizer: Tokenizer, seed: int = 0) -> dict:
    """zero_shot_accuracy: each image's class from the prompts of all templates alone (prompt
    ensembling over the number words); image_to_text_recall@1 / text_to_image_recall@1: one
    caption per image, and the best-scoring caption (image) counts when it names the same digit
    (captions of two sevens cannot be told apart)."""
    from jax_models.clip import CLIPModel, zero_shot_classify

    labels = np.asarray(dataset.labels)
    probs = zero_shot_classify(model, variables, jnp.asarray(dataset.images), NUMBER_WORDS, TEMPLATES,
                               tokenizer=tokenizer, batch_size=512)
    tokens = tokenizer(caption_texts(labels, np.random.default_rng([seed, 2]))).astype(np.int32)
    images = jax.jit(lambda x: model.apply(variables, x, method=CLIPModel.encode_image))(jnp.asarray(dataset.images))
    texts = jax.jit(lambda t: model.apply(variables, t, method=CLIPModel.encode_text))(jnp.asarray(tokens))
    sims = np.asarray(images @ texts.T)
    return {"zero_shot_accuracy": float(np.mean(np.argmax(probs, -1) == labels)),
            "image_to_text_recall@1": float(np.mean(labels[np.argmax(sims, 1)] == labels)),
            "text_to_image_recall@1": float(np.mean(labels[np.argmax(sims, 0)] == labels)),
            "count": int(len(labels))}


def train(preset_name: str = "clip-digits", workdir: str | None = None, parallel: str = "jit",
          steps_: int | None = None, epochs: int | None = None, batch_size: int | None = None,
          lr: float | None = None, seed: int = 0, log_every: int = 20, model_overrides: dict | None = None) -> dict:
    """Trains a contrastive preset on the digits and returns (and writes) the summary."""
    import jax_models
    from presets import get_preset, with_overrides

    preset = get_preset(preset_name)
    if preset.task != "contrastive":
        raise ValueError(f"preset {preset.name!r} is a {preset.task} model, not contrastive")
    preset = with_overrides(preset, **(model_overrides or {}))
    recipe = {**preset.train}
    recipe.update({k: v for k, v in dict(batch_size=batch_size, lr=lr).items() if v is not None})
    workdir = workdir or os.path.join("runs", preset.name)
    os.makedirs(workdir, exist_ok=True)
    train_data, test_data = data_lib.load(recipe.get("data", "digits"), preset.image_size, preset.in_channels)
    tokenizer = digits_tokenizer(preset.kwargs["context_length"])
    if tokenizer.vocab_size > preset.kwargs["vocab_size"]:
        raise ValueError(f"the captions need {tokenizer.vocab_size} tokens; the model has {preset.kwargs['vocab_size']}")
    tokenizer.save(workdir)
    bs = recipe["batch_size"]
    spe = data_lib.steps_per_epoch(len(train_data), bs)
    total = steps_ if steps_ is not None else (epochs or recipe["epochs"]) * spe

    model = jax_models.create_model(preset)
    init_key, train_key = jax.random.split(jax.random.key(seed))
    x = jnp.zeros((1, *preset.input_shape_nhwc), jnp.float32)
    t = jnp.asarray(tokenizer(["a"]), jnp.int32)
    variables = jax.jit(lambda k: model.init(k, x, t))(init_key)
    schedule = steps.warmup_cosine(recipe["lr"], min(recipe["warmup_steps"], total // 2), total)
    tx = steps.make_optimizer(schedule, recipe["weight_decay"], recipe["grad_clip"], variables["params"])
    state = steps.create_state(model, variables, tx, train_key)
    devices = jax.local_device_count() if parallel == "pmap" else 1
    if parallel == "pmap":
        step_fn, state = steps.pmap_train_step(contrastive_step), steps.replicate(state)
    else:
        step_fn = steps.jit_train_step(contrastive_step)

    sync_each_step = parallel == "pmap" and jax.default_backend() == "cpu"  # as in train.jax_backend
    log = open(os.path.join(workdir, "metrics.jsonl"), "w")
    start, step, metrics = time.time(), 0, {}
    while step < total:
        for batch in data_lib.batches(train_data, bs, seed, step // spe, step % spe):
            batch = with_captions(batch, tokenizer, seed, step)
            batch = {"image": batch["image"], "tokens": batch["tokens"]}
            state, metrics = step_fn(state, data_lib.shard(batch, devices) if parallel == "pmap" else batch)
            step += 1
            if sync_each_step:
                jax.block_until_ready(metrics)
            if step % log_every == 0 or step == total:
                m = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
                log.write(json.dumps({"step": step, **m, "elapsed": time.time() - start}) + "\n")
                log.flush()
                print(f"step {step}/{total} loss {m['loss']:.4f} scale {m['logit_scale']:.1f}", flush=True)
            if step >= total:
                break
    log.close()
    wall = time.time() - start
    final = steps.unreplicate(state) if parallel == "pmap" else state
    final_vars = jax.device_get(final.variables())
    results = evaluate(model, final_vars, test_data, tokenizer, seed)
    from bridge import flax_to_torch, save_safetensors
    save_safetensors(flax_to_torch(final_vars), os.path.join(workdir, "model.safetensors"))
    summary = {"preset": preset.name, "backend": "jax", "parallel": parallel, "devices": devices,
               "steps": total, "batch_size": bs, "final_loss": float(np.mean(metrics["loss"])),
               "logit_scale": float(np.mean(metrics["logit_scale"])), "train_seconds": wall,
               "tokenizer": os.path.join(workdir, "tokenizer.json"), **results}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.contrastive", description=__doc__.split("\n")[0])
    p.add_argument("preset", nargs="?", default="clip-digits")
    p.add_argument("--workdir")
    p.add_argument("--parallel", choices=("jit", "pmap"), default="jit")
    p.add_argument("--steps", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    s = train(a.preset, a.workdir, a.parallel, a.steps, a.epochs, a.batch_size, a.lr, a.seed)
    print(json.dumps({k: s[k] for k in ("zero_shot_accuracy", "image_to_text_recall@1",
                                        "text_to_image_recall@1", "train_seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
