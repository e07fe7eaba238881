"""Parity of the fusion family (cross-modal attention, co-attention fusion, VQA): forward, every
gradient leaf and 20 AdamW steps; the source's state dicts; padding; errors on bad input."""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

import bridge
import jax_models
import torch_reference
from jax_models import fusion as jf
from parity_tests import harness, source_multimodal
from twin_models.presets import get_preset, with_overrides
from torch_reference import fusion as tf

# Tiny towers: the text tower is narrower than the fusion (text_projection), the image tower not.
TINY = dict(image_size=16, patch_size=4, vision_width=32, vision_layers=1, vision_heads=2, text_width=24,
            text_layers=1, text_heads=2, dim=32, fusion_layers=2, fusion_heads=4, mlp_ratio=2)


def nhwc(x: torch.Tensor):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def questions(rs, batch, length, vocab_size, min_len=3):
    """(B, length) int64 rows [sot, words..., eot, 0...] of random real lengths."""
    q = np.zeros((batch, length), np.int64)
    for row in q:
        n = rs.randint(min_len, length + 1)
        row[:n] = rs.randint(2, vocab_size - 2, n)
        row[0], row[n - 1] = vocab_size - 2, vocab_size - 1
    return q


def vqa_batches(preset, n, batch, seed):
    rs = np.random.RandomState(seed)
    k = preset.kwargs
    tb, fb = [], []
    for _ in range(n):
        x = rs.standard_normal((batch, *preset.input_shape_nchw)).astype(np.float32)
        q = questions(rs, batch, k["context_length"], k["vocab_size"])
        y = rs.randint(0, k["num_answers"], batch)
        tb.append((torch.from_numpy(x), torch.from_numpy(q), torch.from_numpy(y)))
        fb.append((jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(q, jnp.int32), jnp.asarray(y)))
    return tb, fb


def tiny_preset(**overrides):
    preset = with_overrides(get_preset("vqa-scenes"), **{**TINY, **overrides})
    return dataclasses.replace(preset, image_size=preset.kwargs["image_size"])


def vqa_twins(batch=4, seed=0, **overrides):
    preset = tiny_preset(**overrides)
    torch.manual_seed(seed)
    tm = torch_reference.create_model(preset)
    fm = jax_models.create_model(preset)
    tb, fb = vqa_batches(preset, 1, batch, seed)
    variables = bridge.torch_to_flax(tm.state_dict(), fm, *fb[0][:2])
    return preset, tm, fm, variables, tb[0], fb[0]


def vqa_losses(fm):
    def torch_loss(model, batch):
        x, q, y = batch
        return F.cross_entropy(model(x, q), y)

    def flax_loss(params, variables, batch):
        x, q, y = batch
        logits = fm.apply({**variables, "params": params}, x, q)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return torch_loss, flax_loss


def regression_losses(fm, n_inputs):
    """Mean squared error of every output against a fixed target: a batch is the model's
    `n_inputs` inputs followed by one target per output."""

    def torch_loss(model, batch):
        outs = model(*batch[:n_inputs])
        outs = outs if isinstance(outs, tuple) else (outs,)
        return sum(F.mse_loss(o, t) for o, t in zip(outs, batch[n_inputs:]))

    def flax_loss(params, variables, batch):
        outs = fm.apply({**variables, "params": params}, *batch[:n_inputs])
        outs = outs if isinstance(outs, tuple) else (outs,)
        return sum(jnp.mean((o - t) ** 2) for o, t in zip(outs, batch[n_inputs:]))

    return torch_loss, flax_loss


def jitted(fm):
    """`fm` with a compiled `apply`: one compile instead of one per operation at new shapes."""
    return types.SimpleNamespace(apply=jax.jit(fm.apply))


def dtype_name(float64: bool) -> str:
    return "float64" if float64 else "float32"


def check_gradients(name, tm, fm, variables, losses, tbatch, fbatch):
    """Every leaf within GRAD_TOL of torch; the key biases of `CrossModalAttention`, whose true
    gradient is 0, within 1% of it against the largest gradient (`harness.ZERO_GRADIENT`)."""
    harness.check_gradients(tm, fm, variables, losses, tbatch, fbatch, name)


# --- CrossModalAttention -----------------------------------------------------------------------


def cross_batches(n, seed, dim=16, nq=5, nk=7, padded=True):
    rs = np.random.RandomState(seed)
    tb, fb = [], []
    for _ in range(n):
        q = rs.standard_normal((3, nq, dim)).astype(np.float32)
        kv = rs.standard_normal((3, nk, dim)).astype(np.float32)
        pad = np.zeros((3, nk), bool)
        if padded:
            pad[0, 4:], pad[2, 1:] = True, True
        target = rs.standard_normal((3, nq, dim)).astype(np.float32)
        tb.append(tuple(map(torch.from_numpy, (q, kv, pad, target))))
        fb.append(tuple(map(jnp.asarray, (q, kv, pad, target))))
    return tb, fb


def cross_twins(seed=0):
    torch.manual_seed(seed)
    tm, fm = tf.CrossModalAttention(16, num_heads=4), jf.CrossModalAttention(16, num_heads=4)
    tb, fb = cross_batches(4, seed)
    return tm, fm, bridge.torch_to_flax(tm.state_dict(), fm, *fb[0][:3]), tb, fb


def test_cross_modal_attention_forward_and_gradients():
    tm, fm, variables, tb, fb = cross_twins()
    err = harness.forward_error(tm, jitted(fm), variables, tb[0][:3], fb[0][:3])
    print(f"CrossModalAttention: forward rel err {err:.2e}")
    assert err <= harness.FORWARD_TOL
    check_gradients("CrossModalAttention", tm, fm, variables, regression_losses(fm, 3), tb[0], fb[0])
    assert set(tm.state_dict()) == {f"{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")}


@pytest.mark.parametrize("float64", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["float32", "float64"])
def test_cross_modal_attention_adamw_trajectory(float64):
    tm, fm, variables, tb, fb = cross_twins()
    harness.check_trajectory(tm, fm, variables, regression_losses(fm, 3), tb * 5, fb * 5,
                             f"CrossModalAttention ({dtype_name(float64)})", lr=1e-3, weight_decay=0.05,
                             float64=float64, falls=True)


def test_cross_modal_attention_blocks_padded_keys():
    """Keys marked as padding change nothing, in both frameworks; without the mask they do."""
    tm, fm, variables, tb, fb = cross_twins()
    q, kv, pad = tb[0][:3]
    noisy = kv.clone()
    noisy[pad] = 100.0
    with torch.no_grad():
        np.testing.assert_allclose(tm(q, noisy, pad).numpy(), tm(q, kv, pad).numpy(), rtol=0, atol=1e-6)
        assert not np.allclose(tm(q, noisy).numpy(), tm(q, kv).numpy(), atol=1e-3)
    f = lambda kv_: np.asarray(jax.jit(fm.apply)(variables, jnp.asarray(q.numpy()), jnp.asarray(kv_.numpy()),
                                        jnp.asarray(pad.numpy())))
    np.testing.assert_allclose(f(noisy), f(kv), rtol=0, atol=1e-6)


# --- MultimodalFusion --------------------------------------------------------------------------


def fusion_batches(n, seed, dim=32, lt=6, li=9, padded=True):
    rs = np.random.RandomState(seed)
    tb, fb = [], []
    for _ in range(n):
        t = rs.standard_normal((3, lt, dim)).astype(np.float32)
        i = rs.standard_normal((3, li, dim)).astype(np.float32)
        pad = np.zeros((3, lt), bool)
        if padded:
            pad[0, 3:], pad[1, 5:] = True, True
        targets = (rs.standard_normal((3, lt, dim)).astype(np.float32),
                   rs.standard_normal((3, li, dim)).astype(np.float32))
        batch = (t, i, pad, *targets) if padded else (t, i, *targets)
        tb.append(tuple(map(torch.from_numpy, batch)))
        fb.append(tuple(map(jnp.asarray, batch)))
    return tb, fb


def fusion_twins(padded, seed=0, **kw):
    kw = {"dim": 32, "num_layers": 2, "num_heads": 4, **kw}
    torch.manual_seed(seed)
    tm, fm = tf.MultimodalFusion(**kw), jf.MultimodalFusion(**kw)
    tb, fb = fusion_batches(4, seed, dim=kw["dim"], padded=padded)
    return tm, fm, bridge.torch_to_flax(tm.state_dict(), fm, *fb[0][:2 + padded]), tb, fb


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_fusion_forward_and_gradients(padded):
    tm, fm, variables, tb, fb = fusion_twins(padded)
    err = harness.forward_error(tm, jitted(fm), variables, tb[0][:2 + padded], fb[0][:2 + padded])
    print(f"MultimodalFusion ({'padded' if padded else 'unpadded'}): forward rel err {err:.2e}")
    assert err <= harness.FORWARD_TOL
    check_gradients(f"MultimodalFusion ({'padded' if padded else 'unpadded'})", tm, fm, variables,
                    regression_losses(fm, 2 + padded), tb[0], fb[0])


@pytest.mark.slow
@pytest.mark.parametrize("float64", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_fusion_adamw_trajectory(padded, float64):
    tm, fm, variables, tb, fb = fusion_twins(padded)
    harness.check_trajectory(tm, fm, variables, regression_losses(fm, 2 + padded), tb * 5, fb * 5,
                             f"MultimodalFusion ({'padded' if padded else 'unpadded'}, {dtype_name(float64)})",
                             lr=1e-3, weight_decay=0.05, float64=float64, falls=True)


def test_fusion_never_attends_to_padded_text():
    """Garbage in the padded text positions leaves every real text output and every image output
    unchanged, in both frameworks (text_self and image_to_text block them)."""
    tm, fm, variables, tb, _ = fusion_twins(True)
    t, i, pad = tb[0][:3]
    noisy = t.clone()
    noisy[pad] = 50.0
    tm.eval()
    with torch.no_grad():
        (a_t, a_i), (b_t, b_i) = tm(t, i, pad), tm(noisy, i, pad)
    np.testing.assert_allclose(b_t[~pad].numpy(), a_t[~pad].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(b_i.numpy(), a_i.numpy(), rtol=0, atol=1e-5)
    apply = jax.jit(fm.apply)
    (f_t, f_i), (g_t, g_i) = (apply(variables, jnp.asarray(x.numpy()), jnp.asarray(i.numpy()),
                                       jnp.asarray(pad.numpy())) for x in (t, noisy))
    np.testing.assert_allclose(np.asarray(g_t)[~pad.numpy()], np.asarray(f_t)[~pad.numpy()], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_i), np.asarray(f_i), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_fusion_dropout_keeps_keys_and_runs_only_in_training():
    base = tf.MultimodalFusion(32, 2, 4)
    drop = tf.MultimodalFusion(32, 2, 4, dropout=0.3)
    assert set(base.state_dict()) == set(drop.state_dict())
    assert {"layers.1.text_ffn.0.weight", "layers.1.text_ffn.2.weight", "layers.0.image_self.in_proj_weight",
            "layers.0.image_to_text.o_proj.bias"} <= set(base.state_dict())
    _, _, _, _, fb = fusion_twins(True)
    t, i, pad = fb[0][:3]
    fm = jf.MultimodalFusion(32, 2, 4, dropout=0.3)
    variables = fm.init(jax.random.key(0), t, i, pad)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
        jf.MultimodalFusion(32, 2, 4).init(jax.random.key(0), t, i, pad))
    np.testing.assert_array_equal(fm.apply(variables, t, i, pad)[0], fm.apply(variables, t, i, pad)[0])
    a = fm.apply(variables, t, i, pad, train=True, rngs={"dropout": jax.random.key(1)})[0]
    assert not np.allclose(a, fm.apply(variables, t, i, pad)[0])


def test_source_fusion_state_dicts_load_strictly():
    """The source's CrossModalAttention and MultimodalFusion (8 heads, 2 layers at width 32): their
    state dicts load into ours with strict=True and into the Flax twins by rule; same outputs."""
    torch.manual_seed(0)
    tb, fb = fusion_batches(1, 3, padded=False)
    t, i = tb[0][:2]
    src = source_multimodal.MultimodalFusion(dim=32, num_layers=2).eval()
    ours = tf.MultimodalFusion(dim=32, num_layers=2).eval()
    ours.load_state_dict(src.state_dict(), strict=True)
    with torch.no_grad():
        ref, got = src(t, i), ours(t, i)
    errs = [harness.rel_err(r.numpy(), g.numpy()) for r, g in zip(ref, got)]
    fm = jf.MultimodalFusion(dim=32, num_layers=2)
    variables = bridge.torch_to_flax(src.state_dict(), fm, *fb[0][:2])
    flax_errs = [harness.rel_err(r.numpy(), g) for r, g in zip(ref, jax.jit(fm.apply)(variables, *fb[0][:2]))]
    print(f"source MultimodalFusion: torch twin {max(errs):.2e}, Flax twin {max(flax_errs):.2e}")
    assert max(errs) <= 1e-6 and max(flax_errs) <= harness.FORWARD_TOL

    src = source_multimodal.CrossModalAttention(32).eval()
    ours = tf.CrossModalAttention(32).eval()
    ours.load_state_dict(src.state_dict(), strict=True)
    with torch.no_grad():
        ref, got = src(t, i).numpy(), ours(t, i).numpy()
    fm = jf.CrossModalAttention(32)
    flax_got = jax.jit(fm.apply)(bridge.torch_to_flax(src.state_dict(), fm, *fb[0][:2]), *fb[0][:2])
    print(f"source CrossModalAttention: torch twin {harness.rel_err(ref, got):.2e}, "
          f"Flax twin {harness.rel_err(ref, flax_got):.2e}")
    assert harness.rel_err(ref, got) <= 1e-6 and harness.rel_err(ref, flax_got) <= harness.FORWARD_TOL


class _ViTTokens(torch_reference.vit.VisionTransformer):
    """The image encoder as the source's VQAModel calls it: `encoder(image)` gives the tokens."""

    def forward(self, x, return_tokens=True):
        return super().forward(x, return_tokens=True)


class _TextTokens(torch_reference.clip.TextTransformer):
    def forward(self, text, return_tokens=True):
        return super().forward(text, return_tokens=True)


def test_source_vqa_state_dict_loads_but_for_its_classifier(monkeypatch):
    """The source's VQAModel (fusion width 768, one fusion layer here instead of its six, to keep
    the test small: the layers are copies): every key but the classifier's loads into ours with the
    same shape; its classifier (768 -> answers) cannot take the 1536 pooled features, ours does.
    The encoders and fusion give the same pooled features, and the Flax twin the same logits."""
    monkeypatch.setattr(source_multimodal, "MultimodalFusion",
                        functools.partial(source_multimodal.MultimodalFusion, num_layers=1))
    torch.manual_seed(0)
    image = _ViTTokens(16, 8, 3, 0, 768, 1, 12, 1, 0.0)
    text = _TextTokens(20, 8, 768, 1, 12, 1)
    src = source_multimodal.VQAModel(image, text, num_answers=7).eval()
    ours = tf.VQAModel(image, text, num_answers=7, num_layers=1).eval()
    sd = src.state_dict()
    assert not any(k.startswith(("image_projection", "text_projection")) for k in ours.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch for classifier.weight"):
        ours.load_state_dict(sd, strict=True)
    assert set(sd) == set(ours.state_dict())
    ours.load_state_dict({k: v for k, v in sd.items() if not k.startswith("classifier.")}, strict=False)

    x = torch.randn(2, 3, 16, 16)
    q = torch.randint(2, 18, (2, 8))
    q[:, 0], q[:, -1] = 18, 19                          # no padding: the source has no mask
    pooled = {}
    src.classifier.register_forward_pre_hook(lambda m, a: pooled.update(src=a[0]))
    ours.classifier.register_forward_pre_hook(lambda m, a: pooled.update(ours=a[0]))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="768"):
            src(x, q)
        logits = ours(x, q).numpy()
    assert pooled["src"].shape == (2, 1536)
    err = harness.rel_err(pooled["src"].numpy(), pooled["ours"].numpy())
    fm = jf.VQAModel(jax_models.vit.VisionTransformer(16, 8, 3, 0, 768, 1, 12, 1, 0.0, parent=None),
                     jax_models.clip.TextTransformer(20, 8, 768, 1, 12, 1, parent=None), num_answers=7,
                     num_layers=1)
    variables = bridge.torch_to_flax(ours.state_dict(), fm, nhwc(x), jnp.asarray(q.numpy(), jnp.int32))
    flax_logits = jax.jit(fm.apply)(variables, nhwc(x), jnp.asarray(q.numpy(), jnp.int32))
    flax_err = harness.rel_err(logits, flax_logits)
    print(f"source VQAModel: pooled features torch twin {err:.2e}; logits Flax twin {flax_err:.2e}")
    assert err <= 1e-6 and flax_err <= harness.FORWARD_TOL


# --- VQAModel ----------------------------------------------------------------------------------


def test_vqa_forward_and_gradients():
    _, tm, fm, variables, tbatch, fbatch = vqa_twins()
    assert "text_projection.weight" in tm.state_dict() and "image_projection.weight" not in tm.state_dict()
    assert tm.classifier.in_features == 2 * TINY["dim"]
    err = harness.forward_error(tm, jitted(fm), variables, tbatch[:2], fbatch[:2])
    print(f"VQAModel (tiny towers): forward rel err {err:.2e}")
    assert err <= harness.FORWARD_TOL
    check_gradients("VQAModel (tiny towers)", tm, fm, variables, vqa_losses(fm), tbatch, fbatch)


@pytest.mark.slow
@pytest.mark.parametrize("float64", [False, True], ids=["float32", "float64"])
def test_vqa_adamw_trajectory(float64):
    preset, tm, fm, variables, _, _ = vqa_twins()
    tb, fb = vqa_batches(preset, 4, 8, seed=1)
    harness.check_trajectory(tm, fm, variables, vqa_losses(fm), tb * 5, fb * 5,
                             f"VQAModel (tiny towers, {dtype_name(float64)})", lr=1e-3, weight_decay=0.05,
                             float64=float64, falls=True)


def test_vqa_padding_invariance():
    """A question padded to the full context and the same question cut after its end-of-text
    token give the same logits, in both frameworks."""
    preset, tm, fm, variables, (x, _, _), (xf, _, _) = vqa_twins(batch=2)
    V = preset.kwargs["vocab_size"]
    short = np.array([[V - 2, 5, 9, 4, V - 1], [V - 2, 7, V - 1, 0, 0]])
    full = np.zeros((2, preset.kwargs["context_length"]), np.int64)
    full[:, :5] = short
    tm.eval()
    with torch.no_grad():
        a, b = tm(x, torch.from_numpy(short)).numpy(), tm(x, torch.from_numpy(full)).numpy()
    apply = jax.jit(fm.apply)
    f = lambda q: np.asarray(apply(variables, xf, jnp.asarray(q, jnp.int32)))
    fa, fb = f(short), f(full)
    errs = harness.rel_err(a, b), harness.rel_err(fa, fb), harness.rel_err(a, fa)
    print(f"VQAModel padding invariance: torch {errs[0]:.2e}, Flax {errs[1]:.2e}; torch vs Flax {errs[2]:.2e}")
    assert max(errs) <= harness.FORWARD_TOL
    with torch.no_grad():                               # not pooling over padding is what makes it so
        unmasked = tm.classifier(torch.cat([tm.fusion(tm.text_projection(tm.text_encoder(
            torch.from_numpy(full), return_tokens=True)), tm.image_encoder(x, return_tokens=True))[0].mean(1),
            torch.zeros(2, TINY["dim"])], -1))
    assert not np.allclose(unmasked.numpy(), b, atol=1e-3)


def test_vqa_rejects_bad_input():
    preset, tm, fm, variables, (x, q, _), (xf, qf, _) = vqa_twins(batch=2)
    long_t, long_f = torch.zeros(2, 20, dtype=torch.long), jnp.zeros((2, 20), jnp.int32)
    expect = r"expects \(B, L <= 16\) integer token ids; got .* of shape \(2, 20\)"
    with pytest.raises(ValueError, match=expect):
        tm(x, long_t)
    with pytest.raises(ValueError, match=expect):
        fm.apply(variables, xf, long_f)
    with pytest.raises(ValueError, match=r"expects \(B, 3, 16, 16\) .* got shape \(2, 3, 32, 32\)"):
        tm(torch.zeros(2, 3, 32, 32), q)
    with pytest.raises(ValueError, match=r"expects \(B, 16, 16, 3\) .* got shape \(2, 32, 32, 3\)"):
        fm.apply(variables, jnp.zeros((2, 32, 32, 3)), qf)


def test_vqa_state_dict_of_another_fusion_width_is_refused():
    """Weights of a model with fusion width 48 do not fit one of width 32: the error names them."""
    _, _, fm, _, _, (xf, qf, _) = vqa_twins(batch=2)
    other = torch_reference.create_model(tiny_preset(dim=48))
    with pytest.raises(bridge.WeightMismatchError) as info:
        bridge.torch_to_flax(other.state_dict(), fm, xf, qf)
    msg = str(info.value)
    assert "Unexpected key(s): image_projection.weight, image_projection.bias" in msg
    assert ("fusion.layers.1.text_ffn.2.weight: torch (48, 96) gives fusion/layers_1/text_ffn/2/kernel (96, 48), "
            "the Flax model has (64, 32)") in msg
    assert ("fusion.layers.0.text_self.in_proj_weight: torch (144, 48) gives "
            "fusion/layers_0/text_self/query/kernel (48, 48), the Flax model has (32, 32)") in msg
    assert "classifier.weight: torch (12, 96) gives classifier/kernel (96, 12), the Flax model has (64, 12)" in msg


def test_vqa_round_trip_is_bit_exact():
    _, tm, _, variables, _, _ = vqa_twins()
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    back = bridge.flax_to_torch(variables)
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
