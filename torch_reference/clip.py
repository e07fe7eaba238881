"""CLIP in PyTorch: the first source's `CLIPModel`, the second's `CLIPFromScratch`, a causal text
transformer for the text tower the sources leave abstract, and batched zero-shot classification.

State dicts saved by the sources' classes load here with `strict=True`. The image tower is any
encoder with `embed_dim` (or `output_dim`), e.g. `VisionTransformer(num_classes=0)`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .layers import check_token_ids
from .vit import TransformerBlock, VisionTransformer


def feature_width(encoder: nn.Module) -> int:
    """`embed_dim` (the first source's name) or `output_dim` (the second's)."""
    width = getattr(encoder, "embed_dim", None)
    return width if width is not None else encoder.output_dim


def clip_loss(logits_per_image, logits_per_text):
    """Symmetric cross-entropy with the matching pairs on the diagonal of (B, B) logits."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class _GatherWithGrad(torch.autograd.Function):
    """(n, E) on each rank -> (world * n, E) in rank order; the backward sums every rank's
    cotangent (all-reduce, which every backend has) and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        n = grad.shape[0] // dist.get_world_size(ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[rank * n:(rank + 1) * n], None


def contrastive_loss(image_features, text_features, logit_scale, group=None, distributed=None):
    """The CLIP loss from this process's normalized (n, E) features and the exp'd `logit_scale`.

    Under `torch.distributed` (initialized, or `distributed=True`) the other ranks' features are
    gathered with the autograd-aware `all_gather`, this rank scores its n images against all N
    captions and its n captions against all N images, targets at offset `rank * n`. The mean over
    ranks of this loss is the global batch's loss, and gradients averaged over ranks (DDP's
    all-reduce) are the global gradient. Twin of `jax_models.clip.contrastive_loss`.
    """
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        logits = logit_scale * image_features @ text_features.t()
        return clip_loss(logits, logits.t())
    n = image_features.shape[0]
    all_images = _GatherWithGrad.apply(image_features, group)
    all_texts = _GatherWithGrad.apply(text_features, group)
    labels = dist.get_rank(group) * n + torch.arange(n, device=image_features.device)
    per_image = logit_scale * image_features @ all_texts.t()
    per_text = (logit_scale * all_images @ text_features.t()).t()
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


class TextTransformer(nn.Module):
    """CLIP's text tower: (B, L <= context_length) token ids -> (B, width), the final-LayerNorm
    feature at the end-of-text token (the largest id in each row, as in CLIP); with
    `return_tokens=True` every position's feature (B, L, width). Pre-norm blocks with a causal
    mask (padding after the end-of-text token never reaches the tokens before it), token and
    learned position embeddings. `qkv_bias`, `norm_eps` (every LayerNorm) and `act` (the MLPs'
    activation) as in `VisionTransformer`."""

    def __init__(self, vocab_size=49408, context_length=77, width=512, layers=12, heads=8,
                 mlp_ratio=4, dropout=0.0, qkv_bias=False, norm_eps=1e-5, act="gelu"):
        super().__init__()
        self.context_length = context_length
        self.embed_dim = self.output_dim = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList([TransformerBlock(width, heads, mlp_ratio, dropout, qkv_bias, norm_eps, act)
                                     for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width, eps=norm_eps)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, text, return_tokens=False):
        if text.ndim != 2 or text.is_floating_point() or text.shape[1] > self.context_length:
            raise ValueError(f"TextTransformer expects (B, L <= {self.context_length}) integer token ids; "
                             f"got {text.dtype} of shape {tuple(text.shape)}")
        check_token_ids(text, self.token_embedding.num_embeddings, "TextTransformer")
        L = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:L]
        mask = torch.ones(L, L, dtype=torch.bool, device=text.device).tril()
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln_final(x)
        if return_tokens:
            return x
        return x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]


class CLIPModel(nn.Module):
    """The first source's CLIP: `forward(image, text)` -> (logits_per_image (B, B'),
    logits_per_text (B', B)), scaled cosine similarities; `contrastive_loss(image, text)`.
    `projection_bias=False`: projections without bias (CLIP's own, in open_clip and Hugging Face)."""

    def __init__(self, image_encoder, text_encoder, embed_dim=512, temperature=0.07, projection_bias=True):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.temperature = temperature
        self.image_projection = nn.Linear(feature_width(image_encoder), embed_dim, bias=projection_bias)
        self.text_projection = nn.Linear(feature_width(text_encoder), embed_dim, bias=projection_bias)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / temperature))

    def encode_image(self, image):
        return F.normalize(self.image_projection(self.image_encoder(image)), dim=-1)

    def encode_text(self, text):
        return F.normalize(self.text_projection(self.text_encoder(text)), dim=-1)

    def features(self, image, text):
        """(image features (B, E), text features (B', E), exp(logit_scale)): the inputs of
        `contrastive_loss`."""
        return self.encode_image(image), self.encode_text(text), self.logit_scale.exp()

    def logits(self, image, text):
        image_features, text_features, scale = self.features(image, text)
        logits_per_image = scale * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    def forward(self, image, text):
        return self.logits(image, text)

    def contrastive_loss(self, image, text):
        return clip_loss(*self.logits(image, text))


class CLIPFromScratch(CLIPModel):
    """The second source's name for the same model, whose `forward` returns the loss."""

    def __init__(self, image_encoder, text_encoder, embed_dim=512):
        super().__init__(image_encoder, text_encoder, embed_dim)

    def forward(self, images, text):
        return self.contrastive_loss(images, text)


def CLIP(image_size=224, patch_size=16, in_channels=3, vision_width=768, vision_layers=12,
         vision_heads=12, vocab_size=49408, context_length=77, text_width=512, text_layers=12,
         text_heads=8, embed_dim=512, mlp_ratio=4, dropout=0.0, temperature=0.07):
    """A `CLIPModel` of a ViT image tower (`num_classes=0`) and a `TextTransformer`, from plain
    config values (the presets' entry point)."""
    image = VisionTransformer(image_size, patch_size, in_channels, 0, vision_width, vision_layers,
                              vision_heads, mlp_ratio, dropout)
    text = TextTransformer(vocab_size, context_length, text_width, text_layers, text_heads, mlp_ratio, dropout)
    return CLIPModel(image, text, embed_dim, temperature)


@torch.no_grad()
def class_embeddings(model, class_names, templates, tokenizer):
    """(K, embed_dim): each class's prompts `template.format(name)` encoded, normalized, averaged
    and normalized again (CLIP's prompt ensembling)."""
    prompts = [t.format(name) for name in class_names for t in templates]
    device = model.logit_scale.device
    text = model.encode_text(torch.as_tensor(tokenizer(prompts), device=device))
    return F.normalize(text.reshape(len(class_names), len(templates), -1).mean(1), dim=-1)


@torch.no_grad()
def zero_shot_classify(model, images, class_names, templates=("a photo of a {}",), *, tokenizer,
                       batch_size=256):
    """(B, K) class probabilities for (B, C, H, W) images from text prompts alone: softmax of the
    scaled cosine similarity to each class's ensembled prompt embedding."""
    was_training = model.training
    model.eval()
    classes = class_embeddings(model, class_names, templates, tokenizer)
    probs = [F.softmax(model.logit_scale.exp() * model.encode_image(images[i:i + batch_size]) @ classes.t(), dim=-1)
             for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(probs)
