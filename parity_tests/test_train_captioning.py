"""The captioning task: corpus BLEU-4 against a hand-computed case, scene captions checked against
their object lists, the COCO-style reader on a folder the test writes (and its errors, from the
library and the CLI), a short COCO run, and greedy and beam decodes of trained weights equal token
for token between the backends."""

from __future__ import annotations

import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from train import captions
from train.tasks import captioning

# A small captioner (the preset's 48x48 scenes, narrower and shallower towers).
TINY = dict(vision_width=32, vision_layers=1, vision_heads=2, width=32, layers=1, heads=2)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from a second thread; on a shared 2-core machine two OpenMP threads
    that wait for each other are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Metrics


def test_corpus_bleu_hand_computed():
    """Two hypotheses, the first with two references (clipping takes the most of an n-gram in any
    one reference), the second shorter than any 3-gram.

    hyp 1 "the cat sat on the mat", refs "the cat sat on a mat" / "there is a cat on the mat":
      1-grams: the (2, clipped to 1), cat, sat, on, mat -> 5 of 6
      2-grams: the cat, cat sat, sat on (ref 1), on the, the mat (ref 2)  -> 5 of 5
      3-grams: the cat sat, cat sat on, on the mat; not sat on the       -> 3 of 4
      4-grams: the cat sat on; not cat sat on the, sat on the mat        -> 1 of 3
    hyp 2 "a dog", ref "a dog runs": 1-grams 2 of 2, 2-grams 1 of 1, no 3- or 4-grams.
    p = 7/8, 6/6, 3/4, 1/3; c = 8, r = 6 (closest of 6 and 7) + 3 = 9: BP = exp(1 - 9/8).
    BLEU-4 = exp(-1/8) * (7/8 * 1 * 3/4 * 1/3) ** (1/4) = exp(-1/8) * (7/32) ** (1/4) = 0.60353."""
    hyps = ["the cat sat on the mat".split(), "a dog".split()]
    refs = [["the cat sat on a mat".split(), "there is a cat on the mat".split()], ["a dog runs".split()]]
    got = captions.corpus_bleu(hyps, refs)
    assert got["precisions"] == pytest.approx([7 / 8, 1.0, 3 / 4, 1 / 3])
    assert (got["hypothesis_length"], got["reference_length"]) == (8, 9)
    assert got["brevity_penalty"] == pytest.approx(math.exp(-1 / 8))
    assert got["bleu"] == pytest.approx(0.60353, abs=1e-5)
    assert got["bleu"] == pytest.approx(math.exp(-1 / 8) * (7 / 32) ** 0.25, rel=1e-12)
    # identical corpora score 1; no matching 4-gram scores 0 (no smoothing); equally close
    # references count the shorter; longer hypotheses get no penalty
    assert captions.corpus_bleu([hyps[0]], [[hyps[0]]])["bleu"] == 1.0
    assert captions.corpus_bleu([hyps[0]], [[refs[0][1]]])["bleu"] == 0.0
    tie = captions.corpus_bleu(["a b c d e".split()], [["a b c d".split(), "a b c d e f".split()]])
    assert tie["reference_length"] == 4 and tie["brevity_penalty"] == 1.0
    assert captions.exact_match(["a b", "c", "d"], [("x", "a b"), ("c d",), ("d",)]) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------
# Scenes


def test_scene_captions_name_the_objects_left_to_right():
    """Every caption, read back from its tokens, lists the scene's objects by increasing x (then y), and
    the tokenizer is the model's: bos and eos are the decoder's, nothing is <unk>, and the longest
    caption fits the recipe's max_length."""
    from twin_models.presets import get_preset

    p = get_preset("caption-scenes")
    recipe = {**p.train, "num_train": 40, "num_test": 10, "num_objects": (1, 6)}
    train, test = captions.load("scenes", p.image_size, p.in_channels, recipe)
    assert train.images.shape == (40, 48, 48, 3) and len(test) == 10 and test.extras["objects"].shape == (10,)
    tok = captioning.caption_tokenizer("scenes", train.extras["references"], p.kwargs["vocab_size"],
                                       recipe["max_length"] + 1)
    assert tok.vocab_size == p.kwargs["vocab_size"] and (tok.sot_id, tok.eot_id) == (35, 36)
    for refs, objs in zip(test.extras["references"], test.extras["objects"]):
        (caption,) = refs
        ids = tok(caption)[0]
        assert tok.unk_id not in ids and tok.eot_id in ids and tok.decode(ids) == caption
        named = re.findall(r"a (\w+) (square|circle)", caption)
        by_x = sorted(objs, key=lambda o: (o["x"], o["y"]))   # same column: top first
        assert named == [(o["color"], o["shape"]) for o in by_x]
        assert caption.count(" and ") == (len(objs) > 1) and caption.count(",") == max(len(objs) - 2, 0)
    longest = "a red circle , a red circle , a red circle , a red circle , a red circle and a red circle"
    assert len(tok.encode(longest)) == 25 == recipe["max_length"] + 1
    with pytest.raises(ValueError, match="need a vocabulary of 37 ids; the model has vocab_size 30"):
        captioning.caption_tokenizer("scenes", [], 30, 25)


