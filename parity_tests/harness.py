"""The parity harness every test uses: forward, gradients and an AdamW trajectory, each with one
error metric and one tolerance (`bridge.verify`'s).

Every error is `rel_err`: the largest absolute difference over the largest magnitude of the
reference (torch) value, per leaf; a trajectory's loss error is relative to its largest loss.
Gradients and weights are compared in torch key names: Flax trees go through
`bridge.flax_to_torch`, so the fused and transposed layouts are handled by the same rules.
`check_forward`, `check_gradients` and `check_trajectory` assert the tolerances and return the
figures they measured.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import bridge
from bridge.verify import FORWARD_TOL, GRAD_TOL, TRAJECTORY_TOL  # noqa: F401  (one definition)
from train.torch_backend import zero_unused_grads


def rel_err(ref, got) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    assert ref.shape == got.shape, f"shapes differ: {ref.shape} vs {got.shape}"
    scale = np.max(np.abs(ref)) if ref.size else 0.0
    err = np.max(np.abs(ref - got)) if ref.size else 0.0
    return float(err / scale) if scale > 0 else float(err)


def worst_leaf(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> tuple[str, float]:
    """(key, relative error) of the worst leaf; the key sets must be equal."""
    assert set(ref) == set(got), f"key sets differ: {sorted(set(ref) ^ set(got))}"
    errs = {k: rel_err(ref[k], got[k]) for k in ref}
    key = max(errs, key=errs.get)
    return key, errs[key]


def torch_params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: p.detach().cpu().numpy().copy() for k, p in model.named_parameters()}


def flax_params_as_torch(params) -> dict[str, np.ndarray]:
    return bridge.flax_to_torch({"params": params})


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


@contextlib.contextmanager
def precision(float64: bool):
    """Both frameworks in float64 (JAX's x64, torch's default dtype) or as they are."""
    default = torch.get_default_dtype()
    with jax.enable_x64(float64):
        if float64:
            torch.set_default_dtype(torch.float64)
        try:
            yield
        finally:
            torch.set_default_dtype(default)


def _in_float64(torch_model, variables, torch_batch, flax_batch):
    to64 = lambda t: jnp.asarray(t, jnp.float64) if jnp.issubdtype(t.dtype, jnp.floating) else t
    torch_batch = tuple(t.double() if t.is_floating_point() else t for t in torch_batch)
    return (torch_model.double(), jax.tree_util.tree_map(to64, variables), torch_batch,
            jax.tree_util.tree_map(to64, flax_batch))


def gradient_errors(torch_model, flax_model, variables, torch_loss: Callable, flax_loss: Callable,
                    torch_batch, flax_batch, float64=False):
    """Per-leaf relative gradient errors, and the two losses.

    `torch_loss(model, batch) -> scalar tensor`; `flax_loss(params, variables, batch) -> scalar`.
    `float64=True` runs both in double precision: a ReLU pre-activation within float32 rounding
    of zero may take the other side of the kink in the other framework, which changes that
    unit's gradient wholesale; in float64 no such tie is left at these sizes.
    """
    with precision(float64):
        if float64:
            torch_model, variables, torch_batch, flax_batch = _in_float64(
                torch_model, variables, torch_batch, flax_batch)
        torch_model.train()
        torch_model.zero_grad()
        loss_t = torch_loss(torch_model, torch_batch)
        loss_t.backward()
        zero_unused_grads(torch_model)
        ref = {k: p.grad.detach().numpy() for k, p in torch_model.named_parameters()}
        loss_f, grads = jax.value_and_grad(flax_loss)(variables["params"], variables, flax_batch)
        got = flax_params_as_torch(grads)
    assert set(ref) == set(got), f"gradient keys differ: {sorted(set(ref) ^ set(got))}"
    scale = max(float(np.max(np.abs(g))) for g in ref.values() if g.size)
    errs = {k: (zero_gradient_noise(ref[k], got[k], scale) if k.endswith(ZERO_GRADIENT) else rel_err(ref[k], got[k]))
            for k in ref}
    return errs, loss_t.item(), float(loss_f)


# Leaves whose true gradient is exactly 0: the key bias of an attention with its own key
# projection (`CrossModalAttention.k_proj`; softmax ignores the constant q.b_k it adds to a
# query's logits). Both frameworks must give 0 up to rounding, which is noise of the size of the
# largest gradient's rounding: their error is the larger of the two over the largest gradient of
# any leaf, held to 1% of GRAD_TOL.
ZERO_GRADIENT = ("k_proj.bias",)
ZERO_GRADIENT_FACTOR = 1e2


def zero_gradient_noise(ref, got, scale: float) -> float:
    """max(|ref|, |got|) over `scale` (the largest gradient), times ZERO_GRADIENT_FACTOR, so that
    GRAD_TOL holds it to 1% of GRAD_TOL."""
    noise = max(float(np.max(np.abs(ref))), float(np.max(np.abs(np.asarray(got, np.float64)))))
    return ZERO_GRADIENT_FACTOR * noise / scale if scale > 0 else noise


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


def adamw_trajectories(torch_model, flax_model, variables, torch_loss: Callable, flax_loss: Callable,
                       torch_batches: Sequence, flax_batches: Sequence, lr=1e-3, betas=(0.9, 0.999),
                       eps=1e-8, weight_decay=0.05, float64=False):
    """Train both twins with AdamW on the same batches: (torch losses, flax losses, final torch
    weights, final flax weights in torch keys).

    `float64=True` runs both frameworks in double precision. Adam divides each gradient by its
    own running RMS, so in float32 a leaf whose true gradient is zero or below ~100 eps (the key
    bias of attention, whose gradient softmax cancels exactly) moves by rounding noise scaled up
    to the learning rate, differently in every implementation (torch float32 against torch
    float64 differs as much). Final weights are therefore held to the tolerance in float64,
    where that noise is gone and any difference in the model or the optimizer remains.
    """
    with precision(float64):
        return _adamw_trajectories(torch_model, flax_model, variables, torch_loss, flax_loss, torch_batches,
                                   flax_batches, lr, betas, eps, weight_decay, float64)


def _adamw_trajectories(torch_model, flax_model, variables, torch_loss, flax_loss, torch_batches,
                        flax_batches, lr, betas, eps, weight_decay, float64):
    if float64:
        torch_model = torch_model.double()
        torch_batches = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in torch_batches]
    torch_model.train()
    opt = torch.optim.AdamW(torch_model.parameters(), lr=lr, betas=betas, eps=eps,
                            weight_decay=weight_decay)
    losses_t = []
    for batch in torch_batches:
        opt.zero_grad()
        loss = torch_loss(torch_model, batch)
        loss.backward()
        zero_unused_grads(torch_model)
        opt.step()
        losses_t.append(loss.item())
    del opt, loss  # Adam's moments and the graph: 4 copies of the weights that JAX doesn't need
    torch_model.zero_grad(set_to_none=True)
    gc.collect()

    cast = ((lambda t: jnp.asarray(t, jnp.float64) if jnp.issubdtype(t.dtype, jnp.floating) else t)
            if float64 else jnp.asarray)
    if float64:
        flax_batches = [jax.tree_util.tree_map(cast, b) for b in flax_batches]
    tx = optax.adamw(lr, b1=betas[0], b2=betas[1], eps=eps, weight_decay=weight_decay)
    params = jax.tree_util.tree_map(lambda t: jnp.array(cast(t), copy=True), variables["params"])
    variables = {k: jax.tree_util.tree_map(cast, v) for k, v in variables.items() if k != "params"}
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(flax_loss)(params, variables, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses_f = []
    for batch in flax_batches:
        params, opt_state, loss = step(params, opt_state, batch)
        losses_f.append(float(loss))
    final_f = flax_params_as_torch(params)
    return np.array(losses_t), np.array(losses_f), torch_params(torch_model), final_f


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
