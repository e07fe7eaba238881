"""Data parallelism, for every task: one pmap step over 8 (fake) devices on 8 shards of a batch,
and one jit step over a mesh of the 8 devices (the batch split over them, the state replicated or
FSDP-sharded), equal one jit step on the whole batch (contrastive: the negatives come from the
global batch, gathered over the devices under pmap)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from parity_tests.cases import mesh_cases, task_cases
from parity_tests.harness import ZERO_GRADIENT
from twin_models.presets import get_preset, without_dropout
from train import data as data_lib
from train import steps
from train.tasks import get_task, init_variables

# SGD makes each weight's change its gradient (rate 100: the change dwarfs the float32 spacing of
# a weight near 1, a norm scale say). AdamW's first step divides every gradient element by its own
# magnitude, so elements near zero turn rounding noise into changes of the order of the rate.
SGD_LR = 100.0
# Where some leaf's gradient is too small for that: (rate, reason).
SGD_LR_BY_TASK = {
    "captioning": (1e4, "GPT-2's initialisation (0.02, output projections scaled down by depth) gives the "
                        "second decoder block's norm scales gradients near 7e-6 at step 0; at rate 100 their "
                        "change (7e-4) is only ~1e4 float32 spacings of a weight near 1, and one rounding of "
                        "the weight (6e-8) is 8.7e-5 of it"),
}


def sgd_lr(task: str) -> float:
    return SGD_LR_BY_TASK.get(task, (SGD_LR,))[0]


def change_error(old, a, b) -> float:
    """max |a - b| over the largest change |a - old| of a leaf."""
    change = np.abs(np.asarray(a, np.float64) - np.asarray(old, np.float64)).max()
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / max(change, 1e-12))


def change_errors(old, a, b) -> dict:
    """{leaf path: `change_error`}; a leaf whose true gradient is 0 (`harness.ZERO_GRADIENT`, and
    the key bias of the `nn.MultiheadAttention` twin, which keeps q, k, v apart where torch packs
    them: its SGD change is rounding noise) is measured against the largest change of any leaf."""
    zero_suffixes = (*ZERO_GRADIENT, "key.bias")

    f64 = lambda t: {jax.tree_util.keystr(k): np.asarray(v, np.float64)  # noqa: E731
                     for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    old, a, b = f64(old), f64(a), f64(b)
    largest = max(np.abs(a[k] - old[k]).max() for k in a)
    zero = lambda k: k.replace("']['", ".").strip("[']").endswith(zero_suffixes)  # noqa: E731
    return {k: (float(np.abs(a[k] - b[k]).max() / largest) if zero(k) else change_error(old[k], a[k], b[k]))
            for k in a}


@pytest.mark.skipif(jax.local_device_count() < 8, reason="needs 8 (fake) devices; conftest sets "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8")
@pytest.mark.parametrize("name", task_cases())
def test_pmap_step_on_8_shards_equals_jit_on_whole_batch(name):
    preset = without_dropout(get_preset(name))
    task = get_task(preset)
    model, variables, key = init_variables(task, preset, 0)
    state = task.jax_training.create_state(model, variables, optax.sgd(sgd_lr(preset.task)), key)
    batch = task.example_batch(preset, 16, seed=0)
    kw = task.jax_training.step_kwargs(preset.train)
    with jax.default_matmul_precision("highest"):
        jit_state, jit_m = steps.jit_train_step(task.jax_training.step, **kw)(jax.tree_util.tree_map(jnp.copy, state), batch)
        pmap_state, pmap_m = steps.pmap_train_step(task.jax_training.step, **kw)(steps.replicate(state),
                                                                          data_lib.shard(batch, 8))
    replicas = jax.tree_util.tree_leaves((pmap_state.params, pmap_state.opt_state))
    assert all(np.array_equal(x[0], x[-1]) for x in replicas), "the devices' copies differ"
    pmap_state = steps.unreplicate(pmap_state)
    assert int(pmap_state.step) == int(jit_state.step) == 1
    errs = change_errors(state.params, jit_state.params, pmap_state.params)
    worst = max(errs.values())
    print(f"{name}: pmap(8) vs jit, worst relative weight-change error {worst:.2e}")
    assert worst <= 1e-5, errs
    for k in jit_m:
        np.testing.assert_allclose(pmap_m[k][0], float(jit_m[k]), rtol=1e-5, err_msg=k)


@pytest.mark.skipif(jax.local_device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
@pytest.mark.parametrize("name", mesh_cases())
def test_mesh_step_equals_jit_on_whole_batch(name, fsdp):
    preset = without_dropout(get_preset(name))
    task = get_task(preset)
    model, variables, key = init_variables(task, preset, 0)
    state = task.jax_training.create_state(model, variables, optax.sgd(sgd_lr(preset.task)), key)
    batch = task.example_batch(preset, 16, seed=0)
    kw = task.jax_training.step_kwargs(preset.train)
    mesh = steps.make_mesh()
    shardings = steps.state_shardings(state, mesh, fsdp)
    with jax.default_matmul_precision("highest"):
        jit_state, jit_m = steps.jit_train_step(task.jax_training.step, **kw)(jax.tree_util.tree_map(jnp.copy, state), batch)
        mesh_state, mesh_m = steps.mesh_train_step(task.jax_training.step, mesh, shardings, **kw)(
            steps.put_state(state, shardings), steps.put_batch(batch, mesh))
    split = [x for x in jax.tree_util.tree_leaves(mesh_state.params) if not x.sharding.is_fully_replicated]
    assert bool(split) == fsdp, "FSDP splits the parameters, the replicated mesh does not"
    errs = change_errors(state.params, jit_state.params, mesh_state.params)
    worst = max(errs.values())
    print(f"{name}: mesh(8{', fsdp' if fsdp else ''}) vs jit, worst relative weight-change error {worst:.2e}")
    assert worst <= 1e-5, errs
    for k in jit_m:
        np.testing.assert_allclose(float(mesh_m[k]), float(jit_m[k]), rtol=1e-5, err_msg=k)
