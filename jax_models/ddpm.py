"""DDPM of the first source in Flax linen: twins of `torch_reference/ddpm.py`, images NHWC.

`UNet(x, t, train=False)`: (B, H, W, C), (B,) integer timesteps -> (B, H, W, out_channels).
`DDPM(model, ...)` holds the schedule in the 'buffers' collection (torch's buffers, same names) and
is used through `apply(variables, ..., method=...)`: `q_sample`, `p_losses`, `p_sample`, and the
samplers `sample` (ancestral) and `ddim_sample`, each one compiled loop (`lax.fori_loop`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from twin_models.model_math import ddim_timesteps, linear_schedule

from .layers import (ConvTranspose2d, Dropout, GroupNorm, attend, check_feature_map, check_timesteps,  # noqa: F401
                     compute_dtype, conv, gelu, torch_linear_init)

class SinusoidalPositionEmbeddings(nn.Module):
    """(B,) timesteps -> (B, dim): [sin(t w_i), cos(t w_i)], w_i = 10000^(-i / (dim/2 - 1))."""
    dim: int

    def __call__(self, time):
        half_dim = self.dim // 2
        embeddings = math.log(10000) / (half_dim - 1)
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64 is on
        embeddings = np.exp(np.arange(half_dim, dtype=np.float64) * -embeddings).astype(dtype)
        embeddings = time.astype(dtype)[:, None] * embeddings[None, :]
        return jnp.concatenate([jnp.sin(embeddings), jnp.cos(embeddings)], axis=-1)


class _TimeMlp(nn.Module):
    """The source's `nn.Sequential(SinusoidalPositionEmbeddings, Linear, GELU, Linear)`."""
    time_emb_dim: int

    @nn.compact
    def __call__(self, t):
        h = SinusoidalPositionEmbeddings(self.time_emb_dim, name="0")(t)
        h = nn.Dense(self.time_emb_dim * 4, kernel_init=torch_linear_init, name="1")(h)
        return nn.Dense(self.time_emb_dim, kernel_init=torch_linear_init, name="3")(gelu(h))


