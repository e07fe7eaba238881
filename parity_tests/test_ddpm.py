"""What is DDPM's own: the time embedding, the U-Net with attention in its stages, the sources'
blocks, the schedule buffers through the bridge, the diffusion process, and both samplers over
whole trajectories. The presets' forward, gradients and trajectories are in `test_presets.py`, the
convolution and GroupNorm twins in `test_layers.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge
from twin_models.model_math import ddim_timesteps
import jax_models
import torch_reference
from jax_models import ddpm as J
from parity_tests import harness, source_architectures
from twin_models.presets import get_preset
from torch_reference import ddpm as T

TINY = dict(in_channels=1, out_channels=1, features=(16, 32), time_emb_dim=32, num_res_blocks=2,
            dropout=0.0)
ATTN = dict(TINY, features=(16, 256))  # attention inside an encoder and a decoder stage too


def nhwc(a):
    a = np.asarray(a)
    return jnp.asarray(a.transpose(0, 2, 3, 1) if a.ndim == 4 else a.transpose(0, 1, 3, 4, 2))


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def draws(batch, channels, size, seed=0, timesteps=1000):
    """(x, t, noise) as float32 NCHW numpy arrays and int64 timesteps (t = 0 and T - 1 included)."""
    rs = np.random.RandomState(seed)
    x = rs.uniform(-1, 1, (batch, channels, size, size)).astype(np.float32)
    t = rs.randint(0, timesteps, batch)
    t[:2] = [0, timesteps - 1]
    return x, t, rs.standard_normal(x.shape).astype(np.float32)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small eager convolutions on a shared 2-core machine: two OpenMP threads that wait for each
    other make a tiny U-Net step 200x slower (1.6 s against 8 ms) when other processes run."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_converted = {}


def twins(kw=TINY, size=8, batch=4, seed=0, timesteps=1000):
    """Torch DDPM, Flax DDPM, Flax variables (params from torch, buffers computed), and draws.
    The torch twin is fresh each call (tests train it); the conversion is done once per config."""
    torch.manual_seed(seed)
    td = T.DDPM(T.UNet(**kw), timesteps).eval()
    fd = J.DDPM(J.UNet(**kw), timesteps)
    x, t, noise = draws(batch, kw["in_channels"], size, seed, timesteps)
    key = (tuple(sorted(kw.items())), size, seed, timesteps)
    if key not in _converted:
        _converted[key] = bridge.torch_to_flax(td.state_dict(), fd, nhwc(x), jnp.asarray(t), nhwc(noise))
    return td, fd, _converted[key], (x, t, noise)


def tt(*arrays):
    return tuple(torch.from_numpy(np.asarray(a)) for a in arrays)


# --- time embedding and U-Net --------------------------------------------------------------------

def test_time_embedding():
    t = np.array([0, 1, 17, 500, 999])
    ref = T.SinusoidalPositionEmbeddings(64)(torch.from_numpy(t)).numpy()
    got = J.SinusoidalPositionEmbeddings(64)(jnp.asarray(t))
    assert harness.rel_err(ref, got) <= 1e-6
    src = source_architectures.SinusoidalPositionEmbeddings(64)(torch.from_numpy(t)).numpy()
    assert harness.rel_err(src, ref) <= 1e-5  # the source's float32 exp, within a few ulp of t * w


# --- U-Net ---------------------------------------------------------------------------------------

@pytest.mark.slow   # the test-time budget; the presets' bottleneck attention runs by default (test_presets)
@pytest.mark.parametrize("kw", [ATTN], ids=["attention-in-stages"])
def test_unet_with_attention_in_the_stages(kw):
    """The presets have attention only in the bottleneck; here an encoder and a decoder stage
    (256 features) attend too: forward and the gradients of p_losses, every leaf."""
    td, fd, variables, (x, t, noise) = twins(kw, 8, batch=4)
    unet_vars = {"params": variables["params"]["model"]}
    harness.check_forward(td.model, fd.model, unet_vars, tt(x, t), [nhwc(x), jnp.asarray(t)], "U-Net")
    torch_loss = lambda m, b: m.p_losses(*b)
    flax_loss = lambda p, v, b: fd.apply({**v, "params": p}, *b, method=J.DDPM.p_losses)
    harness.check_gradients(td, fd, variables, (torch_loss, flax_loss), tt(x, t, noise),
                            (nhwc(x), jnp.asarray(t), nhwc(noise)), "DDPM p_losses")


def test_source_blocks_load_strictly_and_unet_keys_differ_only_by_the_fix():
    torch.manual_seed(0)
    x, t = torch.randn(2, 32, 4, 4), torch.tensor([3, 900])
    emb = torch.randn(2, 16)
    for src, ours, args in [(source_architectures.ResidualBlock(32, 64, 16), T.ResidualBlock(32, 64, 16), (x, emb)),
                            (source_architectures.ResidualBlock(32, 32, 16), T.ResidualBlock(32, 32, 16), (x, emb)),
                            (source_architectures.AttentionBlock(32), T.AttentionBlock(32), (x,))]:
        ours.load_state_dict(src.state_dict(), strict=True)
        src.eval(), ours.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(*args), src(*args), rtol=0, atol=0)

    src = source_architectures.UNet(in_channels=1, out_channels=1, features=[16, 32], time_emb_dim=32)
    with pytest.raises(RuntimeError, match="channels"):
        src(torch.randn(1, 1, 8, 8), t[:1])
    ours = T.UNet(in_channels=1, out_channels=1, features=[16, 32], time_emb_dim=32)
    s, o = src.state_dict(), ours.state_dict()
    dropped = {k for k in s if k.startswith("decoder.") and k.split(".")[2] != "0" and "residual_conv" in k}
    assert set(s) - set(o) == dropped and len(dropped) == 4 and set(o) <= set(s)
    reshaped = {k for k in o if s[k].shape != o[k].shape}
    later_inputs = {f"decoder.{i}.1.block1.{k}" for i in range(2) for k in ("0.weight", "0.bias", "2.weight")}
    assert reshaped == {"upconv.0.weight"} | later_inputs
    assert s["upconv.0.weight"].shape[0] == 2 * o["upconv.0.weight"].shape[0]


# --- diffusion process ---------------------------------------------------------------------------

def test_schedule_buffers_are_bit_equal_and_checked_by_the_bridge():
    td, fd, variables, (x, t, noise) = twins()
    for k, v in td.named_buffers():
        np.testing.assert_array_equal(v.numpy(), np.asarray(variables["buffers"][k]), err_msg=k)
    src = source_architectures.DDPM(source_architectures.UNet(1, 1, [16, 32], 32))
    for k in variables["buffers"]:
        assert harness.rel_err(getattr(src, k).numpy(), variables["buffers"][k]) <= 1e-5, k
    other = T.DDPM(td.model, beta_end=0.03)
    with pytest.raises(bridge.WeightMismatchError, match="Buffer differs.*betas"):
        bridge.torch_to_flax(other.state_dict(), fd, nhwc(x), jnp.asarray(t), nhwc(noise))
    back = bridge.flax_to_torch(variables)
    sd = td.state_dict()
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k].numpy()) for k in sd)


def test_q_sample_p_losses_p_sample():
    td, fd, variables, (x, t, noise) = twins(batch=6)
    xf, tf, nf = nhwc(x), jnp.asarray(t), nhwc(noise)
    with torch.no_grad():
        q_t = td.q_sample(*tt(x, t, noise)).numpy()
        loss_t = td.p_losses(*tt(x, t, noise)).item()
    q_f = jax.jit(lambda v, *a: fd.apply(v, *a, method=J.DDPM.q_sample))(variables, xf, tf, nf)
    loss_f = jax.jit(lambda v, *a: fd.apply(v, *a, method=J.DDPM.p_losses))(variables, xf, tf, nf)
    p_sample = jax.jit(lambda v, *a: fd.apply(v, *a, method=J.DDPM.p_sample))
    assert harness.rel_err(q_t, nchw(q_f)) <= harness.FORWARD_TOL
    assert abs(loss_t - float(loss_f)) <= harness.FORWARD_TOL * loss_t
    for t_index in (5, 0):
        ts = np.full_like(t, t_index)
        ref = td.p_sample(*tt(x, ts), t_index, torch.from_numpy(noise)).numpy()
        got = p_sample(variables, xf, jnp.asarray(ts), t_index, nf)
        assert harness.rel_err(ref, nchw(got)) <= harness.FORWARD_TOL, t_index
    ref = td.p_sample(*tt(x, t), 7, torch.from_numpy(noise)).numpy()  # mixed t in one batch
    assert harness.rel_err(ref, nchw(p_sample(variables, xf, tf, 7, nf))) <= harness.FORWARD_TOL


def test_ancestral_trajectory():
    """All 1000 steps of the source's sampler from the same x_T with the same per-step noise."""
    td, fd, variables, (x, _, _) = twins(batch=2)
    rs = np.random.RandomState(3)
    img = rs.standard_normal(x.shape).astype(np.float32)
    noise = rs.standard_normal((1000, *x.shape)).astype(np.float32)
    ref = td.sample(8, 2, 1, img=torch.from_numpy(img), noise=torch.from_numpy(noise)).numpy()
    run = jax.jit(lambda v, img, noise: fd.apply(v, jax.random.key(0), 8, 2, 1, img, noise,
                                                 method=J.DDPM.sample))
    got = run(variables, nhwc(img), nhwc(noise))
    err = harness.rel_err(ref, nchw(got))
    assert err <= harness.TRAJECTORY_TOL, f"1000-step ancestral trajectory rel err {err:.3e}"


