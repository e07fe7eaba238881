"""The commands and examples of the README and of docs/ run against the code, so the pages cannot
drift from it.

From every fenced block of README.md, CONTRIBUTING.md, benchmarks/RESULTS.md and docs/*.md:

- each shell line (`bash`, `sh`, `shell`, `console`) that runs one of the project's CLIs
  (`python -m train`, `python -m bridge ...`, `python -m benchmarks...`) is parsed by that CLI's
  own parser with its exact arguments (the presets, `--set` and `--recipe` keys, `bridge import`
  architectures checked too), and run with `--help` appended in a subprocess (as `python -m`
  runs it, through `runpy`; all the lines in one process, so that jax and torch load once); the
  README's one-device `vit-digits` training commands (JAX and torch) and its `bridge verify
  vit-digits` also run for real, in-process, at a tiny size. `make TARGET` must be a Makefile target, `bash FILE` an existing file, `pip` lines are
  left alone, and any other command fails the test;
- each `python` block is executed from a temporary directory (in two subprocesses that share the
  blocks, one fresh namespace and directory each, in page order, with a plain environment: one CPU
  device, no XLA flags but those a block applies itself).

The subprocesses start with the first test and run beside the in-process checks.

A block the page marks with `<!-- skip-test: why -->` on the line before it is skipped (only a
few may be). Each block is its own test id, `page:line`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

# One xdist worker runs the whole file: its two subprocesses are shared by its tests.
pytestmark = pytest.mark.xdist_group(name="docs")

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "RESULTS.md",
         ROOT / "benchmarks" / "HISTORY.md",
         *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
PYTHON_LANGS = {"python", "py"}
CLI_MODULES = ("train", "bridge", "benchmarks", "benchmarks.sampling", "benchmarks.generation",
               "benchmarks.parallel")
MAX_SKIPPED = 4                 # blocks a page may mark `skip-test` (each needs a file made elsewhere)
SKIP_MARK = re.compile(r"<!--\s*skip-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```+\s*([\w+-]*)\s*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Placeholders a page may write in a command; replaced before the command is checked.
PLACEHOLDERS = {"PRESET": "vit-digits", "N": "2", "I": "0"}
HELP_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "TF_CPP_MIN_LOG_LEVEL": "3"}
# What `--steps ...` is appended to when a README training command runs for real.
TINY_RUN = ["--steps", "2", "--batch-size", "16", "--log-every", "1", "--no-progress",
            "--set", "depth=1", "--set", "embed_dim=16", "--set", "num_heads=2"]
# A README vit-digits training line with no options but these runs for real: one device, either
# backend (the pmap and mesh lines are parsed and --help'd; test_parallel.py runs those steps).
REAL_RUN_OPTIONS = {"--backend"}


@dataclasses.dataclass(frozen=True)
class Block:
    page: str          # relative to the repository root
    line: int          # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None   # the page's reason, when marked skip-test

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Command:
    """One shell line: its environment assignments and its words."""
    env: tuple[tuple[str, str], ...]
    words: tuple[str, ...]
    text: str

    @property
    def cli(self) -> tuple[str, list[str]] | None:
        """(module, arguments) when it runs `python -m MODULE` of the project."""
        w = self.words
        if len(w) >= 3 and w[0] in ("python", "python3") and w[1] == "-m" and w[2] in CLI_MODULES:
            return w[2], [PLACEHOLDERS.get(a, a) for a in w[3:]]
        return None


def extract_blocks(text: str, page: str) -> list[Block]:
    """The fenced blocks of a markdown text, with the skip-test reason of the line before each."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2).lower(), i
        body = []
        i += 1
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = SKIP_MARK.search(previous)
        blocks.append(Block(page, start + 1, lang, "\n".join(body) + "\n", mark.group(1) if mark else None))
        i += 1
    return blocks


