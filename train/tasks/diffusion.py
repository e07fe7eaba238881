"""The diffusion task: a pure DDPM step with an exponential moving average of the weights, the
compiled sampler on the EMA weights, the sample files, and the digits check.

`diffusion_step(state, batch, rng) -> (state, metrics)` draws t and the noise from `rng`, so it runs
as is under `steps.jit_train_step` and `steps.pmap_train_step` (gradients and metrics averaged
over the pmap axis). `Diffusion` (the task) hands it, and its eager torch twin, to the shared trainer:
`python -m train ddpm-digits [--backend torch]`. The EMA lives in each backend's train state: the
JAX `DiffusionState.ema_params`, the torch trainer's `extra["ema"]`.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from PIL import Image

import jax_models
import torch_reference
from bridge import flax_to_torch
from jax_models import ddpm as J
from jax_models import xla_flags
from torch_reference import ddpm as T
from train import steps
from train.data import load_digits
from train.tasks.base import JaxTraining, ParityCase, Task, TorchTraining, image_batches, register
from twin_models.model_math import linear_schedule
from twin_models.presets import example_inputs


class DiffusionState(steps.TrainState):
    """TrainState plus `ema_params`, the moving average that sampling uses."""
    ema_params: Any = None


def build(preset, attention_impl: str = "xla"):
    """The Flax `DDPM` of a diffusion preset: the preset's U-Net inside the recipe's schedule."""
    r = preset.train
    return J.DDPM(jax_models.create_model(preset, attention_impl=attention_impl), r["timesteps"],
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
    to d ema + (1 - d) params, d = `steps.ema_decay(step)`. Metrics: loss, grad_norm."""
    x = batch["image"]

    def loss_fn(params, rng):
        t_key, n_key, d_key = jax.random.split(rng, 3)
        t = batch["t"] if "t" in batch else jax.random.randint(t_key, (x.shape[0],), 0, timesteps)
        noise = batch["noise"] if "noise" in batch else jax.random.normal(n_key, x.shape, x.dtype)
        loss = state.apply_fn(state.variables(params), x, t, noise, train=True, rngs={"dropout": d_key})
        return loss, {}

    new, metrics = steps.gradient_step(state, loss_fn, rng, axis_name)
    # a skipped step leaves new.params == state.params, finite, so d = 1 keeps the EMA bit for bit
    d = jnp.where(metrics["nonfinite"] == 0, steps.ema_decay(state.step, ema_decay), 1.0)
    ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state.ema_params, new.params)
    return new.replace(ema_params=ema), metrics


def sampler(preset, num_samples: int, ddim_steps: int | None = None, clip_denoised: bool = False):
    """(variables, key) -> (num_samples, H, W, C) samples clipped to [-1, 1], one compiled program:
    the ancestral sampler, or DDIM with `ddim_steps`; `clip_denoised` clips each step's x_0 to the
    data range (`DDPM.p_sample`, `DDPM.ddim_sample`). On CPU it is compiled with
    `xla_flags.inference_compiler_options()` (YNNPACK's reductions: about 4% faster at 256
    samples)."""
    ddpm, size, ch = build(preset), preset.image_size, preset.in_channels

    def run(variables, key):
        if ddim_steps:
            x = ddpm.apply(variables, key, size, num_samples, ch, ddim_steps, None, clip_denoised,
                           method=J.DDPM.ddim_sample)
        else:
            x = ddpm.apply(variables, key, size, num_samples, ch, None, None, clip_denoised,
                           method=J.DDPM.sample)
        return jnp.clip(x, -1.0, 1.0)
    return jax.jit(run, compiler_options=xla_flags.inference_compiler_options())


