"""`python -m benchmarks --preset P --breakdown`: where one training step's time goes, per layer
kind of our own modules, JAX (XLA) beside eager torch, from each framework's own profiler.

The step is the harness's (`benchmarks.workloads.build_workload(..., "train")`): after the first
call and `--warmup` steps, `--repeats` un-profiled steps give each framework's median, then
`--repeats` more run under the profiler.

- JAX: `jax.profiler.trace` (perfetto JSON); each XLA:CPU thunk event of the step's executable
  (the outermost on its thread, so a `while` counts once with its body) is an HLO instruction,
  whose `metadata={op_name=...}` in the compiled HLO text carries Flax's module path
  (`jvp(VisionTransformer)/blocks_0/attn/...`; `transpose(jvp(...))` is the backward). Ops under
  `jvp` outside any module kind (the loss) are "rest"; ops outside `jvp` are the update (optax's
  AdamW, the global-norm clipping, DDPM's EMA), except the step's random-key handling ("rest").
- torch: `torch.profiler` (CPU); forward pre/post hooks open and close a `record_function` range
  around the outermost module of each kind, and the optimizer's step pre/post hooks one around
  `optimizer.step`. Each aten op not nested in another aten op goes to the innermost range it
  lies in. Backward ops go by autograd's `sequence_nr`: each backward node
  (`autograd::engine::evaluate_function: XBackward0`) carries the number of the forward op that
  made it, whose range gives the kind. Full backward hooks were not used: on a module whose
  inputs need no gradient (the patch embedding, over the image) they fire before its weight
  gradients are computed. After the step's last backward node, everything (clipping, AdamW,
  CLIP's clamp, DDPM's EMA) is the update, as in JAX; before it, outside every range, "rest".

Layer kinds come from one table of module names and torch classes (`module_kinds`, read off the
torch twin), matched by name in both frameworks (torch `blocks.0.attn` is Flax `blocks_0/attn`):
the outermost module of a kind owns everything inside it (DDPM's attention block, GroupNorm and
all, is "attention").
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

KINDS = ("patch embedding", "attention", "MLP", "norms", "convolutions")
ROWS = tuple(f"{k} {d}" for k in KINDS for d in ("forward", "backward")) + ("optimizer update", "rest")
FRAMEWORKS = ("jax", "torch")

# (last name component, torch class name) -> kind; names first, classes for unnamed ones
_BY_NAME = (
    (r"patch_embed(ding)?s?|embeddings", "patch embedding"),
    (r"(self_|cross_|window_)?attn|(self_|cross_|window_)?attention|image_to_text|text_to_image",
     "attention"),
    (r"mlp|ffn|feed_forward|linear[12]", "MLP"),
)
_BY_CLASS = (
    (r"PatchEmbed\w*", "patch embedding"),
    (r"\w*Attention\w*", "attention"),
    (r"Mlp|MLP|FeedForward", "MLP"),
    (r"\w*Norm(\dd)?", "norms"),
    (r"Conv(Transpose)?\dd", "convolutions"),
)
_BY_NAME_ONLY = (   # without a torch class to go by (a path alone)
    (r"norm\d*|norm_\w+|ln_\w+|ln\d*|\w+_norm", "norms"),
    (r"conv\w*|\w+_conv", "convolutions"),
)


def layer_kind(name: str, class_name: str | None = None) -> str | None:
    """The kind of a module from its own name (the last component) and, where known, its torch
    class; None for a module of no kind (a block, a head, an activation)."""
    if class_name in ("Identity", "Dropout", "Sequential", "ModuleList"):
        return None
    for pattern, kind in _BY_NAME:
        if re.fullmatch(pattern, name):
            return kind
    for pattern, kind in (_BY_CLASS if class_name else _BY_NAME_ONLY):
        if re.fullmatch(pattern, class_name or name):
            return kind
    return None


def canonical(path: str) -> str:
    """A module path both frameworks spell the same: `blocks.0.attn`, `blocks_0/attn` and
    DDPM's `encoder_0_1` / `encoder.0.1` all become dot-separated."""
    return re.sub(r"[._/]", ".", path)


def module_kinds(model) -> dict[str, str]:
    """canonical module path -> kind, for every module of the torch twin that has one."""
    return {canonical(n): k for n, m in model.named_modules() if n
            for k in [layer_kind(n.rsplit(".", 1)[-1], type(m).__name__)] if k}


