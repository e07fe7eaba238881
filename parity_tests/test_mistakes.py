"""A new user's mistakes, second round: each one either refused in one line naming the setting, the
value and what is allowed (`error:`, exit status 2, nothing written, no traceback), or read right.
Cases by kind: every output path, every size argument and rate, every image mode."""

import json
import os
import pickle

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import bridge
import jax_models
import torch_reference
from bridge.__main__ import main as bridge_main
from jax_models import captioning as jax_captioning
from parity_tests.cases import SMALL
from train import captions, data
from train.__main__ import main as train_main
from train.config import RUN_FILES
from train.settings import COUNT_LIMIT, SEED_RANGE
from twin_models.presets import (COUNT_ARGS, NONNEGATIVE_ARGS, POSITIVE_ARGS, PRESETS, RATE_ARGS, SIZE_ARGS,
                                  get_preset)

TINY = ["vit-tiny-digits", "--steps", "1", "--batch-size", "8", "--no-progress"]


def _one_error(err: str, *parts: str):
    """`err` is one error (one line holding `error:`, with argparse's usage line before it or an
    itemized list after it), no traceback, naming each of `parts`."""
    assert "Traceback" not in err, err
    assert sum("error:" in line for line in err.splitlines()) == 1, err
    for part in parts:
        assert part in err, (part, err)


def _train(capsys, tmp_path, *args, workdir=None):
    workdir = workdir or tmp_path / "run"
    rc = train_main([*TINY, *args, "--workdir", str(workdir)])
    return rc, capsys.readouterr().err


