"""PyTorch reference models, one file per family; imports torch only."""

from __future__ import annotations

import importlib
import json
import os

from twin_models.presets import Preset, check_kwargs, get_preset, with_overrides


def create_model(preset: str | Preset, **overrides):
    """Build the PyTorch model of a preset (a name from `presets.PRESETS` or a `Preset`)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    preset = with_overrides(preset, **overrides) if overrides else preset
    check_kwargs(preset.kwargs)
    module = importlib.import_module(f"{__name__}.{preset.family}")
    return getattr(module, preset.model)(**preset.kwargs)


def is_spec(value) -> bool:
    """Whether `value` is a model spec: {"family", "model", "kwargs"}."""
    return isinstance(value, dict) and {"family", "model", "kwargs"} <= set(value)


def read_spec(config) -> dict:
    """A model spec from a dict, a `config.json` or the folder holding one (`python -m bridge import`
    writes them)."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        with open(os.path.join(path, "config.json") if os.path.isdir(path) else path) as f:
            config = json.load(f)
    if not is_spec(config):
        raise ValueError(f"a model config needs 'family', 'model' and 'kwargs'; got keys {sorted(config)}")
    return config


def from_config(config):
    """Build the PyTorch model a spec names: `family` (module of this package), `model` (a class or
    factory in it) and `kwargs` (its constructor arguments; a value that is itself a spec is built
    first, e.g. CLIP's encoders; JSON lists become tuples). `config`: a dict, a config.json or its folder."""
    spec = read_spec(config)
    kwargs = {k: from_config(v) if is_spec(v) else tuple(v) if isinstance(v, list) else v
              for k, v in spec["kwargs"].items()}
    module = importlib.import_module(f"{__name__}.{spec['family']}")
    return getattr(module, spec["model"])(**kwargs)
