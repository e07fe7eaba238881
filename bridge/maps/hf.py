"""Hugging Face transformers checkpoints: `CLIPModel` into `clip.CLIPModel` (of a
`vit.VisionTransformer` and a `clip.TextTransformer`), `ViTModel` and `ViTForImageClassification`
into `vit.VisionTransformer`.

Facts come from the model folder's `config.json` (transformers' names: `hidden_size`,
`num_attention_heads`, `layer_norm_eps`, `hidden_act`, ...); every size the weights show is taken
from the weights. Every parameter of transformers' ViTConfig and CLIPConfig is read or checked; the
rest of a config.json is PretrainedConfig's generic entries (generation, labels). Separate q, k, v projections become our fused `qkv` (`part k/3`). Both key
layouts are read: the hub's (`encoder.layer.{i}.attention.attention.query`) and transformers 5's
(`layers.{i}.attention.q_proj`).
"""

from __future__ import annotations

from . import KeyMap, R, Source, grid_side, image_input, prefixed, spec, tokens_input

# transformers' hidden_act names -> ours (layers.ACTIVATIONS)
ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
        "quick_gelu": "quick_gelu"}

HUB_LAYER = (   # ViT, the hub's layout
    R("attention.attention.query.{p}", "attn.qkv.{p}", "part 0/3"),
    R("attention.attention.key.{p}", "attn.qkv.{p}", "part 1/3"),
    R("attention.attention.value.{p}", "attn.qkv.{p}", "part 2/3"),
    R("attention.output.dense.{p}", "attn.proj.{p}"),
    R("intermediate.dense.{p}", "mlp.0.{p}"),
    R("output.dense.{p}", "mlp.3.{p}"),
    R("layernorm_before.{p}", "norm1.{p}"),
    R("layernorm_after.{p}", "norm2.{p}"),
)
V5_LAYER = (    # ViT, transformers 5's layout
    R("attention.q_proj.{p}", "attn.qkv.{p}", "part 0/3"),
    R("attention.k_proj.{p}", "attn.qkv.{p}", "part 1/3"),
    R("attention.v_proj.{p}", "attn.qkv.{p}", "part 2/3"),
    R("attention.o_proj.{p}", "attn.proj.{p}"),
    R("mlp.fc1.{p}", "mlp.0.{p}"),
    R("mlp.fc2.{p}", "mlp.3.{p}"),
    R("layernorm_before.{p}", "norm1.{p}"),
    R("layernorm_after.{p}", "norm2.{p}"),
)
VIT_BODY = (
    R("embeddings.cls_token", "cls_token"),
    R("embeddings.position_embeddings", "pos_embed"),
    R("embeddings.patch_embeddings.projection.{p}", "patch_embed.projection.0.{p}"),
    R("embeddings.mask_token", None, why="masked-image modelling only; never used by a forward without a mask"),
    *prefixed(HUB_LAYER, "encoder.layer.{i}.", "blocks.{i}."),
    *prefixed(V5_LAYER, "layers.{i}.", "blocks.{i}."),
    R("layernorm.{p}", "norm.{p}"),
    R("pooler.dense.{p}", "head.{p}"),
)
VIT_RULES = (*VIT_BODY, *prefixed(VIT_BODY, "vit."), R("classifier.{p}", "head.{p}"))

CLIP_LAYER = (
    R("self_attn.q_proj.{p}", "attn.qkv.{p}", "part 0/3"),
    R("self_attn.k_proj.{p}", "attn.qkv.{p}", "part 1/3"),
    R("self_attn.v_proj.{p}", "attn.qkv.{p}", "part 2/3"),
    R("self_attn.out_proj.{p}", "attn.proj.{p}"),
    R("layer_norm1.{p}", "norm1.{p}"),
    R("mlp.fc1.{p}", "mlp.0.{p}"),
    R("mlp.fc2.{p}", "mlp.3.{p}"),
    R("layer_norm2.{p}", "norm2.{p}"),
)
CLIP_RULES = (
    R("vision_model.embeddings.class_embedding", "image_encoder.cls_token", "reshape"),
    R("vision_model.embeddings.patch_embedding.weight", "image_encoder.patch_embed.projection.0.weight"),
    R("vision_model.embeddings.position_embedding.weight", "image_encoder.pos_embed", "reshape"),
    R("vision_model.embeddings.position_ids", None, why="the positions 0..N-1, which our model uses"),
    R("vision_model.pre_layrnorm.{p}", "image_encoder.norm_pre.{p}"),
    *prefixed(CLIP_LAYER, "vision_model.encoder.layers.{i}.", "image_encoder.blocks.{i}."),
    R("vision_model.post_layernorm.{p}", "image_encoder.norm.{p}"),
    R("visual_projection.weight", "image_projection.weight"),
    R("text_model.embeddings.token_embedding.weight", "text_encoder.token_embedding.weight"),
    R("text_model.embeddings.position_embedding.weight", "text_encoder.positional_embedding"),
    R("text_model.embeddings.position_ids", None, why="the positions 0..L-1, which our model uses"),
    *prefixed(CLIP_LAYER, "text_model.encoder.layers.{i}.", "text_encoder.blocks.{i}."),
    R("text_model.final_layer_norm.{p}", "text_encoder.ln_final.{p}"),
    R("text_projection.weight", "text_projection.weight"),
    R("logit_scale", "logit_scale"),
)


