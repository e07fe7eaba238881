"""TrainState, the recipe (schedule, weight-decay mask, AdamW), the one gradient step every
task's pure step is built on, and the thin jit and pmap wrappers.

A task's step `(state, batch, rng, *, axis_name=None, **kw) -> (state, metrics)` knows nothing
of devices: it hands its loss to `gradient_step`, which, given an `axis_name`, averages gradients
and metrics over that axis with `lax.pmean` and folds the device index into the key.
`jit_train_step`, `pmap_train_step` and `mesh_train_step` (jit over a device mesh, the batch split
on a 'data' axis, the state replicated or FSDP-sharded) wrap any such step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils, struct
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


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end: float = 0.0,
                  decay_fraction: float = 1.0) -> Callable[[Any], Any]:
    """Learning rate of update `count` (0-based): linear from peak/warmup up to `peak` over
    `warmup_steps`, then half a cosine down to `end` at `total_steps`. With `decay_fraction` < 1
    the rate holds at `peak` after the warm-up and the cosine takes only the last
    `decay_fraction` of the steps after it (warm-up, stable, decay: the learning rate stays high
    while a slow transition is still to come). An optax schedule (a
    function of the step count) written out in float32 rather than `optax.join_schedules` of
    `linear_schedule` and `cosine_decay_schedule`: those compute the same rates in another order
    and differ in the last bits (up to 1.7e-5 relative on vit-digits), which moves a 440-step run
    (loss 0.5182 -> 0.5150); this form keeps the trajectories the project's figures were
    measured on. In float32 on a traced count (inside optax) and in float32 numpy on a host int
    (the torch backend, through `host_schedule`); the two agree to an ulp or two of the cosine."""
    warmup_steps = max(int(warmup_steps), 0)
    if not 0 < decay_fraction <= 1:
        raise ValueError(f"decay_fraction must be in (0, 1], not {decay_fraction!r}")
    after_warmup = max(int(total_steps) - warmup_steps, 0)
    decay_start = int(total_steps) - int(round(decay_fraction * after_warmup))
    decay_steps = max(int(total_steps) - decay_start, 1)

    def schedule(count):
        xp = jnp if isinstance(count, jax.Array) else np
        count = xp.asarray(count, xp.float32)
        f32 = lambda v: xp.asarray(v, xp.float32)  # noqa: E731
        warm = f32(peak) * (count + f32(1.0)) / f32(max(warmup_steps, 1))
        t = xp.clip((count - f32(decay_start)) / f32(decay_steps), f32(0.0), f32(1.0))
        cosine = f32(end) + f32(0.5 * (peak - end)) * (f32(1.0) + xp.cos(f32(np.pi) * t))
        return xp.where(count < warmup_steps, warm, cosine).astype(xp.float32)
    schedule.numpy_on_host = True
    return schedule


def host_schedule(schedule: Callable) -> Callable[[int], float]:
    """`schedule` as a host function of an int step -> float: `warmup_cosine` in float32 numpy
    (no device round trip per torch step), any other optax schedule through one compiled program."""
    if getattr(schedule, "numpy_on_host", False):
        return lambda step: float(schedule(int(step)))
    compiled = jax.jit(schedule)
    return lambda step: float(compiled(np.int32(step)))


def ema_decay(count, decay: float):
    """The weight of the old average after update `count` (0-based): min(decay, (1 + count) /
    (10 + count)), warmed up as in big-vision and timm; the EMA is d * ema + (1 - d) * params.
    In float32 on a traced count (JAX); a Python float on a host int (torch). Not
    `optax.incremental_update`: its `step * new + (1 - step) * old` with step = 1 - d rounds
    differently and would move every EMA the project's figures were measured with."""
    if isinstance(count, jax.Array):
        count = count.astype(jnp.float32)
        return jnp.minimum(decay, (1.0 + count) / (10.0 + count))
    return min(decay, (1.0 + count) / (10.0 + count))


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
# The one gradient step


