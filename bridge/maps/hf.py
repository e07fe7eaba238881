"""Hugging Face transformers checkpoints: `CLIPModel` into `clip.CLIPModel` (of a
`vit.VisionTransformer` and a `clip.TextTransformer`), `ViTModel` and `ViTForImageClassification`
into `vit.VisionTransformer`, `GPT2LMHeadModel` with `add_cross_attention=True` into
`captioning.TextDecoder` (GPT-2's Conv1D weights transposed; the LM head must be `wte`), and a
`VisionEncoderDecoderModel` of a ViT and a GPT-2 into `captioning.ImageCaptioningModel`.

Facts come from the model folder's `config.json` (transformers' names: `hidden_size`,
`num_attention_heads`, `layer_norm_eps`, `hidden_act`, ...); every size the weights show is taken
from the weights. Every parameter of transformers' ViTConfig and CLIPConfig is read or checked; the
rest of a config.json is PretrainedConfig's generic entries (generation, labels). Separate q, k, v projections become our fused `qkv` (`part k/3`). Both key
layouts are read: the hub's (`encoder.layer.{i}.attention.attention.query`) and transformers 5's
(`layers.{i}.attention.q_proj`).
"""

from __future__ import annotations

import numpy as np

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


def _vit_kwargs(src: Source, prefix: str = "", f: str = "", pooled: bool = True) -> dict:
    """Our `vit.VisionTransformer` arguments for transformers' ViT whose keys start with `prefix`
    (after `vit.`, if any) and whose facts are named `f` + transformers' names. `pooled=False`: the
    tokens are the output (`num_classes=0`; the pooler, if any, is not loaded)."""
    prefix = prefix + ("vit." if src.has(prefix + "vit.embeddings.cls_token") else "")
    layout = "encoder.layer.{i}.attention.attention.query" if src.has(
        f"{prefix}encoder.layer.0.attention.attention.query.weight") else "layers.{i}.attention.q_proj"
    width = src.dim(f"{prefix}embeddings.cls_token", -1, f + "hidden_size")
    conv = f"{prefix}embeddings.patch_embeddings.projection.weight"
    patch, channels = src.dim(conv, -1, f + "patch_size"), src.dim(conv, 1, f + "num_channels")
    positions = src.dim(f"{prefix}embeddings.position_embeddings", 1, f + "image_size")
    side = grid_side(None if positions is None else positions - 1, "position_embeddings", src)
    fc1 = ("encoder.layer.0.intermediate.dense.weight" if layout.startswith("encoder")
           else "layers.0.mlp.fc1.weight")
    hidden = src.dim(prefix + fc1, 0, f + "intermediate_size")
    head = prefix[:-len("vit.")] + "classifier.weight" if prefix.endswith("vit.") else prefix + "classifier.weight"
    if pooled and src.has(head):
        num_classes, head_act = src.dim(head, 0), None
    elif pooled and src.has(f"{prefix}pooler.dense.weight"):
        num_classes = src.dim(f"{prefix}pooler.dense.weight", 0)
        head_act = src.require(f + "pooler_act", ("tanh",), "tanh", "our head activation is tanh or none")
    else:
        num_classes, head_act = 0, None
    return dict(
        image_size=src.fact(f + "image_size", None if side is None or patch is None else side * patch),
        patch_size=src.fact(f + "patch_size", patch),
        in_channels=src.fact(f + "num_channels", channels),
        num_classes=num_classes,
        embed_dim=src.fact(f + "hidden_size", width),
        depth=src.fact(f + "num_hidden_layers", src.count(prefix + layout + ".weight") or None),
        num_heads=src.fact(f + "num_attention_heads", how="heads are not in the weights"),
        mlp_ratio=src.fact(f + "intermediate_size", hidden) / width if hidden and width else None,
        dropout=0.0,
        qkv_bias=src.fact(f + "qkv_bias", src.has(prefix + layout.replace("{i}", "0") + ".bias")),
        norm_eps=src.fact(f + "layer_norm_eps", default=1e-12),
        act=_act(src, f + "hidden_act"),
        patch_bias=src.has(conv.replace("weight", "bias")),
        pre_norm=False,
        head_act=head_act,
    )


def _vit_config(src: Source) -> dict:
    kwargs = _vit_kwargs(src)
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


def facts_of(model_types: tuple[str, ...], classes: tuple[str, ...], flatten=_flatten):
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
        flat = flatten(config)
        return flat, {k: "config.json" for k in flat}, problems
    return facts


# -- GPT-2 with cross-attention (the captioning decoder) ---------------------------------------
# GPT-2's Conv1D stores its weight (in, out), the transpose of our Linear's (out, in).


def _conv1d(name: str) -> tuple:
    return (R(f"{name}.weight", f"{name}.weight", "T"), R(f"{name}.bias", f"{name}.bias"))


