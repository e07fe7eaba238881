"""Data: the built-in digits, an image folder per class, CIFAR-10 batches (and, through their
tasks, generated scenes with questions or captions, and COCO-style caption files).

Every source becomes an `ArrayDataset` of NHWC float32 images in [-1, 1] and int32 labels, with
any other per-example arrays in `extras` (question tokens, captions), held in memory. `batches`
walks one epoch in an order fixed by (seed, epoch) and gives each host its own share of every
global batch; `shard` splits a host's batch over its local devices.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Iterator

import jax
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
CIFAR_TRAIN_BATCHES = 5


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    images: np.ndarray  # (N, H, W, C) float32 in [-1, 1]
    labels: np.ndarray  # (N,) int32
    class_names: tuple[str, ...]
    extras: dict = dataclasses.field(default_factory=dict)  # name -> (N, ...) array, batched too

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        bad = {k: len(v) for k, v in self.extras.items() if len(v) != len(self.labels)}
        if bad:
            raise ValueError(f"{len(self.labels)} examples but extras of lengths {bad}")

    def rows(self, index) -> dict[str, np.ndarray]:
        """{'image', 'label', *extras} of the examples `index`."""
        return {"image": self.images[index], "label": self.labels[index],
                **{k: v[index] for k, v in self.extras.items()}}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---------------------------------------------------------------------------------------------
# Sources


def load(spec: str, image_size: int, in_channels: int) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) for `spec`: 'digits', 'imagefolder:DIR' or 'cifar10:DIR'."""
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return load_digits(image_size, in_channels)
    if kind == "imagefolder" and path:
        return load_imagefolder(path, image_size, in_channels)
    if kind == "cifar10" and path:
        return load_cifar10(path, image_size, in_channels)
    if kind in OTHER_TASKS_DATA:
        raise ValueError(f"--data {spec!r} is for {OTHER_TASKS_DATA[kind]}; this preset takes 'digits', "
                         "'imagefolder:DIR' or 'cifar10:DIR'")
    raise ValueError(f"unknown data spec {spec!r}; expected 'digits', 'imagefolder:DIR' or "
                     "'cifar10:DIR'")


# The data kinds of the tasks with their own sources (train.captions, train.tasks.vqa)
OTHER_TASKS_DATA = {"scenes": "the captioning and VQA presets (caption-scenes, vqa-scenes, mmt-vqa-scenes)",
                    "coco": "the captioning presets (caption-scenes)"}
IMAGE_DATA = {"digits", "imagefolder", "cifar10"}


def load_digits(image_size: int = 32, in_channels: int = 1) -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's 1,797 handwritten 8x8 digits, split 80/20 stratified with a fixed seed."""
    # scikit-learn on first use: importing it sets KMP_* variables in os.environ, which importing
    # this package must not do
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    images = (digits.images.astype(np.float32) / 16.0 * 255.0)[..., None]  # (N, 8, 8, 1)
    images = _fit(images, image_size, in_channels)
    labels = digits.target.astype(np.int32)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION,
                                           stratify=labels, random_state=SPLIT_SEED)
    names = tuple(str(i) for i in range(10))
    return (ArrayDataset(images[idx_train], labels[idx_train], names),
            ArrayDataset(images[idx_test], labels[idx_test], names))


