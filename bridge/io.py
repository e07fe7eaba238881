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


class TruncatedFileError(ValueError):
    """A safetensors file whose data ends before its header says: `cut` names every tensor that
    does not fit, with its dtype, shape and the bytes it needs."""

    def __init__(self, path, cut: list[str], size: int, needed: int):
        self.path, self.cut, self.size, self.needed = os.fspath(path), cut, size, needed
        super().__init__(f"{self.path} is truncated: {size} bytes of the {needed} its header describes; "
                         f"{len(cut)} tensor(s) cut off: " + "; ".join(cut))


def safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """{key: {"dtype", "shape", "data_offsets"}} from a safetensors file's header (no tensor read);
    a ValueError if the header itself is damaged."""
    import json

    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        raw = f.read(n) if 0 < n < 1 << 30 else b""
    if n <= 0 or len(raw) != n:
        raise ValueError(f"{path} is not a safetensors file: its header is missing or cut off")
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e})") from e
    header.pop("__metadata__", None)
    return header


def _truncation(path) -> TruncatedFileError | None:
    try:
        header = safetensors_header(path)
    except (OSError, ValueError):
        return None
    start = 8 + int.from_bytes(open(path, "rb").read(8), "little")
    size = os.path.getsize(path)
    needed = start + max((v["data_offsets"][1] for v in header.values()), default=0)
    if size >= needed:
        return None
    cut = [f"{k} ({v['dtype']} {tuple(v['shape'])}: bytes {start + v['data_offsets'][0]}..{start + v['data_offsets'][1]})"
           for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
           if start + v["data_offsets"][1] > size]
    return TruncatedFileError(path, cut, size, needed)


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(os.fspath(path))
    except Exception as e:  # safetensors raises its own SafetensorError on a damaged header
        truncated = _truncation(path)
        if truncated is not None:
            raise truncated from e
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