def shell_commands(code: str, console: bool = False) -> list[Command]:
    """The command lines of a shell block: continuations joined, comments and prompts dropped."""
    joined, pending = [], ""
    for raw in code.splitlines():
        line = raw.rstrip()
        if console:
            if not line.startswith("$ ") and not pending:
                continue   # output, not a command
            line = line[2:] if line.startswith("$ ") else line
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    out = []
    for line in joined:
        words = shlex.split(line, comments=True)
        env = []
        while words and ENV_ASSIGNMENT.match(words[0]):
            key, _, value = words.pop(0).partition("=")
            env.append((key, value))
        if words:
            out.append(Command(tuple(env), tuple(words), line.split(" #")[0].strip()))
    return out


def all_blocks() -> list[Block]:
    return [b for page in PAGES
            for b in extract_blocks(page.read_text(), str(page.relative_to(ROOT)))]


BLOCKS = all_blocks()
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELL_LANGS]
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang in PYTHON_LANGS]


# ---------------------------------------------------------------------------------------------
# Parsing a CLI's arguments with its own parser


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


@contextlib.contextmanager
def _stop_after_parsing():
    """`ArgumentParser.parse_args` parses, then raises `_Parsed(namespace)`: a CLI's `main(argv)`
    checks its arguments and stops before doing anything."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def _parse_with_main(main, args: list[str]) -> argparse.Namespace:
    with _stop_after_parsing():
        try:
            main(args)
        except _Parsed as parsed:
            return parsed.namespace
    raise AssertionError("the CLI's main() returned without parsing its arguments")


def _pairs(items) -> dict[str, str]:
    return dict(item.partition("=")[::2] for item in items or ())


def check_cli(module: str, args: list[str]) -> list[str]:
    """The problems with `python -m MODULE ARGS` as the CLI's own parser and the project's tables
    see them; [] when it parses and names what exists."""
    from twin_models.presets import PRESETS

    problems = []
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            if module == "train" and args[:1] == ["plot"]:
                from train.curves import main as plot

                ns = _parse_with_main(plot, args[1:])
            elif module == "train":
                from train.__main__ import parse_args
                from train.settings import check_config, config_from_args

                ns = parse_args(args)
                check_config(config_from_args(ns))
            elif module == "benchmarks":
                from benchmarks.harness import parse_args

                ns = parse_args(args)
            else:
                main = importlib.import_module("bridge.__main__" if module == "bridge" else module).main
                ns = _parse_with_main(main, args)
    except SystemExit as e:
        if e.code not in (0, None):
            return [f"the parser refused it (exit {e.code}): {stderr.getvalue().strip() or e}"]
        return ["the parser exited without parsing (--help?)"]
    except ValueError as e:      # train.settings.check_config
        return [f"refused: {e}"]

    def need_preset(name, task=None):
        if name not in PRESETS:
            problems.append(f"unknown preset {name!r}")
        elif task and PRESETS[name].task != task:
            problems.append(f"preset {name!r} is a {PRESETS[name].task} preset, not {task}")

    if module == "train" and args[:1] == ["plot"]:
        pass
    elif module == "train":
        need_preset(ns.preset)
        if ns.preset in PRESETS:
            preset = PRESETS[ns.preset]
            for key in _pairs(ns.model_overrides):
                if key not in preset.kwargs:
                    problems.append(f"--set {key}: not a constructor argument of {ns.preset}")
            for key in _pairs(ns.recipe_overrides):
                if key not in preset.train:
                    problems.append(f"--recipe {key}: not a recipe key of {ns.preset}")
    elif module == "bridge" and ns.command == "verify" and ns.all:
        from bridge.report import select
        if not select(ns.preset_glob, ns.full):
            problems.append(f"--preset {ns.preset_glob!r} matches no preset")
    elif module == "bridge" and ns.command == "verify":
        need_preset(ns.preset)
    elif module == "bridge" and ns.command == "import":
        from bridge.imports import find_map
        try:
            find_map(ns.library, ns.arch)
        except ValueError as e:
            problems.append(str(e))
    elif module == "benchmarks.sampling":
        need_preset(ns.preset, "diffusion")
    elif module == "benchmarks.generation":
        need_preset(ns.preset, "captioning")
    elif module == "benchmarks.parallel":
        need_preset(ns.preset)
    return problems


# Runs `python -m MODULE ARGS --help` for each CLI line, as `-m` does (`runpy.run_module`), all in
# one subprocess so that jax and torch are imported once; one JSON line per line of the pages.
HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys
lines_file, results_file = sys.argv[1:3]
environ = dict(os.environ)
for line in json.load(open(lines_file)):
    os.environ.clear()
    os.environ.update({**environ, **line["env"]})
    sys.argv = ["python -m " + line["module"], *line["args"], "--help"]
    out, err, code = io.StringIO(), io.StringIO(), None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_module(line["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    except BaseException as e:
        code = repr(e)
    with open(results_file, "a") as f:
        f.write(json.dumps({"key": line["key"], "code": code, "usage": out.getvalue().startswith("usage:"),
                            "stdout": out.getvalue()[-2000:], "stderr": err.getvalue()[-2000:]}) + "\n")
"""