def load_imagefolder(root: str, image_size: int, in_channels: int
                     ) -> tuple[ArrayDataset, ArrayDataset]:
    """ROOT/CLASS/*.png, or ROOT/train/CLASS/* and ROOT/test/CLASS/* when both exist.

    Classes are the sorted sub-folder names. Without train/ and test/ the images are split 80/20
    stratified with a fixed seed.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} " + ("is a file, not a folder of class sub-folders"
                                                             if os.path.exists(root) else "does not exist"))
    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        names = _class_folders(train_dir)
        test_names = _class_folders(test_dir)
        if test_names != names:
            raise ValueError(f"{train_dir} has classes {names} but {test_dir} has {test_names}")
        return (_read_folder(train_dir, names, image_size, in_channels),
                _read_folder(test_dir, names, image_size, in_channels))
    names = _class_folders(root)
    data = _read_folder(root, names, image_size, in_channels)
    return _stratified_split(data)


def load_cifar10(root: str, image_size: int = 32, in_channels: int = 3
                 ) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-10's python batches: ROOT/data_batch_1..5 (those present) and ROOT/test_batch.

    The files are pickles; they are read with an unpickler that builds only dicts, lists, bytes
    and numpy arrays, so a file that tries to run code fails to load.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"CIFAR-10 folder {root!r} " + ("is a file, not a folder" if os.path.exists(root)
                                                                else "does not exist"))
    train_files = [f"data_batch_{i}" for i in range(1, CIFAR_TRAIN_BATCHES + 1)]
    missing = [f for f in (*train_files, "test_batch") if not os.path.isfile(os.path.join(root, f))]
    if len(missing) == CIFAR_TRAIN_BATCHES + 1:
        raise FileNotFoundError(f"{root!r} has no CIFAR-10 python batches (expected "
                                "data_batch_1 ... data_batch_5 and test_batch)")
    if missing:
        raise FileNotFoundError(f"{root!r} lacks the CIFAR-10 batch(es) {', '.join(missing)} (expected "
                                "data_batch_1 ... data_batch_5 and test_batch, the whole training and test set)")
    names = tuple(f"class_{i}" for i in range(10))
    meta = os.path.join(root, "batches.meta")
    if os.path.exists(meta):
        raw = _safe_unpickle(meta).get(b"label_names")
        if raw:
            names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in raw)

    def read(files):
        images, labels = [], []
        for f in files:
            path = os.path.join(root, f)
            batch = _safe_unpickle(path)
            try:
                data, lab = batch[b"data"], batch[b"labels"]
            except KeyError as e:
                raise ValueError(f"{path}: not a CIFAR-10 batch (no {e.args[0]!r} entry)") from None
            data, lab = _cifar_arrays(path, data, lab)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(lab, np.int32))
        images = _fit(np.concatenate(images).astype(np.float32), image_size, in_channels)
        return ArrayDataset(images, np.concatenate(labels), names)

    return read(train_files), read(["test_batch"])


_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds "
                                     "only dicts, lists, bytes and numpy arrays")


def _cifar_arrays(path: str, data, labels) -> tuple[np.ndarray, np.ndarray]:
    """Checks one batch's entries: (N, 3072) uint8 pixels and N integer labels in 0..9."""
    data_ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 \
        and data.shape[1] == 3 * 32 * 32
    if not data_ok:
        kind = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise ValueError(f"{path}: malformed CIFAR-10 batch: 'data' is a {kind}; expected a "
                         "uint8 array of shape (N, 3072)")
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError):
        labels = np.asarray(None)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: malformed CIFAR-10 batch: 'labels' is not a list of integers")
    if len(labels) != len(data):
        raise ValueError(f"{path}: malformed CIFAR-10 batch: {len(data)} images but "
                         f"{len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: malformed CIFAR-10 batch: labels range "
                         f"{labels.min()}..{labels.max()}; expected 0..9")
    return data, labels.astype(np.int32)


