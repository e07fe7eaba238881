"""`python -m benchmarks`: a short run writes complete records and reports; a torch twin whose
weights differ from the JAX model's is refused before any timing; bad arguments are clear errors."""

import json

import pytest

from benchmarks.harness import main

TINY = ["--preset", "vit-digits", "--batch-size", "8", "--repeats", "2", "--warmup", "0",
        "--torch-threads", "1", "--no-progress"]
FIELDS = ("preset", "mode", "batch_size", "precision", "framework", "median_ms", "spread_ms",
          "compile_s", "examples_per_s", "flops_per_step", "achieved_flops", "peak_fraction",
          "peak_memory_bytes", "memory_source", "device", "versions", "date", "forward_rel_err")


def test_short_run_times_both_modes_and_writes_reports(tmp_path):
    out = {k: tmp_path / f"r.{k}" for k in ("json", "md", "png")}
    rc = main([*TINY, "--mode", "both", "--frameworks", "jax,torch", "--json", str(out["json"]),
               "--markdown", str(out["md"]), "--plot", str(out["png"])])
    assert rc == 0
    records = json.loads(out["json"].read_text())
    assert sorted((r["mode"], r["framework"]) for r in records) == [
        ("infer", "jax"), ("infer", "torch"), ("train", "jax"), ("train", "torch")]
    for r in records:
        assert "error" not in r, r["error"]
        missing = [k for k in FIELDS if r.get(k) is None]
        assert not missing, missing
        assert r["forward_check"] == "passed" and 0 <= r["forward_rel_err"] <= r["forward_tol"]
        assert r["median_ms"] > 0 and r["spread_ms"] >= 0 and r["compile_s"] > 0
        assert r["n_timed"] == 2 and len(r["times_ms"]) == 2
        assert r["examples_per_s"] == pytest.approx(8 / (r["median_ms"] / 1e3))
        assert r["peak_memory_bytes"] > 0 and 0 < r["peak_fraction"]
    by = {(r["mode"], r["framework"]): r for r in records}
    for mode in ("train", "infer"):   # one FLOP count for both frameworks
        assert by[mode, "jax"]["flops_per_step"] == by[mode, "torch"]["flops_per_step"]
    assert 2 < by["train", "jax"]["flops_per_step"] / by["infer", "jax"]["flops_per_step"] < 4
    md = out["md"].read_text()
    assert "XLA/eager" in md and "`vit-digits`" in md
    assert out["png"].read_bytes()[:4] == b"\x89PNG"


def test_wrong_torch_weights_are_refused(tmp_path, monkeypatch, capsys):
    from train import torch_backend
    convert = torch_backend.flax_to_torch

    def perturbed(variables):
        sd = dict(convert(variables))
        key = next((k for k in sd if k.startswith("blocks.1.") and sd[k].ndim == 2), None)
        if key is not None:
            sd[key] = sd[key].copy()
            sd[key][0, 0] += 0.05
        return sd

    monkeypatch.setattr(torch_backend, "flax_to_torch", perturbed)   # the torch twin's weights
    timed = []
    monkeypatch.setattr("benchmarks.harness.time_row", lambda *a, **k: timed.append(a) or {})
    path = tmp_path / "r.json"
    rc = main([*TINY, "--mode", "infer", "--frameworks", "jax,torch", "--json", str(path)])
    assert rc == 1 and not timed
    records = json.loads(path.read_text())
    assert len(records) == 2
    for r in records:
        assert r["forward_check"] == "failed" and "median_ms" not in r
        assert "ParityError" in r["error"] and "over the tolerance" in r["error"]
    assert "not timing a wrong program" in capsys.readouterr().err


def test_a_failing_torch_compile_is_recorded_not_fatal(tmp_path, monkeypatch):
    import torch

    def broken(module, *args, **kwargs):
        raise RuntimeError("inductor fell over")

    monkeypatch.setattr(torch.nn.Module, "compile", broken)
    path = tmp_path / "r.json"
    rc = main([*TINY, "--mode", "infer", "--frameworks", "jax,torch-compile", "--json", str(path)])
    by = {r["framework"]: r for r in json.loads(path.read_text())}
    assert rc == 0 and by["jax"]["median_ms"] > 0 and "median_ms" not in by["torch-compile"]
    assert "inductor fell over" in by["torch-compile"]["error"]