def _cli(capsys, main, argv):
    """(exit status, stderr) of a CLI's main, argparse's own exits included."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


# --- data loss: an --export onto the run's own files ----------------------------------------------


@pytest.mark.parametrize("name", [*RUN_FILES, "checkpoints/1/state", "."])
def test_export_onto_the_runs_own_files_is_refused(tmp_path, capsys, name):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "summary.json").write_text('{"kept": true}')
    rc, err = _train(capsys, tmp_path, "--export", str(workdir / name))
    assert rc == 2
    _one_error(err, "--export", "one of the run's own files" if name != "." else "is a directory")
    assert sorted(os.listdir(workdir)) == ["summary.json"]
    assert json.loads((workdir / "summary.json").read_text()) == {"kept": True}


# --- silently wrong data --------------------------------------------------------------------------


def _pixels(seed=0, size=(6, 5)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _saved(tmp_path, mode):
    """An image of `mode` on disk, and the 8-bit pixels (L and RGB) it should read as."""
    rgb = Image.fromarray(_pixels())
    gray = np.asarray(rgb.convert("L"), np.float32)
    if mode in ("I;16", "I;16-tiff"):
        wide = (gray.astype(np.uint16) * 257)
        im = Image.fromarray(wide)
        path = tmp_path / ("x.tiff" if mode == "I;16-tiff" else "x.png")
        im.save(path)
        return path, gray[..., None], np.repeat(gray[..., None], 3, -1)
    if mode in ("I", "F"):
        im = Image.fromarray(gray.astype(np.int32 if mode == "I" else np.float32))
        path = tmp_path / "x.tiff"
        im.save(path)
        return path, None, None
    im = rgb.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "YCbCr" else "x.tiff" if mode in ("CMYK", "LA", "PA") else "x.png")
    im.save(path)
    back = Image.open(path)
    if back.mode in ("LA", "RGBA", "PA"):
        back = Image.alpha_composite(Image.new("RGBA", back.size, (0, 0, 0, 255)), back.convert("RGBA"))
    return path, np.asarray(back.convert("L"), np.float32)[..., None], np.asarray(back.convert("RGB"), np.float32)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16",
                                  "I;16-tiff", "I", "F"])
def test_every_image_mode_is_read_at_its_range_or_refused(tmp_path, mode):
    path, want_l, want_rgb = _saved(tmp_path, mode)
    h, w = 6, 5
    if want_l is None:
        with pytest.raises(ValueError, match=rf"{path}: not a readable image \(.*mode {mode[0]}.* no known range"):
            data._read_image(str(path), "L", h)
        return
    side = min(h, w)
    for target, want in (("L", want_l), ("RGB", want_rgb)):
        with Image.open(path) as im:
            resized = data.image_pixels(im, target, 8)
            same = data.image_pixels(im.crop((0, 0, side, side)), target, side)
        assert resized.shape == (8, 8, want.shape[-1]) and 0 <= resized.min() and resized.max() <= 255.001
        # at its own size: the same pixels (16-bit ones at 8-bit scale, within rounding)
        np.testing.assert_allclose(same, want[:side, :side], atol=1.0 if "I" in mode else 0)


def test_a_16_bit_png_is_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for c in "ab":
        for i in range(5):
            Image.fromarray(ramp).save(tmp_path / c / f"{i}.png")
    train_set, _ = data.load_imagefolder(str(tmp_path), 64, 1)
    pixels = (train_set.images + 1) * 127.5
    assert (pixels >= 254.5).mean() < 0.01
    np.testing.assert_allclose(pixels[0, ..., 0], ramp / 257.0, atol=0.01)


def _folder(root, classes, n=4):
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            Image.fromarray(_pixels(i)).save(root / c / f"{i}.png")
    return root


def test_a_one_class_image_folder_is_refused_for_a_classifier(tmp_path, capsys):
    root = _folder(tmp_path / "imgs", ["cats"])
    rc, err = _train(capsys, tmp_path, "--data", f"imagefolder:{root}")
    assert rc == 2 and not (tmp_path / "run").exists()
    _one_error(err, "1 class (cats)", "at least 2")


def test_a_one_class_image_folder_is_fine_for_diffusion(tmp_path):
    from train.config import resolve
    from train.settings import Config

    root = _folder(tmp_path / "imgs", ["cats"], n=10)
    r = resolve(Config(preset="ddpm-digits", data=f"imagefolder:{root}", steps=1, batch_size=2,
                       workdir=str(tmp_path / "run")))
    assert r.train_data.num_classes == 1 and not (tmp_path / "run").exists()


def _cifar(root, missing=()):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        if name in missing:
            continue
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [0, 1, 2]}, f)
    return root


@pytest.mark.parametrize("missing", [("data_batch_3",), ("data_batch_1", "data_batch_5"), ("test_batch",)])
def test_a_cifar_folder_missing_a_batch_names_it(tmp_path, capsys, missing):
    root = _cifar(tmp_path / "cifar", missing)
    with pytest.raises(FileNotFoundError, match=f"lacks the CIFAR-10 batch\\(es\\) {', '.join(missing)}"):
        data.load_cifar10(str(root))
    rc, err = _train(capsys, tmp_path, "--data", f"cifar10:{root}")
    assert rc == 2 and not (tmp_path / "run").exists()
    _one_error(err, *missing)
    assert "has no CIFAR-10" not in err


def test_a_whole_cifar_folder_loads(tmp_path):
    train_set, test_set = data.load_cifar10(str(_cifar(tmp_path / "cifar")))
    assert len(train_set) == 15 and len(test_set) == 3


def _coco(root, captions_):
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    for i in range(len(captions_)):
        Image.fromarray(_pixels(i)).save(root / "images" / f"{i}.png")
    spec = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(len(captions_))],
            "annotations": [{"image_id": i, "caption": c} for i, c in enumerate(captions_)]}
    (root / "annotations" / "captions_train.json").write_text(json.dumps(spec))
    return root


@pytest.mark.parametrize("caption, what", [("", "an empty string"), ("   ", "an empty string"),
                                           (5, "5, not text"), (None, "None, not text"),
                                           (["a", "cat"], "['a', 'cat'], not text")])
def test_coco_captions_that_are_empty_or_not_text_are_refused(tmp_path, capsys, caption, what):
    root = _coco(tmp_path / "coco", ["a red circle", caption, "a blue square"])
    with pytest.raises(ValueError, match="annotation 1 \\(image_id 1\\) has the caption"):
        captions.load_coco(str(root), 48, 3)
    rc = train_main(["caption-scenes", "--data", f"coco:{root}", "--steps", "1", "--no-progress",
                     "--workdir", str(tmp_path / "run")])
    assert rc == 2 and not (tmp_path / "run").exists()
    _one_error(capsys.readouterr().err, what, "must be a non-empty string")


# --- silently accepted settings -------------------------------------------------------------------


def test_num_classes_the_data_cannot_fit_is_refused(tmp_path, capsys):
    for backend in ("jax", "torch"):
        rc, err = _train(capsys, tmp_path, "--set", "num_classes=3", "--backend", backend)
        assert rc == 2 and not (tmp_path / "run").exists()
        _one_error(err, "--set num_classes=3", "has 10 classes")


def _bad_values(name, default):
    if name in SIZE_ARGS:
        return [0, -1, 2.5, True] + ([(), (default[0], 0)] if isinstance(default, tuple) else [])
    if name in COUNT_ARGS:
        return [-1, 2.5, True]
    if name in RATE_ARGS:
        return [-0.1, 1.0, float("nan")]
    if name in POSITIVE_ARGS:
        return [0, -2, float("inf")]
    if name in NONNEGATIVE_ARGS:
        return [-0.5, float("nan")]
    return []


CASES = [(p, k, v) for p in SMALL for k, d in PRESETS[p].kwargs.items() for v in _bad_values(k, d)]
CHECKED = SIZE_ARGS + COUNT_ARGS + RATE_ARGS + POSITIVE_ARGS + NONNEGATIVE_ARGS


def test_every_numeric_constructor_argument_has_a_rule():
    numeric = {k for p in PRESETS.values() for k, v in p.kwargs.items()
               if not isinstance(v, bool) and isinstance(v, (int, float, tuple))}
    assert numeric <= set(CHECKED), sorted(numeric - set(CHECKED))


@pytest.mark.parametrize("preset, name, value", CASES, ids=[f"{p}-{k}={v}" for p, k, v in CASES])
def test_both_backends_refuse_the_same_sizes_and_rates(preset, name, value):
    messages = []
    for create in (jax_models.create_model, torch_reference.create_model):
        with pytest.raises(ValueError) as e:
            create(preset, **{name: value})
        messages.append(str(e.value))
    assert messages[0] == messages[1] and messages[0].startswith(f"{name}={value!r}: {name} must be")


def test_the_cli_names_the_bad_size(tmp_path, capsys):
    for value, part in (("0", "depth must be a positive integer"), ("-3", "depth must be a positive integer"),
                        ("0.5", "takes a value of type int"), ("nan", "takes a value of type int")):
        rc, err = _train(capsys, tmp_path, "--set", f"depth={value}")
        assert rc == 2 and not (tmp_path / "run").exists()
        _one_error(err, "--set depth=", value, part)
    rc, err = _train(capsys, tmp_path, "--set", "num_heads=3")
    _one_error(err, "embed_dim=32 is not divisible by num_heads=3")


@pytest.mark.parametrize("tol", ["-1", "0", "nan", "inf", "-inf"])
def test_verify_tol_must_be_positive_and_finite(capsys, tol):
    rc, err = _cli(capsys, bridge_main, ["verify", "vit-tiny-digits", f"--tol={tol}"])
    assert rc == 2
    _one_error(err, "--tol must be a positive finite number")


def test_float64_weights_are_refused_as_a_dtype(tmp_path, capsys):
    sd = {k: v.numpy().astype(np.float64) for k, v in torch_reference.create_model("vit-tiny-digits").state_dict().items()}
    path = tmp_path / "f64.safetensors"
    bridge.save_safetensors(sd, path)
    rc, err = _cli(capsys, bridge_main, ["verify", "vit-tiny-digits", "--weights", str(path)])
    assert rc == 3
    _one_error(err, "Dtype mismatch", "file dtype float64, the model holds float32")
    assert "Shape mismatch" not in err


def test_the_converter_lists_dtype_problems_apart(capsys):
    model = jax_models.create_model("vit-tiny-digits")
    sd = {k: v.numpy() for k, v in torch_reference.create_model("vit-tiny-digits").state_dict().items()}
    sd["cls_token"] = sd["cls_token"].astype(np.int64)
    with pytest.raises(bridge.WeightMismatchError) as e:
        bridge.torch_to_flax(sd, model, np.zeros((1, 32, 32, 1), np.float32))
    assert "Dtype mismatch: cls_token" in str(e.value) and "Shape mismatch" not in str(e.value)


@pytest.fixture(scope="module")
def captioners():
    preset = get_preset("caption-scenes")
    small = dict(vision_layers=1, layers=1)
    tm = torch_reference.create_model(preset, **small).eval()
    fm = jax_models.create_model(preset, **small)
    images = np.zeros((1, 48, 48, 3), np.float32)
    variables = bridge.torch_to_flax(tm.state_dict(), fm, images, np.zeros((1, 2), np.int32))
    return tm, fm, variables, images


@pytest.mark.parametrize("setting, message", [
    (dict(max_length=0), "max_length must be an int in [1, 32]"),
    (dict(max_length=33), "max_length must be an int in [1, 32]"),
    (dict(num_beams=0), "num_beams must be an int >= 1"),
    (dict(temperature=float("nan")), "temperature must be a positive finite number"),
    (dict(temperature=0.0, do_sample=True), "temperature must be a positive finite number"),
    (dict(length_penalty=float("nan"), num_beams=2), "length_penalty must be a finite number"),
    (dict(length_penalty=float("inf"), num_beams=2), "length_penalty must be a finite number"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(min_length=9, max_length=8), "min_length must be an int in [0, max_length=8]"),
])
def test_both_backends_refuse_the_same_generation_settings(captioners, setting, message):
    tm, fm, variables, images = captioners
    setting = {"max_length": 8, **setting}
    with pytest.raises(ValueError) as jax_error:
        jax_captioning.generate(fm, variables, images, **setting)
    with pytest.raises(ValueError) as torch_error:
        tm.generate(torch.from_numpy(images).permute(0, 3, 1, 2), **setting)
    assert message in str(jax_error.value) and str(jax_error.value) == str(torch_error.value)


@pytest.mark.parametrize("preset, part, owner", [
    ("clip-digits", "encode_text", "TextTransformer"),
    ("caption-scenes", "text_decoder", "TextDecoder"),
])
@pytest.mark.parametrize("bad", [-1, "vocab"])
def test_token_ids_outside_the_vocabulary_are_refused_in_both_backends(preset, part, owner, bad):
    """The text tower alone (CLIP's encode_text, the captioner's decoder over zero image tokens)."""
    p = get_preset(preset)
    vocab = p.kwargs["vocab_size"]
    ids = np.array([[1, 2, vocab if bad == "vocab" else bad, 3]], np.int64)
    flax_model, torch_model = jax_models.create_model(p), torch_reference.create_model(p)
    if part == "encode_text":
        flax_call = lambda: flax_model.init(jax.random.key(0), ids, method="encode_text")  # noqa: E731
        torch_call = lambda: torch_model.encode_text(torch.from_numpy(ids))  # noqa: E731
    else:
        decoder = flax_model.text_decoder
        image_tokens = np.zeros((1, 4, decoder._image_width), np.float32)
        flax_call = lambda: decoder.init(jax.random.key(0), ids, image_tokens)  # noqa: E731
        torch_call = lambda: torch_model.text_decoder(torch.from_numpy(ids), torch.from_numpy(image_tokens))  # noqa: E731
    want = f"{owner} expects token ids in [0, {vocab - 1}] (vocab_size {vocab}); got ids "
    with pytest.raises(ValueError) as flax_error:
        flax_call()
    with pytest.raises(ValueError) as torch_error:
        torch_call()
    assert str(flax_error.value).startswith(want) and str(flax_error.value) == str(torch_error.value)


@pytest.mark.parametrize("argv", [
    ["--max-length", "0"], ["--num-beams", "0"], ["--runs", "0"], ["--batch-sizes", "1", "0"],
    ["--torch-threads", "-1"]])
def test_generation_benchmark_refuses_zero_sizes(capsys, argv):
    from benchmarks.generation import main

    rc, err = _cli(capsys, main, argv)
    assert rc == 2
    _one_error(err, f"{argv[0]} must be at least 1")


def test_the_harness_refuses_max_length_zero(capsys):
    from benchmarks.harness import main

    rc, err = _cli(capsys, main, ["--preset", "caption-scenes", "--mode", "generate", "--max-length", "0"])
    assert rc == 2
    _one_error(err, "--max-length must be at least 1, not 0")


# --- tracebacks -----------------------------------------------------------------------------------


@pytest.fixture
def no_cache_configured(monkeypatch):
    """This process as a fresh CLI sees it: no compile cache set (the test suite sets one)."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    for var in ("TWIN_MODELS_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    yield
    jax.config.update("jax_compilation_cache_dir", before)


