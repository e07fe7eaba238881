"""The curves of training runs, drawn from their `metrics.jsonl`: the training loss, the learning
rate and the evaluation metrics against the step. `python -m train` keeps WORKDIR/curves.png (and
with `--tensorboard`, TensorBoard event files in WORKDIR/tensorboard) up to date at each evaluation
and at the end; `python -m train plot RUN [RUN ...]` overlays several runs in one picture."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_FLUSH_SECONDS = 5  # tensorboardX writes from a thread: a logged step is on disk this soon after
TENSORBOARD_MISSING = ("--tensorboard needs the tensorboardX package (pip install tensorboardX, or the "
                       "project's extra: pip install 'twin-models[tensorboard]')")


def metrics_path(run: str) -> str:
    """RUN/metrics.jsonl, or RUN itself when it is a file."""
    return run if os.path.isfile(run) else os.path.join(run, "metrics.jsonl")


def read_metrics(run: str) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a run's metrics.jsonl, in order. A training
    record has the learning rate; a line cut short by a kill is left out."""
    train, evaluation = [], []
    with open(metrics_path(run)) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                (train if "lr" in record else evaluation).append(record)
    return train, evaluation


def evaluation_keys(records: list[dict]) -> list[str]:
    """The metrics an evaluation reports (numbers other than the step and example counts)."""
    keys = []
    for record in records:
        for k, v in record.items():
            if k != "step" and not k.endswith("examples") and isinstance(v, (int, float)) \
                    and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    return keys


def _label(run: str) -> str:
    """The run's folder, with its backend from summary.json when there is one."""
    folder = os.path.dirname(metrics_path(run)) or "."
    try:
        with open(os.path.join(folder, "summary.json")) as f:
            return f"{os.path.basename(os.path.abspath(folder))} ({json.load(f)['backend']})"
    except (OSError, ValueError, KeyError, TypeError):
        return os.path.basename(os.path.abspath(folder))


def _series(records: list[dict], key: str):
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def overlay(runs: list[str], out: str, labels: list[str] | None = None) -> str:
    """One picture of several runs: training loss, learning rate and each evaluation metric against
    the step, one colour per run; written atomically to `out`, whose path it returns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [read_metrics(run) for run in runs]
    labels = labels or [_label(run) for run in runs]
    metrics = []
    for _, evaluation in data:
        metrics += [k for k in evaluation_keys(evaluation) if k not in metrics]
    panels = [("training loss", ["loss"], 0), ("learning rate", ["lr"], 0),
              *[(k, [k], 1) for k in metrics]]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    try:
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, (title, keys, source) in zip(axes.flat, panels):
            for i, ((train, evaluation), label) in enumerate(zip(data, labels)):
                steps, values = _series((train, evaluation)[source], keys[0])
                if steps:
                    ax.plot(steps, values, marker="o" if source else None, ms=3,
                            lw=1.6 if i == 0 else 1.1, ls="-" if i % 2 == 0 else "--",
                            color=colours[i % len(colours)], label=label)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize="small")
        fig.tight_layout()
        out = os.path.abspath(out)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp-{os.getpid()}.png"
        try:
            fig.savefig(tmp, dpi=80)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    finally:
        plt.close(fig)
    return out


def draw(workdir: str) -> str:
    """WORKDIR/curves.png from WORKDIR/metrics.jsonl."""
    return overlay([workdir], os.path.join(workdir, "curves.png"))


def check_tensorboard():
    """A ValueError naming the missing package when tensorboardX cannot be imported."""
    import importlib.util

    if importlib.util.find_spec("tensorboardX") is None:
        raise ValueError(TENSORBOARD_MISSING)


class Curves:
    """What the training loop refreshes at each evaluation and at the end: WORKDIR/curves.png and,
    with `tensorboard` (also at each logged step, `scalars`), the records of metrics.jsonl not yet
    written as TensorBoard scalars (WORKDIR/tensorboard; a resumed run hides what its first run logged after `start_step`). Only
    an enabled (primary) process draws; a failure is a warning, never the end of the run."""

    def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True, tensorboard: bool = False):
        self.workdir, self.start_step, self.enabled = workdir, start_step, enabled
        self.tensorboard, self.writer, self.offset = tensorboard and enabled, None, 0

    def refresh(self):
        if not self.enabled:
            return
        try:
            draw(self.workdir)
        except Exception as e:   # noqa: BLE001 (a picture must not end a run)
            warnings.warn(f"could not draw {os.path.join(self.workdir, 'curves.png')}: {e!r}", stacklevel=2)
        self.scalars()

    def scalars(self):
        """The TensorBoard scalars only (no picture), after each logged step: TensorBoard follows
        the training loss as it is logged; the picture waits for the next evaluation."""
        if self.tensorboard:
            try:
                self._write_events()
            except Exception as e:   # noqa: BLE001
                warnings.warn(f"could not write TensorBoard events to {self.workdir}: {e!r}", stacklevel=2)

    def _write_events(self):
        if self.writer is None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.workdir, TENSORBOARD_DIR), flush_secs=TENSORBOARD_FLUSH_SECONDS,
                                        purge_step=self.start_step + 1 if self.start_step else None)
        with open(metrics_path(self.workdir)) as f:
            f.seek(self.offset)
            for line in iter(f.readline, ""):
                if not line.endswith("\n"):
                    break   # still being written
                self.offset = f.tell()
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= self.start_step:
                    continue
                group = "train" if "lr" in record else "eval"
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        tag = f"{group}/{k.removeprefix('eval_') if group == 'eval' else k}"
                        self.writer.add_scalar(tag, v, record["step"])
        self.writer.flush()

    def close(self):
        """The last refresh, then the event file closed."""
        self.refresh()
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as e:   # noqa: BLE001
                warnings.warn(f"could not close the TensorBoard events of {self.workdir}: {e!r}", stacklevel=2)
            self.writer = None


def main(argv=None) -> int:
    """`python -m train plot RUN [RUN ...] [--out FILE]`."""
    p = argparse.ArgumentParser(prog="python -m train plot",
                                description="Overlay the curves (training loss, learning rate, evaluation "
                                            "metrics against the step) of one or more runs in one picture.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run's folder (--workdir) or its metrics.jsonl")
    p.add_argument("--out", help="the picture to write (default: RUN/curves.png for one run, curves.png "
                                 "here for several)")
    p.add_argument("--label", action="append", default=None,
                   help="a run's name in the legend, once per RUN in order (default: its folder and backend)")
    args = p.parse_args(argv)
    missing = [run for run in args.runs if not os.path.isfile(metrics_path(run))]
    if missing:
        p.error(f"no metrics.jsonl for {', '.join(missing)}")
    if args.label is not None and len(args.label) != len(args.runs):
        p.error(f"{len(args.label)} --label for {len(args.runs)} runs")
    out = args.out or (os.path.join(os.path.dirname(metrics_path(args.runs[0])), "curves.png")
                       if len(args.runs) == 1 else "curves.png")
    print(overlay(args.runs, out, args.label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
