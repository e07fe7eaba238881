"""`python -m train.stress`: the `make train` command many times, several at once; every run
finishes and none stalls. The default suite runs two short ones side by side; the long one (the
whole command, 12 runs, 3 at a time) is `slow`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stress(tmp_path, *args, timeout):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}
    done = subprocess.run([sys.executable, "-m", "train.stress", "--out", str(tmp_path / "stress"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    report = json.loads((tmp_path / "stress" / "report.json").read_text())
    print(done.stdout[-2000:])
    return done, report


def test_two_short_runs_side_by_side_finish(tmp_path):
    done, report = _stress(tmp_path, "--runs", "2", "--concurrency", "2", "--stall-after", "300", "--",
                           "--steps", "24", "--checkpoint-every", "8", "--eval-every", "8", "--batch-size", "32",
                           timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (report["finished"], report["watchdog"], report["stalled"], report["failed"]) == (2, 0, 0, 0)
    assert all(r["exit"] == 0 and r["seconds"] > 0 for r in report["results"])
    assert "2 finished, 0 watchdog, 0 stalled, 0 failed of 2 runs" in done.stdout


def test_bad_stress_settings_are_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "train.stress", "--runs", "0"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--runs must be at least 1, got 0" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_the_make_train_command_twelve_times_three_at_a_time(tmp_path):
    done, report = _stress(tmp_path, "--runs", "12", "--concurrency", "3", timeout=7200)
    assert report["finished"] == 12, done.stdout[-3000:]
