"""Step time of the trainer's data-parallel modes on the same preset and global batch: jit on one
device, pmap over the local devices, jit over a mesh (replicated state) and the mesh with FSDP.

`python -m benchmarks.parallel [--preset vit-digits] [--batch-size 128] [--repeats 20] [--rounds 3]`.
On a CPU, run it with fake devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`). The
modes are timed in interleaved rounds (each round times every mode once, so a change of load hits
all alike); each figure is the median over rounds of a round's median step, after compile and
warm-up, with `block_until_ready`. The first call (compile + one step) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

MODES = ("jit", "pmap", "mesh", "mesh-fsdp")


def runners(preset_name: str, batch_size: int, seed: int = 0) -> dict:
    """mode -> (step() running one update, first_call_seconds), from the same state and batch."""
    import jax
    import jax.numpy as jnp

    from twin_models.presets import get_preset
    from train import data as data_lib
    from train import steps
    from train.tasks import get_task, init_variables

    preset = get_preset(preset_name)
    task = get_task(preset)
    model, variables, key = init_variables(task, preset, seed)
    schedule = steps.warmup_cosine(preset.train["lr"], 0, 10_000)
    tx = steps.make_optimizer(schedule, preset.train["weight_decay"], preset.train["grad_clip"], variables["params"])
    role = task.jax_training
    state = role.create_state(model, variables, tx, key)
    batch = task.example_batch(preset, batch_size, seed)
    kw = role.step_kwargs(preset.train)
    n = jax.local_device_count()
    out = {}
    for mode in MODES:
        if mode == "jit":
            fn, s, b = steps.jit_train_step(role.step, **kw), jax.tree_util.tree_map(jnp.copy, state), batch
        elif mode == "pmap":
            fn, s, b = steps.pmap_train_step(role.step, **kw), steps.replicate(state), data_lib.shard(batch, n)
        else:
            mesh = steps.make_mesh()
            shardings = steps.state_shardings(state, mesh, fsdp=mode == "mesh-fsdp")
            fn = steps.mesh_train_step(role.step, mesh, shardings, **kw)
            s, b = steps.put_state(state, shardings), steps.put_batch(batch, mesh)
        box = {"state": s}

        def step(fn=fn, b=b, box=box):
            box["state"], metrics = fn(box["state"], b)
            jax.block_until_ready(metrics)

        t0 = time.perf_counter()
        step()
        out[mode] = (step, time.perf_counter() - t0)
    return out


def bench(preset="vit-digits", batch_size=128, repeats=20, rounds=3, warmup=3) -> dict:
    import jax

    runs = runners(preset, batch_size)
    for step, _ in runs.values():
        for _ in range(warmup):
            step()
    per_round = {mode: [] for mode in runs}
    for _ in range(rounds):
        for mode, (step, _) in runs.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            per_round[mode].append(statistics.median(times))
    rows = {mode: {"median_ms": 1e3 * statistics.median(v), "rounds_ms": [1e3 * t for t in v],
                   "first_call_s": runs[mode][1]} for mode, v in per_round.items()}
    base = rows["pmap"]["median_ms"]
    for r in rows.values():
        r["vs_pmap"] = r["median_ms"] / base
    return {"preset": preset, "batch_size": batch_size, "devices": jax.device_count(),
            "backend": jax.default_backend(), "jax": jax.__version__, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.parallel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="vit-digits")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from .options import check_options
    check_options(ap, a, counts=("batch_size", "repeats", "rounds"), outputs=("json",))
    from jax_models.xla_flags import apply_cpu_flags
    apply_cpu_flags()
    import os
    result = bench(a.preset, a.batch_size, a.repeats, a.rounds)
    print(f"{a.preset}, global batch {a.batch_size}, {result['devices']} {result['backend']} devices, "
          f"jax {result['jax']}, load {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<10} {'median ms':>10} {'vs pmap':>8} {'first call s':>13}")
    for mode, r in result["rows"].items():
        print(f"{mode:<10} {r['median_ms']:>10.1f} {r['vs_pmap']:>8.2f} {r['first_call_s']:>13.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
