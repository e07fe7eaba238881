"""A run either makes progress or ends with one `error:` line, its own exit status and its last
good checkpoint: the pmap host reads launch no program over every device, a stalled step is
ended by the watchdog (stacks written), Ctrl-C and SIGTERM stop after a checkpoint, a lost peer
process is named by the survivor, and `--resume` then ends bit-identical to the run left alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridge import load_safetensors
from parity_tests import SUITE_XLA_FLAGS
from train import steps
from train.watchdog import EXIT_PEER_LOST, EXIT_STALL, FIRST_FACTOR, STEP_FACTOR, Watchdog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ["--set", "depth=1", "--set", "embed_dim=16", "--set", "num_heads=2", "--set", "patch_size=8"]
STEPS = 12
STALL = ["--stall-timeout", "15"]   # every run of a test alike: the stalled run's compile is cached

# A training run whose backend's step `STALL_AT` never returns (as a deadlocked collective would not).
STALLING = """
import sys, threading
from train.jax_backend import JaxBackend
from train.torch_backend import TorchBackend
stall_at = int(sys.argv[1])
for cls in (JaxBackend, TorchBackend):
    def stalling(self, batch, _step=cls.step):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == stall_at:
            threading.Event().wait()
        return _step(self, batch)
    cls.step = stalling