def _act(src: Source, name: str) -> str:
    value = src.fact(name, default="gelu")
    if value not in ACTS:
        src.fact_problems.append(f"{name}={value!r}: our MLPs take {', '.join(sorted(ACTS))} (transformers' names)")
    return ACTS.get(value, value)


def _vit_config(src: Source) -> dict:
    prefix = "vit." if src.has("vit.embeddings.cls_token") else ""
    layout = "encoder.layer.{i}.attention.attention.query" if src.has(
        f"{prefix}encoder.layer.0.attention.attention.query.weight") else "layers.{i}.attention.q_proj"
    width = src.dim(f"{prefix}embeddings.cls_token", -1, "hidden_size")
    conv = f"{prefix}embeddings.patch_embeddings.projection.weight"
    patch, channels = src.dim(conv, -1, "patch_size"), src.dim(conv, 1, "num_channels")
    positions = src.dim(f"{prefix}embeddings.position_embeddings", 1, "image_size")
    side = grid_side(None if positions is None else positions - 1, "position_embeddings", src)
    fc1 = ("encoder.layer.0.intermediate.dense.weight" if layout.startswith("encoder")
           else "layers.0.mlp.fc1.weight")
    hidden = src.dim(prefix + fc1, 0, "intermediate_size")
    if src.has("classifier.weight"):
        num_classes, head_act = src.dim("classifier.weight", 0), None
    elif src.has(f"{prefix}pooler.dense.weight"):
        num_classes = src.dim(f"{prefix}pooler.dense.weight", 0)
        head_act = src.require("pooler_act", ("tanh",), "tanh", "our head activation is tanh or none")
    else:
        num_classes, head_act = 0, None
    kwargs = dict(
        image_size=src.fact("image_size", None if side is None or patch is None else side * patch),
        patch_size=src.fact("patch_size", patch),
        in_channels=src.fact("num_channels", channels),
        num_classes=num_classes,
        embed_dim=src.fact("hidden_size", width),
        depth=src.fact("num_hidden_layers", src.count(prefix + layout + ".weight") or None),
        num_heads=src.fact("num_attention_heads", how="heads are not in the weights"),
        mlp_ratio=src.fact("intermediate_size", hidden) / width if hidden and width else None,
        dropout=0.0,
        qkv_bias=src.fact("qkv_bias", src.has(prefix + layout.replace("{i}", "0") + ".bias")),
        norm_eps=src.fact("layer_norm_eps", default=1e-12),
        act=_act(src, "hidden_act"),
        patch_bias=src.has(conv.replace("weight", "bias")),
        pre_norm=False,
        head_act=head_act,
    )
    return {**spec("vit", "VisionTransformer", **kwargs),
            "inputs": [image_input(kwargs["image_size"], kwargs["in_channels"])]}


