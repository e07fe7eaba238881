"""`python -m bridge import`: checkpoints of timm, open_clip and Hugging Face transformers, of models
built here at random (offline), in each library's own file layout, imported into both backends. The
imported model's outputs equal the source library's model (torch strict load, Flax through
`bridge.torch_to_flax`) within `FORWARD_TOL`, for images and, for CLIP, text; a checkpoint that does
not fit gives one error naming every key that does not and what was expected."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import numpy as np
import pytest
import torch

import bridge
from bridge.__main__ import main
from bridge.imports import ImportMismatchError, example_inputs, import_checkpoint, load
from parity_tests.harness import FORWARD_TOL, rel_err
from parity_tests.source_libraries import need


def _timm(arch: str, **model_args):
    def build(folder: str):
        timm = need("timm")
        model = timm.create_model(arch, pretrained=False, **model_args)
        bridge.save_safetensors(model.state_dict(), os.path.join(folder, "model.safetensors"))
        if model_args:   # what timm's push_to_hub writes for a model created with overrides
            _write_json(os.path.join(folder, "config.json"), {
                "architecture": arch, "num_classes": model.num_classes, "global_pool": model.global_pool,
                "model_args": {k: v for k, v in model_args.items() if k != "num_classes"}})
        return model, os.path.join(folder, "model.safetensors")
    return build


def _open_clip(arch: str, model_cfg: dict | None = None):
    def build(folder: str):
        open_clip = need("open_clip")
        model = open_clip.CLIP(**model_cfg) if model_cfg else open_clip.create_model(arch, pretrained=None)
        path = os.path.join(folder, "open_clip_pytorch_model.bin")   # a torch.save state_dict
        torch.save(model.state_dict(), path)
        if model_cfg:
            _write_json(os.path.join(folder, "open_clip_config.json"), {"model_cfg": model_cfg})
        return model, path
    return build


def _hf(cls: str, **config):
    def build(folder: str):
        transformers = need("transformers")
        if cls == "CLIPModel":
            text, vision = config.get("text_config", {}), config.get("vision_config", {})
            cfg = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                          **{k: v for k, v in config.items() if not k.endswith("_config")})
        else:
            cfg = transformers.ViTConfig(**config)
        model = getattr(transformers, cls)(cfg)
        model.save_pretrained(folder)      # config.json and model.safetensors, the hub's key layout
        return model, folder
    return build


def _write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def _timm_outputs(model, image, text):
    return {"output": model(image)}


def _open_clip_outputs(model, image, text):
    image_features, text_features = model.encode_image(image, normalize=True), model.encode_text(text, normalize=True)
    return {"image": image_features, "text": text_features,
            "logits": model.logit_scale.exp() * image_features @ text_features.t()}


def _hf_clip_outputs(model, image, text):
    out = model(pixel_values=image, input_ids=text)
    return {"image": out.image_embeds, "text": out.text_embeds, "logits": out.logits_per_image}


@dataclasses.dataclass(frozen=True)
class Case:
    library: str
    arch: str
    build: Callable          # folder -> (source model, checkpoint path)
    outputs: Callable        # (source model, image, text) -> {name: tensor}


TINY_CLIP_TEXT = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2)
CASES = {
    "timm-vit": Case("timm", "vit_base_patch16_224", _timm(
        "vit_base_patch16_224", img_size=32, embed_dim=64, depth=2, num_heads=4, num_classes=10), _timm_outputs),
    "timm-swin": Case("timm", "swin_tiny_patch4_window7_224", _timm(
        "swin_tiny_patch4_window7_224", img_size=56, embed_dim=32, depths=(2, 1), num_heads=(2, 4),
        num_classes=10), _timm_outputs),
    "open_clip": Case("open_clip", "ViT-B-16", _open_clip("ViT-B-16", dict(
        embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=16, head_width=16),
        text_cfg=TINY_CLIP_TEXT)), _open_clip_outputs),
    "hf-clip": Case("hf", "CLIPModel", _hf(
        "CLIPModel", projection_dim=24,
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=99),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=16)), _hf_clip_outputs),
    "hf-vit": Case("hf", "ViTModel", _hf(
        "ViTModel", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=16),
        lambda m, image, text: {"pooler_output": m(pixel_values=image).pooler_output}),
    "hf-vit-classifier": Case("hf", "ViTForImageClassification", _hf(
        "ViTForImageClassification", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, image_size=32, patch_size=16, num_labels=5),
        lambda m, image, text: {"logits": m(pixel_values=image).logits}),
}
FULL_SIZE = {
    "timm-vit": Case("timm", "vit_base_patch16_224", _timm("vit_base_patch16_224"), _timm_outputs),
    "timm-swin": Case("timm", "swin_tiny_patch4_window7_224", _timm("swin_tiny_patch4_window7_224"), _timm_outputs),
    "open_clip": Case("open_clip", "ViT-B-16", _open_clip("ViT-B-16"), _open_clip_outputs),
    "hf-clip": Case("hf", "CLIPModel", _hf("CLIPModel", vision_config=dict(patch_size=16)), _hf_clip_outputs),
    "hf-vit": Case("hf", "ViTModel", _hf("ViTModel"),
                   lambda m, image, text: {"pooler_output": m(pixel_values=image).pooler_output}),
    "hf-vit-classifier": Case("hf", "ViTForImageClassification", _hf("ViTForImageClassification"),
                              lambda m, image, text: {"logits": m(pixel_values=image).logits}),
}


def _ours(config, torch_model, flax_model, variables, torch_in, flax_in):
    """{name: (torch output, Flax output)} with the names of the source's outputs."""
    if config["family"] == "clip":
        with torch.no_grad():
            t = {"image": torch_model.encode_image(torch_in[0]), "text": torch_model.encode_text(torch_in[1]),
                 "logits": torch_model(*torch_in)[0]}
        f = jax.jit(lambda v, image, text: {
            "image": flax_model.apply(v, image, method=flax_model.encode_image),
            "text": flax_model.apply(v, text, method=flax_model.encode_text),
            "logits": flax_model.apply(v, image, text)[0]})(variables, *flax_in)
        return {k: (t[k], f[k]) for k in t}
    with torch.no_grad():
        t = torch_model(*torch_in)
    return {"output": (t, jax.jit(flax_model.apply)(variables, *flax_in))}


