"""Checkpoints with orbax: a pytree of arrays ('state') and a JSON record of the run ('meta').

Saving is asynchronous; `Checkpoints.close()` waits for the last save. Restoring checks the run
record and the tree against what this run expects, and every failure is a `CheckpointError`
that names the folder: a checkpoint that can't be used never turns into a silent fresh start.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from train.settings import SCHEDULE_DEFAULTS


class CheckpointError(RuntimeError):
    pass


# What a resumed run must share with the run that wrote the checkpoint for it to be the same run.
RUN_KEYS = ("preset", "model_kwargs", "backend", "data", "seed", "batch_size", "total_steps",
            "lr", "weight_decay", "warmup_steps", "decay_fraction", "label_smoothing", "grad_clip",
            "precision")
RUN_DEFAULTS = SCHEDULE_DEFAULTS  # what a checkpoint written before these keys existed ran with


class Checkpoints:
    """Every `every` steps (and on `save(..., force=True)`), keeping the last `keep`."""

    def __init__(self, directory: str, every: int, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.every = every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 cleanup_tmp_directories=True),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        """Starts saving `state` (a pytree of arrays) when `step` is due or `force`d."""
        if not force and (not self.every or step % self.every):
            return False
        if step in self.manager.all_steps():
            return False
        meta = {**meta, "checksum": checksum(state)}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, target: Any, run: dict, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default: the latest), shaped like `target`.

        `target` is a pytree of arrays or `jax.ShapeDtypeStruct`s; `run` holds this run's values
        of RUN_KEYS, which must equal the checkpoint's."""
        step = self.latest_step() if step is None else step
        where = os.path.join(self.directory, str(step))
        if step is None:
            raise CheckpointError(f"--resume: no finished checkpoint in {self.directory}")
        try:
            _check_json(os.path.join(where, "meta", "metadata"))
            meta = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise CheckpointError(f"checkpoint {where} is unreadable (its run record failed to "
                                  f"load: {type(e).__name__}: {e})") from e
        diffs = [f"{k}: checkpoint {meta.get(k, RUN_DEFAULTS.get(k))!r}, this run {_jsonable(run[k])!r}"
                 for k in RUN_KEYS
                 if k in run and _jsonable(meta.get(k, RUN_DEFAULTS.get(k))) != _jsonable(run[k])]
        if diffs:
            raise CheckpointError(f"checkpoint {where} was written by a different run; resuming "
                                  "would not continue it:\n  " + "\n  ".join(diffs))
        abstract = jax.tree_util.tree_map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
            jax.ShapeDtypeStruct(np.shape(x), x.dtype), target)
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as e:
            raise CheckpointError(f"checkpoint {where} could not be restored into this model and "
                                  f"optimizer: {type(e).__name__}: {e}") from e
        _check_like(state, abstract, where)
        if "checksum" in meta and checksum(state) != meta["checksum"]:
            raise CheckpointError(f"checkpoint {where} is corrupt: its arrays do not match the "
                                  "checksum recorded when it was saved")
        return state, meta

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _check_json(path: str):
    """Parse the run record before orbax does: orbax's failing JSON read leaves callbacks
    for an event loop it has already closed, which surface later as unraisable errors."""
    if os.path.exists(path):
        with open(path) as f:
            json.load(f)


def checksum(tree) -> int:
    """CRC-32 over the bytes, shapes and dtypes of the leaves of a pytree of arrays."""
    crc = 0
    for leaf in jax.tree_util.tree_leaves(jax.device_get(tree)):
        a = np.ascontiguousarray(leaf)
        crc = zlib.crc32(f"{a.shape}{a.dtype}".encode(), crc)
        crc = zlib.crc32(a.view(np.uint8).reshape(-1) if a.size else b"", crc)
    return crc


def _check_like(state, abstract, where):
    got, want = jax.tree_util.tree_structure(state), jax.tree_util.tree_structure(abstract)
    if got != want:
        raise CheckpointError(f"checkpoint {where} holds a different tree:\n  {got}\nexpected\n"
                              f"  {want}")
    bad = [f"{jax.tree_util.keystr(p)}: {np.shape(a)} {a.dtype} vs {b.shape} {b.dtype}"
           for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(state),
                                jax.tree_util.tree_leaves(abstract))
           if np.shape(a) != b.shape or a.dtype != b.dtype]
    if bad:
        raise CheckpointError(f"checkpoint {where} does not fit this run:\n  " + "\n  ".join(bad))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return x
