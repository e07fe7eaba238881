"""Swin Transformer in PyTorch: the source's `WindowAttention` and `SwinTransformerBlock`, and
the whole model of the Swin paper around them (patch embedding and norm, stages of blocks with
shifts 0 and window/2, patch merging between stages, final norm, average pool, head).

State dicts saved by the source's two classes load here with `strict=True`. Tokens are (B, H*W, C).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from twin_models.model_math import check_resolution, effective_window, relative_position_index, shifted_window_mask

from .layers import DropPath, Mlp, PatchEmbedding, attend


def window_partition(x, window_size):
    """(B, H, W, C) -> (B * nW, window_size, window_size, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)


def window_reverse(windows, window_size, H, W):
    """(B * nW, window_size, window_size, C) -> (B, H, W, C): the inverse of `window_partition`."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias:
    (B*nW, N, C) -> (B*nW, N, C); `mask` (nW, N, N) is added to the logits (shifted windows)."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))
        self.register_buffer("relative_position_index", torch.from_numpy(relative_position_index(window_size)))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=.02)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, -1).permute(2, 0, 1)
        if mask is not None:
            nW = mask.shape[0]
            q, k, v = (t.view(B_ // nW, nW, *t.shape[1:]) for t in (q, k, v))
            bias = bias + mask.unsqueeze(1)
        x = attend(q, k, v, self.scale, bias=bias, dropout=self.attn_drop)
        x = x.reshape(B_, self.num_heads, N, -1).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention and MLP, both pre-norm residual: (B, H*W, C) -> (B, H*W, C)."""

    def __init__(self, dim, input_resolution, num_heads, window_size=7, shift_size=0,
                 mlp_ratio=4., qkv_bias=True, drop=0., attn_drop=0., drop_path=0.):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.window_size, self.shift_size = effective_window(input_resolution, window_size, shift_size)
        check_resolution(input_resolution, self.window_size, type(self).__name__)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size=(self.window_size, self.window_size),
                                    num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout=drop)
        attn_mask = (torch.from_numpy(shifted_window_mask(*input_resolution, self.window_size, self.shift_size))
                     if self.shift_size > 0 else None)
        self.register_buffer("attn_mask", attn_mask)

    def forward(self, x):
        H, W = self.input_resolution
        B, L, C = x.shape
        if L != H * W:
            raise ValueError(f"{type(self).__name__} expects {H * W} = {H}x{W} tokens; got {L}")
        ws, s = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        windows = self.attn(window_partition(x, ws).view(-1, ws * ws, C), mask=self.attn_mask)
        x = window_reverse(windows.view(-1, ws, ws, C), ws, H, W)
        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = shortcut + self.drop_path(x.reshape(B, H * W, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Each 2x2 neighbourhood concatenated, normed and projected: (B, H*W, C) -> (B, H/2*W/2, 2C)."""

    def __init__(self, input_resolution, dim):
        super().__init__()
        H, W = input_resolution
        if H % 2 or W % 2:
            raise ValueError(f"{type(self).__name__}: input resolution {H}x{W} is not even")
        self.input_resolution = input_resolution
        self.dim = dim
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        H, W = self.input_resolution
        B, _, C = x.shape
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class BasicLayer(nn.Module):
    """One stage: `depth` blocks alternating shift 0 and window/2, then PatchMerging if `downsample`."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size=7, mlp_ratio=4.,
                 qkv_bias=True, drop=0., attn_drop=0., drop_path=(), downsample=False):
        super().__init__()
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, input_resolution, num_heads, window_size,
                                 0 if i % 2 == 0 else window_size // 2, mlp_ratio, qkv_bias, drop,
                                 attn_drop, drop_path[i])
            for i in range(depth)])
        self.downsample = PatchMerging(input_resolution, dim) if downsample else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class SwinTransformer(nn.Module):
    """(B, C, H, W) -> (B, num_classes), or the pooled (B, embed_dim * 2**(stages-1)) feature when
    `num_classes=0`. Drop path grows linearly over the blocks from 0 to `drop_path_rate`."""

    def __init__(self, image_size=224, patch_size=4, in_channels=3, num_classes=1000, embed_dim=96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.,
                 qkv_bias=True, dropout=0.0, attn_dropout=0.0, drop_path_rate=0.1):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.patch_embed = PatchEmbedding(image_size, patch_size, in_channels, embed_dim, rearrange=False)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.pos_drop = nn.Dropout(dropout)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        res = image_size // patch_size
        self.layers = nn.ModuleList([
            BasicLayer(embed_dim * 2 ** i, (res // 2 ** i, res // 2 ** i), depth, num_heads[i],
                       window_size, mlp_ratio, qkv_bias, dropout, attn_dropout,
                       dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample=i < len(depths) - 1)
            for i, depth in enumerate(depths)])
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(self, x):
        x = self.pos_drop(self.patch_norm(self.patch_embed(x)))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(1))
