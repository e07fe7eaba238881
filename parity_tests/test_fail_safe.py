"""Runs that fail safe: a step whose loss or gradients are not finite changes nothing, in both
backends and for every task; a diverging run stops with a clear message and exit status 4, keeps
only finite checkpoints, and writes strict JSON."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity_tests.cases import TASK_PRESETS, task_cases
from twin_models.presets import get_preset, without_dropout
from train import steps
from train.tasks import get_task, init_variables


def _poisoned(batch: dict) -> dict:
    """The batch with one NaN pixel: the loss and every gradient become NaN."""
    image = np.array(batch["image"], copy=True)
    image[0, 0, 0, 0] = np.nan
    return {**batch, "image": image}


def _same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=False)
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


@pytest.mark.parametrize("name", task_cases())
def test_a_nonfinite_step_changes_nothing_in_jax(name):
    preset = without_dropout(get_preset(name))
    task = get_task(preset)
    model, variables, key = init_variables(task, preset, 0)
    tx = steps.make_optimizer(steps.warmup_cosine(1e-3, 2, 10), 0.05, 1.0, variables["params"])
    state = task.jax_training.create_state(model, variables, tx, key)
    batch = task.example_batch(preset, 4, seed=0)
    step = steps.jit_train_step(task.jax_training.step, **task.jax_training.step_kwargs(preset.train))
    state, m = step(state, batch)                          # one good step: Adam's moments are non-zero
    assert int(m["nonfinite"]) == 0
    before = jax.device_get(jax.tree_util.tree_map(jnp.copy, state))
    after, m = step(state, _poisoned(batch))
    assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
    after = jax.device_get(after)
    assert int(after.step) == int(before.step) == 1
    assert _same(after.params, before.params) and _same(after.opt_state, before.opt_state)
    extra = [f for f in ("ema_params",) if hasattr(after, f)]
    assert all(_same(getattr(after, f), getattr(before, f)) for f in extra)
    again, m = step(after, batch)                          # and the run goes on from there
    assert int(m["nonfinite"]) == 0 and int(again.step) == 2


@pytest.mark.parametrize("name", TASK_PRESETS.values(), ids=list(TASK_PRESETS))
def test_a_nonfinite_step_changes_nothing_in_torch(name):
    from train.torch_backend import trainer_from_variables

    preset = without_dropout(get_preset(name))
    task = get_task(preset)
    _, variables, _ = init_variables(task, preset, 0)
    trainer = trainer_from_variables(task, preset, variables, dict(preset.train), lambda s: 1e-3, set())
    batch = task.example_batch(preset, 4, seed=0)
    assert trainer.train_step(batch)["nonfinite"] == 0
    before = trainer.state_tree()
    m = trainer.train_step(_poisoned(batch))
    assert m["nonfinite"] == 1 and trainer.step == 1
    after = trainer.state_tree()
    keys = [k for k in before if k != "torch_rng"]   # dropout draws were taken; nothing else moved
    assert _same([before[k] for k in keys], [after[k] for k in keys])
    assert trainer.train_step(batch)["nonfinite"] == 0 and trainer.step == 2


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_diverging_run_stops_with_the_last_good_checkpoint(tmp_path, backend, capsys):
    from train.__main__ import main

    args = ["vit-digits", "--set", "depth=1", "--set", "embed_dim=16", "--set", "num_heads=2",
            "--steps", "30", "--batch-size", "16", "--lr", "1e6", "--warmup-steps", "0",
            "--checkpoint-every", "2", "--log-every", "1", "--max-bad-steps", "3", "--no-progress",
            "--backend", backend, "--workdir", str(tmp_path), "--export", str(tmp_path / "w.safetensors")]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert "not finite in 3 steps in a row" in err and "holds the last good weights" in err
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "summary.json").exists()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]   # strict JSON
    assert any(x.get("loss") is None for x in lines) and lines[-1]["nonfinite_steps"] >= 2
    from train.checkpoint import Checkpoints
    ckpt = Checkpoints(str(tmp_path / "checkpoints"), 2)
    try:
        latest = ckpt.latest_step()
        assert latest is not None
        from orbax.checkpoint import args as ocp_args
        tree = ckpt.manager.restore(latest, args=ocp_args.Composite(state=ocp_args.StandardRestore()))["state"]
    finally:
        ckpt.close()
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree) if np.asarray(x).dtype.kind == "f"]
    assert leaves and all(np.isfinite(x).all() for x in leaves), "a checkpoint holds non-finite values"


TINY = ["vit-digits", "--set", "depth=1", "--set", "embed_dim=16", "--set", "num_heads=2", "--no-progress"]


@pytest.mark.parametrize("flags, message", [
    (["--log-every", "0"], "--log-every must be at least 1, not 0"),
    (["--keep", "0"], "--keep must be at least 1"),
    (["--lr", "nan"], "--lr must be a positive finite number, not nan"),
    (["--lr", "-1"], "--lr must be a positive finite number"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1), not 1.5"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--max-bad-steps", "0"], "--max-bad-steps must be at least 1"),
    (["--set", "depth=0.5"], "--set depth=0.5: preset 'vit-digits' takes a value of type int"),
    (["--parallel", "mesh", "--batch-size", "12"], "does not split evenly over 8 devices of the mesh"),
])
def test_bad_settings_are_named_before_anything_is_built(tmp_path, capsys, flags, message):
    from train.__main__ import main

    assert main([*TINY, "--workdir", str(tmp_path / "w"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_damaged_image_in_the_data_is_named_in_one_line(tmp_path, capsys):
    from PIL import Image

    from train.__main__ import main

    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "b" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main([*TINY, "--workdir", str(tmp_path / "w"), "--data",
                 f"imagefolder:{tmp_path / 'data'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'data' / 'b' / '2.png'}: not a readable image")
    assert err.count("\n") == 1 and not (tmp_path / "w" / "checkpoints").exists()


def test_unwritable_export_and_workdir_are_named_first(tmp_path, capsys):
    from train.__main__ import main

    (tmp_path / "file").write_text("x")
    assert main([*TINY, "--workdir", str(tmp_path / "file" / "w")]) == 2
    assert "--workdir: cannot create" in capsys.readouterr().err
    assert main([*TINY, "--workdir", str(tmp_path / "w"), "--export", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_failed_export_names_the_checkpoint_and_leaves_the_summary(tmp_path, capsys, monkeypatch):
    import bridge
    from train import loop
    from train.__main__ import main

    def full_disk(state_dict, path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bridge, "save_safetensors", full_disk)
    monkeypatch.setattr(loop, "save_safetensors", full_disk, raising=False)   # the loop's own name for it
    assert main([*TINY, "--steps", "2", "--batch-size", "16", "--workdir", str(tmp_path),
                 "--export", str(tmp_path / "out" / "w.safetensors")]) == 5
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(tmp_path / "checkpoints" / "2") in err
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    assert not any((tmp_path / "out").iterdir()), "a temporary file was left behind"


def test_resume_keeps_a_finished_summary_and_the_metrics_have_no_duplicates(tmp_path):
    import shutil

    from train.__main__ import main

    args = [*TINY, "--steps", "4", "--batch-size", "16", "--log-every", "1", "--checkpoint-every", "2",
            "--workdir", str(tmp_path)]
    assert main(args) == 0
    summary = (tmp_path / "summary.json").read_text()
    assert main([*args, "--resume", "--export", str(tmp_path / "w.safetensors")]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["final_loss"] == json.loads(summary)["final_loss"]
    assert (tmp_path / "w.safetensors").exists()
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    (tmp_path / "summary.json").unlink()
    assert main([*args, "--resume"]) == 0
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    assert main([*TINY, "--steps", "1", "--batch-size", "16", "--log-every", "1", "--workdir", str(fresh)]) == 0
    assert all(json.loads(x)["step"] <= 1 for x in (fresh / "metrics.jsonl").read_text().splitlines())