CLIS = {
    "train": lambda tmp: (train_main, [*TINY, "--workdir", str(tmp / "run")]),
    "bridge": lambda tmp: (bridge_main, ["verify", "vit-tiny-digits"]),
    "benchmarks": lambda tmp: (__import__("benchmarks.harness").harness.main,
                               ["--preset", "vit-tiny-digits", "--json", str(tmp / "b.json")]),
}


@pytest.mark.parametrize("cli", sorted(CLIS))
@pytest.mark.parametrize("source", ["--compile-cache", "HOME", "XDG_CACHE_HOME", "TWIN_MODELS_COMPILE_CACHE"])
def test_an_unwritable_compile_cache_is_one_error_line(tmp_path, capsys, monkeypatch, no_cache_configured,
                                                       cli, source):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    main, argv = CLIS[cli](tmp_path)
    if source == "--compile-cache":
        argv = [*argv, "--compile-cache", str(blocker / "cache")]
    else:
        monkeypatch.setenv(source, str(blocker))
    rc, err = _cli(capsys, main, argv)
    assert rc == 2
    _one_error(err, "compile cache", f"(from {'--compile-cache' if source == '--compile-cache' else '$' + source})",
               "--no-compile-cache")
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


@pytest.mark.parametrize("cli", sorted(CLIS) + ["benchmarks.sampling", "benchmarks.generation",
                                                "benchmarks.parallel"])
