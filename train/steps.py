"""TrainState, optimizer and the pure classification steps, with thin jit and pmap wrappers.

`train_step(state, batch, rng) -> (state, metrics)` knows nothing of devices; given an
`axis_name` it averages gradients and metrics over that axis with `lax.pmean` and folds the
device index into the dropout key. `jit_train_step` and `pmap_train_step` wrap it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

PMAP_AXIS = "batch"


class TrainState(train_state.TrainState):
    """Trainable `params`, optimizer state and step, plus the run's base `rng` (a typed key) and
    the model's other variable collections (`constants`, e.g. 'buffers'), passed through as is."""
    rng: jax.Array
    constants: Any = struct.field(default_factory=dict)

    def variables(self, params=None) -> dict:
        return {"params": self.params if params is None else params, **self.constants}


# ---------------------------------------------------------------------------------------------
# Recipe: schedule, weight-decay mask, optimizer


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end: float = 0.0
                  ) -> Callable[[Any], Any]:
    """Learning rate of update `count` (0-based): linear from peak/warmup up to `peak` over
    `warmup_steps`, then half a cosine down to `end` at `total_steps`.

    In float32 on a traced count (inside optax) and in float32 numpy on a host int, so both
    backends read the same rates from this one function without device round trips."""
    warmup_steps = max(int(warmup_steps), 0)
    decay_steps = max(int(total_steps) - warmup_steps, 1)

    def schedule(count):
        xp = jnp if isinstance(count, jax.Array) else np
        count = xp.asarray(count, xp.float32)
        f32 = lambda v: xp.asarray(v, xp.float32)  # noqa: E731
        warm = f32(peak) * (count + f32(1.0)) / f32(max(warmup_steps, 1))
        t = xp.clip((count - f32(warmup_steps)) / f32(decay_steps), f32(0.0), f32(1.0))
        cosine = f32(end) + f32(0.5 * (peak - end)) * (f32(1.0) + xp.cos(f32(np.pi) * t))
        return xp.where(count < warmup_steps, warm, cosine).astype(xp.float32)
    return schedule


def decay_mask(params) -> Any:
    """True for the weight matrices of Dense, Conv and Embed layers ('kernel', 'embedding');
    False for biases, norm scales and free parameters (class token, position table)."""
    def rule(path, leaf):
        name = getattr(path[-1], "key", getattr(path[-1], "name", str(path[-1])))
        return name in ("kernel", "embedding") and np.ndim(leaf) >= 2
    return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(schedule: Callable, weight_decay: float, grad_clip: float | None,
                   params, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                   ) -> optax.GradientTransformation:
    """AdamW on `schedule` with decoupled weight decay on `decay_mask(params)`, after clipping
    the global gradient norm to `grad_clip` (none when 0 or None)."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=decay_mask(params))
    if grad_clip:
        return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
    return adamw


def create_state(model, variables: dict, tx: optax.GradientTransformation, rng: jax.Array
                 ) -> TrainState:
    """A TrainState at step 0 from `model.init` output; only 'params' is trained."""
    variables = dict(variables)
    params = variables.pop("params")
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=rng,
                              constants=variables)
    return state.replace(step=jnp.zeros((), jnp.int32))


def cast_floating(tree, dtype):
    """`tree` with its floating-point arrays cast to `dtype` (ints, keys and the rest as they are)."""
    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x
    return jax.tree_util.tree_map(cast, tree)


def mixed_precision(apply_fn: Callable, dtype=jnp.bfloat16) -> Callable:
    """`apply_fn` computing in `dtype`: 'params' and the float inputs cast down on the way in,
    float outputs cast back to float32. The optimizer keeps float32 master weights, since the
    cast is inside the differentiated function; other collections (e.g. a noise schedule) stay
    float32."""
    def apply(variables, *args, **kwargs):
        variables = {**variables, "params": cast_floating(variables["params"], dtype)}
        out = apply_fn(variables, *cast_floating(args, dtype), **kwargs)
        return cast_floating(out, jnp.float32)
    return apply


# ---------------------------------------------------------------------------------------------
# The classification task


def classification_loss(logits, labels, label_smoothing: float = 0.0, mask=None):
    """Mean softmax cross-entropy over (B, K) logits and (B,) int labels, and the accuracy.

    With `mask` (B,) of 0/1 weights both are weighted means over the rows that count."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    if mask is None:
        return losses.mean(), correct.mean()
    count = jnp.maximum(mask.sum(), 1.0)
    return (losses * mask).sum() / count, (correct * mask).sum() / count


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, label_smoothing: float = 0.0,
               axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One AdamW update on `batch` = {'image': (B, H, W, C), 'label': (B,)}.

    Under pmap (`axis_name` set) gradients and metrics are averaged over the axis and each
    device draws dropout from its own key. Metrics: loss, accuracy, grad_norm."""
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def loss_fn(params):
        logits = state.apply_fn(state.variables(params), batch["image"], train=True,
                                rngs={"dropout": rng})
        return classification_loss(logits, batch["label"], label_smoothing)

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss": loss, "accuracy": accuracy}
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.apply_gradients(grads=grads), metrics


def eval_step(state: TrainState, batch: dict, *, axis_name: str | None = None) -> dict:
    """Sums over `batch` (with its 'mask' of real rows): loss_sum, correct, count."""
    logits = state.apply_fn(state.variables(), batch["image"], train=False)
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    sums = {"loss_sum": (losses * mask).sum(), "correct": (correct * mask).sum(),
            "count": mask.sum()}
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums


# ---------------------------------------------------------------------------------------------
# Wrappers


def step_rng(state: TrainState) -> jax.Array:
    """The key of the update `state.step` would make: a function of the base key and the step."""
    return jax.random.fold_in(state.rng, state.step)


def jit_train_step(step: Callable = train_step, **kwargs) -> Callable:
    """(state, batch) -> (state, metrics) jitted on one device, the state donated."""
    def wrapped(state, batch):
        return step(state, batch, step_rng(state), **kwargs)
    return jax.jit(wrapped, donate_argnums=0)


def pmap_train_step(step: Callable = train_step, axis_name: str = PMAP_AXIS, **kwargs
                    ) -> Callable:
    """(replicated state, sharded batch) -> (state, metrics) under pmap over `axis_name`.

    The batch carries a leading axis of local devices (`data.shard`); metrics come back
    replicated. The state is donated: replicate it with `replicate`, which copies."""
    def wrapped(state, batch):
        return step(state, batch, step_rng(state), axis_name=axis_name, **kwargs)
    return jax.pmap(wrapped, axis_name=axis_name, donate_argnums=0)


def jit_eval_step(step: Callable = eval_step) -> Callable:
    return jax.jit(step)


def pmap_eval_step(step: Callable = eval_step, axis_name: str = PMAP_AXIS) -> Callable:
    return jax.pmap(functools.partial(step, axis_name=axis_name), axis_name=axis_name)


def replicate(tree, devices=None):
    """`tree` stacked on a new leading axis over the local devices (fresh buffers, safe to
    donate)."""
    from flax import jax_utils
    return jax_utils.replicate(tree, devices)


def unreplicate(tree):
    """Device 0's copy of a replicated tree."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)