def _safe_unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        try:
            obj = _DataUnpickler(f, encoding="bytes").load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: not a readable CIFAR-10 batch ({e})") from None
        except Exception as e:
            raise ValueError(f"{path}: not a readable CIFAR-10 batch (a malformed pickle: "
                             f"{type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def _class_folders(root: str) -> tuple[str, ...]:
    names = tuple(sorted(d for d in os.listdir(root)
                         if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")))
    if not names:
        raise ValueError(f"{root!r} has no class sub-folders (expected {root}/CLASS/IMAGE.png)")
    return names


def _read_folder(root: str, names: tuple[str, ...], image_size: int, in_channels: int
                 ) -> ArrayDataset:
    mode = {1: "L", 3: "RGB"}.get(in_channels)
    if mode is None:
        raise ValueError(f"images can be read with 1 or 3 channels, not {in_channels}")
    images, labels = [], []
    for label, name in enumerate(names):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        for f in files:
            images.append(_read_image(os.path.join(folder, f), mode, image_size))
            labels.append(label)
    if not images:
        raise ValueError(f"no images under {root!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return ArrayDataset(_normalize(np.stack(images)), np.asarray(labels, np.int32), names)


def _read_image(path: str, mode: str, image_size: int) -> np.ndarray:
    """One image as (image_size, image_size, C) float32 pixels in [0, 255], C from `mode` ('L' or
    'RGB'); an unreadable file or one of no known range is named with why."""
    try:
        with Image.open(path) as im:
            return image_pixels(im, mode, image_size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e) or type(e).__name__
        raise ValueError(f"{path}: not a readable image ({reason}); remove or replace it") from None


def image_pixels(im: Image.Image, mode: str, image_size: int) -> np.ndarray:
    """`im` resized to (image_size, image_size, C) float32 in [0, 255]. 16-bit images (mode I;16,
    or a PNG opened as I) are scaled from their range 0..65535, not clipped at 255; 32-bit integer
    (other I) and floating-point (F) pixels hold no known range and are refused."""
    channels = {"L": 1, "RGB": 3}[mode]
    if im.mode == "F" or (im.mode == "I" and im.format != "PNG"):
        kind = "floating-point" if im.mode == "F" else "32-bit integer"
        raise ValueError(f"{kind} pixels (mode {im.mode}) have no known range; save the image with 8 "
                         "or 16-bit pixels")
    if im.mode.startswith("I"):
        wide = np.asarray(im, np.float64)
        if wide.min() < 0 or wide.max() > 65535:
            raise ValueError(f"{im.mode} pixels range {wide.min():g}..{wide.max():g}, outside the 16-bit "
                             "range 0..65535")
        small = Image.fromarray((wide / 257.0).astype(np.float32), "F").resize((image_size, image_size),
                                                                               Image.BILINEAR)
        return np.repeat(np.asarray(small, np.float32)[..., None], channels, axis=-1)
    if im.mode in ("LA", "RGBA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")   # the image over black, as its transparent pixels show nothing
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im)
    im = im.convert(mode).resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(im, np.float32).reshape(image_size, image_size, channels)


def _stratified_split(data: ArrayDataset) -> tuple[ArrayDataset, ArrayDataset]:

    from sklearn.model_selection import train_test_split   # on first use, as in load_digits

    idx = np.arange(len(data))
    counts = np.bincount(data.labels, minlength=data.num_classes)
    stratify = data.labels if counts.min() >= 2 else None
    idx_train, idx_test = train_test_split(idx, test_size=TEST_FRACTION, stratify=stratify,
                                           random_state=SPLIT_SEED)
    pick = lambda i: ArrayDataset(data.images[i], data.labels[i], data.class_names)  # noqa: E731
    return pick(idx_train), pick(idx_test)


def _fit(images: np.ndarray, image_size: int, in_channels: int) -> np.ndarray:
    """(N, h, w, c) pixels in [0, 255] -> (N, size, size, in_channels) in [-1, 1], bilinear."""
    n, h, w, c = images.shape
    if c != in_channels:
        if c == 3 and in_channels == 1:
            images = images @ np.array([0.299, 0.587, 0.114], np.float32)[:, None]
        elif c == 1 and in_channels == 3:
            images = np.repeat(images, 3, axis=-1)
        else:
            raise ValueError(f"cannot turn {c}-channel images into {in_channels} channels")
    if (h, w) != (image_size, image_size):
        images = np.stack([
            np.stack([np.asarray(Image.fromarray(im[..., k], mode="F").resize(
                (image_size, image_size), Image.BILINEAR)) for k in range(in_channels)], -1)
            for im in images.astype(np.float32)])
    return _normalize(images)


def _normalize(pixels: np.ndarray) -> np.ndarray:
    return (np.asarray(pixels, np.float32) / 127.5 - 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Order, host shares and device shards


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Whole global batches in an epoch (the remainder of each shuffled epoch is dropped)."""
    steps = num_examples // global_batch_size
    if steps == 0:
        raise ValueError(f"global batch size {global_batch_size} is larger than the "
                         f"{num_examples} training examples")
    return steps


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the examples for `epoch`: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches(data: ArrayDataset, global_batch_size: int, seed: int, epoch: int,
            start: int = 0, process_index: int | None = None,
            process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """This host's share of the global batches of `epoch`, from batch `start` on.

    Yields {'image': (B/P, H, W, C) float32, 'label': (B/P,) int32} for P processes: host p
    takes rows [p*B/P, (p+1)*B/P) of every global batch, so the hosts together see the whole
    batch and the order does not depend on the number of hosts.
    """
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} does not split evenly over "
                         f"{process_count} processes ({global_batch_size} % {process_count} = "
                         f"{global_batch_size % process_count})")
    local = global_batch_size // process_count
    order = epoch_order(len(data), seed, epoch)
    for b in range(start, steps_per_epoch(len(data), global_batch_size)):
        rows = order[b * global_batch_size:(b + 1) * global_batch_size]
        rows = rows[process_index * local:(process_index + 1) * local]
        yield data.rows(rows)


def eval_batches(data: ArrayDataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The whole set in order, in batches of `batch_size`; the last is padded, with 'mask' 0."""
    for start in range(0, len(data), batch_size):
        batch = data.rows(slice(start, start + batch_size))
        n = len(batch["label"])
        pad = batch_size - n
        batch = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
        yield {**batch, "mask": (np.arange(batch_size) < n).astype(np.float32)}


def shard(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
    """(B, ...) -> (num_devices, B / num_devices, ...) for every array of `batch`."""
    def split(x):
        if x.shape[0] % num_devices:
            raise ValueError(f"a batch of {x.shape[0]} examples does not split evenly over "
                             f"{num_devices} local devices ({x.shape[0]} % {num_devices} = "
                             f"{x.shape[0] % num_devices}); pick a batch size that is a "
                             f"multiple of {num_devices}")
        return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])
    return {k: split(v) for k, v in batch.items()}
