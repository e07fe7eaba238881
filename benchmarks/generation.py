"""Caption generation speed: JAX's compiled decode against the torch twin, with and without its cache.

`python -m benchmarks.generation [--preset caption-scenes] [--batch-sizes 1 64] [--max-length N]
[--num-beams 3] [--runs 5] [--torch-threads N] [--weights PATH]`, or `python -m benchmarks --mode
generate --preset caption-scenes [--batch-size 1 64] [--repeats 5] ...` (the harness): one row
per (decoder, batch size) with tokens/s, the median of `runs` timed calls after one warm-up call,
and the first call (JAX: trace + compile + run) apart. Decoders: "jax greedy" and "jax beam" (one
compiled `lax.while_loop` each), "torch greedy" and "torch beam" (eager, key-value cache), "torch
greedy uncached" (the source's re-run of the whole prefix at each step). Both frameworks hold the
same weights (the torch initialisation carried over by the bridge), and `min_length = max_length`
keeps every decode at `max_length` steps whatever random weights do with `eos`; tokens/s counts
batch x max_length generated tokens (beam search: the returned ones, not the beams'). The JAX and
torch tokens are compared once per batch size; a difference is recorded in the row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def _time(fn, runs):
    """(first call's seconds, median of `runs` calls after it and one warm-up)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), times


def bench(preset="caption-scenes", batch_sizes=(1, 64), max_length=None, num_beams=3, runs=5,
          torch_threads=None, uncached_runs=None, seed=0, weights=None) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import bridge
    import jax_models
    import torch_reference
    from jax_models import captioning as J
    from twin_models.presets import get_preset

    if torch_threads:
        torch.set_num_threads(torch_threads)
    p = get_preset(preset)
    max_length = max_length or p.train.get("max_length", 24)
    torch.manual_seed(seed)
    tm = torch_reference.create_model(p).eval()
    if weights:
        tm.load_state_dict({k: torch.from_numpy(v) for k, v in bridge.load_safetensors(weights).items()},
                           strict=True)
    fm = jax_models.create_model(p)
    x = np.random.RandomState(seed).standard_normal((max(batch_sizes), *p.input_shape_nchw)).astype(np.float32)
    variables = bridge.torch_to_flax(tm.state_dict(), fm, jnp.asarray(x[:1].transpose(0, 2, 3, 1)),
                                     jnp.zeros((1, 2), jnp.int32))
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), "
               f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    for B in batch_sizes:
        xt = torch.from_numpy(x[:B])
        xf = jnp.asarray(x[:B].transpose(0, 2, 3, 1))
        kw = dict(min_length=max_length)
        decoders = {
            "jax greedy": lambda: J.generate(fm, variables, xf, max_length, **kw).block_until_ready(),
            "jax beam": lambda: J.generate(fm, variables, xf, max_length, num_beams=num_beams,
                                           **kw).block_until_ready(),
            "torch greedy": lambda: tm.generate(xt, max_length, **kw),
            "torch beam": lambda: tm.generate(xt, max_length, num_beams=num_beams, **kw),
            "torch greedy uncached": lambda: tm.generate(xt, max_length, use_cache=False, **kw),
        }
        timed = []
        for name, fn in decoders.items():
            n = uncached_runs if (uncached_runs and "uncached" in name) else runs
            first, median, times = _time(fn, n)
            timed.append(dict(preset=preset, decoder=name, batch_size=B, max_length=max_length,
                              num_beams=num_beams if "beam" in name else 1,
                              tokens_per_s=round(B * max_length / median, 1), median_s=round(median, 5),
                              first_call_s=round(first, 3), runs=[round(t, 5) for t in times],
                              weights=weights or f"random (torch init, seed {seed})",
                              machine=machine, load_average_1min=load))
        same = {"greedy": np.array_equal(np.asarray(decoders["jax greedy"]()), decoders["torch greedy"]().numpy()),
                "beam": np.array_equal(np.asarray(decoders["jax beam"]()), decoders["torch beam"]().numpy())}
        for r in timed:
            r["same_tokens_as_other_framework"] = same["beam" if "beam" in r["decoder"] else "greedy"]
        rows += timed
    return rows


def table(rows) -> str:
    """A Markdown table of `bench`'s rows."""
    out = ["| decoder | batch | tokens/s | median s | first call s | same tokens |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['decoder']} | {r['batch_size']} | {r['tokens_per_s']:,.0f} | {r['median_s']:.4f} | "
                   f"{r['first_call_s']:.2f} | {r['same_tokens_as_other_framework']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="caption-scenes")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--max-length", type=int, default=None, help="default: the preset recipe's")
    ap.add_argument("--num-beams", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--uncached-runs", type=int, default=None, help="runs of the uncached torch decode")
    ap.add_argument("--torch-threads", type=int, default=None, help="default: torch's own choice")
    ap.add_argument("--weights", help="a safetensors state dict of the preset (default: random init)")
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    a = ap.parse_args(argv)
    from .options import check_options
    check_options(ap, a, counts=("batch_sizes", "max_length", "num_beams", "runs", "uncached_runs", "torch_threads"))
    from jax_models.xla_flags import apply_cpu_flags
    apply_cpu_flags()
    rows = bench(a.preset, a.batch_sizes, a.max_length, a.num_beams, a.runs, a.torch_threads, a.uncached_runs,
                 weights=a.weights)
    print("\n".join(json.dumps(r) for r in rows) if a.json else table(rows))
    print(rows[0]["machine"], f"load average {rows[0]['load_average_1min']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
