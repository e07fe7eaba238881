"""Layer-by-layer comparison of a torch model and its Flax twin on one input.

Torch outputs are captured with forward hooks on every submodule, Flax outputs with
`capture_intermediates`; modules are matched by name (`blocks_3/mlp/0` <-> `blocks.3.mlp.0`), so
the tool serves every model that follows the mirroring rule.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from twin_models.layout import torch_layout

from .convert import flax_module_path_to_torch, module_paths, to_numpy, torch_to_flax

# The project's tolerances (float32, CPU), relative to the largest magnitude of the reference
# (torch) value: forward, each gradient leaf, and the losses / final weights of 20 AdamW steps.
FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4
TRAJECTORY_TOL = 1e-4
# `python -m bridge verify --all` (`bridge.report`) holds every preset to tighter ones: the forward,
# the gradient of each parameter, and the losses of its 100-step trajectory (relative to the largest
# loss); its final weights, in float64, keep TRAJECTORY_TOL.
REPORT_FORWARD_TOL = 2e-6
REPORT_GRAD_TOL = 1e-5
REPORT_LOSS_TOL = 1e-4


@dataclasses.dataclass
class LayerDiff:
    path: str               # torch module path; "<output>" for the model's output
    shape: tuple
    max_abs: float
    rel: float              # max_abs / max |torch output|
    over: bool


@dataclasses.dataclass
class Report:
    layers: list[LayerDiff]   # in the order torch finished computing them; the output last
    tol: float

    @property
    def output(self) -> LayerDiff:
        return self.layers[-1]

    @property
    def first_divergent(self) -> LayerDiff | None:
        return next((d for d in self.layers if d.over), None)

    @property
    def ok(self) -> bool:
        return not self.output.over

    def table(self) -> str:
        width = max(len(d.path) for d in self.layers)
        first = self.first_divergent
        lines = [f"{'module':<{width}}  {'shape':<18} {'max abs diff':>12} {'rel diff':>10}"]
        for d in self.layers:
            mark = "  <- first over tolerance" if d is first else ("  over" if d.over else "")
            lines.append(f"{d.path:<{width}}  {str(d.shape):<18} {d.max_abs:>12.3e} {d.rel:>10.3e}{mark}")
        verdict = "PASS" if self.ok else "FAIL"
        if np.isnan(self.output.rel):
            verdict = "FAIL (non-finite values: a NaN or inf in an output)"
        lines.append(f"{verdict}: output rel diff {self.output.rel:.3e} (tolerance {self.tol:g})"
                     + (f"; first layer over tolerance: {first.path}" if first else ""))
        return "\n".join(lines)


def _first_array(out: Any):
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    return out


def _diff(path: str, ref: np.ndarray, got: np.ndarray, tol: float) -> LayerDiff | None:
    got = _as_torch_layout(ref, got)
    if got.shape != ref.shape:
        return None
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    max_abs = float(np.max(np.abs(ref64 - got64))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref64))) if ref.size else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    finite = bool(np.isfinite(ref64).all() and np.isfinite(got64).all())
    if not finite:
        rel = float("nan")
    return LayerDiff(path, tuple(ref.shape), max_abs, rel, not rel <= tol)


def torch_layers(torch_model, torch_inputs, autocast: bool = False):
    """(every submodule's floating output by name, in the order torch finished them; the model's
    output), eval mode, captured with forward hooks. `autocast`: under bfloat16 autocast, as the
    trainer's `--precision bf16` runs torch."""
    import contextlib

    import torch

    captured: dict[str, np.ndarray] = {}

    def hook(name):
        def fn(module, args, out):
            out = _first_array(out)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                captured[name] = out.detach().float().cpu().numpy()
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in torch_model.named_modules() if n]
    was_training = torch_model.training
    torch_model.eval()
    device = next(torch_model.parameters()).device.type
    cast = torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    try:
        with torch.no_grad(), cast:
            out = _first_array(torch_model(*torch_inputs))
    finally:
        for h in handles:
            h.remove()
        torch_model.train(was_training)
    return captured, to_numpy(out.float())


