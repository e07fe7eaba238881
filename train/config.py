"""A run's configuration, and the run it resolves to: preset, task, recipe, data, schedule, the
order of the batches and the record a checkpoint must match. Below both backends and the loop."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

from train import data as data_lib

LOG_EVERY = 10
BACKENDS = ("jax", "torch")
PARALLEL = ("jit", "pmap")
PRECISIONS = ("fp32", "bf16")
RECIPE_FLAGS = ("lr", "weight_decay", "warmup_steps", "batch_size", "label_smoothing", "grad_clip",
                "data")


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
    model_overrides: dict = dataclasses.field(default_factory=dict)   # constructor arguments
    recipe_overrides: dict = dataclasses.field(default_factory=dict)  # the recipe's other keys
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

    @functools.cached_property
    def schedule(self):
        """The learning rate of each update (an optax schedule; both backends read it)."""
        from train import steps
        return steps.warmup_cosine(self.recipe["lr"], self.recipe["warmup_steps"], self.total_steps)

    @functools.cached_property
    def lr(self):
        """`schedule` on the host: step (int) -> float."""
        from train import steps
        return steps.host_schedule(self.schedule)

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

    for name, value, allowed in (("backend", config.backend, BACKENDS),
                                 ("parallel", config.parallel, PARALLEL),
                                 ("precision", config.precision, PRECISIONS)):
        if value not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, not {value!r}")
    if config.backend == "torch" and config.parallel != "jit":
        raise ValueError(f"--parallel {config.parallel} is for --backend jax")
    if config.steps is not None and config.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    preset = presets.get_preset(config.preset)
    task = get_task(preset)
    recipe = dict(preset.train)
    for key in RECIPE_FLAGS:
        value = getattr(config, key)
        if value is not None:
            recipe[key] = value
    unknown = sorted(set(config.recipe_overrides) - set(recipe))
    if unknown:
        raise ValueError(f"preset {preset.name!r} has no recipe key(s) {', '.join(unknown)}; its "
                         f"recipe: {', '.join(sorted(recipe))}")
    flagged = sorted(set(config.recipe_overrides) & set(RECIPE_FLAGS))
    if flagged:
        raise ValueError(f"set {', '.join(flagged)} with its own flag, not --recipe")
    recipe.update(config.recipe_overrides)
    if recipe["batch_size"] <= 0:
        raise ValueError(f"batch size must be positive, not {recipe['batch_size']}")
    train_data, test_data = task.load_data(recipe["data"], preset, recipe)
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
