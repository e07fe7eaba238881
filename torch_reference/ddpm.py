"""DDPM of the first source, in PyTorch: sinusoidal time embedding, GroupNorm U-Net, linear schedule.

`UNet(x, t)`: (B, C, H, W) images and (B,) integer timesteps -> (B, out_channels, H, W) noise.
`DDPM(model)`: q_sample, p_losses, the ancestral p_sample/sample of the source, and a deterministic
DDIM sampler. Fixes against the source (listed in the README): the decoder's channel counts (the
first `upconv` takes the bottleneck's `features[-1]` channels; only the first ResidualBlock of a
decoder stage sees the concatenated skip) and the schedule as registered buffers. `dropout` of
`UNet` and the `noise` / `img` arguments of the samplers are additions.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from twin_models.model_math import ddim_timesteps, linear_schedule

from .layers import check_feature_map, check_timesteps


class SinusoidalPositionEmbeddings(nn.Module):
    """(B,) timesteps -> (B, dim): [sin(t w_i), cos(t w_i)], w_i = 10000^(-i / (dim/2 - 1))."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, time):
        half_dim = self.dim // 2
        embeddings = math.log(10000) / (half_dim - 1)
        # float64, rounded once: a last-bit difference of float32 exp grows with t up to 1e-4
        embeddings = torch.exp(torch.arange(half_dim, device=time.device, dtype=torch.float64) * -embeddings)
        embeddings = time[:, None] * embeddings.to(torch.get_default_dtype())[None, :]
        return torch.cat((embeddings.sin(), embeddings.cos()), dim=-1)


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-Conv, + time projection, GroupNorm-SiLU-Dropout-Conv, + (1x1 conv) skip."""

    def __init__(self, in_channels, out_channels, time_emb_dim, dropout=0.1):
        super().__init__()
        self.time_mlp = nn.Linear(time_emb_dim, out_channels)
        self.block1 = nn.Sequential(
            nn.GroupNorm(8, in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.block2 = nn.Sequential(
            nn.GroupNorm(8, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.residual_conv = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                              else nn.Identity())

    def forward(self, x, time_emb):
        h = self.block1(x)
        h = h + self.time_mlp(time_emb)[:, :, None, None]
        h = self.block2(h)
        return h + self.residual_conv(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions (scale (C//8)^-0.5, as the source), residual."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        q = q.reshape(B, C, H * W).transpose(1, 2)
        k = k.reshape(B, C, H * W).transpose(1, 2)
        v = v.reshape(B, C, H * W).transpose(1, 2)
        attn = F.softmax(torch.bmm(q, k.transpose(1, 2)) * (C // 8) ** -0.5, dim=-1)
        out = torch.bmm(attn, v).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(out)


def _run(blocks, x, t):
    for block in blocks:
        x = block(x, t) if isinstance(block, ResidualBlock) else block(x)
    return x


class UNet(nn.Module):
    """The source's U-Net: (B, in_channels, H, W), (B,) -> (B, out_channels, H, W); H, W multiples
    of 2**len(features). Attention at stages of >= 256 features and in the bottleneck."""

    def __init__(self, in_channels=3, out_channels=3, features=(64, 128, 256, 512),
                 time_emb_dim=256, num_res_blocks=2, dropout=0.1):
        super().__init__()
        features = list(features)
        self.time_mlp = nn.Sequential(
            SinusoidalPositionEmbeddings(time_emb_dim),
            nn.Linear(time_emb_dim, time_emb_dim * 4),
            nn.GELU(),
            nn.Linear(time_emb_dim * 4, time_emb_dim),
        )
        self.encoder = nn.ModuleList()
        self.pool = nn.ModuleList()
        self.init_conv = nn.Conv2d(in_channels, features[0], 3, padding=1)
        in_ch = features[0]
        for feature in features:
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_ch, feature, time_emb_dim, dropout))
                in_ch = feature
            if feature >= 256:
                blocks.append(AttentionBlock(feature))
            self.encoder.append(nn.ModuleList(blocks))
            self.pool.append(nn.Conv2d(feature, feature, 3, stride=2, padding=1))

        self.bottleneck = nn.ModuleList([
            ResidualBlock(features[-1], features[-1] * 2, time_emb_dim, dropout),
            AttentionBlock(features[-1] * 2),
            ResidualBlock(features[-1] * 2, features[-1], time_emb_dim, dropout),
        ])

        self.decoder = nn.ModuleList()
        self.upconv = nn.ModuleList()
        in_ch = features[-1]  # fix: the source's ConvTranspose2d(feature * 2, ...) gets features[-1] first
        for feature in reversed(features):
            self.upconv.append(nn.ConvTranspose2d(in_ch, feature, 2, stride=2))
            blocks = []
            for i in range(num_res_blocks):  # fix: only the first block sees the concatenated skip
                blocks.append(ResidualBlock(feature * 2 if i == 0 else feature, feature, time_emb_dim, dropout))
            if feature >= 256:
                blocks.append(AttentionBlock(feature))
            self.decoder.append(nn.ModuleList(blocks))
            in_ch = feature

        self.final_conv = nn.Sequential(
            nn.GroupNorm(8, features[0]),
            nn.SiLU(),
            nn.Conv2d(features[0], out_channels, 3, padding=1),
        )

    def forward(self, x, timestep):
        check_feature_map(x, self.init_conv.in_channels, 2 ** len(self.pool), type(self).__name__,
                          self.init_conv.weight.dtype)
        check_timesteps(timestep, x.shape[0], type(self).__name__)
        t = self.time_mlp(timestep)
        x = self.init_conv(x)
        skip_connections = []
        for encoder_block, pool in zip(self.encoder, self.pool):
            x = _run(encoder_block, x, t)
            skip_connections.append(x)
            x = pool(x)
        x = _run(self.bottleneck, x, t)
        for decoder_block, upconv, skip in zip(self.decoder, self.upconv, reversed(skip_connections)):
            x = torch.cat([upconv(x), skip], dim=1)
            x = _run(decoder_block, x, t)
        return self.final_conv(x)


def predict_x0(x, eps, sqrt_alphas_cumprod_t, sqrt_one_minus_alphas_cumprod_t):
    """The x_0 that x_t and the predicted noise imply: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t),
    from the schedule's square roots (computed in float64: 1 - abar_t in float32 is off by 1.7e-4
    of itself at t = 0)."""
    return (x - sqrt_one_minus_alphas_cumprod_t * eps) / sqrt_alphas_cumprod_t


def posterior_mean(x0, x, betas_t, alphas_t, alphas_cumprod_prev_t, sqrt_one_minus_alphas_cumprod_t):
    """The mean of q(x_{t-1} | x_t, x_0): (sqrt(abar_{t-1}) beta_t x_0 + sqrt(alpha_t) (1 -
    abar_{t-1}) x_t) / (1 - abar_t); at t = 0, x_0."""
    return (torch.sqrt(alphas_cumprod_prev_t) * betas_t * x0
            + torch.sqrt(alphas_t) * (1 - alphas_cumprod_prev_t) * x) / sqrt_one_minus_alphas_cumprod_t ** 2


class DDPM(nn.Module):
    """Denoising Diffusion Probabilistic Model around a noise predictor `model(x_t, t)`."""

    def __init__(self, model, timesteps=1000, beta_start=1e-4, beta_end=0.02):
        super().__init__()
        self.model = model
        self.timesteps = timesteps
        for name, value in linear_schedule(timesteps, beta_start, beta_end).items():
            self.register_buffer(name, torch.from_numpy(value))

    def q_sample(self, x_start, t, noise=None):
        """x_t ~ q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        sqrt_alphas_cumprod_t = self.sqrt_alphas_cumprod[t][:, None, None, None]
        sqrt_one_minus_alphas_cumprod_t = self.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
        return sqrt_alphas_cumprod_t * x_start + sqrt_one_minus_alphas_cumprod_t * noise

    def p_losses(self, x_start, t, noise=None):
        """MSE between the noise and the model's prediction of it from x_t."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        predicted_noise = self.model(x_noisy, t)
        return F.mse_loss(noise, predicted_noise)

    @torch.no_grad()
    def p_sample(self, x, t, t_index, noise=None, clip_denoised=False):
        """x_{t-1} ~ p(x_{t-1} | x_t); `noise` (like x) replaces the draw. With `clip_denoised`, the
        mean is the posterior q(x_{t-1} | x_t, x_0)'s at the model's x_0 clipped to [-1, 1]."""
        eps = self.model(x, t)
        if clip_denoised:
            b = lambda name: getattr(self, name)[t][:, None, None, None]
            x0 = predict_x0(x, eps, b("sqrt_alphas_cumprod"), b("sqrt_one_minus_alphas_cumprod")).clamp(-1.0, 1.0)
            model_mean = posterior_mean(x0, x, b("betas"), b("alphas"), b("alphas_cumprod_prev"),
                                        b("sqrt_one_minus_alphas_cumprod"))
        else:
            betas_t = self.betas[t][:, None, None, None]
            sqrt_one_minus_alphas_cumprod_t = self.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
            sqrt_recip_alphas_t = torch.sqrt(1.0 / self.alphas[t])[:, None, None, None]
            model_mean = sqrt_recip_alphas_t * (x - betas_t * eps / sqrt_one_minus_alphas_cumprod_t)
        if t_index == 0:
            return model_mean
        posterior_variance_t = self.posterior_variance[t][:, None, None, None]
        if noise is None:
            noise = torch.randn_like(x)
        return model_mean + torch.sqrt(posterior_variance_t) * noise

    @torch.no_grad()
    def sample(self, image_size, batch_size=1, channels=3, img=None, noise=None, clip_denoised=False):
        """The ancestral sampler: (B, channels, size, size). `img` is x_T; `noise[t]` the draw at step t."""
        device = self.betas.device
        if img is None:
            img = torch.randn((batch_size, channels, image_size, image_size), device=device)
        for i in reversed(range(0, self.timesteps)):
            t = torch.full((img.shape[0],), i, device=device, dtype=torch.long)
            img = self.p_sample(img, t, i, None if noise is None else noise[i], clip_denoised)
        return img

    @torch.no_grad()
    def ddim_sample(self, image_size, batch_size=1, channels=3, steps=50, img=None, clip_denoised=False):
        """Deterministic DDIM (eta = 0) over `ddim_timesteps(timesteps, steps)`; `clip_denoised`
        clips each step's x_0 to [-1, 1] and recomputes the noise it implies."""
        device = self.betas.device
        if img is None:
            img = torch.randn((batch_size, channels, image_size, image_size), device=device)
        ts = ddim_timesteps(self.timesteps, steps)
        for i, step in enumerate(ts):
            t = torch.full((img.shape[0],), step, device=device, dtype=torch.long)
            a_t = self.alphas_cumprod[step]
            a_prev = self.alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(a_t)
            eps = self.model(img, t)
            x0 = (img - torch.sqrt(1 - a_t) * eps) / torch.sqrt(a_t)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
                eps = (img - torch.sqrt(a_t) * x0) / torch.sqrt(1 - a_t)
            img = torch.sqrt(a_prev) * x0 + torch.sqrt(1 - a_prev) * eps
        return img

    def forward(self, x, t=None, noise=None):
        """The training loss at uniformly drawn timesteps (or the given `t` and `noise`)."""
        if t is None:
            t = torch.randint(0, self.timesteps, (x.shape[0],), device=x.device).long()
        return self.p_losses(x, t, noise)
