"""The diffusion step: pmap over 8 devices equals jit on the whole batch; EMA; the torch step;
sample files; the digits check; short runs of both backends through the shared trainer."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from presets import get_preset, with_overrides
from train import steps
from train.tasks import diffusion


def tiny_preset():
    p = with_overrides(get_preset("ddpm-digits"), features=(8, 16), time_emb_dim=16, num_res_blocks=1,
                       dropout=0.0)
    return dataclasses.replace(p, image_size=8, train=dict(p.train, ema_decay=0.9))


def _state(p, tx=None, seed=0):
    import optax
    ddpm = diffusion.build(p)
    variables = ddpm.init(jax.random.key(seed), *diffusion.Diffusion().init_args(p))
    return diffusion.create_state(ddpm, variables, tx or optax.adam(1e-3), jax.random.key(seed + 1))


def test_ema_follows_the_warmed_up_decay():
    """Step 0: the decay is min(0.9, 1/10) = 0.1, so ema = 0.1 * old + 0.9 * new."""
    p = tiny_preset()
    rs = np.random.RandomState(0)
    batch = {"image": rs.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32),
             "t": rs.randint(0, 1000, 4).astype(np.int32),
             "noise": rs.standard_normal((4, 8, 8, 1)).astype(np.float32)}
    s0 = _state(p, optax.sgd(0.1))
    s1, _ = steps.jit_train_step(diffusion.diffusion_step, timesteps=1000, ema_decay=0.9)(
        jax.tree_util.tree_map(jnp.copy, s0), batch)
    for e, old, new in zip(*(jax.tree_util.tree_leaves(t) for t in (s1.ema_params, s0.params, s1.params))):
        np.testing.assert_allclose(e, 0.1 * old + 0.9 * new, rtol=1e-5, atol=1e-7)


def test_sampler_files_and_digit_check(tmp_path):
    p = tiny_preset()
    s = _state(p)
    samples = np.asarray(diffusion.sampler(p, 4, ddim_steps=3)({"params": s.ema_params, **s.constants},
                                                               jax.random.key(1)))
    assert samples.shape == (4, 8, 8, 1) and samples.min() >= -1 and samples.max() <= 1
    npy, png = diffusion.save_samples(samples, str(tmp_path))
    np.testing.assert_array_equal(np.load(npy), samples)
    from PIL import Image
    assert Image.open(png).size[0] > 8 * 2
    from train.data import load_digits
    _, test = load_digits(8, 1)
    check = diffusion.digit_check(test.images[:200])
    assert check["passed"] and check["confident"] > 0.9, check


def test_torch_step_equals_jax_step():
    """The eager torch step (`DiffusionTask` in `TorchTrainer`) and the JAX step from the same
    weights, t and noise: the same loss, weights and EMA (SGD, so that no Adam sign flips of ~0
    gradients)."""

    import bridge
    from parity_tests import harness
    from train.torch_backend import TorchTrainer

    p = tiny_preset()
    task = diffusion.Diffusion()
    torch.manual_seed(0)
    td = task.torch_model(p)
    trainer = TorchTrainer(td, task, dict(p.train, weight_decay=0.0, grad_clip=0.0),
                           lambda step: 0.1, set(), optimizer=torch.optim.SGD(td.parameters(), lr=0.1))
    rs = np.random.RandomState(0)
    x = rs.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    t = rs.randint(0, 1000, 4).astype(np.int32)
    noise = rs.standard_normal(x.shape).astype(np.float32)
    fd = diffusion.build(p)
    variables = bridge.torch_to_flax(td.state_dict(), fd, x, t, noise)
    state = diffusion.create_state(fd, variables, optax.sgd(0.1), jax.random.key(0))
    m_t = trainer.train_step({"image": x, "t": t, "noise": noise})
    state, m_f = jax.jit(lambda s, b: diffusion.diffusion_step(s, b, jax.random.key(0), timesteps=1000,
                                                               ema_decay=0.9))(
        state, {"image": x, "t": t, "noise": noise})
    assert abs(m_t["loss"] - float(m_f["loss"])) <= 1e-5 * m_t["loss"]
    assert abs(m_t["grad_norm"] - float(m_f["grad_norm"])) <= 1e-4 * m_t["grad_norm"]
    for ours, theirs in [(state.params, td), (state.ema_params, task.ema)]:
        key, err = harness.worst_leaf(harness.torch_params(theirs), harness.flax_params_as_torch(ours))
        assert err <= harness.TRAJECTORY_TOL, f"{key}: {err:.3e}"
