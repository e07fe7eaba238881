"""`python -m benchmarks --breakdown`: module paths of both frameworks map to the same layer kinds,
a real training step of each framework splits into non-empty attention, MLP, norm and optimizer
rows that add up, and what it cannot do is a usage error."""

import json

import pytest

from benchmarks import breakdown as bd
from benchmarks.harness import main

PRESET = ["--preset", "vit-tiny-digits", "--batch-size", "8", "--torch-threads", "1",
          "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short `--breakdown` run: its JSON record and markdown."""
    d = tmp_path_factory.mktemp("breakdown")
    rc = main([*PRESET, "--breakdown", "--repeats", "2", "--warmup", "1",
               "--json", str(d / "b.json"), "--markdown", str(d / "b.md")])
    assert rc == 0
    [rec] = json.loads((d / "b.json").read_text())
    return rec, (d / "b.md").read_text()


@pytest.fixture(scope="module")
def vit_kinds():
    from benchmarks.workloads import build_workload

    workload = build_workload("vit-tiny-digits", "train", 2)
    return bd.module_kinds(bd.torch_trainer(workload.runner("torch")).model)


def test_torch_modules_and_flax_paths_get_the_same_kind(vit_kinds):
    assert vit_kinds["blocks.0.attn"] == "attention" and vit_kinds["blocks.1.mlp"] == "MLP"
    assert vit_kinds["blocks.0.norm1"] == "norms" and vit_kinds["norm"] == "norms"
    assert vit_kinds["patch.embed"] == "patch embedding"
    assert "head" not in vit_kinds and "blocks.0" not in vit_kinds
    for torch_path, flax_path, kind in (("blocks.0.attn.qkv", "blocks_0/attn/qkv", "attention"),
                                        ("blocks.1.mlp.0", "blocks_1/mlp/0", "MLP"),
                                        ("patch_embed.projection.0", "patch_embed/projection/0",
                                         "patch embedding"),
                                        ("head", "head", None)):
        assert bd.path_kind(torch_path, vit_kinds) == bd.path_kind(flax_path, vit_kinds) == kind


def test_xla_op_names_map_to_kind_and_direction(vit_kinds):
    cases = {
        "jit(wrapped)/jvp(VisionTransformer)/blocks_0/attn/qkv/dot_general": "attention forward",
        "jit(wrapped)/transpose(jvp(VisionTransformer))/blocks_0/attn/qkv/dot_general":
            "attention backward",
        "jit(wrapped)/jvp(VisionTransformer)/blocks_1/mlp/Dropout_0/jit(_bernoulli)/jit(_uniform)"
        "/while/body/closed_call/shift_right_logical": "MLP forward",
        "jit(wrapped)/transpose(jvp(VisionTransformer))/blocks_1/norm2/mul": "norms backward",
        "jit(wrapped)/transpose(jvp(VisionTransformer))/patch_embed/projection/0/conv_general_dilated":
            "patch embedding backward",
        "jit(wrapped)/jvp(VisionTransformer)/head/dot_general": "rest",
        "jit(wrapped)/jvp(jit(log_softmax))/sub": "rest",
        "jit(wrapped)/transpose(jvp(jit(log_softmax)))/mul": "rest",
        "jit(wrapped)/jit(clip)/max": "optimizer update",
        "jit(wrapped)/jit(_where)/select_n": "optimizer update",
        "jit(wrapped)/jit(_threefry_fold_in)/_Conv.__call__/add": "rest",
        None: "rest",
    }
    for op_name, row in cases.items():
        assert bd.jax_row(op_name, vit_kinds) == row, op_name
    # DDPM's attention block owns its GroupNorm; outside it a GroupNorm is a norm
    ddpm = {"model.bottleneck.1": "attention", "model.encoder.0.0.block1.0": "norms",
            "model.encoder.0.0.block1.2": "convolutions"}
    p = "jit(wrapped)/transpose(jvp(DDPM))/DDPM.p_losses/model/"
    assert bd.jax_row(p + "bottleneck_1/norm/sub", ddpm) == "attention backward"
    assert bd.jax_row(p + "encoder_0_0/block1/0/sub", ddpm) == "norms backward"
    assert bd.jax_row(p + "encoder_0_0/block1/2/conv_general_dilated", ddpm) == "convolutions backward"
    assert bd.layer_kind("1", "AttentionBlock") == "attention"
    assert bd.layer_kind("0", "GroupNorm") == "norms" and bd.layer_kind("time_mlp", "Linear") is None


def test_hlo_instructions_without_metadata_take_their_operands():
    text = ('HloModule jit_step, entry_computation_layout={()}\n'
            '  %dot.3 = f32[4,4]{1,0} dot(%p.0, %p.1), metadata={op_name="jit(step)/jvp(M)/attn/dot_general"}\n'
            '  %wrapped_reduce-window.2 = f32[4]{0} fusion(%dot.3), kind=kLoop, calls=%c.1\n'
            '  %convolution-window-dilated = f32[4]{0} convolution(%p.0, %copy.7), window={size=2}\n'
            '  ROOT %copy.7 = f32[4]{0} copy(%wrapped_reduce-window.2)\n')
    module, names = bd.hlo_op_names(text)
    assert module == "jit_step"
    assert names["wrapped_reduce-window.2"] == names["copy.7"] == "jit(step)/jvp(M)/attn/dot_general"
    assert "convolution-window-dilated" not in names   # a rewritten conv does not guess its owner
    with pytest.raises(ValueError, match="HloModule"):
        bd.hlo_op_names("not hlo")


def test_a_real_step_splits_into_the_layer_kinds(run):
    rec, md = run
    assert rec["preset"] == "vit-tiny-digits" and rec["batch_size"] == 8
    for fw in ("jax", "torch"):
        r = rec[fw]
        rows = r["rows"]
        assert set(rows) == set(bd.ROWS)
        for row in ("attention forward", "attention backward", "MLP forward", "MLP backward",
                    "norms forward", "norms backward", "patch embedding forward", "optimizer update"):
            assert rows[row] > 0, (fw, row, rows)
        assert rows["convolutions forward"] == rows["convolutions backward"] == 0, (fw, rows)
        assert sum(rows.values()) == pytest.approx(r["total_ms"])
        assert sum(100 * v / r["total_ms"] for v in rows.values()) == pytest.approx(100)
        assert rows["rest"] < 0.5 * r["total_ms"], (fw, rows)
        assert r["median_ms"] > 0 and r["profiled_wall_ms"] > 0
    assert "| attention backward |" in md and "un-profiled median step" in md
    assert "| convolutions forward |" not in md
    assert "machine:" in md


@pytest.mark.parametrize("extra, message", [
    (["--all"], "not --all"),
    (["--mode", "infer"], "--mode infer cannot go with it"),
    (["--mode", "generate"], "--mode generate cannot go with it"),
    (["--frameworks", "jax,torch-compile"], "compares jax with eager torch"),
    (["--plot", "b.png"], "not --plot"),
])
def test_what_it_cannot_do_is_a_usage_error(extra, message, capsys):
    argv = [a for a in PRESET if not (extra == ["--all"] and a in ("--preset", "vit-tiny-digits"))]
    with pytest.raises(SystemExit) as e:
        main([*argv, *extra, "--breakdown"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1