def flax_layers(flax_model, variables, flax_inputs, dtype=None):
    """(every submodule's output by torch name, the model's output) via `capture_intermediates`,
    at the highest matmul precision; `dtype` (bfloat16, say): parameters and float inputs cast to
    it, as the trainer's `--precision bf16` runs Flax. On CPU, XLA's own dots, not YNNPACK's
    (`jax_models.xla_flags.parity_compiler_options`)."""
    import jax.numpy as jnp

    if dtype is not None:
        cast = lambda t: t.astype(dtype) if jnp.issubdtype(t.dtype, jnp.floating) else t  # noqa: E731
        variables = {**variables, "params": jax.tree_util.tree_map(cast, variables["params"])}
        flax_inputs = [cast(jnp.asarray(x)) for x in flax_inputs]
    from jax_models.xla_flags import parity_compiler_options

    with jax.default_matmul_precision("highest"):
        out, state = jax.jit(lambda v, *x: flax_model.apply(v, *x, capture_intermediates=True,
                                                            mutable=["intermediates"]),
                             compiler_options=parity_compiler_options())(variables, *flax_inputs)
    outs = {}
    modules = module_paths(variables["params"]) | module_paths(state["intermediates"])
    for path, value in flatten_dict(state["intermediates"]).items():
        out_value = _first_array(value[-1])
        if path[-1] == "__call__" and len(path) > 1 and hasattr(out_value, "dtype"):
            outs[flax_module_path_to_torch(path[:-1], modules)] = np.asarray(out_value, np.float32)
    return outs, np.asarray(_first_array(out), np.float32)


def compare_layers(torch_model, flax_model, variables, torch_inputs: Sequence, flax_inputs: Sequence,
                   tol: float = FORWARD_TOL) -> Report:
    """Run both models in eval mode on the same input and diff every pair of same-named modules."""
    captured, ref_out = torch_layers(torch_model, torch_inputs)
    flax_outs, out = flax_layers(flax_model, variables, flax_inputs)
    layers = []
    for name in captured:
        if name in flax_outs:
            d = _diff(name, captured[name], flax_outs[name], tol)
            if d is not None:
                layers.append(d)
    d = _diff("<output>", ref_out, out, tol)
    if d is None:
        raise ValueError(f"the two models' outputs have different shapes: torch {tuple(ref_out.shape)}, "
                         f"flax {tuple(out.shape)}")
    layers.append(d)
    return Report(layers, tol)


@dataclasses.dataclass
class DriftRow:
    path: str
    shape: tuple
    torch: float   # torch bf16 against torch fp32
    flax: float    # Flax bf16 against Flax fp32
    between: float  # Flax bf16 against torch bf16


@dataclasses.dataclass
class DriftReport:
    """What bfloat16 costs, layer by layer: each backend against its own float32, and the two
    backends' bfloat16 against each other (all relative to the largest float32 torch value)."""
    rows: list[DriftRow]

    @property
    def output(self) -> DriftRow:
        return self.rows[-1]

    @property
    def finite(self) -> bool:
        return all(np.isfinite([r.torch, r.flax, r.between]).all() for r in self.rows)

    def table(self) -> str:
        width = max(len(r.path) for r in self.rows)
        lines = [f"{'module':<{width}}  {'shape':<18} {'torch bf16':>11} {'flax bf16':>11} {'flax-torch':>11}",
                 f"{'':<{width}}  {'':<18} {'vs fp32':>11} {'vs fp32':>11} {'(bf16)':>11}"]
        for r in self.rows:
            lines.append(f"{r.path:<{width}}  {str(r.shape):<18} {r.torch:>11.3e} {r.flax:>11.3e} {r.between:>11.3e}")
        o = self.output
        lines.append(f"bf16 output: torch {o.torch:.3e} and Flax {o.flax:.3e} from their float32; "
                     f"{o.between:.3e} apart" + ("" if self.finite else "; NON-FINITE values"))
        return "\n".join(lines)


def bf16_drift(torch_model, flax_model, variables, torch_inputs, flax_inputs) -> DriftReport:
    """Both models in float32 and in bfloat16 (torch under autocast, Flax with bfloat16 parameters
    and inputs, as the trainer runs them), every layer compared four ways."""
    import jax.numpy as jnp

    t32, t32_out = torch_layers(torch_model, torch_inputs)
    t16, t16_out = torch_layers(torch_model, torch_inputs, autocast=True)
    f32, f32_out = flax_layers(flax_model, variables, flax_inputs)
    f16, f16_out = flax_layers(flax_model, variables, flax_inputs, jnp.bfloat16)
    rows = []
    named = [(n, t32[n], t16.get(n), f32.get(n), f16.get(n)) for n in t32]
    for name, a, b, c, d in [*named, ("<output>", t32_out, t16_out, f32_out, f16_out)]:
        if b is None or c is None or d is None:
            continue
        c, d = _as_torch_layout(a, c), _as_torch_layout(a, d)
        if not a.shape == b.shape == c.shape == d.shape:
            continue
        scale = float(np.max(np.abs(a))) or 1.0
        rel = lambda x, y: float(np.max(np.abs(x.astype(np.float64) - y))) / scale  # noqa: E731
        rows.append(DriftRow(name, tuple(a.shape), rel(b, a), rel(d, c), rel(d, b)))
    return DriftReport(rows)


