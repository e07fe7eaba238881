"""Checkpoints: a run killed with SIGKILL and resumed ends where the run left alone ends; broken
or foreign checkpoints are errors; --export writes weights that torch_reference loads."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bridge import load_safetensors
from train.checkpoint import CheckpointError
from train.loop import Config, resolve, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 8}
TINY_ARGS = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]


def _config(workdir, **kw):
    base = dict(preset="vit-digits", model_overrides=TINY, steps=6, batch_size=16,
                checkpoint_every=3, log_every=1, progress=False, workdir=str(workdir))
    return Config(**{**base, **kw})


def _cli(workdir, steps, *extra):
    return [sys.executable, "-m", "train", "vit-digits", *TINY_ARGS, "--steps", str(steps),
            "--batch-size", "16", "--checkpoint-every", "100", "--log-every", "100",
            "--no-progress", "--workdir", str(workdir),
            "--export", str(workdir / "final.safetensors"), *extra]


def _finished_steps(workdir):
    d = workdir / "checkpoints"
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if d.exists() else []


def _is_saving(workdir) -> bool:
    """A checkpoint being written: orbax's temporary directory for it exists."""
    d = workdir / "checkpoints"
    try:
        return any("tmp" in n for n in os.listdir(d))
    except FileNotFoundError:
        return False


def _kill(proc, workdir, when: str, rng, deadline: float) -> str:
    """SIGKILL `proc` at a random moment after its first checkpoint ("random"), or while it
    writes a checkpoint ("saving"); what happened, for the test's log."""
    start = _finished_steps(workdir)
    while proc.poll() is None and time.time() < deadline:
        if when == "random" and _finished_steps(workdir) != start:
            time.sleep(rng.uniform(0.0, 1.5))
            break
        if when == "saving" and _is_saving(workdir):
            break
        time.sleep(0.002)
    saving = _is_saving(workdir)
    if proc.poll() is not None:
        return "ended before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return f"killed {when}{' (a save in flight)' if saving else ''} after step {max(_finished_steps(workdir), default=0)}"


