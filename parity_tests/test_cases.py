"""cases.py names only what exists: every exclusion, shrink and check names a real preset, task,
constructor argument or recipe key, so none is left behind when the registry changes."""

from __future__ import annotations

import fnmatch

import pytest

from parity_tests import cases
from train.tasks import TASKS
from twin_models.presets import PRESETS


def test_every_exclusion_names_a_preset_or_task():
    assert all(fnmatch.filter(PRESETS, glob) for glob in cases.FULL_SIZE), "a FULL_SIZE glob matches no preset"
    assert set(cases.RELU_TIES) <= set(PRESETS)
    assert set(cases.LONG_RUN_RELU_TIES) <= set(cases.SMALL)
    assert {name for name, _ in cases.SLOW_CHECKS} <= set(cases.SMALL)
    assert {check for _, check in cases.SLOW_CHECKS} <= set(cases.CHECKS)
    assert set(cases.SLOW_TASKS) | set(cases.SLOW_MESH) <= set(TASKS)


def test_the_small_presets_cover_every_task_with_presets():
    assert {p.task for p in PRESETS.values()} == set(cases.TASK_PRESETS)
    assert set(cases.SMALL) == set(PRESETS) - set(cases.SLOW) and cases.SMALL


def test_shrinks_and_short_finishes_name_real_arguments():
    """Each SHRINK key is a constructor argument of every preset of its family, each SHORT_FINISH key
    a recipe key of every small preset of its task."""
    for family, overrides in cases.SHRINK.items():
        presets = [p for p in PRESETS.values() if p.family == family]
        assert presets and all(set(overrides) <= set(p.kwargs) for p in presets), family
    for task, overrides in cases.SHORT_FINISH.items():
        presets = [PRESETS[n] for n in cases.SMALL if PRESETS[n].task == task]
        assert presets and all(set(overrides) <= set(p.train) for p in presets), task


def test_an_unknown_check_is_refused():
    with pytest.raises(ValueError, match="unknown check 'trajectroy'"):
        cases.preset_cases("trajectroy")
