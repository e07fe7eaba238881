"""The `python -m train` CLI: outputs, summary fields, the torch backend, clear errors."""

import json

import pytest

from train.__main__ import main

TINY_ARGS = ["--set", "depth=1", "--set", "embed_dim=16", "--set", "num_heads=2",
             "--set", "patch_size=8"]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_cli_writes_metrics_summary_and_export(tmp_path, capsys, backend):
    rc = main(["vit-digits", *TINY_ARGS, "--backend", backend, "--steps", "4",
               "--batch-size", "16", "--log-every", "2", "--no-progress",
               "--workdir", str(tmp_path), "--export", str(tmp_path / "w.safetensors")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and str(tmp_path / "w.safetensors") in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("final_loss", "eval_accuracy", "steps", "examples_per_second", "backend",
                "parallel", "devices"):
        assert key in summary, key
    assert summary["steps"] == 4 and summary["backend"] == backend
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [2, 4]
    assert lines[-1]["step"] == 4 and "eval_accuracy" in lines[-1]
    assert (tmp_path / "checkpoints" / "4").is_dir()


def test_cli_errors_are_clear(tmp_path, capsys):
    import jax
    n = jax.local_device_count()
    if n > 1:
        rc = main(["vit-digits", *TINY_ARGS, "--parallel", "pmap", "--steps", "1",
                   "--batch-size", str(n + 1), "--no-progress", "--workdir", str(tmp_path)])
        assert rc == 2
        assert f"does not split evenly over {n} local devices" in capsys.readouterr().err
    rc = main(["vit-digits", "--data", "imagefolder:/no/such/dir", "--no-progress",
               "--workdir", str(tmp_path / "x")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["no-such-preset", "--no-progress", "--workdir", str(tmp_path / "y")])
    assert rc == 2 and "unknown preset" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_bf16_trains_over_float32_master_weights(tmp_path, backend):
    """--precision bf16: bfloat16 compute, float32 weights kept and exported, and the first loss
    within bfloat16 rounding of the float32 run's."""
    import numpy as np

    from bridge import load_safetensors

    losses = {}
    for precision in ("fp32", "bf16"):
        workdir = tmp_path / precision
        rc = main(["vit-digits", *TINY_ARGS, "--backend", backend, "--steps", "2",
                   "--batch-size", "16", "--log-every", "1", "--no-progress", "--dropout", "0",
                   "--precision", precision, "--workdir", str(workdir),
                   "--export", str(workdir / "w.safetensors")])
        assert rc == 0
        summary = json.loads((workdir / "summary.json").read_text())
        assert summary["precision"] == precision
        lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
        losses[precision] = [x["loss"] for x in lines if "loss" in x]
        weights = load_safetensors(workdir / "w.safetensors")
        assert {v.dtype for v in weights.values() if v.dtype.kind == "f"} == {np.dtype(np.float32)}
    assert losses["bf16"] != losses["fp32"]
    np.testing.assert_allclose(losses["bf16"][0], losses["fp32"][0], rtol=3e-2)


def test_mesh_with_fsdp_trains_resumes_and_exports(tmp_path, capsys):
    """--parallel mesh --fsdp: the run shards over every device, checkpoints the whole state, and a
    resume from the first checkpoint ends with the weights of the run left alone."""
    import jax
    import numpy as np

    from bridge import load_safetensors

    n = jax.device_count()
    args = ["vit-digits", *TINY_ARGS, "--parallel", "mesh", "--fsdp", "--steps", "2", "--batch-size",
            str(2 * n), "--checkpoint-every", "1", "--no-progress"]
    assert main([*args, "--workdir", str(tmp_path / "a"), "--export", str(tmp_path / "a.safetensors")]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["parallel"] == "mesh-fsdp" and summary["devices"] == n
    import shutil
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "2")
    assert main([*args, "--workdir", str(tmp_path / "b"), "--resume",
                 "--export", str(tmp_path / "b.safetensors")]) == 0
    a, b = load_safetensors(tmp_path / "a.safetensors"), load_safetensors(tmp_path / "b.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    rc = main(["vit-digits", *TINY_ARGS, "--fsdp", "--steps", "1", "--no-progress",
               "--workdir", str(tmp_path / "c")])
    assert rc == 2 and "--fsdp shards over a mesh" in capsys.readouterr().err


def test_compile_cache_makes_the_second_process_warm(tmp_path):
    """Two processes with the same --compile-cache: the first compiles the step (cold), the second
    finds it on disk (warm); --no-compile-cache turns it off. summary.json says which."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    summaries = []
    for name, cache in (("a", ["--compile-cache", str(tmp_path / "cache")]),
                        ("b", ["--compile-cache", str(tmp_path / "cache")]), ("c", ["--no-compile-cache"])):
        done = subprocess.run([sys.executable, "-m", "train", "vit-digits", *TINY_ARGS, "--steps", "1",
                               "--batch-size", "16", "--no-progress", "--workdir", str(tmp_path / name), *cache],
                              cwd=root, env={**env, "PYTHONPATH": root}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    cold, warm, off = summaries
    print(f"first step's compile: cold {cold['compile_seconds']:.2f} s, warm {warm['compile_seconds']:.2f} s")
    assert (cold["compile_cache"], warm["compile_cache"], off["compile_cache"]) == ("cold", "warm", "off")
    assert warm["compile_seconds"] < cold["compile_seconds"]
