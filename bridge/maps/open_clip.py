"""open_clip checkpoints: `ViT-*` CLIP models (e.g. ViT-B-16: visual tower, text tower and
`logit_scale`) into `clip.CLIPModel` of a `vit.VisionTransformer` and a `clip.TextTransformer`.

Facts come from the model config (`open_clip_config.json` of a hub folder, whose `model_cfg` holds
it, or a bare model config as `open_clip.get_model_config` returns) or, for the named architectures
below, open_clip's own definitions (open_clip/model_configs/NAME.json); every size the weights show
is taken from the weights. open_clip's resblocks use `nn.MultiheadAttention` (fused `in_proj`),
its projections are raw (width, embed) matrices that ours apply as Linear weights (transposed).
"""

from __future__ import annotations

from . import KeyMap, R, Source, grid_side, image_input, prefixed, spec, tokens_input

ARCHS = {
    "ViT-B-16": {"embed_dim": 512,
                 "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "ViT-B-32": {"embed_dim": 512,
                 "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "ViT-L-14": {"embed_dim": 768,
                 "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}},
}
HEAD_WIDTH = 64   # open_clip's CLIPVisionCfg.head_width default: heads = width // head_width

# Options of open_clip's configs that change nothing at inference, and those our models express
# only at open_clip's default (any other value is refused by name).
IGNORABLE = {"embed_dim", "vision_cfg.image_size", "vision_cfg.layers", "vision_cfg.width",
             "vision_cfg.patch_size", "vision_cfg.head_width", "vision_cfg.mlp_ratio",
             "vision_cfg.patch_dropout", "vision_cfg.timm_model_name", "text_cfg.context_length",
             "text_cfg.vocab_size", "text_cfg.width", "text_cfg.heads", "text_cfg.layers",
             "text_cfg.mlp_ratio", "quick_gelu", "custom_text", "cast_dtype", "init_logit_scale",
             "init_logit_bias", "text_cfg.hf_tokenizer_name", "text_cfg.tokenizer_kwargs"}
DEFAULTS = {"vision_cfg.ls_init_value": None, "vision_cfg.attentional_pool": False,
            "vision_cfg.no_ln_pre": False, "vision_cfg.pool_type": "tok", "vision_cfg.final_ln_after_pool": False,
            "vision_cfg.output_tokens": False, "vision_cfg.pos_embed_type": "learnable",
            "vision_cfg.act_kwargs": None, "vision_cfg.norm_kwargs": None, "vision_cfg.timm_model_name": None,
            "text_cfg.ls_init_value": None, "text_cfg.embed_cls": False, "text_cfg.no_causal_mask": False,
            "text_cfg.pool_type": "argmax", "text_cfg.proj_bias": False, "text_cfg.proj_type": "linear",
            "text_cfg.output_tokens": False, "text_cfg.act_kwargs": None, "text_cfg.norm_kwargs": None,
            "text_cfg.hf_model_name": None, "text_cfg.attn_pooler_heads": None,
            "init_logit_bias": None}

BLOCK = (
    R("ln_1.{p}", "norm1.{p}"),
    R("attn.in_proj_weight", "attn.qkv.weight"),
    R("attn.in_proj_bias", "attn.qkv.bias"),
    R("attn.out_proj.{p}", "attn.proj.{p}"),
    R("ln_2.{p}", "norm2.{p}"),
    R("mlp.c_fc.{p}", "mlp.0.{p}"),
    R("mlp.c_proj.{p}", "mlp.3.{p}"),
)

RULES = (
    R("visual.class_embedding", "image_encoder.cls_token", "reshape"),
    R("visual.positional_embedding", "image_encoder.pos_embed", "reshape"),
    R("visual.conv1.weight", "image_encoder.patch_embed.projection.0.weight"),
    R("visual.ln_pre.{p}", "image_encoder.norm_pre.{p}"),
    *prefixed(BLOCK, "visual.transformer.resblocks.{i}.", "image_encoder.blocks.{i}."),
    R("visual.ln_post.{p}", "image_encoder.norm.{p}"),
    R("visual.proj", "image_projection.weight", "T"),
    R("token_embedding.weight", "text_encoder.token_embedding.weight"),
    R("positional_embedding", "text_encoder.positional_embedding"),
    *prefixed(BLOCK, "transformer.resblocks.{i}.", "text_encoder.blocks.{i}."),
    R("ln_final.{p}", "text_encoder.ln_final.{p}"),
    R("text_projection", "text_projection.weight", "T"),
    R("logit_scale", "logit_scale"),
    R("attn_mask", None, why="the causal mask, which our text tower builds"),
)


def _config(src: Source) -> dict:
    v_width = src.dim("visual.class_embedding", 0, "vision_cfg.width")
    patch = src.dim("visual.conv1.weight", -1, "vision_cfg.patch_size")
    channels = src.dim("visual.conv1.weight", 1, "the image channels")
    positions = src.dim("visual.positional_embedding", 0, "vision_cfg.image_size")
    side = grid_side(None if positions is None else positions - 1, "visual.positional_embedding", src)
    v_hidden = src.dim("visual.transformer.resblocks.0.mlp.c_fc.weight", 0, "vision_cfg.mlp_ratio")
    embed = src.dim("visual.proj", 1, "embed_dim")
    t_width = src.dim("token_embedding.weight", 1, "text_cfg.width")
    t_hidden = src.dim("transformer.resblocks.0.mlp.c_fc.weight", 0, "text_cfg.mlp_ratio")
    for name, default in DEFAULTS.items():
        src.require(name, (default,), default, "our CLIP towers have open_clip's default here")
    src.refuse_unknown(IGNORABLE | set(DEFAULTS))
    act = "quick_gelu" if src.fact("quick_gelu", default=False) else "gelu"
    v_layers = src.count("visual.transformer.resblocks.{i}.ln_1.weight") or None
    head_width = src.fact("vision_cfg.head_width", default=HEAD_WIDTH)
    width = src.fact("vision_cfg.width", v_width)
    image = dict(
        image_size=src.fact("vision_cfg.image_size", None if side is None or patch is None else side * patch),
        patch_size=src.fact("vision_cfg.patch_size", patch), in_channels=channels, num_classes=0,
        embed_dim=width, depth=src.fact("vision_cfg.layers", v_layers),
        num_heads=None if width is None or head_width is None else width // head_width,
        mlp_ratio=src.fact("vision_cfg.mlp_ratio", None if v_hidden is None or not v_width else v_hidden / v_width),
        dropout=0.0, qkv_bias=True, norm_eps=1e-5, act=act, patch_bias=False, pre_norm=True)
    if width is not None and head_width and width % head_width:
        src.fact_problems.append(f"vision_cfg.width {width} is not a multiple of vision_cfg.head_width {head_width}")
    text = dict(
        vocab_size=src.fact("text_cfg.vocab_size", src.dim("token_embedding.weight", 0, "text_cfg.vocab_size")),
        context_length=src.fact("text_cfg.context_length", src.dim("positional_embedding", 0, "context_length")),
        width=src.fact("text_cfg.width", t_width),
        layers=src.fact("text_cfg.layers", src.count("transformer.resblocks.{i}.ln_1.weight") or None),
        heads=src.fact("text_cfg.heads", how="heads are not in the weights"),
        mlp_ratio=src.fact("text_cfg.mlp_ratio", None if t_hidden is None or not t_width else t_hidden / t_width),
        dropout=0.0, qkv_bias=True, norm_eps=1e-5, act=act)
    kwargs = dict(image_encoder=spec("vit", "VisionTransformer", **image),
                  text_encoder=spec("clip", "TextTransformer", **text),
                  embed_dim=src.fact("embed_dim", embed), projection_bias=False)
    return {**spec("clip", "CLIPModel", **kwargs),
            "inputs": [image_input(image["image_size"], channels),
                       tokens_input(text["vocab_size"], text["context_length"])]}


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and k in ("vision_cfg", "text_cfg"):
            out.update(_flatten(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def facts(arch: str, config: dict | None) -> tuple[dict, dict, list[str]]:
    """(facts, where each came from, problems): open_clip's definition of `arch`, then the
    config's (`model_cfg` of an open_clip_config.json, or a bare model config)."""
    out, origin, problems = {}, {}, []
    if arch.endswith("-quickgelu"):
        out["quick_gelu"], origin["quick_gelu"] = True, f"the name {arch}"
        arch = arch[:-len("-quickgelu")]
    for k, v in _flatten(ARCHS.get(arch, {})).items():
        out[k], origin[k] = v, f"open_clip's {arch}"
    if config:
        model_cfg = config.get("model_cfg", config)
        for k, v in _flatten(model_cfg).items():
            out[k], origin[k] = v, "config.json"
    return out, origin, problems


MAPS = [
    KeyMap("open_clip", "ViT-*", "open_clip CLIP (ViT) -> clip.CLIPModel(vit.VisionTransformer, clip.TextTransformer)",
           RULES, _config, facts,
           example="python -m bridge import --from open_clip --arch ViT-B-16 open_clip_model.safetensors --out clip-b16"),
]
