"""What the harness times, per task: for one (preset, mode, batch size, precision), the JAX state and
jitted step, the torch twins and their step, the batch, and the forward that both must agree on.

Every piece of task knowledge of the benchmarks lives in this file, behind `build_workload`, so
that it can be rewired onto a task registry later. The steps are the trainer's own where they exist:
`train.steps.train_step` (classification), `train.contrastive.contrastive_step` and
`train.diffusion.diffusion_step` on the JAX side; the torch steps are written here, one small
`torch_train_step` around each task's loss (see there why).

- train: forward + loss + backward + AdamW update (the preset recipe's optimizer: decay mask,
  clipping), dropout on. JAX: one jitted program with the state donated; torch: eager, or with
  the model's forward under `torch.compile` (default mode) and the rest eager.
- infer: forward in eval mode. JAX: `apply(..., train=False)` jitted; torch: `model.eval()` under
  `torch.inference_mode()`.
- bf16: JAX keeps fp32 params and casts params and float inputs to bfloat16 inside the step (model
  outputs back to fp32); torch runs the forward under `torch.autocast(dtype=torch.bfloat16)`
  (outputs back to fp32); losses, gradients and AdamW stay fp32 in both.

Both frameworks start from the same weights (Flax init, `bridge.flax_to_torch`,
`load_state_dict(strict=True)`) and get the same batch (`bridge.verify.example_inputs`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

import bridge
import jax_models
import torch_reference
from bridge.verify import example_inputs
from presets import Preset, get_preset
from train import steps

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


def torch_state_dict(variables) -> dict[str, torch.Tensor]:
    """Flax variables as a torch state_dict (the bridge's rules)."""
    return {k: torch.from_numpy(np.array(v)) for k, v in bridge.flax_to_torch(jax.device_get(variables)).items()}


def load_torch(model: torch.nn.Module, state_dict, device) -> torch.nn.Module:
    model.load_state_dict(state_dict, strict=True)
    return model.to(device)


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
                        else x, tree)


def bf16_apply(apply_fn: Callable) -> Callable:
    """`apply_fn` computing in bfloat16: 'params' and float inputs cast on the way in (inside the
    differentiated function, so the optimizer keeps fp32 weights), float outputs back to fp32;
    other collections (a noise schedule) stay fp32."""
    def apply(variables, *args, **kwargs):
        variables = {**variables, "params": _cast(variables["params"], jnp.bfloat16)}
        return _cast(apply_fn(variables, *_cast(args, jnp.bfloat16), **kwargs), jnp.float32)
    return apply


def _precision(apply_fn: Callable, precision: str) -> Callable:
    return bf16_apply(apply_fn) if precision == "bf16" else apply_fn


def _optimizer(recipe: dict, params):
    """The recipe's optax AdamW (`train.steps.make_optimizer`: warm-up cosine, decay mask, clip)."""
    schedule = steps.warmup_cosine(recipe["lr"], recipe.get("warmup_steps", 0), SCHEDULE_STEPS)
    return steps.make_optimizer(schedule, recipe.get("weight_decay", 0.0), recipe.get("grad_clip"), params)


class Autocast(torch.nn.Module):
    """`module` run under `torch.autocast(dtype)`, float outputs back to fp32."""

    def __init__(self, module: torch.nn.Module, device_type: str, dtype=torch.bfloat16):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(*args)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


class _Call(torch.nn.Module):
    """A bound method (CLIP's `features`) as a module's forward, for torch.compile and Autocast."""

    def __init__(self, model: torch.nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args):
        return getattr(self.model, self.method)(*args)


def torch_adamw(model: torch.nn.Module, params, recipe: dict) -> torch.optim.AdamW:
    """torch AdamW with the optax recipe of `train.steps.make_optimizer`: decay only on the
    parameters of `steps.decay_mask(params)` (as `train.torch_backend.build` finds them)."""
    mask = steps.decay_mask(params)
    values = jax.tree.map(lambda p, m: np.full(np.shape(p), float(m), np.float32), params, mask)
    decay = {k for k, v in bridge.flax_to_torch({"params": values}).items() if v.all()}
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": recipe.get("weight_decay", 0.0)},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=recipe["lr"], betas=(0.9, 0.999),
                             eps=1e-8)


