"""The generated scenes: determinism, what the pixels show, answers recomputed from the object
lists, captions, the tokenizer, and errors on options that cannot be met."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from twin_models import presets
from train import scenes


@pytest.fixture(scope="module")
def data():
    return scenes.make_vqa(60, seed=3)


def test_deterministic_from_the_seed():
    a_img, a_obj = scenes.make_scenes(5, seed=7)
    b_img, b_obj = scenes.make_scenes(5, seed=7)
    c_img, _ = scenes.make_scenes(5, seed=8)
    assert np.array_equal(a_img, b_img) and a_obj == b_obj and not np.array_equal(a_img, c_img)
    assert a_img.dtype == np.float32 and a_img.shape == (5, 32, 32, 3)
    assert a_img.min() == -1.0 and a_img.max() == 1.0
    q1 = scenes.make_questions(a_obj, 32, seed=1, per_scene=10)
    assert q1 == scenes.make_questions(b_obj, 32, seed=1, per_scene=10) and len(q1) == 50


@pytest.mark.parametrize("image_size, num_objects, cell",
                         [(32, 6, None), (48, 4, None), (75, 6, None), (40, 6, 10)])
def test_pixels_show_the_object_lists(image_size, num_objects, cell):
    """Each object's box holds only its colour (and ground at a circle's corners); every other
    pixel is ground; colours are distinct; boxes are a pixel apart; no centre on a midline; with
    `cell`, each box inside its own cell."""
    images, objects = scenes.make_scenes(20, seed=1, image_size=image_size, num_objects=num_objects,
                                         object_size=7 if cell else None, cell=cell)
    unit = lambda rgb: np.array(rgb, np.uint8) / np.float32(127.5) - 1   # as the images are made
    ground = unit(scenes.GROUND)
    for img, objs in zip(images, objects):
        assert len(objs) == num_objects and len({o["color"] for o in objs}) == num_objects
        covered = np.zeros(img.shape[:2], bool)
        for o in objs:
            s = o["size"]
            r0, c0 = int(o["y"] - s / 2), int(o["x"] - s / 2)
            assert (r0 + s / 2, c0 + s / 2) == (o["y"], o["x"]) and 0 <= r0 and r0 + s <= image_size
            assert o["x"] != image_size / 2 and o["y"] != image_size / 2
            box = img[r0:r0 + s, c0:c0 + s]
            is_color = np.all(box == unit(scenes.COLORS[o["color"]]), axis=-1)
            is_ground = np.all(box == ground, axis=-1)
            assert np.all(is_color | is_ground)
            assert is_color.all() == (o["shape"] == "square")
            if o["shape"] == "circle":
                assert not is_color[0, 0] and is_color[s // 2].all() and is_color[:, s // 2].all()
            covered[r0:r0 + s, c0:c0 + s] = True
            if cell:
                assert r0 // cell == (r0 + s) // cell and c0 // cell == (c0 + s) // cell
        assert np.all(img[~covered] == ground)
        for a, b in itertools.combinations(objs, 2):
            assert max(abs(a["x"] - b["x"]), abs(a["y"] - b["y"])) >= a["size"] + 1
            if cell:
                assert (a["x"] // cell, a["y"] // cell) != (b["x"] // cell, b["y"] // cell)


def test_a_range_of_object_counts():
    """num_objects=(lo, hi) draws each scene's count from lo..hi; questions that need another
    object (closest, furthest) are not asked about a lone one."""
    _, objects = scenes.make_scenes(200, seed=2, num_objects=(1, 4))
    assert {len(o) for o in objects} == {1, 2, 3, 4}
    data = scenes.make_vqa(40, seed=2, num_objects=(1, 6))
    for i, fam in zip(data.image_index, data.family):
        assert fam not in ("closest_shape", "furthest_shape") or len(data.objects[i]) > 1


def recompute(objs, q, image_size):
    """The answer from the object list alone, written independently of `scenes.answer`."""
    me = [o for o in objs if o["color"] == q["color"]][0]
    rest = [o for o in objs if o is not me]
    dist = lambda o: np.hypot(o["x"] - me["x"], o["y"] - me["y"])
    return {
        "shape": me["shape"],
        "horizontal": "left" if me["x"] < image_size / 2 else "right",
        "vertical": "top" if me["y"] < image_size / 2 else "bottom",
        "closest_shape": min(rest, key=dist)["shape"],
        "furthest_shape": max(rest, key=dist)["shape"],
        "count_same_shape": str(len([o for o in objs if o["shape"] == me["shape"]])),
    }[q["family"]]


def test_every_answer_is_checkable_from_the_object_list(data):
    assert len(data) > 30 * 60
    for i, (q, a, rel, fam) in enumerate(zip(data.questions, data.answers, data.relational, data.family)):
        objs = data.objects[data.image_index[i]]
        color = next(c for c in scenes.COLORS if f" {c} " in q)
        expect = recompute(objs, {"color": color, "family": fam}, 32)
        assert scenes.ANSWERS[a] == expect, (q, objs)
        assert rel == (fam in ("closest_shape", "furthest_shape", "count_same_shape"))
        assert q == scenes.FAMILIES[fam][1].format(color)
    assert set(data.family) == set(scenes.FAMILIES)
    assert 0.4 < data.relational.mean() < 0.6


def test_ties_are_not_asked():
    """A tie for closest between objects of different shapes has no answer; it is not asked."""
    objs = [dict(color="red", shape="square", x=10.5, y=10.5, size=5),
            dict(color="blue", shape="circle", x=20.5, y=10.5, size=5),
            dict(color="green", shape="square", x=0.5, y=10.5, size=5)]
    assert scenes.answer(objs, "red", "closest_shape", 32) is None
    assert scenes.answer(objs, "red", "furthest_shape", 32) is None
    asked = scenes.make_questions([objs], 32, seed=0)
    assert not any(q["color"] == "red" and q["family"] in ("closest_shape", "furthest_shape") for q in asked)
    assert len(asked) == 3 * 6 - 2


def test_tokens_and_answers(data):
    tok = scenes.scenes_tokenizer()
    assert tok.vocab_size == presets.SCENES_VOCAB_SIZE and tok.context_length == presets.SCENES_CONTEXT_LENGTH
    assert len(scenes.ANSWERS) == presets.SCENES_NUM_ANSWERS
    assert data.tokens.dtype == np.int32 and data.tokens.shape == (len(data), scenes.CONTEXT_LENGTH)
    assert tok.unk_id not in data.tokens
    assert all(tok.decode(t) == q for t, q in zip(data.tokens[:50], data.questions))
    assert np.all(data.tokens.argmax(-1) == (data.tokens > 0).sum(-1) - 1)   # eot last, padding after
    for preset in ("vqa-scenes", "mmt-vqa-scenes"):
        p = presets.get_preset(preset)
        assert p.kwargs["vocab_size"] == tok.vocab_size and p.kwargs["num_answers"] == len(scenes.ANSWERS)
        assert p.task == "vqa" and p.train["data"] == "scenes"


def test_scene_caption_left_to_right():
    objs = [dict(color="gray", shape="circle", x=25.5, y=3.5, size=7),
            dict(color="red", shape="circle", x=4.5, y=20.5, size=7),
            dict(color="blue", shape="square", x=14.5, y=9.5, size=7)]
    assert scenes.scene_caption(objs) == "a red circle , a blue square and a gray circle"
    assert scenes.scene_caption(objs[:1]) == "a gray circle"
    assert scenes.scene_caption(objs[:2]) == "a red circle and a gray circle"
    tok = scenes.scenes_tokenizer(context_length=40)
    _, many = scenes.make_scenes(3, seed=0)
    for objs in many:
        caption = scenes.scene_caption(objs)
        assert tok.decode(tok(caption)[0]) == caption
        xs = [o["x"] for o in sorted(objs, key=lambda o: caption.index(f"{o['color']} {o['shape']}"))]
        assert xs == sorted(xs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_objects=7), r"num_objects must be between 1 and 6 .* got 7"),
    (dict(num_objects=0), r"num_objects must be between 1 and 6 .* got 0"),
    (dict(num_objects=(3, 2)), r"or a pair lo <= hi in that range; got \(3, 2\)"),
    (dict(image_size=16, object_size=7), r"cannot place 6 objects of size 7 without overlap in a 16x16 image"),
    (dict(image_size=8, object_size=9), r"object_size must be between 1 and the image size 8; got 9"),
    (dict(image_size=40, object_size=7, cell=12), r"cell must divide the image size 40, .* got cell 12"),
    (dict(image_size=40, object_size=10, cell=10), r"exceed object_size 10 .* got cell 10"),
    (dict(image_size=20, object_size=7, cell=10), r"leave at least 6 cells; got cell 10"),
])
def test_options_that_cannot_be_met(kwargs, message):
    with pytest.raises(ValueError, match=message):
        scenes.make_scenes(2, seed=0, **kwargs)


# --- the vqa task's data and report -------------------------------------------------------------


def _resolve(tmp_path, data=None, model=None, **recipe):
    from train.loop import Config, resolve
    return resolve(Config(preset="vqa-scenes", workdir=str(tmp_path), progress=False, data=data,
                          model_overrides=model or {},
                          recipe_overrides={"num_scenes": 3, "num_test_scenes": 2, **recipe}))


def test_scenes_data_is_a_fixed_split_of_questions_on_shared_images(tmp_path):
    r = _resolve(tmp_path)
    train, test = r.train_data, r.test_data
    assert len(train.images) == 3 and len(test.images) == 2
    assert len(train) > 3 * 20 and train.num_classes == len(scenes.ANSWERS)
    rows = train.rows(np.array([0, len(train) - 1]))
    assert np.array_equal(rows["image"], train.images[[0, 2]])
    assert rows["question"].shape == (2, presets.SCENES_CONTEXT_LENGTH)
    again = _resolve(tmp_path / "again")
    assert np.array_equal(again.test_data.images, test.images)
    assert not np.array_equal(train.images[:2], test.images)


@pytest.mark.parametrize("recipe, message", [
    (dict(num_objects=7), "num_objects must be between 1 and 6"),
    (dict(num_scenes=0), r"num_scenes=0: num_scenes must be an integer in \[1, "),
    (dict(model={"context_length": 8}), "the longest question has 14 tokens; preset 'vqa-scenes' has "
                                        "context_length 8"),
    (dict(data="digits"), "expected --data scenes, got 'digits'"),
    (dict(model={"vocab_size": 30}), "the scenes' questions need 37 token ids; preset 'vqa-scenes' has "
                                     "vocab_size 30"),
])
def test_scenes_options_that_cannot_be_met_are_named(tmp_path, recipe, message):
    """Before anything is trained (the model's sizes are checked in the task's setup)."""
    with pytest.raises(ValueError, match=message):
        _resolve(tmp_path, **recipe).set_up()


def test_train_num_objects_changes_the_training_scenes_alone(tmp_path):
    """`train_num_objects=[2, 3]`: every training scene holds 2 or 3 objects (one shape question
    per object), the held-out scenes keep `num_objects`; a bad value is named."""
    from train.tasks.vqa import FAMILIES

    r = _resolve(tmp_path, num_scenes=12, train_num_objects=[2, 3])

    def objects_per_scene(data):
        shape = data.extras["family"] == FAMILIES.index("shape")
        return np.bincount(data.image_index[shape], minlength=len(data.images))

    assert set(objects_per_scene(r.train_data)) == {2, 3}
    assert set(objects_per_scene(r.test_data)) == {6}
    with pytest.raises(ValueError, match=r"train_num_objects=\[3, 2\]: train_num_objects must be null"):
        _resolve(tmp_path / "bad", train_num_objects=[3, 2])


def test_the_report_splits_relational_from_nonrelational():
    from train.tasks.vqa import FAMILIES, accuracy_report, question_dataset

    data = question_dataset(scenes.make_vqa(4, seed=0))
    relational = data.extras["relational"].astype(bool)
    wrong = (data.labels + 1) % len(scenes.ANSWERS)
    report = accuracy_report(data, np.zeros(len(data)), np.where(relational, data.labels, wrong))
    assert report["accuracy_relational"] == 1.0 and report["accuracy_nonrelational"] == 0.0
    assert report["eval_accuracy"] == relational.mean() and report["eval_examples"] == len(data)
    for name in FAMILIES:
        assert report[f"accuracy_{name}"] == float(scenes.FAMILIES[name][0])


def test_the_curriculum_draws_nonrelational_batches_first_and_leaves_the_evaluation_alone(tmp_path):
    """`nonrelational_steps`: the first batches hold non-relational questions only, drawn from the
    seed and step alone (a resumed run draws the same); later batches pass through unchanged."""
    r = _resolve(tmp_path, nonrelational_steps=5)
    _, batch = next(iter(r.batches_from(0)))
    first = r.task.batch(batch, 0, r)
    assert len(first["label"]) == len(batch["label"]) and np.all(first["mask"] == 1)
    relational = r.train_data.extras["relational"]
    tokens = {tuple(t): rel for t, rel in zip(r.train_data.extras["question"], relational)}
    assert not any(tokens[tuple(t)] for t in first["question"])
    again = r.task.batch(batch, 0, r)
    assert np.array_equal(again["question"], first["question"]) and np.array_equal(again["image"], first["image"])
    later = r.task.batch(batch, 5, r)
    assert np.array_equal(later["question"], batch["question"]) and np.array_equal(later["label"], batch["label"])


def test_family_weights_draw_the_named_families_that_many_times_as_often(tmp_path):
    """`family_weights`: batches drawn from (seed, step) alone with each question weighted by its
    family; weight 0 leaves a family out, the curriculum's steps keep to the non-relational ones."""
    from train.tasks.vqa import FAMILIES

    only = {"shape": 0, "horizontal": 0, "vertical": 0, "count_same_shape": 0}
    r = _resolve(tmp_path, nonrelational_steps=2, family_weights=only)
    _, batch = next(iter(r.batches_from(0)))
    family = {tuple(t): f for t, f in zip(r.train_data.extras["question"], r.train_data.extras["family"])}
    drawn = lambda b: {FAMILIES[family[tuple(t)]] for t in b["question"]}  # noqa: E731
    assert drawn(r.task.batch(batch, 2, r)) <= {"closest_shape", "furthest_shape"}
    assert np.array_equal(r.task.batch(batch, 2, r)["question"], r.task.batch(batch, 2, r)["question"])
    assert drawn(r.task.batch(batch, 0, r)) <= {"shape", "horizontal", "vertical"}
    favoured = _resolve(tmp_path / "favoured", nonrelational_steps=0, family_weights={"closest_shape": 50})
    counts = [FAMILIES[family[tuple(t)]] == "closest_shape" for s in range(20)
              for t in favoured.task.batch(batch, s, favoured)["question"]]
    assert np.mean(counts) > 0.8


