"""PyTorch reference models, one file per family; imports torch only."""

from __future__ import annotations

import importlib

from presets import Preset, get_preset, with_overrides


def create_model(preset: str | Preset, **overrides):
    """Build the PyTorch model of a preset (a name from `presets.PRESETS` or a `Preset`)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    preset = with_overrides(preset, **overrides) if overrides else preset
    module = importlib.import_module(f"{__name__}.{preset.family}")
    return getattr(module, preset.model)(**preset.kwargs)
