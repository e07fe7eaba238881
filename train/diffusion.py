"""The diffusion task: a pure DDPM step with an exponential moving average of the weights, the
compiled sampler on the EMA weights, the sample files, and the digits check.

`diffusion_step(state, batch, rng) -> (state, metrics)` draws t and the noise from `rng`, so it runs
as is under `steps.jit_train_step` and `steps.pmap_train_step` (gradients and metrics averaged
over the pmap axis). `train(preset, workdir, ...)` is the whole run: `python -m train ddpm-digits`
hands diffusion presets to it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import steps

_EMA_WARMUP = 10.0


class DiffusionState(steps.TrainState):
    """TrainState plus `ema_params`, the moving average that sampling uses."""
    ema_params: Any = None


def build(preset):
    """The Flax `DDPM` of a diffusion preset: the preset's U-Net inside the recipe's schedule."""
    import jax_models
    from jax_models.ddpm import DDPM

    r = preset.train
    return DDPM(jax_models.create_model(preset), r["timesteps"], r["beta_start"], r["beta_end"])


def create_state(preset, rng: jax.Array, total_steps: int) -> DiffusionState:
    """Step-0 state: U-Net params, schedule buffers (constants), Adam(W) on warm-up cosine, EMA = params."""
    r = preset.train
    ddpm = build(preset)
    x = jnp.zeros((1, *preset.input_shape_nhwc))
    init_key, rng = jax.random.split(rng)
    variables = ddpm.init(init_key, x, jnp.zeros((1,), jnp.int32), x)
    params = variables.pop("params")
    tx = steps.make_optimizer(steps.warmup_cosine(r["lr"], r.get("warmup_steps", 0), total_steps),
                              r.get("weight_decay", 0.0), r.get("grad_clip"), params)
    state = DiffusionState.create(apply_fn=ddpm.apply, params=params, tx=tx, rng=rng,
                                  constants=dict(variables),
                                  ema_params=jax.tree_util.tree_map(jnp.copy, params))
    return state.replace(step=jnp.zeros((), jnp.int32))


def diffusion_step(state: DiffusionState, batch: dict, rng: jax.Array, *, timesteps: int,
                   ema_decay: float, axis_name: str | None = None) -> tuple[DiffusionState, dict]:
    """One update of the noise-prediction loss on `batch['image']` (B, H, W, C) in [-1, 1] at
    uniform timesteps (or the batch's own 't' and 'noise', to replay a run), then ema <- d ema + (1 - d) params with d warmed up as min(decay,
    (1 + step) / (10 + step)). Metrics: loss, grad_norm."""
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    t_key, n_key, d_key = jax.random.split(rng, 3)
    x = batch["image"]
    t = batch["t"] if "t" in batch else jax.random.randint(t_key, (x.shape[0],), 0, timesteps)
    noise = batch["noise"] if "noise" in batch else jax.random.normal(n_key, x.shape, x.dtype)

    def loss_fn(params):
        return state.apply_fn(state.variables(params), x, t, noise, train=True, rngs={"dropout": d_key})

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    metrics = {"loss": loss}
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    metrics["grad_norm"] = optax.tree.norm(grads)
    new = state.apply_gradients(grads=grads)
    step = state.step.astype(jnp.float32)
    d = jnp.minimum(ema_decay, (1.0 + step) / (_EMA_WARMUP + step))
    ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state.ema_params, new.params)
    return new.replace(ema_params=ema), metrics


def sampler(preset, num_samples: int, ddim_steps: int | None = None):
    """(variables, key) -> (num_samples, H, W, C) samples clipped to [-1, 1], one compiled program:
    the ancestral sampler, or DDIM with `ddim_steps`."""
    from jax_models.ddpm import DDPM

    ddpm, size, ch = build(preset), preset.image_size, preset.in_channels

    def run(variables, key):
        if ddim_steps:
            x = ddpm.apply(variables, key, size, num_samples, ch, ddim_steps, method=DDPM.ddim_sample)
        else:
            x = ddpm.apply(variables, key, size, num_samples, ch, method=DDPM.sample)
        return jnp.clip(x, -1.0, 1.0)
    return jax.jit(run)


def save_samples(samples: np.ndarray, workdir: str) -> tuple[str, str]:
    """WORKDIR/samples.npy (NHWC float32 in [-1, 1]) and WORKDIR/samples.png (a grid, 2x upscaled)."""
    from PIL import Image

    os.makedirs(workdir, exist_ok=True)
    samples = np.asarray(samples, np.float32)
    npy = os.path.join(workdir, "samples.npy")
    np.save(npy, samples)
    n, h, w, c = samples.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), -1.0, np.float32)
    for i, im in enumerate(samples):
        r, k = divmod(i, cols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + k * (w + 2):2 + k * (w + 2) + w] = im
    pixels = np.round((grid + 1) * 127.5).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    image = image.resize((image.width * 4, image.height * 4), Image.NEAREST)
    png = os.path.join(workdir, "samples.png")
    image.save(png)
    return npy, png


def digit_classifier(image_size: int, seed: int = 0):
    """A scikit-learn MLP trained on the real digits at `image_size` (pixels in [-1, 1]), and its
    test accuracy."""
    from sklearn.neural_network import MLPClassifier

    from .data import load_digits

    train, test = load_digits(image_size, 1)
    clf = MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, max_iter=400, random_state=seed)
    clf.fit(train.images.reshape(len(train), -1), train.labels)
    return clf, float(clf.score(test.images.reshape(len(test), -1), test.labels))


def digit_check(samples: np.ndarray, threshold: float = 0.8, seed: int = 0) -> dict:
    """How a classifier of real digits sees `samples` (N, H, W, 1): the share it recognizes with
    probability >= `threshold`, and the share of each predicted digit."""
    clf, test_accuracy = digit_classifier(samples.shape[1], seed)
    probs = clf.predict_proba(np.asarray(samples, np.float32).reshape(len(samples), -1))
    pred = probs.argmax(-1)
    shares = np.bincount(pred, minlength=10) / len(pred)
    confident = float(np.mean(probs.max(-1) >= threshold))
    return dict(confident=confident, digit_shares=[round(float(s), 4) for s in shares],
                min_digit_share=float(shares.min()), classifier_test_accuracy=test_accuracy,
                passed=bool(confident >= 0.7 and shares.min() >= 0.03))


def train(preset, workdir: str, parallel: str = "jit", steps_total: int | None = None, seed: int = 0,
          num_samples: int | None = None, ddim_steps: int | None = None, log_every: int = 100) -> dict:
    """Train a diffusion preset on its data, sample with the EMA weights, write samples and a summary.

    `parallel`: 'jit' (one device) or 'pmap' (all local devices, batch split over them)."""
    from presets import get_preset

    from . import data as data_lib

    preset = get_preset(preset) if isinstance(preset, str) else preset
    r = preset.train
    total = steps_total or r["steps"]
    num_samples = num_samples or r.get("num_samples", 256)
    ddim_steps = r.get("ddim_steps") if ddim_steps is None else ddim_steps
    train_set, _ = data_lib.load(r.get("data", "digits"), preset.image_size, preset.in_channels)
    state = create_state(preset, jax.random.key(seed), total)
    kw = dict(timesteps=r["timesteps"], ema_decay=r["ema_decay"])
    n_dev = jax.local_device_count() if parallel == "pmap" else 1
    if parallel == "pmap":
        step_fn, state = steps.pmap_train_step(diffusion_step, **kw), steps.replicate(state)
    else:
        step_fn = steps.jit_train_step(diffusion_step, **kw)

    os.makedirs(workdir, exist_ok=True)
    log = open(os.path.join(workdir, "metrics.jsonl"), "w")
    t0, step, epoch = time.time(), 0, 0
    while step < total:
        for batch in data_lib.batches(train_set, r["batch_size"], seed, epoch, 0, 0, 1):
            batch = {"image": batch["image"]}
            if parallel == "pmap":
                batch = data_lib.shard(batch, n_dev)
            state, metrics = step_fn(state, batch)
            step += 1
            if step % log_every == 0 or step == total:
                m = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
                log.write(json.dumps(dict(step=step, time=round(time.time() - t0, 1), **m)) + "\n")
                log.flush()
            if step >= total:
                break
        epoch += 1
    log.close()
    train_s = time.time() - t0
    if parallel == "pmap":
        state = steps.unreplicate(state)

    t0 = time.time()
    ema_vars = {"params": state.ema_params, **state.constants}
    samples = np.asarray(sampler(preset, num_samples, ddim_steps)(ema_vars, jax.random.key(seed + 1)))
    sample_s = time.time() - t0
    npy, png = save_samples(samples, workdir)
    summary = dict(preset=preset.name, steps=total, parallel=parallel, devices=n_dev,
                   train_seconds=round(train_s, 1), sample_seconds=round(sample_s, 1),
                   sampler=f"ddim-{ddim_steps}" if ddim_steps else f"ancestral-{r['timesteps']}",
                   final_loss=m["loss"], samples=npy, grid=png)
    if preset.in_channels == 1 and r.get("data", "digits") == "digits":
        summary["digit_check"] = digit_check(samples)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
