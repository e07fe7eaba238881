"""Other libraries' checkpoints (timm, open_clip, Hugging Face) as this project's models.

`python -m bridge import --from LIBRARY --arch NAME CHECKPOINT --out DIR` reads a checkpoint
(safetensors, or a `.pt`/`.bin` through `torch.load(weights_only=True)`; a Hugging Face folder with
its config.json), renames its keys by the key map of that library and family (`bridge.maps`: data),
reads our constructor arguments from the checkpoint's shapes and the library's config, and writes
`DIR/model.safetensors` (this project's torch key names, every key of our torch model) and
`DIR/config.json` (the family, class and constructor arguments; `torch_reference.from_config` and
`jax_models.from_config` build the model, `load` builds both with the weights).

Strict: a checkpoint of another architecture, a truncated file or a missing key gives one
`ImportMismatchError` naming every key that does not fit and what was expected.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from twin_models.presets import parse_assignments

from .convert import WeightMismatchError
from .io import TruncatedFileError, WeightsFileError, _check_file, _truncation, file_format, save_safetensors
from .maps import KeyMap, Rule, Source, registry

LIBRARIES = ("timm", "open_clip", "hf")
CONFIG_NAMES = {"timm": ("config.json",), "open_clip": ("open_clip_config.json", "config.json"),
                "hf": ("config.json",)}
WEIGHT_NAMES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                "open_clip_pytorch_model.bin")


class ImportMismatchError(WeightMismatchError):
    """A checkpoint that does not fit the architecture it was imported as. Every problem at once:
    `missing` (keys our model needs, with the source keys that would give them), `unexpected`
    (source keys no rule or no key of ours takes), `shapes`, `buffers` (a source buffer that
    differs from the value our model computes), `facts` (architecture facts missing or
    contradicting the shapes) and `truncated` (tensors cut off by the end of the file)."""

    def __init__(self, what: str, missing=(), unexpected=(), shapes=(), buffers=(), facts=(), truncated=(),
                 hint: str = ""):
        self.what, self.hint = what, hint
        self.facts, self.truncated = list(facts), list(truncated)
        self.missing, self.unexpected, self.shapes, self.buffers = (
            list(missing), list(unexpected), list(shapes), list(buffers))
        parts = []
        for title, items in (("Tensors cut off by the end of the file", self.truncated),
                             ("Architecture facts missing or contradicting the weights", self.facts),
                             ("Missing key(s)", self.missing), ("Unexpected key(s)", self.unexpected),
                             ("Shape mismatch", self.shapes), ("Buffer differs from ours", self.buffers)):
            if items:
                parts.append(f"{title} ({len(items)}):\n    " + "\n    ".join(items))
        ValueError.__init__(self, f"{what} does not fit:\n  " + (f"{hint}\n  " if hint else "") + "\n  ".join(parts))


# ---------------------------------------------------------------------------------------------
# Templates: `blocks.{i}.mlp.fc1.{p}`, a target may shift a number: `layers.{s-1}.downsample`.

_FIELD = re.compile(r"\{(\w+)([+-]\d+)?\}")


@dataclasses.dataclass(frozen=True)
class _Template:
    text: str
    regex: re.Pattern
    offsets: dict[str, int]

    @classmethod
    def compile(cls, text: str) -> "_Template":
        pattern, pos, seen, offsets = "", 0, set(), {}
        for m in _FIELD.finditer(text):
            pattern += re.escape(text[pos:m.start()])
            name, off = m.group(1), int(m.group(2) or 0)
            if name in seen:
                pattern += f"(?P={name})"
            else:
                pattern += rf"(?P<{name}>\d+)" if off else rf"(?P<{name}>[^.]+)"
                seen.add(name)
            offsets[name] = off
            pos = m.end()
        pattern += re.escape(text[pos:])
        return cls(text, re.compile(pattern), offsets)

    def match(self, key: str) -> dict[str, str] | None:
        """The fields of `key`, with each shifted field given back unshifted."""
        m = self.regex.fullmatch(key)
        if m is None:
            return None
        return {k: str(int(v) - self.offsets[k]) if self.offsets.get(k) else v for k, v in m.groupdict().items()}

    def format(self, fields: Mapping[str, str]) -> str:
        def sub(m):
            value = fields[m.group(1)]
            return str(int(value) + int(m.group(2))) if m.group(2) else value
        return _FIELD.sub(sub, self.text)


@dataclasses.dataclass(frozen=True)
class _Compiled:
    rule: Rule
    source: _Template
    target: _Template | None


def _compile(rules: Sequence[Rule]) -> list[_Compiled]:
    return [_Compiled(r, _Template.compile(r.source), None if r.target is None else _Template.compile(r.target))
            for r in rules]


def _part(op: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"part (\d+)/(\d+)", op)
    return (int(m.group(1)), int(m.group(2))) if m else None


# ---------------------------------------------------------------------------------------------
# Reading checkpoints and configs


def _checkpoint_files(path: str) -> tuple[list[str], str | None]:
    """(weight files, the folder to look for a config in)."""
    if os.path.isdir(path):
        for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = os.path.join(path, name)
            if os.path.exists(index):
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                return [os.path.join(path, s) for s in shards], path
        for name in WEIGHT_NAMES:
            if os.path.exists(os.path.join(path, name)):
                return [os.path.join(path, name)], path
        found = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".bin", ".pt", ".pth")))
        if len(found) == 1:
            return [os.path.join(path, found[0])], path
        raise WeightsFileError(f"{path}: no checkpoint found (looked for {', '.join(WEIGHT_NAMES)}"
                                f"{'; several candidates: ' + ', '.join(found) if found else ''})")
    if not os.path.exists(path):
        raise WeightsFileError(f"{path}: no such file")
    return [path], os.path.dirname(os.path.abspath(path))


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint (a file, or a model folder, sharded or not) as numpy. The format
    is read from the content (`io.file_format`): safetensors (a truncated one raises
    `io.TruncatedFileError` naming each tensor cut off), or a torch.save file through
    `torch.load(weights_only=True)` only (a `{"state_dict": ...}` wrapper is opened). bfloat16
    becomes float32 (numpy has no bfloat16; exact). Any other failure is one `io.WeightsFileError`."""
    import torch

    out: dict[str, np.ndarray] = {}
    for file in _checkpoint_files(os.fspath(path))[0]:
        _check_file(file)
        kind = file_format(file)
        if kind == "safetensors":
            from safetensors.torch import load_file
            try:
                tensors = load_file(file)
            except Exception as e:
                truncated = _truncation(file)
                if truncated is not None:
                    raise truncated from e
                raise WeightsFileError(f"{file} is not a readable safetensors file (truncated or damaged: "
                                       f"{type(e).__name__}: {e})") from e
        elif kind == "torch":
            try:
                tensors = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:
                raise WeightsFileError(
                    f"{file} could not be read with torch.load(weights_only=True) ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}): a truncated or damaged file, "
                    "or one that needs full unpickling, which is refused (it can run arbitrary code)") from e
            if isinstance(tensors, Mapping) and isinstance(tensors.get("state_dict"), Mapping):
                tensors = tensors["state_dict"]
            if not isinstance(tensors, Mapping):
                raise WeightsFileError(f"{file} holds a {type(tensors).__name__}, not a state_dict")
        else:
            raise WeightsFileError(f"{file} is neither a safetensors file nor one torch.save wrote")
        for k, v in tensors.items():
            if not isinstance(v, torch.Tensor):
                raise WeightsFileError(f"{file}: entry {k!r} is a {type(v).__name__}, not a tensor")
            v = v.detach().cpu()
            out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    return out