# ---------------------------------------------------------------------------------------------
# COCO-style caption files

COLORS = {"red": (220, 0, 0), "blue": (0, 0, 220), "green": (0, 200, 0)}


def write_coco(root, splits: dict[str, list[tuple[str, list[str]]]], folder="{split}"):
    """root/annotations/captions_SPLIT.json and one flat-coloured PNG per image in `folder`."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    ann_id = 0
    for split, entries in splits.items():
        images, annotations = [], []
        where = os.path.join(root, folder.format(split=split))
        os.makedirs(where, exist_ok=True)
        for i, (color, caps) in enumerate(entries):
            name = f"{split}_{i:03d}.png"
            Image.new("RGB", (20, 12), COLORS[color]).save(os.path.join(where, name))
            images.append({"id": 1000 + i, "file_name": name, "width": 20, "height": 12})
            for c in caps:
                annotations.append({"id": ann_id, "image_id": 1000 + i, "caption": c})
                ann_id += 1
        with open(os.path.join(root, "annotations", f"captions_{split}.json"), "w") as f:
            json.dump({"info": {}, "images": images, "annotations": annotations}, f)


def coco_entries(n, seed):
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        color = list(COLORS)[rs.randint(3)]
        out.append((color, [f"a {color} picture", f"something {color}"][: 1 + rs.randint(2)]))
    return out


def test_coco_reader_splits_and_references(tmp_path):
    write_coco(tmp_path, {"train2017": coco_entries(6, 0), "val2017": coco_entries(3, 1)})
    train, test = captions.load(f"coco:{tmp_path}", 8, 3, {})
    assert train.images.shape == (6, 8, 8, 3) and test.images.shape == (3, 8, 8, 3)
    for data, entries in ((train, coco_entries(6, 0)), (test, coco_entries(3, 1))):
        assert [list(r) for r in data.extras["references"]] == [caps for _, caps in entries]
        for im, (color, _) in zip(data.images, entries):
            np.testing.assert_allclose(im, np.broadcast_to(np.array(COLORS[color]) / 127.5 - 1, im.shape), atol=1e-6)
    # one caption file, images under images/: split 80/20 by image (captions stay with theirs)
    write_coco(tmp_path / "one", {"all": coco_entries(10, 2)}, folder="images")
    train, test = captions.load(f"coco:{tmp_path / 'one'}", 8, 1, {})
    assert (len(train), len(test)) == (8, 2) and train.images.shape[-1] == 1
    assert sorted(map(tuple, [*train.extras["references"], *test.extras["references"]])) == \
        sorted(tuple(c) for _, c in coco_entries(10, 2))
    tok = captioning.caption_tokenizer("coco", train.extras["references"], 12, 8)
    assert tok.vocab_size == 12 and tok.vocab[-3] == "<unused1>" and tok.decode(tok("a red picture")[0]) == "a red picture"


def _error(tmp_path, capsys, root, match):
    """The library raises and the CLI prints one `error:` line naming what was expected, exit 2."""
    from train.__main__ import main

    with pytest.raises((ValueError, FileNotFoundError), match=match):
        captions.load(f"coco:{root}", 8, 3, {})
    rc = main(["caption-scenes", "--data", f"coco:{root}", "--steps", "1", "--no-progress",
               "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and re.search(match, err), err


def test_coco_bad_input_is_a_clear_error(tmp_path, capsys):
    _error(tmp_path, capsys, tmp_path / "none", "COCO folder .* does not exist; expected DIR/annotations/captions_SPLIT")
    os.makedirs(tmp_path / "bare")
    _error(tmp_path, capsys, tmp_path / "bare", r"has no annotations/captions_\*\.json")
    write_coco(tmp_path / "empty", {"train": []})
    _error(tmp_path, capsys, tmp_path / "empty", r"captions_train\.json: holds no captions .* expected DIR/annotations")
    os.makedirs(tmp_path / "blank" / "annotations")
    open(tmp_path / "blank" / "annotations" / "captions_train.json", "w").close()
    _error(tmp_path, capsys, tmp_path / "blank", r"captions_train\.json: not a COCO caption file .* expected")
    write_coco(tmp_path / "gone", {"train2017": coco_entries(4, 0)})
    os.remove(tmp_path / "gone" / "train2017" / "train2017_002.png")
    _error(tmp_path, capsys, tmp_path / "gone",
           r"names 4 images; 1 of them are not in .*train2017 .*: train2017_002\.png; expected")


@pytest.mark.slow
def test_coco_run_writes_report_tokenizer_and_picture(tmp_path):
    """A short run on a COCO folder (slow: the reader, its splits and its errors are tested in the
    default run; the run itself is the scenes' run of test_trainer.py with other data)."""
    from twin_models.tokenizer import Tokenizer
    from train.loop import Config, run

    write_coco(tmp_path / "coco", {"train2017": coco_entries(16, 0), "val2017": coco_entries(4, 1)})
    s = run(Config(preset="caption-scenes", data=f"coco:{tmp_path / 'coco'}", steps=2, batch_size=8,
                   progress=False, workdir=str(tmp_path / "run"), model_overrides=TINY))
    assert 0 <= s["exact_match"] <= 1 and 0 <= s["bleu4"] <= 1 and s["eval_examples"] == 4
    tok = Tokenizer.load(tmp_path / "run")
    assert tok.vocab_size == 37 and "picture" in tok.vocab and "<unused0>" in tok.vocab
    assert Image.open(s["grid"]).size[1] > 4 * 48


# ---------------------------------------------------------------------------------------------
# Trained weights: the two backends decode alike


def test_trained_weights_decode_alike_in_both_backends(tmp_path):
    """A small captioner trained for 40 steps by the JAX trainer (its exported weights), loaded into
    both twins: greedy and beam search give the same tokens for held-out scenes, and the greedy
    decisions are not near ties (their top-1 - top-2 logit gap dwarfs the forward tolerance). The
    scenes are the generator's default (9 px objects): with the preset's 15 px, one of these 12
    greedy decisions is a near tie (gap 7.7e-5), where equal tokens would prove nothing."""
    import bridge
    import jax_models
    import torch_reference
    from bridge.verify import FORWARD_TOL
    from jax_models import captioning as J
    from train.loop import Config, resolve, run

    config = Config(preset="caption-scenes", steps=40, batch_size=32, progress=False, workdir=str(tmp_path),
                    export=str(tmp_path / "w.safetensors"), model_overrides=TINY,
                    recipe_overrides=dict(num_train=1920, num_test=12, object_size=9), warmup_steps=10, lr=3e-3)
    s = run(config)
    assert s["final_loss"] < 2.0, s["final_loss"]   # down from ln 37 = 3.6
    r = resolve(config)
    tm = torch_reference.create_model(r.preset).eval()
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in bridge.load_safetensors(s["export"]).items()}, strict=True)
    fm = jax_models.create_model(r.preset)
    x = r.test_data.images
    variables = bridge.torch_to_flax(tm.state_dict(), fm, jnp.asarray(x[:1]), jnp.zeros((1, 2), jnp.int32))
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    for num_beams in (1, 3):
        t = tm.generate(xt, 24, num_beams=num_beams).numpy()
        f = np.asarray(J.generate(fm, variables, jnp.asarray(x), 24, num_beams=num_beams))
        np.testing.assert_array_equal(f, t, err_msg=f"num_beams={num_beams}")
        assert (t == 36).any(1).all(), "every trained caption should end with eos"
        if num_beams == 1:
            greedy = t
    with torch.no_grad():
        logits = tm(xt, torch.from_numpy(greedy[:, :-1])).double()
    ends = np.argmax(greedy[:, 1:] == 36, axis=1)
    gaps = [float((lambda v: (v[0] - v[1]) / row.abs().max())(row.topk(2).values))
            for b in range(len(greedy)) for row in logits[b, : ends[b] + 1]]
    print(f"{s['final_loss']=:.3f} exact {s['exact_match']:.2f}; smallest greedy logit gap / max |logit| {min(gaps):.2e}")
    assert min(gaps) > 10 * FORWARD_TOL