_MASK = "GPT-2's causal-mask buffer (older checkpoints); our attention computes its mask"
GPT2_BLOCK = (
    R("ln_1.{p}", "ln_1.{p}"),
    *_conv1d("attn.c_attn"), *_conv1d("attn.c_proj"),
    R("attn.bias", None, why=_MASK), R("attn.masked_bias", None, why=_MASK),
    R("ln_cross_attn.{p}", "ln_cross_attn.{p}"),
    *_conv1d("crossattention.q_attn"), *_conv1d("crossattention.c_attn"), *_conv1d("crossattention.c_proj"),
    R("crossattention.bias", None, why=_MASK), R("crossattention.masked_bias", None, why=_MASK),
    R("ln_2.{p}", "ln_2.{p}"),
    *_conv1d("mlp.c_fc"), *_conv1d("mlp.c_proj"),
)
GPT2_BODY = (
    R("wte.weight", "wte.weight"),
    R("wpe.weight", "wpe.weight"),
    *prefixed(GPT2_BLOCK, "h.{i}.", "h.{i}."),
    R("ln_f.{p}", "ln_f.{p}"),
)
GPT2_RULES = (
    *prefixed(GPT2_BODY, "transformer."),    # GPT2LMHeadModel.save_pretrained's layout
    *GPT2_BODY,                               # the hub's GPT2Model layout (no prefix)
    R("lm_head.weight", None, why="the LM head, tied to wte (checked equal to it); ours is wte"),
)
GPT2_ACTS = ("gelu_new", "gelu_pytorch_tanh")   # both tanh GELU, our decoder's MLP


def _gpt2_kwargs(src: Source, prefix: str = "", f: str = "", image_width: int | None = None) -> dict:
    """Our `captioning.TextDecoder` arguments for transformers' GPT2LMHeadModel whose keys start
    with `prefix` and whose config facts are named `f` + transformers' names."""
    body = prefix + ("transformer." if src.has(prefix + "transformer.wte.weight") else "")
    vocab, width = (src.dim(body + "wte.weight", a, n) for a, n in ((0, f + "vocab_size"), (1, f + "n_embd")))
    positions = src.dim(body + "wpe.weight", 0, f + "n_positions")
    hidden = src.dim(body + "h.0.mlp.c_fc.weight", 1, f + "n_inner")
    if not src.has(body + "h.0.crossattention.q_attn.weight"):
        src.fact_problems.append(f"{body}h.0.crossattention.*: the checkpoint has no cross-attention, and our "
                                 "captioning TextDecoder always cross-attends (GPT2LMHeadModel with "
                                 "add_cross_attention=True)")
    src.require(f + "add_cross_attention", (True,), False, "our TextDecoder always cross-attends to image "
                "tokens (GPT2Config(add_cross_attention=True))")
    inner = src.facts.get(f + "n_inner")
    src.used_facts.add(f + "n_inner")
    if inner is not None and hidden is not None and inner != hidden:
        src.fact_problems.append(f"{f}n_inner: config.json says {inner!r}, the checkpoint's shapes give {hidden!r}")
    mlp_ratio = hidden / width if hidden and width else None
    if mlp_ratio is not None and int(width * mlp_ratio) != hidden:
        src.fact_problems.append(f"{f}n_inner={hidden}: not expressible as our mlp_ratio of n_embd={width}")
    src.require(f + "activation_function", GPT2_ACTS, "gelu_new",
                "our decoder's MLP is tanh GELU (transformers' gelu_new)")
    src.require(f + "scale_attn_weights", (True,), True, "our attention scales by 1/sqrt(head_dim)")
    src.require(f + "scale_attn_by_inverse_layer_idx", (False,), False,
                "our attention does not scale by the layer index")
    src.require(f + "reorder_and_upcast_attn", (False,), False, "our attention computes in the model's dtype")
    src.require(f + "tie_word_embeddings", (True,), True, "our decoder's LM head is its token embedding wte")
    head = prefix + "lm_head.weight"
    if src.has(head) and src.has(body + "wte.weight"):
        lm, wte = src.state_dict[head], src.state_dict[body + "wte.weight"]
        if lm.shape != wte.shape or not np.array_equal(lm, wte):
            src.fact_problems.append(f"{head} differs from {body}wte.weight: our decoder's LM head is tied to "
                                     "wte, so an untied head cannot be imported")
    n_ctx = src.facts.get(f + "n_ctx")
    src.used_facts.add(f + "n_ctx")
    if n_ctx is not None and positions is not None and n_ctx != positions:
        src.fact_problems.append(f"{f}n_ctx={n_ctx!r} differs from the {positions} positions of wpe")
    eos = src.fact(f + "eos_token_id", default=50256)
    pad = src.fact(f + "pad_token_id", default=None)
    for name, value in (("eos_token_id", eos), ("pad_token_id", pad)):
        if isinstance(value, (list, tuple)):
            src.fact_problems.append(f"{f}{name}={value!r}: our decoder takes one id")
    return dict(
        vocab_size=src.fact(f + "vocab_size", vocab),
        max_positions=src.fact(f + "n_positions", positions),
        width=src.fact(f + "n_embd", width),
        layers=src.fact(f + "n_layer", src.count(body + "h.{i}.ln_1.weight") or None),
        heads=src.fact(f + "n_head", how="heads are not in the weights"),
        image_width=image_width,
        mlp_ratio=mlp_ratio,
        dropout=0.0,
        layer_norm_eps=src.fact(f + "layer_norm_epsilon", default=1e-5),
        bos_token_id=src.fact(f + "bos_token_id", default=50256),
        eos_token_id=eos,
        pad_token_id=eos if pad is None else pad,   # transformers' generate pads with eos when pad is None
    )