def path_kind(path: str, kinds: dict[str, str] | None = None) -> str | None:
    """The kind of the outermost module of a kind on `path` (a module path in either spelling);
    `kinds` from `module_kinds`, or None to go by names alone."""
    parts = canonical(path).split(".")
    if kinds is not None:
        for i in range(1, len(parts) + 1):
            kind = kinds.get(".".join(parts[:i]))
            if kind:
                return kind
        return None
    for part in re.split(r"[./]", path):
        kind = layer_kind(part)
        if kind:
            return kind
    return None


# ---------------------------------------------------------------------------------------------
# JAX


def jax_row(op_name: str | None, kinds: dict[str, str] | None = None) -> str:
    """The row of an HLO instruction from its `op_name` metadata (see the module docstring)."""
    if not op_name:
        return "rest"
    parts = op_name.split(";")[0].split("/")
    at = next((i for i, p in enumerate(parts) if p.startswith(("jvp(", "transpose(jvp("))), None)
    if at is None:
        return "rest" if re.search(r"threefry|random_|^batch\[", op_name) else "optimizer update"
    direction = "backward" if parts[at].startswith("transpose(") else "forward"
    path = [p for p in parts[at + 1:-1] if "(" not in p and "." not in p]
    kind = path_kind("/".join(path), kinds) if path else None
    return f"{kind} {direction}" if kind else "rest"


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$", re.M)
_OP_NAME = re.compile(r'\bop_name="((?:[^"\\]|\\.)*)"')
_SUBCOMPUTATION = re.compile(r"\b(calls|to_apply|body|condition|branch_computations)=\{?[%\w.\-, ]*\}?")


def hlo_op_names(hlo_text: str) -> tuple[str, dict[str, str]]:
    """The module name and instruction name -> `op_name` of an HLO module's text. An instruction
    XLA made without metadata (a copy, the reduce-window of a split reduction) takes its
    operands': the first that comes from the program (an op_name with a path), else the first
    (a parameter's). A convolution or dot XLA rewrote has none ("rest"): its operands do not say
    whose it is."""
    module = re.search(r"HloModule ([^\s,]+)", hlo_text)
    if not module:
        raise ValueError("not HLO text: no `HloModule` line")
    names, operands = {}, {}
    for m in _INSTRUCTION.finditer(hlo_text):
        rhs = m.group(2)
        op_name = _OP_NAME.search(rhs)
        if op_name:
            names[m.group(1)] = op_name.group(1)
        else:
            operands[m.group(1)] = re.findall(r"%([\w.\-]+)", _SUBCOMPUTATION.sub("", rhs.split("metadata=")[0]))
    inherited = {}
    for name in operands:
        if name.startswith(("convolution", "dot", "custom-call")):
            continue
        seen, todo, found = set(), list(operands[name]), []
        while todo and not any("/" in f for f in found):
            op = todo.pop(0)
            if op in names:
                found.append(names[op])
            elif op not in seen:
                seen.add(op)
                todo += operands.get(op, [])
        if found:
            inherited[name] = next((f for f in found if "/" in f), found[0])
    return module.group(1), {**names, **inherited}


def xla_op_times(trace_dir: str, module: str) -> dict[str, float]:
    """Microseconds per HLO instruction of `module` in a perfetto trace under `trace_dir`,
    counting only the outermost thunk event on each thread (a `while` holds its body's)."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        raise RuntimeError(f"jax.profiler.trace wrote no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_thread: dict = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and args.get("hlo_module") == module and args.get("hlo_op"):
            by_thread.setdefault(e.get("tid"), []).append((float(e["ts"]), float(e["dur"]), args["hlo_op"]))
    times: dict[str, float] = {}
    for evs in by_thread.values():
        end = float("-inf")
        for ts, dur, op in sorted(evs, key=lambda x: (x[0], -x[1])):
            if ts >= end:
                times[op] = times.get(op, 0.0) + dur
                end = ts + dur
            elif ts + dur > end:      # overlapping, not nested: count the part outside
                times[op] = times.get(op, 0.0) + ts + dur - end
                end = ts + dur
    if not times:
        raise RuntimeError(f"the JAX trace has no thunk events of {module}; was the step run "
                           f"inside jax.profiler.trace?")
    return times


def profile_jax(workload, kinds: dict[str, str], warmup: int, repeats: int) -> dict:
    """Median un-profiled step, then `repeats` profiled steps: ms per row per step."""
    import jax

    runner = workload.runner("jax")
    runner.first()
    for _ in range(warmup):
        runner.step()
    median = _median_step(runner.step, repeats)
    module, op_names = hlo_op_names(runner.info["compiled"].as_text())
    with tempfile.TemporaryDirectory(prefix="breakdown-") as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(repeats):
                runner.step()
            wall = (time.perf_counter() - t0) / repeats
        times = xla_op_times(d, module)
    rows = dict.fromkeys(ROWS, 0.0)
    for op, us in times.items():
        rows[jax_row(op_names.get(op), kinds)] += us / 1e3 / repeats
    return {"rows": rows, "median_ms": median * 1e3, "profiled_wall_ms": wall * 1e3}


# ---------------------------------------------------------------------------------------------
# torch


_STEP, _OPTIMIZER, _RANGE = "breakdown::step", "breakdown::optimizer update", "breakdown::"
_BACKWARD = "autograd::engine::evaluate_function:"


def torch_trainer(runner):
    """The `TorchTrainer` behind a workload's torch Runner (its step closes over it)."""
    cells = dict(zip(runner.step.__code__.co_freevars, runner.step.__closure__ or ()))
    if "trainer" not in cells:
        raise RuntimeError("the torch runner does not hold a trainer: --breakdown needs a "
                           "training workload")
    return cells["trainer"].cell_contents