def _clip_config(src: Source) -> dict:
    v, t = "vision_config.", "text_config."
    v_width = src.dim("vision_model.embeddings.class_embedding", 0, "vision_config.hidden_size")
    conv = "vision_model.embeddings.patch_embedding.weight"
    patch, channels = src.dim(conv, -1, "vision_config.patch_size"), src.dim(conv, 1, "vision_config.num_channels")
    positions = src.dim("vision_model.embeddings.position_embedding.weight", 0, "vision_config.image_size")
    side = grid_side(None if positions is None else positions - 1, "position_embedding", src)
    v_hidden = src.dim("vision_model.encoder.layers.0.mlp.fc1.weight", 0, "vision_config.intermediate_size")
    t_width = src.dim("text_model.embeddings.token_embedding.weight", 1, "text_config.hidden_size")
    t_hidden = src.dim("text_model.encoder.layers.0.mlp.fc1.weight", 0, "text_config.intermediate_size")
    vocab = src.fact(t + "vocab_size", src.dim("text_model.embeddings.token_embedding.weight", 0, "vocab_size"))
    eos = src.fact(t + "eos_token_id", default=2)
    if vocab is not None and eos not in (2, vocab - 1):
        src.fact_problems.append(
            f"text_config.eos_token_id={eos!r}: transformers pools the text at the first {eos}, ours at the "
            f"largest id (CLIP's end of text, {vocab - 1}); they agree only for eos_token_id {vocab - 1} "
            "(or 2, transformers' legacy argmax)")
    image = dict(
        image_size=src.fact(v + "image_size", None if side is None or patch is None else side * patch),
        patch_size=src.fact(v + "patch_size", patch), in_channels=src.fact(v + "num_channels", channels),
        num_classes=0, embed_dim=src.fact(v + "hidden_size", v_width),
        depth=src.fact(v + "num_hidden_layers", src.count("vision_model.encoder.layers.{i}.layer_norm1.weight") or None),
        num_heads=src.fact(v + "num_attention_heads", how="heads are not in the weights"),
        mlp_ratio=src.fact(v + "intermediate_size", v_hidden) / v_width if v_hidden and v_width else None,
        dropout=0.0, qkv_bias=True, norm_eps=src.fact(v + "layer_norm_eps", default=1e-5),
        act=_act(src, v + "hidden_act"), patch_bias=False, pre_norm=True)
    text = dict(
        vocab_size=vocab,
        context_length=src.fact(t + "max_position_embeddings",
                                src.dim("text_model.embeddings.position_embedding.weight", 0, "max_position_embeddings")),
        width=src.fact(t + "hidden_size", t_width),
        layers=src.fact(t + "num_hidden_layers", src.count("text_model.encoder.layers.{i}.layer_norm1.weight") or None),
        heads=src.fact(t + "num_attention_heads", how="heads are not in the weights"),
        mlp_ratio=src.fact(t + "intermediate_size", t_hidden) / t_width if t_hidden and t_width else None,
        dropout=0.0, qkv_bias=True, norm_eps=src.fact(t + "layer_norm_eps", default=1e-5),
        act=_act(src, t + "hidden_act"))
    kwargs = dict(image_encoder=spec("vit", "VisionTransformer", **image),
                  text_encoder=spec("clip", "TextTransformer", **text),
                  embed_dim=src.fact("projection_dim", src.dim("visual_projection.weight", 0, "projection_dim")),
                  projection_bias=False)
    return {**spec("clip", "CLIPModel", **kwargs),
            "inputs": [image_input(image["image_size"], image["in_channels"]),
                       tokens_input(text["vocab_size"], text["context_length"])]}


def _flatten(config: dict) -> dict:
    out = {}
    for k, v in config.items():
        if k in ("text_config", "vision_config") and isinstance(v, dict):
            out.update({f"{k}.{a}": b for a, b in v.items()})
        else:
            out[k] = v
    return out


def facts_of(model_types: tuple[str, ...], classes: tuple[str, ...]):
    def facts(arch: str, config: dict | None) -> tuple[dict, dict, list[str]]:
        """(facts, where each came from, problems): the folder's config.json, which must be of `arch`."""
        problems = []
        if not config:
            return {}, {}, [f"config.json: Hugging Face {arch} needs the model's config.json (beside the "
                            "checkpoint, or --config)"]
        if "model_type" not in config:
            problems.append(f"model_type: the config has none, so it is not a transformers config.json "
                            f"(transformers' {arch} config says model_type {' or '.join(map(repr, model_types))})")
        elif config["model_type"] not in model_types:
            problems.append(f"model_type: config.json says {config.get('model_type')!r}, {arch} is "
                            f"{' or '.join(model_types)}")
        named = [a for a in config.get("architectures") or [] if a not in classes]
        if named:
            problems.append(f"architectures: config.json names {named}, not {arch}")
        flat = _flatten(config)
        return flat, {k: "config.json" for k in flat}, problems
    return facts


MAPS = [
    KeyMap("hf", "CLIPModel", "transformers CLIPModel -> clip.CLIPModel(vit.VisionTransformer, clip.TextTransformer)",
           CLIP_RULES, _clip_config, facts_of(("clip",), ("CLIPModel",)),
           example="python -m bridge import --from hf --arch CLIPModel clip-vit-base-patch16/ --out clip-b16"),
    KeyMap("hf", "ViTModel", "transformers ViTModel -> vit.VisionTransformer (head: the pooler, tanh)",
           VIT_RULES, _vit_config, facts_of(("vit",), ("ViTModel",)),
           example="python -m bridge import --from hf --arch ViTModel vit-base-patch16-224-in21k/ --out vit-b16"),
    KeyMap("hf", "ViTForImageClassification", "transformers ViTForImageClassification -> vit.VisionTransformer",
           VIT_RULES, _vit_config, facts_of(("vit",), ("ViTForImageClassification",)),
           example="python -m bridge import --from hf --arch ViTForImageClassification vit-base-patch16-224/ --out vit-b16"),
]
