"""The diffusion step: pmap over 8 devices equals jit on the whole batch; EMA; sample files; the check."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from presets import get_preset, with_overrides
from train import diffusion, steps


def tiny_preset():
    p = with_overrides(get_preset("ddpm-digits"), features=(8, 16), time_emb_dim=16, num_res_blocks=1,
                       dropout=0.0)
    return dataclasses.replace(p, image_size=8, train=dict(p.train, ema_decay=0.9))


def test_pmap_step_equals_jit_step_and_ema_follows():
    p = tiny_preset()
    n = jax.local_device_count()
    rs = np.random.RandomState(0)
    batch = {"image": rs.uniform(-1, 1, (2 * n, 8, 8, 1)).astype(np.float32),
             "t": rs.randint(0, 1000, 2 * n).astype(np.int32),
             "noise": rs.standard_normal((2 * n, 8, 8, 1)).astype(np.float32)}
    kw = dict(timesteps=1000, ema_decay=0.9)
    s0 = diffusion.create_state(p, jax.random.key(0), 10)
    # SGD: Adam's first step is lr * sign(g), a coin flip on leaves whose gradient is ~0
    s0 = s0.replace(tx=optax.sgd(0.1), opt_state=optax.sgd(0.1).init(s0.params))
    s_jit, m_jit = steps.jit_train_step(diffusion.diffusion_step, **kw)(
        jax.tree_util.tree_map(jnp.copy, s0), batch)
    shards = {k: v.reshape(n, 2, *v.shape[1:]) for k, v in batch.items()}
    s_pmap, m_pmap = steps.pmap_train_step(diffusion.diffusion_step, **kw)(steps.replicate(s0), shards)
    s_pmap = steps.unreplicate(s_pmap)
    assert abs(float(m_jit["loss"]) - float(m_pmap["loss"][0])) <= 1e-6 * float(m_jit["loss"])
    for a, b in zip(jax.tree_util.tree_leaves(s_jit.params), jax.tree_util.tree_leaves(s_pmap.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # step 0: d = min(0.9, 1/10) = 0.1, so ema = 0.1 * old + 0.9 * new
    for e, old, new in zip(*(jax.tree_util.tree_leaves(t) for t in (s_jit.ema_params, s0.params, s_jit.params))):
        np.testing.assert_allclose(e, 0.1 * old + 0.9 * new, rtol=1e-5, atol=1e-7)


def test_sampler_files_and_digit_check(tmp_path):
    p = tiny_preset()
    s = diffusion.create_state(p, jax.random.key(0), 10)
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
    """The eager torch step (train.diffusion_torch) and the JAX step from the same weights, t and
    noise: the same loss, weights and EMA (SGD, so that no Adam sign flips of ~0 gradients)."""
    import optax
    import torch

    import bridge
    from parity_tests import harness
    from train import diffusion_torch

    p = tiny_preset()
    torch.manual_seed(0)
    td = diffusion_torch.build(p)
    ema_t = diffusion_torch.make_ema(td)
    opt = torch.optim.SGD(td.parameters(), lr=0.1)
    rs = np.random.RandomState(0)
    x = rs.uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    t = rs.randint(0, 1000, 4)
    noise = rs.standard_normal(x.shape).astype(np.float32)
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
    fd = diffusion.build(p)
    variables = bridge.torch_to_flax(td.state_dict(), fd, nhwc(x), jnp.asarray(t), nhwc(noise))
    params = variables.pop("params")
    state = diffusion.DiffusionState.create(apply_fn=fd.apply, params=params, tx=optax.sgd(0.1),
                                            rng=jax.random.key(0), constants=variables,
                                            ema_params=jax.tree_util.tree_map(jnp.copy, params))
    m_t = diffusion_torch.diffusion_step(td, ema_t, opt, torch.from_numpy(x), 0, 0.9,
                                         t=torch.from_numpy(t), noise=torch.from_numpy(noise))
    state, m_f = jax.jit(lambda s, b: diffusion.diffusion_step(s, b, jax.random.key(0), timesteps=1000,
                                                               ema_decay=0.9))(
        state, {"image": nhwc(x), "t": jnp.asarray(t), "noise": nhwc(noise)})
    assert abs(m_t["loss"] - float(m_f["loss"])) <= 1e-5 * m_t["loss"]
    assert abs(m_t["grad_norm"] - float(m_f["grad_norm"])) <= 1e-4 * m_t["grad_norm"]
    for ours, theirs in [(state.params, td), (state.ema_params, ema_t)]:
        key, err = harness.worst_leaf(harness.torch_params(theirs), harness.flax_params_as_torch(ours))
        assert err <= harness.TRAJECTORY_TOL, f"{key}: {err:.3e}"