def _help_key(module: str, args, env) -> str:
    return json.dumps([module, list(args), sorted(env)])


class Background:
    """A subprocess started now and read when a test first needs it."""

    def __init__(self, argv: list[str], results: Path, env: dict, cwd: Path):
        self.results, self.start = results, time.time()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._done = None

    def wait(self, timeout: float = 600) -> dict:
        if self._done is None:
            try:
                _, stderr = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                _, stderr = self.proc.communicate()
            lines = self.results.read_text().splitlines() if self.results.exists() else []
            self._done = {r.get("key", r.get("id")): r for r in map(json.loads, lines)}
            self._done["_runner"] = {"returncode": self.proc.returncode, "stderr": stderr[-3000:],
                                     "seconds": round(time.time() - self.start, 1)}
        return self._done


def help_problem(results: dict, module: str, args, env) -> str:
    """'' when `python -m MODULE ARGS --help` printed a usage and exited 0."""
    r = results.get(_help_key(module, args, env))
    if r is None:
        runner = results["_runner"]
        return f"--help never ran: the runner exited {runner['returncode']}: {runner['stderr']}"
    if r["code"] not in (0, None) or not r["usage"]:
        return f"--help exited {r['code']}: {(r['stderr'] or r['stdout'])[-2000:]}"
    return ""


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, re.M))


def check_command(command: Command, help_results: dict | None = None) -> list[str]:
    """Every problem of one shell line (not counting a real run); with `help_results`, also its
    `--help` run."""
    cli = command.cli
    w = command.words
    if cli:
        module, args = cli
        problems = check_cli(module, args)
        problem = help_problem(help_results, module, args, command.env) if help_results is not None else ""
        return problems + ([problem] if problem else [])
    if w[0] == "make":
        missing = [t for t in w[1:] if "=" not in t and t not in make_targets()]
        return [f"no Makefile target {t!r}" for t in missing]
    if w[0] == "bash":
        return [] if (ROOT / w[1]).is_file() else [f"no file {w[1]}"]
    if w[0] in ("pip", "pip3") or w[:3] in (("python", "-m", "pip"), ("python3", "-m", "pip")):
        return []
    return [f"not a command this test knows how to check: {command.text!r}"]


def real_run(command: Command, page: str) -> list[str] | None:
    """The in-process argv of a README command cheap enough to run for real (a vit-digits training
    on one device, `bridge verify vit-digits`), else None."""
    cli = command.cli
    if page != "README.md" or not cli or command.env:
        return None
    module, args = cli
    options = {a for a in args if a.startswith("--")}
    if module == "train" and args[:1] == ["vit-digits"] and options <= REAL_RUN_OPTIONS:
        return args
    if module == "bridge" and args == ["verify", "vit-digits"]:
        return args
    return None


# ---------------------------------------------------------------------------------------------
# The tests


