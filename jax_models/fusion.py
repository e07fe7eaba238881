"""Cross-modal attention, co-attention fusion and VQA of the second source, in Flax linen: twins
of `torch_reference/fusion.py`.

Images are NHWC, questions (B, L) int token ids padded with 0. `key_padding_mask` /
`text_key_padding_mask` take torch's polarity: True where a key is padding (blocked). Dropout is
active only with `train=True` and a 'dropout' rng. The last field, `attention_impl`, is Flax
only: which `layers.attend` kernel runs ("xla", "fused", "cudnn").
"""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from .clip import TextTransformer
from .layers import Dropout, Mlp, MultiheadAttention, attend, torch_bias_init, torch_linear_init
from .vit import VisionTransformer

PAD_ID = 0


class CrossModalAttention(nn.Module):
    """Queries of one modality attend to keys and values of the other:
    (B, Nq, dim), (B, Nk, dim) -> (B, Nq, dim); `key_padding_mask` (B, Nk)."""
    dim: int
    num_heads: int = 8
    dropout: float = 0.0
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, query_features, key_value_features, key_padding_mask=None, train: bool = False):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        H, hd = self.num_heads, self.dim // self.num_heads
        dense = lambda name: nn.Dense(self.dim, kernel_init=torch_linear_init,
                                      bias_init=torch_bias_init(self.dim), name=name)
        heads = lambda x: x.reshape(*x.shape[:-1], H, hd).swapaxes(-3, -2)
        q = heads(dense("q_proj")(query_features))
        k = heads(dense("k_proj")(key_value_features))
        v = heads(dense("v_proj")(key_value_features))
        allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        drop = Dropout(self.dropout, deterministic=not train)
        x = attend(q, k, v, hd ** -0.5, mask=allowed, dropout=drop, impl=self.attention_impl)
        x = x.swapaxes(-3, -2).reshape(*x.shape[:-3], x.shape[-2], self.dim)
        return dense("o_proj")(x)


class FusionLayer(nn.Module):
    """One co-attention layer, all residual and without norms as in the source: self-attention in
    each stream, text attends to image, image to the updated text, a feed-forward net per stream.
    Padded text keys are blocked in `text_self` and `image_to_text`."""
    dim: int
    num_heads: int = 8
    mlp_ratio: float = 4
    dropout: float = 0.0
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, text_features, image_features, text_key_padding_mask=None, train: bool = False):
        drop = lambda x: Dropout(self.dropout, deterministic=not train)(x)
        self_attn = lambda name: MultiheadAttention(self.dim, self.num_heads, self.dropout,
                                                    attention_impl=self.attention_impl, name=name)
        cross = lambda name: CrossModalAttention(self.dim, self.num_heads, self.dropout, self.attention_impl,
                                                 name=name)
        ffn = lambda name: Mlp(self.dim, int(self.dim * self.mlp_ratio), dropout_layers=False, name=name)
        t, i, pad = text_features, image_features, text_key_padding_mask
        t = t + drop(self_attn("text_self")(t, t, t, key_padding_mask=pad, train=train))
        i = i + drop(self_attn("image_self")(i, i, i, train=train))
        t = t + drop(cross("text_to_image")(t, i, train=train))
        i = i + drop(cross("image_to_text")(i, t, pad, train=train))
        t = t + drop(ffn("text_ffn")(t))
        i = i + drop(ffn("image_ffn")(i))
        return t, i


class MultimodalFusion(nn.Module):
    """`num_layers` co-attention layers: (B, Lt, dim) text, (B, Li, dim) image -> both updated."""
    dim: int = 768
    num_layers: int = 6
    num_heads: int = 8
    mlp_ratio: float = 4
    dropout: float = 0.0
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, text_features, image_features, text_key_padding_mask=None, train: bool = False):
        for n in range(self.num_layers):
            text_features, image_features = FusionLayer(
                self.dim, self.num_heads, self.mlp_ratio, self.dropout, self.attention_impl, name=f"layers_{n}")(
                text_features, image_features, text_key_padding_mask, train)
        return text_features, image_features


def masked_mean(x, keep):
    """Mean of (B, L, D) over the positions where `keep` (B, L) is True."""
    keep = keep.astype(x.dtype)[..., None]
    return (x * keep).sum(1) / keep.sum(1)


class VQAModel(nn.Module):
    """(B, H, W, C) images, (B, L) questions -> (B, num_answers) logits: the encoders' tokens
    (projected to `dim` where their width differs), fused, mean-pooled (text over its real tokens),
    concatenated and classified by a Dense on 2 * dim features (the source's takes dim: a bug)."""
    image_encoder: nn.Module
    text_encoder: nn.Module
    num_answers: int = 3000
    dim: int = 768
    num_layers: int = 6
    num_heads: int = 8
    mlp_ratio: float = 4
    dropout: float = 0.0
    attention_impl: str = "xla"

    def _to_dim(self, x, name):
        if x.shape[-1] == self.dim:
            return x
        return nn.Dense(self.dim, kernel_init=torch_linear_init, bias_init=torch_bias_init(x.shape[-1]),
                        name=name)(x)

    @nn.compact
    def __call__(self, image, question, train: bool = False):
        image_features = self._to_dim(self.image_encoder(image, return_tokens=True, train=train),
                                      "image_projection")
        question_features = self._to_dim(self.text_encoder(question, return_tokens=True, train=train),
                                         "text_projection")
        padding = question == PAD_ID
        text, image = MultimodalFusion(self.dim, self.num_layers, self.num_heads, self.mlp_ratio, self.dropout,
                                       self.attention_impl, name="fusion")(
            question_features, image_features, padding, train)
        pooled = jnp.concatenate([masked_mean(text, ~padding), image.mean(1)], axis=-1)
        return nn.Dense(self.num_answers, kernel_init=torch_linear_init, bias_init=torch_bias_init(2 * self.dim),
                        name="classifier")(pooled)


def VQA(image_size=224, patch_size=16, in_channels=3, vision_width=768, vision_layers=12, vision_heads=12,
        vocab_size=49408, context_length=77, text_width=512, text_layers=12, text_heads=8, dim=768,
        fusion_layers=6, fusion_heads=8, num_answers=3000, mlp_ratio=4, dropout=0.0, vision_pos_embed_std=0.02,
        vision_pos_embed_init="normal", attention_impl="xla"):
    """A `VQAModel` of a ViT image tower and a causal `TextTransformer`, from plain config values
    (the presets' entry point). `vision_pos_embed_std` and `vision_pos_embed_init` are the ViT's `pos_embed_std`
    and `pos_embed_init` (init only)."""
    image = VisionTransformer(image_size, patch_size, in_channels, 0, vision_width, vision_layers, vision_heads,
                              mlp_ratio, dropout, attention_impl, pos_embed_std=vision_pos_embed_std,
                              pos_embed_init=vision_pos_embed_init, parent=None)
    text = TextTransformer(vocab_size, context_length, text_width, text_layers, text_heads, mlp_ratio, dropout,
                           attention_impl, parent=None)
    return VQAModel(image, text, num_answers, dim, fusion_layers, fusion_heads, mlp_ratio, dropout, attention_impl)
