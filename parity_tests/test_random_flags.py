"""`python -m train` under random settings: a seeded generator draws values for every flag and every
`--set` / `--recipe` key of the small presets, in range and out of it, and each run either starts
training or ends with one `error:` line (exit status 2) and nothing written, never a traceback."""

import contextlib
import dataclasses
import io
import json
import math
import os

import numpy as np
import pytest

import train.loop
from parity_tests.cases import SHORT_FINISH, SHRINK, SMALL
from train.__main__ import main
from train.settings import RECIPE_FLAGS, Config, _option
from train.tasks import get_task
from twin_models.presets import PRESETS

DRAWS = 80
SEED = 20261206
FLAGS = [f for f in dataclasses.fields(Config)
         if f.name not in ("preset", "workdir", "export", "model_overrides", "recipe_overrides", "resume")]
# Out-of-range values by kind; those of --set / --recipe (JSON: NaN, Infinity) pass its type check.
BAD = {"int": ["0", "-1", "-7", "99999999999", "2.5", "NaN", "abc", ""],
       "float": ["NaN", "Infinity", "-Infinity", "-0.5", "0", "1.5", "1e30", "abc", "true"],
       "flag-float": ["nan", "inf", "-inf", "-1", "0", "1.5", "1e30", "abc"]}


def _number(rng, default, flag=False):
    """A value for a number whose preset default is `default`: near it (in range) or a bad one."""
    if isinstance(default, bool):
        return str(rng.choice(["true", "false", "1", "yes"]))
    if rng.random() < 0.5:
        kind = "int" if isinstance(default, int) else "flag-float" if flag else "float"
        return str(rng.choice(BAD[kind]))
    if isinstance(default, int):   # at most 64: sizes and counts the draws can afford
        return str(min(64, max(0, int(default * rng.choice([0, 0.5, 1, 2])) + int(rng.integers(-1, 2)))))
    return repr(float(default) * float(rng.choice([0, 0.5, 1, 2])))


def _value(rng, default):
    """A --set / --recipe value of the default's kind, in range or not."""
    if isinstance(default, (tuple, list)):
        kind = rng.integers(4)
        if kind == 0:
            return "[]"
        if kind == 1:
            return str([int(x) for x in rng.integers(-1, 5, len(default))])
        if kind == 2:
            return str(list(default) + [int(default[-1])])
        return "abc"
    if default is None:
        return str(rng.choice(["null", "0", "-3", "4", "abc"]))
    if isinstance(default, str):
        return str(rng.choice([default, "mnist", "5", "imagefolder:/nonexistent"]))
    return _number(rng, default)


def _flag(rng, f, preset):
    """One flag of `Config` field `f` with a drawn value (None: a boolean flag that takes none)."""
    if isinstance(f.default, bool):
        return [_option(f)]
    if f.metadata["choices"]:
        return [_option(f), str(rng.choice([*f.metadata["choices"], "bogus"]))]
    if f.name == "data":
        return [_option(f), str(rng.choice(["digits", "scenes", "cifar10:/nonexistent", "coco:/x", "mnist"]))]
    default = preset.train.get(f.name, f.default if f.default is not None else 1)
    if "float" in str(f.type):
        default = float(default)
    return [_option(f), _number(rng, default, flag=True)]


# The process's own flags (not `Config` fields): never a whole valid --coordinator trio, which would
# start jax.distributed, and never a compile cache of its own, which would move this process's.
PROCESS_FLAGS = {
    "--coordinator": ["nohost", "host:port", ":1234"],
    "--num-processes": ["0", "-1", "1", "2", "x"],
    "--process-id": ["-1", "0", "3"],
    "--distributed-timeout": ["nan", "inf", "-1", "0", "30"],
    "--compile-cache": ["/dev/null/cache"],
    "--no-compile-cache": [None],
}


