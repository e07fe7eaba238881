"""train.data: the digits, the image-folder and CIFAR-10 readers, order, host shares, shards."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from train import data


def test_digits_split_is_fixed_stratified_and_scaled():
    train, test = data.load_digits(32, 1)
    assert train.images.shape == (1437, 32, 32, 1) and test.images.shape == (360, 32, 32, 1)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
    assert -1.0 <= train.images.min() and train.images.max() <= 1.0
    counts = np.bincount(test.labels)
    assert counts.sum() == 360 and abs(counts - 36).max() <= 1
    train2, test2 = data.load_digits(32, 1)
    assert np.array_equal(test.labels, test2.labels)
    assert np.array_equal(test.images, test2.images)


def test_load_spec_errors():
    with pytest.raises(ValueError, match="unknown data spec"):
        data.load("mnist", 32, 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load("imagefolder:/nonexistent/folder", 32, 1)


def _write_images(root, classes, per_class, size=(12, 10), mode="RGB"):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                os.path.join(root, c, f"{i}.png"))


def test_imagefolder_split_and_resize(tmp_path):
    _write_images(tmp_path, ["cat", "dog", "emu"], 10)
    (tmp_path / "notes.txt").write_text("not a class")
    train, test = data.load(f"imagefolder:{tmp_path}", 16, 3)
    assert train.class_names == ("cat", "dog", "emu")
    assert len(train) == 24 and len(test) == 6
    assert train.images.shape == (24, 16, 16, 3)
    assert np.array_equal(np.bincount(test.labels), [2, 2, 2])
    gray, _ = data.load(f"imagefolder:{tmp_path}", 8, 1)
    assert gray.images.shape == (24, 8, 8, 1)


def test_imagefolder_train_test_folders(tmp_path):
    _write_images(tmp_path / "train", ["a", "b"], 3, mode="L")
    _write_images(tmp_path / "test", ["a", "b"], 2, mode="L")
    train, test = data.load_imagefolder(str(tmp_path), 8, 1)
    assert len(train) == 6 and len(test) == 4
    assert list(test.labels) == [0, 0, 1, 1]
    pixel = np.asarray(Image.open(tmp_path / "test" / "b" / "1.png").resize((8, 8),
                                                                            Image.BILINEAR))
    np.testing.assert_allclose(test.images[3, ..., 0], pixel / 127.5 - 1, atol=1e-6)


def test_imagefolder_empty_is_an_error(tmp_path):
    os.makedirs(tmp_path / "a")
    with pytest.raises(ValueError, match="no images"):
        data.load_imagefolder(str(tmp_path), 8, 1)


@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "empty"])
def test_imagefolder_unreadable_file_is_named(tmp_path, damage):
    _write_images(tmp_path, ["a", "b"], 3)
    bad = tmp_path / "b" / "1.png"
    raw = bad.read_bytes()
    bad.write_bytes({"truncated": raw[: len(raw) // 2], "not_an_image": b"just some notes\n",
                     "empty": b""}[damage])
    with pytest.raises(ValueError, match=rf"{bad}: not a readable image \(.+\); remove"):
        data.load_imagefolder(str(tmp_path), 8, 3)


def _write_cifar(root, n_train=(2, 2, 2, 2, 2), n_test=5):
    rng = np.random.default_rng(1)
    os.makedirs(root, exist_ok=True)
    batches = {f"data_batch_{i + 1}": n for i, n in enumerate(n_train)}
    batches["test_batch"] = n_test
    written = {}
    for name, n in batches.items():
        d = {b"batch_label": name.encode(), b"labels": list(rng.integers(0, 10, n)),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [b"x.png"] * n}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(d, f, protocol=2)
        written[name] = d
    with open(os.path.join(root, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return written


def test_cifar10_batches(tmp_path):
    written = _write_cifar(str(tmp_path))
    train, test = data.load(f"cifar10:{tmp_path}", 32, 3)
    assert train.images.shape == (10, 32, 32, 3) and test.images.shape == (5, 32, 32, 3)
    assert test.class_names[3] == "c3"
    first = written["data_batch_1"][b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_allclose(train.images[0], first / 127.5 - 1, atol=1e-6)
    assert list(test.labels) == [int(v) for v in written["test_batch"][b"labels"]]
    gray, _ = data.load_cifar10(str(tmp_path), 16, 1)
    assert gray.images.shape == (10, 16, 16, 1)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    _write_cifar(str(tmp_path))
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        data.load_cifar10(str(tmp_path))


@pytest.mark.parametrize("entries, message", [
    ({b"data": [b"abc"] * 5, b"labels": [0] * 5}, "'data' is a list; expected a uint8 array"),
    ({b"data": np.zeros((5, 3072), np.float64), b"labels": [0] * 5}, "float64 array of shape"),
    ({b"data": np.zeros((5, 100), np.uint8), b"labels": [0] * 5}, r"shape \(5, 100\)"),
    ({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0] * 4}, "5 images but 4 labels"),
    ({b"data": np.zeros((5, 3072), np.uint8), b"labels": 7}, "not a list of integers"),
    ({b"data": np.zeros((5, 3072), np.uint8), b"labels": ["x"] * 5}, "not a list of integers"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 12]}, r"labels range 3\.\.12"),
    ({b"labels": [0]}, "no b'data' entry"),
])
def test_cifar10_malformed_batch(tmp_path, entries, message):
    _write_cifar(str(tmp_path))
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump(entries, f, protocol=2)
    with pytest.raises(ValueError, match=rf"data_batch_2: .*{message}"):
        data.load_cifar10(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_cifar10_unreadable_pickle(tmp_path, damage):
    _write_cifar(str(tmp_path))
    path = tmp_path / "test_batch"
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 3], "garbage": bytes(range(256)) * 4,
                      "empty": b""}[damage])
    with pytest.raises(ValueError, match="test_batch: not a readable CIFAR-10 batch"):
        data.load_cifar10(str(tmp_path))


def test_cifar10_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 python batches"):
        data.load_cifar10(str(tmp_path))


def _toy(n=50):
    return data.ArrayDataset(np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1),
                             np.arange(n, dtype=np.int32), ("x",))


def test_order_depends_on_seed_and_epoch_only():
    a = [b["label"] for b in data.batches(_toy(), 10, seed=3, epoch=1, process_index=0,
                                          process_count=1)]
    b = [b["label"] for b in data.batches(_toy(), 10, seed=3, epoch=1, process_index=0,
                                          process_count=1)]
    c = [b["label"] for b in data.batches(_toy(), 10, seed=3, epoch=2, process_index=0,
                                          process_count=1)]
    assert len(a) == 5 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    assert sorted(np.concatenate(a)) == list(range(50))
    resumed = [b["label"] for b in data.batches(_toy(), 10, seed=3, epoch=1, start=3,
                                                process_index=0, process_count=1)]
    assert all(np.array_equal(x, y) for x, y in zip(a[3:], resumed))


def test_each_host_reads_its_share_of_the_global_batch():
    whole = list(data.batches(_toy(), 12, seed=0, epoch=0, process_index=0, process_count=1))
    shares = [list(data.batches(_toy(), 12, seed=0, epoch=0, process_index=p,
                                process_count=3)) for p in range(3)]
    assert len(whole) == 4
    for i, batch in enumerate(whole):
        parts = [shares[p][i]["label"] for p in range(3)]
        assert all(len(x) == 4 for x in parts)
        assert np.array_equal(np.concatenate(parts), batch["label"])
    with pytest.raises(ValueError, match="does not split evenly over 5 processes"):
        next(data.batches(_toy(), 12, seed=0, epoch=0, process_index=0, process_count=5))


def test_shard_and_its_error():
    batch = {"image": np.zeros((16, 4, 4, 1)), "label": np.arange(16)}
    out = data.shard(batch, 8)
    assert out["image"].shape == (8, 2, 4, 4, 1) and out["label"][3].tolist() == [6, 7]
    with pytest.raises(ValueError, match=r"batch of 12 examples does not split evenly over 8 "
                                         r"local devices \(12 % 8 = 4\)"):
        data.shard({"label": np.arange(12)}, 8)


def test_batch_larger_than_data():
    with pytest.raises(ValueError, match="larger than the 50 training examples"):
        data.steps_per_epoch(50, 64)


def test_eval_batches_pad_and_mask():
    out = list(data.eval_batches(_toy(10), 4))
    assert [b["mask"].sum() for b in out] == [4, 4, 2]
    assert out[-1]["label"].shape == (4,) and out[-1]["image"].shape == (4, 1, 1, 1)
