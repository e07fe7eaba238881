"""Generated scenes of coloured squares and circles with questions and captions (Sort-of-CLEVR).

numpy only. `make_scenes(n, seed)` draws `n` images, each with one object per colour on a plain
white ground, no two objects overlapping; `make_questions` asks about one colour's object
(non-relational: its shape, its half left/right, top/bottom; relational: the shape of the object
closest to it, of the one furthest from it, how many objects share its shape); `make_vqa` puts
both together as arrays for training; `scene_caption` describes a scene left to right. Everything
is a deterministic function of the seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from twin_models.tokenizer import Tokenizer, split_words

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "orange": (255, 156, 0),
          "gray": (128, 128, 128), "yellow": (255, 255, 0)}
SHAPES = ("square", "circle")
GROUND = (255, 255, 255)
MAX_TRIES = 200  # placements tried per object before a scene is drawn again, and scene redraws

FAMILIES = {  # family: (relational, question template)
    "shape": (False, "what shape is the {} object ?"),
    "horizontal": (False, "is the {} object on the left or right ?"),
    "vertical": (False, "is the {} object on the top or bottom ?"),
    "closest_shape": (True, "what shape is the object closest to the {} object ?"),
    "furthest_shape": (True, "what shape is the object furthest from the {} object ?"),
    "count_same_shape": (True, "how many objects have the same shape as the {} object ?"),
}
ANSWERS = (*SHAPES, "left", "right", "top", "bottom", *(str(i) for i in range(1, len(COLORS) + 1)))
ANSWER_IDS = {a: i for i, a in enumerate(ANSWERS)}
CONTEXT_LENGTH = 16  # the longest question is 12 words and marks, plus <sot> and <eot>


def default_object_size(image_size: int) -> int:
    """The side of a square (and diameter of a circle) in pixels: about a fifth of the image, odd."""
    return max(3, (image_size // 5) | 1)


def make_scenes(n: int, seed: int, image_size: int = 32, num_objects: int | tuple[int, int] = 6,
                object_size: int | None = None, cell: int | None = None) -> tuple[np.ndarray, list[list[dict]]]:
    """(images (n, image_size, image_size, 3) float32 in [-1, 1], objects): `objects[i]` lists
    image i's objects as dicts `color`, `shape`, `x`, `y` (centre in pixels, x to the right, y
    down; a pixel (r, c) has its centre at (c + 0.5, r + 0.5)) and `size` (side / diameter).

    `num_objects` distinct colours are drawn per scene, or, for a pair (lo, hi), a number drawn
    uniformly from lo..hi per scene (scenes with few objects make the colour words easier to
    learn). Objects keep at least one pixel of ground between them and no centre lies on a
    midline, so every half is unambiguous. With `cell`, the image is a grid of cell x cell squares
    and each object lies inside its own square (at a random offset, its last row and column
    ground): with patches of the cell's size every object is one token."""
    size = default_object_size(image_size) if object_size is None else object_size
    lo, hi = (num_objects, num_objects) if np.ndim(num_objects) == 0 else num_objects
    if not 1 <= lo <= hi <= len(COLORS):
        raise ValueError(f"num_objects must be between 1 and {len(COLORS)} (one object per colour: "
                         f"{', '.join(COLORS)}), or a pair lo <= hi in that range; got {num_objects}")
    if not 1 <= size <= image_size:
        raise ValueError(f"object_size must be between 1 and the image size {image_size}; got {size}")
    if cell is not None:
        if image_size % cell or not size < cell or (image_size // cell) ** 2 < hi:
            raise ValueError(f"cell must divide the image size {image_size}, exceed object_size {size} and "
                             f"leave at least {hi} cells; got cell {cell}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, image_size, image_size, 3), np.float32)
    objects = []
    colors = list(COLORS)
    for i in range(n):
        k = lo if lo == hi else int(rng.integers(lo, hi + 1))
        if cell is None:
            corners = _place(rng, k, size, image_size)
        else:
            corners = _place_in_cells(rng, k, size, image_size, cell)
        picked = rng.permutation(len(colors))[:k]
        shapes = rng.integers(0, len(SHAPES), k)
        canvas = np.empty((image_size, image_size, 3), np.uint8)
        canvas[:] = GROUND
        scene = []
        for (r, c), ci, si in zip(corners, picked, shapes):
            color, shape = colors[ci], SHAPES[si]
            _draw(canvas, r, c, size, shape, COLORS[color])
            scene.append(dict(color=color, shape=shape, x=c + size / 2, y=r + size / 2, size=size))
        images[i] = canvas / np.float32(127.5) - 1
        objects.append(scene)
    return images, objects


def _place(rng, k: int, size: int, image_size: int) -> list[tuple[int, int]]:
    """Top-left corners (row, col) of `k` squares of side `size`, a pixel of ground apart."""
    half = image_size / 2
    for _ in range(MAX_TRIES):
        corners: list[tuple[int, int]] = []
        for _ in range(k):
            for _ in range(MAX_TRIES):
                r, c = rng.integers(0, image_size - size + 1, 2)
                if r + size / 2 == half or c + size / 2 == half:
                    continue
                if all(r >= r2 + size + 1 or r2 >= r + size + 1 or c >= c2 + size + 1 or c2 >= c + size + 1
                       for r2, c2 in corners):
                    corners.append((int(r), int(c)))
                    break
            else:
                break
        if len(corners) == k:
            return corners
    raise ValueError(f"cannot place {k} objects of size {size} without overlap in a {image_size}x{image_size} "
                     f"image ({MAX_TRIES} tries per object, {MAX_TRIES} scene draws); expected fewer "
                     "objects, smaller objects or a larger image")


def _place_in_cells(rng, k: int, size: int, image_size: int, cell: int) -> list[tuple[int, int]]:
    """Top-left corners of `k` squares of side `size`, each in its own cell of a grid."""
    g, half = image_size // cell, image_size / 2
    while True:
        corners = [(cell * int(j // g) + int(rng.integers(0, cell - size)),
                    cell * int(j % g) + int(rng.integers(0, cell - size))) for j in rng.permutation(g * g)[:k]]
        if all(r + size / 2 != half and c + size / 2 != half for r, c in corners):
            return corners


def _draw(canvas: np.ndarray, r: int, c: int, size: int, shape: str, rgb) -> None:
    if shape == "square":
        canvas[r:r + size, c:c + size] = rgb
        return
    offsets = np.arange(size) + 0.5 - size / 2
    inside = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= (size / 2) ** 2
    canvas[r:r + size, c:c + size][inside] = rgb


def answer(objects: list[dict], color: str, family: str, image_size: int) -> str | None:
    """The answer word to `family`'s question about the `color` object; None when it is not
    unique (a tie for closest or furthest between objects of different shapes)."""
    me = next(o for o in objects if o["color"] == color)
    if family == "shape":
        return me["shape"]
    if family == "horizontal":
        return "left" if me["x"] < image_size / 2 else "right"
    if family == "vertical":
        return "top" if me["y"] < image_size / 2 else "bottom"
    if family == "count_same_shape":
        return str(sum(o["shape"] == me["shape"] for o in objects))
    others = [o for o in objects if o is not me]
    d = [(o["x"] - me["x"]) ** 2 + (o["y"] - me["y"]) ** 2 for o in others]
    if not d:
        return None
    target = min(d) if family == "closest_shape" else max(d)
    shapes = {o["shape"] for o, di in zip(others, d) if di == target}
    return shapes.pop() if len(shapes) == 1 else None


def make_questions(objects: list[list[dict]], image_size: int, seed: int,
                   per_scene: int | None = None) -> list[dict]:
    """Questions about the scenes `objects` (from `make_scenes`): dicts `scene` (index), `color`,
    `family`, `relational`, `question` (text), `answer` (word) and `answer_id` (in `ANSWERS`).

    Every (colour, family) pair with a unique answer is asked, or `per_scene` of them drawn at
    random (without repetition) per scene."""
    rng = np.random.default_rng(seed)
    out = []
    for s, scene in enumerate(objects):
        asked = []
        for o in scene:
            for family, (relational, template) in FAMILIES.items():
                a = answer(scene, o["color"], family, image_size)
                if a is not None:
                    asked.append(dict(scene=s, color=o["color"], family=family, relational=relational,
                                      question=template.format(o["color"]), answer=a, answer_id=ANSWER_IDS[a]))
        if per_scene is not None:
            asked = [asked[i] for i in sorted(rng.permutation(len(asked))[:per_scene])]
        out += asked
    return out


def scene_caption(objects: list[dict]) -> str:
    """The objects left to right: "a red circle , a blue square and a gray circle"."""
    words = [f"a {o['color']} {o['shape']}" for o in sorted(objects, key=lambda o: (o["x"], o["y"]))]
    return words[0] if len(words) == 1 else " , ".join(words[:-1]) + " and " + words[-1]


def scenes_tokenizer(context_length: int = CONTEXT_LENGTH) -> Tokenizer:
    """The word-level `Tokenizer` of every question and caption word (a fixed vocabulary)."""
    texts = [t.format(c) for c in COLORS for _, t in FAMILIES.values()] + [" , and a " + " ".join(SHAPES)]
    return Tokenizer(sorted({w for t in texts for w in split_words(t)}), context_length)


@dataclasses.dataclass(frozen=True)
class VQAData:
    """Scenes and their questions as arrays: question q is about image `image_index[q]`."""
    images: np.ndarray        # (S, H, W, 3) float32 in [-1, 1]
    objects: list             # S lists of object dicts
    image_index: np.ndarray   # (Q,) int32
    questions: tuple          # Q texts
    tokens: np.ndarray        # (Q, context_length) int32, padded with 0
    answers: np.ndarray       # (Q,) int32 ids in ANSWERS
    relational: np.ndarray    # (Q,) bool
    family: np.ndarray        # (Q,) str

    def __len__(self) -> int:
        return len(self.answers)


def make_vqa(n: int, seed: int, image_size: int = 32, num_objects: int | tuple[int, int] = 6,
             object_size: int | None = None, cell: int | None = None, questions_per_scene: int | None = None,
             tokenizer: Tokenizer | None = None) -> VQAData:
    """`n` scenes (`make_scenes`) and their questions (`make_questions`) tokenized by
    `tokenizer` (default `scenes_tokenizer()`)."""
    images, objects = make_scenes(n, seed, image_size, num_objects, object_size, cell)
    qs = make_questions(objects, image_size, seed + 1, questions_per_scene)
    tok = tokenizer or scenes_tokenizer()
    texts = tuple(q["question"] for q in qs)
    return VQAData(images, objects, np.array([q["scene"] for q in qs], np.int32), texts,
                   tok(texts).astype(np.int32), np.array([q["answer_id"] for q in qs], np.int32),
                   np.array([q["relational"] for q in qs], bool), np.array([q["family"] for q in qs]))