def save_samples(samples: np.ndarray, workdir: str) -> tuple[str, str]:
    """WORKDIR/samples.npy (NHWC float32 in [-1, 1]) and WORKDIR/samples.png (a grid, 2x upscaled)."""
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
    test accuracy. Cached per (image_size, seed). Fitted on one BLAS thread: the same fit up to BLAS
    rounding (the old run's 78.9% recognized reads 79.3% with it), and
    on a loaded 2-core machine 5-9x faster than OpenBLAS's two threads waiting for each other."""
    key = (image_size, seed)
    if key not in _CLASSIFIERS:
        # scikit-learn on first use (`train.data.load_digits` says why)
        from sklearn.neural_network import MLPClassifier
        from threadpoolctl import threadpool_limits

        train, test = load_digits(image_size, 1)
        clf = MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, max_iter=400, random_state=seed)
        with threadpool_limits(1):
            clf.fit(train.images.reshape(len(train), -1), train.labels)
        _CLASSIFIERS[key] = clf, float(clf.score(test.images.reshape(len(test), -1), test.labels))
    return _CLASSIFIERS[key]


_CLASSIFIERS: dict = {}


def classifier_features(clf, images: np.ndarray) -> np.ndarray:
    """(N, 256) float64: the hidden layer (ReLU) of `digit_classifier`'s MLP on (N, H, W, 1) images,
    the features the Frechet distance compares."""
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as FID computes it (float64; the
    square root's trace through two symmetric eigendecompositions). 0 for a set against itself."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr (S_a S_b)^(1/2) = tr (S_a^(1/2) S_b S_a^(1/2))^(1/2), a symmetric PSD matrix: eigh, no sqrtm
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(max(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * cross, 0.0))


def roughness(images: np.ndarray) -> np.ndarray:
    """(N,) the root mean square of the 5-point Laplacian of each (N, H, W, 1) image in [-1, 1]
    (inner pixels): pixel-scale speckle. The real 16x16 digits lie in 0.23-0.49; clipped unit
    Gaussian noise scores above 2.7."""
    x = np.asarray(images, np.float64)[..., 0]
    lap = (4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:])
    return np.sqrt(np.mean(lap ** 2, axis=(1, 2)))


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


def digit_quality(samples: np.ndarray, threshold: float = 0.8, seed: int = 0) -> dict:
    """The quality of digit `samples` (N, H, W, 1) in [-1, 1] against the real digits at the same
    size, deterministic for a given `seed`:

    - `fd_samples`: the Frechet distance between the samples and the real training digits on
      `classifier_features`; `fd_floor`: the same for as many real test digits (a fixed random
      subset when N < 360; all 360 otherwise) - what a perfect sampler would score at this N;
      `fd_ratio` = fd_samples / fd_floor; `fd_test_all`: all 360 test digits against training.
    - `confident` / `real_confident`: the share of samples / of the 360 real test digits that the
      classifier recognizes with probability >= `threshold`; `digit_shares` of its predictions.
    - `noise_samples`: how many samples are speckle, not strokes: `roughness` above twice the
      roughest real digit (`real_roughness_max`, over all 1,797); `rougher_than_real`: above it
      at all. Plus `roughness_median` of the samples and of the real digits. The reference is the
      real digits at the samples' size: at 8x8 (the digits' own, unsmoothed) clipped noise is not
      rougher than twice the roughest digit, so the count means something from 16x16 up.
    """
    samples = np.asarray(samples, np.float32)
    train, test = load_digits(samples.shape[1], 1)
    clf, test_accuracy = digit_classifier(samples.shape[1], seed)
    n = min(len(samples), len(test))
    subset = np.sort(np.random.RandomState(seed).permutation(len(test))[:n])
    f_train = classifier_features(clf, train.images)
    f_test = classifier_features(clf, test.images)
    fd = frechet_distance(classifier_features(clf, samples), f_train)
    floor = frechet_distance(f_test[subset], f_train)
    real_probs = clf.predict_proba(test.images.reshape(len(test), -1))
    real = roughness(np.concatenate([train.images, test.images]))
    rough = roughness(samples)
    out = digit_check(samples, threshold, seed)
    out.update(real_confident=float(np.mean(real_probs.max(-1) >= threshold)),
               fd_samples=round(fd, 3), fd_floor=round(floor, 3), fd_ratio=round(fd / floor, 3),
               fd_test_all=round(frechet_distance(f_test, f_train), 3), fd_n=n,
               noise_samples=int(np.sum(rough > 2 * real.max())),
               rougher_than_real=int(np.sum(rough > real.max())),
               roughness_median=round(float(np.median(rough)), 4),
               real_roughness_median=round(float(np.median(real)), 4),
               real_roughness_max=round(float(real.max()), 4))
    return out