def test_ddim_trajectory():
    td, fd, variables, (x, _, _) = twins(batch=2)
    img = np.random.RandomState(4).standard_normal(x.shape).astype(np.float32)
    ref = td.ddim_sample(8, 2, 1, steps=50, img=torch.from_numpy(img)).numpy()
    got = jax.jit(lambda v, img: fd.apply(v, jax.random.key(0), 8, 2, 1, 50, img,
                                          method=J.DDPM.ddim_sample))(variables, nhwc(img))
    err = harness.rel_err(ref, nchw(got))
    assert err <= harness.TRAJECTORY_TOL, f"50-step DDIM trajectory rel err {err:.3e}"
    assert ddim_timesteps(1000, 50)[:2] == [999, 979] and ddim_timesteps(1000, 50)[-1] == 0
    assert ddim_timesteps(1000, 1) == [999] and len(ddim_timesteps(1000, 7)) == 7


def test_samplers_draw_from_the_key():
    _, fd, variables, _ = twins(batch=2, timesteps=20)
    sample = jax.jit(lambda v, k: fd.apply(v, k, 8, 3, 1, method=J.DDPM.sample))
    a, b, c = sample(variables, jax.random.key(1)), sample(variables, jax.random.key(1)), \
        sample(variables, jax.random.key(2))
    assert a.shape == (3, 8, 8, 1) and np.array_equal(a, b) and not np.allclose(a, c)
    d = jax.jit(lambda v, k: fd.apply(v, k, 8, 3, 1, 5, method=J.DDPM.ddim_sample))(variables, jax.random.key(1))
    assert d.shape == (3, 8, 8, 1) and np.all(np.isfinite(d))


