"""Input layouts of the two frameworks, in one place: Flax models take images NHWC and JAX's default
integer, PyTorch models NCHW and int64. numpy only."""

from __future__ import annotations

import numpy as np


def torch_layout(array) -> np.ndarray:
    """A numpy input as the torch twin takes it: a float (N, H, W, C) image batch -> (N, C, H, W)
    (contiguous), integers (labels, tokens, timesteps) -> int64, anything else as it is."""
    a = np.asarray(array)
    if a.ndim == 4 and np.issubdtype(a.dtype, np.floating):
        return np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64)
    return a
