"""Named model presets: one table, importing neither framework.

A preset names a family (the module in both `jax_models` and `torch_reference`), a class, the
constructor arguments shared by both twins, the inputs its forward takes (`inputs`, kinds from
`INPUT_KINDS`), the task that trains it and its whole training recipe.
`jax_models.create_model(name)` and `torch_reference.create_model(name)` build the twins;
`example_inputs(preset)` makes a batch of its inputs (numpy, images NHWC).
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import json
import math
from typing import Any, Callable, Iterable

import numpy as np

from .model_math import POS_EMBED_INITS


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    family: str                      # module name in jax_models/ and torch_reference/
    model: str                       # class name, the same in both
    kwargs: dict[str, Any]           # constructor arguments, the same in both
    image_size: int
    in_channels: int
    task: str = "classification"
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""
    inputs: tuple[str, ...] = ("image",)   # the forward's arguments, kinds of INPUT_KINDS
    bench_batch: int = 8                   # `python -m benchmarks`' default batch (CPU-sized)

    @property
    def input_shape_nhwc(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.in_channels)

    @property
    def input_shape_nchw(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


# The attention kernels of the Flax models (`jax_models.layers.attend`); torch has one.
ATTENTION_IMPLS = ("xla", "fused", "cudnn")

# What every recipe holds (the trainer reads nothing else from elsewhere); a task adds its own keys.
RECIPE_KEYS = ("lr", "weight_decay", "warmup_steps", "batch_size", "label_smoothing", "grad_clip",
               "data")

# The recipe of the source's train_vision_transformer (AdamW, lr 3e-4, weight decay 0.3, cosine).
# Full-size presets train on the digits unless told otherwise (--data), for 10 epochs.
SOURCE_RECIPE = dict(lr=3e-4, weight_decay=0.3, warmup_steps=10_000, batch_size=4096,
                     label_smoothing=0.0, grad_clip=1.0, epochs=10, data="digits")
DIGITS_RECIPE = dict(lr=1e-3, weight_decay=0.05, warmup_steps=100, batch_size=128, epochs=40,
                     label_smoothing=0.1, grad_clip=1.0, data="digits")


def _vit(name, image_size, patch_size, in_channels, num_classes, embed_dim, depth, num_heads,
         mlp_ratio=4, dropout=0.1, train=None, bench_batch=8, description=""):
    kwargs = dict(image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                  num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                  num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout)
    return Preset(name, "vit", "VisionTransformer", kwargs, image_size, in_channels,
                  train=dict(train or SOURCE_RECIPE), description=description, bench_batch=bench_batch)


def _encoder_vit(name, img_size, patch_size, in_channels, num_classes, embed_dim, depth,
                 num_heads, dropout=0.1, train=None, bench_batch=8, description=""):
    kwargs = dict(img_size=img_size, patch_size=patch_size, in_channels=in_channels,
                  num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                  num_heads=num_heads, dropout=dropout)
    return Preset(name, "vit", "EncoderViT", kwargs, img_size, in_channels,
                  train=dict(train or SOURCE_RECIPE), description=description, bench_batch=bench_batch)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    _vit("vit-digits", 32, 8, 1, 10, 64, 4, 4, mlp_ratio=2, train=DIGITS_RECIPE,
         bench_batch=128, description="pre-norm ViT for 32x32 digits (16 patches of 8x8, 4 blocks of width 64)"),
    _vit("vit-tiny-digits", 32, 8, 1, 10, 32, 2, 2, mlp_ratio=2, train=DIGITS_RECIPE,
         bench_batch=128, description="the smallest ViT: 2 blocks of width 32 (the example preset of CONTRIBUTING.md)"),
    _encoder_vit("encoder-vit-digits", 32, 8, 1, 10, 64, 4, 4, train=DIGITS_RECIPE,
                 bench_batch=128, description="post-norm nn.TransformerEncoder ViT for 32x32 digits"),
    _vit("vit-ti16", 224, 16, 3, 1000, 192, 12, 3, description="ViT-Ti/16"),
    _vit("vit-s16", 224, 16, 3, 1000, 384, 12, 6, description="ViT-S/16"),
    _vit("vit-b16", 224, 16, 3, 1000, 768, 12, 12,
         bench_batch=4, description="ViT-B/16, the source's default VisionTransformer"),
    _encoder_vit("encoder-vit-b16", 224, 16, 3, 1000, 768, 12, 12,
                 bench_batch=4, description="the second source's ViT at its defaults"),
]}


def _swin(name, image_size, patch_size, in_channels, num_classes, embed_dim, depths, num_heads,
          window_size=7, drop_path_rate=0.1, train=None, bench_batch=8, description=""):
    kwargs = dict(image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                  num_classes=num_classes, embed_dim=embed_dim, depths=tuple(depths),
                  num_heads=tuple(num_heads), window_size=window_size, drop_path_rate=drop_path_rate)
    return Preset(name, "swin", "SwinTransformer", kwargs, image_size, in_channels,
                  train=dict(train or SWIN_RECIPE), description=description, bench_batch=bench_batch)


# The Swin paper's ImageNet-1K recipe: AdamW, lr 1e-3 at batch 1024, weight decay 0.05, 20 warm-up
# epochs of 300, label smoothing 0.1, gradient clipping at 5.
SWIN_RECIPE = dict(lr=1e-3, weight_decay=0.05, warmup_steps=25_000, batch_size=1024,
                   label_smoothing=0.1, grad_clip=5.0, epochs=10, data="digits")

PRESETS.update({p.name: p for p in [
    _swin("swin-digits", 32, 4, 1, 10, 64, (2, 2), (2, 4), window_size=4,
          drop_path_rate=0.1, train=DIGITS_RECIPE,
          bench_batch=128, description="Swin for 32x32 digits: 8x8 tokens, windows of 4x4 (shifted by 2), stages 8/4"),
    _swin("swin-t", 224, 4, 3, 1000, 96, (2, 2, 6, 2), (3, 6, 12, 24), drop_path_rate=0.2,
          description="Swin-T (window 7, 224)"),
    _swin("swin-s", 224, 4, 3, 1000, 96, (2, 2, 18, 2), (3, 6, 12, 24), drop_path_rate=0.3,
          bench_batch=4, description="Swin-S (window 7, 224)"),
    _swin("swin-b", 224, 4, 3, 1000, 128, (2, 2, 18, 2), (4, 8, 16, 32), drop_path_rate=0.5,
          bench_batch=4, description="Swin-B (window 7, 224)"),
]})


def _clip(name, image_size, patch_size, in_channels, vision_width, vision_layers, vision_heads,
          vocab_size, context_length, text_width, text_layers, text_heads, embed_dim, mlp_ratio=4,
          dropout=0.0, train=None, bench_batch=8, description=""):
    kwargs = dict(image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                  vision_width=vision_width, vision_layers=vision_layers, vision_heads=vision_heads,
                  vocab_size=vocab_size, context_length=context_length, text_width=text_width,
                  text_layers=text_layers, text_heads=text_heads, embed_dim=embed_dim,
                  mlp_ratio=mlp_ratio, dropout=dropout)
    return Preset(name, "clip", "CLIP", kwargs, image_size, in_channels, task="contrastive",
                  train=dict(train or CLIP_RECIPE), description=description, bench_batch=bench_batch,
                  inputs=("image", "tokens"))


# CLIP's recipe (Radford et al. 2021): AdamW lr 5e-4, weight decay 0.2, batch 32768, 2000 warm-up
# steps, no clipping. The digits recipe trains captions drawn from templates in a few minutes.
CLIP_RECIPE = dict(lr=5e-4, weight_decay=0.2, warmup_steps=2000, batch_size=32768,
                   label_smoothing=0.0, grad_clip=0.0, epochs=10, data="digits")
CLIP_DIGITS_RECIPE = dict(lr=2e-3, weight_decay=0.05, warmup_steps=50, batch_size=128, epochs=40,
                          label_smoothing=0.0, grad_clip=1.0, data="digits")

PRESETS.update({p.name: p for p in [
    _clip("clip-digits", 32, 8, 1, 64, 3, 4, 64, 16, 64, 2, 4, 64, train=CLIP_DIGITS_RECIPE,
          bench_batch=128, description="CLIP for 32x32 digits and captions: ViT 8x8 patches 64 wide x 3, text 64 "
                      "wide x 2, context 16, embedding 64"),
    _clip("clip-b16", 224, 16, 3, 768, 12, 12, 49408, 77, 512, 12, 8, 512,
          bench_batch=4, description="CLIP ViT-B/16's layout: 224/16 image tower 768 wide, text 512 wide x 12 "
                      "(8 heads, context 77), embedding 512"),
]})


def _ddpm(name, image_size, in_channels, features, time_emb_dim, num_res_blocks=2, dropout=0.1,
          train=None, bench_batch=8, description=""):
    kwargs = dict(in_channels=in_channels, out_channels=in_channels, features=tuple(features),
                  time_emb_dim=time_emb_dim, num_res_blocks=num_res_blocks, dropout=dropout)
    return Preset(name, "ddpm", "UNet", kwargs, image_size, in_channels, task="diffusion",
                  train=dict(train or DDPM_RECIPE), description=description, bench_batch=bench_batch,
                  inputs=("image", "timestep"))


# The preset's model is the denoiser (UNet), what `python -m bridge verify` compares; `DDPM(model,
# timesteps, beta_start, beta_end)` is built around it from the recipe. The source's recipe: Adam
# at 2e-4, the linear schedule 1e-4 .. 0.02 over 1000 steps.
DDPM_RECIPE = dict(timesteps=1000, beta_start=1e-4, beta_end=0.02, lr=2e-4, weight_decay=0.0,
                   warmup_steps=0, batch_size=128, grad_clip=0.0, ema_decay=0.9999,
                   label_smoothing=0.0, epochs=10, data="digits")
# Digits: sized to train in minutes on 2 CPU cores; samples by the 1000-step ancestral sampler
# (ddim_steps=0; `--recipe ddim_steps=100` for DDIM) on the EMA weights, each step's x_0 clipped to
# the data range (without, DDIM let ~1 sample in 16 run off it into speckle). 5000 steps, EMA 0.999
# and no dropout: 94.5% of 256 samples recognized (real test digits 96.9%), Frechet 1.34x the
# real-vs-real floor, in 9.5 min on 2 cores (AMD EPYC); 2000 steps / EMA 0.995 / dropout 0.1 gave
# 85.5%, 1.60x.
DDPM_DIGITS_RECIPE = dict(DDPM_RECIPE, lr=1e-3, warmup_steps=100, batch_size=64, steps=5000,
                          grad_clip=1.0, ema_decay=0.999, data="digits", num_samples=256,
                          ddim_steps=0, clip_denoised=True, checkpoint_every=250)

PRESETS.update({p.name: p for p in [
    _ddpm("ddpm-digits", 16, 1, (16, 32), 32, dropout=0.0, train=DDPM_DIGITS_RECIPE,
          bench_batch=64, description="DDPM U-Net for 16x16 digits: stages 16/32, attention in the bottleneck"),
    _ddpm("ddpm-cifar10", 32, 3, (64, 128, 256, 512), 256,
          bench_batch=16, description="the source's default U-Net (features 64-128-256-512) on 32x32x3"),
]})


def _captioner(name, image_size, patch_size, in_channels, vision_width, vision_layers, vision_heads,
               vocab_size, max_positions, width, layers, heads, mlp_ratio=4, dropout=0.0, train=None,
               description=""):
    kwargs = dict(image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                  vision_width=vision_width, vision_layers=vision_layers, vision_heads=vision_heads,
                  vocab_size=vocab_size, max_positions=max_positions, width=width, layers=layers,
                  heads=heads, mlp_ratio=mlp_ratio, dropout=dropout)
    return Preset(name, "captioning", "Captioner", kwargs, image_size, in_channels, task="captioning",
                  train=dict(train or {}), description=description, inputs=("image", "caption"))


# Scenes (train/scenes.py): up to 6 squares and circles in 6 colours on a plain 48x48 ground,
# captioned left to right ("a red circle , a blue square and a gray circle"): at most 23 words, 25
# tokens with bos and eos. Ids are `scenes_tokenizer()`'s (35 words of questions and captions: pad 0,
# bos 35 and eos 36, the last two), so `vocab_size` is 37. Sized to train on 2 CPU cores in minutes;
# `max_length` (generated tokens, eos included) and `num_beams` are what evaluation decodes with.
# Objects 15 px wide: at the default 9 px (a fifth) a circle differs from a square by 3 pixels a
# corner, and in 1,400 steps the captioner never told them apart (the loss stayed at shape-chance,
# 0.19 a token; 16% exact, nearly every miss a shape). At 15 px: 79.6% exact at step 1000 of a
# 3000-step schedule; 1500 steps end the cosine there.
CAPTION_SCENES_RECIPE = dict(lr=1e-3, weight_decay=0.05, warmup_steps=200, batch_size=64, steps=1500,
                             grad_clip=1.0, label_smoothing=0.0, data="scenes", num_train=10_000,
                             num_test=500, num_objects=3, object_size=15, max_length=24,
                             num_beams=1)

PRESETS.update({p.name: p for p in [
    _captioner("caption-scenes", 48, 8, 3, 64, 3, 4, 37, 32, 64, 2, 4, train=CAPTION_SCENES_RECIPE,
               description="captioner for 48x48 scenes: ViT 8x8 patches 64 wide x 3 (37 tokens), "
                           "GPT-2-style decoder 64 wide x 2 with cross-attention, 32 positions"),
]})


# VQA on the generated scenes (`train/scenes.py`: Sort-of-CLEVR, 6 objects, 36 questions per
# scene). The scenes tokenizer has 37 ids and a context of 16; the answers are 12 words.
SCENES_VOCAB_SIZE, SCENES_CONTEXT_LENGTH, SCENES_NUM_ANSWERS = 37, 16, 12


def _vqa(name, image_size, patch_size, in_channels, vision_width, vision_layers, vision_heads, vocab_size,
         context_length, text_width, text_layers, text_heads, dim, fusion_layers, fusion_heads, num_answers,
         mlp_ratio=4, dropout=0.0, vision_pos_embed_std=0.02, vision_pos_embed_init="normal", train=None,
         bench_batch=64, description=""):
    kwargs = dict(image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                  vision_width=vision_width, vision_layers=vision_layers, vision_heads=vision_heads,
                  vocab_size=vocab_size, context_length=context_length, text_width=text_width,
                  text_layers=text_layers, text_heads=text_heads, dim=dim, fusion_layers=fusion_layers,
                  fusion_heads=fusion_heads, num_answers=num_answers, mlp_ratio=mlp_ratio, dropout=dropout,
                  vision_pos_embed_std=vision_pos_embed_std, vision_pos_embed_init=vision_pos_embed_init)
    return Preset(name, "fusion", "VQA", kwargs, image_size, in_channels, task="vqa",
                  train=dict(train or {}), description=description, inputs=("image", "question"),
                  bench_batch=bench_batch)


def _mmt_vqa(name, image_size, patch_size, in_channels, vocab_size, context_length, dim, num_heads, num_layers,
             num_answers, dropout=0.1, cross_attention=False, image_positions=True, image_pos_init="normal",
             norm_first=False, train=None, bench_batch=64, description=""):
    kwargs = dict(image_size=image_size, patch_size=patch_size, in_channels=in_channels, vocab_size=vocab_size,
                  context_length=context_length, dim=dim, num_heads=num_heads, num_layers=num_layers,
                  num_answers=num_answers, dropout=dropout, cross_attention=cross_attention,
                  image_positions=image_positions, image_pos_init=image_pos_init, norm_first=norm_first)
    return Preset(name, "multimodal", "MMTVQA", kwargs, image_size, in_channels, task="vqa",
                  train=dict(train or {}), description=description, inputs=("image", "question"),
                  bench_batch=bench_batch)


# Sized for 2 CPU cores: patches of 8x8 on scenes whose objects each fill one 8x8 cell (cell=8), so
# every object is one image token; the ViT's position table starts as the 2D sine-cosine table at
# std 1.0 (the scale of a patch's embedding), so the tokens' positions are visible from the first
# step; a curriculum: the first `nonrelational_steps` batches hold non-relational questions only;
# and many small batches: closest and furthest are learned in a late transition whose step (not
# example) count varies with the seed, and on this CPU a batch of 24 costs 44 ms a step against 68
# for 32 (docs/vqa.md).
SCENES_DATA = dict(data="scenes", num_scenes=3000, num_test_scenes=500, num_objects=6, train_num_objects=None,
                   questions_per_scene=None, cell=8, nonrelational_steps=800, family_weights=None)
VQA_SCENES_RECIPE = dict(lr=6e-4, weight_decay=0.05, warmup_steps=100, batch_size=24, steps=16000,
                         grad_clip=1.0, label_smoothing=0.0, **SCENES_DATA)
# The multimodal transformer with its norms before the sublayers (`norm_first`: with the source's
# post-norm layers closest and furthest stay at the majority prior) and a cross-modal sublayer in
# every layer makes the same late transition as `vqa-scenes`, after more updates: batches of 12 (a
# step of 12 costs half one of 24 on this CPU) bring it sooner in examples than batches of 24: 40,000
# steps of 12 at lr 4.5e-4 (docs/vqa.md).
MMT_VQA_SCENES_RECIPE = dict(lr=4.5e-4, weight_decay=0.05, warmup_steps=100, batch_size=12, steps=40000,
                             grad_clip=1.0, label_smoothing=0.0, cpu_dot_fusion=True, **SCENES_DATA)

PRESETS.update({p.name: p for p in [
    _vqa("vqa-scenes", 32, 8, 3, 64, 2, 4, SCENES_VOCAB_SIZE, SCENES_CONTEXT_LENGTH, 64, 1, 4, 64, 4, 4,
         SCENES_NUM_ANSWERS, mlp_ratio=2, vision_pos_embed_std=1.0, vision_pos_embed_init="sincos2d",
         train=VQA_SCENES_RECIPE,
         description="VQA on 32x32 scenes: ViT 8x8 patches 64 wide x 2, text 64 wide x 1, 4 fusion layers"),
    _mmt_vqa("mmt-vqa-scenes", 32, 8, 3, SCENES_VOCAB_SIZE, SCENES_CONTEXT_LENGTH, 64, 4, 4,
             SCENES_NUM_ANSWERS, dropout=0.0, cross_attention=True, image_pos_init="sincos2d", norm_first=True,
             train=MMT_VQA_SCENES_RECIPE,
             description="the first source's multimodal transformer as a single-stream VQA classifier "
                         "on 32x32 scenes: 8x8 patches, 64 wide x 4, norms first, cross-modal sublayers"),
]})


def _check_recipes():
    for p in PRESETS.values():
        missing = [k for k in RECIPE_KEYS if k not in p.train]
        if missing or not ("steps" in p.train or "epochs" in p.train):
            raise ValueError(f"preset {p.name!r}: its recipe lacks {missing or ['steps or epochs']}")
        unknown = [k for k in p.inputs if k not in INPUT_KINDS]
        if unknown:
            raise ValueError(f"preset {p.name!r}: unknown input kind(s) {unknown}; known: "
                             f"{', '.join(INPUT_KINDS)}")


def get_preset(name: str) -> Preset:
    """The preset called `name`; a KeyError lists the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def with_overrides(preset: Preset, **kwargs: Any) -> Preset:
    """A copy of `preset` whose constructor arguments are updated by `kwargs`, checked by
    `check_kwargs` (a ValueError naming the argument, the value and what is allowed)."""
    merged = {**preset.kwargs, **kwargs}
    check_kwargs(merged, kwargs)
    fields = {field: kwargs[arg] for arg, field in (("image_size", "image_size"), ("img_size", "image_size"),
                                                    ("in_channels", "in_channels")) if arg in kwargs}
    return dataclasses.replace(preset, kwargs=merged, **fields)