@pytest.mark.parametrize("weights", [{"closest": 2}, {"shape": -1}, {f: 0 for f in scenes.FAMILIES}, [1, 2]])
def test_family_weights_that_cannot_be_drawn_are_refused_before_any_work(tmp_path, weights):
    from train.settings import Config, check_config

    with pytest.raises(ValueError, match=r"--recipe family_weights=.*mapping of question families"):
        check_config(Config(preset="vqa-scenes", workdir=str(tmp_path), recipe_overrides={"family_weights": weights}))


def test_the_confusion_picture_counts_each_relational_question_once(tmp_path):
    from train.tasks.vqa import FAMILIES, confusion, draw_confusion, question_dataset

    data = question_dataset(scenes.make_vqa(6, seed=0))
    predictions = np.where(data.extras["family"] == FAMILIES.index("closest_shape"),
                           scenes.ANSWER_IDS["circle"], data.labels)
    words, counts = confusion(data, predictions, "closest_shape")
    closest = data.extras["family"] == FAMILIES.index("closest_shape")
    assert words == ["square", "circle"] and counts.sum() == closest.sum()
    assert counts[:, 0].sum() == 0 and counts[0, 1] == (data.labels[closest] == 0).sum()
    words, counts = confusion(data, predictions, "count_same_shape")
    assert np.trace(counts) == counts.sum() and set(words) <= set("123456")
    path = tmp_path / "confusion.png"
    assert draw_confusion(data, predictions, str(path))["confusion_figure"] == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    failed = draw_confusion(data, predictions, str(tmp_path / "missing" / "confusion.png"))
    assert failed["confusion_figure"] is None and "FileNotFoundError" in failed["confusion_figure_error"]
