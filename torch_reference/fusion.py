"""Cross-modal attention, co-attention fusion and VQA of the second source, in PyTorch.

State dicts saved by the source's `CrossModalAttention` and `MultimodalFusion` load here with
`strict=True` and give the same outputs; the source's `VQAModel` too, except its classifier, which
takes 768 features where the pooled vector has 1536 (here `Linear(2 * dim, num_answers)`).
Questions are (B, L) int token ids padded with 0; `key_padding_mask` is True where a key is padding.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .clip import TextTransformer, feature_width
from .layers import Mlp, attend
from .vit import VisionTransformer

PAD_ID = 0


class CrossModalAttention(nn.Module):
    """Queries of one modality attend to keys and values of the other:
    (B, Nq, dim), (B, Nk, dim) -> (B, Nq, dim); `key_padding_mask` (B, Nk)."""

    def __init__(self, dim, num_heads=8, dropout=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query_features, key_value_features, key_padding_mask=None):
        heads = lambda x: x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        q = heads(self.q_proj(query_features))
        k = heads(self.k_proj(key_value_features))
        v = heads(self.v_proj(key_value_features))
        allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        x = attend(q, k, v, self.head_dim ** -0.5, mask=allowed, dropout=self.dropout)
        return self.o_proj(x.transpose(1, 2).flatten(2))


class FusionLayer(nn.Module):
    """One co-attention layer, all residual and without norms as in the source: self-attention in
    each stream, text attends to image, image to the updated text, a feed-forward net per stream.
    Padded text keys are blocked in `text_self` and `image_to_text`. Its state-dict keys are those
    of the source's `nn.ModuleDict`."""

    def __init__(self, dim, num_heads=8, mlp_ratio=4, dropout=0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.text_to_image = CrossModalAttention(dim, num_heads, dropout)
        self.image_to_text = CrossModalAttention(dim, num_heads, dropout)
        self.text_self = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.image_self = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.text_ffn = Mlp(dim, hidden, dropout_layers=False)
        self.image_ffn = Mlp(dim, hidden, dropout_layers=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, text_features, image_features, text_key_padding_mask=None):
        t, i, pad, drop = text_features, image_features, text_key_padding_mask, self.dropout
        t = t + drop(self.text_self(t, t, t, key_padding_mask=pad, need_weights=False)[0])
        i = i + drop(self.image_self(i, i, i, need_weights=False)[0])
        t = t + drop(self.text_to_image(t, i))
        i = i + drop(self.image_to_text(i, t, pad))
        t = t + drop(self.text_ffn(t))
        i = i + drop(self.image_ffn(i))
        return t, i


class MultimodalFusion(nn.Module):
    """`num_layers` co-attention layers: (B, Lt, dim) text, (B, Li, dim) image -> both updated.
    `num_heads`, `mlp_ratio` and `dropout` are additions (the source fixes 8, 4 and none)."""

    def __init__(self, dim=768, num_layers=6, num_heads=8, mlp_ratio=4, dropout=0.0):
        super().__init__()
        self.layers = nn.ModuleList([FusionLayer(dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers)])

    def forward(self, text_features, image_features, text_key_padding_mask=None):
        for layer in self.layers:
            text_features, image_features = layer(text_features, image_features, text_key_padding_mask)
        return text_features, image_features


def masked_mean(x, keep):
    """Mean of (B, L, D) over the positions where `keep` (B, L) is True."""
    keep = keep.to(x.dtype).unsqueeze(-1)
    return (x * keep).sum(1) / keep.sum(1)


class VQAModel(nn.Module):
    """(B, C, H, W) images, (B, L) questions -> (B, num_answers) logits: the encoders' tokens
    (`return_tokens=True`; projected to `dim` by `image_projection` / `text_projection` only where
    their width differs), fused, mean-pooled (text over its real tokens), concatenated and
    classified by `Linear(2 * dim, num_answers)`. `dim` .. `dropout` are additions (the source
    fixes 768, 6 fusion layers, 8 heads, no dropout)."""

    def __init__(self, image_encoder, text_encoder, num_answers=3000, dim=768, num_layers=6, num_heads=8,
                 mlp_ratio=4, dropout=0.0):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        for name, encoder in (("image_projection", image_encoder), ("text_projection", text_encoder)):
            if feature_width(encoder) != dim:
                setattr(self, name, nn.Linear(feature_width(encoder), dim))
        self.fusion = MultimodalFusion(dim, num_layers, num_heads, mlp_ratio, dropout)
        self.classifier = nn.Linear(2 * dim, num_answers)

    def forward(self, image, question):
        image_features = self.image_encoder(image, return_tokens=True)
        question_features = self.text_encoder(question, return_tokens=True)
        if hasattr(self, "image_projection"):
            image_features = self.image_projection(image_features)
        if hasattr(self, "text_projection"):
            question_features = self.text_projection(question_features)
        padding = question == PAD_ID
        text, image = self.fusion(question_features, image_features, padding)
        return self.classifier(torch.cat([masked_mean(text, ~padding), image.mean(1)], dim=-1))


def VQA(image_size=224, patch_size=16, in_channels=3, vision_width=768, vision_layers=12, vision_heads=12,
        vocab_size=49408, context_length=77, text_width=512, text_layers=12, text_heads=8, dim=768,
        fusion_layers=6, fusion_heads=8, num_answers=3000, mlp_ratio=4, dropout=0.0, vision_pos_embed_std=0.02,
        vision_pos_embed_init="normal"):
    """A `VQAModel` of a ViT image tower and a causal `TextTransformer`, from plain config values
    (the presets' entry point). `vision_pos_embed_std` and `vision_pos_embed_init` are the ViT's `pos_embed_std`
    and `pos_embed_init` (init only)."""
    image = VisionTransformer(image_size, patch_size, in_channels, 0, vision_width, vision_layers, vision_heads,
                              mlp_ratio, dropout, pos_embed_std=vision_pos_embed_std,
                              pos_embed_init=vision_pos_embed_init)
    text = TextTransformer(vocab_size, context_length, text_width, text_layers, text_heads, mlp_ratio, dropout)
    return VQAModel(image, text, num_answers, dim, fusion_layers, fusion_heads, mlp_ratio, dropout)
