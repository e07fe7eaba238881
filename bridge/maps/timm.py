"""timm checkpoints: `vit_*` (e.g. vit_base_patch16_224) into `vit.VisionTransformer`, `swin_*`
(e.g. swin_tiny_patch4_window7_224) into `swin.SwinTransformer`.

timm's facts come from its config (`config.json` of a timm model folder: `architecture`,
`num_classes`, `global_pool` and, when it was created with overrides, `model_args`) or, for the
named architectures below, timm's own definitions; timm's names (`img_size`, `in_chans`, ...) are
read, and every size the weights show is taken from the weights.
"""

from __future__ import annotations

from . import KeyMap, R, Source, grid_side, image_input, spec

# The model_args of timm's named architectures (timm/models/vision_transformer.py and
# swin_transformer.py), with the class defaults they rely on.
ARCHS = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_base_patch32_224": dict(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "swin_tiny_patch4_window7_224": dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2),
                                         num_heads=(3, 6, 12, 24)),
    "swin_small_patch4_window7_224": dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2),
                                          num_heads=(3, 6, 12, 24)),
    "swin_base_patch4_window7_224": dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2),
                                         num_heads=(4, 8, 16, 32)),
    "swin_large_patch4_window7_224": dict(patch_size=4, window_size=7, embed_dim=192, depths=(2, 2, 18, 2),
                                          num_heads=(6, 12, 24, 48)),
}
IMAGE_SIZE = 224   # every architecture above is named for 224x224 inputs

# timm model_args that change nothing at inference (dropout rates, initialisation).
IGNORABLE = {"drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
             "drop_path_rate", "weight_init", "fix_init", "pretrained_cfg", "pretrained_cfg_overlay",
             "architecture", "num_features", "label_names", "label_descriptions", "dynamic_img_size",
             "dynamic_img_pad", "strict_img_size"}

