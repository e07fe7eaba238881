"""The `Task` base class, its roles, and the registry every task module fills (`@register`).

A task is what a preset trains for. It holds no per-run state: what a run needs beyond its config
(a tokenizer, the references of the held-out set) is the run's context, made by `Task.setup` and
carried in `Run.context`; what changes while training (weights, optimizer moments, moving
averages) lives in each backend's train state. A task has one interface per role, and a caller sees
only the role it uses:

- the task itself: the data (`load_data`, `setup`, `batch`, `example_batch`) and the report;
- `task.jax_training` (`JaxTraining`): the Flax model, its state and pure step, evaluation, export;
- `task.torch_training` (`TorchTraining`): the torch model, loss, what follows each update, evaluation;
- `task.parity` (`ParityCase`): the losses both frameworks compute on the preset's own model and
  batches for them, for the parity suite and the benchmarks.

This module imports no task.
"""

from __future__ import annotations

import jax
import numpy as np
import torch

import jax_models
from jax_models.xla_flags import init_compiler_options
import torch_reference
from bridge import flax_to_torch
from train import data as data_lib
from train import steps
from twin_models.layout import torch_layout
from twin_models.presets import INPUT_KINDS, example_inputs

TASKS: dict[str, type["Task"]] = {}


def register(cls: type["Task"]) -> type["Task"]:
    """Class decorator: `cls` becomes the task called `cls.name`."""
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is registered twice ({TASKS[cls.name].__module__}, "
                         f"{cls.__module__})")
    TASKS[cls.name] = cls
    return cls


