"""What the harness times, per task: for one (preset, mode, batch size, precision), the JAX state and
jitted step, the torch trainer, the batch, and the forward that both must agree on.

The steps are the trainer's own (`train.tasks`): the task's pure JAX step under
`steps.jit_train_step`, and `train.torch_backend.TorchTrainer.update` around the task's torch loss.

- train: forward + loss + backward + AdamW update (the preset recipe's optimizer: decay mask,
  clipping, and what the task does after each update: CLIP's scale clamp, DDPM's EMA), dropout
  on. JAX: one jitted program with the state donated; torch: eager, or with the modules the loss
  calls under `torch.compile` (default mode) and the rest eager.
- infer: forward in eval mode. JAX: `apply(..., train=False)` jitted; torch: `model.eval()` under
  `torch.inference_mode()`. For DDPM that is one U-Net (denoiser) call.
- bf16: fp32 master weights in both; JAX computes in bfloat16 through `steps.mixed_precision`,
  torch under `torch.autocast(dtype=torch.bfloat16)`.

Both frameworks start from the same weights (Flax init, `bridge.flax_to_torch`,
`load_state_dict(strict=True)`) and get the same batch: the task's `example_batch` to train, the
preset's `example_inputs` to infer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jax_models
from bridge.verify import example_inputs
from jax_models.xla_flags import train_compiler_options
from train import steps
from train.tasks import get_task, init_variables
from train.torch_backend import torch_batch, trainer_from_variables
from twin_models.presets import Preset, get_preset

FRAMEWORKS = ("jax", "torch", "torch-compile")
MODES = ("train", "infer")
PRECISIONS = ("fp32", "bf16")
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}   # forward check, max |jax - torch| / max |torch|
SCHEDULE_STEPS = 10_000                    # length of the recipe's lr schedule (any will do)


class ParityError(RuntimeError):
    """The two frameworks' forwards disagree: the row is not timed."""


@dataclasses.dataclass
class Runner:
    """One framework's step. `first()` compiles where the framework does and runs one step;
    `step()` runs one step. Both return when the device is done."""
    first: Callable[[], Any]
    step: Callable[[], Any]
    info: dict = dataclasses.field(default_factory=dict)  # JAX: 'compiled', the executable


