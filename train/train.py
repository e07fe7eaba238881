"""The training run: config, data, devices, steps, checkpoints and logs for both backends.

`run(Config(...))` trains any preset and returns the summary that it also writes to
WORKDIR/summary.json. What differs between tasks (model, batch, loss, evaluation, final report)
lives in `train.tasks`; this file and the two backends are machinery.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from train import data as data_lib

LOG_EVERY = 10


@dataclasses.dataclass
class Config:
    preset: str
    data: str | None = None
    backend: str = "jax"                # jax | torch
    parallel: str = "jit"               # jit | pmap (jax only)
    steps: int | None = None            # total updates; else epochs * steps per epoch
    epochs: int | None = None
    batch_size: int | None = None       # global, over all devices and hosts
    lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    label_smoothing: float | None = None
    grad_clip: float | None = None
    dropout: float | None = None
    seed: int = 0
    workdir: str | None = None
    checkpoint_every: int | None = None  # default: once per epoch
    keep: int = 3
    resume: bool = False
    export: str | None = None
    log_every: int = LOG_EVERY
    eval_every: int | None = None        # default: once per epoch (0: only at the end)
    precision: str = "fp32"              # fp32 | bf16 (bf16 compute, fp32 master weights)
    model_overrides: dict = dataclasses.field(default_factory=dict)
    progress: bool = True


@dataclasses.dataclass
class Run:
    """A config resolved against its preset and data: everything a backend needs."""
    config: Config
    preset: Any
    task: Any
    train_data: data_lib.ArrayDataset
    test_data: data_lib.ArrayDataset
    recipe: dict
    steps_per_epoch: int
    total_steps: int
    workdir: str

    def record(self) -> dict:
        """The values that make a run what it is (checked on --resume)."""
        return dict(preset=self.preset.name, model_kwargs=self.preset.kwargs,
                    backend=self.config.backend, data=self.recipe["data"], seed=self.config.seed,
                    precision=self.config.precision,
                    batch_size=self.recipe["batch_size"], total_steps=self.total_steps,
                    **{k: self.recipe[k] for k in ("lr", "weight_decay", "warmup_steps",
                                                   "label_smoothing", "grad_clip")})

    @property
    def checkpoint_every(self) -> int:
        c = self.config.checkpoint_every
        return c if c is not None else self.recipe.get("checkpoint_every", self.steps_per_epoch)

    @property
    def eval_every(self) -> int:
        """Steps between evaluations during training; 0: only the final one."""
        e = self.config.eval_every
        if e is not None:
            return e
        return self.steps_per_epoch if self.task.eval_by_default else 0

    def position(self, step: int) -> dict:
        epoch, batch = divmod(step, self.steps_per_epoch)
        return {"step": step, "epoch": epoch, "batch": batch}

    def batches_from(self, step: int):
        """(step, local batch) from `step` to the end, crossing epochs in order."""
        bs = self.recipe["batch_size"]
        while step < self.total_steps:
            epoch, start = divmod(step, self.steps_per_epoch)
            for batch in data_lib.batches(self.train_data, bs, self.config.seed, epoch, start):
                yield step, batch
                step += 1
                if step >= self.total_steps:
                    return


def resolve(config: Config) -> Run:
    """Fills the config's blanks from the preset's recipe and loads the data."""
    import presets

    from train.tasks import get_task

    if config.backend not in ("jax", "torch"):
        raise ValueError(f"--backend must be jax or torch, not {config.backend!r}")
    if config.parallel not in ("jit", "pmap"):
        raise ValueError(f"--parallel must be jit or pmap, not {config.parallel!r}")
    if config.precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be fp32 or bf16, not {config.precision!r}")
    if config.steps is not None and config.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    preset = presets.get_preset(config.preset)
    task = get_task(preset)
    recipe = {**task.defaults, **preset.train}
    for key in ("lr", "weight_decay", "warmup_steps", "batch_size", "label_smoothing",
                "grad_clip", "data"):
        value = getattr(config, key)
        if value is not None:
            recipe[key] = value
    if recipe["batch_size"] <= 0:
        raise ValueError(f"batch size must be positive, not {recipe['batch_size']}")
    train_data, test_data = data_lib.load(recipe["data"], preset.image_size, preset.in_channels)
    overrides = dict(config.model_overrides)
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    unknown = sorted(set(overrides) - set(preset.kwargs))
    if unknown:
        raise ValueError(f"preset {preset.name!r} has no constructor argument(s) "
                         f"{', '.join(unknown)}; its arguments: {', '.join(preset.kwargs)}")
    if preset.kwargs.get("num_classes") not in (None, train_data.num_classes):
        overrides.setdefault("num_classes", train_data.num_classes)
    if overrides:
        preset = presets.with_overrides(preset, **overrides)
    spe = data_lib.steps_per_epoch(len(train_data), recipe["batch_size"])
    if config.steps is not None:
        total = config.steps
    elif config.epochs is not None:
        total = config.epochs * spe
    else:
        total = recipe["steps"] if "steps" in recipe else recipe["epochs"] * spe
    if total <= 0:
        raise ValueError(f"nothing to train: {total} steps")
    recipe["warmup_steps"] = min(recipe["warmup_steps"], total // 2)
    workdir = config.workdir or os.path.join("runs", preset.name)
    return Run(config, preset, task, train_data, test_data, recipe, spe, total, workdir)


def run(config: Config) -> dict:
    """Trains, evaluates, checkpoints and exports as `config` says; returns the summary."""
    r = resolve(config)
    os.makedirs(r.workdir, exist_ok=True)
    if config.backend == "jax":
        from train import jax_backend as backend
    else:
        from train import torch_backend as backend
    summary = backend.train(r)
    with open(os.path.join(r.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


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
            shown = {k: f"{record[k]:.4g}" for k in self.shown if k in record}
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
