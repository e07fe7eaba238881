"""The one training loop, for every task and both backends.

`run(Config(...))` trains any preset and returns the summary it also writes to
WORKDIR/summary.json. The loop owns the cadence (log, evaluate, checkpoint), fresh start or
resume, metrics, progress, the final evaluation, export and summary; a backend is an adapter
(`train.jax_backend.JaxBackend`, `train.torch_backend.TorchBackend`) with:

    __init__(run)           build the task's model and optimizer state from the run's seed
    state_tree()            the state as a pytree of host arrays (saved, and the restore target)
    load_state_tree(tree)   continue from a restored tree; returns its step
    step(batch)             one update on a host batch; returns metrics (maybe still on device)
    read(metrics)           those metrics as floats
    evaluate() / finish()   the task's evaluation / its work after the last step (summary entries)
    export()                the torch-keyed state dict `--export` writes
    parallel, devices       for the summary
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time

import numpy as np

from train.checkpoint import CheckpointError, Checkpoints
from train.config import Config, Run, resolve

BACKEND_CLASSES = {"jax": "train.jax_backend:JaxBackend", "torch": "train.torch_backend:TorchBackend"}


def backend_class(name: str):
    module, _, cls = BACKEND_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def run(config: Config) -> dict:
    """Trains, evaluates, checkpoints and exports as `config` says; returns the summary."""
    r = resolve(config)
    os.makedirs(r.workdir, exist_ok=True)
    result = train(r, backend_class(config.backend))
    with open(os.path.join(r.workdir, "summary.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def train(r: Run, backend_cls) -> dict:
    cfg, task = r.config, r.task
    t_start = time.perf_counter()
    extra = task.setup(r)
    backend = backend_cls(r)
    ckpt = Checkpoints(os.path.join(r.workdir, "checkpoints"), r.checkpoint_every, cfg.keep)
    start_step = 0
    with closing_on_error(ckpt):
        if cfg.resume:
            tree, meta = ckpt.restore(backend.state_tree(), r.record())
            start_step = backend.load_state_tree(tree)
            check_position(r, meta, start_step)
        else:
            check_fresh(ckpt)

    def save(step, force=False):
        if force or (ckpt.every and step % ckpt.every == 0):
            ckpt.save(step, backend.state_tree(), {**r.record(), "position": r.position(step)},
                      force=True)

    log = MetricsLog(r.workdir, r.total_steps, start_step, cfg.progress, ("loss", *task.report))
    speed = Throughput()
    step, metrics, last_eval = start_step, None, {}
    try:
        for step, batch in r.batches_from(start_step):
            metrics = backend.step(task.batch(batch, step, r))
            speed.tick(r.recipe["batch_size"])
            done = step + 1
            if done % cfg.log_every == 0 or done == r.total_steps:
                log.write({"step": done, "epoch": done / r.steps_per_epoch, **backend.read(metrics),
                           "lr": r.lr(step), "examples_per_second": speed.window_rate()})
            if r.eval_every and done % r.eval_every == 0 and done != r.total_steps:
                log.write({"step": done, **backend.evaluate()})
            save(done)
            step = done
        final = backend.read(metrics) if metrics is not None else None
        last_eval = backend.evaluate()
        log.write({"step": step, **last_eval})
        save(step, force=True)
    finally:
        ckpt.close()
        log.close(step)
    extra.update(backend.finish())
    export = export_weights(cfg.export, backend.export()) if cfg.export else None
    return summary(
        r, final_metrics=final, eval_metrics=last_eval, extra=extra, step=step,
        throughput=speed.rate(), devices=backend.devices, parallel=backend.parallel,
        wall=time.perf_counter() - t_start, checkpoint_dir=ckpt.directory, export=export,
        start_step=start_step)


# ---------------------------------------------------------------------------------------------
# Checkpoint checks


def check_fresh(ckpt: Checkpoints):
    latest = ckpt.latest_step()
    if latest is not None:
        raise CheckpointError(f"{ckpt.directory} already holds checkpoints (latest: step "
                              f"{latest}); pass --resume to continue that run, or pick another "
                              "--workdir")


def check_position(r: Run, meta: dict, step: int):
    if meta.get("position") != r.position(step):
        raise CheckpointError(f"checkpoint at step {step} records data position "
                              f"{meta.get('position')}, expected {r.position(step)}")


@contextlib.contextmanager
def closing_on_error(ckpt: Checkpoints):
    """Close `ckpt` when the block raises: an unclosed orbax manager's threads outlive the error."""
    try:
        yield
    except BaseException:
        ckpt.close()
        raise


