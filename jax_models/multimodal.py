"""The first source's multimodal transformer, in Flax linen: twins of `torch_reference/multimodal.py`.

Images are NHWC, text (B, L) int token ids; `text_mask` / `mask` are True (or 1) at real tokens,
as the source intends. Dropout is active only with `train=True` and a 'dropout' rng. The last
field, `attention_impl`, is Flax only: which `layers.attend` kernel runs.
"""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from twin_models.model_math import position_table

from .layers import (LN_EPS, LayerNorm, Mlp, MultiheadAttention, PatchEmbedding, check_token_ids, torch_bias_init,
                     torch_linear_init)

PAD_ID = 0


def modality_mask(num_text: int, num_image: int):
    """(L, L) bool, True where query and key are of the same modality (blocked in `cross_attn`)."""
    is_text = jnp.arange(num_text + num_image) < num_text
    return is_text[:, None] == is_text[None, :]


class MultimodalTransformerLayer(nn.Module):
    """Post-norm layer over the joint sequence: x = norm1(x + self_attn(x)), then, with
    `cross_attention`, x = norm3(x + cross_attn(x)) where each token attends only to the other
    modality's tokens, then x = norm2(x + mlp(x)). `mask` (B, L) is True at real tokens; without
    `cross_attention`, `cross_attn` and `norm3` get weights at init and never run (the source's).
    `norm_first` (an addition, torch's `nn.TransformerEncoderLayer` option; the source's is False)
    puts each norm before its sublayer instead, x = x + self_attn(norm1(x)) and so on, the same
    weights."""
    dim: int
    num_heads: int
    dropout: float = 0.1
    cross_attention: bool = False
    attention_impl: str = "xla"
    norm_first: bool = False

    @nn.compact
    def __call__(self, x, mask=None, num_text_tokens=None, train: bool = False):
        mha = lambda name: MultiheadAttention(self.dim, self.num_heads, self.dropout,
                                              attention_impl=self.attention_impl, name=name)
        norm = lambda name: LayerNorm(epsilon=LN_EPS, name=name)
        padding = None if mask is None else ~mask.astype(bool)

        def sublayer(x, norm_name, f):
            if self.norm_first:
                return x + f(norm(norm_name)(x))
            return norm(norm_name)(x + f(x))

        x = sublayer(x, "norm1", lambda h: mha("self_attn")(h, h, h, key_padding_mask=padding, train=train))
        if self.cross_attention:
            if num_text_tokens is None:
                raise ValueError("cross_attention=True needs num_text_tokens (the text tokens come first)")
            other = modality_mask(num_text_tokens, x.shape[1] - num_text_tokens)
            x = sublayer(x, "norm3", lambda h: mha("cross_attn")(h, h, h, key_padding_mask=padding, attn_mask=other,
                                                                 train=train))
        elif self.is_initializing():
            norm("norm3")(mha("cross_attn")(x, x, x))
        return sublayer(x, "norm2", lambda h: Mlp(self.dim, self.dim * 4, dropout=self.dropout, name="mlp")(h, train))


