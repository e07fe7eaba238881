"""Packaging: the project installs beside other distributions and changes nothing by being imported.

A non-editable install into a fresh virtual environment owns exactly its six top-level packages
(`twin_models`, `jax_models`, `torch_reference`, `bridge`, `train`, `benchmarks`), so it coexists
with the distributions on the package index that own `tokenizer` and `presets`; the CLIs and both
backends work from outside the checkout, and the test suite is not installed. Importing every
module leaves the environment, JAX's config, torch's global settings and the random states as they
were (JAX's backend not started, XLA_FLAGS untouched); `jax_models.apply_cpu_flags()` is what adds
the XLA:CPU flags, on request."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from jax_models.xla_flags import YNN_FLAG

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("twin_models", "jax_models", "torch_reference", "bridge", "train", "benchmarks")
# What the source tree holds besides the packages (never copied for the build).
NOT_SOURCE = (".venv", ".git", ".jax_cache", "build", "*.egg-info", "__pycache__", ".pytest_cache", "runs")


def run(cmd, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (f"{' '.join(map(str, cmd))} exited {out.returncode}:\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def clean_env(**extra) -> dict:
    """This process's environment without what the test suite sets for itself (conftest's
    XLA_FLAGS) or what would put the checkout on the path, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH", "PYTHONHOME")}
    return {**env, **extra}


# -- A: a non-editable install beside another distribution -------------------------------------------

OTHER_PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "other-tokenizer-presets"
version = "1.0"

[tool.setuptools]
packages = ["tokenizer", "presets"]
"""

# Imports every module of the packages named in sys.argv[1] (comma-separated), in `modules`.
IMPORT_ALL = """\
modules = []
for name in sys.argv[1].split(","):
    package = importlib.import_module(name)
    modules.append(name)
    for info in pkgutil.walk_packages(package.__path__, name + "."):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            importlib.import_module(info.name)
            modules.append(info.name)
"""

INSTALLED_CHECK = """\
import importlib, importlib.util, json, pkgutil, sys

import numpy as np
import torch

import bridge, jax_models, torch_reference
import presets, tokenizer
from bridge.verify import FORWARD_TOL
from twin_models.presets import example_inputs, get_preset

""" + IMPORT_ALL + """
preset = get_preset("vit-digits")
(images,) = example_inputs(preset, 2, 0)
torch_model = torch_reference.create_model("vit-digits").eval()
flax_model = jax_models.create_model("vit-digits")
variables = bridge.torch_to_flax(torch_model.state_dict(), flax_model, images)
with torch.no_grad():
    ref = torch_model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).numpy()
got = np.asarray(flax_model.apply(variables, images))
print(json.dumps({
    "modules": modules,
    "files": {m.__name__: m.__file__ for m in (bridge, jax_models, torch_reference, presets, tokenizer)},
    "owners": [presets.OWNER, tokenizer.OWNER],
    "parity_tests": importlib.util.find_spec("parity_tests") is not None,
    "shapes": [list(ref.shape), list(got.shape)],
    "rel_err": float(np.max(np.abs(ref - got)) / np.max(np.abs(ref))),
    "tol": FORWARD_TOL,
}))
"""


def make_venv(path: Path) -> Path:
    """A virtual environment at `path` from the base interpreter, without pip: its python, whose
    site-packages has a .pth naming this environment's site-packages (its dependencies, pip and
    setuptools, offline; the .pth files in that folder, among them the editable install's, are not
    processed)."""
    run([sys._base_executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent)
    python = path / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=path.parent).stdout.strip())
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def pip_install(python: Path, source: Path, cwd: Path):
    """`pip install` of a local source tree, offline, into `python`'s environment; --ignore-installed
    so that pip never touches the project's editable install, which it sees through the .pth."""
    return run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                "--ignore-installed", "--disable-pip-version-check", str(source)], cwd=cwd)


def installed_dist(site: Path, name: str) -> Path:
    (dist,) = site.glob(f"{name}-*.dist-info")
    return dist


