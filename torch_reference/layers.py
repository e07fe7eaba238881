"""Layers shared by the PyTorch reference models: one patch embedding, one attention, one MLP.

Each has a Flax twin of the same name in `jax_models/layers.py`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _check_dtype(x: torch.Tensor, dtype: torch.dtype, owner: str) -> None:
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{owner} has {dtype} weights but got {x.dtype} images; convert the input "
                         f"(x.to({dtype})) or the model (model.to({x.dtype}))")


def check_images(x: torch.Tensor, image_size: int, in_channels: int, owner: str,
                 dtype: torch.dtype | None = None) -> None:
    """Raise a ValueError naming what `owner` expects when `x` is not (B, C, H, W) floats of the
    weights' `dtype`."""
    expected = f"(B, {in_channels}, {image_size}, {image_size}) floating-point images (NCHW)"
    if x.ndim != 4:
        raise ValueError(f"{owner} expects {expected}; got a rank-{x.ndim} tensor of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{owner} expects {expected}; got dtype {x.dtype}")
    if tuple(x.shape[1:]) != (in_channels, image_size, image_size):
        raise ValueError(f"{owner} expects {expected}; got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{owner} expects {expected}; got an empty batch")
    if dtype is not None:
        _check_dtype(x, dtype, owner)


def check_feature_map(x: torch.Tensor, in_channels: int, multiple: int, owner: str,
                      dtype: torch.dtype | None = None) -> None:
    """Raise a ValueError unless `x` is (B > 0, in_channels, H, W) floats of the weights' `dtype`
    with H and W multiples of `multiple` (a U-Net that halves the resolution log2(multiple) times)."""
    expected = (f"(B, {in_channels}, H, W) floating-point images (NCHW) with H and W multiples "
                f"of {multiple}")
    if x.ndim != 4:
        raise ValueError(f"{owner} expects {expected}; got a rank-{x.ndim} tensor of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{owner} expects {expected}; got dtype {x.dtype}")
    if x.shape[1] != in_channels or x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"{owner} expects {expected}; got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{owner} expects {expected}; got an empty batch")
    if dtype is not None:
        _check_dtype(x, dtype, owner)


def check_token_ids(ids: torch.Tensor, vocab_size: int, owner: str) -> None:
    """Raise a ValueError unless every id lies in [0, vocab_size)."""
    if not ids.numel():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{owner} expects token ids in [0, {vocab_size - 1}] (vocab_size {vocab_size}); "
                         f"got ids {lo}..{hi}")


def check_timesteps(t, batch: int, owner: str) -> None:
    """Raise a ValueError unless `t` holds one timestep per image, shape (batch,)."""
    shape = tuple(getattr(t, "shape", ()))
    if shape != (batch,):
        raise ValueError(f"{owner} expects one timestep per image, shape ({batch},); got "
                         f"{'a ' + type(t).__name__ if not shape else 'shape ' + str(shape)}")


def add_class_token(x, cls_token, pos_embed):
    """(B, N, D) patch tokens -> (B, 1 + N, D): the class token in front, then the position table
    added (the prologue of both ViTs)."""
    return torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos_embed


class FlattenPatches(nn.Module):
    """`b e h w -> b (h w) e`: the source's einops `Rearrange`, which holds no weights."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class PatchEmbedding(nn.Module):
    """Non-overlapping patches -> tokens: (B, C, H, W) -> (B, (H/p)*(W/p), embed_dim).

    `rearrange=True` is the first source's layout (`projection.0` is the conv, followed by a
    Rearrange); `rearrange=False` is the second's (`projection` is the conv, flattened in forward).
    `bias=False`: a conv without bias (CLIP's, in open_clip and Hugging Face).
    """

    def __init__(self, image_size=224, patch_size=16, in_channels=3, embed_dim=768, rearrange=True, bias=True):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.num_patches = (image_size // patch_size) ** 2
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        conv = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.projection = nn.Sequential(conv, FlattenPatches()) if rearrange else conv

    def forward(self, x):
        conv = self.projection[0] if isinstance(self.projection, nn.Sequential) else self.projection
        check_images(x, self.image_size, self.in_channels, type(self).__name__, conv.weight.dtype)
        x = self.projection(x)
        return x if x.ndim == 3 else x.flatten(2).transpose(1, 2)


def attend(q, k, v, scale, bias=None, mask=None, dropout=None):
    """softmax(q k^T * scale + bias) v over (..., N, D) heads; `mask` is True where attention is allowed."""
    attn = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        attn = attn + bias
    if mask is not None:
        attn = attn.masked_fill(~mask, torch.finfo(attn.dtype).min)
    attn = F.softmax(attn, dim=-1)
    if dropout is not None:
        attn = dropout(attn)
    return attn @ v


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation of OpenAI's CLIP (`act="quick_gelu"`)."""

    def __init__(self):
        super().__init__()

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def activation(act: str) -> nn.Module:
    """The activation module named `act`: "gelu" (exact, erf), "gelu_tanh" (tanh approximation) or
    "quick_gelu"."""
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not one of {ACTIVATIONS}")
    return {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "quick_gelu": QuickGELU}[act]()


class Mlp(nn.Sequential):
    """Linear -> GELU -> Dropout -> Linear -> Dropout, keyed `0` and `3` like the sources' nn.Sequential;
    `dropout_layers=False`: Linear -> GELU -> Linear, keyed `0` and `2` (the second source's FFN).
    `act` names the activation (`activation`): exact GELU by default."""

    def __init__(self, in_features, hidden_features, out_features=None, dropout=0.0, dropout_layers=True,
                 act="gelu"):
        if dropout and not dropout_layers:
            raise ValueError(f"dropout {dropout} needs dropout_layers=True")
        out_features = out_features or in_features
        if not dropout_layers:
            super().__init__(nn.Linear(in_features, hidden_features), activation(act),
                             nn.Linear(hidden_features, out_features))
            return
        super().__init__(
            nn.Linear(in_features, hidden_features),
            activation(act),
            nn.Dropout(dropout),
            nn.Linear(hidden_features, out_features),
            nn.Dropout(dropout),
        )


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sample's residual branch with probability
    `drop_prob` and scale the kept ones by 1/(1-drop_prob); the identity in eval."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep
