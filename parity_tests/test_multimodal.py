"""Parity of the first source's multimodal transformer and its VQA classifier: forward, every
gradient leaf and 20 AdamW steps with a text mask; the source's state dicts; padding; bad input."""

from __future__ import annotations

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
from jax_models import multimodal as jm
from parity_tests import harness, source_architectures
from twin_models.presets import get_preset, with_overrides
from torch_reference import multimodal as tm_

KW = dict(dim=32, num_heads=4, num_layers=2, vocab_size=20, max_seq_len=8, image_size=16, patch_size=4,
          in_channels=3, dropout=0.0)
UNUSED = ("cross_attn", "norm3")  # the source builds them and never calls them


def batches(n, seed, batch=3, masked=True, L=8, vocab=20):
    """(text ids, NCHW image[, text mask], target) with rows of random real lengths."""
    rs = np.random.RandomState(seed)
    tb, fb = [], []
    for _ in range(n):
        ids = rs.randint(1, vocab, (batch, L)).astype(np.int64)
        lengths = rs.randint(2, L + 1, batch)
        lengths[0] = L
        mask = np.arange(L)[None] < lengths[:, None]
        ids[~mask] = 0
        x = rs.standard_normal((batch, 3, 16, 16)).astype(np.float32)
        target = rs.standard_normal((batch, L + 16, KW["dim"])).astype(np.float32)
        t = (torch.from_numpy(ids), torch.from_numpy(x), *([torch.from_numpy(mask)] if masked else []),
             torch.from_numpy(target))
        f = (jnp.asarray(ids, jnp.int32), jnp.asarray(x.transpose(0, 2, 3, 1)),
             *([jnp.asarray(mask)] if masked else []), jnp.asarray(target))
        tb.append(t)
        fb.append(f)
    return tb, fb


def twins(seed=0, masked=True, **kw):
    kw = {**KW, **kw}
    torch.manual_seed(seed)
    tm, fm = tm_.MultimodalTransformer(**kw), jm.MultimodalTransformer(**kw)
    tb, fb = batches(4, seed, masked=masked)
    return tm, fm, bridge.torch_to_flax(tm.state_dict(), fm, *fb[0][:-1]), tb, fb


def losses(fm, real_only=True):
    """Mean squared error against the target at the real tokens (text mask and every patch)."""

    def keep_t(batch):
        return torch.cat([batch[2], torch.ones(batch[2].shape[0], 16, dtype=torch.bool)], 1)[..., None]

    def torch_loss(model, batch):
        out = model(*batch[:-1])
        return ((out - batch[-1]) ** 2 * keep_t(batch)).mean()

    def flax_loss(params, variables, batch):
        out = fm.apply({**variables, "params": params}, *batch[:-1])
        keep = jnp.concatenate([batch[2], jnp.ones((batch[2].shape[0], 16), bool)], 1)[..., None]
        return ((out - batch[-1]) ** 2 * keep).mean()

    return torch_loss, flax_loss


def jitted(fm):
    """`fm` with a compiled `apply`: one compile instead of one per operation at new shapes."""
    return types.SimpleNamespace(apply=jax.jit(fm.apply))


def torch_gradients(model, loss, batch):
    """Gradients of every parameter; None (never used) as zeros."""
    model.train()
    model.zero_grad()
    loss(model, batch).backward()
    return {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
            for k, p in model.named_parameters()}