def _check(case: Case, tmp_path, batch_size: int) -> dict[str, tuple[float, float]]:
    """Import `case`'s checkpoint by the CLI; {output: (torch error, Flax error)} against the source."""
    source_dir, out = tmp_path / "source", tmp_path / "imported"
    source_dir.mkdir()
    source, checkpoint = case.build(str(source_dir))
    source.eval()
    assert main(["import", "--from", case.library, "--arch", case.arch, str(checkpoint), "--out", str(out)]) == 0
    torch_model, flax_model, variables = load(out)
    config = json.loads((out / "config.json").read_text())
    torch_in, flax_in = example_inputs(config, batch_size)
    with torch.no_grad():
        ref = case.outputs(source, *torch_in, *([None] * (2 - len(torch_in))))
    ours = _ours(config, torch_model, flax_model, variables, torch_in, flax_in)
    errors = {}
    for name, value in ref.items():
        t, f = ours[name if name in ours else "output"]
        errors[name] = (rel_err(value.numpy(), t.numpy()), rel_err(value.numpy(), np.asarray(f)))
    return errors


def _assert_within(errors):
    over = {k: v for k, v in errors.items() if max(v) > FORWARD_TOL}
    assert not over, f"(torch, Flax) relative errors over {FORWARD_TOL:g}: {over}"


@pytest.mark.parametrize("name", CASES)
def test_imported_model_equals_the_source_library(name, tmp_path):
    _assert_within(_check(CASES[name], tmp_path, batch_size=2))


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_import_equals_the_source_library(name, tmp_path):
    errors = _check(FULL_SIZE[name], tmp_path, batch_size=1)
    print(f"{name}: " + ", ".join(f"{k} torch {t:.1e} Flax {f:.1e}" for k, (t, f) in errors.items()))
    _assert_within(errors)


# -- a checkpoint that does not fit ----------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("timm-vit")
    _, path = CASES["timm-vit"].build(str(folder))
    return path


def _copy_config(src_checkpoint, folder):
    config = os.path.join(os.path.dirname(src_checkpoint), "config.json")
    (folder / "config.json").write_text(open(config).read())


