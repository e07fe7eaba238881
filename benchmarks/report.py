"""The benchmark records as a text table, a markdown report with XLA/torch time ratios, and a PNG
chart (examples/s per preset and framework, log scale, one panel per mode)."""

from __future__ import annotations

import math
from collections import defaultdict

FRAMEWORK_ORDER = ("jax", "torch", "torch-compile")


def machine_header(info: dict) -> str:
    v = info["versions"]
    lines = [f"machine: {info['host']}",
             f"jax {v['jax']} on {info['jax_device']} (default matmul precision: "
             f"{info['jax_default_matmul_precision']}); torch {v['torch']} on {info['torch_device']} "
             f"({info['torch_threads']} threads, allow_tf32 {info['torch_allow_tf32']})",
             f"date: {info['date']}" + (f"; load average {info['load_average']}" if "load_average" in info else "")]
    if info.get("xla_flags"):
        lines.insert(2, f"XLA_FLAGS: {info['xla_flags']}")
    return "\n".join(lines)


def _group_key(r):
    return r["preset"], r["mode"], r["batch_size"], r["precision"]


def _fmt(x, spec, missing="-"):
    return missing if x is None else format(x, spec)


def _cells(r) -> list[str]:
    if "error" in r:
        return [r["preset"], r["mode"], str(r["batch_size"]), r["precision"], r["framework"],
                "error: " + r["error"].splitlines()[0][:90]]
    mem = r.get("peak_memory_bytes")
    frac = r.get("peak_fraction")
    return [r["preset"], r["mode"], str(r["batch_size"]), r["precision"], r["framework"],
            f"{r['median_ms']:.2f}", f"{r['spread_ms']:.2f}", f"{r['compile_s']:.1f}",
            f"{r['examples_per_s']:.1f}", _fmt(r.get("achieved_flops") and r["achieved_flops"] / 1e9, ".1f"),
            _fmt(frac and 100 * frac, ".1f"), _fmt(mem and mem / 2 ** 20, ".0f"),
            _fmt(r.get("forward_rel_err"), ".1e")]


HEADER = ["preset", "mode", "batch", "precision", "framework", "median ms", "IQR ms", "first call s",
          "examples/s", "GFLOP/s", "% peak", "memory MiB", "fwd rel err"]


def table(records: list[dict]) -> str:
    """A fixed-width text table, one line per record."""
    rows = [HEADER] + [_cells(r) for r in records]
    width = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.rjust(width[i]) if i >= 5 and len(row) > 6 else c.ljust(width[i])
                               for i, c in enumerate(row)) for row in rows)


def ratios(records: list[dict]) -> list[dict]:
    """Per row group: each framework's median ms, and XLA time / torch time (< 1: XLA faster)."""
    groups = defaultdict(dict)
    for r in records:
        groups[_group_key(r)][r["framework"]] = r.get("median_ms")
    out = []
    for (preset, mode, batch, prec), ms in groups.items():
        jax_ms = ms.get("jax")
        ratio = lambda fw: jax_ms / ms[fw] if jax_ms and ms.get(fw) else None  # noqa: E731
        out.append({"preset": preset, "mode": mode, "batch_size": batch, "precision": prec, **{
            f"{fw}_ms": ms.get(fw) for fw in FRAMEWORK_ORDER},
            "xla_over_eager": ratio("torch"), "xla_over_compile": ratio("torch-compile")})
    return out


