"""python -m train.stress: the `make train` command many times, several at once, on this machine.

Each run trains vit-digits with pmap over two fake CPU devices, evaluates, checkpoints and
exports, as `make train` does, in its own workdir. The report says how many finished, how many the
trainer's stall watchdog ended (exit status 6, its stack file named), how many made no progress
for `--stall-after` seconds and were killed here (their native stacks taken with gdb first, when
gdb is installed), and the wall time of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

EXIT_STALL = 6   # train.watchdog.EXIT_STALL (not imported: this module must not start JAX)
COMMAND = ("vit-digits", "--parallel", "pmap", "--no-progress")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.stress", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=12, help="how many runs in all (default 12)")
    p.add_argument("--concurrency", type=int, default=3, help="how many at once (default 3)")
    p.add_argument("--devices", type=int, default=2, help="fake CPU devices per run (default 2)")
    p.add_argument("--stall-after", type=float, default=600.0,
                   help="kill a run whose output has not changed for this many seconds (default 600)")
    p.add_argument("--out", default="runs/stress", help="the folder of the runs and report.json")
    p.add_argument("--keep", action="store_true", help="keep the workdirs of runs that finished")
    p.add_argument("train_args", nargs="*", help="more arguments for python -m train, after --")
    args = p.parse_args(argv)
    for name in ("runs", "concurrency", "devices"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not args.stall_after > 0:
        p.error(f"--stall-after must be positive, got {args.stall_after}")
    return args


def _last_change(paths) -> float:
    times = [os.path.getmtime(p) for p in paths if os.path.exists(p)]
    return max(times) if times else 0.0


def _native_stacks(pid: int, path: str):
    """Every thread's native stack of `pid`, by gdb (when installed)."""
    if shutil.which("gdb") is None:
        return
    with open(path, "w") as f:
        subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
                       stdout=f, stderr=subprocess.STDOUT, timeout=300, check=False)


def one_run(i: int, args) -> dict:
    """Run the command once; returns {'run', 'status', 'exit', 'seconds', 'workdir', 'detail'}."""
    workdir = os.path.abspath(os.path.join(args.out, f"run-{i:03d}"))
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    log = os.path.join(workdir, "output.txt")
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
    cmd = [sys.executable, "-m", "train", *COMMAND, "--workdir", workdir,
           "--export", os.path.join(workdir, "vit-digits.safetensors"), *args.train_args]
    t0, started = time.perf_counter(), time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        watched = (log, os.path.join(workdir, "metrics.jsonl"))
        killed = False
        while proc.poll() is None:
            time.sleep(2.0)
            if time.time() - max(_last_change(watched), started) > args.stall_after:
                _native_stacks(proc.pid, os.path.join(workdir, "stacks-gdb.txt"))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed = True
    seconds = time.perf_counter() - t0
    with open(log) as f:
        text = f.read()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    if killed:
        status = "stalled"
    elif proc.returncode == 0:
        status = "finished"
    elif proc.returncode == EXIT_STALL:
        status = "watchdog"
    else:
        status = "failed"
    result = {"run": i, "status": status, "exit": proc.returncode, "seconds": round(seconds, 1),
              "workdir": workdir, "detail": errors[-1] if errors else text.strip().splitlines()[-1:]}
    if status == "finished" and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        futures = [pool.submit(one_run, i, args) for i in range(args.runs)]
        results = []
        for fut in tqdm(futures, desc="runs", unit="run", disable=None):
            results.append(fut.result())
    counts = {s: sum(r["status"] == s for r in results) for s in ("finished", "watchdog", "stalled", "failed")}
    seconds = sorted(r["seconds"] for r in results)
    report = {"started": started, "runs": args.runs, "concurrency": args.concurrency,
              "devices": args.devices, "train_args": args.train_args, **counts,
              "wall_seconds": round(time.perf_counter() - t0, 1),
              "median_run_seconds": seconds[len(seconds) // 2], "max_run_seconds": seconds[-1],
              "load_average": os.getloadavg(), "results": results}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    for r in results:
        print(f"run {r['run']:3d}  {r['status']:9s} exit {r['exit']!s:>4}  {r['seconds']:7.1f} s"
              + ("" if r["status"] == "finished" else f"  {r['detail']}"))
    print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {args.runs} runs, {args.concurrency} at a "
          f"time; median {report['median_run_seconds']} s, longest {report['max_run_seconds']} s; "
          f"report: {os.path.join(args.out, 'report.json')}")
    return 0 if counts["finished"] == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