@pytest.mark.parametrize("cross_attention,norm_first", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["source", "cross_attention", "norm_first", "cross_attention-norm_first"])
def test_forward_and_gradients_with_text_mask(cross_attention, norm_first):
    """With `cross_attention=False` (the source's layer) `cross_attn` and `norm3` get no gradient
    in torch (None) and exactly 0 in Flax; with it, every leaf is used and compared. The same with
    the norms before their sublayers (`norm_first`)."""
    tm, fm, variables, tb, fb = twins(cross_attention=cross_attention, norm_first=norm_first)
    name = (f"MultimodalTransformer ({'cross_attention' if cross_attention else 'source layer'}"
            f"{', norm_first' if norm_first else ''})")
    err = harness.forward_error(tm, jitted(fm), variables, tb[0][:-1], fb[0][:-1])
    print(f"{name}: forward rel err (text mask) {err:.2e}")
    assert err <= harness.FORWARD_TOL
    torch_loss, flax_loss = losses(fm)
    ref = torch_gradients(tm, torch_loss, tb[0])
    got = harness.flax_params_as_torch(jax.jit(jax.grad(flax_loss))(variables["params"], variables, fb[0]))
    assert set(ref) == set(got)
    unused = [] if cross_attention else [k for k in ref if any(f".{u}." in k for u in UNUSED)]
    for k in unused:
        assert not ref[k].any() and not got[k].any(), k
    errs = {k: harness.rel_err(ref[k], got[k]) for k in ref if k not in unused}
    worst = max(errs, key=errs.get)
    print(f"{name}: worst gradient {worst} {errs[worst]:.2e} ({len(errs)} leaves)")
    assert errs[worst] <= harness.GRAD_TOL, f"{name}: gradient of {worst} rel err {errs[worst]:.3e}"


def test_norm_first_puts_each_norm_before_its_sublayer():
    """`norm_first=True` computes x + self_attn(norm1(x)), then x + mlp(norm2(x)) with the same
    weights as the source's post-norm layer (whose output it then differs from)."""
    torch.manual_seed(0)
    layer = tm_.MultimodalTransformerLayer(32, 4, dropout=0.0, norm_first=True).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        h = layer.norm1(x)
        h = x + layer.self_attn(h, h, h, need_weights=False)[0]
        expected = h + layer.mlp(layer.norm2(h))
        got = layer(x)
        layer.norm_first = False
        post = layer(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got - post).abs().max() > 0.1


@pytest.mark.parametrize("float64", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["float32", "float64"])
def test_adamw_trajectory_with_text_mask(float64):
    """20 AdamW steps with `cross_attention=True`, so that every weight trains (the source's layer
    never uses `cross_attn`: both backends then decay it alone, `zero_unused_grads`)."""
    tm, fm, variables, tb, fb = twins(cross_attention=True)
    harness.check_trajectory(tm, fm, variables, losses(fm), tb * 5, fb * 5,
                             f"MultimodalTransformer ({'float64' if float64 else 'float32'})", lr=1e-3,
                             weight_decay=0.05, float64=float64, falls=True)


def test_padding_invariance():
    """The same texts padded to two lengths give the same outputs at the real positions (text and
    image), in both frameworks."""
    tm, fm, variables, tb, _ = twins()
    ids, x, mask = tb[0][:3]
    short = ids[:, :6].clone()
    short[0, 5] = 0
    short_mask = short != 0
    ids = torch.zeros_like(ids)
    ids[:, :6] = short
    mask = ids != 0
    tm.eval()
    with torch.no_grad():
        a, b = tm(short, x, short_mask), tm(ids, x, mask)
    nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    apply = jax.jit(fm.apply)
    fa, fb = (np.asarray(apply(variables, jnp.asarray(t.numpy(), jnp.int32), nhwc, jnp.asarray(m.numpy())))
              for t, m in ((short, short_mask), (ids, mask)))
    real = lambda out, m: np.concatenate([out[:, :m.shape[1]][m.numpy()],
                                          out[:, m.shape[1]:].reshape(-1, out.shape[-1])])
    errs = (harness.rel_err(real(a.numpy(), short_mask), real(b.numpy(), mask)),
            harness.rel_err(real(fa, short_mask), real(fb, mask)), harness.rel_err(a.numpy(), fa))
    print(f"MultimodalTransformer padding invariance: torch {errs[0]:.2e}, Flax {errs[1]:.2e}, "
          f"torch vs Flax {errs[2]:.2e}")
    assert max(errs) <= harness.FORWARD_TOL
    with torch.no_grad():
        unmasked = tm(ids, x)
    assert not np.allclose(real(unmasked.numpy(), mask), real(b.numpy(), mask), atol=1e-3)