def markdown(records: list[dict], info: dict) -> str:
    """The machine, the ratio table per row group, then every record."""
    lines = ["# Benchmarks: XLA against eager PyTorch and torch.compile", "",
             "```", machine_header(info), "```", "",
             "Time per step, median over the timed steps after warm-up; ratio = XLA time / torch "
             "time (below 1: XLA faster).", "",
             "| preset | mode | batch | precision | JAX ms | eager ms | torch.compile ms | XLA/eager | "
             "XLA/torch.compile |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for g in ratios(records):
        lines.append(f"| `{g['preset']}` | {g['mode']} | {g['batch_size']} | {g['precision']} | "
                     f"{_fmt(g['jax_ms'], '.2f')} | {_fmt(g['torch_ms'], '.2f')} | "
                     f"{_fmt(g['torch-compile_ms'], '.2f')} | {_fmt(g['xla_over_eager'], '.2f')} | "
                     f"{_fmt(g['xla_over_compile'], '.2f')} |")
    lines += ["", "All rows (IQR: interquartile range of the timed steps; first call: trace + compile "
              "+ one step; GFLOP/s and % peak from the same model FLOPs for every framework):", "",
              "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    for r in records:
        cells = _cells(r)
        cells += [""] * (len(HEADER) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [r for r in records if "error" in r]
    if errors:
        lines += ["", "Errors:", ""] + [f"- `{r['preset']}` {r['mode']} b{r['batch_size']} "
                                       f"{r['precision']} {r['framework']}: {r['error'].splitlines()[0]}"
                                       for r in errors]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str, info: dict):
    """Grouped horizontal bars of examples/s (log scale), one panel per mode, one bar per
    framework, the XLA/eager time ratio written beside each group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in records if "error" not in r]
    modes = [m for m in ("train", "infer") if any(r["mode"] == m for r in ok)] or ["train"]
    frameworks = [f for f in FRAMEWORK_ORDER if any(r["framework"] == f for r in ok)]
    labels = list(dict.fromkeys(f"{r['preset']} b{r['batch_size']} {r['precision']}" for r in records))
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 0.55 * len(labels) * max(len(frameworks), 1) / 2 + 2),
                             squeeze=False)
    colors = {"jax": "#4C72B0", "torch": "#DD8452", "torch-compile": "#55A868"}
    height = 0.8 / max(len(frameworks), 1)
    for ax, mode in zip(axes[0], modes):
        rows = {(f"{r['preset']} b{r['batch_size']} {r['precision']}", r["framework"]): r
                for r in ok if r["mode"] == mode}
        for j, fw in enumerate(frameworks):
            ys, xs = [], []
            for i, label in enumerate(labels):
                if (label, fw) in rows:
                    ys.append(i + (j - (len(frameworks) - 1) / 2) * height)
                    xs.append(rows[label, fw]["examples_per_s"])
            ax.barh(ys, xs, height=height, color=colors[fw], label=fw)
        for i, label in enumerate(labels):
            j, t = rows.get((label, "jax")), rows.get((label, "torch"))
            if j and t:
                ax.text(1.01, i, f"{j['median_ms'] / t['median_ms']:.2f}x", transform=ax.get_yaxis_transform(),
                        va="center", fontsize=8)
        ax.set_xscale("log")
        speeds = [r["examples_per_s"] for r in rows.values()]
        if speeds:
            ax.set_xlim(10 ** math.floor(math.log10(min(speeds) / 2)), 10 ** math.ceil(math.log10(max(speeds) * 1.5)))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("examples / s (log scale, higher is better)")
        ax.set_title(f"{mode}  (right: XLA time / eager time)", fontsize=10)
        ax.grid(axis="x", which="both", alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper right", ncol=len(frameworks), fontsize=8)
    v = info["versions"]
    fig.suptitle(f"XLA vs PyTorch\n{info['host']} | jax {v['jax']} ({info['jax_device']}), torch {v['torch']} "
                 f"({info['torch_device']}, {info['torch_threads']} threads) | {info['date'][:10]}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(before: list[dict], after: list[dict]) -> list[dict]:
    """The row groups of `after` with their XLA/eager ratio before and after: preset, mode, batch,
    precision, before, after (None where a side has no such group)."""
    old = {_group_key(g): g for g in ratios(before)}
    out = []
    for g in ratios(after):
        prev = old.get(_group_key(g), {})
        out.append({"preset": g["preset"], "mode": g["mode"], "batch_size": g["batch_size"],
                    "precision": g["precision"], "before": prev.get("xla_over_eager"),
                    "after": g["xla_over_eager"], "after_compile": g["xla_over_compile"]})
    return out


def compare_markdown(rows: list[dict], before: str = "before", after: str = "after") -> str:
    """One line per row group: XLA/eager before and after, and after against torch.compile."""
    lines = [f"| preset | mode | batch | XLA/eager {before} | XLA/eager {after} | XLA/torch.compile {after} |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        bold = lambda x: _fmt(x, ".2f") if x is None or x > 1 else f"**{x:.2f}**"  # noqa: E731
        lines.append(f"| `{r['preset']}` | {r['mode']} | {r['batch_size']} | {_fmt(r['before'], '.2f')} | "
                     f"{bold(r['after'])} | {_fmt(r['after_compile'], '.2f')} |")
    return "\n".join(lines) + "\n"


def plot_compare(rows: list[dict], path: str, title: str, before: str = "before", after: str = "after",
                 goal: float | None = 0.77):
    """XLA/eager per preset, before and after side by side, one panel per mode, with the line of
    parity (1.0) and `goal`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("train", "infer") if any(r["mode"] == m for r in rows)]
    labels = list(dict.fromkeys(f"{r['preset']} b{r['batch_size']}" for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 0.42 * len(labels) + 1.8),
                             squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        by = {f"{r['preset']} b{r['batch_size']}": r for r in rows if r["mode"] == mode}
        for offset, key, color, name in ((-0.2, "before", "#BBBBBB", before), (0.2, "after", "#4C72B0", after)):
            ys = [i + offset for i, lab in enumerate(labels) if by.get(lab, {}).get(key)]
            xs = [by[lab][key] for lab in labels if by.get(lab, {}).get(key)]
            ax.barh(ys, xs, height=0.4, color=color, label=name)
            for y, x in zip(ys, xs):
                ax.text(x + 0.02, y, f"{x:.2f}", va="center", fontsize=7 if key == "after" else 6,
                        color="black" if key == "after" else "#777777")
        ax.axvline(1.0, color="black", lw=1, label="even with eager")
        if goal:
            ax.axvline(goal, color="tab:green", ls=":", lw=1, label=f"goal {goal:g}")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("XLA time / eager torch time (below 1: XLA faster)")
        ax.set_title(mode, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()  # the axes share y: once puts the first preset on top in every panel
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    """`python -m benchmarks.report compare BEFORE.json AFTER.json`: the XLA/eager ratios of two
    runs of `python -m benchmarks --json`, as a Markdown table (stdout or --markdown) and a chart."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="XLA/eager before and after, per preset and mode")
    c.add_argument("before")
    c.add_argument("after")
    c.add_argument("--plot", metavar="PATH", help="write the chart (PNG)")
    c.add_argument("--markdown", metavar="PATH", help="write the table here instead of printing it")
    c.add_argument("--title", default="XLA / eager torch per training step and inference call")
    c.add_argument("--labels", default="before,after", help="the two runs' names (default: before,after)")
    a = ap.parse_args(argv)
    runs = []
    for path in (a.before, a.after):
        try:
            with open(path) as f:
                records = json.load(f)
            if not isinstance(records, list) or not all(isinstance(r, dict) and "preset" in r for r in records):
                raise ValueError("not a list of benchmark records")
        except (OSError, ValueError) as e:
            ap.error(f"{path}: {e}")
        runs.append(records)
    names = a.labels.split(",")
    if len(names) != 2:
        ap.error("--labels takes two names, comma-separated")
    rows = compare(*runs)
    table = compare_markdown(rows, *names)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table)
    else:
        print(table, end="")
    if a.plot:
        plot_compare(rows, a.plot, a.title, *names)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
