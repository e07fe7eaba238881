"""Parity of the two ViT variants: forward, gradients, an AdamW trajectory, and the bridge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bridge
import jax
import jax.numpy as jnp
import jax_models
import jax_models.layers
import torch_reference
from bridge.verify import build_twins
from parity_tests import harness, source_architectures, source_multimodal
from parity_tests.cases import first_small_of_each_model
from twin_models.presets import get_preset, with_overrides

# One small preset of each ViT class (VisionTransformer, EncoderViT).
TINY = first_small_of_each_model("vit")


def twins(name, batch_size=2, seed=0, **overrides):
    """(preset, torch model, Flax model, Flax variables, torch images, Flax images)."""
    preset = with_overrides(get_preset(name), **overrides)
    tm, fm, variables, (xt,), (xf,) = build_twins(preset, seed, batch_size=batch_size)
    return preset, tm, fm, variables, xt, xf


@pytest.mark.parametrize("name", TINY)
def test_pooled_features(name):
    """num_classes=0: the pooled class-token feature, width embed_dim (the CLIP image tower)."""
    preset, tm, fm, variables, xt, xf = twins(name, num_classes=0)
    assert tm.embed_dim == fm.embed_dim == preset.kwargs["embed_dim"]
    assert not any(k.startswith("head") for k in tm.state_dict())
    assert fm.apply(variables, xf).shape == (2, preset.kwargs["embed_dim"])
    harness.check_forward(tm, fm, variables, [xt], [xf], f"{name} pooled")


@pytest.mark.parametrize("name", TINY)
def test_return_tokens(name):
    """return_tokens=True: every token after the encoder, (B, 1 + patches, embed_dim), the class
    token first (what the classifier pools), equal in both frameworks."""
    preset, tm, fm, variables, xt, xf = twins(name, dropout=0.0)
    tm.eval()
    with torch.no_grad():
        ref, logits = tm(xt, return_tokens=True).numpy(), tm(xt)
    got = np.asarray(fm.apply(variables, xf, return_tokens=True))
    k = preset.kwargs
    assert got.shape == ref.shape == (2, 1 + (32 // k["patch_size"]) ** 2, k["embed_dim"])
    assert harness.rel_err(ref, got) <= harness.FORWARD_TOL
    head = {"params": variables["params"]["head"]}
    import flax.linen as nn
    assert harness.rel_err(logits.numpy(), nn.Dense(k["num_classes"]).apply(head, got[:, 0])) <= harness.FORWARD_TOL


def test_source_state_dicts_load_strictly():
    """State dicts saved by the sources' own classes load with strict=True and give the same outputs."""
    x = torch.randn(2, 1, 32, 32)
    src = source_architectures.VisionTransformer(image_size=32, patch_size=4, in_channels=1, num_classes=10,
                                       embed_dim=64, depth=2, num_heads=4, mlp_ratio=2).eval()
    ours = torch_reference.create_model("vit-digits", depth=2, patch_size=4).eval()
    ours.load_state_dict(src.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), src(x), rtol=0, atol=0)

    x3 = torch.randn(2, 3, 32, 32)
    src = source_multimodal.VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=64,
                                       depth=2, num_heads=4).eval()
    ours = torch_reference.create_model("encoder-vit-digits", depth=2, in_channels=3, patch_size=4).eval()
    ours.load_state_dict(src.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x3), src(x3), rtol=0, atol=0)


def test_converter_names_every_broken_key():
    _, tm, fm, _, _, xf = twins("vit-digits")
    sd = dict(tm.state_dict())
    del sd["blocks.1.attn.qkv.weight"]
    sd["blocks.0.attn.extra"] = torch.zeros(3)
    sd["head.weight"] = torch.zeros(7, 64)
    with pytest.raises(bridge.WeightMismatchError) as info:
        bridge.torch_to_flax(sd, fm, xf)
    msg = str(info.value)
    assert "Missing key(s): params:blocks_1/attn/qkv/kernel" in msg
    assert "Unexpected key(s): blocks.0.attn.extra" in msg
    assert "head.weight: torch (7, 64)" in msg and "the Flax model has (64, 10)" in msg


