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


class WeightsFileError(ValueError):
    """A weights file that cannot be read as a state dict (missing, a folder, truncated, another
    format, a pickle that needs code): the message says which, in one line."""


def _check_file(path: str):
    if not os.path.exists(path):
        raise WeightsFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise WeightsFileError(f"{path} is a directory, not a weights file")
    if os.path.getsize(path) == 0:
        raise WeightsFileError(f"{path} is empty")


def file_format(path: str | os.PathLike) -> str:
    """'safetensors', 'torch' (a zip or pickle torch.save wrote) or 'unknown', from the content."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = os.path.getsize(path)
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    return "unknown"


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = os.fspath(path)
    _check_file(path)
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError on a damaged header
        raise WeightsFileError(f"{path} is not a readable safetensors file (truncated or damaged: "
                               f"{type(e).__name__}: {e})") from e


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict from a safetensors file, or from a torch.save file through
    `torch.load(weights_only=True)`; the format is read from the content, not the extension.
    Never unpickles arbitrary objects. Every failure is a one-line `WeightsFileError`."""
    path = os.fspath(path)
    _check_file(path)
    kind = file_format(path)
    if kind == "safetensors":
        return load_safetensors(path)
    if kind == "unknown":
        raise WeightsFileError(f"{path} is neither a safetensors file nor one torch.save wrote")
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e) or "weights_only" in str(e):
            raise WeightsFileError(
                f"{path} could not be loaded with torch.load(weights_only=True): it holds objects "
                "that need full unpickling, which can run arbitrary code, so it is refused. Re-save "
                "the state_dict with torch.save(model.state_dict(), path) or as safetensors") from e
        raise WeightsFileError(f"{path} is a damaged torch file ({type(e).__name__}: {first})") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsFileError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    return {k: to_numpy(v) for k, v in obj.items()}