def _as_torch_layout(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """A Flax NHWC activation as torch's NCHW. Where both layouts fit (H == W == C; Swin's torch
    twin is channels-last too), the one closer to `ref`."""
    if got.ndim != 4 or ref.ndim != 4 or got.transpose(0, 3, 1, 2).shape != ref.shape:
        return got
    nchw = got.transpose(0, 3, 1, 2)
    if got.shape != ref.shape:
        return nchw
    ref64 = ref.astype(np.float64)
    return min((got, nchw), key=lambda x: float(np.max(np.abs(ref64 - x), initial=0.0)))


def framework_inputs(arrays) -> tuple[tuple, tuple]:
    """numpy arrays -> (torch tensors, jax arrays): float images NHWC -> NCHW for torch; integers
    int64 for torch and JAX's default integer for Flax (`twin_models.layout.torch_layout`)."""
    import torch

    return (tuple(torch.from_numpy(torch_layout(a)) for a in arrays),
            tuple(jax.numpy.asarray(np.asarray(a)) for a in arrays))


def example_inputs(preset, batch_size: int = 2, seed: int = 0):
    """(torch inputs, flax inputs) of a preset's forward (`presets.example_inputs`): images N(0, 1),
    NCHW for torch and NHWC for Flax; timesteps and token ids int64 for torch."""
    from twin_models.presets import example_inputs as arrays

    return framework_inputs(arrays(preset, batch_size, seed))


def check_state_dict(state_dict, expected):
    """Every missing key, unexpected key, shape and dtype kind that does not fit `expected` (a torch
    model's state dict), in one `WeightMismatchError`."""
    from .convert import WeightMismatchError

    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes, dtypes = [], []
    for k in expected:
        if k in state_dict:
            got, want = np.asarray(state_dict[k]), expected[k]
            if tuple(got.shape) != tuple(want.shape):
                shapes.append(f"{k}: file {tuple(got.shape)}, the model {tuple(want.shape)}")
            elif want.is_floating_point() and got.dtype != np.dtype(str(want.dtype).removeprefix("torch.")):
                dtypes.append(f"{k}: file dtype {got.dtype}, the model holds {str(want.dtype).removeprefix('torch.')}")
    if missing or unexpected or shapes or dtypes:
        raise WeightMismatchError(missing, unexpected, shapes, target="the torch model", dtypes=dtypes)


def build_twins(preset, seed: int = 0, state_dict=None, batch_size: int = 2, attention_impl: str = "xla"):
    """(torch model (eval mode), flax model, flax variables, torch inputs, flax inputs) with the
    same weights: torch's init from `seed` (or `state_dict`) carried over by the bridge; the
    inputs are the preset's `example_inputs`. `attention_impl` is the Flax model's."""
    import torch
    import jax_models
    import torch_reference

    torch.manual_seed(seed)
    torch_model = torch_reference.create_model(preset).eval()
    if state_dict is not None:
        check_state_dict(state_dict, torch_model.state_dict())
        torch_model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()},
                                    strict=True)
    flax_model = jax_models.create_model(preset, attention_impl=attention_impl)
    t_in, f_in = example_inputs(preset, batch_size, seed)
    variables = torch_to_flax(torch_model.state_dict(), flax_model, *f_in)
    return torch_model, flax_model, variables, t_in, f_in


def verify(preset, batch_size: int = 2, seed: int = 0, tol: float = FORWARD_TOL, state_dict=None,
           precision: str = "fp32"):
    """Build both twins of `preset`, carry the torch weights over, and compare them layer by layer:
    a `Report` (fp32), or with `precision="bf16"` a `DriftReport` of what bfloat16 costs."""
    import torch

    from twin_models.presets import get_preset

    preset = get_preset(preset) if isinstance(preset, str) else preset
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # full float32
    try:
        torch_model, flax_model, variables, t_in, f_in = build_twins(preset, seed, state_dict, batch_size)
        if precision == "bf16":
            return bf16_drift(torch_model, flax_model, variables, t_in, f_in)
        return compare_layers(torch_model, flax_model, variables, t_in, f_in, tol)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
