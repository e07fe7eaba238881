"""CLIP in Flax linen: twins of `torch_reference/clip.py`, and the contrastive loss over a device
axis (features gathered with `lax.all_gather`, so every image meets every caption of the global
batch as a negative).

Images are NHWC, tokens (B, L) int ids. `CLIPModel.__call__(images, tokens, train=False)` ->
(logits_per_image (B, B'), logits_per_text (B', B)).
"""

from __future__ import annotations

import functools

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn

from .layers import LN_EPS, LayerNorm, check_token_ids, compute_dtype, torch_linear_init
from .vit import TransformerBlock, VisionTransformer

NORMALIZE_EPS = 1e-12  # torch F.normalize's clamp on the norm


def normalize(x, eps: float = NORMALIZE_EPS):
    """x / max(||x||, eps) over the last axis, as `torch.nn.functional.normalize`; in float32 for
    bfloat16 x, so that the features, logits and loss of a bfloat16 model are float32."""
    x = x.astype(compute_dtype(x.dtype))
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def clip_loss(logits_per_image, logits_per_text):
    """Symmetric cross-entropy with the matching pairs on the diagonal of (B, B) logits."""
    labels = jnp.arange(logits_per_image.shape[0])
    ce = optax.softmax_cross_entropy_with_integer_labels
    return (ce(logits_per_image, labels).mean() + ce(logits_per_text, labels).mean()) / 2


def contrastive_loss(image_features, text_features, logit_scale, axis_name: str | None = None):
    """The CLIP loss from this device's normalized (n, E) features and the exp'd `logit_scale`.

    With `axis_name` (inside pmap / shard_map) the other devices' features are gathered, this
    device scores its n images against all N captions and its n captions against all N images,
    and the rows' targets sit at offset `axis_index * n`. The mean over devices of this loss is
    the loss of the global batch, and `lax.pmean` of its gradients is the global gradient (the
    transpose of `all_gather` returns each device its share of the other devices' cotangents).
    """
    if axis_name is None:
        logits = logit_scale * image_features @ text_features.T
        return clip_loss(logits, logits.T)
    n = image_features.shape[0]
    all_images = jax.lax.all_gather(image_features, axis_name, tiled=True)
    all_texts = jax.lax.all_gather(text_features, axis_name, tiled=True)
    labels = jax.lax.axis_index(axis_name) * n + jnp.arange(n)
    per_image = logit_scale * image_features @ all_texts.T            # (n, N)
    per_text = (logit_scale * all_images @ text_features.T).T         # (n, N)
    ce = optax.softmax_cross_entropy_with_integer_labels
    return (ce(per_image, labels).mean() + ce(per_text, labels).mean()) / 2


class TextTransformer(nn.Module):
    """CLIP's text tower: (B, L <= context_length) token ids -> (B, width), the final-LayerNorm
    feature at the end-of-text token (the largest id in each row, as in CLIP); with
    `return_tokens=True` every position's feature (B, L, width). Attention is causal, so padding
    after the end-of-text token never reaches the tokens before it. `qkv_bias`, `norm_eps` (every
    LayerNorm) and `act` (the MLPs' activation) as in `VisionTransformer`."""
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4
    dropout: float = 0.0
    attention_impl: str = "xla"
    qkv_bias: bool = False
    norm_eps: float = LN_EPS
    act: str = "gelu"

    @property
    def embed_dim(self) -> int:
        return self.width

    @property
    def output_dim(self) -> int:
        return self.width

    @nn.compact
    def __call__(self, text, return_tokens: bool = False, train: bool = False):
        if text.ndim != 2 or not jnp.issubdtype(text.dtype, jnp.integer) or text.shape[1] > self.context_length:
            raise ValueError(f"TextTransformer expects (B, L <= {self.context_length}) integer token ids; "
                             f"got {text.dtype} of shape {tuple(text.shape)}")
        check_token_ids(text, self.vocab_size, "TextTransformer")
        L = text.shape[1]
        x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                     name="token_embedding")(text)
        pos = self.param("positional_embedding", nn.initializers.normal(0.01), (self.context_length, self.width))
        x = x + pos[:L]
        mask = jnp.tril(jnp.ones((L, L), bool))
        for i in range(self.layers):
            x = TransformerBlock(self.width, self.heads, self.mlp_ratio, self.dropout, self.attention_impl,
                                 self.qkv_bias, self.norm_eps, self.act, name=f"blocks_{i}")(x, mask, train=train)
        x = LayerNorm(epsilon=self.norm_eps, name="ln_final")(x)
        if return_tokens:
            return x
        return x[jnp.arange(x.shape[0]), jnp.argmax(text, axis=-1)]