@pytest.mark.parametrize("count", ["0", "-2", "two"])
def test_a_zero_device_count_in_xla_flags_is_one_error_line(tmp_path, capsys, monkeypatch, cli, count):
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count={count}")
    if cli in CLIS:
        main, argv = CLIS[cli](tmp_path)
    else:
        main, argv = __import__(cli, fromlist=["main"]).main, []
    rc, err = _cli(capsys, main, argv)
    assert rc == 2
    _one_error(err, f"--xla_force_host_platform_device_count={count}", "positive integer")
    assert not os.listdir(tmp_path)


INT_FLAGS = ["--steps", "--epochs", "--batch-size", "--warmup-steps", "--checkpoint-every", "--eval-every",
             "--log-every", "--keep", "--max-bad-steps", "--seed"]


@pytest.mark.parametrize("flag", INT_FLAGS)
@pytest.mark.parametrize("value", [-1, "limit + 1", 2 ** 64])
def test_every_size_and_seed_flag_is_range_checked(tmp_path, capsys, flag, value):
    if value == "limit + 1":
        value = (SEED_RANGE[1] if flag == "--seed" else COUNT_LIMIT) + 1
    base = ["vit-tiny-digits", "--no-progress"] if flag == "--epochs" else TINY
    rc = train_main([*base, flag, str(value), "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    _one_error(err, flag, str(value))
    assert not (tmp_path / "run").exists()


def test_the_seed_range_is_what_every_generator_takes():
    lo, hi = SEED_RANGE
    np.random.default_rng([hi, 0])
    np.random.RandomState(hi)
    torch.manual_seed(hi)
    jax.random.key(hi)
    with pytest.raises(ValueError):
        np.random.default_rng([lo - 1, 0])


@pytest.mark.parametrize("argv, part", [
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--batch-size", "-3"], "--batch-size must be at least 1"),
    (["--seed", "-1"], "--seed must be an integer in [0, 4294967295]"),
    (["--seed", str(2 ** 32)], "--seed must be an integer in [0, 4294967295]"),
])
def test_verify_sizes_and_seeds(capsys, argv, part):
    rc, err = _cli(capsys, bridge_main, ["verify", "vit-tiny-digits", *argv])
    assert rc == 2
    _one_error(err, part)


def test_import_out_onto_a_file_or_its_own_input_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "model.safetensors"
    bridge.save_safetensors({"x": np.zeros(2, np.float32)}, ckpt)
    before = ckpt.read_bytes()
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    for out, part in ((existing, "is a file; give a folder"), (ckpt, "is a file; give a folder"),
                      (tmp_path, "would overwrite the input"), (existing / "sub", "cannot create or write")):
        rc, err = _cli(capsys, bridge_main, ["import", "--from", "timm", "--arch", "vit_base_patch16_224",
                                             str(ckpt), "--out", str(out)])
        assert rc == 2
        _one_error(err, f"--out {out}", part)
    assert existing.read_text() == "keep me" and ckpt.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "notes.txt"]


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--plot"])
def test_benchmark_outputs_are_checked_before_the_run(tmp_path, capsys, flag):
    folder = tmp_path / "out"
    folder.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    from benchmarks.harness import main

    for path, part in ((folder, "is a folder; give a file path"), (blocker / "x.json", "cannot write there")):
        rc, err = _cli(capsys, main, ["--preset", "vit-tiny-digits", flag, str(path)])
        assert rc == 2
        _one_error(err, f"{flag} {path}", part)
    assert sorted(os.listdir(tmp_path)) == ["a-file", "out"] and not os.listdir(folder)


def test_parallel_benchmark_json_onto_a_folder(tmp_path, capsys):
    from benchmarks.parallel import main

    rc, err = _cli(capsys, main, ["--json", str(tmp_path)])
    assert rc == 2
    _one_error(err, f"--json {tmp_path} is a folder")


# --- misleading messages --------------------------------------------------------------------------


def test_a_data_path_that_is_a_file_says_so(tmp_path, capsys):
    f = tmp_path / "digits.zip"
    f.write_bytes(b"PK")
    for spec, part in ((f"imagefolder:{f}", "is a file, not a folder"), (f"cifar10:{f}", "is a file, not a folder")):
        rc, err = _train(capsys, tmp_path, "--data", spec)
        assert rc == 2
        _one_error(err, part)
        assert "does not exist" not in err


@pytest.mark.parametrize("preset, spec, part", [
    ("vit-tiny-digits", "scenes", "is for the captioning and VQA presets"),
    ("vit-tiny-digits", "coco:/somewhere", "is for the captioning presets"),
    ("caption-scenes", "digits", "is an image source of the classification"),
    ("caption-scenes", "cifar10:/somewhere", "it has no captions"),
])
def test_a_data_spec_of_another_task_names_the_task(tmp_path, capsys, preset, spec, part):
    rc = train_main([preset, "--data", spec, "--steps", "1", "--no-progress", "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "run").exists()
    _one_error(err, part)
    assert "unknown" not in err


@pytest.mark.parametrize("preset, args, part", [
    ("clip-digits", ["--set", "vocab_size=10"], "the captions need"),
    ("caption-scenes", ["--recipe", "max_length=40", "--recipe", "num_train=16", "--recipe", "num_test=4",
                        "--batch-size", "4"],
     "max_length 40 must be in [1, max_positions - 1 = 31]"),
    ("vit-tiny-digits", ["--set", "num_heads=5"], "not divisible"),
    ("swin-digits", ["--set", "num_heads=[2]"], "one head count per stage"),
    ("ddpm-digits", ["--recipe", "beta_start=0.5", "--recipe", "beta_end=0.1"], "beta_start=0.5 is above beta_end=0.1"),
    ("ddpm-digits", ["--recipe", "ddim_steps=2000"], "DDIM takes at most the schedule's timesteps=1000"),
    ("ddpm-digits", ["--set", "in_channels=3"], "out_channels must equal in_channels"),
])
def test_errors_found_after_the_data_leave_no_workdir(tmp_path, capsys, preset, args, part):
    rc = train_main([preset, *args, "--steps", "1", "--no-progress", "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    _one_error(err, part)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", [-1, "vocab"])
def test_the_multimodal_transformers_question_ids_are_checked_in_both_backends(bad):
    """The multimodal transformer embeds the question itself (no CLIP text tower): the same check."""
    p = get_preset("mmt-vqa-scenes")
    vocab, size, channels = p.kwargs["vocab_size"], p.image_size, p.in_channels
    ids = np.array([[1, 2, vocab if bad == "vocab" else bad, 3]], np.int64)
    image = np.zeros((1, size, size, channels), np.float32)
    flax_model, torch_model = jax_models.create_model(p), torch_reference.create_model(p)
    with pytest.raises(ValueError) as flax_error:
        flax_model.init(jax.random.key(0), image, ids)
    with pytest.raises(ValueError) as torch_error:
        torch_model(torch.from_numpy(image.transpose(0, 3, 1, 2)), torch.from_numpy(ids))
    want = f"MultimodalTransformer expects token ids in [0, {vocab - 1}] (vocab_size {vocab}); got ids "
    assert str(flax_error.value).startswith(want) and str(flax_error.value) == str(torch_error.value)


def test_a_vqa_preset_the_scenes_do_not_fit_leaves_no_workdir(tmp_path, capsys):
    from train.__main__ import main

    workdir = tmp_path / "run"
    rc = main(["vqa-scenes", "--set", "num_answers=3", "--steps", "1", "--no-progress", "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert rc == 2 and not workdir.exists()
    _one_error(err, "the scenes have")