def install_ranges(model, optimizer, kinds: dict[str, str]) -> list:
    """`record_function` ranges around the outermost module of each kind and the optimizer's
    step; the handles to remove."""
    import torch

    open_ranges: dict[int, list] = {}

    def enter(label):
        def hook(module, *_):
            rf = torch.profiler.record_function(label)
            rf.__enter__()
            open_ranges.setdefault(id(module), []).append(rf)
        return hook

    def leave(module, *_):
        stack = open_ranges.get(id(module))
        if stack:
            stack.pop().__exit__(None, None, None)

    handles = []
    for name, module in model.named_modules():
        key = canonical(name)
        parts = key.split(".")
        if key not in kinds or any(".".join(parts[:i]) in kinds for i in range(1, len(parts))):
            continue
        handles += [module.register_forward_pre_hook(enter(f"{_RANGE}{kinds[key]}|{name}")),
                    module.register_forward_hook(leave)]
    handles += [optimizer.register_step_pre_hook(enter(_OPTIMIZER)),
                optimizer.register_step_post_hook(leave)]
    return handles


def _ancestors(e):
    while e.cpu_parent is not None:
        e = e.cpu_parent
        yield e


def torch_rows(events, steps: int) -> dict[str, float]:
    """ms per row per step from `torch.profiler` events of `steps` ranges named `_STEP`."""
    fwd_kind: dict[int, str] = {}
    last_backward: dict[int, float] = {}
    tops = []
    for e in events:
        chain = list(_ancestors(e))
        step = next((a for a in chain if a.name == _STEP), None)
        if step is None:
            continue
        backward = next((a for a in [e, *chain] if a.name.startswith(_BACKWARD)), None)
        if backward is not None:
            last_backward[id(step)] = max(last_backward.get(id(step), 0.0), backward.time_range.end)
        elif e.sequence_nr >= 0:
            rng = next((a.name for a in chain if a.name.startswith(_RANGE) and "|" in a.name), None)
            fwd_kind[e.sequence_nr] = rng[len(_RANGE):].split("|")[0] if rng else None
        if e.name.startswith("aten::") and not any(a.name.startswith("aten::") for a in chain):
            tops.append((e, chain, step, backward))
    rows = dict.fromkeys(ROWS, 0.0)
    for e, chain, step, backward in tops:
        names = [a.name for a in chain]
        if backward is not None:
            kind = fwd_kind.get(backward.sequence_nr)
            row = f"{kind} backward" if kind else "rest"
        elif _OPTIMIZER in names or e.time_range.start >= last_backward.get(id(step), float("inf")):
            row = "optimizer update"
        else:
            rng = next((n for n in names if n.startswith(_RANGE) and "|" in n), None)
            row = f"{rng[len(_RANGE):].split('|')[0]} forward" if rng else "rest"
        rows[row] += (e.time_range.end - e.time_range.start) / 1e3 / steps
    return rows


