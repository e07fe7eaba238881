"""The XLA:CPU settings the models are measured with. Nothing is applied on import: the command-line
tools (`python -m train`, `bridge`, `benchmarks`) call `apply_cpu_flags()` before JAX starts its
backend, and a user who wants the same in their own program calls it first (it imports neither jax
nor jaxlib, and changes nothing once JAX's backend has started).

jaxlib 0.10 hands float32 convolutions on CPU to YNNPACK. At the U-Net's shapes (3x3 over 16x16
and 8x8 maps, 16-64 channels) its kernels are slower than XLA's own: one `ddpm-digits` U-Net call
at batch 64 took 28.2 ms with them and 22.2 ms without (eager torch 25.0), a training step 123
and 92 ms (torch 84). `CPU_FLAGS` keeps YNNPACK for matmuls (`individual_dot`, XLA's other
default) and takes it off convolutions. Set `--xla_cpu_experimental_ynn_fusion_type` yourself
(e.g. `=individual_dot,individual_convolution`, XLA's default) and it is left as you set it.

Inference programs (the diffusion samplers) are compiled with `inference_compiler_options()`:
YNNPACK also takes the reductions, with the elementwise work around them. It sums a (256, 16, 16,
64) map over its spatial axes in 0.5 ms where XLA's own reduce takes 1.9, which makes GroupNorm's
statistics cheap; a training step, with the backward's reductions, came out 3-6% slower with it,
so it is not in `CPU_FLAGS`.

A training step may be compiled with `train_compiler_options(dot_fusion=True)` (the recipe key
`cpu_dot_fusion`): YNNPACK's `dot` fusion type, where a matmul takes the elementwise work around
it into its library call. With XLA's default threading and small batches, `individual_dot` leaves
GELU's derivative to XLA's loop fusions, which it duplicates into the bias gradient's reduction and
into the transposed copy the weight gradient's dot reads; at two threads those run about 5x slower
than one plain reduction of the same array. `mmt-vqa-scenes` at its batch of 24 took 30.5 ms a step
with `individual_dot` and 18.8 with `dot`; at batch 128 `vit-digits`, `clip-digits` and
`swin-digits` were 10-25% slower with `dot`, so it is a recipe's choice. On one thread XLA makes
other fusions and `dot` does not pay (`mmt-vqa-scenes` with its cross-modal sublayers: 34.2 ms a
step with `individual_dot`, 40.0 with `dot`; 43.9 and 33.9 on two threads), so it applies only
where XLA has more than one thread (`xla_cpu_threads()`).

Parity measurements (`bridge`: `verify`, `verify --all`) are compiled with
`parity_compiler_options()`: no YNNPACK at all, so XLA emits its own dots. YNNPACK's float32 dot
rounds 3-6x more than XLA's or MKL's: a (394, 3072) x (3072, 768) product is 1.5e-6 from float64
with it, 2.6e-7 without (torch 3.5e-7), which took `vit-b16`'s forward from 1.4e-6 to 2.2e-6 of
torch's. It is the CPU's counterpart of `jax.default_matmul_precision("highest")` on a GPU.

The parameter initialisation (`model.init` under `jax.jit`) is compiled with
`init_compiler_options()`: LLVM at optimisation level 1 instead of XLA's default. The program is
almost all threefry bit-mixing, which the default level spends long on for nothing: `ddpm-digits`'
init compiled in 32.7 s, 14.8 at level 1; `vit-digits`' 11.8 and 6.8 (2-core AMD EPYC, beside
two training runs). The weights are the same bits at both levels for every small preset (tested);
at level 0 they are not.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"--{YNN_FLAG}=individual_dot",)
INFERENCE_OPTIONS = {YNN_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
PARITY_OPTIONS = {YNN_FLAG: ""}
DOT_FUSION_OPTIONS = {YNN_FLAG: "LIBRARY_FUSION_TYPE_DOT"}
INIT_OPTIONS = {"xla_backend_optimization_level": "1"}
JAXLIB_KNOWN = ((0, 10), (0, 13))  # the jaxlib releases (>=, <) whose XLA reads these flags; others abort on them


def _jaxlib_version() -> tuple[int, int] | None:
    try:
        return tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return None


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True


def add_flags(flags) -> list[str]:
    """Put in front of `XLA_FLAGS` each of `flags` whose name it does not already hold; returns
    those added (none once JAX's backend has started, where they would no longer take effect).

    In front, because XLA stops reading `XLA_FLAGS` at the first word that does not start with
    `--`, silently: after the common single-thread recipe `--xla_cpu_multi_thread_eigen=false
    intra_op_parallelism_threads=1`, an appended flag would never be read."""
    if _backend_started():
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = [f for f in flags if f.split("=")[0] not in current]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([*added, current]).strip()
    return added


def apply_cpu_flags() -> list[str]:
    """Add `CPU_FLAGS` to `XLA_FLAGS` (what the CLIs run with), on a jaxlib known to read them
    (others abort on unknown flags); call before the first JAX computation. Returns those added.
    A ValueError (`check_env`) for a setting JAX's backend would fail to start with."""
    check_env()
    return add_flags(CPU_FLAGS) if _known_jaxlib() else []


DEVICE_COUNT = "xla_force_host_platform_device_count"


def check_env() -> None:
    """A ValueError naming the setting for an `XLA_FLAGS` that JAX's CPU backend cannot start with:
    `--xla_force_host_platform_device_count` that is not a positive integer."""
    for flag in os.environ.get("XLA_FLAGS", "").split():
        name, _, value = flag.lstrip("-").partition("=")
        if name == DEVICE_COUNT and not (value.strip().isdigit() and int(value) >= 1):
            raise ValueError(f"XLA_FLAGS --{DEVICE_COUNT}={value}: the fake CPU device count must be a "
                             "positive integer")


def _known_jaxlib() -> bool:
    version = _jaxlib_version()
    return version is not None and JAXLIB_KNOWN[0] <= version < JAXLIB_KNOWN[1]


def init_compiler_options() -> dict[str, str] | None:
    """`jax.jit(..., compiler_options=...)` for the parameter initialisation: `INIT_OPTIONS`
    (LLVM level 1, the same weights in a third to a half of the compile time) on the CPU backend
    of a known jaxlib, unless `XLA_FLAGS` sets the level itself; None elsewhere."""
    return _cpu_options(INIT_OPTIONS, "xla_backend_optimization_level")


def _cpu_options(options: dict[str, str], user_flag: str = YNN_FLAG) -> dict[str, str] | None:
    import jax

    user_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in CPU_FLAGS]
    if jax.default_backend() != "cpu" or not _known_jaxlib() or any(user_flag in f for f in user_flags):
        return None
    return dict(options)