@pytest.mark.parametrize("shape, expect", [
    ((2, 28, 28, 1), "got shape (2, 28, 28, 1)"),
    ((2, 32, 32, 3), "got shape (2, 32, 32, 3)"),
    ((2, 1, 32, 32), "NCHW input? Flax models take NHWC"),
    ((32, 32, 1), "got a rank-3 array"),
])
@pytest.mark.parametrize("name", TINY)
def test_flax_rejects_wrong_images(name, shape, expect):
    fm = jax_models.create_model(name)
    variables = fm.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="expects \\(B, 32, 32, 1\\) floating-point images \\(NHWC\\)") as info:
        fm.apply(variables, jnp.zeros(shape))
    assert expect in str(info.value)


def test_flax_and_torch_reject_integer_images():
    fm = jax_models.create_model("vit-digits")
    variables = fm.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="got dtype int32"):
        fm.apply(variables, jnp.zeros((1, 32, 32, 1), jnp.int32))
    with pytest.raises(ValueError, match="expects \\(B, 1, 32, 32\\) .* got dtype torch.uint8"):
        torch_reference.create_model("vit-digits")(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))


def test_dropout_only_in_training_with_rng():
    fm = jax_models.create_model("vit-digits", dropout=0.5)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
    variables = fm.init(jax.random.key(0), x)
    np.testing.assert_array_equal(fm.apply(variables, x), fm.apply(variables, x, train=False))
    a = fm.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = fm.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    c = fm.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    with pytest.raises(Exception, match="dropout"):
        fm.apply(variables, x, train=True)


def test_training_dropout_statistics_match():
    """Dropout draws differ across frameworks, so compare their statistics: the share of attention
    weights dropped and the mean of the kept ones (scaled by 1/(1-p)) agree with each other."""
    p = 0.3
    _, tm, fm, variables, xt, xf = twins("vit-digits", batch_size=8, dropout=p)
    seen = {}
    tm.blocks[0].attn.dropout.register_forward_hook(lambda m, i, o: seen.update(t=o.detach().numpy()))
    tm.train()
    tm(xt)
    _, state = fm.apply(variables, xf, train=True, rngs={"dropout": jax.random.key(0)},
                        capture_intermediates=True, mutable=["intermediates"])
    f = np.asarray(state["intermediates"]["blocks_0"]["attn"]["dropout"]["__call__"][0])
    t = seen["t"]
    n = t.size
    sigma = np.sqrt(p * (1 - p) / n)
    for arr in (t, f):
        assert abs(np.mean(arr == 0) - p) < 5 * sigma
        assert abs(arr.sum(-1).mean() - 1.0) < 0.05  # rows of kept weights still sum to 1 on average


def test_safetensors_export_loads_into_torch(tmp_path):
    from safetensors.torch import load_file

    fm = jax_models.create_model("encoder-vit-digits")
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
    variables = fm.init(jax.random.key(0), x)
    path = tmp_path / "w.safetensors"
    bridge.save_safetensors(bridge.flax_to_torch(variables), path)
    tm = torch_reference.create_model("encoder-vit-digits").eval()
    tm.load_state_dict(load_file(path), strict=True)
    with torch.no_grad():
        ref = tm(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2))).numpy()
    assert harness.rel_err(ref, fm.apply(variables, x)) <= harness.FORWARD_TOL
    assert set(bridge.load_safetensors(path)) == set(tm.state_dict())


class _PickledConfig:
    """An arbitrary object: unpickling it would run code from the file."""


def test_damaged_or_unsafe_weight_files_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        bridge.load_safetensors(bad)
    pickled = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "config": _PickledConfig()}, pickled)
    with pytest.raises(ValueError, match="weights_only=True"):
        bridge.load_state_dict(pickled)
    good = tmp_path / "good.pt"
    torch.save(torch_reference.create_model("vit-digits").state_dict(), good)
    assert "head.weight" in bridge.load_state_dict(good)