# ---------------------------------------------------------------------------------------------
# Metrics, throughput, summary, export


class MetricsLog:
    """WORKDIR/metrics.jsonl (appended to, so a resumed run continues it) and the progress bar."""

    def __init__(self, workdir: str, total: int, initial: int, progress: bool,
                 shown: tuple[str, ...] = ("loss", "accuracy", "eval_accuracy")):
        self.shown = (*shown, "examples_per_second")
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.file = open(self.path, "a")
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.last = initial

    def write(self, record: dict):
        record = {k: (float(v) if isinstance(v, (np.floating, np.ndarray)) or hasattr(v, "item")
                      else v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.bar is not None:
            step = record.get("step", self.last)
            self.bar.update(step - self.last)
            self.last = step
            shown = {k: f"{record[k]:.4g}" for k in self.shown if isinstance(record.get(k), float)}
            if shown:
                self.bar.set_postfix({"ex/s" if k == "examples_per_second" else k: v
                                      for k, v in shown.items()}, refresh=True)

    def close(self, step: int):
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.close()
        self.file.close()


class Throughput:
    """Examples per second, not counting the first step (compilation)."""

    def __init__(self):
        self.start = None
        self.examples = 0
        self.window = (time.perf_counter(), 0)

    def tick(self, n: int):
        if self.start is None:
            self.start = time.perf_counter()
            self.window = (self.start, 0)
            return
        self.examples += n

    def window_rate(self) -> float:
        t0, e0 = self.window
        now = time.perf_counter()
        self.window = (now, self.examples)
        return (self.examples - e0) / max(now - t0, 1e-9)

    def rate(self) -> float:
        if self.start is None or not self.examples:
            return float("nan")
        return self.examples / max(time.perf_counter() - self.start, 1e-9)


def summary(r: Run, *, final_metrics, eval_metrics, extra, step, throughput, devices, parallel,
            wall, checkpoint_dir, export, start_step) -> dict:
    """The run's summary.json: what ran, the last training metrics (`final_*`), the final
    evaluation and the task's own entries (`extra`)."""
    final = {f"final_{k}": (float(v) if v is not None else None)
             for k, v in (final_metrics or {}).items()}
    return {
        "preset": r.preset.name, "task": r.preset.task, "backend": r.config.backend,
        "parallel": parallel, "precision": r.config.precision, "devices": devices,
        "processes": _process_count(r.config.backend),
        "data": r.recipe["data"], "steps": step, "start_step": start_step,
        "epochs": step / r.steps_per_epoch, "batch_size": r.recipe["batch_size"],
        "final_loss": None, **final, **eval_metrics, **extra,
        "examples_per_second": throughput,
        "wall_seconds": wall, "workdir": os.path.abspath(r.workdir),
        "checkpoint_dir": checkpoint_dir, "metrics": os.path.abspath(
            os.path.join(r.workdir, "metrics.jsonl")), "export": export,
        "recipe": r.recipe, "model_kwargs": r.preset.kwargs,
    }


def _process_count(backend: str) -> int:
    if backend != "jax":
        return 1
    import jax
    return jax.process_count()


def export_weights(path: str, state_dict) -> str:
    """Write a torch-keyed state dict as safetensors at `path`; returns the absolute path."""
    from bridge import save_safetensors

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_safetensors(state_dict, path)
    return path