def features_input(tokens, width) -> dict:
    return {"name": "encoder_hidden_states", "kind": "features", "shape": [tokens, width]}


def _gpt2_config(src: Source) -> dict:
    kwargs = _gpt2_kwargs(src)
    length = None if kwargs["max_positions"] is None else min(16, kwargs["max_positions"])
    return {**spec("captioning", "TextDecoder", **kwargs),
            "inputs": [tokens_input(kwargs["vocab_size"], length), features_input(4, kwargs["width"])]}


VED_RULES = (
    R("encoder.pooler.dense.{p}", None, why="ViTModel's pooler, which VisionEncoderDecoderModel does not use"),
    *prefixed(VIT_BODY, "encoder.", "image_encoder."),
    *prefixed(GPT2_RULES, "decoder.", "text_decoder."),
    R("enc_to_dec_proj.{p}", "text_decoder.image_proj.{p}"),
)


def _ved_config(src: Source) -> dict:
    """ViT encoder + GPT-2 decoder. Generation starts at `decoder_start_token_id` (our decoder's
    bos); eos and pad are the model config's, else the decoder's (pad: else eos, as generate)."""
    if src.facts.get("encoder.model_type") not in (None, "vit"):
        src.fact_problems.append(f"encoder.model_type={src.facts['encoder.model_type']!r}: this map reads a ViT encoder")
    if src.facts.get("decoder.model_type") not in (None, "gpt2"):
        src.fact_problems.append(f"decoder.model_type={src.facts['decoder.model_type']!r}: this map reads a GPT-2 decoder")
    if src.facts.get("decoder.cross_attention_hidden_size") is not None:
        src.fact_problems.append("decoder.cross_attention_hidden_size: GPT-2 cross-attends at n_embd; not supported")
    image = _vit_kwargs(src, "encoder.", "encoder.", pooled=False)
    text = _gpt2_kwargs(src, "decoder.", "decoder.", image_width=image["embed_dim"])
    if text["width"] is not None and image["embed_dim"] == text["width"]:
        text["image_width"] = None
    start = src.fact("decoder_start_token_id", how="VisionEncoderDecoderModel's config must name it to generate")
    for name in ("eos_token_id", "pad_token_id"):
        value = src.facts.get(name)
        src.used_facts.add(name)
        if isinstance(value, (list, tuple)):
            src.fact_problems.append(f"{name}={value!r}: our decoder takes one id")
        elif value is not None:
            text[name] = value
    if src.facts.get("pad_token_id") is None and src.facts.get("decoder.pad_token_id") is None:
        text["pad_token_id"] = text["eos_token_id"]
    text["bos_token_id"] = start
    length = None if text["max_positions"] is None else min(16, text["max_positions"])
    return {**spec("captioning", "ImageCaptioningModel", image_encoder=spec("vit", "VisionTransformer", **image),
                   text_decoder=spec("captioning", "TextDecoder", **text)),
            "inputs": [image_input(image["image_size"], image["in_channels"]),
                       tokens_input(text["vocab_size"], length)]}


def _flatten_ved(config: dict) -> dict:
    out = {}
    for k, v in config.items():
        if k in ("encoder", "decoder") and isinstance(v, dict):
            out.update({f"{k}.{a}": b for a, b in v.items()})
        else:
            out[k] = v
    return out


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
    KeyMap("hf", "GPT2LMHeadModel", "transformers GPT2LMHeadModel(add_cross_attention=True) -> captioning.TextDecoder",
           GPT2_RULES, _gpt2_config, facts_of(("gpt2",), ("GPT2LMHeadModel", "GPT2Model")),
           example="python -m bridge import --from hf --arch GPT2LMHeadModel gpt2-decoder/ --out decoder"),
    KeyMap("hf", "VisionEncoderDecoderModel",
           "transformers VisionEncoderDecoderModel (ViT + GPT-2) -> captioning.ImageCaptioningModel",
           VED_RULES, _ved_config, facts_of(("vision-encoder-decoder",), ("VisionEncoderDecoderModel",), _flatten_ved),
           example="python -m bridge import --from hf --arch VisionEncoderDecoderModel vit-gpt2/ --out captioner"),
]
