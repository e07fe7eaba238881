"""Weights PyTorch <-> Flax by generic rules, safetensors on disk, and layer-by-layer verification."""

from .convert import (WeightMismatchError, flax_module_path_to_torch, flax_to_torch,
                      torch_to_flax)
from .io import WeightsFileError, load_safetensors, load_state_dict, save_safetensors

__all__ = ["WeightMismatchError", "flax_module_path_to_torch", "flax_to_torch", "torch_to_flax",
           "load_safetensors", "load_state_dict", "save_safetensors", "WeightsFileError"]
