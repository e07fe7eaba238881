"""Vision Transformers of both sources, in PyTorch.

`VisionTransformer`: the first source's pre-norm ViT with its own attention.
`EncoderViT`: the second source's ViT built on `nn.TransformerEncoder` (post-norm, ReLU).
State dicts saved by the source code load here with `strict=True`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from twin_models.model_math import position_table

from .layers import Mlp, PatchEmbedding, add_class_token, attend


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused `qkv` projection (a bias with `qkv_bias=True`): (B, N, C) -> (B, N, C).
    `mask` (N, N) or (B, 1, N, N) bool is True where attention is allowed (causal text tower)."""

    def __init__(self, embed_dim, num_heads, dropout=0.1, qkv_bias=False):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.qkv = nn.Linear(embed_dim, embed_dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        x = attend(q, k, v, self.head_dim ** -0.5, mask=mask, dropout=self.dropout)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class TransformerBlock(nn.Module):
    """Pre-norm encoder block: x + attn(norm1(x)), then x + mlp(norm2(x)). `norm_eps`: the
    LayerNorms' eps; `act`: the MLP's activation (`layers.activation`)."""

    def __init__(self, embed_dim, num_heads, mlp_ratio=4, dropout=0.1, qkv_bias=False, norm_eps=1e-5,
                 act="gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.attn = MultiHeadAttention(embed_dim, num_heads, dropout, qkv_bias)
        self.norm2 = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.mlp = Mlp(embed_dim, int(embed_dim * mlp_ratio), dropout=dropout, act=act)

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask)
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nn.Module):
    """The first source's ViT: (B, C, H, W) -> (B, num_classes), or the pooled (B, embed_dim)
    class-token feature when `num_classes=0`.

    Options of other libraries' ViTs (the defaults keep the first source's): `qkv_bias`, `norm_eps`
    (every LayerNorm), `act` (the MLPs' activation), `patch_bias` (the patch conv's bias),
    `pre_norm` (a LayerNorm `norm_pre` after the position embedding, as CLIP's `ln_pre`) and
    `head_act` (an activation after the head: "tanh" for Hugging Face ViT's pooler); and
    `pos_embed_std`, the standard deviation of the position table at init (the source's 0.02), and
    `pos_embed_init`, its kind: "normal" (truncated, the source's) or "sincos2d" (`sincos_2d`'s
    fixed 2D sine-cosine table as the learned table's start); both init only, no weights change."""

    def __init__(self, image_size=224, patch_size=16, in_channels=3, num_classes=1000,
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, dropout=0.1, qkv_bias=False,
                 norm_eps=1e-5, act="gelu", patch_bias=True, pre_norm=False, head_act=None,
                 pos_embed_std=0.02, pos_embed_init="normal"):
        super().__init__()
        self.pos_embed_std = pos_embed_std
        self.pos_table = position_table(pos_embed_init, image_size // patch_size, embed_dim, pos_embed_std)
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.patch_embed = PatchEmbedding(image_size, patch_size, in_channels, embed_dim, bias=patch_bias)
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        self.blocks = nn.ModuleList([
            TransformerBlock(embed_dim, num_heads, mlp_ratio, dropout, qkv_bias, norm_eps, act)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_act = nn.Tanh() if head_act == "tanh" and num_classes > 0 else nn.Identity()
        if head_act not in (None, "tanh"):
            raise ValueError(f"head_act must be None or 'tanh'; got {head_act!r}")
        self.init_weights()

    @property
    def output_dim(self):
        """The second source's name for the feature width (its CLIPFromScratch reads it)."""
        return self.embed_dim if self.num_classes == 0 else self.num_classes

    def init_weights(self):
        if self.pos_table is None:
            nn.init.trunc_normal_(self.pos_embed, std=self.pos_embed_std)
        else:
            with torch.no_grad():
                self.pos_embed.copy_(torch.from_numpy(self.pos_table))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(self, x, return_tokens=False):
        """`return_tokens=True`: every token after the final norm, (B, 1 + patches, embed_dim)."""
        x = self.norm_pre(add_class_token(self.patch_embed(x), self.cls_token, self.pos_embed))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x if return_tokens else self.head_act(self.head(x[:, 0]))


class EncoderViT(nn.Module):
    """The second source's ViT: conv patches, class token, post-norm `nn.TransformerEncoder`
    (ReLU, feed-forward 4x), head on the class token. `num_classes=0` returns the (B, embed_dim)
    feature. `in_channels` and `dropout` are additions (the source fixes 3 and 0.1)."""

    def __init__(self, img_size=224, patch_size=16, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, in_channels=3, dropout=0.1):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.patch_embed = PatchEmbedding(img_size, patch_size, in_channels, embed_dim, rearrange=False)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        encoder_layer = nn.TransformerEncoderLayer(
            d_model=embed_dim, nhead=num_heads, dim_feedforward=embed_dim * 4, dropout=dropout,
            batch_first=True)
        self.transformer = nn.TransformerEncoder(encoder_layer, num_layers=depth,
                                                 enable_nested_tensor=False)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x, return_tokens=False):
        """`return_tokens=True`: every token after the encoder, (B, 1 + patches, embed_dim)."""
        x = add_class_token(self.patch_embed(x), self.cls_token, self.pos_embed)
        x = self.transformer(x)
        return x if return_tokens else self.head(x[:, 0])