def test_source_state_dict_loads_strictly_and_gives_its_outputs():
    """The source's MultimodalTransformer (at its 224 / 16 patch embedding) loads into ours with
    strict=True, and into the Flax twin by rule; without a text mask all give its outputs. Its text
    mask does not run (a bool mask concatenated with a float one)."""
    torch.manual_seed(0)
    src = source_architectures.MultimodalTransformer(32, 4, 2, 20, max_seq_len=8).eval()
    ours = tm_.MultimodalTransformer(32, 4, 2, 20, max_seq_len=8).eval()
    ours.load_state_dict(src.state_dict(), strict=True)
    ids, x = torch.randint(0, 20, (2, 8)), torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref, got = src(ids, x).numpy(), ours(ids, x).numpy()
        with pytest.raises(RuntimeError):
            src(ids, x, torch.ones(2, 8, dtype=torch.bool))
    assert ref.shape == (2, 8 + 196, 32)
    fm = jm.MultimodalTransformer(32, 4, 2, 20, max_seq_len=8)
    fi, fx = jnp.asarray(ids.numpy(), jnp.int32), jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    flax_got = jax.jit(fm.apply)(bridge.torch_to_flax(src.state_dict(), fm, fi, fx), fi, fx)
    err, flax_err = harness.rel_err(ref, got), harness.rel_err(ref, flax_got)
    print(f"source MultimodalTransformer: torch twin {err:.2e}, Flax twin {flax_err:.2e}")
    assert err <= 1e-6 and flax_err <= harness.FORWARD_TOL


def test_round_trip_keeps_the_unused_weights():
    tm, _, variables, _, _ = twins()
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    back = bridge.flax_to_torch(variables)
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    assert {"layers.1.cross_attn.in_proj_weight", "layers.1.norm3.weight", "image_patch_embed.projection.0.weight",
            "text_type_embed", "pos_embed.weight", "layers.0.mlp.3.weight"} <= set(sd)


def test_rejects_bad_input():
    tm, fm, variables, tb, fb = twins()
    ids, x = tb[0][:2]
    fi, fx = fb[0][:2]
    expect = r"expects \(B, L <= 8\) integer token ids; got .* of shape \(3, 9\)"
    with pytest.raises(ValueError, match=expect):
        tm(torch.zeros(3, 9, dtype=torch.long), x)
    with pytest.raises(ValueError, match=expect):
        fm.apply(variables, jnp.zeros((3, 9), jnp.int32), fx)
    with pytest.raises(ValueError, match=r"expects \(B, 3, 16, 16\) .* got shape \(3, 3, 224, 224\)"):
        tm(ids, torch.zeros(3, 3, 224, 224))
    with pytest.raises(ValueError, match=r"expects \(B, 16, 16, 3\) .* got shape \(3, 224, 224, 3\)"):
        fm.apply(variables, fi, jnp.zeros((3, 224, 224, 3)))


# --- the VQA classifier (preset mmt-vqa-scenes) ------------------------------------------------


