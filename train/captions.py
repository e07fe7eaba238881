"""Caption data and caption metrics; numpy only (no framework).

Data: `load(spec, image_size, in_channels, recipe)` gives (train, test) `train.data.ArrayDataset`s
whose `extras['references']` holds, per image, a tuple of its reference captions (text):

- `scenes`: generated scenes (`train.scenes.make_scenes`) with their one caption, the objects left
  to right (`scene_caption`: "a red circle , a blue square and a gray circle"). Sizes come from
  the recipe: `num_train` and `num_test` scenes (seeds `scene_seed` and `scene_seed + 1`),
  `num_objects` (an int, or a pair lo, hi drawn per scene) and `object_size` (None: a fifth of
  the image). The held-out scenes keep their object lists in `extras['objects']`.
- `coco:DIR`: COCO-style caption files, `DIR/annotations/captions_SPLIT.json` ({"images": [{"id",
  "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}), each naming images in
  `DIR/SPLIT/`, `DIR/images/SPLIT/`, `DIR/images/` or `DIR/` (the first folder that holds them).
  A split whose name has "train" is the training set, one with "val" or "test" the held-out one;
  without both, the images are split 80/20 with a fixed seed (an image's captions stay together).

Metrics: `corpus_bleu` (BLEU-4 of Papineni et al. 2002: clipped n-gram precisions over the whole
corpus, their geometric mean, the brevity penalty from the closest reference length; no
smoothing) and `exact_match` (the share of hypotheses equal to one of their references).
"""

from __future__ import annotations

import collections
import glob
import json
import math
import os

import numpy as np

from train import scenes
from train.data import IMAGE_DATA, ArrayDataset, _normalize, _read_image

TEST_FRACTION = 0.2
SPLIT_SEED = 0
CLASS_NAMES = ("caption",)


def references_array(refs) -> np.ndarray:
    """A 1-D object array of tuples of strings (numpy would make a 2-D array of equal tuples)."""
    out = np.empty(len(refs), object)
    for i, r in enumerate(refs):
        out[i] = tuple(r)
    return out


def caption_dataset(images: np.ndarray, refs, **extras) -> ArrayDataset:
    return ArrayDataset(np.asarray(images, np.float32), np.zeros(len(images), np.int32), CLASS_NAMES,
                        {"references": references_array(refs), **extras})


