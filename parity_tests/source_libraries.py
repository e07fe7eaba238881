"""The libraries whose checkpoints `python -m bridge import` reads (timm, open_clip, transformers),
imported for the tests that build their models at random, or a skip that says why not."""

from __future__ import annotations

import importlib

import pytest


def _torchvision_importable() -> None:
    """timm, open_clip and transformers' vision models import torchvision. A torchvision wheel built for another torch (the CUDA
    one beside a CPU torch) fails at import: its C++ operators do not load, and registering fakes for
    `nms` and `qnms` then raises. Their schemas let its Python parts import; no model read here calls
    a torchvision operator."""
    import sys

    import torch

    try:
        importlib.import_module("torchvision")
    except ImportError:
        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            if not torch._C._jit_get_schemas_for_operator(f"torchvision::{op}"):
                library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _keep.append(library)
        importlib.import_module("torchvision")


_keep: list = []


def need(name: str):
    """`name` imported, or the test skipped naming the reason (absent, or failing at import)."""
    try:
        _torchvision_importable()
    except Exception as e:  # noqa: BLE001 - any failure is the reason to skip
        pytest.skip(f"{name} imports torchvision, which fails at import: {type(e).__name__}: {e}")
    return pytest.importorskip(name, reason=f"{name} is not installed: pip install -e '.[test]'")