def test_classifier_preset_forward_gradients_and_padding():
    preset = with_overrides(get_preset("mmt-vqa-scenes"), image_size=16, num_layers=2, dim=32)
    torch.manual_seed(0)
    tm, fm = torch_reference.create_model(preset), jax_models.create_model(preset)
    rs = np.random.RandomState(0)
    V, L = preset.kwargs["vocab_size"], preset.kwargs["context_length"]
    q = np.zeros((3, L), np.int64)
    for row, n in zip(q, (L, 5, 3)):
        row[:n] = rs.randint(2, V - 2, n)
        row[0], row[n - 1] = V - 2, V - 1
    x = rs.standard_normal((3, 3, 16, 16)).astype(np.float32)
    y = rs.randint(0, preset.kwargs["num_answers"], 3)
    tb = (torch.from_numpy(x), torch.from_numpy(q), torch.from_numpy(y))
    fb = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(q, jnp.int32), jnp.asarray(y))
    variables = bridge.torch_to_flax(tm.state_dict(), fm, *fb[:2])
    err = harness.forward_error(tm, jitted(fm), variables, tb[:2], fb[:2])

    def torch_loss(model, batch):
        return F.cross_entropy(model(*batch[:2]), batch[2])

    def flax_loss(params, variables, batch):
        logits = fm.apply({**variables, "params": params}, *batch[:2])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[2]).mean()

    ref = torch_gradients(tm, torch_loss, tb)
    got = harness.flax_params_as_torch(jax.jit(jax.grad(flax_loss))(variables["params"], variables, fb))
    errs = {k: harness.rel_err(ref[k], got[k]) for k in ref if not any(f".{u}." in k for u in UNUSED)}
    worst = max(errs, key=errs.get)
    tm.eval()
    with torch.no_grad():
        a = tm(tb[0], tb[1]).numpy()
        b = tm(tb[0], tb[1][:, :6]).numpy()   # rows 1 and 2 fit in 6 tokens, row 0 is cut: compare 1, 2
    apply = jax.jit(fm.apply)
    fa = np.asarray(apply(variables, fb[0], fb[1]))
    fb_ = np.asarray(apply(variables, fb[0], fb[1][:, :6]))
    pad_err = max(harness.rel_err(a[1:], b[1:]), harness.rel_err(fa[1:], fb_[1:]))
    print(f"mmt-vqa-scenes (16px, 2 layers): forward {err:.2e}, worst gradient {worst} {errs[worst]:.2e}, "
          f"padding invariance {pad_err:.2e}")
    assert err <= harness.FORWARD_TOL and errs[worst] <= harness.GRAD_TOL and pad_err <= harness.FORWARD_TOL
    assert fa.shape == (3, preset.kwargs["num_answers"])


def test_image_positions_make_where_answerable():
    """Without `image_positions` (the source) swapping two patches of the image leaves the pooled
    logits unchanged, so no question about where an object is can be answered; with it they move.
    The table is the only added weight, and the source's state dicts still load without it."""
    x = torch.randn(2, 3, 16, 16)
    swapped = x.clone()
    swapped[..., :4, :4], swapped[..., 12:, 12:] = x[..., 12:, 12:], x[..., :4, :4]
    q = torch.tensor([[18, 4, 5, 19, 0, 0, 0, 0], [18, 6, 19, 0, 0, 0, 0, 0]])
    for positions in (False, True):
        torch.manual_seed(0)
        model = tm_.MMTVQA(16, 4, 3, 20, 8, 32, 4, 2, 5, dropout=0.0, image_positions=positions).eval()
        with torch.no_grad():
            moved = (model(swapped, q) - model(x, q)).abs().max().item()
        assert (moved > 1e-3) == positions, (positions, moved)
        assert ("transformer.image_pos_embed" in model.state_dict()) == positions


def test_sincos2d_image_positions_start_alike_in_both_twins():
    """image_pos_init="sincos2d": both twins start from the same 2D sine-cosine table of standard
    deviation 1, one row per patch (no class token)."""
    preset = with_overrides(get_preset("mmt-vqa-scenes"), image_pos_init="sincos2d")
    tm = torch_reference.create_model(preset)
    fm = jax_models.create_model(preset)
    x, q = np.zeros((1, 32, 32, 3), np.float32), np.ones((1, 16), np.int32)
    init = np.asarray(fm.init(jax.random.key(0), x, q)["params"]["transformer"]["image_pos_embed"])
    np.testing.assert_array_equal(init, tm.transformer.image_pos_embed.detach().numpy())
    assert init.shape == (1, 16, 64) and abs(init.std() - 1.0) < 1e-5


@pytest.mark.slow
def test_cross_attention_layer_compiles_under_torch_compile():
    """The modality mask once tripped inductor (`==` of two bool tensors: "A Boolean argument can
    only be used in Eq and Ne"), so `python -m benchmarks --frameworks torch-compile` failed on
    `mmt-vqa-scenes`; the compiled layer gives the eager layer's outputs."""
    torch.manual_seed(0)
    layer = tm_.MultimodalTransformerLayer(32, 4, dropout=0.0, cross_attention=True).eval()
    x = torch.randn(3, 12, 32)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 5:8] = False
    with torch.no_grad():
        want = layer(x, mask, 8)
        got = torch.compile(layer)(x, mask, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
