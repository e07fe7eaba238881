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
    info()                  the backend's own summary entries (the step's compile time, cache)
    export()                the torch-keyed state dict `--export` writes
    parallel, devices       for the summary
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from bridge import save_safetensors
from train import distributed
from train.checkpoint import CheckpointError, Checkpoints
from train.config import BACKENDS, Config, Run, resolve
from train.curves import Curves
from train.jax_backend import JaxBackend
from train.torch_backend import TorchBackend
from train.watchdog import Interrupted, StopSignals, Watchdog

BACKEND_CLASSES = dict(zip(BACKENDS, (JaxBackend, TorchBackend)))


def backend_class(name: str):
    return BACKEND_CLASSES[name]


def run(config: Config, stop: StopSignals | None = None) -> dict:
    """Trains, evaluates, checkpoints and exports as `config` says; returns the summary. With
    `stop` (the CLI's), a signal ends the run after a checkpoint (`train.watchdog.Interrupted`)."""
    r = resolve(config)
    os.makedirs(r.workdir, exist_ok=True)
    return train(r, backend_class(config.backend), stop)


class ExportError(RuntimeError):
    pass


def write_atomically(path: str, write) -> str:
    """`write(tmp_path)`, then rename it to `path` (absolute, returned): a reader never sees half a
    file, and a failure leaves no stray temporary file."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_summary(r: Run, summary: dict) -> dict:
    """WORKDIR/summary.json, strict JSON (NaN -> null), written atomically by process 0."""
    summary = strict_json(summary)
    if distributed.is_primary():
        def dump(tmp):
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=2, allow_nan=False)
        write_atomically(os.path.join(r.workdir, "summary.json"), dump)
    return summary


def strict_json(x):
    """`x` with every non-finite float (NaN, inf) as None: JSON allows no NaN."""
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def train(r: Run, backend_cls, stop: StopSignals | None = None) -> dict:
    """Runs `r` on a backend: fresh or resumed, the steps with their logs, evaluations and
    checkpoints, the final evaluation, the task's finish, the summary and the export. A
    `train.watchdog.Watchdog` ends the process when a step or phase stalls."""
    cfg, task = r.config, r.task
    t_start = time.perf_counter()
    r, extra = r.set_up()
    backend = backend_cls(r)
    distributed.barrier("checkpoints")   # orbax's first step is a device collective (see barrier)
    ckpt = Checkpoints(os.path.join(r.workdir, "checkpoints"), r.checkpoint_every, cfg.keep)
    watch = Watchdog(cfg.stall_timeout, r.workdir, ckpt.directory, jax.process_index(),
                     jax.process_count()).start()
    if stop is not None:
        stop.checkpoints = ckpt.directory
    try:
        return _train(r, backend, ckpt, watch, stop, extra, t_start)
    finally:
        watch.stop()


def _train(r: Run, backend, ckpt: Checkpoints, watch: Watchdog, stop: StopSignals | None, extra: dict,
           t_start: float) -> dict:
    cfg, task = r.config, r.task
    start_step = 0
    with closing_on_error(ckpt), watch.phase("restore", 0):
        if cfg.resume:
            tree, meta = ckpt.restore(backend.state_tree(), r.record())
            backend.load_state_tree(tree)
            start_step = check_position(r, meta)
            finished = _finished_summary(r, start_step)
            if finished is not None:   # nothing to train: keep its summary, export if asked
                ckpt.close()
                with watch.phase("export", start_step):
                    return export(r, backend, finished, ckpt.directory, start_step)
        else:
            check_fresh(ckpt)

    def save(step, force=False):
        if force or (ckpt.every and step % ckpt.every == 0):
            with watch.phase("save", step):
                ckpt.save(step, backend.state_tree(), {**r.record(), "position": r.position(step)},
                          force=True)

    def stop_if_asked(step):
        if stop is not None and stop.received is not None:
            save(step, force=True)
            raise Interrupted(stop.received, step, ckpt.directory)

    primary = distributed.is_primary()
    log = MetricsLog(r.workdir, r.total_steps, start_step, cfg.progress and primary, ("loss", *task.report),
                     write=primary, resume=cfg.resume)
    curves = Curves(r.workdir, start_step, enabled=primary, tensorboard=cfg.tensorboard)
    speed = Throughput()
    guard = NonFiniteGuard(cfg.max_bad_steps, ckpt)
    step, metrics, last_eval = start_step, None, {}
    try:
        for step, batch in r.batches_from(start_step):
            previous = metrics
            metrics = backend.step(task.batch(batch, step, r))
            if previous is not None:   # a step behind: its metrics are ready by now
                guard.account(backend.read(previous), step)
            watch.step_done(step)
            speed.tick(r.recipe["batch_size"])
            done = step + 1
            if done % cfg.log_every == 0 or done == r.total_steps:
                log.write({"step": done, "epoch": done / r.steps_per_epoch, **backend.read(metrics),
                           "lr": r.lr(step), "nonfinite_steps": guard.total + int(
                               backend.read(metrics).get("nonfinite", 0)),
                           "examples_per_second": speed.window_rate()})
                curves.scalars()
            if r.eval_every and done % r.eval_every == 0 and done != r.total_steps:
                with watch.phase("evaluate", done):
                    log.write({"step": done, **backend.evaluate()})
                curves.refresh()
            save(done)
            step = done
            stop_if_asked(step)
        if metrics is not None:
            guard.account(backend.read(metrics), step)
        final = backend.read(metrics) if metrics is not None else None
        with watch.phase("evaluate", step):
            last_eval = backend.evaluate()
        log.write({"step": step, **last_eval})
        save(step, force=True)
        stop_if_asked(step)
    finally:
        ckpt.close()
        log.close(step)
        curves.close()
    with watch.phase("finish", step):
        extra.update(backend.finish())
    extra.update(backend.info())
    extra["nonfinite_steps"] = guard.total
    result = write_summary(r, summary(
        r, final_metrics=final, eval_metrics=last_eval, extra=extra, step=step,
        throughput=speed.rate(), devices=backend.devices, parallel=backend.parallel,
        wall=time.perf_counter() - t_start, checkpoint_dir=ckpt.directory, export=None,
        start_step=start_step))
    with watch.phase("export", step):
        return export(r, backend, result, ckpt.directory, step)


def export(r: Run, backend, result: dict, checkpoint_dir: str, step: int) -> dict:
    """With --export: every process gathers the weights, process 0 writes them and records the
    path in the summary. A failed write names the checkpoint that holds the same weights."""
    if not r.config.export:
        return result
    state_dict = backend.export()
    if not distributed.is_primary():
        return result
    try:
        result["export"] = export_weights(r.config.export, state_dict)
    except OSError as e:
        raise ExportError(f"could not write the export {r.config.export} ({e.strerror or e}); the trained "
                          f"weights are in the last checkpoint, {checkpoint_dir}/{step}, and "
                          f"`--resume --export PATH` writes them without training") from e
    return write_summary(r, result)


def _finished_summary(r: Run, start_step: int) -> dict | None:
    """The summary of a run that already ended (resumed at its last step): kept as it is, not
    replaced by one of zero steps. None when there is still training to do."""
    path = os.path.join(r.workdir, "summary.json")
    if start_step < r.total_steps:
        return None
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


# ---------------------------------------------------------------------------------------------
# Checkpoint checks


def check_fresh(ckpt: Checkpoints):
    latest = ckpt.latest_step()
    if latest is not None:
        raise CheckpointError(f"{ckpt.directory} already holds checkpoints (latest: step "
                              f"{latest}); pass --resume to continue that run, or pick another "
                              "--workdir")


def check_position(r: Run, meta: dict) -> int:
    """The step (data position) a checkpoint continues from; its epoch and batch must be this
    run's for that step. (The optimizer's own count may be lower: skipped non-finite steps.)"""
    position = meta.get("position") or {}
    step = position.get("step")
    if not isinstance(step, int) or position != r.position(step):
        raise CheckpointError(f"checkpoint records data position {position or None}, which this run "
                              f"does not have (expected {r.position(step) if isinstance(step, int) else 'a step'})")
    return step


class NonFiniteError(RuntimeError):
    pass


class NonFiniteGuard:
    """Counts steps whose loss or gradients were not finite (the backends skip them: nothing
    changes) and stops the run after `limit` in a row, naming the last good checkpoint."""

    def __init__(self, limit: int, ckpt: Checkpoints):
        self.limit, self.ckpt = limit, ckpt
        self.in_row = self.total = 0

    def account(self, metrics: dict, step: int):
        if not metrics.get("nonfinite"):
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.limit:
            latest = self.ckpt.latest_step()
            where = (f"the last checkpoint, {os.path.join(self.ckpt.directory, str(latest))}, holds the last "
                     f"good weights (--resume continues from it)" if latest is not None else
                     "no checkpoint was written yet")
            raise NonFiniteError(f"stopped at step {step}: the loss or the gradients were not finite in "
                                 f"{self.in_row} steps in a row (--max-bad-steps {self.limit}); each was "
                                 f"skipped, nothing non-finite was saved; {where}. Lower --lr or check the data")


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
                 shown: tuple[str, ...] = ("loss", "accuracy", "eval_accuracy"), write: bool = True,
                 resume: bool = False):
        self.shown = (*shown, "examples_per_second")
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.file = None
        if write:
            kept = _lines_up_to(self.path, initial) if resume else []
            self.file = open(self.path, "w")
            self.file.writelines(kept)
            self.file.flush()
        self.bar = None
        if progress:
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.last = initial

    def write(self, record: dict):
        record = strict_json({k: (float(v) if isinstance(v, (np.floating, np.ndarray)) or hasattr(v, "item")
                                  else v) for k, v in record.items()})
        if self.file is not None:
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
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
        if self.file is not None:
            self.file.close()


def _lines_up_to(path: str, step: int) -> list[str]:
    """The lines of a metrics log up to `step`: a resumed run rewrites what came after its
    checkpoint, so no step appears twice."""
    if not os.path.exists(path):
        return []
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue   # a line cut short by a kill
    return kept


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
        "processes": jax.process_count() if r.config.backend == "jax" else 1,
        "data": r.recipe["data"], "steps": step, "start_step": start_step,
        "epochs": step / r.steps_per_epoch, "batch_size": r.recipe["batch_size"],
        "final_loss": None, **final, **eval_metrics, **extra,
        "examples_per_second": throughput,
        "wall_seconds": wall, "workdir": os.path.abspath(r.workdir),
        "checkpoint_dir": checkpoint_dir, "metrics": os.path.abspath(
            os.path.join(r.workdir, "metrics.jsonl")), "export": export,
        "recipe": r.recipe, "model_kwargs": r.preset.kwargs,
    }


def export_weights(path: str, state_dict) -> str:
    """Write a torch-keyed state dict as safetensors at `path`, atomically; the absolute path."""
    return write_atomically(path, lambda tmp: save_safetensors(state_dict, tmp))
