"""Framework-free helpers both model packages use, written once (numpy only): Swin's window
geometry and buffers, DDPM's noise schedule and DDIM's timesteps, ViT's sine-cosine position table. `torch_reference` turns the
arrays into tensors and `jax_models` into jax arrays, so both twins start from the same bits."""

from __future__ import annotations

import numpy as np


POS_EMBED_INITS = ("normal", "sincos2d")


def sincos_2d(grid: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """(grid * grid, dim) float32: the fixed 2D sine-cosine position table of MAE and big_vision's
    `posemb_sincos_2d`, patches row-major. A quarter of the channels each holds sin(x w), cos(x w),
    sin(y w), cos(y w) at dim / 4 frequencies w from 1 to 1 / temperature, so the dot product of two
    rows falls with their distance along each axis from the first step on."""
    if dim % 4:
        raise ValueError(f"a 2D sine-cosine position table needs a width divisible by 4; got {dim}")
    y, x = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
    x, y = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def position_table(kind: str, grid: int, dim: int, std: float, class_token: bool = True) -> np.ndarray | None:
    """The initial position table (1, [1 +] grid * grid, dim) of a grid of patches, a class-token
    row first with `class_token`, for the init `kind`: "sincos2d", `sincos_2d` scaled to standard
    deviation `std` (the class token's row zero); None for "normal" (each framework draws its own
    normal table of `std`)."""
    if kind not in POS_EMBED_INITS:
        raise ValueError(f"the position table's init must be one of {POS_EMBED_INITS}; got {kind!r}")
    if kind == "normal":
        return None
    table = sincos_2d(grid, dim)
    table = table * np.float32(std / table.std())
    if class_token:
        table = np.concatenate([np.zeros((1, dim), np.float32), table])
    return table[None]


def relative_position_index(window_size) -> np.ndarray:
    """(Wh*Ww, Wh*Ww) int64: the row of Swin's `relative_position_bias_table` for each pair of
    tokens of a window."""
    coords = np.stack(np.meshgrid(np.arange(window_size[0]), np.arange(window_size[1]),
                                  indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    return ((rel[..., 0] + window_size[0] - 1) * (2 * window_size[1] - 1)
            + rel[..., 1] + window_size[1] - 1).astype(np.int64)


def shifted_window_mask(H, W, window_size, shift_size) -> np.ndarray:
    """(nW, N, N) float32: -100 between tokens of one window that came from different regions of
    the cyclically shifted (H, W) map, 0 elsewhere (N = window_size**2; windows row-major)."""
    img = np.zeros((H, W), np.float32)
    cuts = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    for i, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
        img[h, w] = i
    regions = img.reshape(H // window_size, window_size, W // window_size, window_size)
    regions = regions.transpose(0, 2, 1, 3).reshape(-1, window_size * window_size)
    diff = regions[:, None, :] - regions[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def effective_window(input_resolution, window_size, shift_size):
    """(window, shift) of a Swin block: a window as large as the map replaces a larger one,
    unshifted."""
    if min(input_resolution) <= window_size:
        return min(input_resolution), 0
    return window_size, shift_size


def check_resolution(input_resolution, window_size, owner):
    """A ValueError naming `owner` when the window does not divide the map."""
    H, W = input_resolution
    if H % window_size or W % window_size:
        raise ValueError(f"{owner}: input resolution {H}x{W} is not divisible by window_size "
                         f"{window_size}; choose image_size / patch_size / 2**stage divisible by it")


def linear_schedule(timesteps, beta_start, beta_end) -> dict[str, np.ndarray]:
    """DDPM's linear schedule and what the sampler reads from it, float32: computed in float64
    and rounded once (float32 `linspace` and `cumprod` differ between torch and XLA in the last
    bit)."""
    i = np.arange(timesteps, dtype=np.float64)
    betas = beta_start + (beta_end - beta_start) * i / max(timesteps - 1, 1)
    alphas = 1 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.concatenate([np.ones(1), alphas_cumprod[:-1]])
    s = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1 - alphas_cumprod),
        posterior_variance=betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
    )
    return {k: v.astype(np.float32) for k, v in s.items()}


def ddim_timesteps(timesteps, steps) -> list[int]:
    """`steps` timesteps spread evenly over [0, timesteps - 1], both ends included, descending."""
    if steps == 1:
        return [timesteps - 1]
    return [round(i * (timesteps - 1) / (steps - 1)) for i in reversed(range(steps))]