# Constructor arguments by kind: what a value must be, the same rule for both twins.
SIZE_ARGS = ("image_size", "img_size", "patch_size", "in_channels", "out_channels", "embed_dim", "depth", "num_heads", "vision_width", "vision_layers", "vision_heads",
             "vocab_size", "context_length", "text_width", "text_layers", "text_heads", "time_emb_dim",
             "num_res_blocks", "max_positions", "width", "layers", "heads", "dim", "fusion_layers",
             "fusion_heads", "num_answers", "num_layers", "window_size", "depths", "features")
COUNT_ARGS = ("num_classes",)   # 0: no head, the pooled features (timm's convention)
RATE_ARGS = ("dropout", "drop_path_rate", "attn_dropout", "attention_dropout")
POSITIVE_ARGS = ("mlp_ratio",)
NONNEGATIVE_ARGS = ("vision_pos_embed_std", "pos_embed_std")
FLAG_ARGS = ("cross_attention", "image_positions", "qkv_bias")
CHOICE_ARGS = {"pos_embed_init": POS_EMBED_INITS, "vision_pos_embed_init": POS_EMBED_INITS,
               "image_pos_init": POS_EMBED_INITS}
# (width, heads): the width splits evenly over the heads; (image, patch): patches tile the image
DIVIDES = (("embed_dim", "num_heads"), ("vision_width", "vision_heads"), ("text_width", "text_heads"),
           ("width", "heads"), ("dim", "num_heads"), ("dim", "fusion_heads"),
           ("image_size", "patch_size"), ("img_size", "patch_size"))


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_kwargs(kwargs: dict[str, Any], names: Iterable[str] | None = None) -> None:
    """Refuses constructor arguments no model can take: a size that is not a positive integer (or a
    non-empty tuple of them), a class count below 0, a rate outside [0, 1), a ratio that is not a positive finite number, a
    width its heads or an image its patches do not divide. Checks `names` (default: all)."""
    names = set(kwargs if names is None else names)

    def bad(name, value, want):
        raise ValueError(f"{name}={value!r}: {name} must be {want}")

    for name in names & set(kwargs):
        v = kwargs[name]
        if name in SIZE_ARGS:
            if isinstance(v, (tuple, list)):
                if not v or not all(_is_int(x) and x >= 1 for x in v):
                    bad(name, v, "a positive integer or a non-empty tuple of positive integers")
            elif not (_is_int(v) and v >= 1):
                bad(name, v, "a positive integer")
        elif name in COUNT_ARGS and not (_is_int(v) and v >= 0):
            bad(name, v, "0 (no head: the pooled features) or a positive integer")
        elif name in RATE_ARGS and not (_is_real(v) and 0 <= v < 1):
            bad(name, v, "a number in [0, 1)")
        elif name in POSITIVE_ARGS and not (_is_real(v) and math.isfinite(v) and v > 0):
            bad(name, v, "a positive finite number")
        elif name in NONNEGATIVE_ARGS and not (_is_real(v) and math.isfinite(v) and v >= 0):
            bad(name, v, "a finite number >= 0")
        elif name in FLAG_ARGS and not isinstance(v, (bool, np.bool_)):
            bad(name, v, "true or false")
        elif name in CHOICE_ARGS and v not in CHOICE_ARGS[name]:
            bad(name, v, "one of " + ", ".join(repr(c) for c in CHOICE_ARGS[name]))
    for a, b in DIVIDES:
        if a in kwargs and b in kwargs and (a in names or b in names) and _is_int(kwargs[a]) \
                and _is_int(kwargs[b]) and kwargs[a] % kwargs[b]:
            raise ValueError(f"{a}={kwargs[a]} is not divisible by {b}={kwargs[b]}: {a} must be a "
                             f"multiple of {b}")
    if {"depths", "num_heads"} & names and isinstance(kwargs.get("depths"), (tuple, list)):
        heads = kwargs.get("num_heads")
        if not isinstance(heads, (tuple, list)) or len(heads) != len(kwargs["depths"]):
            raise ValueError(f"num_heads={heads!r}: one head count per stage of depths="
                             f"{tuple(kwargs['depths'])} ({len(kwargs['depths'])} numbers)")
        width = kwargs.get("embed_dim")
        for i, h in enumerate(heads):
            if _is_int(width) and _is_int(h) and (width * 2 ** i) % h:
                raise ValueError(f"num_heads={tuple(heads)!r}: stage {i} is {width * 2 ** i} wide "
                                 f"(embed_dim={width} x 2^{i}), not divisible by {h} heads")
        size, patch = kwargs.get("image_size"), kwargs.get("patch_size")
        if _is_int(size) and _is_int(patch) and not size % patch:
            grid = size // patch
            if grid % 2 ** (len(heads) - 1):
                raise ValueError(f"image_size={size}, patch_size={patch}: the {grid}x{grid} patch grid "
                                 f"cannot be halved {len(heads) - 1} times for {len(heads)} stages")