def gradient_step(state: TrainState, loss_fn: Callable, rng: jax.Array,
                  axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One optimizer update of `state` with `loss_fn(params, rng) -> (loss, metrics)`.

    Under pmap (`axis_name` set) each device folds its index into `rng` (its own dropout and
    noise draws), and gradients and metrics are averaged over the axis with `lax.pmean`.
    A step whose loss or gradients are not finite changes nothing: the parameters, optimizer
    state and step count come back bit for bit as they were, and `metrics['nonfinite']` is 1.
    Returns the new state and the metrics with 'loss', 'grad_norm' and 'nonfinite'."""
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, rng)
    metrics = {"loss": loss, **metrics}
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    metrics["grad_norm"] = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    new = state.apply_gradients(grads=grads)
    keep = lambda a, b: jax.tree_util.tree_map(lambda x, y: jnp.where(finite, x, y), a, b)  # noqa: E731
    new = new.replace(params=keep(new.params, state.params), opt_state=keep(new.opt_state, state.opt_state),
                      step=jnp.where(finite, new.step, state.step))
    metrics["nonfinite"] = (~finite).astype(jnp.int32)
    return new, metrics


# ---------------------------------------------------------------------------------------------
# Wrappers


def step_rng(state: TrainState) -> jax.Array:
    """The key of the update `state.step` would make: a function of the base key and the step."""
    return jax.random.fold_in(state.rng, state.step)


def jit_train_step(step: Callable, **kwargs) -> Callable:
    """(state, batch) -> (state, metrics) jitted on one device, the state donated."""
    def wrapped(state, batch):
        return step(state, batch, step_rng(state), **kwargs)
    return jax.jit(wrapped, donate_argnums=0)


def pmap_train_step(step: Callable, axis_name: str = PMAP_AXIS, **kwargs
                    ) -> Callable:
    """(replicated state, sharded batch) -> (state, metrics) under pmap over `axis_name`.

    The batch carries a leading axis of local devices (`data.shard`); metrics come back
    replicated. The state is donated: replicate it with `replicate`, which copies."""
    def wrapped(state, batch):
        return step(state, batch, step_rng(state), axis_name=axis_name, **kwargs)
    return jax.pmap(wrapped, axis_name=axis_name, donate_argnums=0)


MESH_AXIS = "data"


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A one-axis mesh ('data') over `devices` (default: every device of every process)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return jax.sharding.Mesh(devices, (MESH_AXIS,))


def fsdp_spec(x, n: int) -> jax.sharding.PartitionSpec:
    """How FSDP splits one array over `n` devices: its largest axis that `n` divides (the first of
    equals), or nothing (replicated) when none does, or when it is a scalar or small."""
    P = jax.sharding.PartitionSpec
    shape = np.shape(x)
    if not shape or np.prod(shape) < 4 * n:
        return P()
    fits = [i for i, d in enumerate(shape) if d % n == 0]
    if not fits:
        return P()
    axis = max(fits, key=lambda i: (shape[i], -i))
    return P(*(MESH_AXIS if i == axis else None for i in range(len(shape))))


def state_shardings(state, mesh, fsdp: bool = False):
    """The sharding of every leaf of `state` on `mesh`: replicated, or with `fsdp` the parameters,
    the optimizer state and any other float arrays (an EMA) split by `fsdp_spec`."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if not fsdp:
        return jax.tree_util.tree_map(lambda _: replicated, state)
    n = mesh.devices.size
    split = lambda x: jax.sharding.NamedSharding(mesh, fsdp_spec(x, n))  # noqa: E731
    shardings = jax.tree_util.tree_map(split, state)
    return shardings.replace(step=replicated, rng=replicated, constants=jax.tree_util.tree_map(
        lambda _: replicated, state.constants))


def mesh_train_step(step: Callable, mesh: jax.sharding.Mesh, state_sharding, **kwargs) -> Callable:
    """(state, global batch) -> (state, metrics) under `jax.jit` on `mesh`: the batch split over
    the 'data' axis, the state as `state_sharding` says (replicated, or FSDP). The step runs as
    written for one device, on the global batch: XLA partitions it and adds the reductions, so no
    `axis_name` (and no pmean) is involved and the result is jit's on the whole batch. The state is
    donated."""
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(MESH_AXIS))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def wrapped(state, batch):
        return step(state, batch, step_rng(state), **kwargs)
    return jax.jit(wrapped, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)


def put_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """A host's share of a global batch -> global arrays split over the mesh's 'data' axis (each
    process passes its own rows; `jax.make_array_from_process_local_data` puts them together)."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(MESH_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def put_state(state, shardings):
    """`state` (the same values in every process) placed as `shardings` say, as global arrays built
    from each process's host copy: fresh buffers, so the step can donate them (a replicated
    `device_put` may share its source's buffer), and valid when the mesh spans processes."""
    def put(x, sharding):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree_util.tree_map(put, state, shardings)


def replicate(tree, devices=None):
    """`tree` stacked on a new leading axis over the local devices (fresh buffers, safe to
    donate)."""
    return jax_utils.replicate(tree, devices)


def unreplicate(tree):
    """Device 0's copy of a replicated (pmap) tree, taken from device 0's own buffers.

    Indexing `x[0]` instead compiles and launches, per leaf, a program over every device with an
    all-reduce; hundreds of those queued back to back on fake CPU devices can take their launch
    slots out of order and deadlock (docs/troubleshooting.md#a-run-stops-making-progress)."""
    def first(x):
        if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
            return x[0]
        shard = min(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return shard.data.reshape(x.shape[1:])
    return jax.tree_util.tree_map(first, tree)