def test_verify_names_the_first_divergent_layer(monkeypatch, capsys):
    """A twin with a wrong GELU (flax's tanh default, a classic trap) fails at the first MLP."""
    import flax.linen as nn

    from bridge.__main__ import main

    monkeypatch.setattr(jax_models.layers, "gelu", lambda x: nn.gelu(x, approximate=True))
    assert main(["verify", "vit-digits"]) == 1
    out = capsys.readouterr().out
    assert "first layer over tolerance: blocks.0.mlp.3" in out
    assert "FAIL" in out


def test_verify_finds_a_perturbed_weight():
    from bridge.verify import build_twins, compare_layers

    tm, fm, variables, t_in, f_in = build_twins(get_preset("encoder-vit-digits"))
    bias = variables["params"]["transformer"]["layers_2"]["linear1"]["bias"]
    variables["params"]["transformer"]["layers_2"]["linear1"]["bias"] = bias.at[0].add(0.05)
    report = compare_layers(tm, fm, variables, t_in, f_in)
    assert report.first_divergent.path == "transformer.layers.2.linear1"
    assert all(not d.over for d in report.layers[:[d.path for d in report.layers].index(
        "transformer.layers.2.linear1")])


def test_verify_bf16_reports_the_drift_of_each_backend(capsys):
    """--precision bf16: per layer, each backend's bfloat16 against its own float32 and the two
    bfloat16 runs against each other; all finite, of bfloat16's order (~1e-2), not zero."""
    from bridge.__main__ import main
    from bridge.verify import bf16_drift

    assert main(["verify", "vit-digits", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "torch bf16" in out and "flax-torch" in out and "bf16 output:" in out
    tm, fm, variables, t_in, f_in = build_twins(get_preset("vit-digits"))
    report = bf16_drift(tm, fm, variables, t_in, f_in)
    assert report.finite and [r.path for r in report.rows][-1] == "<output>"
    assert "blocks.0.mlp.0" in [r.path for r in report.rows]
    o = report.output
    print(f"vit-digits bf16 output drift: torch {o.torch:.2e}, flax {o.flax:.2e}, between {o.between:.2e}")
    assert 0 < o.torch < 5e-2 and 0 < o.flax < 5e-2 and 0 < o.between < 5e-2


def test_sincos_2d_rows_are_alike_as_their_patches_are_near():
    """The sine-cosine table's row similarity falls with the distance between two patches along
    each axis, and a width not divisible by 4 is refused."""
    from twin_models.model_math import sincos_2d

    grid = 4
    table = sincos_2d(grid, 64)
    assert table.shape == (grid * grid, 64) and table.dtype == np.float32
    row = lambda y, x: table[y * grid + x]  # noqa: E731
    along_x = [row(1, 0) @ row(1, x) for x in range(grid)]
    along_y = [row(0, 2) @ row(y, 2) for y in range(grid)]
    assert all(a > b for a, b in zip(along_x, along_x[1:])), along_x
    assert all(a > b for a, b in zip(along_y, along_y[1:])), along_y
    with pytest.raises(ValueError, match="divisible by 4; got 30"):
        sincos_2d(grid, 30)


def test_sincos2d_position_init_is_the_same_table_in_both_twins():
    """pos_embed_init="sincos2d": both twins start from the same table, scaled to pos_embed_std,
    the class token's row zero; any other kind is refused by the preset check."""
    preset = with_overrides(get_preset("vit-digits"), pos_embed_init="sincos2d", pos_embed_std=0.5)
    tm = torch_reference.create_model(preset)
    fm = jax_models.create_model(preset)
    variables = fm.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    ours, theirs = np.asarray(variables["params"]["pos_embed"]), tm.pos_embed.detach().numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert not ours[0, 0].any() and ours.shape == (1, 17, preset.kwargs["embed_dim"])
    assert abs(ours[0, 1:].std() - 0.5) < 1e-6
    with pytest.raises(ValueError, match="pos_embed_init='learned': pos_embed_init must be one of 'normal', 'sincos2d'"):
        with_overrides(get_preset("vit-digits"), pos_embed_init="learned")
