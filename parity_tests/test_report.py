"""`python -m bridge verify --all`: the report of every preset (forward, each parameter's gradient,
an AdamW trajectory), its table, JSON and pictures, its exit status and its usage errors. The
default run checks one small preset for a few steps; the whole 100-step report of every small
preset is `slow`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from bridge import report
from bridge.__main__ import main
from parity_tests.cases import LONG_RUN_RELU_TIES, SMALL


def test_one_preset_for_a_few_steps(tmp_path, capsys):
    assert main(["verify", "--all", "--preset", "vit-tiny-*", "--steps", "3", "--out", str(tmp_path)]) == 0
    assert "1 of 1 presets pass" in capsys.readouterr().out
    data = json.loads((tmp_path / "report.json").read_text())
    (row,) = data["presets"]
    assert data["ok"] and row["preset"] == "vit-tiny-digits" and row["ok"] and row["steps"] == 3
    assert len(row["losses_torch"]) == len(row["losses_flax"]) == 3 and 1 <= row["loss_step"] <= 3
    assert len(row["losses_torch_f64"]) == len(row["losses_flax_f64"]) == 3
    drift = report.PresetResult(**{k: v for k, v in row.items() if k not in ("ok", "failures")}).drift("flax")
    assert drift is not None and 0 <= drift.max() < report.REPORT_LOSS_TOL
    assert 0 < row["forward"] <= report.REPORT_FORWARD_TOL and 0 < row["gradient"] <= report.REPORT_GRAD_TOL
    assert row["gradient_param"].endswith((".weight", ".bias", "cls_token", "pos_embed"))
    table = (tmp_path / "report.md").read_text()
    assert "| `vit-tiny-digits` |" in table and f"(`{row['gradient_param']}`)" in table and "| pass |" in table
    assert Image.open(tmp_path / "vit-tiny-digits.png").size == (560, 440)


def failing(name="vit-digits", forward=3e-6, first="blocks.2.mlp.0"):
    return report.PresetResult(
        preset=name, forward=forward, first_divergent=first, gradient=1e-6, gradient_param="head.weight",
        loss=2e-7, loss_step=7, weights=1e-12, loss_float64=1e-15, weights_param="head.bias", seconds=1.0,
        steps=10, lr=1e-3, batch_size=8, losses_torch=[2.0, 1.9], losses_flax=[2.0, 1.9 + 4e-7], tolerances=report.tolerances())


def test_a_failing_preset_exits_1_and_names_its_first_diverging_layer(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(report, "check_preset", lambda name, steps, log=None: failing(name))
    assert main(["verify", "--all", "--preset", "vit-digits", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL vit-digits: forward; first layer over tolerance: blocks.2.mlp.0" in out
    assert "| FAIL: forward |" in (tmp_path / "report.md").read_text()
    assert "(first over: `blocks.2.mlp.0`)" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["presets"][0]["failures"] == ["forward"]


def test_a_preset_that_raises_is_a_failure_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    def check(name, steps, log=None):
        if name == "vit-digits":
            raise RuntimeError("the twins disagree on shapes")
        return dataclasses.replace(failing(name, forward=1e-7, first=None))

    monkeypatch.setattr(report, "check_preset", check)
    assert main(["verify", "--all", "--preset", "vit-digits,swin-digits", "--out", str(tmp_path)]) == 1
    assert "FAIL vit-digits: RuntimeError: the twins disagree on shapes" in capsys.readouterr().out
    rows = json.loads((tmp_path / "report.json").read_text())["presets"]
    assert [(r["preset"], r["ok"], r["forward"]) for r in rows] == [("vit-digits", False, None),
                                                                    ("swin-digits", True, 1e-7)]


def test_the_loss_difference_is_relative_to_the_largest_loss():
    r = failing()
    assert r.loss_differences().tolist() == pytest.approx([0.0, 2e-7])
    r.losses_flax = [float("nan"), 1.9]
    r.loss = float(r.loss_differences().max())
    assert "loss" in r.failures


def test_the_selection_of_presets():
    assert report.select() == SMALL
    assert set(report.select(full=True)) > set(SMALL)
    assert report.select("vit-*") == [n for n in SMALL if n.startswith("vit-")]
    assert "vit-b16" in report.select("vit-*", full=True)


@pytest.mark.parametrize("argv, message", [
    (["verify"], "verify needs a PRESET, or --all for every preset"),
    (["verify", "--full"], "--full, --preset, --steps, --out and --resume go with --all"),
    (["verify", "vit-digits", "--all"], "give either a PRESET (vit-digits) or --all, not both"),
    (["verify", "--all", "--preset", "no-such-*"], "--preset 'no-such-*' matches no small preset"),
    (["verify", "--all", "--steps", "0"], "--steps must be a positive integer, not 0"),
    (["verify", "--all", "--weights", "w.safetensors"], "--weights, --precision and --tol are for one preset"),
])
def test_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_resume_keeps_what_an_earlier_report_holds_and_runs_the_rest(tmp_path, capsys, monkeypatch):
    """`--resume` runs only the presets OUT/report.json lacks, or holds with an error, another
    number of steps or another learning rate; the table then holds every preset."""
    ran = []

    def check(name, steps, log=None):
        ran.append((name, steps))
        if name == "swin-digits" and len(ran) <= 2:
            raise RuntimeError("killed")
        return dataclasses.replace(failing(name, forward=1e-7, first=None), steps=steps)

    monkeypatch.setattr(report, "check_preset", check)
    argv = ["verify", "--all", "--preset", "vit-digits,swin-digits", "--steps", "3", "--out", str(tmp_path)]
    assert main(argv) == 1
    assert main(argv + ["--resume"]) == 0
    assert ran == [("vit-digits", 3), ("swin-digits", 3), ("swin-digits", 3)]
    assert "vit-digits: kept from" in capsys.readouterr().out
    table = (tmp_path / "report.md").read_text()
    assert table.count("| pass |") == 2 and "(1 kept from an earlier run" in table
    assert main(argv[:-4] + ["--steps", "4", "--out", str(tmp_path), "--resume"]) == 0
    assert ran[-2:] == [("vit-digits", 4), ("swin-digits", 4)]
    data = json.loads((tmp_path / "report.json").read_text())
    data["presets"][0]["lr"] = 3e-4                         # measured at another rate: run again
    (tmp_path / "report.json").write_text(json.dumps(data))
    assert main(argv[:-4] + ["--steps", "4", "--out", str(tmp_path), "--resume"]) == 0
    assert ran[-1:] == [("vit-digits", 4)]


def test_a_loss_over_tolerance_is_shown_beside_its_float64_run_and_its_rounding_control():
    r = dataclasses.replace(failing(forward=1e-7, first=None), loss=5e-4, loss_control=7e-5,
                            loss_control_flax=9e-5, losses_torch_f64=[2.0, 1.9], losses_flax_f64=[2.0, 1.9 - 6e-4])
    row = report.markdown([r]).splitlines()[-1]
    assert "FAIL: loss (in float64 1.0e-15; float32 against its own float64: torch 0.0e+00, Flax 3.0e-04; " \
           "each against itself, every weight 1 ulp apart: torch 7.0e-05, Flax 9.0e-05)" in row
    older = dataclasses.replace(r, loss_control_flax=None, losses_torch_f64=None, losses_flax_f64=None)
    assert "(in float64 1.0e-15; each against itself, every weight 1 ulp apart: torch 7.0e-05)" in \
        report.markdown([older]).splitlines()[-1]     # a report.json written before the Flax control


def test_nudge_moves_every_weight_one_ulp_up_or_down():
    import torch

    from bridge.parity import nudge

    model = torch.nn.Linear(16, 8)
    before = {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
    nudge(model, seed=0)
    for k, p in model.named_parameters():
        after, b = p.detach().numpy(), before[k]
        up, down = after == np.nextafter(b, np.inf), after == np.nextafter(b, -np.inf)
        assert (up | down).all() and up.any() and down.any(), k


def test_the_rounding_control_of_a_smooth_model_is_rounding_sized():
    """A linear regressor trained with AdamW: weights 1 ulp apart give losses that differ by a few
    float32 roundings, not 0 (the nudge moved them) and not more."""
    import torch

    from bridge.parity import rounding_control

    torch.manual_seed(0)
    start = torch.nn.Linear(16, 1).state_dict()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 16, generator=g), torch.randn(32, 1, generator=g)) for _ in range(20)]

    def make():
        m = torch.nn.Linear(16, 1)
        m.load_state_dict(start)
        return m

    loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    control = rounding_control(make, loss, batches, seeds=2, lr=1e-2, weight_decay=0.0)
    assert 0 < control < 1e-5


def test_the_flax_rounding_control_trains_the_flax_twin_from_the_nudged_torch_weights():
    """The same regressor as a Flax Dense: its control is rounding-sized too, and its base
    trajectory is `adamw_trajectories`' Flax half."""
    import flax.linen as nn
    import jax.numpy as jnp
    import torch

    from bridge import torch_to_flax
    from bridge.parity import adamw_trajectories, flax_rounding_control, flax_trajectory

    torch.manual_seed(0)
    start = torch.nn.Linear(16, 1).state_dict()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 16, generator=g), torch.randn(32, 1, generator=g)) for _ in range(20)]
    flax_batches = [tuple(jnp.asarray(t.numpy()) for t in b) for b in batches]

    def make():
        m = torch.nn.Linear(16, 1)
        m.load_state_dict(start)
        return m

    dense = nn.Dense(1)
    x0 = np.zeros((1, 16), np.float32)
    flax_loss = lambda params, variables, b: jnp.mean((dense.apply({"params": params}, b[0]) - b[1]) ** 2)  # noqa: E731
    torch_loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    adamw = dict(lr=1e-2, weight_decay=0.0)
    variables = torch_to_flax(make().state_dict(), dense, x0)
    alone, _ = flax_trajectory(dense, variables, flax_loss, flax_batches, **adamw)
    _, both, _, _ = adamw_trajectories(make(), dense, variables, torch_loss, flax_loss, batches, flax_batches, **adamw)
    np.testing.assert_array_equal(alone, both)
    control = flax_rounding_control(make, dense, [x0], flax_loss, flax_batches, seeds=2, **adamw)
    assert 0 < control < 1e-5


