"""`python -m benchmarks`: XLA (jitted JAX) against eager PyTorch and torch.compile, same model,
weights, batch and precision, for training steps and inference.

For each preset, mode, batch size, precision and framework: the first call (trace + compile + one
step) timed apart, then `--warmup` steps, then up to `--repeats` timed steps (fewer, but at least
3, once a row has spent `--max-row-seconds`); reported as the median and the interquartile range.
Before any timing the two frameworks' forwards are compared on the batch; a mismatch skips the row
group with an error (exit status 1). Other failures (a model torch.compile cannot compile, say) go
into that row's `error` and the run goes on.

Model FLOPs per step are counted once, on the torch twin in fp32 with
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention of the forward,
and of the backward in training; 2 FLOPs a multiply-add; the optimizer and elementwise work not
counted), and the same number serves every framework. XLA's own count of the JAX program
(`cost_analysis()['flops']`, all ops) is recorded beside it as `xla_flops`. The machine's peak is
the best rate of a large square matmul in either framework in the row's precision, measured at
start; `peak_fraction` = achieved / peak.

Peak memory: JAX on GPU `memory_stats()['peak_bytes_in_use']` (the process's high-water mark);
JAX elsewhere the compiled program's `memory_analysis()` (arguments + outputs + temporaries -
aliased); torch on CUDA `max_memory_allocated`; torch on CPU the process's peak RSS over the row
above its RSS before the first call, plus the bytes of the weights and batch it already held
(first call included, so torch.compile's compiler counts). `memory_source` says which.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

from jax_models import compile_cache

from .options import check_options, default_batch


# ---------------------------------------------------------------------------------------------
# The machine


def machine_info(torch_device) -> dict:
    """Where and with what the figures were taken."""
    import jax
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = jax.devices()[0]
    info = {
        "host": f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPU cores",
        "jax_device": f"{dev.platform}:{dev.device_kind} x{jax.device_count()}",
        "torch_device": str(torch_device) + (f" ({torch.cuda.get_device_name(torch_device)})"
                                             if torch_device.type == "cuda" else ""),
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
                     "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
        "torch_allow_tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                             "cudnn": torch.backends.cudnn.allow_tf32},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def matmul_peak(framework: str, precision: str, torch_device, reps: int = 3) -> float:
    """FLOP/s of the best square matmul in `framework` and `precision`: sizes from 512 doubling up
    to 2048 (CPU) or 8192 (GPU), stopping early where one product takes over 0.25 s (bf16 on a
    CPU without bf16 units can be a thousand times slower than fp32)."""
    import jax
    import jax.numpy as jnp
    import torch

    on_gpu = torch_device.type == "cuda" if framework != "jax" else jax.default_backend() != "cpu"
    best = 0.0
    for n in (512, 1024, 2048, 4096, 8192)[:5 if on_gpu else 3]:
        if framework == "jax":
            a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16 if precision == "bf16" else jnp.float32)
            f = jax.jit(lambda x, y: x @ y)
            run = lambda: f(a, a).block_until_ready()  # noqa: E731
        else:
            a = torch.randn(n, n, device=torch_device,
                            dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
            run = (lambda: (a @ a, torch.cuda.synchronize(torch_device))) if on_gpu else (lambda: a @ a)  # noqa: E731
        run()
        seconds = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            seconds = min(seconds, time.perf_counter() - t0)
            if seconds > 0.25:
                break
        best = max(best, 2 * n ** 3 / seconds)
        if seconds > 0.25:
            break
    return best


# ---------------------------------------------------------------------------------------------
# Memory


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _release_and_reset_peak():
    """Give freed heap back to the OS and restart the peak-RSS counter (Linux)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# One row


