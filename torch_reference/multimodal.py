"""The first source's multimodal transformer, in PyTorch: text tokens and image patches, each with
a modality embedding, in one post-norm transformer; and a classifier on top for VQA.

State dicts saved by the source's `MultimodalTransformer` load here with `strict=True` and,
without a text mask, give the same outputs. Fixed: the text mask becomes a key padding mask
(the source builds a (B, L, L) mask that nn.MultiheadAttention refuses), the patch embedding
takes `image_size` / `patch_size` / `in_channels` (the source fixes 224, 16, 3), and
`cross_attn` / `norm3`, built and never called by the source, run with `cross_attention=True`.
The source gives image patches no position: `image_positions=True` adds a learned table
`image_pos_embed`, N(0, 1) at init like the text's `pos_embed`, or with `image_pos_init="sincos2d"`
the 2D sine-cosine table of standard deviation 1 (without a table, where-questions cannot be
answered: every output is invariant to a permutation of the patches).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from twin_models.model_math import position_table

from .layers import Mlp, PatchEmbedding, check_token_ids

PAD_ID = 0


def modality_mask(num_text: int, num_image: int, device=None) -> torch.Tensor:
    """(L, L) bool, True where query and key are of the same modality (blocked in `cross_attn`).
    Compared as integers: `torch.compile` (inductor, torch 2.13) fails on `==` of two bool tensors."""
    is_text = (torch.arange(num_text + num_image, device=device) < num_text).to(torch.int32)
    return is_text[:, None] == is_text[None, :]


class MultimodalTransformerLayer(nn.Module):
    """Post-norm layer over the joint sequence: x = norm1(x + self_attn(x)), then, with
    `cross_attention`, x = norm3(x + cross_attn(x)) where each token attends only to the other
    modality's tokens, then x = norm2(x + mlp(x)). `mask` (B, L) is True / 1 at real tokens.
    `norm_first` (an addition, torch's `nn.TransformerEncoderLayer` option; the source's is False)
    puts each norm before its sublayer instead, x = x + self_attn(norm1(x)) and so on, the same
    weights."""

    def __init__(self, dim, num_heads, dropout=0.1, cross_attention=False, norm_first=False):
        super().__init__()
        self.cross_attention = cross_attention
        self.norm_first = norm_first
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 4, dropout=dropout)

    def forward(self, x, mask=None, num_text_tokens=None):
        padding = None if mask is None else ~mask.bool()

        def sublayer(x, norm, f):
            if self.norm_first:
                return x + f(norm(x))
            return norm(x + f(x))

        x = sublayer(x, self.norm1, lambda h: self.self_attn(h, h, h, key_padding_mask=padding, need_weights=False)[0])
        if self.cross_attention:
            if num_text_tokens is None:
                raise ValueError("cross_attention=True needs num_text_tokens (the text tokens come first)")
            other = modality_mask(num_text_tokens, x.shape[1] - num_text_tokens, x.device)
            x = sublayer(x, self.norm3, lambda h: self.cross_attn(h, h, h, key_padding_mask=padding, attn_mask=other,
                                                                  need_weights=False)[0])
        return sublayer(x, self.norm2, self.mlp)


class MultimodalTransformer(nn.Module):
    """(B, Lt) text ids, (B, C, H, W) image[, (B, Lt) text_mask, True / 1 at real tokens] ->
    (B, Lt + patches, dim): text embedding + position + text type, patches + image type,
    concatenated (text first), `num_layers` layers, LayerNorm. `image_size` .. `image_positions`
    are additions; their defaults are the source's."""

    def __init__(self, dim, num_heads, num_layers, vocab_size, max_seq_len=512, image_size=224, patch_size=16,
                 in_channels=3, dropout=0.1, cross_attention=False, image_positions=False, image_pos_init="normal",
                 norm_first=False):
        super().__init__()
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.text_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(max_seq_len, dim)
        self.image_patch_embed = PatchEmbedding(image_size, patch_size, in_channels, dim)
        self.text_type_embed = nn.Parameter(torch.zeros(1, 1, dim))
        self.image_type_embed = nn.Parameter(torch.zeros(1, 1, dim))
        if image_positions:
            table = position_table(image_pos_init, image_size // patch_size, dim, 1.0, class_token=False)
            self.image_pos_embed = nn.Parameter(torch.randn(1, self.image_patch_embed.num_patches, dim)
                                                if table is None else torch.from_numpy(table).clone())
        self.layers = nn.ModuleList([MultimodalTransformerLayer(dim, num_heads, dropout, cross_attention, norm_first)
                                     for _ in range(num_layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, text_ids, image, text_mask=None):
        if text_ids.ndim != 2 or text_ids.is_floating_point() or text_ids.shape[1] > self.max_seq_len:
            raise ValueError(f"MultimodalTransformer expects (B, L <= {self.max_seq_len}) integer token ids; "
                             f"got {text_ids.dtype} of shape {tuple(text_ids.shape)}")
        check_token_ids(text_ids, self.text_embed.num_embeddings, "MultimodalTransformer")
        L = text_ids.shape[1]
        positions = torch.arange(L, device=text_ids.device)
        text = self.text_embed(text_ids) + self.pos_embed(positions) + self.text_type_embed
        image = self.image_patch_embed(image) + self.image_type_embed
        if hasattr(self, "image_pos_embed"):
            image = image + self.image_pos_embed
        x = torch.cat([text, image], dim=1)
        mask = None
        if text_mask is not None:
            mask = torch.cat([text_mask.bool(), text_mask.new_ones(image.shape[:2], dtype=torch.bool)], dim=1)
        for layer in self.layers:
            x = layer(x, mask, L)
        return self.norm(x)


class MultimodalTransformerClassifier(nn.Module):
    """(B, C, H, W) images, (B, L) questions padded with 0 -> (B, num_classes): the transformer
    over question + image, mean-pooled over the real tokens, then `head`."""

    def __init__(self, transformer, num_classes):
        super().__init__()
        self.transformer = transformer
        self.head = nn.Linear(transformer.dim, num_classes)

    def forward(self, image, question):
        text_mask = question != PAD_ID
        x = self.transformer(question, image, text_mask)
        keep = torch.cat([text_mask, text_mask.new_ones(x.shape[0], x.shape[1] - question.shape[1])], dim=1)
        keep = keep.to(x.dtype).unsqueeze(-1)
        return self.head((x * keep).sum(1) / keep.sum(1))


def MMTVQA(image_size=224, patch_size=16, in_channels=3, vocab_size=49408, context_length=77, dim=768,
           num_heads=12, num_layers=12, num_answers=3000, dropout=0.1, cross_attention=False,
           image_positions=True, image_pos_init="normal", norm_first=False):
    """A `MultimodalTransformerClassifier` from plain config values (the presets' entry point); its
    patches have positions by default (questions ask where objects are), `image_pos_init` their
    table's start ("normal" or "sincos2d")."""
    transformer = MultimodalTransformer(dim, num_heads, num_layers, vocab_size, context_length, image_size,
                                        patch_size, in_channels, dropout, cross_attention, image_positions,
                                        image_pos_init, norm_first)
    return MultimodalTransformerClassifier(transformer, num_answers)
