"""train.steps: pmap over 8 devices equals jit on the whole batch; JAX and eager PyTorch follow
the same 20-step trajectory from the same weights."""

import json

import jax
import numpy as np
import pytest

from parity_tests import harness
from train import steps
from train.tasks.classification import train_step
from train.loop import Config, resolve

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 4}


def _run(preset="vit-digits", dropout=0.0, steps_=20, batch_size=32, **kw):
    return resolve(Config(preset=preset, dropout=dropout, steps=steps_, batch_size=batch_size,
                          warmup_steps=5, progress=False, **kw))


def test_schedule_warms_up_then_decays():
    s = steps.warmup_cosine(1.0, 4, 20)
    values = [float(s(i)) for i in range(21)]
    np.testing.assert_allclose(values[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    assert values[4] == pytest.approx(1.0) and values[20] == pytest.approx(0.0, abs=1e-7)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def test_decay_fraction_holds_the_peak_then_decays_over_the_last_steps():
    """Warm-up, stable, decay: with decay_fraction 0.25 the rate stays at the peak until the last
    quarter of the steps after the warm-up; 1.0 is the plain cosine, the same float32 rates."""
    wsd, cosine = steps.warmup_cosine(1.0, 4, 44, decay_fraction=0.25), steps.warmup_cosine(1.0, 4, 44)
    values = [float(wsd(i)) for i in range(45)]
    assert values[:4] == [float(cosine(i)) for i in range(4)]
    assert values[4:35] == [1.0] * 31 and values[35] < 1.0 and values[44] == 0.0
    assert all(a > b for a, b in zip(values[34:], values[35:]))
    np.testing.assert_allclose([float(wsd(jax.numpy.asarray(i))) for i in range(34, 45)], values[34:],
                               rtol=1e-6, atol=1e-7)   # the traced count: an ulp or two of the cosine
    same = steps.warmup_cosine(1.0, 4, 44, decay_fraction=1.0)
    assert [float(same(i)) for i in range(45)] == [float(cosine(i)) for i in range(45)]
    r = _run(model_overrides=TINY, steps_=44, recipe_overrides={"decay_fraction": 0.25})
    expected = steps.warmup_cosine(r.recipe["lr"], 5, 44, decay_fraction=0.25)
    assert [r.lr(i) for i in range(45)] == [float(expected(i)) for i in range(45)]
    assert r.lr(34) == pytest.approx(r.recipe["lr"]) and r.lr(35) < r.lr(34)
    with pytest.raises(ValueError, match=r"decay_fraction=1.5: .*a number in \(0, 1\]"):
        _run(model_overrides=TINY, recipe_overrides={"decay_fraction": 1.5})


def test_cpu_dot_fusion_compiles_the_step_with_its_options_and_trains_the_same(tmp_path):
    """The recipe's `cpu_dot_fusion` reaches the step's compile (the summary names the options)
    and changes nothing but rounding: the same losses within the forward tolerance; a value that
    is not a bool is refused."""
    from jax_models import xla_flags
    from train.loop import run
    losses = {}
    for fused in (False, True):
        summary = run(Config(preset="vit-digits", model_overrides=TINY, steps=6, batch_size=16, log_every=1,
                             progress=False, workdir=str(tmp_path / str(fused)),
                             recipe_overrides={"cpu_dot_fusion": fused}))
        expected = xla_flags.train_compiler_options(fused) or {}
        assert summary["compiler_options"] == expected
        assert (expected == xla_flags.DOT_FUSION_OPTIONS) == (fused and jax.default_backend() == "cpu")
        lines = (tmp_path / str(fused) / "metrics.jsonl").read_text().splitlines()
        losses[fused] = [json.loads(l)["loss"] for l in lines if '"loss"' in l]
    assert len(losses[True]) == 6
    np.testing.assert_allclose(losses[True], losses[False], rtol=harness.FORWARD_TOL)
    with pytest.raises(ValueError, match=r"cpu_dot_fusion=1: cpu_dot_fusion must be true or false"):
        _run(model_overrides=TINY, recipe_overrides={"cpu_dot_fusion": 1})


def test_decay_mask_covers_weight_matrices_only():
    from train.tasks import init_variables
    r = _run(model_overrides=TINY)
    _, variables, _ = init_variables(r.task, r.preset, 0)
    flat = jax.tree_util.tree_leaves_with_path(steps.decay_mask(variables["params"]))
    decayed = {jax.tree_util.keystr(p) for p, m in flat if m}
    assert decayed and all("kernel" in p for p in decayed)
    assert not any("cls" in p or "pos" in p or "bias" in p or "scale" in p for p in decayed)


@pytest.mark.skipif(jax.local_device_count() < 8, reason="needs 8 (fake) devices")
def test_pmap_devices_draw_different_dropout():
    from train.jax_backend import make_state
    r = _run(model_overrides=TINY, dropout=0.5, batch_size=8)
    state = make_state(r)
    one = next(r.batches_from(0))[1]
    one = {k: v[:1] for k, v in one.items()}
    same = {k: np.repeat(v[None], 8, 0) for k, v in one.items()}
    _, pm = steps.pmap_train_step(train_step)(steps.replicate(state), same)
    _, device0 = jax.jit(train_step)(state, one,
                                           jax.random.fold_in(steps.step_rng(state), 0))
    assert abs(float(pm["loss"][0]) - float(device0["loss"])) > 1e-6


@pytest.mark.parametrize("preset", ["vit-digits", "encoder-vit-digits"])
def test_torch_and_jax_follow_the_same_20_steps(preset):
    """The two trainers from the same weights on the same batches: losses within the trajectory
    tolerance, relative to the largest loss, up to the first step where a ReLU pre-activation
    sits on opposite sides of the kink in the two frameworks (a float32 tie: that unit's
    derivative is 0 in one and 1 in the other, so the updates part for good; encoder-vit-digits
    meets one at step 2 of 20). Every step is checked when no tie comes."""
    import torch

    import jax_models
    from train import torch_backend
    from train.jax_backend import make_state
    r = _run(preset, grad_clip=0.5, label_smoothing=0.1)
    state = make_state(r)
    trainer = torch_backend.build(r)
    n_decay = sum(p.numel() for g in trainer.optimizer.param_groups if g["weight_decay"]
                  for p in g["params"])
    mask = steps.decay_mask(state.params)
    assert n_decay == sum(int(np.size(p)) for p, m in zip(
        jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(mask)) if m)
    step_fn = steps.jit_train_step(train_step, label_smoothing=r.recipe["label_smoothing"])
    model = jax_models.create_model(r.preset)
    jax_losses, torch_losses, first_tie = [], [], None
    torch.set_flush_denormal(False)
    with jax.default_matmul_precision("highest"):
        for i, batch in r.batches_from(0):
            if first_tie is None and harness.relu_sign_flips(
                    trainer.model, model, state.variables(),
                    [torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())], [batch["image"]]):
                first_tie = i
            state, m = step_fn(state, batch)
            jax_losses.append(float(m["loss"]))
            torch_losses.append(trainer.train_step(batch)["loss"])
    assert len(jax_losses) == 20
    checked = 20 if first_tie is None else first_tie + 1
    err = harness.rel_err(torch_losses[:checked], jax_losses[:checked])
    print(f"{preset}: torch vs jax, max loss error {err:.2e} of the largest loss over {checked} steps "
          f"(first ReLU tie: {first_tie}); over all 20: {harness.rel_err(torch_losses, jax_losses):.2e}; "
          f"losses {jax_losses[0]:.4f} -> {jax_losses[-1]:.4f}")
    assert checked >= 3, f"a ReLU tie at step {first_tie} leaves too few steps to compare"
    assert err <= harness.TRAJECTORY_TOL, (jax_losses, torch_losses)
    assert jax_losses[-1] < jax_losses[0]