class MultimodalTransformer(nn.Module):
    """(B, Lt) text ids, (B, H, W, C) image[, (B, Lt) text_mask] -> (B, Lt + patches, dim): text
    embedding + position + text type, patches + image type, concatenated (text first),
    `num_layers` layers, LayerNorm. Without `cross_attention`, `cross_attn` and `norm3` are
    created at init (so the source's state dicts convert) and never run. `image_positions` adds a
    learned position table `image_pos_embed` for the patches (the source has none), N(0, 1) at init
    like the text's `pos_embed`, or with `image_pos_init="sincos2d"` the 2D sine-cosine table
    (`twin_models.model_math.sincos_2d`) of standard deviation 1."""
    dim: int
    num_heads: int
    num_layers: int
    vocab_size: int
    max_seq_len: int = 512
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    dropout: float = 0.1
    cross_attention: bool = False
    image_positions: bool = False
    attention_impl: str = "xla"
    image_pos_init: str = "normal"
    norm_first: bool = False

    @nn.compact
    def __call__(self, text_ids, image, text_mask=None, train: bool = False):
        L = text_ids.shape[-1]
        if text_ids.ndim != 2 or not jnp.issubdtype(text_ids.dtype, jnp.integer) or L > self.max_seq_len:
            raise ValueError(f"MultimodalTransformer expects (B, L <= {self.max_seq_len}) integer token ids; "
                             f"got {text_ids.dtype} of shape {tuple(text_ids.shape)}")
        check_token_ids(text_ids, self.vocab_size, "MultimodalTransformer")
        embed = lambda n, name: nn.Embed(n, self.dim, embedding_init=nn.initializers.normal(1.0), name=name)
        text = embed(self.vocab_size, "text_embed")(text_ids) + embed(self.max_seq_len, "pos_embed")(jnp.arange(L))
        text = text + self.param("text_type_embed", nn.initializers.zeros, (1, 1, self.dim))
        image = PatchEmbedding(self.image_size, self.patch_size, self.in_channels, self.dim,
                               name="image_patch_embed")(image)
        image = image + self.param("image_type_embed", nn.initializers.zeros, (1, 1, self.dim))
        if self.image_positions:
            table = position_table(self.image_pos_init, self.image_size // self.patch_size, self.dim, 1.0,
                                   class_token=False)
            init = (nn.initializers.normal(1.0) if table is None
                    else lambda key, shape, dtype=jnp.float32: jnp.asarray(table, dtype))
            pos = self.param("image_pos_embed", init, (1, image.shape[1], self.dim))
            image = image + pos
        x = jnp.concatenate([text, image], axis=1)
        mask = None
        if text_mask is not None:
            mask = jnp.concatenate([text_mask.astype(bool), jnp.ones(image.shape[:2], bool)], axis=1)
        for n in range(self.num_layers):
            x = MultimodalTransformerLayer(self.dim, self.num_heads, self.dropout, self.cross_attention,
                                           self.attention_impl, self.norm_first, name=f"layers_{n}")(x, mask, L, train)
        return LayerNorm(epsilon=LN_EPS, name="norm")(x)


class MultimodalTransformerClassifier(nn.Module):
    """(B, H, W, C) images, (B, L) questions padded with 0 -> (B, num_classes): the transformer
    over question + image, mean-pooled over the real tokens, then `head`."""
    transformer: nn.Module
    num_classes: int

    @nn.compact
    def __call__(self, image, question, train: bool = False):
        text_mask = question != PAD_ID
        x = self.transformer(question, image, text_mask, train=train)
        keep = jnp.concatenate([text_mask, jnp.ones((x.shape[0], x.shape[1] - question.shape[1]), bool)], axis=1)
        keep = keep.astype(x.dtype)[..., None]
        dim = x.shape[-1]
        return nn.Dense(self.num_classes, kernel_init=torch_linear_init, bias_init=torch_bias_init(dim),
                        name="head")((x * keep).sum(1) / keep.sum(1))


def MMTVQA(image_size=224, patch_size=16, in_channels=3, vocab_size=49408, context_length=77, dim=768,
           num_heads=12, num_layers=12, num_answers=3000, dropout=0.1, cross_attention=False, image_positions=True,
           image_pos_init="normal", attention_impl="xla", norm_first=False):
    """A `MultimodalTransformerClassifier` from plain config values (the presets' entry point); its
    patches have positions by default (questions ask where objects are), `image_pos_init` their
    table's start ("normal" or "sincos2d")."""
    transformer = MultimodalTransformer(dim, num_heads, num_layers, vocab_size, context_length, image_size,
                                        patch_size, in_channels, dropout, cross_attention, image_positions,
                                        attention_impl, image_pos_init, norm_first, parent=None)
    return MultimodalTransformerClassifier(transformer, num_answers)
