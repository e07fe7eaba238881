"""The one trainer, for every registered task and both backends (the Flax examples' train_test
pattern): every small preset trains two real steps that end with the summary (a finite loss, the
task's report) and a checkpoint; one preset a task also writes the metrics, exports weights that
load into the torch twin with strict=True, and resumed from its first checkpoint ends where the
run left alone ends."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import torch_reference
from bridge import load_safetensors
from parity_tests.cases import SHORT_FINISH, SHRINK, TASK_PRESETS, trainer_cases
from train.loop import Config, resolve, run
from train.tasks import get_task
from twin_models.presets import get_preset


def config(name, workdir, backend, **kw) -> Config:
    """Two steps of `name`'s smaller twin (`cases.SHRINK`, `cases.SHORT_FINISH`) at batch 16."""
    preset = get_preset(name)
    settings = dict(preset=name, backend=backend, steps=2, batch_size=16, log_every=1, checkpoint_every=1,
                    progress=False, workdir=str(workdir), dropout=None,
                    model_overrides=SHRINK.get(preset.family, {}),
                    recipe_overrides=SHORT_FINISH.get(preset.task, {}))
    return Config(**{**settings, **kw})


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


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("name", trainer_cases())
def test_every_small_preset_trains_two_steps(name, backend, tmp_path):
    """The small presets not trained above: two steps end with the summary (a finite loss, every
    entry of the task's report a finite number) and the final checkpoint."""
    summary = run(config(name, tmp_path, backend, checkpoint_every=0, eval_every=0))
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["steps"] == 2 and summary["backend"] == backend and np.isfinite(summary["final_loss"])
    report = {k: summary.get(k) for k in get_task(get_preset(name)).report}
    assert report and all(isinstance(v, (int, float)) and np.isfinite(v) for v in report.values()), report
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
