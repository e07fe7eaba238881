"""State dicts on disk: safetensors in torch key names; `.pt` files only with weights_only=True."""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from .convert import to_numpy


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a torch-keyed state dict (numpy arrays, torch tensors or jax arrays) as safetensors.

    `torch_reference` models load it with `model.load_state_dict(safetensors.torch.load_file(path))`.
    """
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in tensors.items()}
    tmp = f"{os.fspath(path)}.tmp"
    save_file(arrays, tmp)
    os.replace(tmp, path)


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(os.fspath(path))
    except Exception as e:  # safetensors raises its own SafetensorError on a damaged header
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict from `.safetensors`, or from a `.pt`/`.pth` file through
    `torch.load(weights_only=True)`; never unpickles arbitrary objects."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} could not be loaded with torch.load(weights_only=True) ({e}). Files that need "
            "full unpickling are refused: they can run arbitrary code. Re-save the state_dict with "
            "torch.save(model.state_dict(), path) or as safetensors.") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    return {k: to_numpy(v) for k, v in obj.items()}
