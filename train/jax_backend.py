"""The JAX side of a run: jit on one device or pmap over the local devices."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from train import data as data_lib
from train import steps
from train.checkpoint import CheckpointError, Checkpoints
from train.train import MetricsLog, Run, Throughput, export_weights, summary

EVAL_BATCH = 512


def init_variables(r: Run):
    """(model, variables, train key): the model of `r.preset`, initialised from the run's seed.

    The torch backend starts from these same weights."""
    import jax_models

    model = jax_models.create_model(r.preset)
    init_key, train_key = jax.random.split(jax.random.key(r.config.seed))
    x = jnp.zeros((1, *r.preset.input_shape_nhwc), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, x))(init_key)
    return model, variables, train_key


def make_state(r: Run):
    model, variables, train_key = init_variables(r)
    schedule = steps.warmup_cosine(r.recipe["lr"], r.recipe["warmup_steps"], r.total_steps)
    tx = steps.make_optimizer(schedule, r.recipe["weight_decay"], r.recipe["grad_clip"],
                              variables["params"])
    return steps.create_state(model, variables, tx, train_key), schedule


def checkpoint_tree(state: steps.TrainState) -> dict:
    """The arrays of `state` as host numpy (the key as its raw data), safe to save while the
    device buffers are donated to the next step."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get({"step": state.step, "params": state.params,
                           "opt_state": state.opt_state,
                           "rng": jax.random.key_data(state.rng),
                           "constants": state.constants}))


def from_checkpoint_tree(state: steps.TrainState, tree: dict) -> steps.TrainState:
    to_jax = lambda t: jax.tree_util.tree_map(jnp.asarray, t)  # noqa: E731
    return state.replace(step=jnp.asarray(tree["step"]), params=to_jax(tree["params"]),
                         opt_state=to_jax(tree["opt_state"]),
                         rng=jax.random.wrap_key_data(jnp.asarray(tree["rng"])),
                         constants=to_jax(tree["constants"]))


def evaluate(state: steps.TrainState, dataset: data_lib.ArrayDataset, eval_fn) -> dict:
    """Mean loss and accuracy over `dataset` on one device."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for batch in data_lib.eval_batches(dataset, min(EVAL_BATCH, len(dataset))):
        sums = jax.device_get(eval_fn(state, batch))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    n = max(totals["count"], 1.0)
    return {"loss": totals["loss_sum"] / n, "accuracy": totals["correct"] / n,
            "count": int(totals["count"])}


def open_checkpoints(r: Run) -> Checkpoints:
    every = r.config.checkpoint_every if r.config.checkpoint_every is not None \
        else r.steps_per_epoch
    return Checkpoints(os.path.join(r.workdir, "checkpoints"), every, r.config.keep)


def check_fresh(r: Run, ckpt: Checkpoints):
    latest = ckpt.latest_step()
    if latest is not None:
        raise CheckpointError(f"{ckpt.directory} already holds checkpoints (latest: step "
                              f"{latest}); pass --resume to continue that run, or pick another "
                              "--workdir")


def train(r: Run) -> dict:
    cfg = r.config
    t_start = time.perf_counter()
    state, schedule = make_state(r)
    ckpt = open_checkpoints(r)
    start_step = 0
    if cfg.resume:
        tree, meta = ckpt.restore(checkpoint_tree(state), r.record())
        state = from_checkpoint_tree(state, tree)
        start_step = int(state.step)
        if meta.get("position") != r.position(start_step):
            raise CheckpointError(f"checkpoint at step {start_step} records data position "
                                  f"{meta.get('position')}, expected {r.position(start_step)}")
    else:
        check_fresh(r, ckpt)

    local_batch = r.recipe["batch_size"] // jax.process_count()
    if r.recipe["batch_size"] % jax.process_count():
        raise ValueError(f"global batch size {r.recipe['batch_size']} does not split evenly over "
                         f"{jax.process_count()} processes")
    if cfg.parallel == "pmap":
        n_dev = jax.local_device_count()
        if local_batch % n_dev:
            raise ValueError(f"batch size {local_batch} per process does not split evenly over "
                             f"{n_dev} local devices ({local_batch} % {n_dev} = "
                             f"{local_batch % n_dev}); use a multiple of {n_dev}")
        train_fn = steps.pmap_train_step(label_smoothing=r.recipe["label_smoothing"])
        dstate = steps.replicate(state)
        put = lambda b: data_lib.shard(b, n_dev)  # noqa: E731
        single = steps.unreplicate
    else:
        if jax.process_count() > 1:
            raise ValueError("--parallel jit trains on one device of one process; use --parallel "
                             "pmap with several processes")
        n_dev = 1
        train_fn = steps.jit_train_step(label_smoothing=r.recipe["label_smoothing"])
        dstate = state
        put = lambda b: b  # noqa: E731
        single = lambda s: s  # noqa: E731
    eval_fn = steps.jit_eval_step()
    # Fake CPU devices share one small thread pool: a pmap step dispatched while the last one
    # still runs can hold the threads its peers need to reach the all-reduce, and hang.
    sync_each_step = cfg.parallel == "pmap" and jax.default_backend() == "cpu"
    eval_every = cfg.eval_every or r.steps_per_epoch

    def save(step, force=False):
        if force or (ckpt.every and step % ckpt.every == 0):
            ckpt.save(step, checkpoint_tree(single(dstate)),
                      {**r.record(), "position": r.position(step)}, force=True)

    log = MetricsLog(r.workdir, r.total_steps, start_step, cfg.progress)
    speed = Throughput()
    step, metrics, last_eval = start_step, None, None
    try:
        for step, batch in r.batches_from(start_step):
            dstate, metrics = train_fn(dstate, put(batch))
            if sync_each_step:
                jax.block_until_ready(metrics)
            speed.tick(r.recipe["batch_size"])
            done = step + 1
            if done % cfg.log_every == 0 or done == r.total_steps:
                m = jax.device_get(metrics)
                if cfg.parallel == "pmap":
                    m = jax.tree_util.tree_map(lambda x: x[0], m)
                log.write({"step": done, "epoch": done / r.steps_per_epoch,
                           "loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
                           "grad_norm": float(m["grad_norm"]), "lr": float(schedule(step)),
                           "examples_per_second": speed.window_rate()})
            if done % eval_every == 0 and done != r.total_steps:
                last_eval = evaluate(single(dstate), r.test_data, eval_fn)
                log.write({"step": done, "eval_loss": last_eval["loss"],
                           "eval_accuracy": last_eval["accuracy"]})
            save(done)
            step = done
        final = jax.device_get(metrics) if metrics is not None else None
        if final is not None and cfg.parallel == "pmap":
            final = jax.tree_util.tree_map(lambda x: x[0], final)
        state = single(dstate)
        last_eval = evaluate(state, r.test_data, eval_fn)
        log.write({"step": step, "eval_loss": last_eval["loss"],
                   "eval_accuracy": last_eval["accuracy"]})
        save(step, force=True)
    finally:
        ckpt.close()
        log.close(step)

    export = None
    if cfg.export:
        from bridge import flax_to_torch
        export = export_weights(cfg.export, flax_to_torch(jax.device_get(state.variables())))
    return summary(
        r, final_loss=float(final["loss"]) if final is not None else None,
        final_accuracy=float(final["accuracy"]) if final is not None else None,
        eval_metrics=last_eval, step=step, throughput=speed.rate(),
        devices=n_dev * jax.process_count(), parallel=cfg.parallel,
        wall=time.perf_counter() - t_start, checkpoint_dir=ckpt.directory, export=export,
        start_step=start_step)
