"""The JAX adapter of the training loop (`train.loop`): the task's pure step under jit on one
device, pmap over the local devices, or jit over a mesh of every device (the batch split on its
'data' axis; the state replicated, or sharded with --fsdp), the state donated to each step."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jax_models import compile_cache
from jax_models.xla_flags import train_compiler_options
from train import data as data_lib
from train import distributed
from train import steps
from train.config import Run, check_devices
from train.tasks import init_variables


def make_state(r: Run):
    """The state at step 0; under bf16 its `apply_fn` computes in bfloat16 over float32 master
    weights."""
    model, variables, train_key = init_variables(r.task, r.preset, r.config.seed, r.config.attention_impl)
    tx = steps.make_optimizer(r.schedule, r.recipe["weight_decay"], r.recipe["grad_clip"],
                              variables["params"])
    state = r.task.jax_training.create_state(model, variables, tx, train_key)
    if r.config.precision == "bf16":
        state = state.replace(apply_fn=steps.mixed_precision(model.apply, jnp.bfloat16))
    return state


def _array_fields(state) -> list[str]:
    return [f.name for f in dataclasses.fields(state) if f.metadata.get("pytree_node", True)]


def checkpoint_tree(state: steps.TrainState) -> dict:
    """The arrays of `state` (every pytree field: step, params, opt_state, rng as its raw key
    data, constants, and a task's own, e.g. an EMA) as host numpy, safe to save while the device
    buffers are donated to the next step."""
    tree = {name: getattr(state, name) for name in _array_fields(state)}
    tree["rng"] = jax.random.key_data(tree["rng"])
    return jax.tree_util.tree_map(_host, tree)


def _host(x) -> np.ndarray:
    """A whole array on this host: FSDP shards held by other processes are gathered first."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def from_checkpoint_tree(state: steps.TrainState, tree: dict) -> steps.TrainState:
    to_jax = lambda t: jax.tree_util.tree_map(jnp.asarray, t)  # noqa: E731
    fields = {name: to_jax(tree[name]) for name in _array_fields(state) if name != "rng"}
    return state.replace(**fields, rng=jax.random.wrap_key_data(jnp.asarray(tree["rng"])))


class JaxBackend:
    """jit (one device of one process), pmap (every local device; gradients pmean'd) or mesh
    (jit over every device of every process; XLA partitions the global batch's step)."""

    def __init__(self, r: Run):
        self.r, self.role = r, r.task.jax_training
        self.model = self.role.model(r.preset, r.config.attention_impl)
        check_devices(r.config, r.recipe["batch_size"])
        state = make_state(r)
        self.parallel = r.config.parallel
        processes = jax.process_count()
        kwargs = self.role.step_kwargs(r.recipe)
        if self.parallel == "pmap":
            n = jax.local_device_count()
            self.step_fn = steps.pmap_train_step(self.role.step, **kwargs)
            self.state = steps.replicate(state)
            self.put = lambda b: data_lib.shard(b, n)  # noqa: E731
            self.single = steps.unreplicate
        elif self.parallel == "mesh":
            mesh = steps.make_mesh()
            n = mesh.devices.size // processes
            self.shardings = steps.state_shardings(state, mesh, r.config.fsdp)
            self.step_fn = steps.mesh_train_step(self.role.step, mesh, self.shardings, **kwargs)
            self.state = steps.put_state(state, self.shardings)
            self.put = lambda b: steps.put_batch(b, mesh)  # noqa: E731
            self.single = lambda s: s  # noqa: E731
            self.parallel = "mesh-fsdp" if r.config.fsdp else "mesh"
        else:
            n = 1
            self.step_fn = steps.jit_train_step(self.role.step, **kwargs)
            self.state = state
            self.put = lambda b: b  # noqa: E731
            self.single = lambda s: s  # noqa: E731
        self.devices = n * processes
        # Fake CPU devices share one small thread pool: a pmap step dispatched while the last one
        # still runs can hold the threads its peers need to reach the all-reduce, and hang.
        self.sync_each_step = self.parallel != "jit" and jax.default_backend() == "cpu"
        self.compiled = None   # {'seconds', 'cache'} once the step is compiled

    def compile(self, batch):
        """The step compiled ahead of time for this state and batch: its compile time and whether
        the persistent cache held it go into the summary. Several processes then meet at a barrier
        (their first collective must find every peer within 30 s)."""
        hits, t0 = compile_cache.stats()["hits"], time.perf_counter()
        options = train_compiler_options(self.r.recipe.get("cpu_dot_fusion", False))
        compiled = self.step_fn.lower(self.state, batch).compile(compiler_options=options)
        self.compiled = {"seconds": time.perf_counter() - t0,
                         "cache": "warm" if compile_cache.stats()["hits"] > hits else "cold",
                         "options": options or {}}
        if jax.process_count() > 1:
            distributed.barrier("train_first_step")
        return compiled

    def info(self) -> dict:
        """What the summary reports of this backend beyond the task's figures."""
        return {"compile_seconds": (self.compiled or {}).get("seconds"),
                "compiler_options": (self.compiled or {}).get("options"),
                "compile_cache": (self.compiled or {}).get("cache") if jax.config.jax_compilation_cache_dir
                else "off"}

    def state_tree(self) -> dict:
        return checkpoint_tree(self.single(self.state))

    def load_state_tree(self, tree: dict) -> int:
        state = from_checkpoint_tree(self.single(self.state), tree)
        if self.parallel == "pmap":
            self.state = steps.replicate(state)
        elif self.parallel.startswith("mesh"):
            self.state = steps.put_state(state, self.shardings)
        else:
            self.state = state
        return int(state.step)

    def step(self, batch: dict):
        batch = self.put(batch)
        if self.compiled is None:
            self.step_fn = self.compile(batch)
        self.state, metrics = self.step_fn(self.state, batch)
        if self.sync_each_step:
            jax.block_until_ready(metrics)
        return metrics

    def read(self, metrics) -> dict:
        m = jax.device_get(metrics)
        if self.parallel == "pmap":
            m = jax.tree_util.tree_map(lambda x: x[0], m)
        return {k: float(v) for k, v in m.items()}

    def evaluate(self) -> dict:
        return self.role.evaluate(self.model, self.single(self.state), self.r)

    def finish(self) -> dict:
        return self.role.finish(self.model, self.single(self.state), self.r)

    def export(self) -> dict:
        """Every process gathers the whole state (FSDP shards included); process 0 writes it."""
        keep = lambda x: x if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else _host(x)  # noqa: E731
        return self.role.export(jax.tree_util.tree_map(keep, self.single(self.state)))