VIT_RULES = (
    R("cls_token", "cls_token"),
    R("pos_embed", "pos_embed"),
    R("patch_embed.proj.{p}", "patch_embed.projection.0.{p}"),
    R("norm_pre.{p}", "norm_pre.{p}"),
    R("blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
    R("blocks.{i}.attn.qkv.{p}", "blocks.{i}.attn.qkv.{p}"),
    R("blocks.{i}.attn.proj.{p}", "blocks.{i}.attn.proj.{p}"),
    R("blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
    R("blocks.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.0.{p}"),
    R("blocks.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.3.{p}"),
    R("norm.{p}", "norm.{p}"),
    R("head.{p}", "head.{p}"),
)


def _vit_config(src: Source) -> dict:
    width = src.dim("cls_token", -1, "embed_dim")
    patch = src.dim("patch_embed.proj.weight", -1, "patch_size")
    channels = src.dim("patch_embed.proj.weight", 1, "in_chans")
    positions = src.dim("pos_embed", 1, "img_size")
    hidden = src.dim("blocks.0.mlp.fc1.weight", 0, "mlp_ratio")
    side = grid_side(None if positions is None else positions - 1, "pos_embed", src)
    src.require("class_token", (True,), True, "our VisionTransformer pools its class token")
    src.require("global_pool", ("token",), "token", "our VisionTransformer pools the class token (not a mean)")
    src.require("no_embed_class", (False,), False, "our position table covers the class token")
    src.require("reg_tokens", (0,), 0, "our VisionTransformer has no register tokens")
    src.require("fc_norm", (None, False), None, "our VisionTransformer norms before pooling")
    src.require("final_norm", (True,), True, "our VisionTransformer ends with a LayerNorm")
    src.require("qk_norm", (False,), False, "our attention has no q/k norm")
    src.require("init_values", (None,), None, "our blocks have no layer scale")
    src.require("proj_bias", (True,), True, "our attention output projection has a bias")
    src.require("pos_embed", ("learn",), "learn", "our position table is learned")
    src.require("norm_layer", (None,), None, "timm's default LayerNorm(eps=1e-6) is what this import reads")
    src.refuse_unknown({"img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                        "num_heads", "mlp_ratio", "qkv_bias", "act_layer", "pre_norm"}, IGNORABLE)
    kwargs = dict(
        image_size=src.fact("img_size", None if side is None or patch is None else side * patch),
        patch_size=src.fact("patch_size", patch),
        in_channels=src.fact("in_chans", channels),
        num_classes=src.fact("num_classes", src.dim("head.weight", 0) if src.has("head.weight") else 0),
        embed_dim=src.fact("embed_dim", width),
        depth=src.fact("depth", src.count("blocks.{i}.norm1.weight") or None),
        num_heads=src.fact("num_heads", how="heads are not in the weights"),
        mlp_ratio=src.fact("mlp_ratio", None if hidden is None or not width else hidden / width),
        dropout=0.0,
        qkv_bias=src.fact("qkv_bias", src.has("blocks.0.attn.qkv.bias")),
        norm_eps=1e-6,   # timm's ViT: LayerNorm(eps=1e-6) unless norm_layer is given (refused above)
        act=src.fact("act_layer", default="gelu"),
        patch_bias=src.has("patch_embed.proj.bias"),
        pre_norm=src.fact("pre_norm", src.has("norm_pre.weight")),
    )
    if kwargs["act"] not in ("gelu", "gelu_tanh", "quick_gelu"):
        src.fact_problems.append(f"act_layer={kwargs['act']!r}: our MLPs take gelu, gelu_tanh or quick_gelu")
    return {**spec("vit", "VisionTransformer", **kwargs),
            "inputs": [image_input(kwargs["image_size"], kwargs["in_channels"])]}


SWIN_RULES = (
    R("patch_embed.proj.{p}", "patch_embed.projection.{p}"),
    R("patch_embed.norm.{p}", "patch_norm.{p}"),
    R("layers.{s}.downsample.{m}.{p}", "layers.{s-1}.downsample.{m}.{p}"),
    R("layers.{s}.blocks.{b}.norm1.{p}", "layers.{s}.blocks.{b}.norm1.{p}"),
    R("layers.{s}.blocks.{b}.attn.relative_position_bias_table",
      "layers.{s}.blocks.{b}.attn.relative_position_bias_table"),
    R("layers.{s}.blocks.{b}.attn.relative_position_index", "layers.{s}.blocks.{b}.attn.relative_position_index"),
    R("layers.{s}.blocks.{b}.attn_mask", "layers.{s}.blocks.{b}.attn_mask"),
    R("layers.{s}.blocks.{b}.attn.qkv.{p}", "layers.{s}.blocks.{b}.attn.qkv.{p}"),
    R("layers.{s}.blocks.{b}.attn.proj.{p}", "layers.{s}.blocks.{b}.attn.proj.{p}"),
    R("layers.{s}.blocks.{b}.norm2.{p}", "layers.{s}.blocks.{b}.norm2.{p}"),
    R("layers.{s}.blocks.{b}.mlp.fc1.{p}", "layers.{s}.blocks.{b}.mlp.0.{p}"),
    R("layers.{s}.blocks.{b}.mlp.fc2.{p}", "layers.{s}.blocks.{b}.mlp.3.{p}"),
    R("norm.{p}", "norm.{p}"),
    R("head.fc.{p}", "head.{p}"),
)


def _swin_config(src: Source) -> dict:
    import math

    stages = src.count("layers.{i}.blocks.0.norm1.weight")
    depths = tuple(src.count(f"layers.{s}.blocks.{{i}}.norm1.weight") for s in range(stages))
    heads, windows = [], []
    for s in range(stages):
        table = src.shape(f"layers.{s}.blocks.0.attn.relative_position_bias_table", f"stage {s}'s heads")
        if table is not None:
            heads.append(table[1])
            windows.append((math.isqrt(table[0]) + 1) // 2)
    width = src.dim("patch_embed.proj.weight", 0, "embed_dim")
    patch = src.dim("patch_embed.proj.weight", -1, "patch_size")
    hidden = src.dim("layers.0.blocks.0.mlp.fc1.weight", 0, "mlp_ratio")
    src.require("global_pool", ("avg",), "avg", "our SwinTransformer pools by mean")
    src.require("always_partition", (False,), False, "our blocks shrink the window to a smaller stage")
    src.require("head_dim", (None,), None, "our heads split the width evenly")
    src.require("norm_layer", (None, "layernorm"), None, "timm's Swin uses LayerNorm(eps=1e-5) as ours")
    src.refuse_unknown({"img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depths",
                        "num_heads", "window_size", "mlp_ratio", "qkv_bias"}, IGNORABLE)
    # A stage as small as the window has the window shrunk to it (timm and ours); the first stage's
    # table gives the configured window.
    window = windows[0] if windows else None
    kwargs = dict(
        image_size=src.fact("img_size", how="Swin has no position table; the architecture name says 224"),
        patch_size=src.fact("patch_size", patch),
        in_channels=src.fact("in_chans", src.dim("patch_embed.proj.weight", 1, "in_chans")),
        num_classes=src.fact("num_classes", src.dim("head.fc.weight", 0) if src.has("head.fc.weight") else 0),
        embed_dim=src.fact("embed_dim", width),
        depths=src.fact("depths", depths if stages else None),
        num_heads=src.fact("num_heads", tuple(heads) if len(heads) == stages and stages else None),
        window_size=src.fact("window_size", window),
        mlp_ratio=src.fact("mlp_ratio", None if hidden is None or not width else hidden / width),
        qkv_bias=src.fact("qkv_bias", src.has("layers.0.blocks.0.attn.qkv.bias")),
        dropout=0.0, attn_dropout=0.0, drop_path_rate=0.0,
    )
    for k in ("depths", "num_heads"):
        if kwargs[k] is not None:
            kwargs[k] = list(kwargs[k])
    return {**spec("swin", "SwinTransformer", **kwargs),
            "inputs": [image_input(kwargs["image_size"], kwargs["in_channels"])]}


def facts(arch: str, config: dict | None) -> tuple[dict, dict, list[str]]:
    """(facts, where each came from, problems): timm's definition of `arch`, then the config file's."""
    out, origin, problems = {}, {}, []
    known = ARCHS.get(arch)
    if known is not None:
        for k, v in {**known, "img_size": IMAGE_SIZE}.items():
            out[k], origin[k] = v, f"timm's {arch}"
    if config:
        named = config.get("architecture")
        if named and named.split(".")[0] != arch:
            problems.append(f"the config is of timm architecture {named!r}, not {arch!r}")
        for k in ("num_classes", "global_pool"):
            if k in config:
                out[k], origin[k] = config[k], "config.json"
        for k, v in (config.get("model_args") or {}).items():
            out[k], origin[k] = v, "config.json model_args"
    return out, origin, problems


MAPS = [
    KeyMap("timm", "vit_*", "timm VisionTransformer -> vit.VisionTransformer", VIT_RULES, _vit_config, facts,
           example="python -m bridge import --from timm --arch vit_base_patch16_224 model.safetensors --out vit-b16"),
    KeyMap("timm", "swin_*", "timm SwinTransformer -> swin.SwinTransformer", SWIN_RULES, _swin_config, facts,
           example="python -m bridge import --from timm --arch swin_tiny_patch4_window7_224 model.safetensors --out swin-t"),
]