def read_library_config(library: str, checkpoint: str, config: str | os.PathLike | None) -> tuple[dict | None, str | None]:
    """(the library's config as a dict, its path): `config` if given, else the library's config
    file beside the checkpoint (or in its folder), else None."""
    if config is None:
        folder = _checkpoint_files(os.fspath(checkpoint))[1]
        for name in CONFIG_NAMES[library]:
            candidate = os.path.join(folder, name)
            if os.path.exists(candidate):
                config = candidate
                break
    if config is None:
        return None, None
    with open(config) as f:
        return json.load(f), os.fspath(config)


def parse_overrides(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """`--set name=value` items (`twin_models.presets.parse_assignments`: JSON, a Python literal or
    a bare word), or a mapping as it is."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    return parse_assignments(items, "--set")


def find_map(library: str, arch: str) -> KeyMap:
    if library not in LIBRARIES:
        raise ValueError(f"unknown library {library!r}; known: {', '.join(LIBRARIES)}")
    for keymap in registry():
        if keymap.library == library and fnmatch.fnmatchcase(arch, keymap.arch):
            return keymap
    known = [m.arch for m in registry() if m.library == library]
    raise ValueError(f"no key map for {library} architecture {arch!r}; {library} architectures: {', '.join(known)}")


# ---------------------------------------------------------------------------------------------
# The engine


@dataclasses.dataclass
class Imported:
    """The result of an import: our torch-keyed state dict and the config that builds the model."""
    state_dict: dict[str, np.ndarray]
    config: dict
    ignored: list[str]          # source keys not loaded, each with the reason
    computed: list[str]         # our keys not from the checkpoint: buffers our model computes

    def save(self, out: str | os.PathLike) -> tuple[str, str]:
        """Write `out/model.safetensors` and `out/config.json`; their paths."""
        os.makedirs(out, exist_ok=True)
        weights, config = os.path.join(out, "model.safetensors"), os.path.join(out, "config.json")
        save_safetensors(self.state_dict, weights)
        tmp = config + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.config, f, indent=2)
            f.write("\n")
        os.replace(tmp, config)
        return weights, config


def _expected_sources(compiled: list[_Compiled], key: str, library: str) -> str:
    """The source key(s) that would give our `key` (a fused key is given by several)."""
    sources = []
    for c in compiled:
        if c.target is None:
            continue
        fields = c.target.match(key)
        if fields is not None and set(c.source.offsets) <= set(fields):
            sources.append(c.source.format(fields))
    return f" (from {library} {', '.join(sources)})" if sources else " (no rule of this map gives it)"


def apply_map(keymap: KeyMap, source: Mapping[str, np.ndarray], ours: Mapping[str, np.ndarray],
              buffers: set[str], what: str, buffer_rtol: float = 1e-6) -> tuple[dict, list, list]:
    """Our state dict from the source's by the map's rules, checked against `ours` (our model's
    state dict: names, shapes and dtypes; the values of `buffers` are what our model computes).
    Returns (state dict in our key order, ignored source keys with reasons, computed keys);
    raises one `ImportMismatchError` listing every problem."""
    compiled = _compile(keymap.rules)
    placed: dict[str, tuple[str, np.ndarray]] = {}
    parts: dict[str, dict[int, tuple[str, np.ndarray]]] = {}
    part_counts: dict[str, int] = {}
    ignored, unexpected, shapes, buffer_errors = [], [], [], []
    for key, value in source.items():
        hit = next(((c, f) for c in compiled for f in [c.source.match(key)] if f is not None), None)
        if hit is None:
            unexpected.append(f"{key} {tuple(np.shape(value))} (no rule of the {keymap.library} map "
                              f"'{keymap.arch}' takes it)")
            continue
        c, fields = hit
        op = c.rule.op
        if c.target is None:
            ignored.append(f"{key}: {c.rule.why}")
            continue
        target = c.target.format(fields)
        value = np.asarray(value)
        if op == "T":
            value = value.T
        part = _part(op)
        if part is not None:
            parts.setdefault(target, {})[part[0]] = (key, value)
            part_counts[target] = part[1]
            continue
        if target in placed:
            unexpected.append(f"{key} (gives {target}, which {placed[target][0]} gave already)")
            continue
        placed[target] = (key, value)
    for target, got in parts.items():
        n = part_counts[target]
        if len(got) < n:
            continue   # reported as missing below, with every source key it needs
        placed[target] = (" + ".join(got[i][0] for i in range(n)),
                          np.concatenate([got[i][1] for i in range(n)], axis=0))

    out, missing, computed = {}, [], []
    for key, want in ours.items():
        want_shape = tuple(np.shape(want))
        if key not in placed:
            if key in buffers:
                out[key] = np.asarray(want)
                computed.append(key)
            else:
                missing.append(f"{key} {want_shape}{_expected_sources(compiled, key, keymap.library)}")
            continue
        src_key, value = placed[key]
        op_reshape = any(c.target is not None and c.target.match(key) is not None and c.rule.op == "reshape"
                         for c in compiled)
        if op_reshape and value.size == int(np.prod(want_shape)):
            value = value.reshape(want_shape)
        if tuple(value.shape) != want_shape:
            shapes.append(f"{src_key} {tuple(np.shape(source[src_key])) if src_key in source else tuple(value.shape)}"
                          f" -> {key}: gives {tuple(value.shape)}, our model expects {want_shape}")
            continue
        if key in buffers:
            mine = np.asarray(want)
            if not np.allclose(mine.astype(np.float64), value.astype(np.float64), rtol=buffer_rtol, atol=0):
                buffer_errors.append(f"{src_key} -> {key}: differs from the value our model computes")
            out[key] = mine
            continue
        out[key] = np.require(value.astype(np.asarray(want).dtype), requirements="C")
    for target, (src_key, _) in placed.items():
        if target not in ours:
            unexpected.append(f"{src_key} (-> {target}, which our model does not have)")
    if missing or unexpected or shapes or buffer_errors:
        raise ImportMismatchError(what, missing, unexpected, shapes, buffer_errors)
    return out, ignored, computed


def _closest_map(keymap: KeyMap, source: Mapping[str, np.ndarray]) -> str:
    """A line naming the key map that takes (nearly) every source key, when it is not `keymap`."""
    def taken(m: KeyMap) -> int:
        compiled = _compile(m.rules)
        return sum(any(c.source.match(k) is not None for c in compiled) for k in source)
    mine, best = taken(keymap), max(registry(), key=taken)
    n = taken(best)
    if best is keymap or n <= mine or n < 0.9 * len(source):
        return ""
    return (f"Its keys fit the {best.library} '{best.arch}' map ({n} of {len(source)}; this map takes {mine}): "
            f"try --from {best.library} --arch {best.example.split('--arch ')[-1].split()[0]}")


def _unmatched(keymap: KeyMap, source: Mapping[str, np.ndarray]) -> list[str]:
    compiled = _compile(keymap.rules)
    return [f"{k} {tuple(np.shape(v))} (no rule of the {keymap.library} map '{keymap.arch}' takes it)"
            for k, v in source.items() if not any(c.source.match(k) is not None for c in compiled)]


def import_checkpoint(library: str, arch: str, checkpoint: str | os.PathLike,
                      config: str | os.PathLike | None = None, overrides=None) -> Imported:
    """Read `checkpoint` of `library`'s architecture `arch` as this project's model: an `Imported`
    (state dict in our torch key names, the config that builds our model). `config`: the
    library's config file (default: the one beside the checkpoint, if any); `overrides`: facts
    by the library's names ({"num_heads": 3} or ["num_heads=3"]) over the config's."""
    import torch_reference

    keymap = find_map(library, arch)
    checkpoint = os.fspath(checkpoint)
    what = f"{checkpoint} as {library} {arch}"
    try:
        source = read_checkpoint(checkpoint)
    except TruncatedFileError as e:
        raise ImportMismatchError(what, truncated=e.cut,
                                  hint=f"The file has {e.size} bytes; its header describes {e.needed}.") from e
    lib_config, config_path = read_library_config(library, checkpoint, config)
    facts, origin, problems = keymap.read_facts(arch, lib_config)
    if config_path:
        origin = {k: v.replace("config.json", os.path.basename(config_path)) for k, v in origin.items()}
    for k, v in parse_overrides(overrides).items():
        facts[k], origin[k] = v, "--set"
    src = Source(library, arch, source, facts, origin)
    spec = keymap.read_config(src)
    if problems or src.problems:
        raise ImportMismatchError(what, missing=[f"{k}: needed to read the architecture" for k in src.missing_keys],
                                  unexpected=_unmatched(keymap, source), facts=problems + src.fact_problems,
                                  hint=_closest_map(keymap, source))
    spec = {**spec, "source": {"library": library, "arch": arch, "checkpoint": os.path.abspath(checkpoint),
                               "config": config_path, "overrides": parse_overrides(overrides) or None}}
    try:
        model = torch_reference.from_config(spec)
    except (TypeError, ValueError) as e:
        raise ImportMismatchError(what, facts=[f"our {spec['family']}.{spec['model']} refuses the "
                                               f"architecture read from it: {e}"]) from e
    ours = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    buffers = {k for k in ours if k not in dict(model.named_parameters())}
    del model
    try:
        state_dict, ignored, computed = apply_map(keymap, source, ours, buffers, what)
    except ImportMismatchError as e:
        hint = _closest_map(keymap, source)
        if not hint:
            raise
        raise ImportMismatchError(what, e.missing, e.unexpected, e.shapes, e.buffers, hint=hint) from None
    return Imported(state_dict, spec, ignored, computed)


# ---------------------------------------------------------------------------------------------
# Using an import


def example_inputs(config: Mapping, batch_size: int = 2, seed: int = 0):
    """(torch inputs, Flax inputs) for the model of an import's config: its `inputs` entries
    drawn in order from one seeded stream (images N(0, 1), NCHW for torch and NHWC for Flax; CLIP
    text tokens with the end-of-text id, the largest, once per row; a decoder's encoder hidden
    states `features` N(0, 1))."""
    import torch

    from twin_models.presets import random_tokens

    rs = np.random.RandomState(seed)
    torch_in, flax_in = [], []
    for entry in config["inputs"]:
        kind, shape = entry["kind"], tuple(entry["shape"])
        if kind == "image":
            x = rs.standard_normal((batch_size, shape[2], shape[0], shape[1])).astype(np.float32)
            torch_in.append(torch.from_numpy(x))
            flax_in.append(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        elif kind == "features":   # a decoder's encoder_hidden_states (B, tokens, width), N(0, 1)
            x = rs.standard_normal((batch_size, *shape)).astype(np.float32)
            torch_in.append(torch.from_numpy(x))
            flax_in.append(x)
        elif kind == "tokens":
            x = random_tokens(rs, batch_size, entry["vocab_size"], shape[0])
            torch_in.append(torch.from_numpy(x))
            flax_in.append(x.astype(np.int32))
        else:
            raise ValueError(f"unknown input kind {kind!r}")
    return torch_in, flax_in


def load(folder: str | os.PathLike, backends: Sequence[str] = ("torch", "flax"), attention_impl: str = "xla"):
    """The models of an import folder with its weights: (torch model in eval mode or None, Flax
    model or None, Flax variables or None). Torch loads `strict=True`; Flax goes through
    `bridge.torch_to_flax` (strict too)."""
    from safetensors.torch import load_file

    import torch_reference

    from .convert import torch_to_flax

    folder = os.fspath(folder)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    state_dict = load_file(os.path.join(folder, "model.safetensors"))
    torch_model = torch_reference.from_config(config)
    torch_model.load_state_dict(state_dict, strict=True)
    torch_model.eval()
    flax_model = variables = None
    if "flax" in backends:
        import jax_models

        flax_model = jax_models.from_config(config, attention_impl=attention_impl)
        _, flax_in = example_inputs(config, 1)
        variables = torch_to_flax({k: v.numpy() for k, v in state_dict.items()}, flax_model, *flax_in)
    return (torch_model if "torch" in backends else None), flax_model, variables


def describe(imported: Imported) -> str:
    spec = imported.config
    kwargs = ", ".join(f"{k}={v['model'] if isinstance(v, dict) and 'model' in v else v!r}"
                       for k, v in spec["kwargs"].items())
    lines = [f"{spec['family']}.{spec['model']}({kwargs})",
             f"{len(imported.state_dict)} tensors ({sum(int(np.prod(v.shape)) for v in imported.state_dict.values()):,} values)"]
    for k, v in spec["kwargs"].items():
        if isinstance(v, dict) and "model" in v:
            lines.append(f"  {k}: {v['family']}.{v['model']}(" + ", ".join(f"{a}={b!r}" for a, b in v["kwargs"].items()) + ")")
    if imported.ignored:
        lines.append(f"not loaded ({len(imported.ignored)}): " + "; ".join(imported.ignored))
    if imported.computed:
        lines.append(f"computed by our model ({len(imported.computed)}): " + ", ".join(imported.computed[:6])
                     + (" ..." if len(imported.computed) > 6 else ""))
    return "\n".join(lines)
