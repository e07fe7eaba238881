"""A run's configuration, and the run it resolves to: preset, task, recipe, data, schedule, the
order of the batches and the record a checkpoint must match. Below both backends and the loop."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

from train import data as data_lib

LOG_EVERY = 10
BACKENDS = ("jax", "torch")
PARALLEL = ("jit", "pmap", "mesh")
PRECISIONS = ("fp32", "bf16")
RECIPE_FLAGS = ("lr", "weight_decay", "warmup_steps", "batch_size", "label_smoothing", "grad_clip",
                "data")


@dataclasses.dataclass
class Config:
    preset: str
    data: str | None = None
    backend: str = "jax"                # jax | torch
    parallel: str = "jit"               # jit | pmap | mesh (jax only)
    fsdp: bool = False                  # mesh: shard params and optimizer state over the devices
    attention_impl: str = "xla"         # jax: xla | fused | cudnn (layers.attend)
    max_bad_steps: int = 5              # stop after this many non-finite steps in a row
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


def check_config(config: Config):
    """Every setting that can be checked from the command line alone, before anything is built;
    one ValueError naming the setting, what it must be and what came."""
    def need(ok, flag, want, got):
        if not ok:
            raise ValueError(f"{flag} must be {want}, not {got!r}")

    need(config.log_every >= 1, "--log-every", "at least 1", config.log_every)
    need(config.keep >= 1, "--keep", "at least 1 (checkpoints kept)", config.keep)
    need(config.checkpoint_every is None or config.checkpoint_every >= 0, "--checkpoint-every",
         "0 (only at the end) or more", config.checkpoint_every)
    need(config.eval_every is None or config.eval_every >= 0, "--eval-every", "0 (only at the end) or more",
         config.eval_every)
    need(config.steps is None or config.steps >= 1, "--steps", "at least 1", config.steps)
    need(config.epochs is None or config.epochs >= 1, "--epochs", "at least 1", config.epochs)
    need(config.batch_size is None or config.batch_size >= 1, "--batch-size", "positive", config.batch_size)
    need(config.lr is None or (math.isfinite(config.lr) and config.lr > 0), "--lr", "a positive finite number",
         config.lr)
    need(config.weight_decay is None or (math.isfinite(config.weight_decay) and config.weight_decay >= 0),
         "--weight-decay", "a finite number >= 0", config.weight_decay)
    need(config.warmup_steps is None or config.warmup_steps >= 0, "--warmup-steps", "0 or more", config.warmup_steps)
    need(config.label_smoothing is None or 0 <= config.label_smoothing < 1, "--label-smoothing", "in [0, 1)",
         config.label_smoothing)
    need(config.grad_clip is None or (math.isfinite(config.grad_clip) and config.grad_clip >= 0), "--grad-clip",
         "0 (off) or a positive number", config.grad_clip)
    need(config.dropout is None or 0 <= config.dropout < 1, "--dropout", "in [0, 1)", config.dropout)


def check_devices(config: Config, batch_size: int):
    """The global batch splits over the processes and, for pmap and the mesh, over the devices."""
    if config.backend != "jax":
        return
    import jax

    processes = jax.process_count()
    if batch_size % processes:
        raise ValueError(f"global batch size {batch_size} does not split evenly over {processes} processes")
    if config.parallel == "jit" and processes > 1:
        raise ValueError("--parallel jit trains on one device of one process; use --parallel mesh (or pmap) "
                         "with several processes")
    n, where = {"pmap": (jax.local_device_count(), "local devices"),
                "mesh": (jax.device_count(), "devices of the mesh")}.get(config.parallel, (1, ""))
    per = batch_size // processes if config.parallel == "pmap" else batch_size
    if per % n:
        what = "per process " if config.parallel == "pmap" and processes > 1 else ""
        raise ValueError(f"batch size {per} {what}does not split evenly over {n} {where} ({per} % {n} = "
                         f"{per % n}); use a multiple of {n}")


def check_writable(workdir: str, export: str | None):
    """The workdir can be made and written, and the export's folder too: found before training,
    not after it."""
    for what, folder in (("--workdir", workdir), ("--export", os.path.dirname(os.path.abspath(export)) if export else None)):
        if folder is None:
            continue
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{what}: cannot create {folder} ({e.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise ValueError(f"{what}: {folder} is not writable")
    if export and os.path.isdir(export):
        raise ValueError(f"--export {export} is a directory; give a file path (e.g. {export}/model.safetensors)")


def resolve(config: Config) -> Run:
    """Fills the config's blanks from the preset's recipe and loads the data."""
    from twin_models import presets
    from train.tasks import get_task

    check_config(config)
    for name, value, allowed in (("backend", config.backend, BACKENDS),
                                 ("parallel", config.parallel, PARALLEL),
                                 ("precision", config.precision, PRECISIONS)):
        if value not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, not {value!r}")
    if config.backend == "torch" and config.parallel != "jit":
        raise ValueError(f"--parallel {config.parallel} is for --backend jax")
    if config.max_bad_steps < 1:
        raise ValueError(f"--max-bad-steps must be at least 1, not {config.max_bad_steps}")
    from jax_models.layers import ATTENTION_IMPLS
    if config.attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"--attention-impl must be one of {', '.join(ATTENTION_IMPLS)}, not "
                         f"{config.attention_impl!r}")
    if config.fsdp and config.parallel != "mesh":
        raise ValueError("--fsdp shards over a mesh: pass --parallel mesh")
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
    check_devices(config, recipe["batch_size"])
    train_data, test_data = task.load_data(recipe["data"], preset, recipe)
    overrides = dict(config.model_overrides)
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    unknown = sorted(set(overrides) - set(preset.kwargs))
    if unknown:
        raise ValueError(f"preset {preset.name!r} has no constructor argument(s) "
                         f"{', '.join(unknown)}; its arguments: {', '.join(preset.kwargs)}")
    for key, value in overrides.items():
        default = preset.kwargs[key]
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float)
              else isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool)))
        if default is not None and not ok:
            raise ValueError(f"--set {key}={value!r}: preset {preset.name!r} takes a value of type {type(default).__name__} "
                             f"there (its default is {default!r})")
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
    check_writable(workdir, config.export)
    return Run(config, preset, task, train_data, test_data, recipe, spe, total, workdir)