from train.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def _env(tmp_path, devices=2):
    return {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {SUITE_XLA_FLAGS}",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path.parent / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _args(workdir, backend, parallel, *extra):
    return ["vit-digits", *TINY_ARGS, "--backend", backend, "--parallel", parallel, "--steps", str(STEPS),
            "--batch-size", "16", "--checkpoint-every", "4", "--eval-every", "6", "--log-every", "1",
            "--no-progress", "--workdir", str(workdir), "--export", str(workdir / "w.safetensors"), *extra]


def _train(tmp_path, args, devices=2, timeout=600):
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=_env(tmp_path, devices),
                          capture_output=True, text=True, timeout=timeout)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _same_weights(a, b):
    wa, wb = load_safetensors(a / "w.safetensors"), load_safetensors(b / "w.safetensors")
    assert wa.keys() == wb.keys()
    bad = [k for k in wa if not np.array_equal(wa[k], wb[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """Each mode's run left alone, the reference of the resumed ones."""
    runs = {}

    def get(backend, parallel):
        if (backend, parallel) not in runs:
            tmp = tmp_path_factory.mktemp(f"alone-{backend}-{parallel}")
            done = _train(tmp, _args(tmp / "run", backend, parallel, *STALL))
            assert done.returncode == 0, done.stderr[-3000:]
            runs[backend, parallel] = tmp / "run"
        return runs[backend, parallel]
    return get


def test_unreplicate_takes_device_0s_buffer_and_runs_nothing_over_every_device():
    """`x[0]` on a pmap array compiles a program over every device with an all-reduce (its
    result lands on every device); hundreds of those, one per leaf, hung a run on fake CPU
    devices. `unreplicate` hands back device 0's own copy."""
    tree = {"w": jnp.arange(24.0).reshape(2, 3, 4), "step": jnp.int32(7), "rng": jax.random.key(3)}
    replicated = steps.replicate(tree)
    assert len(replicated["w"].sharding.device_set) == jax.local_device_count() > 1
    indexed = jax.tree_util.tree_map(lambda x: x[0], replicated)
    assert len(indexed["w"].sharding.device_set) > 1          # the old way: on every device
    mine = steps.unreplicate(replicated)
    device0 = jax.local_devices()[0]
    for name, leaf in mine.items():
        assert leaf.devices() == {device0}, name
    np.testing.assert_array_equal(mine["w"], tree["w"])
    assert int(mine["step"]) == 7
    np.testing.assert_array_equal(jax.random.key_data(mine["rng"]), jax.random.key_data(tree["rng"]))
    pmapped = jax.pmap(lambda t: jax.tree_util.tree_map(lambda v: v, t))(replicated)
    assert all(leaf.devices() == {device0} for leaf in jax.tree_util.tree_leaves(steps.unreplicate(pmapped)))


def test_watchdog_limits_follow_the_runs_own_step_time():
    w = Watchdog(10.0, "/nonexistent")
    assert w.limit("compile") == FIRST_FACTOR * 10.0 and w.limit("save") == 10.0
    w.step_times = [0.01] * 5
    assert w.limit("step") == 10.0                           # fast steps: the floor
    w.step_times = [1.0, 2.0, 3.0]
    assert w.limit("step") == STEP_FACTOR * 2.0              # slow steps: 50x the median
    w.longest["evaluate"] = 30.0
    assert w.limit("evaluate") == 90.0


@pytest.mark.parametrize("backend,parallel", [("jax", "pmap"), pytest.param("torch", "jit", marks=pytest.mark.slow),
                                              pytest.param("jax", "jit", marks=pytest.mark.slow),
                                              pytest.param("jax", "mesh", marks=pytest.mark.slow)])
def test_a_stalled_step_ends_with_stacks_and_resume_ends_bit_identical(tmp_path, alone, backend, parallel):
    workdir = tmp_path / "run"
    reference = alone(backend, parallel)
    t0 = time.time()
    stalled = subprocess.run([sys.executable, "-c", STALLING, "9", *_args(workdir, backend, parallel, *STALL)],
                             cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    took = time.time() - t0
    assert stalled.returncode == EXIT_STALL, stalled.stderr[-3000:]
    errors = _errors(stalled.stderr)
    assert len(errors) == 1 and "Traceback" not in stalled.stderr, stalled.stderr[-3000:]
    stacks = workdir / "stall-stacks.txt"
    assert errors[0].startswith("error: stalled: step 9 made no progress for ")
    assert f"the last checkpoint is {workdir / 'checkpoints' / '8'} (--resume continues from it)" in errors[0]
    assert str(stacks) in errors[0]
    text = stacks.read_text()
    assert "stalling" in text and "Thread" in text      # the stuck Python frame, every thread
    print(f"{backend} {parallel}: stalled run ended after {took:.0f} s: {errors[0]}")
    resumed = _train(tmp_path, _args(workdir, backend, parallel, *STALL, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_weights(workdir, reference)


@pytest.mark.parametrize("signum,backend", [(signal.SIGINT, "jax"), (signal.SIGTERM, "torch")])
def test_a_signal_stops_after_a_checkpoint_and_resume_ends_bit_identical(tmp_path, alone, signum, backend):
    workdir = tmp_path / "run"
    reference = alone(backend, "jit")
    args = _args(workdir, backend, "jit", *STALL)
    # slow steps (a sleep in each) leave time to signal in the middle of the run
    slow = STALLING.replace("threading.Event().wait()", "pass").replace(
        "return _step(self, batch)", "import time; time.sleep(0.5); return _step(self, batch)")
    proc = subprocess.Popen([sys.executable, "-c", slow, "0", *args], cwd=ROOT, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-3000:]
    errors = _errors(err)
    assert len(errors) == 1 and "Traceback" not in err and "orbax" not in err.lower(), err
    name = signal.Signals(signum).name
    step = int(errors[0].split(" at step ")[1].split(":")[0])
    assert errors[0] == (f"error: {name} at step {step}: stopped after saving a checkpoint; the last "
                         f"checkpoint is {workdir / 'checkpoints' / str(step)} (--resume continues from it)")
    assert 0 < step < STEPS
    saved = workdir / "checkpoints" / str(step)
    assert {"meta", "state"} <= set(os.listdir(saved))
    assert not [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]
    resumed = _train(tmp_path, _args(workdir, backend, "jit", *STALL, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_weights(workdir, reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.xdist_group("distributed")
@pytest.mark.parametrize("victim", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_lost_peer_is_named_in_one_line_and_both_resume(tmp_path, victim):
    """Two processes through jax.distributed; one is killed (0: the coordinator): the survivor
    ends within a bounded time with one line naming it and status 7; both then resume together."""
    workdir = tmp_path / "run"
    slow = STALLING.replace("threading.Event().wait()", "pass").replace(
        "return _step(self, batch)", "import time; time.sleep(0.3); return _step(self, batch)")

    def start(*extra, script=None):
        port = _free_port()
        procs = []
        for i in range(2):
            args = [*_args(workdir, "jax", "mesh"), "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                    "2", "--process-id", str(i), *extra]
            args[args.index("--steps") + 1] = "40"
            cmd = [sys.executable, "-c", script, "0", *args] if script else [sys.executable, "-m", "train", *args]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path, 2), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        return procs

    procs = start(script=slow)
    deadline = time.time() + 300
    while time.time() < deadline and not (workdir / "checkpoints" / "4").exists():
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.2)
    procs[victim].kill()
    t0 = time.time()
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=180)
    took = time.time() - t0
    procs[victim].wait()
    assert survivor.returncode == EXIT_PEER_LOST, err[-3000:]
    errors = _errors(err)
    assert len(errors) == 1 and "Traceback" not in err and "Check failure" not in err, err[-3000:]
    lost = f"lost process {victim}" + (" (the coordinator)" if victim == 0 else "")
    assert errors[0].startswith(f"error: process {1 - victim} of 2: {lost}: "), errors[0]
    assert "--resume" in errors[0]
    assert took < 90, f"the survivor took {took:.0f} s"
    print(f"killed process {victim}; the survivor ended after {took:.0f} s: {errors[0]}")
    procs = start("--resume")
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["start_step"] >= 4