def test_generate_mode_times_every_decoder(tmp_path):
    """`--mode generate`: a row per decoder (JAX greedy and beam, torch with and without its cache)
    with tokens/s and the first call apart, and the reports."""
    out = {k: tmp_path / f"g.{k}" for k in ("json", "md")}
    rc = main(["--preset", "caption-scenes", "--mode", "generate", "--batch-size", "2", "--max-length", "3",
               "--repeats", "1", "--torch-threads", "1", "--no-progress", "--json", str(out["json"]),
               "--markdown", str(out["md"])])
    assert rc == 0
    records = json.loads(out["json"].read_text())
    assert sorted(r["decoder"] for r in records) == ["jax beam", "jax greedy", "torch beam", "torch greedy",
                                                     "torch greedy uncached"]
    for r in records:
        assert r["mode"] == "generate" and r["batch_size"] == 2 and r["max_length"] == 3
        assert r["num_beams"] == (3 if "beam" in r["decoder"] else 1)
        assert r["first_call_s"] > 0 and r["median_s"] > 0 and len(r["runs"]) == 1
        assert r["tokens_per_s"] == pytest.approx(2 * 3 / r["median_s"], rel=1e-2)
        assert isinstance(r["same_tokens_as_other_framework"], bool) and r["versions"]["jax"]
    assert "tokens/s" in out["md"].read_text()


@pytest.mark.parametrize("args, message", [
    (["--preset", "vit-nope"], "known presets: vit-digits"),
    (["--preset", "vit-digits", "--mode", "generate"], "not captioning presets: vit-digits"),
    (["--preset", "vit-digits", "--batch-size", "0"], "batch sizes must be positive"),
    (["--preset", "vit-digits", "--frameworks", "jax,tf"], "unknown framework(s) tf"),
])
def test_bad_arguments_are_clear_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_torch_compile_rows(tmp_path):
    path = tmp_path / "r.json"
    rc = main([*TINY, "--mode", "both", "--frameworks", "jax,torch-compile", "--json", str(path)])
    records = json.loads(path.read_text())
    assert rc == 0 and len(records) == 4
    for r in records:
        assert "error" not in r, r["error"]
        assert r["median_ms"] > 0 and r["compile_s"] > 0


def test_sampling_benchmark_alternates_frameworks_and_reports_each_run(monkeypatch):
    """`python -m benchmarks.sampling`: a warm-up of each, untimed, then every requested run timed
    and reported, JAX and torch taking turns (so that the machine's drift hits both)."""
    import time

    from benchmarks import sampling
    from torch_reference import ddpm as T

    order = []
    torch_sample = T.DDPM.sample
    monkeypatch.setattr(T.DDPM, "sample", lambda self, *a, **k: order.append("torch") or torch_sample(self, *a, **k))
    clock = time.perf_counter
    monkeypatch.setattr(sampling.time, "perf_counter", lambda: order.append("clock") or clock())
    r = sampling.bench("ddpm-digits", num_samples=2, timesteps=3, runs=3, torch_runs=2, warmup=1)
    assert len(r["jax_runs"]) == 3 and len(r["torch_runs"]) == 2
    assert r["warmup"] == 1 and r["speedup"] > 0
    turns = "".join("t" if o == "torch" else "." for o in order)
    assert turns == "..t" + "...t." * 2 + "..", turns  # compile; warm-up; (jax, torch) x2; jax


def _records(ms: dict) -> list[dict]:
    return [{"preset": p, "mode": m, "batch_size": 8, "precision": "fp32", "framework": fw, "median_ms": t}
            for (p, m), by_fw in ms.items() for fw, t in by_fw.items()]


def test_compare_gives_each_row_its_ratio_before_and_after_and_draws_them(tmp_path, capsys):
    from benchmarks.report import main as report_main

    before = _records({("vit-digits", "train"): {"jax": 60.0, "torch": 50.0}})
    after = _records({("vit-digits", "train"): {"jax": 40.0, "torch": 50.0, "torch-compile": 80.0},
                      ("vit-digits", "infer"): {"jax": 9.0, "torch": 6.0}})
    paths = []
    for name, records in (("before", before), ("after", after)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(records))
    assert report_main(["compare", *map(str, paths), "--plot", str(tmp_path / "c.png"), "--labels", "old,new"]) == 0
    out = capsys.readouterr().out
    assert "| XLA/eager old | XLA/eager new |" in out
    assert "| `vit-digits` | train | 8 | 1.20 | **0.80** | 0.50 |" in out
    assert "| `vit-digits` | infer | 8 | - | 1.50 | - |" in out
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_compare_refuses_what_is_not_a_benchmark_record(tmp_path, capsys):
    from benchmarks.report import main as report_main

    bad = tmp_path / "bad.json"
    bad.write_text('{"preset": "vit-digits"}')
    with pytest.raises(SystemExit) as e:
        report_main(["compare", str(bad), str(bad)])
    assert e.value.code == 2 and "not a list of benchmark records" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report_main(["compare", str(tmp_path / "missing.json"), str(bad)])
    assert "missing.json" in capsys.readouterr().err
