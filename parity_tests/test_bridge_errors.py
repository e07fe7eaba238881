"""`python -m bridge verify` with weights that cannot be used: one line each, its own exit status
(3), distinct from a parity FAIL (1); non-finite outputs never pass; the converter refuses what it
cannot represent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bridge
import jax
import jax_models
import torch_reference
from bridge.__main__ import main


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "good.safetensors"
    bridge.save_safetensors(torch_reference.create_model("vit-digits").state_dict(), path)
    return path


def _run(capsys, *args):
    rc = main(["verify", "vit-digits", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("empty", "is empty"),
    ("truncated", "truncated or damaged"),
    ("text", "neither a safetensors file nor one torch.save wrote"),
    ("pickle", "need full unpickling"),
    ("renamed", "not a readable safetensors"),
])
def test_a_bad_weights_file_is_one_line_and_exit_status_3(tmp_path, capsys, good, case, message):
    path = tmp_path / "w.bin"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[:5000])
    elif case == "text":
        path.write_text("these are not weights")
    elif case == "pickle":
        torch.save({"model": torch.nn.Linear(2, 2)}, path)   # a module object: needs unpickling code
    elif case == "renamed":                                 # safetensors header, data cut: the content decides
        data = good.read_bytes()
        path = tmp_path / "w.pt"
        path.write_bytes(data[:len(data) // 2])
    rc, out, err = _run(capsys, "--weights", str(path))
    assert rc == 3 and message in err and "Traceback" not in err and "PASS" not in out, err
    assert err.count("\n") == 1, err


def test_wrong_keys_and_shapes_are_named_together(tmp_path, capsys, good):
    sd = bridge.load_safetensors(good)
    sd.pop("head.bias")
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["head.weight"] = np.zeros((5, 64), np.float32)
    sd["cls_token"] = np.zeros((1, 1, 64), np.int64)
    path = tmp_path / "bad.safetensors"
    bridge.save_safetensors(sd, path)
    rc, _, err = _run(capsys, "--weights", str(path))
    assert rc == 3
    for part in ("Missing key(s): head.bias", "Unexpected key(s): extra.weight", "head.weight: file (5, 64)",
                 "cls_token: file dtype int64"):
        assert part in err, err


def test_nonfinite_weights_never_pass(tmp_path, capsys, good):
    sd = bridge.load_safetensors(good)
    sd["blocks.0.mlp.0.weight"] = np.full_like(sd["blocks.0.mlp.0.weight"], np.nan)
    path = tmp_path / "nan.safetensors"
    bridge.save_safetensors(sd, path)
    rc, out, _ = _run(capsys, "--weights", str(path))
    assert rc == 1 and "FAIL (non-finite" in out and "PASS" not in out
    rc, out, _ = _run(capsys, "--weights", str(good))
    assert rc == 0 and "PASS" in out


def test_the_converter_refuses_what_it_cannot_represent():
    fm = jax_models.create_model("vit-digits")
    sd = {k: v.numpy() for k, v in torch_reference.create_model("vit-digits").state_dict().items()}
    x = np.zeros((1, 32, 32, 1), np.float32)
    with pytest.raises(bridge.WeightMismatchError, match="head.weight: torch dtype complex64"):
        bridge.torch_to_flax({**sd, "head.weight": sd["head.weight"].astype(np.complex64)}, fm, x)
    with pytest.raises(bridge.WeightMismatchError, match="cls_token: torch dtype int32"):
        bridge.torch_to_flax({**sd, "cls_token": sd["cls_token"].astype(np.int32)}, fm, x)
    params = fm.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="not the params alone"):
        bridge.flax_to_torch(params)