def time_row(workload, framework: str, warmup: int, repeats: int, max_row_seconds: float) -> dict:
    """Compile, warm up and time one framework on `workload`; the row's figures."""
    import jax
    import torch

    cuda = workload.device.type == "cuda"
    _release_and_reset_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats(workload.device)
    rss_before = _proc_status("VmRSS")
    runner = workload.runner(framework)
    hits = compile_cache.stats()["hits"]
    t0 = time.perf_counter()
    runner.first()
    compile_s = time.perf_counter() - t0
    cache_hit = compile_cache.stats()["hits"] > hits
    for _ in range(warmup):
        runner.step()
    times, start = [], time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        runner.step()
        times.append(time.perf_counter() - t0)
        if len(times) >= min(3, repeats) and time.perf_counter() - start > max_row_seconds:
            break
    row = {"compile_s": compile_s, "times_ms": [t * 1e3 for t in times]}
    if framework == "jax":
        row["compile_cache"] = "warm" if cache_hit else "cold"

    if framework == "jax":
        compiled = runner.info["compiled"]
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        row["xla_flops"] = float(cost.get("flops", 0.0)) if cost else None
        stats = jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            row["peak_memory_bytes"] = int(stats["peak_bytes_in_use"])
            row["memory_source"] = "jax memory_stats peak_bytes_in_use (process high-water mark)"
        else:
            m = compiled.memory_analysis()
            row["peak_memory_bytes"] = int(m.argument_size_in_bytes + m.output_size_in_bytes
                                           + m.temp_size_in_bytes - m.alias_size_in_bytes)
            row["memory_source"] = "xla memory_analysis: arguments + outputs + temps - aliases"
    elif cuda:
        row["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(workload.device))
        row["memory_source"] = "torch.cuda.max_memory_allocated"
    else:
        peak = _proc_status("VmHWM")
        if peak is not None and rss_before is not None:
            row["peak_memory_bytes"] = int(peak - rss_before + runner.info.get("held_bytes", 0))
            row["memory_source"] = "peak RSS over the row - RSS before + weights and batch held"
    del runner
    return row


def summarize(row: dict, batch_size: int, flops: int | None, peak: float | None) -> dict:
    times = row["times_ms"]
    median = statistics.median(times)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [median] * 3
    out = {"median_ms": median, "spread_ms": q[2] - q[0], "min_ms": min(times), "max_ms": max(times),
           "n_timed": len(times), "examples_per_s": batch_size / (median / 1e3)}
    if flops:
        out["achieved_flops"] = flops / (median / 1e3)
        out["peak_fraction"] = out["achieved_flops"] / peak if peak else None
    return out


# ---------------------------------------------------------------------------------------------
# The CLI


def parse_args(argv):
    from twin_models.presets import PRESETS

    from .workloads import FRAMEWORKS

    batches = ", ".join(f"{k} {p.bench_batch}" for k, p in PRESETS.items())
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog=f"Default batch sizes (each preset's `bench_batch`: CPU-sized, not the recipes'): "
               f"{batches}.")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", nargs="+", metavar="P", help="one or more presets")
    which.add_argument("--all", action="store_true", help="every preset")
    ap.add_argument("--mode", choices=("train", "infer", "both", "generate"), default="both",
                    help="generate: caption decoding speed of captioning presets (tokens/s of JAX's "
                         "compiled greedy and beam decode, the torch twin with and without its cache; "
                         "default batch sizes 1 and 64)")
    ap.add_argument("--batch-size", type=int, nargs="+", metavar="B",
                    help="batch sizes (default: each preset's bench_batch, listed below)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), nargs="+", default=["fp32"])
    ap.add_argument("--peak-flops", type=float, metavar="FLOP/S",
                    help="the peak that peak_fraction (MFU) divides by, e.g. 989e12 for an H100/H200's "
                         "dense bf16 (default: the best large matmul measured at start)")
    ap.add_argument("--attention-impl", choices=("xla", "fused", "cudnn"), default="xla",
                    help="the JAX models' attention kernel (cudnn: a GPU's, sequences padded to 16)")
    compile_cache.add_arguments(ap)
    ap.add_argument("--frameworks", default="jax,torch",
                    help=f"comma-separated, of {','.join(FRAMEWORKS)} (default: jax,torch)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per row (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first call (default 1)")
    ap.add_argument("--max-row-seconds", type=float, default=20.0,
                    help="stop timing a row after this long, once it has 3 steps (default 20)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's choice; on a loaded CPU 1 can be "
                         "far faster than 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    ap.add_argument("--markdown", metavar="PATH", help="write a markdown report")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--breakdown", action="store_true",
                    help="profile one training step of each framework per layer kind (attention, MLP, "
                         "norms, ..., forward and backward, the optimizer update, the rest): "
                         "benchmarks/breakdown.py")
    gen = ap.add_argument_group("--mode generate")
    gen.add_argument("--max-length", type=int, default=None,
                     help="generated tokens per caption (default: the preset recipe's max_length)")
    gen.add_argument("--num-beams", type=int, default=3, help="beams of the beam rows (default 3)")
    gen.add_argument("--weights", metavar="PATH",
                     help="a safetensors state dict of the preset (e.g. a --export of python -m train) "
                          "instead of the seeded random initialisation")
    a = ap.parse_args(argv)

    check_options(ap, a, counts=("repeats", "torch_threads", "max_length", "num_beams"),
                  outputs=("json", "markdown", "plot"), seed=a.seed)
    if a.warmup < 0:
        ap.error(f"--warmup must be 0 or more, not {a.warmup}")
    for flag, value in (("--max-row-seconds", a.max_row_seconds), ("--peak-flops", a.peak_flops)):
        if value is not None and not (math.isfinite(value) and value > 0):
            ap.error(f"{flag} must be a positive finite number, not {value}")
    try:
        compile_cache.dir_from_args(a)
    except ValueError as e:
        ap.error(str(e))
    a.presets = list(PRESETS) if a.all else a.preset
    unknown = [p for p in a.presets if p not in PRESETS]
    if unknown:
        ap.error(f"unknown preset(s) {', '.join(unknown)}; known presets: {', '.join(PRESETS)}")
    a.frameworks = [f.strip() for f in a.frameworks.split(",") if f.strip()]
    bad = [f for f in a.frameworks if f not in FRAMEWORKS]
    if bad or not a.frameworks:
        ap.error(f"unknown framework(s) {', '.join(bad) or '(none given)'}; known: {', '.join(FRAMEWORKS)}")
    if a.batch_size and min(a.batch_size) < 1:
        ap.error(f"batch sizes must be positive; got {a.batch_size}")
    a.modes = ["train", "infer"] if a.mode == "both" else [a.mode]
    if a.breakdown:
        from .breakdown import check_args
        check_args(ap, a)
    if a.mode == "generate":
        not_captioning = [p for p in a.presets if PRESETS[p].task != "captioning"]
        if not_captioning:
            known = [n for n, p in PRESETS.items() if p.task == "captioning"]
            ap.error(f"--mode generate times caption decoding; not captioning presets: "
                     f"{', '.join(not_captioning)} (captioning presets: {', '.join(known)})")
        if a.precision != ["fp32"]:
            ap.error("--mode generate decodes in fp32 only")
    return a


def generate_main(a, info) -> int:
    """`--mode generate`: `benchmarks.generation.bench` for each preset; records, table, files."""
    from . import generation, report

    records = []
    for preset in a.presets:
        rows = generation.bench(preset, tuple(a.batch_size or (1, 64)), a.max_length, a.num_beams,
                                a.repeats, a.torch_threads, seed=a.seed, weights=a.weights)
        records += [{**r, "mode": "generate", "date": info["date"], "device": info["host"],
                     "versions": info["versions"], "load_average": info.get("load_average")} for r in rows]
        if a.json:
            with open(a.json, "w") as f:
                json.dump(records, f, indent=1, default=str)
    text = generation.table(records)
    print(text, flush=True)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write("# Caption generation: tokens/s\n\n```\n" + report.machine_header(info) + "\n```\n\n"
                    + text + "\n")
    if a.plot:
        print("--plot is not drawn for --mode generate", file=sys.stderr)
    for path in (a.json, a.markdown):
        if path:
            print(f"wrote {path}")
    return 0 if all(r["same_tokens_as_other_framework"] or a.weights is None for r in records) else 1


def main(argv=None) -> int:
    a = parse_args(argv)
    from jax_models.xla_flags import apply_cpu_flags
    apply_cpu_flags()
    import jax  # noqa: F401  (after argparse: --help stays fast)

    cache_dir = compile_cache.enable_from_args(a)
    import torch
    from tqdm import tqdm

    from . import report
    from .workloads import TOLERANCE, ParityError, build_workload

    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine_info(device)
    print(report.machine_header(info), flush=True)
    if a.mode == "generate":
        return generate_main(a, info)
    if a.breakdown:
        from . import breakdown
        return breakdown.main(a, info, device)

    groups = [(p, m, b, prec) for p in a.presets for b in (a.batch_size or [default_batch(p)])
              for prec in a.precision for m in a.modes]
    peaks = {prec: {fw: matmul_peak(fw, prec, device) for fw in ("jax", "torch")} for prec in a.precision}
    for prec, by_fw in peaks.items():
        print(f"matmul peak ({prec}): " + ", ".join(f"{fw} {v / 1e9:.0f} GFLOP/s" for fw, v in by_fw.items()),
              flush=True)

    if not a.batch_size:
        print("batch sizes: the CPU-sized defaults of `python -m benchmarks --help`, not the "
              "recipes'", flush=True)
    def save_json(records):  # after every row group: an interrupted run keeps what it measured
        if a.json:
            tmp = a.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(records, f, indent=1, default=str)
            os.replace(tmp, a.json)

    records, parity_failed = [], False
    bar = tqdm(total=len(groups) * len(a.frameworks), disable=a.no_progress, file=sys.stderr,
               unit="row", dynamic_ncols=True)
    for preset, mode, batch, prec in groups:
        base = {"preset": preset, "mode": mode, "batch_size": batch, "precision": prec,
                "attention_impl": a.attention_impl,
                "batch_source": "--batch-size" if a.batch_size else "the preset's bench_batch",
                "compile_cache_dir": cache_dir,
                "device": f"{info['host']}; jax {info['jax_device']}; torch {info['torch_device']}",
                "versions": {**info["versions"], "torch_threads": torch.get_num_threads(),
                             "jax_default_matmul_precision": info["jax_default_matmul_precision"],
                             "torch_allow_tf32": info["torch_allow_tf32"]},
                "date": info["date"],
                "peak_flops": a.peak_flops or max(peaks[prec].values()),
                "peak_source": "--peak-flops (the device's datasheet)" if a.peak_flops else "measured matmul",
                "peak_flops_by_framework": peaks[prec]}
        bar.set_description(f"{preset} {mode} b{batch} {prec} (check)")
        try:
            workload = build_workload(preset, mode, batch, prec, seed=a.seed, device=str(device),
                                      attention_impl=a.attention_impl)
            base["task"] = workload.preset.task
            base["forward_tol"] = TOLERANCE[prec]
            base["forward_rel_err"] = workload.check()
            base["forward_check"] = "passed"
            bar.set_description(f"{preset} {mode} b{batch} {prec} (flops)")
            base["flops_per_step"] = workload.count_flops()
            base["flops_source"] = "torch FlopCounterMode on the torch twin, fp32"
        except Exception as e:  # noqa: BLE001 (the row records it)
            parity_failed |= isinstance(e, ParityError)
            if not isinstance(e, ParityError):
                traceback.print_exc()
            print(f"error: {preset} {mode} b{batch} {prec}: {e}", file=sys.stderr, flush=True)
            base["forward_check"] = "failed" if isinstance(e, ParityError) else "not run"
            records += [{**base, "framework": fw, "error": f"{type(e).__name__}: {e}"} for fw in a.frameworks]
            bar.update(len(a.frameworks))
            continue
        for fw in a.frameworks:
            bar.set_description(f"{preset} {mode} b{batch} {prec} {fw}")
            rec = {**base, "framework": fw}
            try:
                row = time_row(workload, fw, a.warmup, a.repeats, a.max_row_seconds)
                rec.update(row)
                rec.update(summarize(row, batch, base["flops_per_step"], base["peak_flops"]))
            except Exception as e:  # noqa: BLE001 (e.g. torch.compile failing on a model)
                traceback.print_exc()
                rec["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
            records.append(rec)
            bar.update(1)
            gc.collect()
        del workload
        jax.clear_caches()
        gc.collect()
        save_json(records)
    bar.close()

    print(report.table(records), flush=True)
    save_json(records)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(report.markdown(records, info))
    if a.plot:
        report.plot(records, a.plot, info)
    for path in (a.json, a.markdown, a.plot):
        if path:
            print(f"wrote {path}")
    return 1 if parity_failed else 0
