"""Weights between PyTorch state dicts and Flax variables, by rules about kinds of leaf.

torch key -> Flax path: `blocks.3.mlp.0.weight` -> params `blocks_3/mlp/0/kernel`. A list
(`nn.ModuleList`) entry `name.i` is the Flax submodule `name_i`; a child of an `nn.Sequential` keeps
its index as its Flax name. `weight` is `kernel` (Dense: transposed; Conv: OIHW -> HWIO), `scale`
(LayerNorm, GroupNorm) or `embedding` (Embed), as the Flax target tree says. The fused
`in_proj_weight` / `in_proj_bias` of `nn.MultiheadAttention` are the `query`, `key`, `value`
kernels and biases. Other parameters keep their names. Torch buffers are not loaded: the Flax
side computes them (collection 'buffers'), and each is checked against the torch value (a
missing one is reported like a missing parameter).

Naming rules the models follow so that the inverse needs no template: a Flax submodule whose name
ends in `_<digits>` is a list entry when entry 0 is there too (`h_0`, `h_1`; GPT-2's `ln_1` beside
no `ln_0` is a name); `query`/`key`/`value` siblings are an nn.MultiheadAttention.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np
from flax.core import meta
from flax.traverse_util import flatten_dict, unflatten_dict

TRAINED = ("params", "batch_stats")   # collections loaded from torch
COMPUTED = ("buffers",)               # collections the Flax side computes; torch values are checked
QKV = ("query", "key", "value")
_LIST_ENTRY = re.compile(r"^(.*)_(\d+)$")


class WeightMismatchError(ValueError):
    """A state dict does not fit the model; the message lists every problem at once."""

    def __init__(self, missing=(), unexpected=(), shapes=(), buffers=(), target: str = "the Flax model",
                 dtypes=()):
        self.missing, self.unexpected, self.shapes, self.buffers, self.dtypes = (
            list(missing), list(unexpected), list(shapes), list(buffers), list(dtypes))
        parts = []
        if self.missing:
            parts.append("Missing key(s): " + ", ".join(self.missing))
        if self.unexpected:
            parts.append("Unexpected key(s): " + ", ".join(self.unexpected))
        if self.shapes:
            parts.append("Shape mismatch: " + "; ".join(self.shapes))
        if self.dtypes:
            parts.append("Dtype mismatch: " + "; ".join(self.dtypes))
        if self.buffers:
            parts.append("Buffer differs from the value the Flax model computes: " + "; ".join(self.buffers))
        super().__init__(f"Error(s) in loading state_dict into {target}:\n  " + "\n  ".join(parts))


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor, jax array or numpy array as a numpy array (torch imported only if given)."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def kernel_from_torch(w: np.ndarray) -> np.ndarray:
    """Linear (out, in) -> (in, out); Conv (O, I, kh, kw) -> (kh, kw, I, O)."""
    if w.ndim == 2:
        return w.T
    if w.ndim == 4:
        return w.transpose(2, 3, 1, 0)
    if w.ndim == 3:
        return w.transpose(2, 1, 0)
    raise ValueError(f"no kernel rule for a rank-{w.ndim} weight")


def kernel_to_torch(k: np.ndarray) -> np.ndarray:
    if k.ndim == 2:
        return k.T
    if k.ndim == 4:
        return k.transpose(3, 2, 0, 1)
    if k.ndim == 3:
        return k.transpose(2, 1, 0)
    raise ValueError(f"no kernel rule for a rank-{k.ndim} kernel")


def _resolve(tree: Mapping, segments: list[str]) -> list[tuple[str, ...]]:
    """Every Flax module path in `tree` that the torch module path `segments` may name.

    `encoder.0.1` may be `encoder_0_1` (nested lists), `encoder_0/1` or `encoder/0/1`.
    """
    if not segments:
        return [()]
    head, rest = segments[0], segments[1:]
    found = []
    name, n = head, 0
    while n < len(rest) and rest[n].isdigit():
        name, n = f"{name}_{rest[n]}", n + 1
        if isinstance(tree.get(name), Mapping):
            found += [(name,) + p for p in _resolve(tree[name], rest[n:])]
    if isinstance(tree.get(head), Mapping):
        found += [(head,) + p for p in _resolve(tree[head], rest)]
    return found


def _leaf_targets(node: Mapping, leaf: str, value: np.ndarray):
    """[(flax leaf path under the module, array)] for one torch leaf of a module, or None."""
    if leaf in ("in_proj_weight", "in_proj_bias") and all(n in node for n in QKV):
        kind = "kernel" if leaf.endswith("weight") else "bias"
        parts = np.split(value, 3, axis=0)
        return [((n, kind), kernel_from_torch(p) if kind == "kernel" else p) for n, p in zip(QKV, parts)]
    if leaf in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        name = QKV["qkv".index(leaf[0])]
        if name in node:
            return [((name, "kernel"), kernel_from_torch(value))]
    if leaf == "weight":
        if "kernel" in node and not isinstance(node["kernel"], Mapping):
            return [(("kernel",), kernel_from_torch(value))]
        for name in ("scale", "embedding"):
            if name in node and not isinstance(node[name], Mapping):
                return [((name,), value)]
    if leaf in node and not isinstance(node[leaf], Mapping):
        return [((leaf,), value)]
    return None


def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", np.shape(x)))


def torch_to_flax(state_dict: Mapping[str, Any], flax_model, *example_inputs, rng=None,
                  buffer_rtol: float = 1e-6, **call_kwargs) -> dict:
    """Flax variables for `flax_model` from a PyTorch `state_dict` (tensors or numpy arrays).

    The target tree comes from `jax.eval_shape(flax_model.init, rng, *example_inputs)`. Strict:
    one WeightMismatchError lists every missing key, unexpected key, shape mismatch and buffer
    that differs from what the Flax model computes.
    """
    rng = jax.random.key(0) if rng is None else rng
    target = meta.unbox(jax.eval_shape(lambda r: flax_model.init(r, *example_inputs, **call_kwargs), rng))
    collections = [c for c in target if c in TRAINED + COMPUTED]
    computed = {}
    if any(c in target for c in COMPUTED):
        def computed_collections(r):
            init = flax_model.init(r, *example_inputs, **call_kwargs)
            return {c: meta.unbox(init[c]) for c in COMPUTED if c in init}

        computed = {c: flatten_dict(v) for c, v in jax.jit(computed_collections)(rng).items()}
    flat_target = {c: flatten_dict(target[c]) for c in collections}
    loaded: dict[str, dict] = {c: {} for c in collections if c in TRAINED}
    checked: dict[str, set] = {c: set() for c in collections if c in COMPUTED}
    unexpected, shapes, buffers, dtypes = [], [], [], []

    for key, value in state_dict.items():
        value = to_numpy(value)
        segments = key.split(".")
        placed = False
        for c in collections:
            for module_path in _resolve(target[c], segments[:-1]):
                node = target[c]
                for s in module_path:
                    node = node[s]
                targets = _leaf_targets(node, segments[-1], value)
                if targets is None:
                    continue
                placed = True
                for leaf_path, array in targets:
                    path = module_path + leaf_path
                    want = _shape(flat_target[c][path])
                    if _shape(array) != want:
                        shapes.append(f"{key}: torch {_shape(value)} gives {'/'.join(path)} "
                                      f"{_shape(array)}, the Flax model has {want}")
                    elif c in COMPUTED:
                        checked[c].add(path)
                        mine = np.asarray(computed[c][path])
                        if not np.allclose(mine, array, rtol=buffer_rtol, atol=0):
                            err = np.max(np.abs(mine.astype(np.float64) - array.astype(np.float64)))
                            buffers.append(f"{key} (max abs diff {err:.3g})")
                    elif array.dtype.kind not in "fc" and np.dtype(flat_target[c][path].dtype).kind == "f" \
                            or array.dtype.kind == "c":
                        dtypes.append(f"{key}: torch dtype {array.dtype} where the Flax model holds "
                                      f"{np.dtype(flat_target[c][path].dtype)} (floating-point weights expected)")
                    else:
                        loaded[c][path] = array.astype(flat_target[c][path].dtype)
                break
            if placed:
                break
        if not placed:
            unexpected.append(key)

    missing = [f"{c}:{'/'.join(p)}" for c in loaded for p in flat_target[c] if p not in loaded[c]]
    missing += [f"{c}:{'/'.join(p)}" for c in checked for p in flat_target[c] if p not in checked[c]]
    if missing or unexpected or shapes or buffers or dtypes:
        raise WeightMismatchError(missing, unexpected, shapes, buffers, dtypes=dtypes)
    variables = {c: unflatten_dict({p: jax.numpy.asarray(a) for p, a in loaded[c].items()})
                 for c in loaded}
    for c, flat in computed.items():
        variables[c] = unflatten_dict(dict(flat))
    return variables


def _torch_module_path(path: tuple[str, ...], modules=None) -> list[str]:
    """With `modules` (every Flax module path of the tree), `name_i` is a list entry only when
    entry 0 (`name_0`) is there too: GPT-2's `ln_1` and `ln_2` are plain names."""
    out = []
    for depth, s in enumerate(path):
        indices = []
        m = _LIST_ENTRY.match(s)
        while m and (modules is None or path[:depth] + (m.group(1) + "_0" * (len(indices) + 1),) in modules):
            s, indices = m.group(1), [m.group(2)] + indices
            m = _LIST_ENTRY.match(s)
        out.extend([s] + indices)
    return out