@pytest.mark.slow
def test_every_small_preset_for_100_steps(tmp_path):
    """The whole report: every small preset within every tolerance over 100 AdamW steps; a preset
    of `LONG_RUN_RELU_TIES` may miss the float32 loss tolerance only, its float64 losses holding it."""
    main(["verify", "--all", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "report.json").read_text())
    assert [p["preset"] for p in data["presets"]] == SMALL
    table = (tmp_path / "report.md").read_text()
    for p in data["presets"]:
        assert p["steps"] == report.STEPS and (tmp_path / f"{p['preset']}.png").is_file()
        if p["preset"] in LONG_RUN_RELU_TIES:
            assert p["failures"] in ([], ["loss"]) and p["loss_float64"] <= report.REPORT_LOSS_TOL, table
            assert not p["failures"] or p["loss_control"] > 0, table
        else:
            assert p["ok"], table


def test_an_activation_as_wide_as_it_is_deep_is_compared_in_the_right_layout():
    """A Flax NHWC activation with H == W == C has the shape of torch's NCHW one: the layer diff
    takes the layout that fits (ddpm-digits' init_conv, 2x16x16x16, once read as 1.4 apart)."""
    from bridge.verify import _diff

    ref = np.random.default_rng(0).standard_normal((2, 16, 16, 16)).astype(np.float32)
    assert _diff("init_conv", ref, ref.transpose(0, 2, 3, 1), 2e-6).rel == 0.0
    assert _diff("channels_last", ref, ref.copy(), 2e-6).rel == 0.0
    assert _diff("wrong", ref, ref[::-1].copy(), 2e-6).over


def test_a_full_size_trajectory_steps_at_the_rate_its_recipe_warms_up_to():
    """Small presets keep their recipe's peak rate; a full-size one whose warm-up outlasts the
    trajectory holds the rate that warm-up reaches at the trajectory's last step."""
    assert report.trajectory_lr("vit-digits", 100) == 1e-3
    assert report.trajectory_lr("caption-scenes", 100) == 1e-3          # small: its 200 warm-up steps do not apply
    assert report.trajectory_lr("vit-b16", 100) == pytest.approx(3e-4 * 100 / 10_000)
    assert report.trajectory_lr("swin-t", 20) == pytest.approx(1e-3 * 20 / 25_000)
    assert report.trajectory_lr("clip-b16", 20) == pytest.approx(5e-4 * 20 / 2000)
    assert report.trajectory_lr("ddpm-cifar10", 100) == 2e-4            # no warm-up