def load(spec: str, image_size: int, in_channels: int, recipe: dict) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) caption datasets for `spec`: 'scenes' or 'coco:DIR'."""
    kind, _, path = spec.partition(":")
    if kind == "scenes" and not path:
        return load_scenes(image_size, in_channels, recipe)
    if kind == "coco" and path:
        return load_coco(os.path.expanduser(path), image_size, in_channels)
    if kind in IMAGE_DATA:
        raise ValueError(f"--data {spec!r} is an image source of the classification, contrastive and "
                         "diffusion presets: it has no captions; captioning presets take 'scenes' or 'coco:DIR'")
    raise ValueError(f"unknown caption data spec {spec!r}; expected 'scenes' or 'coco:DIR'")


def load_scenes(image_size: int, in_channels: int, recipe: dict) -> tuple[ArrayDataset, ArrayDataset]:
    if in_channels != 3:
        raise ValueError(f"scenes are RGB: the model must take 3 channels, not {in_channels}")
    seed = recipe.get("scene_seed", 0)
    num_objects = recipe.get("num_objects", 3)
    num_objects = tuple(num_objects) if isinstance(num_objects, (list, tuple)) else num_objects
    out = []
    for n, s in ((recipe.get("num_train", 10_000), seed), (recipe.get("num_test", 500), seed + 1)):
        images, objects = scenes.make_scenes(n, s, image_size, num_objects, recipe.get("object_size"))
        objs = np.empty(n, object)
        objs[:] = [tuple(o) for o in objects]
        out.append(caption_dataset(images, [(scenes.scene_caption(o),) for o in objects], objects=objs))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# COCO-style caption files

COCO_LAYOUT = ("DIR/annotations/captions_SPLIT.json ({\"images\": [{\"id\", \"file_name\"}, ...], "
               "\"annotations\": [{\"image_id\", \"caption\"}, ...]}) and the images it names in "
               "DIR/SPLIT/, DIR/images/SPLIT/, DIR/images/ or DIR/")


def read_coco_captions(path: str) -> list[tuple[str, tuple[str, ...]]]:
    """[(file_name, captions)] of one COCO caption file, images in file order, captions in
    annotation order; images without a caption are left out. Errors name what was expected."""
    try:
        with open(path) as f:
            spec = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a COCO caption file ({e.msg} at line {e.lineno}); expected "
                         f"{COCO_LAYOUT}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("images"), list) \
            or not isinstance(spec.get("annotations"), list):
        raise ValueError(f"{path}: not a COCO caption file (no 'images' and 'annotations' lists); "
                         f"expected {COCO_LAYOUT}")
    try:
        names = {im["id"]: im["file_name"] for im in spec["images"]}
        by_image = collections.defaultdict(list)
        for n, a in enumerate(spec["annotations"]):
            caption = a["caption"]
            if not isinstance(caption, str) or not caption.strip():
                what = "an empty string" if isinstance(caption, str) else f"{caption!r}, not text"
                raise ValueError(f"{path}: annotation {n} (image_id {a['image_id']!r}) has the caption "
                                 f"{what}; every caption must be a non-empty string")
            by_image[a["image_id"]].append(caption.strip())
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: an image or annotation lacks {e}; expected {COCO_LAYOUT}") from None
    unknown = sorted(set(by_image) - set(names), key=str)
    if unknown:
        raise ValueError(f"{path}: annotations name image ids missing from its 'images' list: "
                         f"{', '.join(map(str, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}")
    out = [(names[i], tuple(by_image[i])) for i in names if by_image.get(i)]
    if not out:
        raise ValueError(f"{path}: holds no captions ({len(names)} images, "
                         f"{len(spec['annotations'])} annotations); expected {COCO_LAYOUT}")
    return out


def _image_folder(root: str, split: str, files: list[str], path: str) -> str:
    candidates = [os.path.join(root, split), os.path.join(root, "images", split),
                  os.path.join(root, "images"), root]
    best, best_missing = None, None
    for folder in candidates:
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if not missing:
            return folder
        if best is None or len(missing) < len(best_missing):
            best, best_missing = folder, missing
    raise FileNotFoundError(
        f"{path} names {len(files)} images; {len(best_missing)} of them are not in {best} "
        f"(nor in any of {', '.join(c for c in candidates if c != best)}): "
        f"{', '.join(best_missing[:5])}{' ...' if len(best_missing) > 5 else ''}; expected {COCO_LAYOUT}")


def _read_images(folder: str, files: list[str], image_size: int, in_channels: int) -> np.ndarray:
    mode = {1: "L", 3: "RGB"}.get(in_channels)
    if mode is None:
        raise ValueError(f"images can be read with 1 or 3 channels, not {in_channels}")
    out = np.empty((len(files), image_size, image_size, in_channels), np.float32)
    for i, f in enumerate(files):
        out[i] = _read_image(os.path.join(folder, f), mode, image_size)
    return _normalize(out)


def load_coco(root: str, image_size: int, in_channels: int) -> tuple[ArrayDataset, ArrayDataset]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"COCO folder {root!r} does not exist; expected {COCO_LAYOUT}")
    files = sorted(glob.glob(os.path.join(root, "annotations", "captions_*.json")))
    if not files:
        raise FileNotFoundError(f"{root!r} has no annotations/captions_*.json; expected {COCO_LAYOUT}")
    splits = {}
    for path in files:
        split = os.path.basename(path)[len("captions_"):-len(".json")]
        entries = read_coco_captions(path)
        folder = _image_folder(root, split, [f for f, _ in entries], path)
        splits[split] = (_read_images(folder, [f for f, _ in entries], image_size, in_channels),
                         [refs for _, refs in entries])
    train = [s for s in splits if "train" in s]
    test = [s for s in splits if "val" in s or "test" in s]
    pick = lambda names: (np.concatenate([splits[s][0] for s in names]),  # noqa: E731
                          [r for s in names for r in splits[s][1]])
    if train and test:
        return caption_dataset(*pick(train)), caption_dataset(*pick(test))
    images, refs = pick(train or list(splits))
    if len(images) < 2:
        raise ValueError(f"{root}: one captioned image cannot be split into a training and a "
                         f"held-out set; expected {COCO_LAYOUT}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    n_test = max(1, int(round(TEST_FRACTION * len(images))))
    held, kept = np.sort(order[:n_test]), np.sort(order[n_test:])
    return (caption_dataset(images[kept], [refs[i] for i in kept]),
            caption_dataset(images[held], [refs[i] for i in held]))


# ---------------------------------------------------------------------------------------------
# Metrics


def _ngrams(words, n):
    return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(hypotheses, references, max_n: int = 4) -> dict:
    """Corpus BLEU-`max_n` of word lists `hypotheses` against, per hypothesis, a list of
    reference word lists: {'bleu', 'precisions' (clipped n-gram precision for n = 1..max_n),
    'brevity_penalty', 'hypothesis_length', 'reference_length'}. A reference length is the one
    closest to the hypothesis's (the shorter among equally close); BLEU is 0 when some precision
    is 0 (no smoothing)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    matched, total = [0] * max_n, [0] * max_n
    c = r = 0
    for hyp, refs in zip(hypotheses, references):
        hyp = list(hyp)
        refs = [list(x) for x in refs]
        if not refs:
            raise ValueError("every hypothesis needs at least one reference")
        c += len(hyp)
        r += min((abs(len(x) - len(hyp)), len(x)) for x in refs)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp, n)
            most = collections.Counter()
            for x in refs:
                most |= _ngrams(x, n)
            matched[n - 1] += sum(min(k, most[g]) for g, k in counts.items())
            total[n - 1] += max(len(hyp) - n + 1, 0)
    precisions = [m / t if t else 0.0 for m, t in zip(matched, total)]
    bp = 1.0 if c > r else (math.exp(1 - r / c) if c else 0.0)
    bleu = bp * math.exp(sum(math.log(p) for p in precisions) / max_n) if min(precisions) > 0 else 0.0
    return {"bleu": bleu, "precisions": precisions, "brevity_penalty": bp, "hypothesis_length": c,
            "reference_length": r}


def exact_match(hypotheses, references) -> float:
    """The share of hypotheses (strings) equal to one of their references."""
    if not hypotheses:
        return float("nan")
    return float(np.mean([h in set(refs) for h, refs in zip(hypotheses, references)]))