class _NormActConv(nn.Module):
    """`nn.Sequential(GroupNorm, SiLU, [Dropout,] Conv2d)`: children '0' and '2' (or '3')."""
    features: int
    dropout: float | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.silu(GroupNorm(8, name="0")(x))
        if self.dropout is None:
            return conv(self.features, 3, padding=1, name="2")(x)
        x = Dropout(self.dropout, deterministic=not train, name="2")(x)
        return conv(self.features, 3, padding=1, name="3")(x)


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-Conv, + time projection, GroupNorm-SiLU-Dropout-Conv, + (1x1 conv) skip."""
    in_channels: int
    out_channels: int
    time_emb_dim: int
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, time_emb, train: bool = False):
        h = _NormActConv(self.out_channels, name="block1")(x)
        h = h + nn.Dense(self.out_channels, kernel_init=torch_linear_init, name="time_mlp")(time_emb)[:, None, None, :]
        h = _NormActConv(self.out_channels, self.dropout, name="block2")(h, train)
        if self.in_channels != self.out_channels:
            x = conv(self.out_channels, 1, name="residual_conv")(x)
        return h + x


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions (scale (C//8)^-0.5, as the source), residual."""
    channels: int
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        qkv = conv(C * 3, 1, name="qkv")(GroupNorm(8, name="norm")(x)).reshape(B, H * W, 3 * C)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = attend(q, k, v, (C // 8) ** -0.5, impl=self.attention_impl).reshape(B, H, W, C)
        return x + conv(C, 1, name="proj")(out)


class UNet(nn.Module):
    """The source's U-Net with the decoder fix of the torch twin: (B, H, W, in_channels), (B,)
    -> (B, H, W, out_channels)."""
    in_channels: int = 3
    out_channels: int = 3
    features: Sequence[int] = (64, 128, 256, 512)
    time_emb_dim: int = 256
    num_res_blocks: int = 2
    dropout: float = 0.1
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, timestep, train: bool = False):
        check_feature_map(x, self.in_channels, 2 ** len(self.features), type(self).__name__)
        check_timesteps(timestep, x.shape[0], type(self).__name__)
        feats, T, d = list(self.features), self.time_emb_dim, self.dropout

        def run(blocks, x):
            for block in blocks:
                x = block(x, t, train) if isinstance(block, ResidualBlock) else block(x)
            return x

        t = _TimeMlp(T, name="time_mlp")(timestep).astype(x.dtype)
        x = conv(feats[0], 3, padding=1, name="init_conv")(x)
        skips, in_ch = [], feats[0]
        for i, f in enumerate(feats):
            blocks = []
            for j in range(self.num_res_blocks):
                blocks.append(ResidualBlock(in_ch, f, T, d, name=f"encoder_{i}_{j}"))
                in_ch = f
            if f >= 256:
                blocks.append(AttentionBlock(f, self.attention_impl, name=f"encoder_{i}_{self.num_res_blocks}"))
            x = run(blocks, x)
            skips.append(x)
            x = conv(f, 3, stride=2, padding=1, name=f"pool_{i}")(x)

        x = run([ResidualBlock(feats[-1], feats[-1] * 2, T, d, name="bottleneck_0"),
                 AttentionBlock(feats[-1] * 2, self.attention_impl, name="bottleneck_1"),
                 ResidualBlock(feats[-1] * 2, feats[-1], T, d, name="bottleneck_2")], x)

        in_ch = feats[-1]
        for i, (f, skip) in enumerate(zip(reversed(feats), reversed(skips))):
            x = jnp.concatenate([ConvTranspose2d(in_ch, f, 2, stride=2, name=f"upconv_{i}")(x), skip], axis=-1)
            blocks = [ResidualBlock(f * 2 if j == 0 else f, f, T, d, name=f"decoder_{i}_{j}")
                      for j in range(self.num_res_blocks)]
            if f >= 256:
                blocks.append(AttentionBlock(f, self.attention_impl, name=f"decoder_{i}_{self.num_res_blocks}"))
            x = run(blocks, x)
            in_ch = f

        return _NormActConv(self.out_channels, name="final_conv")(x)


def _b(v):
    return v[:, None, None, None]


def predict_x0(x, eps, sqrt_alphas_cumprod_t, sqrt_one_minus_alphas_cumprod_t):
    """The x_0 that x_t and the predicted noise imply: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t),
    from the schedule's square roots (computed in float64: 1 - abar_t in float32 is off by 1.7e-4
    of itself at t = 0)."""
    return (x - sqrt_one_minus_alphas_cumprod_t * eps) / sqrt_alphas_cumprod_t


def posterior_mean(x0, x, betas_t, alphas_t, alphas_cumprod_prev_t, sqrt_one_minus_alphas_cumprod_t):
    """The mean of q(x_{t-1} | x_t, x_0): (sqrt(abar_{t-1}) beta_t x_0 + sqrt(alpha_t) (1 -
    abar_{t-1}) x_t) / (1 - abar_t); at t = 0, x_0."""
    return (jnp.sqrt(alphas_cumprod_prev_t) * betas_t * x0
            + jnp.sqrt(alphas_t) * (1 - alphas_cumprod_prev_t) * x) / sqrt_one_minus_alphas_cumprod_t ** 2


class DDPM(nn.Module):
    """Denoising Diffusion Probabilistic Model around a noise predictor `model(x_t, t)`.

    Variables: 'params' (the model's, under `model/`) and 'buffers' (the schedule). `__call__(x)`
    is the training loss at timesteps and noise drawn from the 'diffusion' rng (or given).
    """
    model: nn.Module
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def setup(self):
        schedule = linear_schedule(self.timesteps, self.beta_start, self.beta_end)
        self.s = {k: self.variable("buffers", k, lambda v=v: jnp.asarray(v)).value
                  for k, v in schedule.items()}

    def q_sample(self, x_start, t, noise):
        """x_t ~ q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, in the dtype of x_0."""
        c = lambda name: _b(self.s[name][t]).astype(x_start.dtype)
        return c("sqrt_alphas_cumprod") * x_start + c("sqrt_one_minus_alphas_cumprod") * noise

    def p_losses(self, x_start, t, noise, train: bool = False):
        """MSE between the noise and the model's prediction of it from x_t; float32 for bfloat16 models."""
        err = noise - self.model(self.q_sample(x_start, t, noise), t, train)
        return jnp.mean(jnp.square(err.astype(compute_dtype(err.dtype))))

    def __call__(self, x, t=None, noise=None, train: bool = False):
        if t is None:
            t = jax.random.randint(self.make_rng("diffusion"), (x.shape[0],), 0, self.timesteps)
        if noise is None:
            noise = jax.random.normal(self.make_rng("diffusion"), x.shape, x.dtype)
        return self.p_losses(x, t, noise, train)

    def p_sample(self, x, t, t_index, noise, clip_denoised=False):
        """x_{t-1} ~ p(x_{t-1} | x_t) with the given standard normal `noise` (like x). With
        `clip_denoised`, the mean is the posterior q(x_{t-1} | x_t, x_0)'s at the model's x_0
        clipped to the data range [-1, 1] (Ho et al.'s sampler); without, the source's eps form."""
        s = self.s
        eps = self.model(x, t)
        if clip_denoised:
            b = lambda name: _b(s[name][t])
            x0 = jnp.clip(predict_x0(x, eps, b("sqrt_alphas_cumprod"), b("sqrt_one_minus_alphas_cumprod")),
                          -1.0, 1.0)
            model_mean = posterior_mean(x0, x, b("betas"), b("alphas"), b("alphas_cumprod_prev"),
                                        b("sqrt_one_minus_alphas_cumprod"))
        else:
            sqrt_recip_alphas_t = _b(jnp.sqrt(1.0 / s["alphas"][t]))
            model_mean = sqrt_recip_alphas_t * (
                x - _b(s["betas"][t]) * eps / _b(s["sqrt_one_minus_alphas_cumprod"][t]))
        return jnp.where(t_index == 0, model_mean,
                         model_mean + jnp.sqrt(_b(s["posterior_variance"][t])) * noise)

    def sample(self, rng, image_size, batch_size=1, channels=3, img=None, noise=None, clip_denoised=False):
        """The ancestral sampler, one `fori_loop`: (B, size, size, channels). `img` is x_T and
        `noise[t]` the draw at step t (T, B, size, size, channels); drawn from `rng` if not given.
        `clip_denoised`: see `p_sample`."""
        shape = (batch_size, image_size, image_size, channels)
        img = jax.random.normal(jax.random.fold_in(rng, self.timesteps), shape) if img is None else img

        def step(i, x):
            t = self.timesteps - 1 - i
            z = jax.random.normal(jax.random.fold_in(rng, t), x.shape) if noise is None else noise[t]
            return self.p_sample(x, jnp.full((x.shape[0],), t), t, z, clip_denoised)

        return jax.lax.fori_loop(0, self.timesteps, step, img)

    def ddim_sample(self, rng, image_size, batch_size=1, channels=3, steps=50, img=None, clip_denoised=False):
        """Deterministic DDIM (eta = 0) over `ddim_timesteps(timesteps, steps)`, one `fori_loop`.
        `clip_denoised`: each step's x_0 is clipped to [-1, 1] and the noise it implies recomputed
        from it, so that the next x_t is built from an image in the data range."""
        shape = (batch_size, image_size, image_size, channels)
        img = jax.random.normal(jax.random.fold_in(rng, self.timesteps), shape) if img is None else img
        ts = np.array(ddim_timesteps(self.timesteps, steps))
        a = self.s["alphas_cumprod"]
        a_t_all = a[ts]
        a_prev_all = jnp.concatenate([a[ts[1:]], jnp.ones((1,), a.dtype)])

        def step(i, x):
            a_t, a_prev = a_t_all[i], a_prev_all[i]
            eps = self.model(x, jnp.full((x.shape[0],), jnp.asarray(ts)[i]))
            x0 = (x - jnp.sqrt(1 - a_t) * eps) / jnp.sqrt(a_t)
            if clip_denoised:
                x0 = jnp.clip(x0, -1.0, 1.0)
                eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(1 - a_t)
            return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps

        return jax.lax.fori_loop(0, len(ts), step, img)
