"""Flax linen models, one file per family, twins of `torch_reference`; imports jax/flax only."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os

from twin_models.presets import Preset, check_kwargs, get_preset, with_overrides

from .xla_flags import apply_cpu_flags  # noqa: F401  (the CLIs' XLA:CPU flags, for a user to call)


def create_model(preset: str | Preset, *, attention_impl: str = "xla", **overrides):
    """Build the Flax model of a preset (a name from `presets.PRESETS` or a `Preset`).
    `attention_impl` (Flax only, not a preset argument): "xla", "fused" or "cudnn", see `layers.attend`."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    preset = with_overrides(preset, **overrides) if overrides else preset
    check_kwargs(preset.kwargs)
    module = importlib.import_module(f"{__name__}.{preset.family}")
    return getattr(module, preset.model)(**preset.kwargs, attention_impl=attention_impl)


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


def from_config(config, *, attention_impl: str = "xla", _parent=dataclasses.MISSING):
    """Build the Flax model a spec names (twin of `torch_reference.from_config`): `family`, `model`
    and `kwargs`, a value that is itself a spec built first as an unbound submodule. `attention_impl`
    goes to every module that has the field (see `layers.attend`)."""
    spec = read_spec(config)
    kwargs = {k: from_config(v, attention_impl=attention_impl, _parent=None) if is_spec(v)
              else tuple(v) if isinstance(v, list) else v for k, v in spec["kwargs"].items()}
    module = importlib.import_module(f"{__name__}.{spec['family']}")
    build = getattr(module, spec["model"])
    fields = ({f.name for f in dataclasses.fields(build)} if dataclasses.is_dataclass(build)
              else set(inspect.signature(build).parameters))
    if "attention_impl" in fields:
        kwargs["attention_impl"] = attention_impl
    if _parent is not dataclasses.MISSING and "parent" in fields:
        kwargs["parent"] = _parent
    return build(**kwargs)