def torch_train_step(loss_fn: Callable[[], torch.Tensor], optimizer, grad_clip: float | None,
                     after: Callable[[], None] | None = None) -> Callable[[], torch.Tensor]:
    """One update: loss, backward, global-norm clipping (as optax), AdamW, then `after()`.

    The eager twin of the JAX steps, on device tensors. Written here, not taken from train/,
    because `train.torch_backend.TorchTrainer` takes host NHWC numpy batches (a host-to-device
    copy inside every timed step on a GPU), train/ has no torch contrastive step yet, and the
    torch side of train/ is being folded into a task registry: rewire to it when it lands."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if after is not None:
            after()
        return loss
    return step


def _numpy(out) -> list[np.ndarray]:
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [np.asarray(o.detach().float().cpu() if isinstance(o, torch.Tensor) else o, np.float32) for o in out]


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# The tasks: JAX (state, jitted step, batch, eval forward) and torch (model, loss, forward)


@dataclasses.dataclass
class _Task:
    state: Any                       # the JAX TrainState (params fp32)
    jax_step: Callable               # jitted (state, batch) -> (state, metrics), state donated
    jax_batch: dict
    jax_forward: Callable            # (variables, *inputs) -> outputs, eval mode
    jax_forward_vars: Any
    torch_model: Callable[[], torch.nn.Module]   # a fresh torch model with the JAX weights
    torch_step: Callable             # (model, train_module, inputs) -> step() closure
    infer_module: Callable           # model -> the module run in eval mode (and compared)
    train_module: Callable           # model -> the module whose forward the train step calls


def _classification(preset, f_in, t_in, precision, key, device):
    r = preset.train
    model = jax_models.create_model(preset)
    init_key, rng = jax.random.split(key)
    variables = jax.jit(lambda k: model.init(k, f_in[0][:1]))(init_key)
    state = steps.create_state(model, variables, _optimizer(r, variables["params"]), rng)
    apply = _precision(model.apply, precision)
    num_classes = preset.kwargs["num_classes"]
    labels = np.random.RandomState(1).randint(0, num_classes, f_in[0].shape[0])
    smoothing = r.get("label_smoothing", 0.0)

    def torch_step(model, forward, inputs):
        y = torch.from_numpy(labels).to(device)
        opt = torch_adamw(model, state.params, r)
        return torch_train_step(lambda: F.cross_entropy(forward(*inputs), y, label_smoothing=smoothing),
                                opt, r.get("grad_clip"))

    sd = torch_state_dict(variables)
    return _Task(state.replace(apply_fn=apply),
                 steps.jit_train_step(steps.train_step, label_smoothing=smoothing),
                 {"image": f_in[0], "label": jnp.asarray(labels, jnp.int32)},
                 lambda v, x: apply(v, x, train=False), variables,
                 lambda: load_torch(torch_reference.create_model(preset), sd, device),
                 torch_step, lambda m: m, lambda m: m)


def _contrastive(preset, f_in, t_in, precision, key, device):
    from torch_reference.clip import contrastive_loss
    from train.contrastive import MAX_LOGIT_SCALE, contrastive_step

    r = preset.train
    model = jax_models.create_model(preset)
    init_key, rng = jax.random.split(key)
    variables = jax.jit(lambda k: model.init(k, f_in[0][:1], f_in[1][:1]))(init_key)
    state = steps.create_state(model, variables, _optimizer(r, variables["params"]), rng)
    apply = _precision(model.apply, precision)

    def torch_step(model, features, inputs):
        # NEW, not in train/ yet: the torch twin of train.contrastive.contrastive_step.
        opt = torch_adamw(model, state.params, r)

        def clamp_scale():
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        return torch_train_step(lambda: contrastive_loss(*features(*inputs)), opt, r.get("grad_clip"),
                                clamp_scale)

    sd = torch_state_dict(variables)
    return _Task(state.replace(apply_fn=apply), steps.jit_train_step(contrastive_step),
                 {"image": f_in[0], "tokens": f_in[1]},
                 lambda v, x, tokens: apply(v, x, tokens, train=False), variables,
                 lambda: load_torch(torch_reference.create_model(preset), sd, device),
                 torch_step, lambda m: m, lambda m: _Call(m, "features"))


def _diffusion(preset, f_in, t_in, precision, key, device):
    from jax_models.ddpm import DDPM
    from torch_reference import ddpm as torch_ddpm
    from train.diffusion import DiffusionState, diffusion_step

    r = preset.train
    ddpm = DDPM(jax_models.create_model(preset), r["timesteps"], r["beta_start"], r["beta_end"])
    init_key, rng = jax.random.split(key)
    x = f_in[0][:1]
    variables = dict(jax.jit(lambda k: ddpm.init(k, x, jnp.zeros((1,), jnp.int32), x))(init_key))
    params = variables.pop("params")
    state = DiffusionState.create(apply_fn=_precision(ddpm.apply, precision), params=params,
                                  tx=_optimizer(r, params), rng=rng, constants=variables,
                                  ema_params=jax.tree.map(jnp.copy, params))
    unet_apply = _precision(jax_models.create_model(preset).apply, precision)
    sd = torch_state_dict({"params": params, **variables})

    def torch_model():
        model = torch_ddpm.DDPM(torch_reference.create_model(preset), r["timesteps"], r["beta_start"],
                                 r["beta_end"])
        return load_torch(model, sd, device)

    def torch_step(ddpm, unet_forward, inputs):
        # The torch twin of train.diffusion.diffusion_step: p_losses at uniform t, then the EMA.
        ema = copy.deepcopy(ddpm).eval().requires_grad_(False)
        ddpm.model = unet_forward
        images, count = inputs[0], [0]

        def loss():
            t = torch.randint(0, ddpm.timesteps, (images.shape[0],), device=images.device)
            return ddpm.p_losses(images, t, torch.randn_like(images))

        def update_ema():
            d = min(r["ema_decay"], (1.0 + count[0]) / (10.0 + count[0]))
            count[0] += 1
            with torch.no_grad():
                for e, p in zip(ema.parameters(), ddpm.parameters()):
                    e.mul_(d).add_(p, alpha=1 - d)
        return torch_train_step(loss, torch_adamw(ddpm, params, r), r.get("grad_clip"), update_ema)

    return _Task(state.replace(step=jnp.zeros((), jnp.int32)),
                 steps.jit_train_step(diffusion_step, timesteps=r["timesteps"], ema_decay=r["ema_decay"]),
                 {"image": f_in[0]},
                 lambda v, x, t: unet_apply(v, x, t, train=False), {"params": params["model"]},
                 torch_model, torch_step, lambda ddpm: ddpm.model, lambda ddpm: ddpm.model)


TASKS = {"classification": _classification, "contrastive": _contrastive, "diffusion": _diffusion}


# ---------------------------------------------------------------------------------------------


def build_workload(preset: str | Preset, mode: str, batch_size: int, precision: str = "fp32",
                   seed: int = 0, device: str | None = None) -> Workload:
    """Everything needed to time one row group: the checked forward, a Runner per framework, the
    model FLOPs. `device`: torch's ('cuda' when available, else 'cpu'); JAX uses its default."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive; got {batch_size}")
    if preset.task not in TASKS:
        raise ValueError(f"preset {preset.name!r} has task {preset.task!r}; the benchmarks know "
                         f"{', '.join(TASKS)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_in, f_in = example_inputs(preset, batch_size, seed)
    t_in = tuple(x.to(device) for x in t_in)
    task = TASKS[preset.task](preset, f_in, t_in, precision, jax.random.key(seed), device)
    amp = (lambda m: Autocast(m, device.type)) if precision == "bf16" else (lambda m: m)
    train_inputs = t_in[:1] if preset.task == "diffusion" else t_in
    jax_forward = jax.jit(task.jax_forward)

    def forward_outputs():
        ours = _numpy(jax_forward(task.jax_forward_vars, *f_in))
        model = task.torch_model().eval()
        with torch.inference_mode():
            theirs = _numpy(amp(task.infer_module(model))(*t_in))
        return ours, theirs

    def jax_runner(fn, args) -> Runner:
        box = {"args": args}

        def first():
            box["compiled"] = fn.lower(*args).compile()
            return step()

        def step():
            out = box["compiled"](*box["args"])
            if mode == "train":
                box["args"] = (out[0],) + box["args"][1:]
            return jax.block_until_ready(out)
        return Runner(first, step, box)

    def torch_runner(compile_: bool, precision_: str = precision) -> Runner:
        model = task.torch_model()
        forward = (task.infer_module if mode == "infer" else task.train_module)(model)
        forward = Autocast(forward, device.type) if precision_ == "bf16" else forward
        forward = torch.compile(forward) if compile_ else forward
        if mode == "infer":
            model.eval()

            def step():
                with torch.inference_mode():
                    out = forward(*t_in)
                _sync(device)
                return out
        else:
            model.train()
            update = task.torch_step(model, forward, train_inputs)

            def step():
                out = update()
                _sync(device)
                return out
        held = sum(t.numel() * t.element_size() for t in [*model.state_dict().values(), *t_in])
        return Runner(step, step, {"held_bytes": held})

    def runner(framework: str) -> Runner:
        if framework == "jax":
            if mode == "train":
                state = jax.tree.map(jnp.copy, task.state)   # donated by the step
                return jax_runner(task.jax_step, (state, task.jax_batch))
            return jax_runner(jax_forward, (task.jax_forward_vars, *f_in))
        if framework in ("torch", "torch-compile"):
            return torch_runner(framework == "torch-compile")
        raise ValueError(f"unknown framework {framework!r}; known: {', '.join(FRAMEWORKS)}")

    def count_flops() -> int:
        from torch.utils.flop_counter import FlopCounterMode

        step = torch_runner(False, "fp32").step
        with FlopCounterMode(display=False) as counter:
            step()
        return int(counter.get_total_flops())

    return Workload(preset, mode, batch_size, precision, device, forward_outputs, runner, count_flops)