def inference_compiler_options() -> dict[str, str] | None:
    """`jax.jit(..., compiler_options=...)` for an inference program: `INFERENCE_OPTIONS` on the
    CPU backend of a known jaxlib, unless `XLA_FLAGS` sets the YNNPACK flag otherwise than
    `CPU_FLAGS` does (the user's choice holds); None elsewhere (GPU, TPU)."""
    return _cpu_options(INFERENCE_OPTIONS)


def train_compiler_options(dot_fusion: bool = False) -> dict[str, str] | None:
    """`compile(compiler_options=...)` for a training step: `DOT_FUSION_OPTIONS` (YNNPACK's `dot`
    fusions) when `dot_fusion` (the recipe's `cpu_dot_fusion`) on the CPU backend of a known jaxlib
    with more than one XLA thread (on one they cost: see the module's docstring), unless `XLA_FLAGS`
    sets the YNNPACK flag otherwise than `CPU_FLAGS` does; None otherwise (`XLA_FLAGS` as it is)."""
    return _cpu_options(DOT_FUSION_OPTIONS) if dot_fusion and xla_cpu_threads() > 1 else None


def xla_cpu_threads() -> int:
    """The threads of XLA:CPU's intra-op pool: `intra_op_parallelism_threads=N` in `XLA_FLAGS`,
    else the CPUs this process may run on (`taskset` counts)."""
    for flag in os.environ.get("XLA_FLAGS", "").split():
        name, _, value = flag.lstrip("-").partition("=")
        if name == "intra_op_parallelism_threads" and value.isdigit():
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parity_compiler_options() -> dict[str, str] | None:
    """`jax.jit(..., compiler_options=...)` for a parity measurement: `PARITY_OPTIONS` (XLA's own
    dots, not YNNPACK's) on the CPU backend of a known jaxlib, unless `XLA_FLAGS` sets the YNNPACK
    flag otherwise than `CPU_FLAGS` does; None elsewhere."""
    return _cpu_options(PARITY_OPTIONS)
