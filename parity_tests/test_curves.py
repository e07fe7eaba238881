"""Every training run draws its curves: WORKDIR/curves.png at each evaluation and at the end,
`python -m train plot` overlays runs, `--tensorboard` writes event files; a failure to draw is a
warning, never the end of a run."""

from __future__ import annotations

import json
import struct
import sys
import time

import pytest
from PIL import Image

from train import curves
from train.__main__ import main

TINY_ARGS = ["--set", "depth=1", "--set", "embed_dim=16", "--set", "num_heads=2", "--set", "patch_size=8"]


def write_run(folder, backend, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "lo')
    (folder / "summary.json").write_text(json.dumps({"backend": backend}))
    return str(folder)


def records(offset=0.0):
    train = [{"step": s, "loss": 2.3 - 0.1 * s + offset, "lr": 1e-3 * s / 4, "accuracy": 0.1 * s}
             for s in range(1, 5)]
    return [*train[:2], {"step": 2, "eval_loss": 2.0, "eval_accuracy": 0.4, "eval_examples": 360},
            *train[2:], {"step": 4, "eval_loss": 1.8, "eval_accuracy": 0.6, "eval_examples": 360}]


def test_metrics_split_into_training_and_evaluation(tmp_path):
    run = write_run(tmp_path / "a", "jax", records())
    train, evaluation = curves.read_metrics(run)
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evaluation] == [2, 4]
    assert curves.evaluation_keys(evaluation) == ["eval_loss", "eval_accuracy"]


def test_plot_overlays_runs_in_one_picture(tmp_path, capsys):
    a = write_run(tmp_path / "jax-run", "jax", records())
    b = write_run(tmp_path / "torch-run", "torch", records(1e-3))
    out = tmp_path / "both.png"
    assert main(["plot", a, b, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    # loss, lr, eval_loss, eval_accuracy: 4 panels, 3 columns of 4.2 x 3.2 inches at 80 dpi
    assert Image.open(out).size == (1008, 512)
    assert main(["plot", a]) == 0 and (tmp_path / "jax-run" / "curves.png").is_file()
    assert [curves._label(r) for r in (a, b)] == ["jax-run (jax)", "torch-run (torch)"]


def test_plot_refuses_a_run_without_metrics(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plot", str(tmp_path / "nothing")])
    assert e.value.code == 2 and "no metrics.jsonl for" in capsys.readouterr().err


def test_a_failed_drawing_is_a_warning(tmp_path):
    c = curves.Curves(str(tmp_path / "no-run"))
    with pytest.warns(UserWarning, match="could not draw"):
        c.close()
    curves.Curves(str(tmp_path / "no-run"), enabled=False).close()   # another process: nothing, no warning


def read_events(folder) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every event file in `folder` (TFRecord framing, tensorboardX's proto)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            if i + 12 + n + 4 > len(data):
                break   # a record still being written
            event = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def test_tensorboard_events_follow_the_metrics(tmp_path):
    run = tmp_path / "run"
    write_run(run, "jax", records()[:3])
    c = curves.Curves(str(run), tensorboard=True)
    c.scalars()   # tensorboardX's thread has the events on disk within TENSORBOARD_FLUSH_SECONDS
    deadline = time.monotonic() + 6 * curves.TENSORBOARD_FLUSH_SECONDS
    logged = lambda: [s for s, _ in read_events(run / "tensorboard").get("train/loss", [])]  # noqa: E731
    while logged() != [1, 2] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert logged() == [1, 2]
    assert not (run / "curves.png").exists()
    c.refresh()
    with open(run / "metrics.jsonl", "a") as f:   # the cut line ends, more records come
        f.write('ss": 1}\n' + "".join(json.dumps(r) + "\n" for r in records()[3:]))
    c.close()
    scalars = read_events(run / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert scalars["eval/accuracy"] == [(2, pytest.approx(0.4)), (4, pytest.approx(0.6))]
    assert (run / "curves.png").is_file()


def test_training_draws_its_curves_and_tensorboard_events(tmp_path):
    rc = main(["vit-digits", *TINY_ARGS, "--backend", "torch", "--steps", "4", "--batch-size", "16",
               "--log-every", "1", "--eval-every", "2", "--no-progress", "--tensorboard", "--workdir", str(tmp_path)])
    assert rc == 0
    assert Image.open(tmp_path / "curves.png").size[0] > 0
    scalars = read_events(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in scalars["eval/accuracy"]] == [2, 4]


def test_tensorboard_without_its_package_is_an_error_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    rc = main(["vit-digits", "--tensorboard", "--no-progress", "--workdir", str(tmp_path / "w")])
    assert rc == 2 and "--tensorboard needs the tensorboardX package" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
