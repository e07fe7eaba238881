"""The diffusion task: a pure DDPM step with an exponential moving average of the weights, the
compiled sampler on the EMA weights, the sample files, and the digits check.

`diffusion_step(state, batch, rng) -> (state, metrics)` draws t and the noise from `rng`, so it runs
as is under `steps.jit_train_step` and `steps.pmap_train_step` (gradients and metrics averaged
over the pmap axis). `Diffusion` (the task) hands it, and its eager torch twin, to the shared trainer:
`python -m train ddpm-digits [--backend torch]`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import steps
from train.tasks.base import Task, image_batches, register


class DiffusionState(steps.TrainState):
    """TrainState plus `ema_params`, the moving average that sampling uses."""
    ema_params: Any = None


def build(preset, attention_impl: str = "xla"):
    """The Flax `DDPM` of a diffusion preset: the preset's U-Net inside the recipe's schedule."""
    import jax_models
    from jax_models.ddpm import DDPM

    r = preset.train
    return DDPM(jax_models.create_model(preset, attention_impl=attention_impl), r["timesteps"],
                r["beta_start"], r["beta_end"])


def create_state(model, variables: dict, tx: optax.GradientTransformation, rng: jax.Array
                 ) -> DiffusionState:
    """Step-0 state from `DDPM.init` output: U-Net params, the schedule buffers as constants,
    and EMA = params."""
    variables = dict(variables)
    params = variables.pop("params")
    state = DiffusionState.create(apply_fn=model.apply, params=params, tx=tx, rng=rng,
                                  constants=variables,
                                  ema_params=jax.tree_util.tree_map(jnp.copy, params))
    return state.replace(step=jnp.zeros((), jnp.int32))


def diffusion_step(state: DiffusionState, batch: dict, rng: jax.Array, *, timesteps: int,
                   ema_decay: float, axis_name: str | None = None) -> tuple[DiffusionState, dict]:
    """One update of the noise-prediction loss on `batch['image']` (B, H, W, C) in [-1, 1] at
    uniform timesteps (or the batch's own 't' and 'noise', to replay a run), then the EMA moves
    by `steps.ema_step_size` (`optax.incremental_update`). Metrics: loss, grad_norm."""
    x = batch["image"]

    def loss_fn(params, rng):
        t_key, n_key, d_key = jax.random.split(rng, 3)
        t = batch["t"] if "t" in batch else jax.random.randint(t_key, (x.shape[0],), 0, timesteps)
        noise = batch["noise"] if "noise" in batch else jax.random.normal(n_key, x.shape, x.dtype)
        loss = state.apply_fn(state.variables(params), x, t, noise, train=True, rngs={"dropout": d_key})
        return loss, {}

    new, metrics = steps.gradient_step(state, loss_fn, rng, axis_name)
    ema = optax.incremental_update(new.params, state.ema_params, steps.ema_step_size(state.step, ema_decay))
    return new.replace(ema_params=steps.where_finite(metrics, ema, state.ema_params)), metrics


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

    from train.data import load_digits

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


def torch_ddpm(preset):
    """The torch `DDPM` of a diffusion preset: the preset's U-Net inside the recipe's schedule."""
    import torch_reference
    from torch_reference.ddpm import DDPM

    r = preset.train
    return DDPM(torch_reference.create_model(preset), r["timesteps"], r["beta_start"], r["beta_end"])


@register
class Diffusion(Task):
    """DDPM: noise prediction at uniform timesteps, an EMA of the weights, and at the end samples
    from the EMA weights (WORKDIR/samples.npy, samples.png) and, on the digits, `digit_check`.
    The preset's model is the U-Net inside the DDPM; `--export` writes the EMA U-Net."""

    name = "diffusion"
    report = ("digit_check",)
    eval_by_default = False

    def flax_model(self, preset, attention_impl: str = "xla"):
        return build(preset, attention_impl)

    def init_args(self, preset) -> tuple:
        x = np.zeros((1, *preset.input_shape_nhwc), np.float32)
        return x, np.zeros((1,), np.int32), x

    def create_state(self, model, variables, tx, rng):
        return create_state(model, variables, tx, rng)

    def step_kwargs(self, recipe: dict) -> dict:
        return {"timesteps": recipe["timesteps"], "ema_decay": recipe["ema_decay"]}

    def batch(self, batch: dict, step: int, r) -> dict:
        return {"image": batch["image"]}

    def example_batch(self, preset, batch_size: int, seed: int = 0) -> dict:
        """Images with their timesteps and noise fixed (the step draws them when absent), so
        that runs on any number of devices compute the same loss."""
        from presets import example_inputs
        images, t = example_inputs(preset, batch_size, seed)
        noise = np.random.RandomState(seed + 1).standard_normal(images.shape).astype(np.float32)
        return {"image": np.clip(images, -1, 1), "t": t.astype(np.int32), "noise": noise}

    @property
    def jax_step(self):
        return diffusion_step

    def preset_variables(self, variables: dict) -> dict:
        return {"params": variables["params"]["model"]}

    def _report(self, samples: np.ndarray, seconds: float, r) -> dict:
        npy, png = save_samples(samples, r.workdir)
        out = {"samples": os.path.abspath(npy), "grid": os.path.abspath(png),
               "sample_seconds": round(seconds, 1), "sampler": self._sampler_name(r)}
        if r.preset.in_channels == 1 and r.recipe["data"] == "digits":
            out["digit_check"] = digit_check(samples)
        return out

    @staticmethod
    def _sampler_name(r) -> str:
        ddim = r.recipe.get("ddim_steps")
        return f"ddim-{ddim}" if ddim else f"ancestral-{r.recipe['timesteps']}"

    def jax_finish(self, model, state, r) -> dict:
        t0 = time.perf_counter()
        draw = sampler(r.preset, r.recipe.get("num_samples", 256), r.recipe.get("ddim_steps"))
        samples = np.asarray(draw({"params": state.ema_params, **state.constants},
                                  jax.random.key(r.config.seed + 1)))
        return self._report(samples, time.perf_counter() - t0, r)

    def jax_export(self, state) -> dict:
        from bridge import flax_to_torch
        return flax_to_torch(self.preset_variables({"params": jax.device_get(state.ema_params)}))

    def torch_model(self, preset):
        return torch_ddpm(preset)

    def preset_module(self, model):
        return model.model

    def torch_compile(self, model):
        model.model.compile()

    def torch_init(self, trainer):
        import copy
        self.ema = copy.deepcopy(trainer.model).eval().requires_grad_(False)

    def torch_loss(self, model, batch: dict, recipe: dict):
        import torch
        x = batch["image"]
        t = batch["t"] if "t" in batch else torch.randint(0, model.timesteps, (x.shape[0],),
                                                          device=x.device)
        noise = batch["noise"] if "noise" in batch else torch.randn(x.shape, device=x.device)
        return model.p_losses(x, t, noise), {}

    def torch_after_step(self, trainer):
        """The EMA moves by the JAX side's `steps.ema_step_size` (computed on the host), as
        `optax.incremental_update` does: step * params + (1 - step) * ema."""
        import torch
        rate = float(steps.ema_step_size(trainer.step, trainer.recipe["ema_decay"]))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), trainer.model.parameters()):
                e.mul_(1.0 - rate).add_(p, alpha=rate)

    def torch_extra_state(self, trainer) -> dict:
        return {"ema": [p.detach().numpy().copy() for p in self.ema.parameters()]}

    def load_torch_extra_state(self, trainer, tree: dict):
        import torch
        with torch.no_grad():
            for p, v in zip(self.ema.parameters(), tree["ema"]):
                p.copy_(torch.from_numpy(np.asarray(v)))

    def torch_finish(self, trainer, r) -> dict:
        import torch
        t0 = time.perf_counter()
        torch.manual_seed(r.config.seed + 1)
        n, ddim = r.recipe.get("num_samples", 256), r.recipe.get("ddim_steps")
        size, ch = r.preset.image_size, r.preset.in_channels
        with torch.no_grad():
            x = (self.ema.ddim_sample(size, n, ch, ddim) if ddim else self.ema.sample(size, n, ch))
        samples = x.clamp(-1, 1).permute(0, 2, 3, 1).numpy()
        return self._report(samples, time.perf_counter() - t0, r)

    def torch_export(self, trainer) -> dict:
        return {k: v.detach().numpy() for k, v in self.preset_module(self.ema).state_dict().items()}

    def parity_losses(self, flax_model):
        """The noise-prediction loss of the U-Net alone: mean (unet(x_t, t) - noise)^2 on batches
        of (x_t, t, noise), with x_t drawn on the host by the preset's schedule."""
        def torch_loss(model, batch):
            x_t, t, noise = batch
            return ((model(x_t, t) - noise) ** 2).mean()

        def flax_loss(params, variables, batch):
            x_t, t, noise = batch
            return jnp.mean(jnp.square(flax_model.apply({**variables, "params": params}, x_t, t) - noise))

        return torch_loss, flax_loss

    def parity_batches(self, preset, n: int, batch_size: int, seed: int = 0):
        from model_math import linear_schedule

        schedule = linear_schedule(preset.train["timesteps"], preset.train["beta_start"],
                                   preset.train["beta_end"])
        a, s = schedule["sqrt_alphas_cumprod"], schedule["sqrt_one_minus_alphas_cumprod"]

        def noised(rs, arrays):
            x, t = arrays
            noise = rs.standard_normal(x.shape).astype(np.float32)
            x_t = a[t][:, None, None, None] * np.clip(x, -1, 1) + s[t][:, None, None, None] * noise
            arrays[0] = x_t.astype(np.float32)
            return (noise,)
        return image_batches(preset, n, batch_size, seed, noised)