# Executes python blocks in one subprocess (page order, except that a block calling
# `apply_cpu_flags` runs first, before any JAX computation, as it asks), each in a fresh namespace
# and temporary directory; one JSON line per block. JAX's persistent compilation cache is the test
# suite's, for every program, so that the examples' compiles are paid once.
RUNNER = r"""
import contextlib, io, json, os, sys, tempfile, time, traceback
blocks_file, results_file, cache = sys.argv[1:4]
import jax   # importing does not start the backend
jax.config.update("jax_compilation_cache_dir", cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
for block in json.load(open(blocks_file)):
    os.chdir(tempfile.mkdtemp(prefix="doc-example-"))
    out, start, result = io.StringIO(), time.time(), {"id": block["id"], "ok": True}
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(block["code"], block["id"], "exec"), {"__name__": "__main__"})
    except BaseException:
        result.update(ok=False, error=traceback.format_exc())
    result.update(seconds=round(time.time() - start, 1), output=out.getvalue()[-2000:])
    with open(results_file, "a") as f:
        f.write(json.dumps(result) + "\n")
"""


EXAMPLE_RUNNERS = 2   # subprocesses sharing the python blocks: a cold compile cache makes them slow


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    """The subprocesses, started together before the first test so that they overlap with the
    in-process checks: the python blocks (split over `EXAMPLE_RUNNERS`), and the CLI lines with
    `--help`."""
    work = tmp_path_factory.mktemp("docs")
    blocks = sorted((b for b in PYTHON_BLOCKS if not b.skip), key=lambda b: "apply_cpu_flags" not in b.code)
    user_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # a user's plain environment
    # one torch thread: on a shared machine torch's two OpenMP threads can wait on each other
    user_env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1")
    examples = {}
    for n in range(EXAMPLE_RUNNERS):
        share = blocks[n::EXAMPLE_RUNNERS]
        (work / f"blocks{n}.json").write_text(json.dumps([{"id": b.id, "code": b.code} for b in share]))
        run = Background([sys.executable, "-c", RUNNER, str(work / f"blocks{n}.json"),
                          str(work / f"examples{n}.jsonl"), str(ROOT / ".jax_cache")],
                         work / f"examples{n}.jsonl", user_env, work)
        examples.update({b.id: run for b in share})

    lines = {}
    for block in SHELL_BLOCKS:
        for command in ([] if block.skip else shell_commands(block.code, console=block.lang == "console")):
            if command.cli:
                module, args = command.cli
                key = _help_key(module, args, command.env)
                lines[key] = {"key": key, "module": module, "args": args, "env": {**HELP_ENV, **dict(command.env)}}
    (work / "lines.json").write_text(json.dumps(list(lines.values())))
    helps = Background([sys.executable, "-c", HELP_RUNNER, str(work / "lines.json"), str(work / "helps.jsonl")],
                       work / "helps.jsonl", {**user_env, **HELP_ENV}, work)
    yield {"examples": examples, "helps": helps}
    for run in {*examples.values(), helps}:
        if run.proc.poll() is None:
            run.proc.kill()


@pytest.fixture(scope="module", autouse=True)
def _start_background(background):
    """Start the subprocesses with the module's first test."""


def test_the_pages_have_blocks_to_check():
    assert (ROOT / "README.md").stat().st_size <= 15_000, "the README is meant to be read in minutes"
    readme = [b.code.split() for b in SHELL_BLOCKS if b.page == "README.md"]
    assert ["make", "train", "make", "test"] in readme, "the README's two commands, exactly"
    real = [c.text for b in SHELL_BLOCKS for c in shell_commands(b.code) if real_run(c, b.page)]
    assert len(real) >= 3, f"the README's commands that run for real: {real}"
    counted = {p: sum(b.page == p for b in BLOCKS) for p in ("README.md", "docs/training.md")}
    assert all(counted.values()), counted
    assert len(SHELL_BLOCKS) >= 10 and len(PYTHON_BLOCKS) >= 8, (len(SHELL_BLOCKS), len(PYTHON_BLOCKS))


