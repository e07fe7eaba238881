"""Key maps from other libraries' checkpoints to this project's torch key names: data, one table
per source library and family (`timm.py`, `open_clip.py`, `hf.py`), applied by the one engine in
`bridge.imports`.

A `KeyMap` is a list of `Rule`s and a `read_config` function. A rule is two key templates: the
source key (`blocks.{i}.mlp.fc1.{p}`) and ours (`blocks.{i}.mlp.0.{p}`); `{name}` stands for one
dot-free segment, and a target may shift a number (`layers.{s-1}.downsample.{m}`: timm opens a Swin
stage with the merge that ends our previous one). A rule may also name one operation on the value:

- `"T"`: transposed (open_clip's `proj` is a raw (width, embed) matrix that ours applies as a
  Linear weight);
- `"reshape"`: reshaped to our shape, the same values (CLIP's class embedding (W,) is our
  `cls_token` (1, 1, W));
- `"part k/n"`: slice k of n along the first axis of our key (separate q, k, v projections are
  our fused `qkv`).

A rule whose target is None loads nothing; its `why` says why (a buffer our model computes, a
mask token no forward without a mask uses). `read_config` reads our constructor arguments from the
checkpoint's shapes and the library's own config (`Source`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping

import numpy as np

_NOTHING = object()


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str
    target: str | None
    op: str = ""
    why: str = ""


def R(source: str, target: str | None, op: str = "", why: str = "") -> Rule:
    return Rule(source, target, op, why)


def prefixed(rules, source_prefix: str = "", target_prefix: str = "") -> list[Rule]:
    """The same rules under a prefix on either side (a tower inside a larger model)."""
    return [Rule(source_prefix + r.source, None if r.target is None else target_prefix + r.target, r.op, r.why)
            for r in rules]


@dataclasses.dataclass(frozen=True)
class KeyMap:
    library: str                       # "timm", "open_clip", "hf"
    arch: str                          # the --arch names it serves (a glob)
    description: str                   # what it imports into what
    rules: tuple[Rule, ...]
    read_config: Callable[["Source"], dict]   # -> {"family", "model", "kwargs", "inputs"}
    # (arch, the library's config file as a dict or None) -> (facts, where each came from, problems)
    read_facts: Callable[[str, dict | None], tuple[dict, dict, list]]
    example: str = ""                  # the README's command line for it


class Source:
    """The checkpoint as `read_config` sees it: shapes of its keys and the library's facts (its
    config file, the named architecture's known config, and `--set` overrides, in rising priority).
    Every problem is collected, not raised, so that one error can name all of them (`problems`)."""

    def __init__(self, library: str, arch: str, state_dict: Mapping[str, np.ndarray],
                 facts: Mapping[str, Any], fact_origin: Mapping[str, str]):
        self.library, self.arch = library, arch
        self.state_dict = state_dict
        self.facts = dict(facts)
        self.fact_origin = dict(fact_origin)      # fact -> where it came from
        self.missing_keys: list[str] = []         # keys the architecture reader needed
        self.fact_problems: list[str] = []
        self.used_facts: set[str] = set()

    # -- shapes -------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.state_dict

    def shape(self, key: str, why: str = "") -> tuple | None:
        if key in self.state_dict:
            return tuple(np.shape(self.state_dict[key]))
        self.missing_keys.append(f"{key}" + (f" (to read {why})" if why else ""))
        return None

    def dim(self, key: str, axis: int, why: str = "") -> int | None:
        s = self.shape(key, why)
        if s is None:
            return None
        if len(s) <= abs(axis) - (axis < 0):
            self.fact_problems.append(f"{key} has shape {s}: no axis {axis} to read {why}")
            return None
        return int(s[axis])

    def count(self, template: str) -> int:
        """How many consecutive indices `{i}` (from 0) the keys `template` has: blocks, layers."""
        pattern = re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")
        found = {int(m.group(1)) for k in self.state_dict for m in [pattern.match(k)] if m}
        n = 0
        while n in found:
            n += 1
        return n

    # -- facts --------------------------------------------------------------------------------
    def fact(self, name: str, from_shapes: Any = _NOTHING, default: Any = _NOTHING, how: str = "") -> Any:
        """An architecture fact. Shapes decide what they can; a fact the library's config also
        gives must agree with them. Otherwise the config, else `default` (the library's own
        default for it), else it is reported as needed."""
        self.used_facts.add(name)
        given = self.facts.get(name, _NOTHING)
        if from_shapes is not _NOTHING and from_shapes is not None:
            if given is not _NOTHING and not _same(given, from_shapes):
                self.fact_problems.append(
                    f"{name}: {self.fact_origin.get(name, 'the config')} says {given!r}, the checkpoint's "
                    f"shapes give {from_shapes!r}")
            return from_shapes
        if given is not _NOTHING:
            return given
        if default is not _NOTHING:
            return default
        self.fact_problems.append(
            f"{name}: not readable from the checkpoint's shapes{(' (' + how + ')') if how else ''} and given by no "
            f"config; pass the library's config file (--config) or --set {name}=VALUE")
        return None

    def require(self, name: str, allowed, default: Any, why: str) -> Any:
        """A fact our model supports only at the values `allowed` (the library default `default`)."""
        self.used_facts.add(name)
        value = self.facts.get(name, default)
        if value not in allowed:
            self.fact_problems.append(f"{name}={value!r} ({self.fact_origin.get(name, 'config')}) is not supported: "
                                      f"{why}")
        return value

    def refuse_unknown(self, known: set[str], ignorable: set[str] = frozenset(), scope: str = "") -> None:
        """Facts of the config (under `scope`, e.g. 'model_args.') that this reader neither uses nor
        may ignore: each is an architecture option our models may not express, so it is an error."""
        for name in self.facts:
            if not name.startswith(scope):
                continue
            short = name[len(scope):]
            if short not in known and short not in ignorable and name not in self.used_facts:
                self.fact_problems.append(f"{name}={self.facts[name]!r} ({self.fact_origin.get(name, 'config')}): an "
                                          "option this import does not know; refused rather than ignored")

    @property
    def problems(self) -> bool:
        return bool(self.missing_keys or self.fact_problems)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return a == b


def grid_side(tokens: int | None, what: str, src: Source) -> int | None:
    """The side of a square grid of `tokens` patches (a position table's length less the class token)."""
    if tokens is None:
        return None
    side = math.isqrt(tokens)
    if side * side != tokens:
        src.fact_problems.append(f"{what}: {tokens} patch positions are not a square grid")
        return None
    return side


def spec(family: str, model: str, **kwargs) -> dict:
    return {"family": family, "model": model, "kwargs": kwargs}


def image_input(image_size, in_channels) -> dict:
    return {"name": "image", "kind": "image", "shape": [image_size, image_size, in_channels]}


def tokens_input(vocab_size, length) -> dict:
    return {"name": "tokens", "kind": "tokens", "shape": [length], "vocab_size": vocab_size}


def registry() -> list[KeyMap]:
    """Every key map, in the order `--arch` names are matched."""
    import importlib

    return [m for name in ("timm", "open_clip", "hf")
            for m in importlib.import_module(f"{__name__}.{name}").MAPS]