def without_dropout(preset: Preset) -> Preset:
    """`preset` with every dropout-like constructor argument (dropout, drop_path_rate, ...) at 0:
    deterministic in training mode, as the parity checks need."""
    off = {k: 0.0 for k in preset.kwargs if "drop" in k}
    return with_overrides(preset, **off) if off else preset


def matching(names, patterns: dict[str, str]) -> dict[str, str]:
    """{name: reason} for each name that matches a glob of `patterns` ({glob: reason})."""
    return {n: reason for n in names for glob, reason in patterns.items() if fnmatch.fnmatch(n, glob)}


# ---------------------------------------------------------------------------------------------
# Example inputs: what each kind of forward argument looks like (numpy; images NHWC float32).


def random_tokens(rs: np.random.RandomState, batch_size: int, vocab_size: int, length: int) -> np.ndarray:
    """(B, length) int64 ids below `vocab_size - 1`, with the end-of-text id `vocab_size - 1` (the
    largest, where CLIP's text tower pools) at a random position of each row."""
    tokens = rs.randint(0, vocab_size - 1, size=(batch_size, length)).astype(np.int64)
    tokens[np.arange(batch_size), rs.randint(1, length, size=batch_size)] = vocab_size - 1
    return tokens


def random_captions(rs: np.random.RandomState, batch_size: int, vocab_size: int, length: int) -> np.ndarray:
    """(B, length) int64 teacher-forcing rows in the tokenizer's layout (pad 0, bos and eos the two
    largest ids): bos, 1 to length - 2 word ids, eos, then pad."""
    bos, eos = vocab_size - 2, vocab_size - 1
    out = np.zeros((batch_size, length), np.int64)
    for row in out:
        k = rs.randint(1, length - 1)
        row[:k + 2] = [bos, *rs.randint(1, bos, size=k), eos]
    return out


