"""The mirroring rule, checked on the code: every torch module of a family file has a Flax twin of
the same name in the same file of `jax_models`, with the same constructor arguments (names, order,
defaults) and the same call arguments (Flax's `train` last). What a framework alone has is named
below with its reason."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import flax.linen as fnn
import pytest
import torch.nn as tnn

import torch_reference

FAMILIES = sorted(m.name for m in pkgutil.iter_modules(torch_reference.__path__))
# Torch modules with no Flax twin, and why.
TORCH_ONLY = {
    "clip.CLIPFromScratch": "the second source's name for CLIPModel with a loss-returning forward (source state dicts)",
    "layers.FlattenPatches": "the source's einops Rearrange inside an nn.Sequential; Flax reshapes in PatchEmbedding",
}
# Arguments one framework alone has, and why.
FLAX_ONLY_FIELDS = {"attention_impl": "which attention kernel XLA runs (layers.attend)",
                    "kernel_init": "Flax's initializer argument (torch initializes in the module)"}
CALL_EXCEPTIONS = {"layers.Mlp": "torch's nn.Sequential names its forward argument `input`"}


def _default(value):
    return None if value in (inspect.Parameter.empty, dataclasses.MISSING) else repr(value)


def _pairs():
    for family in FAMILIES:
        torch_mod = importlib.import_module(f"torch_reference.{family}")
        flax_mod = importlib.import_module(f"jax_models.{family}")
        for name, cls in inspect.getmembers(torch_mod, inspect.isclass):
            if cls.__module__ == torch_mod.__name__ and issubclass(cls, tnn.Module):
                yield f"{family}.{name}", cls, getattr(flax_mod, name, None)


PAIRS = list(_pairs())


def pair_cases(exempt: dict):
    """pytest params over PAIRS (id: family.Class), skipped with their reason where in `exempt`
    or TORCH_ONLY."""
    exempt = {**{k: f"torch only: {why}" for k, why in TORCH_ONLY.items()}, **exempt}
    return [pytest.param(*pair, id=pair[0],
                         marks=[pytest.mark.skip(reason=f"{pair[0]}: {exempt[pair[0]]}")] if pair[0] in exempt else [])
            for pair in PAIRS]


@pytest.mark.parametrize("key, torch_cls, flax_cls", pair_cases({}))
def test_every_torch_module_has_a_flax_twin_with_the_same_constructor_arguments(key, torch_cls, flax_cls):
    assert isinstance(flax_cls, type) and issubclass(flax_cls, fnn.Module), f"{key} has no Flax twin"
    torch_args = [(p.name, _default(p.default)) for p in inspect.signature(torch_cls.__init__).parameters.values()
                  if p.name != "self"]
    flax_args = [(f.name, _default(f.default)) for f in dataclasses.fields(flax_cls)
                 if f.init and f.name not in ("parent", "name", *FLAX_ONLY_FIELDS)]
    assert torch_args == flax_args, f"{key}: constructor arguments differ"


@pytest.mark.parametrize("key, torch_cls, flax_cls", pair_cases(CALL_EXCEPTIONS))
def test_every_flax_twin_takes_the_same_call_arguments(key, torch_cls, flax_cls):
    """torch's forward and Flax's __call__ take the same arguments, Flax's `train` last."""
    assert isinstance(flax_cls, type) and issubclass(flax_cls, fnn.Module), f"{key} has no Flax twin"
    forward = [p for p in inspect.signature(torch_cls.forward).parameters if p != "self"]
    call = list(inspect.signature(flax_cls.__call__).parameters)
    call = [p for p in call if p != "self"]
    if "train" in call:
        assert call[-1] == "train", f"{key}: `train` is not the last argument of __call__ {call}"
        call = call[:-1]
    assert forward == call, f"{key}: forward{tuple(forward)} but __call__{tuple(call)}"


def test_the_exceptions_name_real_classes():
    keys = {p[0] for p in PAIRS}
    assert set(TORCH_ONLY) <= keys and set(CALL_EXCEPTIONS) <= keys