def _fails(capsys, *args) -> str:
    assert main(["import", *args, "--out", "/nonexistent/never-written"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_a_checkpoint_of_another_architecture_names_every_key(tmp_path, capsys):
    _, swin = CASES["timm-swin"].build(str(tmp_path))
    err = _fails(capsys, "--from", "timm", "--arch", "vit_base_patch16_224", swin)
    assert "fit the timm 'swin_*' map" in err and "--arch swin_tiny_patch4_window7_224" in err
    assert "the config is of timm architecture 'swin_tiny_patch4_window7_224'" in err
    taken = {"norm.weight", "norm.bias", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    for key in bridge.load_safetensors(swin):
        assert key in taken or f"{key} (" in err, key
    for needed in ("cls_token (to read embed_dim)", "pos_embed (to read img_size)"):
        assert needed in err


def test_a_truncated_checkpoint_names_every_tensor_cut_off(tmp_path, capsys, timm_vit):
    data = open(timm_vit, "rb").read()
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(data[:len(data) * 2 // 3])
    _copy_config(timm_vit, tmp_path)
    err = _fails(capsys, "--from", "timm", "--arch", "vit_base_patch16_224", str(cut))
    header = bridge.io.safetensors_header(timm_vit)
    start = 8 + int.from_bytes(data[:8], "little")
    lost = [k for k, v in header.items() if start + v["data_offsets"][1] > len(data) * 2 // 3]
    assert lost and f"Tensors cut off by the end of the file ({len(lost)})" in err
    for key in lost:
        assert f"    {key} (F32 {tuple(header[key]['shape'])}" in err, key


def test_missing_keys_are_named_with_the_shape_expected_and_the_source_key(tmp_path, capsys, timm_vit):
    state = bridge.load_safetensors(timm_vit)
    del state["blocks.1.attn.qkv.weight"], state["norm.bias"]
    bridge.save_safetensors(state, tmp_path / "model.safetensors")
    _copy_config(timm_vit, tmp_path)
    err = _fails(capsys, "--from", "timm", "--arch", "vit_base_patch16_224", str(tmp_path / "model.safetensors"))
    assert "Missing key(s) (2)" in err
    assert "blocks.1.attn.qkv.weight (192, 64) (from timm blocks.1.attn.qkv.weight)" in err
    assert "norm.bias (64,) (from timm norm.bias)" in err


def test_facts_the_weights_do_not_hold_are_never_guessed(tmp_path, timm_vit):
    """Without timm's config the tiny checkpoint contradicts vit_base_patch16_224's definition, and
    the heads (not in the weights) of an unnamed architecture must be given."""
    bare = tmp_path / "model.safetensors"
    bare.write_bytes(open(timm_vit, "rb").read())
    with pytest.raises(ImportMismatchError) as e:
        import_checkpoint("timm", "vit_base_patch16_224", bare)
    assert "embed_dim: timm's vit_base_patch16_224 says 768, the checkpoint's shapes give 64" in str(e.value)
    assert "img_size: timm's vit_base_patch16_224 says 224, the checkpoint's shapes give 32" in str(e.value)
    with pytest.raises(ImportMismatchError, match="num_heads: not readable from the checkpoint's shapes"):
        import_checkpoint("timm", "vit_tiny64_patch16_32", bare)
    imported = import_checkpoint("timm", "vit_tiny64_patch16_32", bare, overrides=["num_heads=4"])
    assert imported.config["kwargs"]["num_heads"] == 4 and imported.config["kwargs"]["embed_dim"] == 64


def test_hf_clip_pooling_at_another_end_of_text_id_is_refused(tmp_path):
    _, folder = _hf("CLIPModel", text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=1, num_attention_heads=2,
                                                  max_position_embeddings=16, eos_token_id=7),
                    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=16))(str(tmp_path))
    with pytest.raises(ImportMismatchError, match="text_config.eos_token_id=7: transformers pools the text"):
        import_checkpoint("hf", "CLIPModel", folder)


def test_hf_vit_reads_the_hub_layout_and_transformers_5_layout_alike(tmp_path):
    model, folder = CASES["hf-vit-classifier"].build(str(tmp_path / "hub"))
    v5 = tmp_path / "v5"
    v5.mkdir()
    bridge.save_safetensors(model.state_dict(), v5 / "model.safetensors")
    (v5 / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    if not any(k.startswith("vit.layers.") for k in model.state_dict()):
        pytest.skip("this transformers names its ViT layers as the hub does")
    hub, new = (import_checkpoint("hf", "ViTForImageClassification", p) for p in (folder, v5))
    assert hub.config["kwargs"] == new.config["kwargs"] and list(hub.state_dict) == list(new.state_dict)
    for key, value in hub.state_dict.items():
        np.testing.assert_array_equal(value, new.state_dict[key], err_msg=key)


def test_swin_buffers_in_a_checkpoint_are_checked_against_ours(tmp_path):
    """Older timm checkpoints carry each block's `relative_position_index` and `attn_mask`: they
    must equal what our blocks compute, and are then taken from ours."""
    model, path = CASES["timm-swin"].build(str(tmp_path))
    buffers = {k: v for k, v in model.named_buffers() if k.endswith(("relative_position_index", "attn_mask"))}
    assert any(k.endswith("attn_mask") for k in buffers) and any(k.endswith("index") for k in buffers)
    state = {**bridge.load_safetensors(path), **{k: v.numpy() for k, v in buffers.items()}}
    bridge.save_safetensors(state, path)
    imported = import_checkpoint("timm", "swin_tiny_patch4_window7_224", path)
    assert set(buffers) <= set(imported.state_dict) and not set(buffers) & set(imported.computed)
    index = "layers.0.blocks.1.attn.relative_position_index"
    state[index] = state[index][::-1].copy()
    bridge.save_safetensors(state, path)
    with pytest.raises(ImportMismatchError, match=f"Buffer differs from ours .*\\n    {index} -> {index}"):
        import_checkpoint("timm", "swin_tiny_patch4_window7_224", path)


def test_a_sharded_hf_folder_imports_as_one(tmp_path):
    model, folder = CASES["hf-vit-classifier"].build(str(tmp_path / "whole"))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    whole, sharded = (import_checkpoint("hf", "ViTForImageClassification", p) for p in (folder, tmp_path / "sharded"))
    assert list(whole.state_dict) == list(sharded.state_dict)
    for key, value in whole.state_dict.items():
        np.testing.assert_array_equal(value, sharded.state_dict[key], err_msg=key)


# -- Hugging Face GPT-2 with cross-attention, and VisionEncoderDecoderModel (ViT + GPT-2) ---------

TINY_GPT2 = dict(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=48, bos_token_id=48,
                 eos_token_id=49)
TINY_VIT_ENCODER = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=32, patch_size=16)


def _gpt2_config(transformers, **config):
    return transformers.GPT2Config(add_cross_attention=True, **config)


def _hf_gpt2(folder, **config):
    transformers = need("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_gpt2_config(transformers, **config)).eval()
    model.save_pretrained(folder)
    return model


def _hf_captioner(folder, encoder: dict, decoder: dict, images, max_new_tokens, initializer_range=0.2):
    """A random ViT + GPT-2 VisionEncoderDecoderModel (weights spread wider than the default so
    that greedy decoding varies), its eos set to the 3rd token it generates for the first image (so
    that one row ends early and is padded), saved to `folder`; (model, its greedy generate)."""
    transformers = need("transformers")
    torch.manual_seed(0)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.ViTConfig(initializer_range=initializer_range, **encoder),
        _gpt2_config(transformers, initializer_range=initializer_range, **decoder))
    config.decoder_start_token_id, config.pad_token_id = decoder["bos_token_id"], 0
    model = transformers.VisionEncoderDecoderModel(config=config).eval()
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    with torch.no_grad():
        eos = int(model.generate(pixel_values=images[:1], **greedy)[0, 3])
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    with torch.no_grad():
        return model, model.generate(pixel_values=images, **greedy)


def _decoder_errors(tmp_path, config, batch_size=2, length=12, image_tokens=5):
    """(torch, Flax) relative errors of the imported decoder's logits against GPT2LMHeadModel's."""
    source = _hf_gpt2(str(tmp_path / "source"), **config)
    out = tmp_path / "imported"
    assert main(["import", "--from", "hf", "--arch", "GPT2LMHeadModel", str(tmp_path / "source"), "--out", str(out)]) == 0
    torch_model, flax_model, variables = load(out)
    rs = np.random.RandomState(0)
    ids = rs.randint(0, config["vocab_size"], (batch_size, length))
    image = rs.standard_normal((batch_size, image_tokens, config["n_embd"])).astype(np.float32)
    with torch.no_grad():
        ref = source(input_ids=torch.from_numpy(ids), encoder_hidden_states=torch.from_numpy(image)).logits.numpy()
        t = torch_model(torch.from_numpy(ids), torch.from_numpy(image)).logits.numpy()
    f = jax.jit(lambda v, i, e: flax_model.apply(v, i, e).logits)(variables, ids.astype(np.int32), image)
    return rel_err(ref, t), rel_err(ref, np.asarray(f))


def _generation(tmp_path, encoder, decoder, n_images=3, max_length=6, initializer_range=0.2):
    """(HF's greedy tokens padded to 1 + max_length, ours in torch, ours in JAX), and the teacher-
    forced logits' (torch, Flax) relative errors."""
    from jax_models.captioning import generate

    rs = np.random.RandomState(0)
    images = rs.standard_normal((n_images, 3, encoder["image_size"], encoder["image_size"])).astype(np.float32)
    source_dir, out = tmp_path / "source", tmp_path / "imported"
    source, ref = _hf_captioner(str(source_dir), encoder, decoder, torch.from_numpy(images), max_length,
                                initializer_range)
    assert main(["import", "--from", "hf", "--arch", "VisionEncoderDecoderModel", str(source_dir), "--out", str(out)]) == 0
    torch_model, flax_model, variables = load(out)
    pad = torch_model.text_decoder.config.pad_token_id
    ref = np.pad(ref.numpy(), ((0, 0), (0, 1 + max_length - ref.shape[1])), constant_values=pad)
    nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    ours_torch = torch_model.generate(torch.from_numpy(images), max_length=max_length).numpy()
    ours_jax = np.asarray(generate(flax_model, variables, nhwc, max_length=max_length))
    captions = rs.randint(0, decoder["vocab_size"], (n_images, max_length))
    with torch.no_grad():
        logits = source(pixel_values=torch.from_numpy(images), decoder_input_ids=torch.from_numpy(captions)).logits.numpy()
        t = torch_model(torch.from_numpy(images), torch.from_numpy(captions)).numpy()
    f = jax.jit(flax_model.apply)(variables, nhwc, captions.astype(np.int32))
    return (ref, ours_torch, ours_jax), (rel_err(logits, t), rel_err(logits, np.asarray(f)))


def test_hf_gpt2_decoder_logits_equal_gpt2lmheadmodel(tmp_path):
    _assert_within({"logits": _decoder_errors(tmp_path, TINY_GPT2)})


def test_hf_vision_encoder_decoder_greedy_generate_equals_ours_token_for_token(tmp_path):
    (ref, ours_torch, ours_jax), errors = _generation(tmp_path, TINY_VIT_ENCODER, TINY_GPT2)
    eos = int(json.loads((tmp_path / "imported" / "config.json").read_text())["kwargs"]["text_decoder"]["kwargs"]["eos_token_id"])
    assert (ref[0, 1:] == eos).any() and len(set(ref[:, 1:].ravel().tolist())) > 2, ref   # not a trivial decode
    np.testing.assert_array_equal(ours_torch, ref)
    np.testing.assert_array_equal(ours_jax, ref)
    _assert_within({"logits": errors})


def test_hf_gpt2_untied_head_or_no_cross_attention_is_refused(tmp_path):
    _hf_gpt2(str(tmp_path / "tied"), **TINY_GPT2)
    state = bridge.load_safetensors(tmp_path / "tied" / "model.safetensors")
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1.0
    bridge.save_safetensors(state, tmp_path / "tied" / "model.safetensors")
    with pytest.raises(ImportMismatchError, match="lm_head.weight differs from transformer.wte.weight"):
        import_checkpoint("hf", "GPT2LMHeadModel", tmp_path / "tied")
    transformers = need("transformers")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_GPT2)).save_pretrained(tmp_path / "plain")
    with pytest.raises(ImportMismatchError) as e:
        import_checkpoint("hf", "GPT2LMHeadModel", tmp_path / "plain")
    assert "add_cross_attention=False" in str(e.value) and "has no cross-attention" in str(e.value)


FULL_GPT2 = dict(bos_token_id=50256, eos_token_id=50256)   # GPT-2 small's sizes (transformers' defaults)
FULL_VIT_ENCODER = dict(image_size=224, patch_size=16)     # ViT-B/16


@pytest.mark.slow
def test_full_size_hf_gpt2_decoder_logits(tmp_path):
    errors = _decoder_errors(tmp_path, {**FULL_GPT2, "vocab_size": 50257, "n_embd": 768}, batch_size=1, length=8,
                             image_tokens=197)
    print(f"GPT2LMHeadModel: logits torch {errors[0]:.1e} Flax {errors[1]:.1e}")
    _assert_within({"logits": errors})


@pytest.mark.slow
def test_full_size_hf_vision_encoder_decoder_generate(tmp_path):
    """At transformers' own initial spread (0.02): the tiny test's 0.2 makes 24 full-size layers
    chaotic (float32 rounding alone moves the logits by several per cent)."""
    (ref, ours_torch, ours_jax), errors = _generation(
        tmp_path, FULL_VIT_ENCODER, {**FULL_GPT2, "vocab_size": 50257}, n_images=2, max_length=5,
        initializer_range=0.02)
    print(f"VisionEncoderDecoderModel: logits torch {errors[0]:.1e} Flax {errors[1]:.1e}; tokens {ref.tolist()}")
    np.testing.assert_array_equal(ours_torch, ref)
    np.testing.assert_array_equal(ours_jax, ref)
    _assert_within({"logits": errors})