@dataclasses.dataclass
class Workload:
    preset: Preset
    mode: str
    batch_size: int
    precision: str
    device: torch.device
    forward_outputs: Callable[[], tuple[list[np.ndarray], list[np.ndarray]]]  # (jax, torch)
    runner: Callable[[str], Runner]        # framework -> a fresh Runner
    count_flops: Callable[[], int]         # model FLOPs of one step (torch eager fp32)

    def check(self) -> float:
        """Relative error of one forward, JAX against eager torch, at the highest matmul precision
        (a speed run's TF32 is a setting, not a bug); raises ParityError over TOLERANCE."""
        tol = TOLERANCE[self.precision]
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with jax.default_matmul_precision("highest"):
                ours, theirs = self.forward_outputs()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        err = 0.0
        for a, b in zip(ours, theirs):
            if a.ndim == 4 and a.shape != b.shape:
                a = a.transpose(0, 3, 1, 2)               # NHWC -> NCHW
            if a.shape != b.shape:
                raise ParityError(f"{self.preset.name}: output shapes differ, jax {a.shape} vs "
                                  f"torch {b.shape}")
            err = max(err, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
        if not err <= tol:
            raise ParityError(f"{self.preset.name} ({self.precision}): JAX and torch forwards differ "
                              f"by {err:.3e} (relative), over the tolerance {tol:g}; not timing a "
                              f"wrong program (python -m bridge verify {self.preset.name} names the "
                              f"first diverging layer)")
        return err


# ---------------------------------------------------------------------------------------------
# Shared pieces


class Autocast(torch.nn.Module):
    """`module` run under `torch.autocast(dtype)`, float outputs back to fp32 (inference rows;
    the trainer autocasts its own loss)."""

    def __init__(self, module: torch.nn.Module, device_type: str, dtype=torch.bfloat16):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(*args)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def _numpy(out) -> list[np.ndarray]:
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [np.asarray(o.detach().float().cpu() if isinstance(o, torch.Tensor) else o, np.float32) for o in out]


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# The tasks: JAX (state, jitted step, batch, eval forward) and torch (model, loss, forward)


@dataclasses.dataclass
class _Pieces:
    state: Any                       # the JAX TrainState (params fp32), `apply_fn` in the precision
    jax_step: Callable               # jitted (state, batch) -> (state, metrics), state donated
    jax_batch: dict
    jax_forward: Callable            # (variables, *inputs) -> outputs, eval mode
    jax_forward_vars: Any
    torch_trainer: Callable          # precision -> a fresh `TorchTrainer` holding the JAX weights
    torch_batch: dict                # the training batch as device tensors
    torch_compile: Callable          # model -> None: torch.compile what the loss calls, in place
    infer_module: Callable           # torch model -> the module run in eval mode (and compared)


def _pieces(preset, batch_size, seed, precision, device, attention_impl="xla") -> _Pieces:
    """The trainer's own pieces for `preset`'s task (`train.tasks`): the JAX state and pure step,
    the torch `TorchTrainer` and its loss, from the same Flax init; the eval forward is the
    preset's own model (for DDPM the U-Net inside the trained DDPM)."""
    task = get_task(preset)
    role, torch_role = task.jax_training, task.torch_training
    recipe = dict(preset.train)
    model, variables, rng = init_variables(task, preset, seed, attention_impl)
    schedule = steps.warmup_cosine(recipe["lr"], recipe["warmup_steps"], SCHEDULE_STEPS)
    tx = steps.make_optimizer(schedule, recipe["weight_decay"], recipe["grad_clip"],
                              variables["params"])
    state = role.create_state(model, variables, tx, rng)
    cast = steps.mixed_precision if precision == "bf16" else (lambda f: f)
    state = state.replace(apply_fn=cast(model.apply))
    jax_step = steps.jit_train_step(role.step, **role.step_kwargs(recipe))
    host = task.example_batch(preset, batch_size, seed)
    forward = jax_models.create_model(preset, attention_impl=attention_impl).apply
    jax_forward = lambda v, *x: cast(forward)(v, *x, train=False)  # noqa: E731

    def torch_trainer(precision_):
        return trainer_from_variables(task, preset, variables, recipe, steps.host_schedule(schedule),
                                      precision_, device)

    return _Pieces(state, jax_step, {k: jnp.asarray(v) for k, v in host.items()}, jax_forward,
                   role.preset_variables(variables), torch_trainer,
                   {k: v.to(device) for k, v in torch_batch(host).items()}, torch_role.compile,
                   torch_role.preset_module)


# ---------------------------------------------------------------------------------------------


def build_workload(preset: str | Preset, mode: str, batch_size: int, precision: str = "fp32",
                   seed: int = 0, device: str | None = None, attention_impl: str = "xla") -> Workload:
    """Everything needed to time one row group: the checked forward, a Runner per framework, the
    model FLOPs. `device`: torch's ('cuda' when available, else 'cpu'); JAX uses its default and
    `attention_impl` (`layers.attend`: xla, fused, cudnn)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive; got {batch_size}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_in, f_in = example_inputs(preset, batch_size, seed)
    t_in = tuple(x.to(device) for x in t_in)
    pieces = _pieces(preset, batch_size, seed, precision, device, attention_impl)
    amp = (lambda m: Autocast(m, device.type)) if precision == "bf16" else (lambda m: m)
    jax_forward = jax.jit(pieces.jax_forward)

    def forward_outputs():
        ours = _numpy(jax_forward(pieces.jax_forward_vars, *f_in))
        model = pieces.torch_trainer("fp32").model.eval()
        with torch.inference_mode():
            theirs = _numpy(amp(pieces.infer_module(model))(*t_in))
        return ours, theirs

    def jax_runner(fn, args, options=None) -> Runner:
        box = {"args": args}

        def first():
            box["compiled"] = fn.lower(*args).compile(compiler_options=options)
            return step()

        def step():
            out = box["compiled"](*box["args"])
            if mode == "train":
                box["args"] = (out[0],) + box["args"][1:]
            return jax.block_until_ready(out)
        return Runner(first, step, box)

    def torch_runner(compile_: bool, precision_: str = precision) -> Runner:
        trainer = pieces.torch_trainer(precision_)
        model = trainer.model
        if compile_:
            pieces.torch_compile(model)
        if mode == "infer":
            model.eval()
            forward = amp(pieces.infer_module(model)) if precision_ == "bf16" else \
                pieces.infer_module(model)

            def step():
                with torch.inference_mode():
                    out = forward(*t_in)
                _sync(device)
                return out
        else:
            def step():
                out = trainer.update(pieces.torch_batch)
                _sync(device)
                return out
        held = sum(t.numel() * t.element_size() for t in [*model.state_dict().values(), *t_in])
        return Runner(step, step, {"held_bytes": held})

    def runner(framework: str) -> Runner:
        if framework == "jax":
            if mode == "train":
                state = jax.tree.map(jnp.copy, pieces.state)   # donated by the step
                # compiled as the trainer compiles it (the recipe's `cpu_dot_fusion`)
                options = train_compiler_options(preset.train.get("cpu_dot_fusion", False))
                return jax_runner(pieces.jax_step, (state, pieces.jax_batch), options)
            return jax_runner(jax_forward, (pieces.jax_forward_vars, *f_in))
        if framework in ("torch", "torch-compile"):
            return torch_runner(framework == "torch-compile")
        raise ValueError(f"unknown framework {framework!r}; known: {', '.join(FRAMEWORKS)}")

    def count_flops() -> int:
        from torch.utils.flop_counter import FlopCounterMode

        step = torch_runner(False, "fp32").step
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel is invisible to the counter
        try:
            with FlopCounterMode(display=False) as counter:
                step()
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        return int(counter.get_total_flops())

    return Workload(preset, mode, batch_size, precision, device, forward_outputs, runner, count_flops)