class CLIPModel(nn.Module):
    """The first source's CLIP; `image_encoder` and `text_encoder` are unbound Flax modules.
    `projection_bias=False`: projections without bias (CLIP's own, in open_clip and Hugging Face)."""
    image_encoder: nn.Module
    text_encoder: nn.Module
    embed_dim: int = 512
    temperature: float = 0.07
    projection_bias: bool = True

    def setup(self):
        self.image_projection = nn.Dense(self.embed_dim, use_bias=self.projection_bias, kernel_init=torch_linear_init)
        self.text_projection = nn.Dense(self.embed_dim, use_bias=self.projection_bias, kernel_init=torch_linear_init)
        init = np.float32(np.log(1 / self.temperature))
        self.logit_scale = self.param("logit_scale", lambda _: jnp.asarray(init))

    def encode_image(self, image, train: bool = False):
        return normalize(self.image_projection(self.image_encoder(image, train=train)))

    def encode_text(self, text, train: bool = False):
        return normalize(self.text_projection(self.text_encoder(text, train=train)))

    def features(self, image, text, train: bool = False):
        """(image features (B, E), text features (B', E), exp(logit_scale)): the inputs of
        `contrastive_loss`."""
        return self.encode_image(image, train), self.encode_text(text, train), jnp.exp(self.logit_scale)

    def __call__(self, image, text, train: bool = False):
        image_features, text_features, scale = self.features(image, text, train)
        logits_per_image = scale * image_features @ text_features.T
        return logits_per_image, logits_per_image.T


def CLIP(image_size=224, patch_size=16, in_channels=3, vision_width=768, vision_layers=12,
         vision_heads=12, vocab_size=49408, context_length=77, text_width=512, text_layers=12,
         text_heads=8, embed_dim=512, mlp_ratio=4, dropout=0.0, temperature=0.07, attention_impl="xla"):
    """A `CLIPModel` of a ViT image tower (`num_classes=0`) and a `TextTransformer`, from plain
    config values (the presets' entry point); `attention_impl` is Flax only (see `layers.attend`)."""
    image = VisionTransformer(image_size, patch_size, in_channels, 0, vision_width, vision_layers,
                              vision_heads, mlp_ratio, dropout, attention_impl, parent=None)
    text = TextTransformer(vocab_size, context_length, text_width, text_layers, text_heads, mlp_ratio,
                           dropout, attention_impl, parent=None)
    return CLIPModel(image, text, embed_dim, temperature)


def class_embeddings(model: CLIPModel, variables, class_names: Sequence[str], templates: Sequence[str],
                     tokenizer):
    """(K, embed_dim): each class's prompts encoded, normalized, averaged, normalized again."""
    prompts = [t.format(name) for name in class_names for t in templates]
    text = encode(model, "encode_text", variables, jnp.asarray(tokenizer(prompts), jnp.int32))
    return normalize(text.reshape(len(class_names), len(templates), -1).mean(1))


def zero_shot_classify(model: CLIPModel, variables, images, class_names: Sequence[str],
                       templates: Sequence[str] = ("a photo of a {}",), *, tokenizer, batch_size: int = 256):
    """(B, K) class probabilities for (B, H, W, C) images from text prompts alone (prompt
    ensembling over `templates`), in batches of `batch_size`."""
    classes = class_embeddings(model, variables, class_names, templates, tokenizer)
    scale = jnp.exp(variables["params"]["logit_scale"])
    return jnp.concatenate([jax.nn.softmax(scale * encode(model, "encode_image", variables, images[i:i + batch_size])
                                           @ classes.T, -1) for i in range(0, len(images), batch_size)])


@functools.partial(jax.jit, static_argnums=(0, 1))
def encode(model: CLIPModel, method: str, variables, x):
    """`model.encode_image` / `encode_text`, compiled once per model, method and input shape."""
    return model.apply(variables, x, method=method)