def random_questions(rs: np.random.RandomState, batch_size: int, vocab_size: int, length: int) -> np.ndarray:
    """(B, length) int64 questions as the tokenizer writes them: start-of-text (id `vocab_size - 2`),
    words (ids 1 .. `vocab_size - 3`), end-of-text (`vocab_size - 1`), then padding 0; each row
    holds 2 .. `length` real tokens."""
    tokens = np.zeros((batch_size, length), np.int64)
    for row, n in zip(tokens, rs.randint(2, length + 1, size=batch_size)):
        row[:n] = [vocab_size - 2, *rs.randint(1, vocab_size - 2, size=n - 2), vocab_size - 1]
    return tokens


INPUT_KINDS: dict[str, Callable[[Preset, np.random.RandomState, int], np.ndarray]] = {
    "image": lambda p, rs, b: np.ascontiguousarray(
        rs.standard_normal((b, *p.input_shape_nchw)).astype(np.float32).transpose(0, 2, 3, 1)),
    "timestep": lambda p, rs, b: rs.randint(0, p.train["timesteps"], size=b),
    "tokens": lambda p, rs, b: random_tokens(rs, b, p.kwargs["vocab_size"], p.kwargs["context_length"]),
    "caption": lambda p, rs, b: random_captions(rs, b, p.kwargs["vocab_size"], p.kwargs["max_positions"]),
    "question": lambda p, rs, b: random_questions(rs, b, p.kwargs["vocab_size"], p.kwargs["context_length"]),
}


def example_inputs(preset: Preset, batch_size: int = 2, seed: int = 0) -> tuple[np.ndarray, ...]:
    """One batch of the preset's forward arguments, drawn in order from one seeded stream:
    images N(0, 1) NHWC float32 (drawn NCHW, as torch takes them), integer timesteps, token ids."""
    rs = np.random.RandomState(seed)
    return tuple(INPUT_KINDS[kind](preset, rs, batch_size) for kind in preset.inputs)


_check_recipes()


def parse_value(text: str):
    """A command-line value: JSON where it parses (12, 1e-6, true, [2, 2], "x"), else a Python
    literal (True, None, (2, 2)), else the text itself (a bare word)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_assignments(items: Iterable[str], flag: str = "--set") -> dict[str, Any]:
    """`KEY=VALUE` items (`python -m train --set/--recipe`, `python -m bridge import --set`) as a
    dict, each value read by `parse_value`; a ValueError names an item without a key or `=`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} wants KEY=VALUE, got {item!r}")
        out[key] = parse_value(value)
    return out
