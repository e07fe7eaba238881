"""The fast paths of the Flax models: `attention_impl="fused"` (`jax.nn.dot_product_attention`)
held to the torch twins at the float32 tolerances, GELU's hand-written derivative, and bfloat16
params and inputs (the trainer's mixed precision) giving finite outputs near the float32 ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge
import jax_models
import torch_reference
from bridge.verify import random_tokens
from jax_models import clip as jclip
from jax_models import ddpm as J
from jax_models import layers
from parity_tests import harness
from presets import get_preset, with_overrides
from torch_reference import ddpm as T

PRESETS = ["vit-digits", "encoder-vit-digits", "swin-digits", "clip-digits", "ddpm-digits"]
NO_DROPOUT = {"vit": dict(dropout=0.0), "swin": dict(drop_path_rate=0.0), "clip": {}, "ddpm": dict(dropout=0.0)}
BF16_TOL = 3e-2


def batch(preset, batch_size=4, seed=0):
    """(torch inputs, flax inputs) of the preset's model: images (+ tokens, or timesteps)."""
    rs = np.random.RandomState(seed)
    x = rs.standard_normal((batch_size, *preset.input_shape_nchw)).astype(np.float32)
    tx, fx = torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))
    if preset.task == "contrastive":
        t = random_tokens(rs, batch_size, preset.kwargs["vocab_size"], preset.kwargs["context_length"])
        return (tx, torch.from_numpy(t)), (fx, jnp.asarray(t, jnp.int32))
    if preset.task == "diffusion":
        t = rs.randint(0, 1000, batch_size)
        return (tx, torch.from_numpy(t)), (fx, jnp.asarray(t))
    return (tx,), (fx,)


def twins(name, impl, batch_size=4):
    """Torch model, Flax model with attention `impl`, Flax variables, torch and flax inputs."""
    preset = get_preset(name)
    preset = with_overrides(preset, **NO_DROPOUT[preset.family])
    torch.manual_seed(0)
    tm = torch_reference.create_model(preset).eval()
    fm = jax_models.create_model(preset, attention_impl=impl)
    tin, fin = batch(preset, batch_size)
    return preset, tm, fm, bridge.torch_to_flax(tm.state_dict(), fm, *fin), tin, fin


def nhwc_if_image(y):
    return y.transpose(0, 2, 3, 1) if y.ndim == 4 else y


@pytest.mark.parametrize("name", PRESETS)
def test_fused_attention_forward_matches_torch(name):
    _, tm, fm, variables, tin, fin = twins(name, "fused")
    err = harness.forward_error(tm, fm, variables, tin, fin, nhwc_if_image)
    assert err <= harness.FORWARD_TOL, f"{name} fused: forward rel err {err:.3e}"


def _losses(preset, tm, fm, tin, fin):
    """(torch model, flax model, torch loss, flax loss, torch batch, flax batch) of one gradient check."""
    if preset.task == "classification":
        y = np.arange(len(tin[0])) % preset.kwargs["num_classes"]
        torch_loss, flax_loss = harness.classification_losses(fm)
        return tm, fm, torch_loss, flax_loss, (*tin, torch.from_numpy(y)), (*fin, jnp.asarray(y))
    if preset.task == "contrastive":
        return (tm, fm, lambda m, b: m.contrastive_loss(*b),
                lambda p, v, b: jclip.clip_loss(*fm.apply({**v, "params": p}, *b)), tin, fin)
    noise = np.random.RandomState(1).standard_normal(tuple(tin[0].shape)).astype(np.float32)
    td, fd = T.DDPM(tm), J.DDPM(fm)
    return (td, fd, lambda m, b: m.p_losses(*b),
            lambda p, v, b: fd.apply({**v, "params": p}, *b, method=J.DDPM.p_losses),
            (*tin, torch.from_numpy(noise)), (*fin, jnp.asarray(noise.transpose(0, 2, 3, 1))))