def test_training_loss_draws_t_and_noise():
    _, fd, variables, (x, _, _) = twins(batch=4)
    loss = jax.jit(lambda k: fd.apply(variables, nhwc(x), rngs={"diffusion": k}))
    assert float(loss(jax.random.key(0))) == float(loss(jax.random.key(0))) != float(loss(jax.random.key(1)))


# --- presets ------------------------------------------------------------------

def test_presets_build_both_twins():
    p = get_preset("ddpm-digits")
    assert p.task == "diffusion" and p.family == "ddpm"
    tm, fm = torch_reference.create_model(p), jax_models.create_model(p)
    assert isinstance(tm, T.UNet) and isinstance(fm, J.UNet)
    assert get_preset("ddpm-cifar10").kwargs["features"] == (64, 128, 256, 512)


def test_clipped_samplers_match_and_stay_in_range():
    """`clip_denoised`: p_sample's posterior mean at the clipped x_0 (t = 0 gives x_0 itself), a
    whole ancestral trajectory on a 20-step schedule, and 50 DDIM steps, torch against Flax; DDIM's
    last step returns the clipped x_0, so its samples lie in [-1, 1]."""
    td, fd, variables, (x, t, noise) = twins(batch=6)
    xf, nf = nhwc(x * 3), nhwc(noise)  # x_t far outside the data range: the clip acts
    p_sample = jax.jit(lambda v, *a: fd.apply(v, *a, True, method=J.DDPM.p_sample))
    for t_index, ts in ((5, np.full_like(t, 5)), (0, np.zeros_like(t)), (7, t)):
        ref = td.p_sample(*tt(x * 3, ts), t_index, torch.from_numpy(noise), clip_denoised=True).numpy()
        got = p_sample(variables, xf, jnp.asarray(ts), t_index, nf)
        assert harness.rel_err(ref, nchw(got)) <= harness.FORWARD_TOL, t_index
    with torch.no_grad():
        eps = td.model(*tt(x * 3, np.zeros_like(t))).numpy()
    x0 = np.clip((x * 3 - td.sqrt_one_minus_alphas_cumprod[0].item() * eps) / td.sqrt_alphas_cumprod[0].item(), -1, 1)
    np.testing.assert_allclose(nchw(p_sample(variables, xf, jnp.zeros_like(t), 0, nf)), x0, atol=1e-5)

    td, fd, variables, (x, _, _) = twins(batch=2, timesteps=20)
    rs = np.random.RandomState(3)
    img = rs.standard_normal(x.shape).astype(np.float32)
    noise = rs.standard_normal((20, *x.shape)).astype(np.float32)
    ref = td.sample(8, 2, 1, img=torch.from_numpy(img), noise=torch.from_numpy(noise), clip_denoised=True).numpy()
    got = jax.jit(lambda v, img, noise: fd.apply(v, jax.random.key(0), 8, 2, 1, img, noise, True,
                                                 method=J.DDPM.sample))(variables, nhwc(img), nhwc(noise))
    assert harness.rel_err(ref, nchw(got)) <= harness.TRAJECTORY_TOL

    td, fd, variables, (x, _, _) = twins(batch=2)
    img = np.random.RandomState(4).standard_normal(x.shape).astype(np.float32)
    ref = td.ddim_sample(8, 2, 1, steps=50, img=torch.from_numpy(img), clip_denoised=True).numpy()
    got = jax.jit(lambda v, img: fd.apply(v, jax.random.key(0), 8, 2, 1, 50, img, True,
                                          method=J.DDPM.ddim_sample))(variables, nhwc(img))
    assert harness.rel_err(ref, nchw(got)) <= harness.TRAJECTORY_TOL
    assert np.abs(ref).max() <= 1.0 and np.abs(np.asarray(got)).max() <= 1.0
