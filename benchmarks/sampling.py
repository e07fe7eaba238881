"""Time to draw samples from a diffusion preset: the compiled JAX sampler against the eager torch loop.

`python -m benchmarks.sampling [--preset ddpm-digits] [--num-samples 256] [--timesteps T]
[--sampler ancestral|ddim] [--ddim-steps 50] [--runs 3] [--warmup 1] [--no-inference-options]`.
Both frameworks get the same weights (torch init carried over by the bridge); JAX's sampler is
compiled as the trainer's (`xla_flags.inference_compiler_options()`, unless
`--no-inference-options`) and its compile time is reported apart from its runs (median,
`block_until_ready`); after an untimed warm-up of each, the JAX and torch runs alternate, so
that a shared machine's drift slows both alike; torch runs under `no_grad` (`--torch-threads`: on
a shared machine two OpenMP threads that wait for each other can make small eager convolutions
far slower).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def bench(preset="ddpm-digits", num_samples=256, timesteps=None, sampler="ancestral", ddim_steps=50,
          runs=3, torch_runs=3, torch_threads=None, seed=0, matmul_conv_pixels=None, warmup=1,
          inference_options=True) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    import bridge
    import jax_models
    import torch_reference
    from jax_models import ddpm as J
    from jax_models import layers, xla_flags
    from twin_models.presets import get_preset
    from torch_reference import ddpm as T

    if torch_threads:
        torch.set_num_threads(torch_threads)
    p = get_preset(preset)
    T_ = timesteps or p.train["timesteps"]
    sched = dict(timesteps=T_, beta_start=p.train["beta_start"], beta_end=p.train["beta_end"])
    torch.manual_seed(seed)
    td = T.DDPM(torch_reference.create_model(p), **sched).eval()
    fd = J.DDPM(jax_models.create_model(p), **sched)
    x = jnp.zeros((1, *p.input_shape_nhwc))
    variables = bridge.torch_to_flax(td.state_dict(), fd, x, jnp.zeros((1,), jnp.int32), x)
    size, ch = p.image_size, p.in_channels

    if sampler == "ancestral":
        fn = lambda v, k: fd.apply(v, k, size, num_samples, ch, method=J.DDPM.sample)
        torch_fn = lambda: td.sample(size, num_samples, ch)
    else:
        fn = lambda v, k: fd.apply(v, k, size, num_samples, ch, ddim_steps, method=J.DDPM.ddim_sample)
        torch_fn = lambda: td.ddim_sample(size, num_samples, ch, steps=ddim_steps)

    t0 = time.perf_counter()
    pixels = layers.MATMUL_CONV_PIXELS if matmul_conv_pixels is None else matmul_conv_pixels
    options = xla_flags.inference_compiler_options() if inference_options else None
    with layers.matmul_conv_pixels(pixels):
        compiled = jax.jit(fn, compiler_options=options).lower(variables, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):  # untimed: a first run of a fresh process is 15-30% slower
        compiled(variables, jax.random.key(runs)).block_until_ready()
        torch_fn()
    jax_times, torch_times = [], []
    for i in range(max(runs, torch_runs)):  # alternating, so that the machine's drift hits both alike
        if i < runs:
            t0 = time.perf_counter()
            compiled(variables, jax.random.key(i)).block_until_ready()
            jax_times.append(time.perf_counter() - t0)
        if i < torch_runs:
            t0 = time.perf_counter()
            torch_fn()
            torch_times.append(time.perf_counter() - t0)
    return dict(preset=preset, sampler=sampler, steps=T_ if sampler == "ancestral" else ddim_steps,
                num_samples=num_samples, matmul_conv_pixels=pixels, warmup=warmup, jax_compile_s=round(compile_s, 2),
                jax_run_s=round(statistics.median(jax_times), 2), jax_runs=[round(t, 2) for t in jax_times],
                torch_eager_s=round(statistics.median(torch_times), 2),
                torch_runs=[round(t, 2) for t in torch_times],
                speedup=round(statistics.median(torch_times) / statistics.median(jax_times), 2),
                machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} "
                        f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads)",
                xla_flags=os.environ.get("XLA_FLAGS", ""), compiler_options=options or {})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sampling", description=__doc__)
    ap.add_argument("--preset", default="ddpm-digits")
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--timesteps", type=int, default=None, help="schedule length (default: the preset's)")
    ap.add_argument("--sampler", choices=["ancestral", "ddim"], default="ancestral")
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--torch-runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each framework first (default 1)")
    ap.add_argument("--torch-threads", type=int, default=None, help="default: torch's own choice")
    ap.add_argument("--matmul-conv-pixels", type=int, default=None,
                    help="JAX convs over at most this many pixels as im2col matmuls (default: the layers' MATMUL_CONV_PIXELS, 4)")
    ap.add_argument("--inference-options", action=argparse.BooleanOptionalAction, default=True,
                    help="compile with jax_models.xla_flags.inference_compiler_options(), as the "
                         "trainer's sampler does (default); --no-inference-options: XLA's plain compile")
    a = ap.parse_args(argv)
    from .options import check_options
    check_options(ap, a, counts=("num_samples", "timesteps", "ddim_steps", "runs", "torch_runs", "torch_threads"))
    if a.warmup < 0 or (a.matmul_conv_pixels is not None and a.matmul_conv_pixels < 0):
        ap.error(f"--warmup and --matmul-conv-pixels must be 0 or more, not {a.warmup}, {a.matmul_conv_pixels}")
    from jax_models.xla_flags import apply_cpu_flags
    apply_cpu_flags()
    print(json.dumps(bench(a.preset, a.num_samples, a.timesteps, a.sampler, a.ddim_steps, a.runs,
                           a.torch_runs, a.torch_threads, matmul_conv_pixels=a.matmul_conv_pixels, warmup=a.warmup,
                           inference_options=a.inference_options)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
