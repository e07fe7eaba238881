"""The parity harness every test uses: forward, gradients and an AdamW trajectory, each with one
error metric and one tolerance (`bridge.verify`'s); the measurements are `bridge.parity`'s, which
`python -m bridge verify --all` shares.

Every error is `rel_err`: the largest absolute difference over the largest magnitude of the
reference (torch) value, per leaf; a trajectory's loss error is relative to its largest loss.
Gradients and weights are compared in torch key names: Flax trees go through
`bridge.flax_to_torch`, so the fused and transposed layouts are handled by the same rules.
`check_forward`, `check_gradients` and `check_trajectory` assert the tolerances and return the
figures they measured.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
import torch

import bridge
from bridge.parity import (ZERO_GRADIENT, ZERO_GRADIENT_FACTOR, adamw_trajectories,  # noqa: F401  (one definition)
                           flax_params_as_torch, gradient_errors, precision, rel_err, torch_params,
                           worst_leaf, zero_gradient_noise)
from bridge.verify import FORWARD_TOL, GRAD_TOL, TRAJECTORY_TOL  # noqa: F401  (one definition)


def as_reference_layout(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """`got` (Flax) in the layout of `ref` (torch): an NHWC image batch becomes NCHW."""
    got = np.asarray(got)
    if got.ndim == 4 and got.shape != ref.shape and got.transpose(0, 3, 1, 2).shape == ref.shape:
        return got.transpose(0, 3, 1, 2)
    return got


def forward_error(torch_model, flax_model, variables, torch_inputs: Sequence, flax_inputs: Sequence) -> float:
    """The worst `rel_err` over the outputs of both models in eval mode; the outputs must pair up
    one to one (a missing or extra output is an error, not a pass)."""
    torch_model.eval()
    with torch.no_grad():
        ref = torch_model(*torch_inputs)
    got = jax.jit(flax_model.apply)(variables, *flax_inputs)
    refs, gots = jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)
    assert len(refs) == len(gots), f"torch gives {len(refs)} outputs, Flax {len(gots)}"
    return max(rel_err(r.numpy(), as_reference_layout(r.numpy(), g)) for r, g in zip(refs, gots, strict=True))


def relu_sign_flips(torch_model, flax_model, variables, torch_inputs, flax_inputs, module_suffix="linear1"):
    """How many pre-activations of the modules named `*module_suffix` have opposite signs in the
    two frameworks (ties at the ReLU kink, decided by float32 rounding)."""
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.update({n: o.detach().numpy()}))
             for n, m in torch_model.named_modules() if n.endswith(module_suffix)]
    torch_model.eval()
    with torch.no_grad():
        torch_model(*torch_inputs)
    for h in hooks:
        h.remove()
    _, state = jax.jit(lambda v, *x: flax_model.apply(v, *x, capture_intermediates=True,
                                                      mutable=["intermediates"]))(variables, *flax_inputs)
    from flax.traverse_util import flatten_dict
    flips = 0
    for path, value in flatten_dict(state["intermediates"]).items():
        name = bridge.flax_module_path_to_torch(path[:-1], bridge.module_paths(variables["params"]))
        if name in seen:
            flips += int(np.sum((np.asarray(value[0]) > 0) != (seen[name] > 0)))
    return flips


def check_forward(torch_model, flax_model, variables, torch_inputs, flax_inputs, label: str) -> float:
    err = forward_error(torch_model, flax_model, variables, torch_inputs, flax_inputs)
    print(f"{label}: forward rel err {err:.2e}")
    assert err <= FORWARD_TOL, f"{label}: forward rel err {err:.3e} > {FORWARD_TOL:g}"
    return err


def check_gradients(torch_model, flax_model, variables, losses, torch_batch, flax_batch, label: str,
                    float64=False) -> tuple[str, float]:
    """Every gradient leaf within GRAD_TOL, the loss within FORWARD_TOL; (worst key, its error)."""
    torch_loss, flax_loss = losses
    errs, loss_t, loss_f = gradient_errors(torch_model, flax_model, variables, torch_loss, jax.jit(flax_loss),
                                           torch_batch, flax_batch, float64=float64)
    worst = max(errs, key=errs.get)
    print(f"{label}: worst gradient {worst} {errs[worst]:.2e}, loss rel err {abs(loss_t - loss_f) / abs(loss_t):.2e}")
    assert abs(loss_t - loss_f) <= FORWARD_TOL * abs(loss_t), f"{label}: losses {loss_t} vs {loss_f}"
    assert errs[worst] <= GRAD_TOL, f"{label}: gradient of {worst} rel err {errs[worst]:.3e} > {GRAD_TOL:g}"
    return worst, errs[worst]


def check_trajectory(torch_model, flax_model, variables, losses, torch_batches, flax_batches, label: str,
                     lr: float, weight_decay: float, float64=False, falls=False, xfail_if=None) -> dict:
    """20 AdamW steps (or as many as batches) in both frameworks: the losses within
    TRAJECTORY_TOL relative to the largest loss; in float64 the final weights too (see
    `adamw_trajectories`). `falls`: the loss must also fall (last 4 steps' mean below the first 4's).
    `xfail_if(loss_err) -> reason or None` turns a miss into an xfail with a stated reason."""
    import pytest

    torch_loss, flax_loss = losses
    w_0 = torch_params(torch_model)
    losses_t, losses_f, w_t, w_f = adamw_trajectories(
        torch_model, flax_model, variables, torch_loss, jax.jit(flax_loss), torch_batches, flax_batches,
        lr=lr, weight_decay=weight_decay, float64=float64)
    loss_err = rel_err(losses_t, losses_f)
    _, moved = worst_leaf(w_0, {k: v.astype(w_0[k].dtype) for k, v in w_t.items()})
    out = {"loss_err": loss_err, "moved": moved}
    print(f"{label}: losses {np.round(losses_t[[0, -1]], 4).tolist()}, trajectory loss rel err {loss_err:.2e}")
    assert moved > 100 * TRAJECTORY_TOL, f"{label}: the weights moved only {moved:.2e}"
    if falls:
        assert losses_t[-4:].mean() < losses_t[:4].mean(), f"{label}: the loss did not fall: {losses_t}"
    reason = xfail_if(loss_err) if xfail_if and loss_err > TRAJECTORY_TOL else None
    if reason:
        pytest.xfail(reason)
    assert loss_err <= TRAJECTORY_TOL, f"{label}: loss rel err {loss_err:.3e} > {TRAJECTORY_TOL:g}"
    if float64:
        key, w_err = worst_leaf(w_t, w_f)
        out["weights_err"] = w_err
        print(f"{label}: final weight {key} rel err {w_err:.2e}")
        assert w_err <= TRAJECTORY_TOL, f"{label}: final weight {key} rel err {w_err:.3e}"
    return out
