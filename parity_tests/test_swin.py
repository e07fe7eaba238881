"""What is Swin's own: the source's block (shifted and not) against ours and between the frameworks
(forward, gradients, an AdamW trajectory), the buffers through the bridge, window partition, drop
path, and the errors. The whole presets are in `test_presets.py`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge
from twin_models import model_math
import jax_models
import torch_reference
from jax_models import swin as jswin
from parity_tests import harness, source_architectures
from twin_models.presets import get_preset, with_overrides
from torch_reference import swin as tswin

# 16x16 images, 2x2 patches: stage 0 at 8x8 (windows of 4, blocks shifted 0 and 2, then merging),
# stage 1 at 4x4 (one window: unshifted, no mask).
TINY = with_overrides(dataclasses.replace(get_preset("swin-digits"), name="swin-tiny-test", image_size=16),
                      image_size=16, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), drop_path_rate=0.0)
SHIFTS = pytest.mark.parametrize("shift", [0, 2], ids=["unshifted", "shifted"])
BLOCK = dict(dim=16, input_resolution=(8, 8), num_heads=2, window_size=4)


@functools.lru_cache(maxsize=None)
def _block_weights(shift):
    torch.manual_seed(0)
    tm = tswin.SwinTransformerBlock(**BLOCK, shift_size=shift)
    fm = jswin.SwinTransformerBlock(**BLOCK, shift_size=shift)
    return tm.state_dict(), fm, bridge.torch_to_flax(tm.state_dict(), fm, jnp.zeros((1, 64, 16)))


def block_twins(shift):
    """(torch block, Flax block, Flax variables, torch input, Flax input) with the same weights;
    converted once per session, a fresh torch module each call."""
    sd, fm, variables = _block_weights(shift)
    tm = tswin.SwinTransformerBlock(**BLOCK, shift_size=shift)
    tm.load_state_dict(sd, strict=True)
    x = np.random.RandomState(0).standard_normal((2, 64, 16)).astype(np.float32)
    return tm, fm, variables, torch.from_numpy(x), jnp.asarray(x)


def block_batches(n, seed=1):
    rs = np.random.RandomState(seed)
    data = [rs.standard_normal((2, 2, 64, 16)).astype(np.float32) for _ in range(n)]
    return [tuple(map(torch.from_numpy, d)) for d in data], [tuple(map(jnp.asarray, d)) for d in data]


def block_losses(fm):
    def torch_loss(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    def flax_loss(params, variables, batch):
        x, y = batch
        return ((fm.apply({**variables, "params": params}, x) - y) ** 2).mean()

    return torch_loss, flax_loss


# --- the block ------------------------------------------------------------------------------


@SHIFTS
def test_source_block_state_dict_loads_strictly(shift):
    """A state dict saved by the source's SwinTransformerBlock loads with strict=True into both
    twins (the torch one directly, the Flax one through the bridge) and gives the same outputs."""
    src = source_architectures.SwinTransformerBlock(**BLOCK, shift_size=shift).eval()
    assert ("attn_mask" in src.state_dict()) == (shift > 0)
    ours = tswin.SwinTransformerBlock(**BLOCK, shift_size=shift).eval()
    ours.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        ref = src(x)
        torch.testing.assert_close(ours(x), ref, rtol=0, atol=1e-6)
    fm = jswin.SwinTransformerBlock(**BLOCK, shift_size=shift)
    variables = bridge.torch_to_flax(src.state_dict(), fm, jnp.asarray(x.numpy()))
    assert harness.rel_err(ref.numpy(), fm.apply(variables, jnp.asarray(x.numpy()))) <= harness.FORWARD_TOL


@pytest.mark.parametrize("window", [(4, 4), (3, 5)])
def test_source_window_attention_loads_strictly(window):
    src = source_architectures.WindowAttention(16, window, 2).eval()
    ours = tswin.WindowAttention(16, window, 2).eval()
    ours.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(3, window[0] * window[1], 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), src(x), rtol=0, atol=1e-6)
    fm = jswin.WindowAttention(16, window, 2)
    variables = bridge.torch_to_flax(src.state_dict(), fm, jnp.asarray(x.numpy()))
    assert variables["buffers"]["relative_position_index"].shape == (x.shape[1],) * 2


@SHIFTS
def test_block_forward(shift):
    tm, fm, variables, xt, xf = block_twins(shift)
    harness.check_forward(tm, fm, variables, [xt], [xf], f"block shift {shift}")


@SHIFTS
def test_block_gradients(shift):
    tm, fm, variables, _, _ = block_twins(shift)
    tb, fb = block_batches(1)
    harness.check_gradients(tm, fm, variables, block_losses(fm), tb[0], fb[0], f"block shift {shift}")


@pytest.mark.parametrize("float64", [False, True], ids=["float32", "float64"])
@SHIFTS
def test_block_adamw_trajectory(shift, float64):
    tm, fm, variables, _, _ = block_twins(shift)
    tb, fb = block_batches(20)
    harness.check_trajectory(tm, fm, variables, block_losses(fm), tb, fb, f"block shift {shift}", lr=1e-3,
                             weight_decay=0.05, float64=float64, falls=True)


# --- the whole model ------------------------------------------------------------------------


def test_pooled_features_and_flax_export_loads_into_torch():
    """num_classes=0 gives the pooled feature; Flax-initialised weights, buffers included, load into
    torch with strict=True and give the same outputs."""
    preset = with_overrides(TINY, num_classes=0)
    fm = jax_models.create_model(preset)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
    variables = jax.jit(fm.init)(jax.random.key(0), x)
    assert fm.apply(variables, x).shape == (2, 32)
    tm = torch_reference.create_model(preset).eval()
    assert tm.num_features == 32 and not any(k.startswith("head") for k in tm.state_dict())
    sd = bridge.flax_to_torch(variables)
    assert "layers.0.blocks.1.attn_mask" in sd and "layers.1.blocks.1.attn_mask" not in sd
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        ref = tm(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2))).numpy()
    assert harness.rel_err(ref, fm.apply(variables, x)) <= harness.FORWARD_TOL


# --- buffers, drop path, errors -------------------------------------------------------------


@pytest.mark.parametrize("key", ["attn_mask", "attn.relative_position_index"])
def test_converter_reports_a_wrong_buffer(key):
    tm, fm, _, _, xf = block_twins(2)
    sd = {k: v.clone() for k, v in tm.state_dict().items()}
    sd[key].view(-1)[1] += 1
    with pytest.raises(bridge.WeightMismatchError, match="Buffer differs") as info:
        bridge.torch_to_flax(sd, fm, xf)
    assert key in str(info.value) and "Missing" not in str(info.value)
    sd = dict(tm.state_dict())
    del sd[key]
    with pytest.raises(bridge.WeightMismatchError, match="Missing key.*buffers:.*" + key.split(".")[-1]):
        bridge.torch_to_flax(sd, fm, xf)


def test_buffers_match_the_source():
    src = source_architectures.SwinTransformerBlock(dim=8, input_resolution=(12, 12), num_heads=2, window_size=6,
                                          shift_size=3)
    np.testing.assert_array_equal(model_math.relative_position_index((6, 6)), src.attn.relative_position_index.numpy())
    np.testing.assert_array_equal(model_math.shifted_window_mask(12, 12, 6, 3), src.attn_mask.numpy())


def test_window_partition_round_trip():
    x = np.arange(2 * 8 * 12 * 3, dtype=np.float32).reshape(2, 8, 12, 3)
    w = jswin.window_partition(jnp.asarray(x), 4)
    assert w.shape == (12, 4, 4, 3)
    np.testing.assert_array_equal(w, tswin.window_partition(torch.from_numpy(x), 4).numpy())
    np.testing.assert_array_equal(jswin.window_reverse(w, 4, 8, 12), x)
    np.testing.assert_array_equal(tswin.window_reverse(torch.from_numpy(np.array(w)), 4, 8, 12).numpy(), x)


def test_drop_path_rates_grow_linearly():
    tm = torch_reference.create_model(with_overrides(TINY, drop_path_rate=0.3))
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for layer in tm.layers for b in layer.blocks]
    np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3], atol=1e-7)
    fm = jax_models.create_model(with_overrides(TINY, drop_path_rate=0.3))
    x = jnp.ones((2, 16, 16, 1))
    variables = jax.jit(fm.init)(jax.random.key(0), x)
    a = fm.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, fm.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)}))
    np.testing.assert_array_equal(fm.apply(variables, x), fm.apply(variables, x, train=False))


def test_resolution_not_divisible_by_the_window_is_refused():
    with pytest.raises(ValueError, match="input resolution 12x12 is not divisible by window_size 5"):
        torch_reference.create_model(with_overrides(TINY, image_size=24, window_size=5))
    fm = jax_models.create_model(with_overrides(TINY, image_size=24, window_size=5))
    with pytest.raises(ValueError, match="input resolution 12x12 is not divisible by window_size 5"):
        jax.eval_shape(fm.init, jax.random.key(0), jnp.zeros((1, 24, 24, 1)))
    with pytest.raises(ValueError, match="SwinTransformerBlock: input resolution 8x8 is not divisible"):
        tswin.SwinTransformerBlock(16, (8, 8), 2, window_size=3)
    with pytest.raises(ValueError, match="SwinTransformerBlock: input resolution 8x8 is not divisible"):
        jax.eval_shape(jswin.SwinTransformerBlock(16, (8, 8), 2, window_size=3).init, jax.random.key(0),
                       jnp.zeros((1, 64, 16)))
    with pytest.raises(ValueError, match="expects 64 = 8x8 tokens; got 49"):
        jax.eval_shape(jswin.SwinTransformerBlock(16, (8, 8), 2, 4).init, jax.random.key(0),
                       jnp.zeros((1, 49, 16)))
    with pytest.raises(ValueError, match="expects 64 = 8x8 tokens; got 49"):
        tswin.SwinTransformerBlock(16, (8, 8), 2, 4)(torch.zeros(1, 49, 16))


@pytest.mark.parametrize("shape, expect", [((2, 32, 32, 1), "got shape (2, 32, 32, 1)"),
                                           ((2, 1, 16, 16), "NCHW input?"),
                                           ((16, 16, 1), "got a rank-3 array")])
def test_flax_rejects_wrong_images(shape, expect):
    fm = jax_models.create_model(TINY)
    with pytest.raises(ValueError, match="expects \\(B, 16, 16, 1\\) floating-point images") as info:
        jax.eval_shape(fm.init, jax.random.key(0), jnp.zeros(shape))
    assert expect in str(info.value)


@pytest.mark.parametrize("name", ["swin-t", "swin-s", "swin-b"])
def test_full_presets_build(name):
    """The full presets trace (shapes only) and count the paper's parameters."""
    preset = get_preset(name)
    fm = jax_models.create_model(preset)
    shapes = jax.eval_shape(fm.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    n = sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes["params"]))
    assert abs(n / 1e6 - {"swin-t": 28.3, "swin-s": 49.6, "swin-b": 87.8}[name]) < 0.3, n
