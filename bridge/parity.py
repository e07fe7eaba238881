"""The measurements the parity suite and `python -m bridge verify --all` share: the relative error,
per-parameter gradients and an AdamW trajectory of both twins from the same weights and batches.

Every error is `rel_err`: the largest absolute difference over the largest magnitude of the
reference (torch) value, per leaf. Gradients and weights are compared in torch key names: Flax
trees go through `flax_to_torch`, so the fused and transposed layouts follow the bridge's rules.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .convert import flax_to_torch


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


def torch_params(model) -> dict[str, np.ndarray]:
    return {k: p.detach().cpu().numpy().copy() for k, p in model.named_parameters()}


def flax_params_as_torch(params) -> dict[str, np.ndarray]:
    return flax_to_torch({"params": params})


@contextlib.contextmanager
def precision(float64: bool):
    """Both frameworks in float64 (JAX's x64, torch's default dtype) or as they are."""
    import torch

    default = torch.get_default_dtype()
    with jax.enable_x64(float64):
        if float64:
            torch.set_default_dtype(torch.float64)
        try:
            yield
        finally:
            torch.set_default_dtype(default)


def _in_float64(torch_model, variables, torch_batch, flax_batch):
    to64 = lambda t: jnp.asarray(t, jnp.float64) if jnp.issubdtype(t.dtype, jnp.floating) else t  # noqa: E731
    torch_batch = tuple(t.double() if t.is_floating_point() else t for t in torch_batch)
    return (torch_model.double(), jax.tree_util.tree_map(to64, variables), torch_batch,
            jax.tree_util.tree_map(to64, flax_batch))


# Leaves whose true gradient is exactly 0: the key bias of an attention with its own key
# projection (`CrossModalAttention.k_proj`; softmax ignores the constant q.b_k it adds to a
# query's logits). Both frameworks must give 0 up to rounding, which is noise of the size of the
# largest gradient's rounding: their error is the larger of the two over the largest gradient of
# any leaf, times ZERO_GRADIENT_FACTOR (held to 1% of the gradient tolerance).
ZERO_GRADIENT = ("k_proj.bias",)
ZERO_GRADIENT_FACTOR = 1e2


def zero_gradient_noise(ref, got, scale: float) -> float:
    """max(|ref|, |got|) over `scale` (the largest gradient), times ZERO_GRADIENT_FACTOR."""
    noise = max(float(np.max(np.abs(ref))), float(np.max(np.abs(np.asarray(got, np.float64)))))
    return ZERO_GRADIENT_FACTOR * noise / scale if scale > 0 else noise


def parity_jit(fn):
    """`jax.jit` with `jax_models.xla_flags.parity_compiler_options()` (on CPU, XLA's own dots in
    place of YNNPACK's, which round several times more)."""
    from jax_models.xla_flags import parity_compiler_options

    return jax.jit(fn, compiler_options=parity_compiler_options())


def gradient_errors(torch_model, flax_model, variables, torch_loss: Callable, flax_loss: Callable,
                    torch_batch, flax_batch, float64=False):
    """(relative error of every parameter's gradient by torch name, torch loss, Flax loss).

    `torch_loss(model, batch) -> scalar tensor`; `flax_loss(params, variables, batch) -> scalar`.
    `float64=True` runs both in double precision: a ReLU pre-activation within float32 rounding
    of zero may take the other side of the kink in the other framework, which changes that
    unit's gradient wholesale; in float64 no such tie is left at these sizes.
    """
    from train.torch_backend import zero_unused_grads

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
        loss_f, grads = parity_jit(jax.value_and_grad(flax_loss))(variables["params"], variables, flax_batch)
        got = flax_params_as_torch(grads)
    assert set(ref) == set(got), f"gradient keys differ: {sorted(set(ref) ^ set(got))}"
    scale = max(float(np.max(np.abs(g))) for g in ref.values() if g.size)
    errs = {k: (zero_gradient_noise(ref[k], got[k], scale) if k.endswith(ZERO_GRADIENT) else rel_err(ref[k], got[k]))
            for k in ref}
    return errs, loss_t.item(), float(loss_f)


def torch_trajectory(torch_model, torch_loss: Callable, torch_batches: Sequence, lr=1e-3, betas=(0.9, 0.999),
                     eps=1e-8, weight_decay=0.05) -> np.ndarray:
    """Train `torch_model` in place with AdamW on `torch_batches`: the loss of every step."""
    import torch

    from train.torch_backend import zero_unused_grads

    torch_model.train()
    opt = torch.optim.AdamW(torch_model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    losses = []
    for batch in torch_batches:
        opt.zero_grad()
        loss = torch_loss(torch_model, batch)
        loss.backward()
        zero_unused_grads(torch_model)
        opt.step()
        losses.append(loss.item())
    del opt  # Adam's moments and the graph: copies of the weights the caller doesn't need
    torch_model.zero_grad(set_to_none=True)
    gc.collect()
    return np.array(losses)


def nudge(torch_model, seed: int):
    """Move every float weight of `torch_model` one ulp, up or down at random (`seed`), in place:
    a float32 rounding's worth of difference, to see what training makes of it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in torch_model.parameters():
            toward = torch.where(torch.rand(p.shape, generator=g) < 0.5, np.inf, -np.inf).to(p.dtype)
            p.copy_(torch.nextafter(p, toward))
    return torch_model


def rounding_control(make_model: Callable, torch_loss: Callable, torch_batches: Sequence, seeds: int = 4,
                     **adamw) -> float:
    """How far torch's own float32 trajectory moves when every weight moves one ulp: the worst,
    over `seeds` nudges, of the largest loss difference over the largest loss. A twin's difference
    of this size is the training's sensitivity to rounding, not a difference of the models.
    `make_model()` gives a fresh model with the starting weights."""
    base = torch_trajectory(make_model(), torch_loss, torch_batches, **adamw)
    scale = np.max(np.abs(base)) or 1.0
    return max(float(np.max(np.abs(torch_trajectory(nudge(make_model(), s), torch_loss, torch_batches, **adamw) - base)))
               / scale for s in range(seeds))


def flax_rounding_control(make_model: Callable, flax_model, flax_inputs: Sequence, flax_loss: Callable,
                          flax_batches: Sequence, seeds: int = 4, **adamw) -> float:
    """`rounding_control` of the Flax twin: its float32 trajectory from `make_model()`'s weights
    against the same from those weights each moved one ulp (`nudge`, the same seeds), carried
    into Flax by the bridge (`flax_inputs`: an input that gives the shapes)."""
    from .convert import torch_to_flax

    def trajectory(model):
        variables = torch_to_flax(model.state_dict(), flax_model, *flax_inputs)
        return flax_trajectory(flax_model, variables, flax_loss, flax_batches, **adamw)[0]

    base = trajectory(make_model())
    scale = np.max(np.abs(base)) or 1.0
    return max(float(np.max(np.abs(trajectory(nudge(make_model(), s)) - base))) / scale for s in range(seeds))


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
    import torch

    if float64:
        torch_model = torch_model.double()
        torch_batches = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in torch_batches]
    losses_t = torch_trajectory(torch_model, torch_loss, torch_batches, lr, betas, eps, weight_decay)

    losses_f, final_f = _flax_trajectory(flax_model, variables, flax_loss, flax_batches, lr, betas, eps,
                                         weight_decay, float64)
    return np.array(losses_t), losses_f, torch_params(torch_model), final_f


def flax_trajectory(flax_model, variables, flax_loss: Callable, flax_batches: Sequence, lr=1e-3,
                    betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, float64=False):
    """Train the Flax twin's `variables` with optax's AdamW on `flax_batches`: (the loss of every
    step, the final weights in torch keys). `adamw_trajectories`' Flax half."""
    with precision(float64):
        return _flax_trajectory(flax_model, variables, flax_loss, flax_batches, lr, betas, eps, weight_decay,
                                float64)


def _flax_trajectory(flax_model, variables, flax_loss, flax_batches, lr, betas, eps, weight_decay, float64):
    import optax

    from jax_models.xla_flags import parity_compiler_options

    cast = ((lambda t: jnp.asarray(t, jnp.float64) if jnp.issubdtype(t.dtype, jnp.floating) else t)
            if float64 else jnp.asarray)
    if float64:
        flax_batches = [jax.tree_util.tree_map(cast, b) for b in flax_batches]
    tx = optax.adamw(lr, b1=betas[0], b2=betas[1], eps=eps, weight_decay=weight_decay)
    params = jax.tree_util.tree_map(lambda t: jnp.array(cast(t), copy=True), variables["params"])
    variables = {k: jax.tree_util.tree_map(cast, v) for k, v in variables.items() if k != "params"}
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1), compiler_options=parity_compiler_options())
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(flax_loss)(params, variables, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses_f = []
    for batch in flax_batches:
        params, opt_state, loss = step(params, opt_state, batch)
        losses_f.append(float(loss))
    return np.array(losses_f), flax_params_as_torch(params)

