"""A run's configuration, and the run it resolves to: preset, task, recipe, data, schedule, the
order of the batches and the record a checkpoint must match. Below both backends and the loop."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax

from train import data as data_lib
from train import steps
from train.settings import (BACKENDS, COMPILE_DEFAULTS, PARALLEL, PRECISIONS, RECIPE_FLAGS, SCHEDULE_DEFAULTS, Config,  # noqa: F401
                            add_arguments, check_config, config_from_args)
from train.tasks import get_task
from twin_models import presets

@dataclasses.dataclass
class Run:
    """A config resolved against its preset and data: everything a backend needs. `context` is what
    the task's `setup` made for this run (a tokenizer, say), read by its batches and evaluation."""
    config: Config
    preset: Any
    task: Any
    train_data: data_lib.ArrayDataset
    test_data: data_lib.ArrayDataset
    recipe: dict
    steps_per_epoch: int
    total_steps: int
    workdir: str
    context: dict = dataclasses.field(default_factory=dict)

    def set_up(self) -> tuple["Run", dict]:
        """(this run with the context its task's `setup` makes, the summary entries setup returns)."""
        context, entries = self.task.setup(self)
        return dataclasses.replace(self, context=context), entries

    def record(self) -> dict:
        """The values that make a run what it is (checked on --resume)."""
        return dict(preset=self.preset.name, model_kwargs=self.preset.kwargs,
                    backend=self.config.backend, data=self.recipe["data"], seed=self.config.seed,
                    precision=self.config.precision,
                    batch_size=self.recipe["batch_size"], total_steps=self.total_steps,
                    **{k: self.recipe[k] for k in ("lr", "weight_decay", "warmup_steps",
                                                   "decay_fraction", "label_smoothing", "grad_clip")})

    @functools.cached_property
    def schedule(self):
        """The learning rate of each update (an optax schedule; both backends read it)."""
        return steps.warmup_cosine(self.recipe["lr"], self.recipe["warmup_steps"], self.total_steps,
                                   decay_fraction=self.recipe["decay_fraction"])

    @functools.cached_property
    def lr(self):
        """`schedule` on the host: step (int) -> float."""
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


def check_devices(config: Config, batch_size: int):
    """The global batch splits over the processes and, for pmap and the mesh, over the devices:
    the one place these are checked (before the data is loaded, and by the JAX backend)."""
    if config.backend != "jax":
        return
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


# What a run writes into its workdir beside checkpoints/: an --export path must be none of them.
RUN_FILES = ("summary.json", "metrics.jsonl", "tokenizer.json", "samples.npy", "samples.png",
             "captions.png", "relational_confusion.png")


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_writable(workdir: str, export: str | None):
    """The workdir can be made and written, and the export's folder too, and the export is none of
    the run's own files: found before training, and without creating anything."""
    folders = [("--workdir", os.path.abspath(workdir))]
    if export:
        folders.append(("--export", os.path.dirname(os.path.abspath(export))))
    for what, folder in folders:
        base = _nearest_existing(folder)
        if not os.path.isdir(base):
            raise ValueError(f"{what}: cannot create {folder} ({base} is a file, not a folder)")
        if not os.access(base, os.W_OK | os.X_OK):
            raise ValueError(f"{what}: {folder} is not writable ({base} does not let this user write)")
    if not export:
        return
    if os.path.isdir(export):
        raise ValueError(f"--export {export} is a directory; give a file path (e.g. {export}/model.safetensors)")
    target, root = os.path.realpath(export), os.path.realpath(workdir)
    own = [os.path.join(root, name) for name in RUN_FILES]
    if target in own or target == root or target.startswith(os.path.join(root, "checkpoints") + os.sep):
        raise ValueError(f"--export {export} is one of the run's own files in --workdir {workdir}; give "
                         f"another path (e.g. {os.path.join(workdir, 'model.safetensors')})")


def check_model_overrides(preset, overrides: dict):
    """--set names constructor arguments of the preset, with values of their type."""
    unknown = sorted(set(overrides) - set(preset.kwargs))
    if unknown:
        raise ValueError(f"preset {preset.name!r} has no constructor argument(s) "
                         f"{', '.join(unknown)}; its arguments: {', '.join(preset.kwargs)}")
    for key, value in overrides.items():
        default = preset.kwargs[key]
        if isinstance(default, tuple) and isinstance(value, list):
            overrides[key] = value = tuple(value)
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float)
              else isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool)))
        if default is not None and not ok:
            raise ValueError(f"--set {key}={value!r}: preset {preset.name!r} takes a value of type {type(default).__name__} "
                             f"there (its default is {default!r})")
    try:
        presets.check_kwargs({**preset.kwargs, **overrides}, overrides)
    except ValueError as e:
        raise ValueError(f"--set {e}") from None


def check_classes(preset, data, spec: str, overridden: bool):
    """A classifier needs two classes or more, and `--set num_classes` (else set from the data)
    must be the data's count."""
    if data.num_classes < 2:
        raise ValueError(f"--data {spec}: {data.num_classes} class ({', '.join(data.class_names)}); a "
                         "classifier needs at least 2 (one sub-folder per class)")
    if overridden and preset.kwargs["num_classes"] != data.num_classes:
        raise ValueError(f"--set num_classes={preset.kwargs['num_classes']}: the data ({spec}) has "
                         f"{data.num_classes} classes; leave num_classes unset (it follows the data) "
                         f"or set it to {data.num_classes}")


def resolve_recipe(config: Config, preset) -> dict:
    """The preset's recipe with the config's recipe flags and --recipe keys over it."""
    recipe = {**SCHEDULE_DEFAULTS, **COMPILE_DEFAULTS, **preset.train}
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
    return recipe


def resolve(config: Config) -> Run:
    """Fills the config's blanks from the preset's recipe and loads the data: every setting is
    checked (values, --set types, devices, a writable workdir) before the data is loaded."""
    check_config(config)
    preset = presets.get_preset(config.preset)
    task = get_task(preset)
    recipe = resolve_recipe(config, preset)
    check_devices(config, recipe["batch_size"])
    overrides = dict(config.model_overrides)
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    check_model_overrides(preset, overrides)
    workdir = config.workdir or os.path.join("runs", preset.name)
    check_writable(workdir, config.export)
    if overrides:
        preset = presets.with_overrides(preset, **overrides)
    train_data, test_data = task.load_data(recipe["data"], preset, recipe)
    if "num_classes" in preset.kwargs:
        check_classes(preset, train_data, recipe["data"], "num_classes" in overrides)
        if preset.kwargs["num_classes"] != train_data.num_classes:
            preset = presets.with_overrides(preset, num_classes=train_data.num_classes)
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
    run = Run(config, preset, task, train_data, test_data, recipe, spe, total, workdir)
    task.check(run)
    return run