def module_paths(tree: Mapping) -> set[tuple[str, ...]]:
    """Every module path (a prefix of a leaf's path) of a nested Flax variable collection."""
    return {p[:i] for p in flatten_dict(meta.unbox(tree)) for i in range(1, len(p))}


def flax_module_path_to_torch(path: tuple[str, ...], modules=None) -> str:
    """('blocks_3', 'mlp', '0') -> 'blocks.3.mlp.0'; pass `modules` (`module_paths(params)`) to
    keep names such as `ln_1` that are not list entries."""
    return ".".join(_torch_module_path(path, modules))


def flax_to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A torch `state_dict` (numpy arrays, torch key names) from Flax variables, buffers included."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"flax_to_torch takes a model's variables {{'params': ..., ['buffers': ...]}}; got {got} "
                         "(pass model.init(...) or apply's variables, not the params alone)")
    out: dict[str, np.ndarray] = {}
    for c in TRAINED + COMPUTED:
        if c not in variables:
            continue
        flat = {p: np.asarray(v) for p, v in flatten_dict(meta.unbox(variables[c])).items()}
        paths = module_paths(variables[c])
        modules: dict[tuple, dict[str, np.ndarray]] = {}
        for p, v in flat.items():
            modules.setdefault(p[:-1], {})[p[-1]] = v
        fused = set()
        for mpath, leaves in modules.items():
            parent, name = mpath[:-1], mpath[-1] if mpath else None
            if name in QKV and all(parent + (n,) in modules for n in QKV):
                if parent in fused:
                    continue
                fused.add(parent)
                prefix = ".".join(_torch_module_path(parent, paths) + [""])
                ks = [kernel_to_torch(modules[parent + (n,)]["kernel"]) for n in QKV]
                if len({k.shape for k in ks}) == 1:
                    out[prefix + "in_proj_weight"] = np.concatenate(ks, axis=0)
                else:
                    for n, k in zip("qkv", ks):
                        out[prefix + f"{n}_proj_weight"] = k
                if all("bias" in modules[parent + (n,)] for n in QKV):
                    out[prefix + "in_proj_bias"] = np.concatenate(
                        [modules[parent + (n,)]["bias"] for n in QKV], axis=0)
                continue
            prefix = ".".join(_torch_module_path(mpath, paths) + [""])
            for leaf, v in leaves.items():
                if leaf == "kernel":
                    out[prefix + "weight"] = np.ascontiguousarray(kernel_to_torch(v))
                elif leaf in ("scale", "embedding"):
                    out[prefix + "weight"] = v
                else:
                    out[prefix + leaf] = v
    return out