def torch_ddpm(preset):
    """The torch `DDPM` of a diffusion preset: the preset's U-Net inside the recipe's schedule."""
    r = preset.train
    return T.DDPM(torch_reference.create_model(preset), r["timesteps"], r["beta_start"], r["beta_end"])


def sampler_name(r) -> str:
    ddim = r.recipe.get("ddim_steps")
    name = f"ddim-{ddim}" if ddim else f"ancestral-{r.recipe['timesteps']}"
    return name + ("-clip" if r.recipe.get("clip_denoised") else "")


def sample_report(samples: np.ndarray, seconds: float, r) -> dict:
    """The sample files and, on the digits, their quality: the summary's entries."""
    npy, png = save_samples(samples, r.workdir)
    out = {"samples": os.path.abspath(npy), "grid": os.path.abspath(png),
           "sample_seconds": round(seconds, 1), "sampler": sampler_name(r)}
    if r.preset.in_channels == 1 and r.recipe["data"] == "digits":
        out["sample_quality"] = quality = digit_quality(samples)
        out["digit_check"] = {k: quality[k] for k in ("confident", "digit_shares", "min_digit_share",
                                                      "classifier_test_accuracy", "passed")}
    return out


class DiffusionJax(JaxTraining):
    """The DDPM (U-Net inside its schedule) with an EMA of the weights in its state."""

    step = staticmethod(diffusion_step)

    def model(self, preset, attention_impl: str = "xla"):
        return build(preset, attention_impl)

    def init_args(self, preset) -> tuple:
        x = np.zeros((1, *preset.input_shape_nhwc), np.float32)
        return x, np.zeros((1,), np.int32), x

    def create_state(self, model, variables, tx, rng):
        return create_state(model, variables, tx, rng)

    def step_kwargs(self, recipe: dict) -> dict:
        return {"timesteps": recipe["timesteps"], "ema_decay": recipe["ema_decay"]}

    def preset_variables(self, variables: dict) -> dict:
        return {"params": variables["params"]["model"]}

    def finish(self, model, state, r) -> dict:
        t0 = time.perf_counter()
        draw = sampler(r.preset, r.recipe.get("num_samples", 256), r.recipe.get("ddim_steps"),
                       bool(r.recipe.get("clip_denoised")))
        samples = np.asarray(draw({"params": state.ema_params, **state.constants},
                                  jax.random.key(r.config.seed + 1)))
        return sample_report(samples, time.perf_counter() - t0, r)

    def export(self, state) -> dict:
        return flax_to_torch(self.preset_variables({"params": jax.device_get(state.ema_params)}))


class DiffusionTorch(TorchTraining):
    """The torch DDPM; the trainer keeps its EMA copy (`extra_state`) beside it."""

    def model(self, preset):
        return torch_ddpm(preset)

    def preset_module(self, model):
        return model.model

    def compile(self, model):
        model.model.compile()

    def extra_state(self, model) -> dict:
        return {"ema": copy.deepcopy(model).eval().requires_grad_(False)}

    def loss(self, model, batch: dict, recipe: dict):
        x = batch["image"]
        t = batch["t"] if "t" in batch else torch.randint(0, model.timesteps, (x.shape[0],),
                                                          device=x.device)
        noise = batch["noise"] if "noise" in batch else torch.randn(x.shape, device=x.device)
        return model.p_losses(x, t, noise), {}

    def after_step(self, trainer):
        """ema <- d ema + (1 - d) params with the JAX side's d = `steps.ema_decay(step)`."""
        d = steps.ema_decay(trainer.step, trainer.recipe["ema_decay"])
        with torch.no_grad():
            for e, p in zip(trainer.extra["ema"].parameters(), trainer.model.parameters()):
                e.mul_(d).add_(p, alpha=1 - d)

    def finish(self, trainer, r) -> dict:
        t0 = time.perf_counter()
        torch.manual_seed(r.config.seed + 1)
        n, ddim = r.recipe.get("num_samples", 256), r.recipe.get("ddim_steps")
        size, ch, clip = r.preset.image_size, r.preset.in_channels, bool(r.recipe.get("clip_denoised"))
        ema = trainer.extra["ema"]
        with torch.no_grad():
            x = (ema.ddim_sample(size, n, ch, ddim, clip_denoised=clip) if ddim
                 else ema.sample(size, n, ch, clip_denoised=clip))
        samples = x.clamp(-1, 1).permute(0, 2, 3, 1).numpy()
        return sample_report(samples, time.perf_counter() - t0, r)

    def export(self, trainer) -> dict:
        return {k: v.detach().numpy() for k, v in self.preset_module(trainer.extra["ema"]).state_dict().items()}


