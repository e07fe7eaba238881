"""The diffusion step of the eager PyTorch backend: the same update and EMA as `train.diffusion`."""

from __future__ import annotations

import copy

import torch


def build(preset):
    """The torch `DDPM` of a diffusion preset: the preset's U-Net inside the recipe's schedule."""
    import torch_reference
    from torch_reference.ddpm import DDPM

    r = preset.train
    return DDPM(torch_reference.create_model(preset), r["timesteps"], r["beta_start"], r["beta_end"])


def make_ema(ddpm: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `ddpm` in eval mode, the moving average that sampling uses."""
    ema = copy.deepcopy(ddpm).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def diffusion_step(ddpm, ema, optimizer, images: torch.Tensor, step: int, ema_decay: float,
                   generator: torch.Generator | None = None, t=None, noise=None) -> dict:
    """One update of the noise-prediction loss on NCHW `images` in [-1, 1] at uniform timesteps
    (or the given `t` and `noise`), then ema <- d ema + (1 - d) params, d = min(decay, (1 + step)
    / (10 + step)). Returns the metrics: loss, grad_norm."""
    ddpm.train()
    if t is None:
        t = torch.randint(0, ddpm.timesteps, (images.shape[0],), generator=generator)
    if noise is None:
        noise = torch.randn(images.shape, generator=generator)
    optimizer.zero_grad()
    loss = ddpm.p_losses(images, t, noise)
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.square().sum() for p in ddpm.parameters() if p.grad is not None))
    optimizer.step()
    d = min(ema_decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), ddpm.parameters()):
            e.mul_(d).add_(p, alpha=1 - d)
    return {"loss": loss.item(), "grad_norm": grad_norm.item()}
