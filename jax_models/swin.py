"""Swin Transformer in Flax linen: twins of `torch_reference/swin.py`.

Images are NHWC, tokens (B, H*W, C). `__call__(x, train=False)`: dropout and drop path are active
only with `train=True` and a 'dropout' rng. The relative position index and the shifted-window
mask are computed, not learned, and kept in the 'buffers' collection (torch's buffers), where the
bridge checks them against the torch values. The last field, `attention_impl`, is Flax only: which
`layers.attend` kernel runs ("xla", "fused", "cudnn").
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from twin_models.model_math import check_resolution, effective_window, relative_position_index, shifted_window_mask

from .layers import LN_EPS, DropPath, Dropout, LayerNorm, Mlp, PatchEmbedding, attend, trunc_normal_02


def window_partition(x, window_size):
    """(B, H, W, C) -> (B * nW, window_size, window_size, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)


def window_reverse(windows, window_size, H, W):
    """(B * nW, window_size, window_size, C) -> (B, H, W, C): the inverse of `window_partition`."""
    C = windows.shape[-1]
    x = windows.reshape(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias:
    (B*nW, N, C) -> (B*nW, N, C); `mask` (nW, N, N) is added to the logits (shifted windows)."""
    dim: int
    window_size: Sequence[int]
    num_heads: int
    qkv_bias: bool = True
    attn_drop: float = 0.
    proj_drop: float = 0.
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False):
        B_, N, C = x.shape
        Wh, Ww = self.window_size
        table = self.param("relative_position_bias_table", trunc_normal_02,
                           ((2 * Wh - 1) * (2 * Ww - 1), self.num_heads))
        index = self.variable("buffers", "relative_position_index",
                              lambda: jnp.asarray(relative_position_index((Wh, Ww)))).value
        qkv = nn.Dense(self.dim * 3, use_bias=self.qkv_bias, kernel_init=trunc_normal_02, name="qkv")(x)
        qkv = qkv.reshape(B_, N, 3, self.num_heads, C // self.num_heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = table[index.reshape(-1)].reshape(N, N, -1).transpose(2, 0, 1)
        if mask is not None:
            nW = mask.shape[0]
            q, k, v = (t.reshape(B_ // nW, nW, *t.shape[1:]) for t in (q, k, v))
            bias = bias + mask[:, None]
        drop = Dropout(self.attn_drop, deterministic=not train, name="attn_drop")
        x = attend(q, k, v, (self.dim // self.num_heads) ** -0.5, bias=bias, dropout=drop,
                   impl=self.attention_impl)
        x = x.reshape(B_, self.num_heads, N, -1).transpose(0, 2, 1, 3).reshape(B_, N, C)
        x = nn.Dense(self.dim, kernel_init=trunc_normal_02, name="proj")(x)
        return Dropout(self.proj_drop, deterministic=not train, name="proj_drop")(x)


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention and MLP, both pre-norm residual: (B, H*W, C) -> (B, H*W, C)."""
    dim: int
    input_resolution: Sequence[int]
    num_heads: int
    window_size: int = 7
    shift_size: int = 0
    mlp_ratio: float = 4.
    qkv_bias: bool = True
    drop: float = 0.
    attn_drop: float = 0.
    drop_path: float = 0.
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool = False):
        H, W = self.input_resolution
        B, L, C = x.shape
        ws, s = effective_window(self.input_resolution, self.window_size, self.shift_size)
        check_resolution(self.input_resolution, ws, type(self).__name__)
        if L != H * W:
            raise ValueError(f"{type(self).__name__} expects {H * W} = {H}x{W} tokens; got {L}")
        mask = None
        if s > 0:
            mask = self.variable("buffers", "attn_mask",
                                 lambda: jnp.asarray(shifted_window_mask(H, W, ws, s))).value
        drop_path = DropPath(self.drop_path, name="drop_path")
        shortcut = x
        x = LayerNorm(epsilon=LN_EPS, name="norm1")(x).reshape(B, H, W, C)
        if s > 0:
            x = jnp.roll(x, (-s, -s), axis=(1, 2))
        attn = WindowAttention(self.dim, (ws, ws), self.num_heads, self.qkv_bias, self.attn_drop,
                               self.drop, self.attention_impl, name="attn")
        windows = attn(window_partition(x, ws).reshape(-1, ws * ws, C), mask=mask, train=train)
        x = window_reverse(windows.reshape(-1, ws, ws, C), ws, H, W)
        if s > 0:
            x = jnp.roll(x, (s, s), axis=(1, 2))
        x = shortcut + drop_path(x.reshape(B, H * W, C), train)
        y = LayerNorm(epsilon=LN_EPS, name="norm2")(x)
        y = Mlp(self.dim, int(self.dim * self.mlp_ratio), dropout=self.drop,
                kernel_init=trunc_normal_02, name="mlp")(y, train)
        return x + drop_path(y, train)


