"""The JAX side of a run: jit on one device or pmap over the local devices."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from train import data as data_lib
from train import steps
from train.checkpoint import CheckpointError, Checkpoints
from train.train import MetricsLog, Run, Throughput, export_weights, summary


def init_variables(r: Run):
    """(model, variables, train key): the task's model of `r.preset`, initialised from the run's
    seed. The torch backend starts from these same weights."""
    model = r.task.flax_model(r.preset)
    init_key, train_key = jax.random.split(jax.random.key(r.config.seed))
    args = r.task.init_args(r.preset)
    variables = jax.jit(lambda k: model.init(k, *args))(init_key)
    return model, variables, train_key


def make_state(r: Run):
    """(state at step 0, learning-rate schedule); under bf16 the state's `apply_fn` computes in
    bfloat16 over float32 master weights."""
    model, variables, train_key = init_variables(r)
    schedule = steps.warmup_cosine(r.recipe["lr"], r.recipe["warmup_steps"], r.total_steps)
    tx = steps.make_optimizer(schedule, r.recipe["weight_decay"], r.recipe["grad_clip"],
                              variables["params"])
    state = r.task.create_state(model, variables, tx, train_key)
    if r.config.precision == "bf16":
        state = state.replace(apply_fn=steps.mixed_precision(model.apply, jnp.bfloat16))
    return state, schedule


def _array_fields(state) -> list[str]:
    return [f.name for f in dataclasses.fields(state) if f.metadata.get("pytree_node", True)]


def checkpoint_tree(state: steps.TrainState) -> dict:
    """The arrays of `state` (every pytree field: step, params, opt_state, rng as its raw key
    data, constants, and a task's own, e.g. an EMA) as host numpy, safe to save while the device
    buffers are donated to the next step."""
    tree = {name: getattr(state, name) for name in _array_fields(state)}
    tree["rng"] = jax.random.key_data(tree["rng"])
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def from_checkpoint_tree(state: steps.TrainState, tree: dict) -> steps.TrainState:
    to_jax = lambda t: jax.tree_util.tree_map(jnp.asarray, t)  # noqa: E731
    fields = {name: to_jax(tree[name]) for name in _array_fields(state) if name != "rng"}
    return state.replace(**fields, rng=jax.random.wrap_key_data(jnp.asarray(tree["rng"])))


def open_checkpoints(r: Run) -> Checkpoints:
    return Checkpoints(os.path.join(r.workdir, "checkpoints"), r.checkpoint_every, r.config.keep)


def check_fresh(r: Run, ckpt: Checkpoints):
    latest = ckpt.latest_step()
    if latest is not None:
        raise CheckpointError(f"{ckpt.directory} already holds checkpoints (latest: step "
                              f"{latest}); pass --resume to continue that run, or pick another "
                              "--workdir")


@contextlib.contextmanager
def closing_on_error(ckpt: Checkpoints):
    """Close `ckpt` when the block raises: an unclosed orbax manager's threads outlive the error."""
    try:
        yield
    except BaseException:
        ckpt.close()
        raise


def check_position(r: Run, meta: dict, step: int):
    if meta.get("position") != r.position(step):
        raise CheckpointError(f"checkpoint at step {step} records data position "
                              f"{meta.get('position')}, expected {r.position(step)}")


def train(r: Run) -> dict:
    cfg, task = r.config, r.task
    t_start = time.perf_counter()
    extra = task.setup(r)
    state, schedule = make_state(r)
    model = task.flax_model(r.preset)
    ckpt = open_checkpoints(r)
    start_step = 0
    with closing_on_error(ckpt):
        if cfg.resume:
            tree, meta = ckpt.restore(checkpoint_tree(state), r.record())
            state = from_checkpoint_tree(state, tree)
            start_step = int(state.step)
            check_position(r, meta, start_step)
        else:
            check_fresh(r, ckpt)

    local_batch = r.recipe["batch_size"] // jax.process_count()
    if r.recipe["batch_size"] % jax.process_count():
        raise ValueError(f"global batch size {r.recipe['batch_size']} does not split evenly over "
                         f"{jax.process_count()} processes")
    kwargs = task.step_kwargs(r.recipe)
    if cfg.parallel == "pmap":
        n_dev = jax.local_device_count()
        if local_batch % n_dev:
            raise ValueError(f"batch size {local_batch} per process does not split evenly over "
                             f"{n_dev} local devices ({local_batch} % {n_dev} = "
                             f"{local_batch % n_dev}); use a multiple of {n_dev}")
        train_fn = steps.pmap_train_step(task.jax_step, **kwargs)
        dstate = steps.replicate(state)
        put = lambda b: data_lib.shard(b, n_dev)  # noqa: E731
        single = steps.unreplicate
    else:
        if jax.process_count() > 1:
            raise ValueError("--parallel jit trains on one device of one process; use --parallel "
                             "pmap with several processes")
        n_dev = 1
        train_fn = steps.jit_train_step(task.jax_step, **kwargs)
        dstate = state
        put = lambda b: b  # noqa: E731
        single = lambda s: s  # noqa: E731
    # Fake CPU devices share one small thread pool: a pmap step dispatched while the last one
    # still runs can hold the threads its peers need to reach the all-reduce, and hang.
    sync_each_step = cfg.parallel == "pmap" and jax.default_backend() == "cpu"

    def save(step, force=False):
        if force or (ckpt.every and step % ckpt.every == 0):
            ckpt.save(step, checkpoint_tree(single(dstate)),
                      {**r.record(), "position": r.position(step)}, force=True)

    def host_metrics(metrics):
        m = jax.device_get(metrics)
        if cfg.parallel == "pmap":
            m = jax.tree_util.tree_map(lambda x: x[0], m)
        return {k: float(v) for k, v in m.items()}

    log = MetricsLog(r.workdir, r.total_steps, start_step, cfg.progress, ("loss", *task.report))
    speed = Throughput()
    step, metrics, last_eval = start_step, None, {}
    try:
        for step, batch in r.batches_from(start_step):
            dstate, metrics = train_fn(dstate, put(task.batch(batch, step, r)))
            if sync_each_step:
                jax.block_until_ready(metrics)
            speed.tick(r.recipe["batch_size"])
            done = step + 1
            if done % cfg.log_every == 0 or done == r.total_steps:
                log.write({"step": done, "epoch": done / r.steps_per_epoch,
                           **host_metrics(metrics), "lr": float(schedule(step)),
                           "examples_per_second": speed.window_rate()})
            if r.eval_every and done % r.eval_every == 0 and done != r.total_steps:
                log.write({"step": done, **task.jax_evaluate(model, single(dstate), r)})
            save(done)
            step = done
        final = host_metrics(metrics) if metrics is not None else None
        state = single(dstate)
        last_eval = task.jax_evaluate(model, state, r)
        log.write({"step": step, **last_eval})
        save(step, force=True)
    finally:
        ckpt.close()
        log.close(step)
    extra.update(task.jax_finish(model, state, r))

    export = export_weights(cfg.export, task.jax_export(state)) if cfg.export else None
    return summary(
        r, final_metrics=final, eval_metrics=last_eval, extra=extra, step=step,
        throughput=speed.rate(), devices=n_dev * jax.process_count(), parallel=cfg.parallel,
        wall=time.perf_counter() - t_start, checkpoint_dir=ckpt.directory, export=export,
        start_step=start_step)