def get_task(preset_or_name) -> "Task":
    """The task of a preset (its `task`) or of a task name; an unknown name lists the known."""
    name = getattr(preset_or_name, "task", preset_or_name)
    try:
        return TASKS[name]()
    except KeyError:
        owner = f"preset {preset_or_name.name!r} has " if hasattr(preset_or_name, "task") else ""
        raise ValueError(f"{owner}unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def init_variables(task: "Task", preset, seed: int, attention_impl: str = "xla"):
    """(Flax model, variables, train key): the task's model of `preset` initialised from `seed`
    (`attention_impl` changes the kernel, not the weights). Both backends start from these
    weights (torch through the bridge)."""
    role = task.jax_training
    model = role.model(preset, attention_impl)
    init_key, train_key = jax.random.split(jax.random.key(seed))
    args = role.init_args(preset)
    variables = jax.jit(lambda k: model.init(k, *args), compiler_options=init_compiler_options())(init_key)
    return model, variables, train_key


def torch_inputs(arrays) -> tuple:
    """numpy arrays as the torch twin takes them (`twin_models.layout.torch_layout`), as tensors."""
    return tuple(torch.from_numpy(torch_layout(a)) for a in arrays)


class JaxTraining:
    """How the JAX backend trains a task: by default the preset's model itself, its forward on
    the preset's `inputs`. `step` is pure: (state, batch, rng, *, axis_name, **step_kwargs) ->
    (state, metrics)."""

    step = None

    def model(self, preset, attention_impl: str = "xla"):
        """The Flax model the trainer trains; `attention_impl` as `layers.attend` takes it."""
        return jax_models.create_model(preset, attention_impl=attention_impl)

    def init_args(self, preset) -> tuple:
        """Example inputs for `model.init` (batch of one)."""
        return example_inputs(preset, batch_size=1)

    def create_state(self, model, variables, tx, rng):
        return steps.create_state(model, variables, tx, rng)

    def step_kwargs(self, recipe: dict) -> dict:
        return {}

    def evaluate(self, model, state, r) -> dict:
        return {}

    def finish(self, model, state, r) -> dict:
        """Work after the last step (sampling, say); returns entries for the summary."""
        return {}

    def preset_variables(self, variables: dict) -> dict:
        """The variables of the preset's own model inside those of `model` (the same here)."""
        return variables

    def export(self, state) -> dict:
        """The torch-keyed state dict of the preset's model that `--export` writes."""
        return flax_to_torch(self.preset_variables(jax.device_get(state.variables())))


class TorchTraining:
    """How the torch backend trains a task (the JAX recipe in eager PyTorch)."""

    def model(self, preset):
        return torch_reference.create_model(preset)

    def preset_module(self, model):
        """The preset's own torch model inside `model`'s (the same here)."""
        return model

    def loss(self, model, batch: dict, recipe: dict):
        """(loss, metrics) of the torch model in train mode on a batch of tensors (NCHW)."""
        raise NotImplementedError

    def compile(self, model):
        """`torch.compile` (in place) the modules whose forward `loss` calls."""
        model.compile()

    def extra_state(self, model) -> dict:
        """Modules the trainer keeps beside the model and checkpoints (a moving average, say),
        made from the initial model: {name: torch.nn.Module}."""
        return {}

    def after_step(self, trainer) -> dict | None:
        """Runs after each optimizer step (clamps, moving averages); may return metrics."""

    def evaluate(self, trainer, r) -> dict:
        return {}

    def finish(self, trainer, r) -> dict:
        return {}

    def export(self, trainer) -> dict:
        return {k: v.detach().numpy() for k, v in self.preset_module(trainer.model).state_dict().items()}


class ParityCase:
    """The losses both frameworks compute on a preset's own model, and batches for them."""

    def losses(self, flax_model):
        """(torch_loss(model, batch) -> scalar tensor, flax_loss(params, variables, batch) ->
        scalar) of the preset's own model, on batches from `batches`."""
        raise NotImplementedError

    def batches(self, preset, n: int, batch_size: int, seed: int = 0):
        """`n` batches for `losses`: (torch batches (NCHW), flax batches (NHWC))."""
        raise NotImplementedError


class Task:
    """A training task. Subclasses set `name` and the three roles, and override what differs in
    the data: this default reads the image sources of `train.data.load` and trains on its batches
    as they come."""

    name = ""
    report: tuple[str, ...] = ()   # the summary entries the CLI prints first
    eval_by_default = True         # evaluate once per epoch unless --eval-every
    jax_training = JaxTraining()
    torch_training = TorchTraining()
    parity = ParityCase()

    def load_data(self, spec: str, preset, recipe: dict):
        """(train, test) `train.data.ArrayDataset`s for the `--data` spec; default: the image
        sources of `train.data.load` (digits, imagefolder:DIR, cifar10:DIR)."""
        return data_lib.load(spec, preset.image_size, preset.in_channels)

    def check(self, r) -> None:
        """ValueErrors for what the run's settings and data must satisfy beyond each setting's own
        range (a vocabulary the data fits, say); `train.config.resolve` calls it, before anything
        is written."""

    def setup(self, r) -> tuple[dict, dict]:
        """Checks and files before training: (the run's context, which `batch` and the roles read
        as `r.context`; entries for the summary)."""
        return {}, {}

    def batch(self, batch: dict, step: int, r) -> dict:
        """The training batch of `step` from the data's {'image', 'label'} (numpy)."""
        return batch

    def example_batch(self, preset, batch_size: int, seed: int = 0) -> dict:
        """A training batch (what `batch` returns) made without data: benchmarks and tests."""
        raise NotImplementedError


def image_batches(preset, n: int, batch_size: int, seed: int, extra=None):
    """`n` batches of the preset's example inputs (one seeded stream), each followed by what
    `extra(rs, inputs)` draws for it (labels, say): (torch batches, flax batches)."""
    rs = np.random.RandomState(seed)
    torch_batches, flax_batches = [], []
    for _ in range(n):
        arrays = [INPUT_KINDS[kind](preset, rs, batch_size) for kind in preset.inputs]
        if extra is not None:
            arrays += list(extra(rs, arrays))
        torch_batches.append(torch_inputs(arrays))
        flax_batches.append(tuple(jax.numpy.asarray(np.asarray(a)) for a in arrays))
    return torch_batches, flax_batches
