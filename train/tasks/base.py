"""The `Task` base class and the registry every task module fills (`@register`).

A task is what a preset trains for: it gives both backends' adapters the model, the batch, the
pure JAX step and the torch loss, the evaluation and the final report, and it gives the parity
suite and the benchmarks what they would otherwise branch on the task's name for: a training
batch without data (`example_batch`), the losses both frameworks compute on the preset's model
(`parity_losses`, `parity_batches`) and where the preset's own model sits inside what the trainer
trains (`preset_variables`, `preset_module`). This module imports no task.
"""

from __future__ import annotations


import numpy as np

TASKS: dict[str, type["Task"]] = {}


def register(cls: type["Task"]) -> type["Task"]:
    """Class decorator: `cls` becomes the task called `cls.name`."""
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is registered twice ({TASKS[cls.name].__module__}, "
                         f"{cls.__module__})")
    TASKS[cls.name] = cls
    return cls


def get_task(preset_or_name) -> "Task":
    """A fresh task for a preset (its `task`) or a task name; an unknown name lists the known."""
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
    import jax

    model = task.flax_model(preset, attention_impl)
    init_key, train_key = jax.random.split(jax.random.key(seed))
    args = task.init_args(preset)
    variables = jax.jit(lambda k: model.init(k, *args))(init_key)
    return model, variables, train_key


class Task:
    """A training task. Subclasses set `name` and override what differs from this default, which
    trains the preset's model itself (its forward on the preset's `inputs`).

    JAX adapter: `flax_model`, `init_args`, `create_state`, `jax_step` (pure: (state, batch, rng,
    *, axis_name, **step_kwargs) -> (state, metrics)), `step_kwargs`, `jax_evaluate`,
    `jax_finish`, `jax_export`. Torch adapter: `torch_model`, `torch_loss`, `torch_compile`,
    `torch_init`, `torch_after_step`, `torch_extra_state` / `load_torch_extra_state`,
    `torch_evaluate`, `torch_finish`, `torch_export`. Both: `setup` (once, before training) and
    `batch` (host side, per step). Tests and benchmarks: `example_batch`, `parity_losses`,
    `parity_batches`, `preset_variables`, `preset_module`."""

    name = ""
    report: tuple[str, ...] = ()   # the summary entries the CLI prints first
    eval_by_default = True         # evaluate once per epoch unless --eval-every

    # -- both -----------------------------------------------------------------------------------

    def load_data(self, spec: str, preset, recipe: dict):
        """(train, test) `train.data.ArrayDataset`s for the `--data` spec; default: the image
        sources of `train.data.load` (digits, imagefolder:DIR, cifar10:DIR)."""
        from train import data as data_lib
        return data_lib.load(spec, preset.image_size, preset.in_channels)

    def setup(self, r) -> dict:
        """Checks and files before training; returns entries for the summary."""
        return {}

    def batch(self, batch: dict, step: int, r) -> dict:
        """The training batch of `step` from the data's {'image', 'label'} (numpy)."""
        return batch

    def example_batch(self, preset, batch_size: int, seed: int = 0) -> dict:
        """A training batch (what `batch` returns) made without data: benchmarks and tests."""
        raise NotImplementedError

    # -- JAX ------------------------------------------------------------------------------------

    def flax_model(self, preset, attention_impl: str = "xla"):
        """The Flax model the trainer trains; `attention_impl` as `layers.attend` takes it."""
        import jax_models
        return jax_models.create_model(preset, attention_impl=attention_impl)

    def init_args(self, preset) -> tuple:
        """Example inputs for `model.init` (batch of one)."""
        from twin_models.presets import example_inputs
        return example_inputs(preset, batch_size=1)

    def create_state(self, model, variables, tx, rng):
        from train import steps
        return steps.create_state(model, variables, tx, rng)

    def step_kwargs(self, recipe: dict) -> dict:
        return {}

    @property
    def jax_step(self):
        raise NotImplementedError

    def jax_evaluate(self, model, state, r) -> dict:
        return {}

    def jax_finish(self, model, state, r) -> dict:
        """Work after the last step (sampling, say); returns entries for the summary."""
        return {}

    def preset_variables(self, variables: dict) -> dict:
        """The variables of the preset's own model inside those of `flax_model` (the same here)."""
        return variables

    def jax_export(self, state) -> dict:
        """The torch-keyed state dict of the preset's model that `--export` writes."""
        import jax

        from bridge import flax_to_torch
        return flax_to_torch(self.preset_variables(jax.device_get(state.variables())))

    # -- PyTorch --------------------------------------------------------------------------------

    def torch_model(self, preset):
        import torch_reference
        return torch_reference.create_model(preset)

    def preset_module(self, model):
        """The preset's own torch model inside `torch_model`'s (the same here)."""
        return model

    def torch_loss(self, model, batch: dict, recipe: dict):
        """(loss, metrics) of the torch model in train mode on a batch of tensors (NCHW)."""
        raise NotImplementedError

    def torch_compile(self, model):
        """`torch.compile` (in place) the modules whose forward `torch_loss` calls."""
        model.compile()

    def torch_init(self, trainer):
        """Runs once the trainer holds the initial weights (e.g. to start a moving average)."""

    def torch_after_step(self, trainer) -> dict | None:
        """Runs after each optimizer step (clamps, moving averages); may return metrics."""

    def torch_extra_state(self, trainer) -> dict:
        return {}

    def load_torch_extra_state(self, trainer, tree: dict):
        pass

    def torch_evaluate(self, trainer, r) -> dict:
        return {}

    def torch_finish(self, trainer, r) -> dict:
        return {}

    def torch_export(self, trainer) -> dict:
        return {k: v.detach().numpy() for k, v in self.preset_module(trainer.model).state_dict().items()}

    # -- parity ---------------------------------------------------------------------------------

    def parity_losses(self, flax_model):
        """(torch_loss(model, batch) -> scalar tensor, flax_loss(params, variables, batch) ->
        scalar) of the preset's own model, on batches from `parity_batches`."""
        raise NotImplementedError

    def parity_batches(self, preset, n: int, batch_size: int, seed: int = 0):
        """`n` batches for `parity_losses`: (torch batches (NCHW), flax batches (NHWC))."""
        raise NotImplementedError


def image_batches(preset, n: int, batch_size: int, seed: int, extra=None):
    """`n` batches of the preset's example inputs (one seeded stream), each followed by what
    `extra(rs, inputs)` draws for it (labels, say): (torch batches, flax batches)."""
    from bridge.verify import framework_inputs
    from twin_models.presets import INPUT_KINDS

    rs = np.random.RandomState(seed)
    torch_batches, flax_batches = [], []
    for _ in range(n):
        arrays = [INPUT_KINDS[kind](preset, rs, batch_size) for kind in preset.inputs]
        if extra is not None:
            arrays += list(extra(rs, arrays))
        t, f = framework_inputs(arrays)
        torch_batches.append(t)
        flax_batches.append(f)
    return torch_batches, flax_batches
