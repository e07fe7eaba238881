"""The diffusion step: pmap over 8 devices equals jit on the whole batch; EMA; the torch step;
sample files; the digits check and the sample-quality metrics; short runs of both backends through the shared trainer."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from jax_models.xla_flags import init_compiler_options
from twin_models.presets import get_preset, with_overrides
from train import steps
from train.tasks import diffusion


def tiny_preset():
    p = with_overrides(get_preset("ddpm-digits"), features=(8, 16), time_emb_dim=16, num_res_blocks=1,
                       dropout=0.0)
    return dataclasses.replace(p, image_size=8, train=dict(p.train, ema_decay=0.9))


def _state(p, tx=None, seed=0):
    import optax
    ddpm = diffusion.build(p)
    args = diffusion.Diffusion().jax_training.init_args(p)
    variables = jax.jit(lambda k: ddpm.init(k, *args), compiler_options=init_compiler_options())(jax.random.key(seed))
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
    td = task.torch_training.model(p)
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
    for ours, theirs in [(state.params, td), (state.ema_params, trainer.extra["ema"])]:
        key, err = harness.worst_leaf(harness.torch_params(theirs), harness.flax_params_as_torch(ours))
        assert err <= harness.TRAJECTORY_TOL, f"{key}: {err:.3e}"


# --- sample quality: Frechet distance, speckle, summary ------------------------------------------

def test_frechet_distance_of_a_set_against_itself_is_zero():
    rs = np.random.RandomState(0)
    a = rs.standard_normal((300, 16)) @ rs.standard_normal((16, 16))
    assert abs(diffusion.frechet_distance(a, a)) < 1e-6
    # a shift of the mean by d adds |d|^2; two halves of one draw are far closer than another Gaussian
    np.testing.assert_allclose(diffusion.frechet_distance(a, a + 0.5), 16 * 0.25, rtol=1e-6)
    b = rs.standard_normal((300, 16)) @ rs.standard_normal((16, 16))
    assert diffusion.frechet_distance(a, b) > 3 * diffusion.frechet_distance(a[:150], a[150:])


def test_frechet_distance_matches_the_matrix_square_root():
    """The eigendecomposition form equals FID's sqrtm form on full-rank covariances."""
    from scipy import linalg
    rs = np.random.RandomState(1)
    a, b = rs.standard_normal((200, 8)), rs.standard_normal((150, 8)) * 1.5 + 0.3
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a) + np.trace(s_b)
           - 2 * np.trace(np.real(linalg.sqrtm(s_a @ s_b))))
    np.testing.assert_allclose(diffusion.frechet_distance(a, b), ref, rtol=1e-9)


def test_roughness_flags_noise_and_passes_real_digits():
    from train.data import load_digits
    train, test = load_digits(16, 1)
    real = diffusion.roughness(np.concatenate([train.images, test.images]))
    noise = np.clip(np.random.RandomState(0).standard_normal((64, 16, 16, 1)), -1, 1)
    assert real.max() < 0.5 and diffusion.roughness(noise).min() > 4 * real.max()
    # half the pixels of real digits speckled: still flagged (above twice the roughest real digit)
    speckled = train.images[:64].copy()
    mask = np.random.RandomState(1).rand(*speckled.shape) < 0.5
    speckled[mask] = np.clip(speckled[mask] + np.random.RandomState(2).standard_normal(mask.sum()), -1, 1)
    assert diffusion.roughness(speckled).min() > 2 * real.max()


def test_digit_quality_of_real_digits_and_of_noise():
    """Real test digits score as the floor (no noise, recognized as often as the test set, Frechet
    distance near the floor); clipped noise is all flagged and far from the digits."""
    from train.data import load_digits
    _, test = load_digits(16, 1)
    real = diffusion.digit_quality(test.images[:100])
    assert real["noise_samples"] == 0 and real["rougher_than_real"] == 0
    assert abs(real["confident"] - real["real_confident"]) < 0.1 and real["fd_ratio"] < 1.5, real
    noise = np.clip(np.random.RandomState(0).standard_normal((100, 16, 16, 1)), -1, 1).astype(np.float32)
    bad = diffusion.digit_quality(noise)
    assert bad["noise_samples"] == 100 and bad["fd_ratio"] > 10 and bad["fd_floor"] == real["fd_floor"], bad
    assert diffusion.digit_quality(test.images[:100]) == real  # deterministic


def test_report_writes_the_quality_figures(tmp_path):
    """What `summary.json` gets from the diffusion task: the sample files, `digit_check` and
    `sample_quality` (the trainer's own summary test checks that report entries reach the file)."""
    import types
    from train.data import load_digits
    _, test = load_digits(16, 1)
    p = get_preset("ddpm-digits")
    r = types.SimpleNamespace(workdir=str(tmp_path), preset=p, recipe=dict(p.train))
    out = diffusion.sample_report(test.images[:32], 1.0, r)
    q = out["sample_quality"]
    for key in ("fd_samples", "fd_floor", "fd_ratio", "noise_samples", "confident", "real_confident",
                "digit_shares", "real_roughness_max"):
        assert key in q, key
    assert out["digit_check"]["confident"] == q["confident"] and out["sampler"] == "ancestral-1000-clip"