# torch in `make test-all` only (190 s): its resume is held bit for bit by default in
# test_run_safety's SIGTERM case and test_resume_from_an_earlier_checkpoint_repeats_the_run.
@pytest.mark.parametrize("backend", ["jax", pytest.param("torch", marks=pytest.mark.slow)])
def test_killed_anywhere_then_resumed_ends_bit_identical(tmp_path, backend):
    """SIGKILL three times at random moments, one of them during a checkpoint save, resuming after
    each: the run ends with the weights and metrics of the run left alone, bit for bit."""
    import random

    steps, seed = 1200, random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    alone, killed = tmp_path / "alone", tmp_path / "killed"
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **os.environ, "PYTHONPATH": ROOT}
    flags = ["--backend", backend, "--checkpoint-every", "50", "--keep", "2"]
    done = subprocess.run(_cli(alone, steps, *flags), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    history = []
    for when in rng.sample(["random", "random", "saving"], 3):
        resume = ["--resume"] if _finished_steps(killed) else []
        proc = subprocess.Popen(_cli(killed, steps, *flags, *resume), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        history.append(_kill(proc, killed, when, rng, time.time() + 600))
    print(f"seed {seed}: " + "; ".join(history))
    assert not (killed / "summary.json").exists(), f"the run ended before the last kill: {history}"
    assert any("a save in flight" in h for h in history), history

    again = subprocess.run(_cli(killed, steps, *flags), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run(_cli(killed, steps, *flags, "--resume"), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == steps and 0 < summary["start_step"] < steps
    a = load_safetensors(alone / "final.safetensors")
    b = load_safetensors(killed / "final.safetensors")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a), \
        f"seed {seed}: max difference {max(float(np.abs(a[k] - b[k]).max()) for k in a):.1e}"
    ref = json.loads((alone / "summary.json").read_text())
    assert summary["eval_accuracy"] == ref["eval_accuracy"]
    assert summary["final_loss"] == ref["final_loss"]


@pytest.mark.parametrize("name", ["vit-digits", "clip-digits", "ddpm-digits"])
def test_the_data_stream_restored_at_any_step_gives_the_rest(name):
    """`batches_from(k)` (what --resume uses) is the tail of the stream from 0, across epochs,
    for every step k, as the task makes its batches (CLIP's captions drawn per step)."""
    r, _ = resolve(Config(preset=name, steps=9, batch_size=512, progress=False)).set_up()
    assert r.steps_per_epoch < r.total_steps
    full = [(s, r.task.batch(b, s, r)) for s, b in r.batches_from(0)]
    assert [s for s, _ in full] == list(range(r.total_steps))
    for k in range(r.total_steps):
        rest = [(s, r.task.batch(b, s, r)) for s, b in r.batches_from(k)]
        assert [s for s, _ in rest] == list(range(k, r.total_steps))
        for (_, a), (_, b) in zip(full[k:], rest, strict=True):
            assert a.keys() == b.keys() and all(np.array_equal(a[x], b[x]) for x in a), (name, k)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_resume_from_an_earlier_checkpoint_repeats_the_run(tmp_path, backend):
    """Dropout on: the restored key (jax) or generator state (torch) must carry on."""
    import shutil
    alone = run(_config(tmp_path, backend=backend, dropout=0.1,
                        export=str(tmp_path / "alone.safetensors")))
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    out = run(_config(tmp_path, backend=backend, dropout=0.1, resume=True,
                      export=str(tmp_path / "resumed.safetensors")))
    assert out["start_step"] == 3 and out["steps"] == 6
    assert out["final_loss"] == alone["final_loss"]
    a = load_safetensors(tmp_path / "alone.safetensors")
    b = load_safetensors(tmp_path / "resumed.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A workdir holding a finished 3-step run (checkpoint 3)."""
    workdir = tmp_path_factory.mktemp("finished")
    run(_config(workdir, steps=3))
    return workdir


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_fresh_start_over_checkpoints_is_refused(finished, tmp_path):
    with pytest.raises(CheckpointError, match="pass --resume"):
        run(_config(finished, steps=3))
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        run(_config(tmp_path / "empty", resume=True))


def test_incompatible_checkpoint_is_an_error(finished):
    with pytest.raises(CheckpointError, match="model_kwargs"):
        run(_config(finished, steps=3, resume=True,
                    model_overrides={**TINY, "embed_dim": 32}))
    with pytest.raises(CheckpointError, match="batch_size"):
        run(_config(finished, steps=3, resume=True, batch_size=32))
    with pytest.raises(CheckpointError, match="decay_fraction: checkpoint 1.0, this run 0.5"):
        run(_config(finished, steps=3, resume=True, recipe_overrides={"decay_fraction": 0.5}))


def test_shape_mismatch_is_an_error_even_with_matching_records(finished):
    from train.checkpoint import Checkpoints
    from train.jax_backend import checkpoint_tree, make_state
    other = resolve(_config(finished, steps=3, model_overrides={**TINY, "embed_dim": 32}))
    state = make_state(other)
    ckpt = Checkpoints(os.path.join(other.workdir, "checkpoints"), other.checkpoint_every)
    try:
        with pytest.raises(CheckpointError, match="could not be restored|does not fit"):
            ckpt.restore(checkpoint_tree(state), run={})
    finally:
        ckpt.close()


@pytest.mark.parametrize("damage", ["data", "metadata"])
def test_corrupt_checkpoint_is_an_error(finished, tmp_path, damage):
    workdir = _copy(finished, tmp_path / "copy")
    state_dir = workdir / "checkpoints" / "3" / "state"
    if damage == "data":
        files = [p for p in state_dir.rglob("*") if p.is_file() and "/d/" in str(p)]
        assert files
        for p in files:
            raw = bytearray(p.read_bytes())
            for i in range(len(raw) // 2, len(raw)):
                raw[i] ^= 0x5A
            p.write_bytes(bytes(raw))
    else:
        (workdir / "checkpoints" / "3" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match="checkpoint .*3"):
        run(_config(workdir, steps=3, resume=True))


def test_export_loads_into_torch_reference(tmp_path):
    import torch_reference
    path = tmp_path / "out" / "w.safetensors"
    config = _config(tmp_path, steps=3, export=str(path))
    summary = run(config)
    r = resolve(config)
    model = torch_reference.create_model(r.preset)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_safetensors(path).items()},
                          strict=True)
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(r.test_data.images.transpose(0, 3, 1, 2).copy())
        logits = model(x)
    y = torch.from_numpy(r.test_data.labels.astype(np.int64))
    accuracy = (logits.argmax(-1) == y).float().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    assert accuracy == pytest.approx(summary["eval_accuracy"], abs=1e-6)
    assert loss == pytest.approx(summary["eval_loss"], rel=1e-5)