@pytest.mark.parametrize("name", ["vit-digits", "swin-digits", "clip-digits", "ddpm-digits"])
def test_fused_attention_gradients_match_torch(name):
    preset, tm, fm, variables, tin, fin = twins(name, "fused")
    tmodel, fmodel, torch_loss, flax_loss, tb, fb = _losses(preset, tm, fm, tin, fin)
    if preset.task == "diffusion":
        variables = bridge.torch_to_flax(tmodel.state_dict(), fmodel, *fb)
    errs, loss_t, loss_f = harness.gradient_errors(tmodel, fmodel, variables, torch_loss, jax.jit(flax_loss),
                                                   tb, fb)
    worst = max(errs, key=errs.get)
    assert abs(loss_t - loss_f) <= harness.FORWARD_TOL * abs(loss_t)
    assert errs[worst] <= harness.GRAD_TOL, f"{name} fused: gradient of {worst} rel err {errs[worst]:.3e}"


def test_swin_digits_has_shifted_windows():
    """The Swin case above covers the shift mask: its first stage has a shifted block."""
    v = jax.eval_shape(jax_models.create_model("swin-digits").init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    assert "attn_mask" in v["buffers"]["layers_0"]["blocks_1"]


def test_fused_attention_with_dropout_runs_the_xla_path():
    """Attention dropout in training: "fused" falls back to "xla", same draws, same output."""
    preset = get_preset("vit-digits")
    x = jnp.asarray(np.random.RandomState(0).standard_normal((2, *preset.input_shape_nhwc)), jnp.float32)
    xla, fused = (jax_models.create_model(preset, attention_impl=i) for i in ("xla", "fused"))
    variables = xla.init(jax.random.key(0), x)
    run = lambda m: m.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(run(xla), run(fused))


def test_unknown_attention_impl_is_refused():
    q = jnp.zeros((1, 2, 3, 4))
    with pytest.raises(ValueError, match="'flash' is not one of"):
        layers.attend(q, q, q, 0.5, impl="flash")


def to_bf16(tree):
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


@pytest.mark.parametrize("name", PRESETS)
def test_bfloat16_params_and_inputs(name):
    """Forward in bfloat16 (float32 features for CLIP, whose loss they feed), both attention
    impls, within 3e-2 of float32; the gradient of a loss comes back bfloat16 and finite, pointing
    the same way as in float32."""
    preset = get_preset(name)
    models = {impl: jax_models.create_model(preset, attention_impl=impl) for impl in ("xla", "fused")}
    _, fin = batch(preset)
    variables = models["xla"].init(jax.random.key(0), *fin)
    method = "features" if preset.task == "contrastive" else None
    apply = {impl: jax.jit(lambda v, *a, m=m: m.apply(v, *a, method=method)) for impl, m in models.items()}
    ref = apply["xla"](variables, *fin)
    want = jnp.float32 if preset.task == "contrastive" else jnp.bfloat16
    for impl in models:
        got = apply[impl](to_bf16(variables), *to_bf16(fin))
        for r, g in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
            assert g.ndim == 0 or g.dtype == want, f"{name} {impl}: {g.dtype} output"
            assert np.isfinite(np.asarray(g, np.float32)).all()
            err = harness.rel_err(r, np.asarray(g, np.float32))
            assert err <= BF16_TOL, f"{name} {impl} bfloat16: rel err {err:.3e}"

    def loss(params, *inputs):
        out = apply["xla"]({**variables, "params": params}, *inputs)
        if preset.task == "contrastive":
            return jclip.contrastive_loss(*out)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    loss = jax.jit(jax.grad(loss))
    g32, g16 = loss(variables["params"], *fin), loss(to_bf16(variables["params"]), *to_bf16(fin))
    a = np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(g32)])
    b = np.concatenate([np.ravel(np.asarray(leaf, np.float32)) for leaf in jax.tree_util.tree_leaves(g16)])
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(g16))
    assert np.isfinite(b).all()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gelu_derivative_matches_torch(dtype):
    """`layers.gelu` carries its own derivative (XLA:CPU runs it faster than JAX's); it must
    stay torch's exact-GELU derivative, tails included."""
    x = np.linspace(-12, 12, 20001).astype(dtype)
    with jax.enable_x64(dtype == "float64"):
        y, vjp = jax.vjp(layers.gelu, jnp.asarray(x))
        (got,) = vjp(jnp.ones_like(y))
        assert got.dtype == np.dtype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.gelu(tx).sum().backward()
    assert harness.rel_err(torch.nn.functional.gelu(tx).detach().numpy(), y) <= harness.FORWARD_TOL
    assert harness.rel_err(tx.grad.numpy(), got) <= (1e-6 if dtype == "float32" else 1e-14)