def profile_torch(workload, kinds: dict[str, str], warmup: int, repeats: int) -> dict:
    """As `profile_jax`, for the eager torch step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    runner = workload.runner("torch")
    trainer = torch_trainer(runner)
    runner.first()
    for _ in range(warmup):
        runner.step()
    median = _median_step(runner.step, repeats)
    handles = install_ranges(trainer.model, trainer.optimizer, kinds)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(repeats):
                with record_function(_STEP):
                    runner.step()
            wall = (time.perf_counter() - t0) / repeats
    finally:
        for h in handles:
            h.remove()
    return {"rows": torch_rows(prof.events(), repeats), "median_ms": median * 1e3,
            "profiled_wall_ms": wall * 1e3}


def _median_step(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# One preset, the table, the CLI


def breakdown(preset: str, batch_size: int, precision: str = "fp32", warmup: int = 1,
              repeats: int = 3, seed: int = 0, device: str = "cpu", attention_impl: str = "xla") -> dict:
    """The record of one preset: per framework its rows (ms per step), the profiled total, the
    wall time per profiled step and the un-profiled median."""
    from .workloads import build_workload

    workload = build_workload(preset, "train", batch_size, precision, seed=seed, device=device,
                              attention_impl=attention_impl)
    forward_rel_err = workload.check()
    kinds = module_kinds(torch_trainer(workload.runner("torch")).model)
    result = {"preset": preset, "batch_size": batch_size, "precision": precision, "repeats": repeats,
              "forward_rel_err": forward_rel_err}
    for fw, run in (("jax", profile_jax), ("torch", profile_torch)):
        r = run(workload, kinds, warmup, repeats)
        r["total_ms"] = sum(r["rows"].values())
        result[fw] = r
    return result


def table(rec: dict) -> str:
    """The record as a markdown table: row, ms and share of the profiled step per framework,
    JAX/torch; a total row and the un-profiled medians."""
    j, t = rec["jax"], rec["torch"]
    lines = [f"{rec['preset']}, training step, batch {rec['batch_size']}, {rec['precision']}, "
             f"{rec['repeats']} profiled steps",
             "",
             "| row | JAX ms | JAX share | torch ms | torch share | JAX/torch |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]

    def ratio(a, b):
        return f"{a / b:.2f}" if b > 0 and a > 0 else "-"

    for row in ROWS:
        a, b = j["rows"][row], t["rows"][row]
        if a == 0 and b == 0:
            continue
        lines.append(f"| {row} | {a:.2f} | {100 * a / j['total_ms']:.1f}% | {b:.2f} | "
                     f"{100 * b / t['total_ms']:.1f}% | {ratio(a, b)} |")
    lines.append(f"| **total (sum of rows)** | {j['total_ms']:.2f} | 100% | {t['total_ms']:.2f} | "
                 f"100% | {ratio(j['total_ms'], t['total_ms'])} |")
    lines.append(f"| wall time per profiled step | {j['profiled_wall_ms']:.2f} | | "
                 f"{t['profiled_wall_ms']:.2f} | | {ratio(j['profiled_wall_ms'], t['profiled_wall_ms'])} |")
    lines.append(f"| un-profiled median step | {j['median_ms']:.2f} | | {t['median_ms']:.2f} | | "
                 f"{ratio(j['median_ms'], t['median_ms'])} |")
    return "\n".join(lines)


def check_args(ap, a):
    """`ap.error` for what `--breakdown` cannot do."""
    if a.all:
        ap.error("--breakdown profiles the presets named with --preset, not --all")
    if a.mode in ("infer", "generate"):
        ap.error(f"--breakdown profiles a training step; --mode {a.mode} cannot go with it")
    if any(f not in FRAMEWORKS for f in a.frameworks):
        ap.error(f"--breakdown compares jax with eager torch; --frameworks {','.join(a.frameworks)} "
                 f"cannot go with it")
    if a.plot:
        ap.error("--breakdown writes a table (--markdown, --json), not --plot")


def main(a, info, device) -> int:
    """`--breakdown`: each preset, batch size and precision profiled; tables printed and written."""
    from . import report
    from .options import default_batch
    from .workloads import ParityError

    records, failed = [], False
    for preset in a.presets:
        for batch in a.batch_size or [default_batch(preset)]:
            for prec in a.precision:
                try:
                    rec = breakdown(preset, batch, prec, a.warmup, a.repeats, a.seed, str(device),
                                    a.attention_impl)
                except ParityError as e:
                    print(f"error: {preset} b{batch} {prec}: {e}", file=sys.stderr, flush=True)
                    failed = True
                    continue
                rec.update(date=info["date"], device=info["host"], versions=info["versions"],
                           load_average=info.get("load_average"))
                records.append(rec)
                print("\n" + table(rec) + "\n", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1, default=str)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write("# Where the time goes: one training step, per layer kind\n\n```\n"
                    + report.machine_header(info) + "\n```\n\n"
                    + "\n\n".join(table(r) for r in records) + "\n")
    for path in (a.json, a.markdown):
        if path:
            print(f"wrote {path}")
    return 1 if failed else 0