class DiffusionParity(ParityCase):
    def losses(self, flax_model):
        """The noise-prediction loss of the U-Net alone: mean (unet(x_t, t) - noise)^2 on batches
        of (x_t, t, noise), with x_t drawn on the host by the preset's schedule."""
        def torch_loss(model, batch):
            x_t, t, noise = batch
            return ((model(x_t, t) - noise) ** 2).mean()

        def flax_loss(params, variables, batch):
            x_t, t, noise = batch
            return jnp.mean(jnp.square(flax_model.apply({**variables, "params": params}, x_t, t) - noise))

        return torch_loss, flax_loss

    def batches(self, preset, n: int, batch_size: int, seed: int = 0):
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


@register
class Diffusion(Task):
    """DDPM: noise prediction at uniform timesteps, an EMA of the weights, and at the end samples
    from the EMA weights (WORKDIR/samples.npy, samples.png) and, on the digits, `digit_check`.
    The preset's model is the U-Net inside the DDPM; `--export` writes the EMA U-Net."""

    name = "diffusion"
    report = ("digit_check", "sample_quality")
    eval_by_default = False
    jax_training = DiffusionJax()
    torch_training = DiffusionTorch()
    parity = DiffusionParity()

    def check(self, r) -> None:
        """The schedule runs upward, DDIM takes at most its steps, the U-Net predicts noise of the
        image's channels and can halve the image at each of its stages."""
        recipe, kw = r.recipe, r.preset.kwargs
        if recipe["beta_start"] > recipe["beta_end"]:
            raise ValueError(f"--recipe beta_start={recipe['beta_start']} is above beta_end={recipe['beta_end']}; "
                             "the noise schedule runs from beta_start up to beta_end")
        if (recipe.get("ddim_steps") or 0) > recipe["timesteps"]:
            raise ValueError(f"--recipe ddim_steps={recipe['ddim_steps']}: DDIM takes at most the schedule's "
                             f"timesteps={recipe['timesteps']} steps")
        if kw["out_channels"] != kw["in_channels"]:
            raise ValueError(f"--set out_channels={kw['out_channels']}: the U-Net predicts the noise of the "
                             f"{kw['in_channels']}-channel images; out_channels must equal in_channels")
        halvings = len(kw["features"]) - 1
        if r.preset.image_size % 2 ** halvings:
            raise ValueError(f"the U-Net's {len(kw['features'])} stages halve the image {halvings} times; its "
                             f"size {r.preset.image_size} is not a multiple of {2 ** halvings}")

    def batch(self, batch: dict, step: int, r) -> dict:
        return {"image": batch["image"]}

    def example_batch(self, preset, batch_size: int, seed: int = 0) -> dict:
        """Images with their timesteps and noise fixed (the step draws them when absent), so
        that runs on any number of devices compute the same loss."""
        images, t = example_inputs(preset, batch_size, seed)
        noise = np.random.RandomState(seed + 1).standard_normal(images.shape).astype(np.float32)
        return {"image": np.clip(images, -1, 1), "t": t.astype(np.int32), "noise": noise}