class PatchMerging(nn.Module):
    """Each 2x2 neighbourhood concatenated, normed and projected: (B, H*W, C) -> (B, H/2*W/2, 2C)."""
    input_resolution: Sequence[int]
    dim: int

    @nn.compact
    def __call__(self, x):
        H, W = self.input_resolution
        if H % 2 or W % 2:
            raise ValueError(f"{type(self).__name__}: input resolution {H}x{W} is not even")
        B, _, C = x.shape
        x = x.reshape(B, H, W, C)
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        x = LayerNorm(epsilon=LN_EPS, name="norm")(x.reshape(B, -1, 4 * C))
        return nn.Dense(2 * self.dim, use_bias=False, kernel_init=trunc_normal_02, name="reduction")(x)


class BasicLayer(nn.Module):
    """One stage: `depth` blocks alternating shift 0 and window/2, then PatchMerging if `downsample`."""
    dim: int
    input_resolution: Sequence[int]
    depth: int
    num_heads: int
    window_size: int = 7
    mlp_ratio: float = 4.
    qkv_bias: bool = True
    drop: float = 0.
    attn_drop: float = 0.
    drop_path: Sequence[float] = ()
    downsample: bool = False
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool = False):
        drop_path = list(self.drop_path) or [0.0] * self.depth
        for i in range(self.depth):
            x = SwinTransformerBlock(self.dim, self.input_resolution, self.num_heads, self.window_size,
                                     0 if i % 2 == 0 else self.window_size // 2, self.mlp_ratio,
                                     self.qkv_bias, self.drop, self.attn_drop, drop_path[i],
                                     self.attention_impl, name=f"blocks_{i}")(x, train)
        if self.downsample:
            x = PatchMerging(self.input_resolution, self.dim, name="downsample")(x)
        return x


class SwinTransformer(nn.Module):
    """(B, H, W, C) -> (B, num_classes), or the pooled (B, embed_dim * 2**(stages-1)) feature when
    `num_classes=0`. Drop path grows linearly over the blocks from 0 to `drop_path_rate`."""
    image_size: int = 224
    patch_size: int = 4
    in_channels: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path_rate: float = 0.1
    attention_impl: str = "xla"

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = PatchEmbedding(self.image_size, self.patch_size, self.in_channels, self.embed_dim,
                           rearrange=False, name="patch_embed")(x)
        x = LayerNorm(epsilon=LN_EPS, name="patch_norm")(x)
        x = Dropout(self.dropout, deterministic=not train, name="pos_drop")(x)
        dpr = np.linspace(0, self.drop_path_rate, sum(self.depths), dtype=np.float32).tolist()
        res = self.image_size // self.patch_size
        for i, depth in enumerate(self.depths):
            x = BasicLayer(self.embed_dim * 2 ** i, (res // 2 ** i, res // 2 ** i), depth,
                           self.num_heads[i], self.window_size, self.mlp_ratio, self.qkv_bias,
                           self.dropout, self.attn_dropout,
                           tuple(dpr[sum(self.depths[:i]):sum(self.depths[:i + 1])]),
                           downsample=i < len(self.depths) - 1, attention_impl=self.attention_impl,
                           name=f"layers_{i}")(x, train)
        x = LayerNorm(epsilon=LN_EPS, name="norm")(x).mean(1)
        if self.num_classes == 0:
            return x
        return nn.Dense(self.num_classes, kernel_init=trunc_normal_02, name="head")(x)
