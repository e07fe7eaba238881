"""Flax NNX: every family's Linen model runs inside NNX through `flax.nnx.bridge.ToNNX`, holding the
Linen variables as they are, and gives bit-identical outputs, gradients and optimizer steps, so an
NNX user adopts the models without a rewrite (docs/nnx.md). `train=True` and the dropout streams
pass through; the 'buffers' collection (Swin's, DDPM's) stays out of the optimizer; the trained
parameters go back to Linen and to the PyTorch twin unchanged in layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from flax.traverse_util import flatten_dict

import bridge
import jax_models
import torch_reference
from bridge.verify import build_twins
from twin_models.presets import PRESETS, example_inputs, get_preset

# The smallest preset of each family.
FAMILIES = {"vit": "vit-tiny-digits", "swin": "swin-digits", "ddpm": "ddpm-digits", "clip": "clip-digits",
            "fusion": "vqa-scenes", "multimodal": "mmt-vqa-scenes", "captioning": "caption-scenes"}


def wrap(linen_model):
    return nnx.bridge.ToNNX(linen_model, rngs=nnx.Rngs(params=0, dropout=1))


def in_nnx(linen_model, variables, *inputs):
    """`linen_model` as an NNX module holding `variables`: the variables' structure from a lazy_init
    under `nnx.eval_shape` (no throwaway init is computed), the rng streams from a fresh wrapper
    (which holds nothing else), then every Linen collection."""
    model = nnx.eval_shape(lambda: wrap(linen_model).lazy_init(*inputs))
    nnx.update(model, nnx.state(wrap(linen_model)))
    nnx.update(model, *variables.values())
    abstract = [p for p, v in flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()
                if not isinstance(v, jax.Array)]
    assert not abstract, f"left abstract: {abstract[:5]}"
    return model


def nnx_variables(model) -> tuple[dict, dict]:
    """(params, the other non-rng variables) of an NNX-wrapped model, as flat {path: array}."""
    params = flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    rest = flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.RngState)))))
    return params, rest


def assert_trees_equal(ref, got, label):
    assert jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(got), label
    for (path, r), g in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree_util.tree_leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r), err_msg=f"{label}: {jax.tree_util.keystr(path)}")


def linen_variables(name):
    """(preset, Flax model, its variables (the torch twin's initial weights through the bridge, as
    a checkpoint gives them), inputs)."""
    preset = get_preset(name)
    _, fm, variables, _, inputs = build_twins(preset, batch_size=2)
    return preset, fm, variables, inputs


def test_every_family_is_covered():
    assert set(FAMILIES) == {p.family for p in PRESETS.values()}
    assert all(PRESETS[name].family == family for family, name in FAMILIES.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_linen_model_in_nnx_gives_the_same_outputs(family):
    """The NNX module holds exactly the Linen variables (params as `nnx.Param`, other collections
    beside them) and its jitted call equals the jitted Linen `apply` bit for bit."""
    _, fm, variables, inputs = linen_variables(FAMILIES[family])
    model = in_nnx(fm, variables, *inputs)
    params, rest = nnx_variables(model)
    assert_trees_equal(flatten_dict(variables["params"]), params, f"{family} params")
    others = {k: v for c, tree in variables.items() if c != "params" for k, v in flatten_dict(tree).items()}
    assert_trees_equal(others, rest, f"{family} other collections")
    ref = jax.jit(fm.apply)(variables, *inputs)
    got = nnx.jit(lambda m, *x: m(*x))(model, *inputs)
    assert_trees_equal(ref, got, f"{family} outputs")


def test_other_methods_are_called_by_name():
    """`model.encode_image(...)` on the wrapper runs the Linen method, as `apply(..., method=)` does."""
    _, fm, variables, (image, text) = linen_variables("clip-digits")
    model = in_nnx(fm, variables, image, text)
    for method, x in (("encode_image", image), ("encode_text", text)):
        ref = jax.jit(lambda v, x: fm.apply(v, x, method=method))(variables, x)
        got = nnx.jit(lambda m, x: getattr(m, method)(x))(model, x)
        assert_trees_equal(ref, got, method)


def test_lazy_init_then_update_gives_the_linen_model():
    """The Flax documentation's route: `lazy_init` creates the variables from the wrapper's own
    streams (not the weights `init` gives for the same seed), then `nnx.update` puts the Linen
    variables in their place."""
    name = FAMILIES["vit"]
    fm = jax_models.create_model(name)
    (images,) = example_inputs(get_preset(name), 2, 0)
    variables = jax.jit(fm.init)(jax.random.key(0), images)
    model = nnx.bridge.ToNNX(fm, rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, images)
    before, _ = nnx_variables(model)
    linen_init = flatten_dict(variables["params"])
    assert set(before) == set(linen_init)
    assert not np.array_equal(before[("cls_token",)], linen_init[("cls_token",)])
    nnx.update(model, *variables.values())
    assert_trees_equal(jax.jit(fm.apply)(variables, images), nnx.jit(lambda m, x: m(x))(model, images), name)


def test_train_flag_and_dropout_streams_pass_through():
    """`train=True` turns dropout on; the masks come from the wrapper's streams, which advance on
    every call (carried out of `nnx.jit`), or from `rngs=` given to the call, which gives Linen's
    masks for that stream's key."""
    _, fm, variables, (images,) = linen_variables(FAMILIES["vit"])
    assert get_preset(FAMILIES["vit"]).kwargs["dropout"] > 0
    model = in_nnx(fm, variables, images)
    call = nnx.jit(lambda m, x: m(x, train=True))
    first, second = call(model, images), call(model, images)
    assert not np.array_equal(first, second)
    assert int(model.to_nnx__rngs["dropout"].count[...]) == 2
    got = nnx.jit(lambda m, x: m(x, train=True, rngs=nnx.Rngs(dropout=7)))(model, images)
    ref = jax.jit(lambda v, x: fm.apply(v, x, train=True, rngs={"dropout": nnx.Rngs(dropout=7).dropout()}))(
        variables, images)
    np.testing.assert_array_equal(got, ref)
    assert int(model.to_nnx__rngs["dropout"].count[...]) == 2


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_one_optimizer_step_equals_the_linen_step(family):
    """One `nnx.Optimizer` AdamW step in training mode (dropout, and Swin's DropPath) equals the
    same step on the Linen params with optax: the loss, every gradient and every updated weight
    bit for bit; the buffers are not trained; the params go back to Linen's layout and load
    strictly into the PyTorch twin."""
    name = FAMILIES[family]
    preset, fm, variables, (images,) = linen_variables(name)
    labels = np.arange(images.shape[0]) % preset.kwargs["num_classes"]
    model = in_nnx(fm, variables, images)
    tx = optax.adamw(1e-3, weight_decay=0.05)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    cross_entropy = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @nnx.jit
    def nnx_step(model, optimizer, images):
        loss_fn = lambda m: cross_entropy(m(images, train=True, rngs=nnx.Rngs(dropout=3)))
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    rest = {c: tree for c, tree in variables.items() if c != "params"}

    @jax.jit
    def linen_step(params, opt_state, images):
        loss_fn = lambda p: cross_entropy(fm.apply({"params": p, **rest}, images, train=True,
                                                   rngs={"dropout": nnx.Rngs(dropout=3).dropout()}))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, _ = tx.update(grads, opt_state, params)
        return loss, grads, optax.apply_updates(params, updates)

    loss, grads = nnx_step(model, optimizer, images)
    ref_loss, ref_grads, ref_params = linen_step(variables["params"], tx.init(variables["params"]), images)
    np.testing.assert_array_equal(loss, ref_loss)
    assert_trees_equal(ref_grads, nnx.to_pure_dict(grads), f"{name} gradients")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert_trees_equal(ref_params, params, f"{name} updated params")
    assert int(optimizer.step[...]) == 1
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(variables["params"])))
    assert moved > 1e-4, f"{name}: the weights moved only {moved:.1e}"
    _, others = nnx_variables(model)
    assert_trees_equal({k: v for tree in rest.values() for k, v in flatten_dict(tree).items()}, others,
                       f"{name} buffers")
    assert bool(rest) == (family == "swin")
    torch_model = torch_reference.create_model(name)
    torch_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                                 bridge.flax_to_torch({"params": params, **rest}).items()}, strict=True)
