"""Vision Transformers of both sources, in Flax linen: twins of `torch_reference/vit.py`.

Images are NHWC. `__call__(x, return_tokens=False, train=False)`: dropout is active only with
`train=True` and a 'dropout' rng. `num_classes=0` returns the pooled class-token feature
(B, embed_dim); `return_tokens=True` every token after the encoder (B, 1 + patches, embed_dim). The
field `attention_impl` is Flax only: which `layers.attend` kernel runs ("xla", "fused", "cudnn"); the
fields after it are the torch twin's last arguments (kept after it so that positional calls hold).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from twin_models.model_math import position_table

from .layers import (LN_EPS, Dropout, LayerNorm, Mlp, PatchEmbedding, TransformerEncoder, TransformerEncoderLayer,
                     add_class_token, attend, torch_bias_init, torch_linear_init, trunc_normal_02)


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused `qkv` projection (a bias with `qkv_bias=True`): (B, N, C) -> (B, N, C).
    `mask` (N, N) or (B, 1, N, N) bool is True where attention is allowed (causal text tower)."""
    embed_dim: int
    num_heads: int
    dropout: float = 0.1
    attention_impl: str = "xla"
    qkv_bias: bool = False

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False):
        B, N, C = x.shape
        head_dim = self.embed_dim // self.num_heads
        if head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        qkv = nn.Dense(self.embed_dim * 3, use_bias=self.qkv_bias, kernel_init=trunc_normal_02, name="qkv")(x)
        qkv = qkv.reshape(B, N, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        drop = Dropout(self.dropout, deterministic=not train, name="dropout")
        x = attend(q, k, v, head_dim ** -0.5, mask=mask, dropout=drop, impl=self.attention_impl)
        x = x.transpose(0, 2, 1, 3).reshape(B, N, C)
        return nn.Dense(self.embed_dim, kernel_init=trunc_normal_02, name="proj")(x)


class TransformerBlock(nn.Module):
    """Pre-norm encoder block: x + attn(norm1(x)), then x + mlp(norm2(x)). `norm_eps`: the
    LayerNorms' eps; `act`: the MLP's activation (`layers.activation`)."""
    embed_dim: int
    num_heads: int
    mlp_ratio: float = 4
    dropout: float = 0.1
    attention_impl: str = "xla"
    qkv_bias: bool = False
    norm_eps: float = LN_EPS
    act: str = "gelu"

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False):
        x = x + MultiHeadAttention(self.embed_dim, self.num_heads, self.dropout, self.attention_impl,
                                   self.qkv_bias, name="attn")(
            LayerNorm(epsilon=self.norm_eps, name="norm1")(x), mask, train)
        x = x + Mlp(self.embed_dim, int(self.embed_dim * self.mlp_ratio), dropout=self.dropout,
                    kernel_init=trunc_normal_02, act=self.act, name="mlp")(
            LayerNorm(epsilon=self.norm_eps, name="norm2")(x), train)
        return x


class VisionTransformer(nn.Module):
    """The first source's ViT: (B, H, W, C) -> (B, num_classes), or (B, embed_dim) if num_classes=0.

    Options of other libraries' ViTs (the defaults keep the first source's): `qkv_bias`, `norm_eps`
    (every LayerNorm), `act` (the MLPs' activation), `patch_bias` (the patch conv's bias),
    `pre_norm` (a LayerNorm `norm_pre` after the position embedding, as CLIP's `ln_pre`) and
    `head_act` (an activation after the head: "tanh" for Hugging Face ViT's pooler); and
    `pos_embed_std`, the standard deviation of the position table at init (the source's 0.02), and
    `pos_embed_init`, its kind: "normal" (truncated, the source's) or "sincos2d" (`sincos_2d`'s
    fixed 2D sine-cosine table as the learned table's start); both init only, no weights change."""
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4
    dropout: float = 0.1
    attention_impl: str = "xla"
    qkv_bias: bool = False
    norm_eps: float = LN_EPS
    act: str = "gelu"
    patch_bias: bool = True
    pre_norm: bool = False
    head_act: str | None = None
    pos_embed_std: float = 0.02
    pos_embed_init: str = "normal"

    @property
    def output_dim(self) -> int:
        """The second source's name for the feature width (its CLIPFromScratch reads it)."""
        return self.embed_dim if self.num_classes == 0 else self.num_classes

    @nn.compact
    def __call__(self, x, return_tokens: bool = False, train: bool = False):
        if self.head_act not in (None, "tanh"):
            raise ValueError(f"head_act must be None or 'tanh'; got {self.head_act!r}")
        x = PatchEmbedding(self.image_size, self.patch_size, self.in_channels, self.embed_dim,
                           bias=self.patch_bias, name="patch_embed")(x)
        table = position_table(self.pos_embed_init, self.image_size // self.patch_size, self.embed_dim,
                               self.pos_embed_std)
        init = (nn.initializers.truncated_normal(self.pos_embed_std) if table is None
                else lambda key, shape, dtype=jnp.float32: jnp.asarray(table, dtype))
        pos_embed = self.param("pos_embed", init, (1, x.shape[1] + 1, self.embed_dim))
        cls_token = self.param("cls_token", trunc_normal_02, (1, 1, self.embed_dim))
        x = add_class_token(x, cls_token, pos_embed)
        if self.pre_norm:
            x = LayerNorm(epsilon=self.norm_eps, name="norm_pre")(x)
        for i in range(self.depth):
            x = TransformerBlock(self.embed_dim, self.num_heads, self.mlp_ratio, self.dropout,
                                 self.attention_impl, self.qkv_bias, self.norm_eps, self.act,
                                 name=f"blocks_{i}")(x, train=train)
        x = LayerNorm(epsilon=self.norm_eps, name="norm")(x)
        if return_tokens:
            return x
        if self.num_classes == 0:
            return x[:, 0]
        x = nn.Dense(self.num_classes, kernel_init=trunc_normal_02, name="head")(x[:, 0])
        return jnp.tanh(x) if self.head_act == "tanh" else x


class EncoderViT(nn.Module):
    """The second source's ViT on a post-norm `TransformerEncoder` (ReLU, feed-forward 4x)."""
    img_size: int = 224
    patch_size: int = 16
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    in_channels: int = 3
    dropout: float = 0.1
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, return_tokens: bool = False, train: bool = False):
        x = PatchEmbedding(self.img_size, self.patch_size, self.in_channels, self.embed_dim,
                           rearrange=False, name="patch_embed")(x)
        cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, self.embed_dim))
        pos_embed = self.param("pos_embed", nn.initializers.zeros, (1, x.shape[1] + 1, self.embed_dim))
        x = add_class_token(x, cls_token, pos_embed)
        layer = TransformerEncoderLayer(self.embed_dim, self.num_heads, self.embed_dim * 4,
                                        self.dropout, attention_impl=self.attention_impl, parent=None)
        x = TransformerEncoder(layer, self.depth, name="transformer")(x, train=train)
        if return_tokens:
            return x
        if self.num_classes == 0:
            return x[:, 0]
        return nn.Dense(self.num_classes, kernel_init=torch_linear_init, bias_init=torch_bias_init(self.embed_dim),
                        name="head")(x[:, 0])