def test_non_editable_install_beside_a_distribution_owning_tokenizer_and_presets(tmp_path):
    """A fresh environment holding a distribution that owns `tokenizer` and `presets` (as ones on
    the package index do), then this project, built from a copy of the checkout and installed
    non-editable: both keep their packages; from another folder the CLIs answer, every module
    imports, and vit-digits built in both backends agrees through the bridge."""
    start = time.perf_counter()
    python = make_venv(tmp_path / "venv")
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).stdout.strip())
    run([python, "-c", "import setuptools, pip, jax, torch"], cwd=tmp_path)

    other = tmp_path / "other"
    for package in ("tokenizer", "presets"):
        (other / package).mkdir(parents=True)
        (other / package / "__init__.py").write_text('OWNER = "other-tokenizer-presets"\n')
    (other / "pyproject.toml").write_text(OTHER_PYPROJECT)
    pip_install(python, other, tmp_path)

    # The build writes build/ and *.egg-info into its source tree: build a copy, not the checkout.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    pip_install(python, source, tmp_path)
    built = time.perf_counter() - start

    dist = installed_dist(site, "twin_models")
    assert set((dist / "top_level.txt").read_text().split()) == set(PACKAGES)
    record = {line.split(",")[0] for line in (dist / "RECORD").read_text().splitlines()}
    tops = {p.split("/")[0] for p in record} - {dist.name, "..", "__pycache__"}
    assert tops == set(PACKAGES), f"installed top-level names: {sorted(tops)}"
    sources = {str(p.relative_to(source)) for name in PACKAGES for p in (source / name).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert sources <= record, f"modules of the checkout not installed: {sorted(sources - record)}"
    other_record = (installed_dist(site, "other_tokenizer_presets") / "RECORD").read_text()
    assert "tokenizer/__init__.py" in other_record and "presets/__init__.py" in other_record

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = clean_env()
    for cli in ("train", "bridge"):
        assert "usage: python -m " + cli in run([python, "-m", cli, "--help"], cwd=work, env=env).stdout
    (work / "check.py").write_text(INSTALLED_CHECK)
    out = json.loads(run([python, "check.py", ",".join(PACKAGES)], cwd=work, env=env).stdout.splitlines()[-1])
    for name, path in out["files"].items():
        assert Path(path).is_relative_to(site), f"{name} imported from {path}, not the new environment"
    assert out["owners"] == ["other-tokenizer-presets"] * 2
    assert not out["parity_tests"], "parity_tests is importable from outside the checkout"
    assert {"train.tasks", "bridge.maps", "twin_models.presets", "twin_models.tokenizer"} <= set(out["modules"])
    assert out["shapes"] == [[2, 10], [2, 10]]
    assert out["rel_err"] <= out["tol"], f"vit-digits: installed Flax vs torch rel err {out['rel_err']:.2e}"
    print(f"build and install {built:.1f} s, total {time.perf_counter() - start:.1f} s")


# -- B: importing changes nothing ----------------------------------------------------------------------

# The frameworks, and the other dependencies the modules import at the top, imported before the
# first snapshot: what they change on their own import is theirs. (scikit-learn, which sets
# KMP_DUPLICATE_LIB_OK and KMP_INIT_AT_FORK in os.environ, is imported on first use only, so it is
# not among them: importing the project must not set those.)
DEPENDENCIES = ("jax", "flax", "optax", "orbax.checkpoint", "torch", "numpy", "safetensors", "PIL", "tqdm")

SNAPSHOT = """\
import importlib, json, logging, os, pkgutil, sys, warnings

for dependency in sys.argv[2].split(","):
    importlib.import_module(dependency)

import numpy as np
import jax
import torch
from jax._src import xla_bridge


def snapshot():
    return {
        "os.environ": dict(os.environ),
        "jax.config": {k: repr(v) for k, v in jax.config.values.items()},
        "jax backend started": xla_bridge.backends_are_initialized(),
        "torch": {
            "num_threads": torch.get_num_threads(),
            "mha fastpath": torch.backends.mha.get_fastpath_enabled(),
            "default dtype": str(torch.get_default_dtype()),
            "float32 matmul precision": torch.get_float32_matmul_precision(),
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
            "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
            "grad enabled": torch.is_grad_enabled(),
            "initial seed": torch.initial_seed(),
            "rng state": torch.get_rng_state().tolist(),
        },
        "numpy random state": np.random.get_state()[1].tolist(),
        "logging root": [logging.root.level, [repr(h) for h in logging.root.handlers]],
        "warnings filters": [repr(f) for f in warnings.filters],
        "sys.path": list(sys.path),
    }


before = snapshot()
""" + IMPORT_ALL + """after = snapshot()
print(json.dumps({"before": before, "after": after, "modules": modules,
                  "files": {m: sys.modules[m].__file__ for m in sys.argv[1].split(",")}}))
"""


def _differences(before: dict, after: dict) -> list[str]:
    out = []
    for section in before:
        b, a = before[section], after[section]
        if isinstance(b, dict):
            for key in sorted(set(b) | set(a)):
                if b.get(key, "<unset>") != a.get(key, "<unset>"):
                    out.append(f"{section}[{key!r}]: " + ("changed" if key == "rng state" else
                                                           f"{repr(b.get(key, '<unset>'))[:200]} -> "
                                                           f"{repr(a.get(key, '<unset>'))[:200]}"))
        elif b != a:
            out.append(f"{section}: " + ("changed" if section.endswith("random state") else
                                         f"{repr(b)[:300]} -> {repr(a)[:300]}"))
    return out


def test_importing_every_module_changes_nothing(tmp_path):
    """A fresh interpreter started outside the checkout (which comes in on PYTHONPATH), XLA_FLAGS
    unset: import the dependencies, snapshot, import every module of the six packages (`__main__`
    aside), snapshot again."""
    out = run([sys.executable, "-c", SNAPSHOT, ",".join(PACKAGES), ",".join(DEPENDENCIES)], cwd=tmp_path,
              env=clean_env(PYTHONPATH=str(REPO)))
    result = json.loads(out.stdout.splitlines()[-1])
    for name, path in result["files"].items():
        assert Path(path).is_relative_to(REPO), f"{name} from {path}, not this checkout"
    modules = result["modules"]
    assert len(modules) > 40 and "train.tasks.diffusion" in modules and "bridge.maps.timm" in modules, modules
    changed = _differences(result["before"], result["after"])
    assert not changed, ("importing the project changed:\n  " + "\n  ".join(changed)
                         + f"\nmodules imported ({len(modules)}): {', '.join(modules)}")
    assert "XLA_FLAGS" not in result["after"]["os.environ"]
    assert not result["after"]["jax backend started"]


APPLY_FLAGS = """\
import json, os

import jax_models
from jax_models.xla_flags import CPU_FLAGS, YNN_FLAG

out = {"cpu_flags": list(CPU_FLAGS)}
os.environ.pop("XLA_FLAGS", None)
out["unset"] = [jax_models.apply_cpu_flags(), os.environ.get("XLA_FLAGS")]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
out["again"] = [jax_models.apply_cpu_flags(), jax_models.apply_cpu_flags(), os.environ["XLA_FLAGS"]]
mine = f"--{YNN_FLAG}=individual_dot,individual_convolution"
os.environ["XLA_FLAGS"] = mine
out["user's own"] = [jax_models.apply_cpu_flags(), os.environ["XLA_FLAGS"]]

os.environ["XLA_FLAGS"] = out["again"][2]
import jax
import jax.numpy as jnp

out["devices"] = jax.device_count()
out["sum"] = float(jnp.ones(3).sum())
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
out["after start"] = [jax_models.apply_cpu_flags(), os.environ["XLA_FLAGS"]]
print(json.dumps(out))
"""


def test_apply_cpu_flags_adds_its_flags_before_jax_starts_and_only_then(tmp_path):
    """The documented call adds `CPU_FLAGS` to XLA_FLAGS (set or not, once), keeps the user's own
    flags and their own YNNPACK choice; XLA accepts the result; once JAX's backend has started it
    changes nothing."""
    out = run([sys.executable, "-c", APPLY_FLAGS], cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)))
    out = json.loads(out.stdout.splitlines()[-1])
    flags = out["cpu_flags"]
    assert flags, "CPU_FLAGS is empty"
    assert out["unset"] == [flags, " ".join(flags)]
    assert out["again"] == [flags, [], " ".join([*flags, "--xla_force_host_platform_device_count=2"])]
    assert out["user's own"] == [[], f"--{YNN_FLAG}=individual_dot,individual_convolution"]
    assert out["devices"] == 2 and out["sum"] == 3.0
    assert out["after start"] == [[], "--xla_force_host_platform_device_count=2"]
