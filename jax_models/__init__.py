"""Flax linen models, one file per family, twins of `torch_reference`; imports jax/flax only."""

from __future__ import annotations

import importlib

from presets import Preset, get_preset, with_overrides


def create_model(preset: str | Preset, *, attention_impl: str = "xla", **overrides):
    """Build the Flax model of a preset (a name from `presets.PRESETS` or a `Preset`).
    `attention_impl` (Flax only, not a preset argument): "xla", "fused" or "cudnn", see `layers.attend`."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    preset = with_overrides(preset, **overrides) if overrides else preset
    module = importlib.import_module(f"{__name__}.{preset.family}")
    return getattr(module, preset.model)(**preset.kwargs, attention_impl=attention_impl)
