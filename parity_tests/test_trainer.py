"""The one trainer, for every registered task and both backends (the Flax examples' train_test
pattern): two real steps write the summary with the task's report, metrics and a checkpoint; the
export loads into the torch twin with strict=True; resuming from the first checkpoint ends where
the run left alone ends."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import torch_reference
from bridge import load_safetensors
from parity_tests.test_parallel import TASK_PRESETS
from train.loop import Config, resolve, run

# Smaller twins of the tiny presets, and a shorter finish or less data, where a family or task has them.
SHRINK = {"vit": dict(depth=1, embed_dim=16, num_heads=2), "clip": dict(vision_layers=1, text_layers=1),
          "swin": dict(depths=(1, 1)), "ddpm": dict(features=(8, 16), time_emb_dim=16, num_res_blocks=1),
          "captioning": dict(vision_layers=1, layers=1),
          "fusion": dict(vision_layers=1, fusion_layers=1), "multimodal": dict(num_layers=1)}
SHORT_FINISH = {"diffusion": dict(num_samples=4, ddim_steps=2), "captioning": dict(num_train=64, num_test=8),
                "vqa": dict(num_scenes=4, num_test_scenes=1)}


def config(name, workdir, backend, **kw) -> Config:
    from twin_models.presets import get_preset
    preset = get_preset(name)
    return Config(preset=name, backend=backend, steps=2, batch_size=16, log_every=1, checkpoint_every=1,
                  progress=False, workdir=str(workdir), dropout=None,
                  model_overrides=SHRINK.get(preset.family, {}),
                  recipe_overrides=SHORT_FINISH.get(preset.task, {}), **kw)


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("name", TASK_PRESETS.values(), ids=list(TASK_PRESETS))
def test_two_steps_summary_export_and_resume(name, backend, tmp_path):
    whole = run(config(name, tmp_path / "whole", backend, export=str(tmp_path / "whole.safetensors")))
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(whole))
    assert summary["steps"] == 2 and summary["backend"] == backend and np.isfinite(summary["final_loss"])
    r = resolve(config(name, tmp_path / "x", backend))
    missing = [k for k in r.task.report if k not in summary]
    assert not missing, f"the summary lacks the task's report entries {missing}"
    lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2]
    assert all("lr" in x and "grad_norm" in x for x in lines if "loss" in x)
    assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]

    model = torch_reference.create_model(r.preset)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_safetensors(tmp_path / "whole.safetensors").items()},
                          strict=True)

    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "2")
    (tmp_path / "resumed" / "summary.json").unlink()
    resumed = run(config(name, tmp_path / "resumed", backend, resume=True,
                         export=str(tmp_path / "resumed.safetensors")))
    assert resumed["start_step"] == 1 and resumed["steps"] == 2
    assert resumed["final_loss"] == whole["final_loss"]
    a, b = load_safetensors(tmp_path / "whole.safetensors"), load_safetensors(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
