"""The fast paths of the Flax models: `attention_impl="fused"` (`jax.nn.dot_product_attention`)
held to the torch twins at the float32 tolerances, and bfloat16 params and inputs (the trainer's
mixed precision) giving finite outputs and gradients near the float32 ones, for every small preset (`cases.SMALL`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_models
from bridge.verify import build_twins, example_inputs
from jax_models import layers
from parity_tests import harness
from parity_tests.cases import BF16_TOL, small_cases
from twin_models.presets import get_preset, without_dropout
from train.tasks import get_task


def twins(name, impl):
    """(preset, torch model, Flax model with attention `impl`, Flax variables, task)."""
    preset = without_dropout(get_preset(name))
    tm, fm, variables, _, _ = build_twins(preset, attention_impl=impl)
    return preset, tm, fm, variables, get_task(preset)


@pytest.mark.parametrize("name", small_cases("fused-forward"))
def test_fused_attention_forward_matches_torch(name):
    preset = without_dropout(get_preset(name))
    tm, fm, variables, t_in, f_in = build_twins(preset, batch_size=4, attention_impl="fused")
    harness.check_forward(tm, fm, variables, t_in, f_in, f"{name} fused")


@pytest.mark.parametrize("name", small_cases("fused-gradients"))
def test_fused_attention_gradients_match_torch(name):
    preset, tm, fm, variables, task = twins(name, "fused")
    (tb,), (fb,) = task.parity.batches(preset, 1, 4)
    harness.check_gradients(tm, fm, variables, task.parity.losses(fm), tb, fb, f"{name} fused")


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


@pytest.mark.parametrize("name", small_cases("bfloat16"))
def test_bfloat16_params_and_inputs(name):
    """Forward in bfloat16 (outputs bfloat16, or float32 where the model computes them in float32
    on purpose, e.g. CLIP's normalized features), both attention impls, within 3e-2 of float32;
    the gradient of the task's loss comes back bfloat16 and finite, pointing the same way."""
    preset = get_preset(name)
    models = {impl: jax_models.create_model(preset, attention_impl=impl) for impl in ("xla", "fused")}
    _, fin = example_inputs(preset, 4)
    variables = models["xla"].init(jax.random.key(0), *fin)
    apply = {impl: jax.jit(m.apply) for impl, m in models.items()}
    ref = apply["xla"](variables, *fin)
    for impl in models:
        got = apply[impl](to_bf16(variables), *to_bf16(fin))
        errs = []
        for r, g in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got), strict=True):
            assert g.dtype in (jnp.bfloat16, jnp.float32), f"{name} {impl}: {g.dtype} output"
            assert np.isfinite(np.asarray(g, np.float32)).all()
            errs.append(harness.rel_err(r, np.asarray(g, np.float32)))
        assert max(errs) <= BF16_TOL, f"{name} {impl} bfloat16: rel err {max(errs):.3e}"
        assert max(errs) > 0, f"{name} {impl}: the bfloat16 run gave the float32 outputs"

    task = get_task(preset)
    _, flax_loss = task.parity.losses(models["xla"])
    _, (fb,) = task.parity.batches(preset, 1, 4)
    grad = jax.jit(jax.grad(flax_loss))
    g32 = grad(variables["params"], variables, fb)
    g16 = grad(to_bf16(variables["params"]), to_bf16(variables), to_bf16(fb))
    a = np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(g32)])
    b = np.concatenate([np.ravel(np.asarray(leaf, np.float32)) for leaf in jax.tree_util.tree_leaves(g16)])
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(g16))
    assert np.isfinite(b).all()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