def test_only_a_few_blocks_are_skipped():
    skipped = [b for b in BLOCKS if b.skip and b.lang in SHELL_LANGS | PYTHON_LANGS]
    for b in skipped:
        print(f"skipped {b.id}: {b.skip}")
    assert len(skipped) <= MAX_SKIPPED, [b.id for b in skipped]


def test_the_checker_fails_on_a_mistake():
    """A test must be able to fail: a made-up flag, an unknown preset, an unknown architecture, a
    failed --help, a command it does not know."""
    def problems(line):
        (command,) = shell_commands(line)
        module, args = command.cli
        return check_cli(module, args)

    assert any("--no-such-flag" in p for p in problems("python -m train vit-digits --no-such-flag"))
    assert problems("python -m train no-such-preset") == ["unknown preset 'no-such-preset'"]
    assert problems("python -m train vit-digits --recipe no_such_key=1")
    assert problems("python -m train vit-digits --fsdp")
    assert problems("python -m bridge verify no-such-preset")
    assert problems("python -m bridge verify --all --preset 'no-such-*'")
    assert problems("python -m train plot")
    assert problems("python -m bridge import --from timm --arch no_such_arch m.safetensors --out x")
    assert problems("python -m benchmarks --preset vit-digits --frameworks jax,no-such")
    assert problems("python -m benchmarks.sampling --preset vit-digits")
    assert problems("python -m train vit-digits --parallel mesh --fsdp") == []
    assert check_command(shell_commands("make no-such-target")[0])
    assert check_command(shell_commands("frobnicate --now")[0])
    failed = {_help_key("train", [], ()): {"code": 2, "usage": False, "stdout": "", "stderr": "error"}}
    assert help_problem(failed, "train", [], ())


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.id)
def test_shell_block(block, background, tmp_path, capsys):
    if block.skip:
        pytest.skip(block.skip)
    commands = shell_commands(block.code, console=block.lang == "console")
    assert commands, f"{block.id}: a shell block without a command"
    problems = []
    for command in commands:
        problems += [f"{command.text}: {p}" for p in check_command(command)]
    assert not problems, "\n".join(problems)

    for n, command in enumerate(commands):
        argv = real_run(command, block.page)
        if argv is None:
            continue
        workdir = tmp_path / f"run{n}"
        if argv[0] == "verify":
            from bridge.__main__ import main
            rc = main(argv)
            assert rc == 0 and "PASS" in capsys.readouterr().out, f"{command.text}: exit {rc}"
        else:
            from train.__main__ import main
            rc = main([*argv, *TINY_RUN, "--workdir", str(workdir)])
            assert rc == 0, f"{command.text}: exit {rc}"
            summary = json.loads((workdir / "summary.json").read_text())
            assert summary["steps"] == 2, summary

    helps = background["helps"].wait()
    problems = [f"{c.text}: {p}" for c in commands if c.cli
                for p in [help_problem(helps, *c.cli, c.env)] if p]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.id)
def test_python_block(block, background):
    if block.skip:
        pytest.skip(block.skip)
    results = background["examples"][block.id].wait()
    result, runner = results.get(block.id), results["_runner"]
    assert result is not None, f"{block.id} never ran: the runner exited {runner['returncode']}\n{runner['stderr']}"
    print(f"{block.id}: {result['seconds']} s\n{result['output']}")
    assert result["ok"], f"{block.id} failed:\n{result['error']}\n{result['output']}"


# ---------------------------------------------------------------------------------------------
# Links between the pages


def _slug(heading: str) -> str:
    text = re.sub(r"[`*_]|<[^>]+>", "", heading).strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def _anchors(path: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", path.read_text(), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    """Every relative link of a page names an existing file, and an anchor of a markdown page one
    of its headings. The pages stand alone: no notes outside the repository."""
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"", text):
        target = next(t for t in target if t)
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, broken
    for word in ("DESIGN.md", "STYLE.md", "../shared"):
        assert word not in text, f"{page.name} mentions {word}"
