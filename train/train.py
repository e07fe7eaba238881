"""The training run: config, data, devices, steps, checkpoints and logs for both backends.

`run(Config(...))` trains a classification preset and returns the summary that it also writes to
WORKDIR/summary.json. The task-specific parts (loss and metrics) live in `steps`; this file is
machinery.
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
    eval_every: int | None = None        # default: once per epoch
    model_overrides: dict = dataclasses.field(default_factory=dict)
    progress: bool = True


@dataclasses.dataclass
class Run:
    """A config resolved against its preset and data: everything a backend needs."""
    config: Config
    preset: Any
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
                    batch_size=self.recipe["batch_size"], total_steps=self.total_steps,
                    **{k: self.recipe[k] for k in ("lr", "weight_decay", "warmup_steps",
                                                   "label_smoothing", "grad_clip")})

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

    if config.backend not in ("jax", "torch"):
        raise ValueError(f"--backend must be jax or torch, not {config.backend!r}")
    if config.parallel not in ("jit", "pmap"):
        raise ValueError(f"--parallel must be jit or pmap, not {config.parallel!r}")
    if config.steps is not None and config.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    preset = presets.get_preset(config.preset)
    if preset.task != "classification":
        raise ValueError(f"preset {preset.name!r} is a {preset.task} model; this trainer "
                         "handles classification")
    defaults = dict(lr=3e-4, weight_decay=0.3, warmup_steps=0, batch_size=128, epochs=10,
                    label_smoothing=0.0, grad_clip=1.0, data="digits")
    recipe = {**defaults, **preset.train}
    for key in ("lr", "weight_decay", "warmup_steps", "batch_size", "label_smoothing",
                "grad_clip", "data"):
        value = getattr(config, key)
        if value is not None:
            recipe[key] = value
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
    else:
        total = (config.epochs if config.epochs is not None else recipe["epochs"]) * spe
    if total <= 0:
        raise ValueError(f"nothing to train: {total} steps")
    recipe["warmup_steps"] = min(recipe["warmup_steps"], total // 2)
    workdir = config.workdir or os.path.join("runs", preset.name)
    return Run(config, preset, train_data, test_data, recipe, spe, total, workdir)


def run_contrastive(config: Config) -> dict:
    """CLIP presets: `train.contrastive` (jit or pmap, JAX only, no checkpoints yet)."""
    from train import contrastive

    unsupported = [flag for flag, used in (("--backend torch", config.backend == "torch"),
                                           ("--resume", config.resume), ("--data", config.data),
                                           ("--export", config.export)) if used]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: not supported for contrastive presets yet")
    return contrastive.train(config.preset, config.workdir, config.parallel, config.steps,
                             config.epochs, config.batch_size, config.lr, config.seed,
                             config.log_every, config.model_overrides)


def run_diffusion(config: Config) -> dict:
    """DDPM presets: `train.diffusion` (jit or pmap, JAX only, no checkpoints yet)."""
    from train import diffusion

    unsupported = [flag for flag, used in (("--backend torch", config.backend == "torch"),
                                           ("--resume", config.resume), ("--data", config.data),
                                           ("--export", config.export), ("--epochs", config.epochs),
                                           ("--set", config.model_overrides)) if used]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: not supported for diffusion presets yet")
    workdir = config.workdir or os.path.join("runs", config.preset)
    os.makedirs(workdir, exist_ok=True)
    return diffusion.train(config.preset, workdir, config.parallel, config.steps, config.seed)


def run(config: Config) -> dict:
    """Trains, evaluates, checkpoints and exports as `config` says; returns the summary."""
    import presets

    task = presets.get_preset(config.preset).task
    if task == "contrastive":
        return run_contrastive(config)
    if task == "diffusion":
        return run_diffusion(config)
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

    def __init__(self, workdir: str, total: int, initial: int, progress: bool):
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
            shown = {k: f"{record[k]:.4g}" for k in
                     ("loss", "accuracy", "eval_accuracy", "examples_per_second") if k in record}
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


def summary(r: Run, *, final_loss, final_accuracy, eval_metrics, step, throughput, devices,
            parallel, wall, checkpoint_dir, export, start_step) -> dict:
    return {
        "preset": r.preset.name, "backend": r.config.backend, "parallel": parallel,
        "devices": devices, "processes": _process_count(r.config.backend),
        "data": r.recipe["data"], "steps": step, "start_step": start_step,
        "epochs": step / r.steps_per_epoch, "batch_size": r.recipe["batch_size"],
        "final_loss": final_loss, "final_accuracy": final_accuracy,
        "eval_loss": eval_metrics["loss"], "eval_accuracy": eval_metrics["accuracy"],
        "eval_examples": eval_metrics["count"], "examples_per_second": throughput,
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