def draw(rng) -> list[str]:
    """A command line: a small preset, its shrunk model and data, then 1-4 drawn flags (settings and
    the process's own), --set and --recipe keys."""
    name = str(rng.choice(SMALL))
    preset = PRESETS[name]
    argv = [name]
    for k, v in SHRINK.get(preset.family, {}).items():
        argv += ["--set", f"{k}={list(v) if isinstance(v, tuple) else v}"]
    for k, v in SHORT_FINISH.get(preset.task, {}).items():
        argv += ["--recipe", f"{k}={v}"]
    recipe_keys = sorted(set(preset.train) - set(RECIPE_FLAGS))
    for _ in range(int(rng.integers(1, 5))):
        kind = rng.integers(4)
        if kind == 3:
            flag = str(rng.choice(sorted(PROCESS_FLAGS)))
            value = rng.choice(PROCESS_FLAGS[flag])
            argv += [flag] if value is None else [flag, str(value)]
        elif kind == 0:
            argv += _flag(rng, FLAGS[rng.integers(len(FLAGS))], preset)
        elif kind == 1:
            key = str(rng.choice(sorted(preset.kwargs)))
            argv += ["--set", f"{key}={_value(rng, preset.kwargs[key])}"]
        elif recipe_keys:
            key = str(rng.choice(recipe_keys))
            argv += ["--recipe", f"{key}={_value(rng, preset.train[key])}"]
    return argv


class Started(Exception):
    """Raised by `_start` in place of training: the run got through every check."""


def _start(config, *args, **kwargs):
    """What `train.loop.run` does first: resolve the run (every check), make the workdir, build the
    task's model in the chosen backend (the Flax one traced through its init)."""
    from train.config import resolve

    r = resolve(config)
    os.makedirs(r.workdir)
    if config.backend == "torch":
        r.task.torch_training.model(r.preset)
    else:   # a Flax module is built lazily: trace its init
        import jax

        training = r.task.jax_training
        model = training.model(r.preset)
        jax.eval_shape(lambda key: model.init(key, *training.init_args(r.preset)), jax.random.key(0))
    raise Started(r.preset.name)


@pytest.fixture
def cached_data(monkeypatch):
    """Each task's data read once per (spec, image size, channels, recipe): the draws repeat them."""
    cache = {}
    for cls in {type(get_task(p)) for p in PRESETS.values()}:
        def cached(self, spec, preset, recipe, _load=cls.load_data):
            key = (type(self), spec, preset.image_size, preset.in_channels, repr(sorted(recipe.items())))
            if key not in cache:
                cache[key] = _load(self, spec, preset, recipe)
            return cache[key]
        monkeypatch.setattr(cls, "load_data", cached)


def test_random_settings_start_or_fail_cleanly(tmp_path, monkeypatch, cached_data):
    rng = np.random.default_rng(SEED)
    monkeypatch.setattr(train.loop, "run", _start)
    outcomes = {"started": 0, "refused": 0}
    for i in range(DRAWS):
        argv = draw(rng)
        workdir = tmp_path / f"run{i}"
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main([*argv, "--no-progress", "--workdir", str(workdir)])
            except Started:
                rc = "started"
            except SystemExit as e:   # argparse: a value of the wrong type
                rc = e.code
        text = err.getvalue()
        where = f"draw {i}: python -m train {' '.join(argv)}\n{text}"
        assert "Traceback" not in text, where
        if rc == "started":
            outcomes["started"] += 1
            continue
        assert rc == 2 and not workdir.exists(), where
        lines = text.strip().splitlines()
        assert sum("error:" in line for line in lines) == 1 and "error:" in lines[-1], where
        outcomes["refused"] += 1
    assert outcomes["started"] >= DRAWS // 10 and outcomes["refused"] >= DRAWS // 4, outcomes


def test_random_valid_settings_train(tmp_path):
    """Drawn in-range settings train for real (a tiny model, one step; eager torch, which needs no
    compile: the draws above build the JAX model too)."""
    rng = np.random.default_rng(SEED)
    argv = ["vit-tiny-digits", "--backend", "torch", "--steps", "1", "--batch-size", "8", "--no-progress",
            "--set", f"depth={int(rng.integers(1, 3))}", "--set", f"embed_dim={8 * int(rng.integers(1, 3))}",
            "--set", "num_heads=2", "--set", f"mlp_ratio={int(rng.integers(1, 4))}",
            "--dropout", f"{rng.uniform(0, 0.9):.3f}", "--lr", f"{10 ** rng.uniform(-5, -1):.2e}",
            "--seed", str(int(rng.integers(0, 2 ** 32))), "--label-smoothing", f"{rng.uniform(0, 0.9):.2f}",
            "--workdir", str(tmp_path / "w")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0, argv
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["steps"] == 1 and math.isfinite(summary["final_loss"])
