"""Synthetic visual questions about simple scenes: the data the built-in ``shapes`` model is trained
and evaluated on.

A **scene** is 96 x 96 px, a plain light background and 1-4 shapes (circle, square, triangle) in
five colours (red, green, blue, yellow, purple), each 12-32 px across, at random positions. Shapes
do not overlap (a 2 px gap at least), so every question has exactly one right answer. A scene is a
plain description (:class:`Scene`); :func:`render` draws it with PIL, and every answer is computed
from the description alone (:func:`answer`), never from pixels.

Question **templates** (:data:`TEMPLATES`), each answered with one word:

======================  =====================================  ==============================
template                question                               answer
======================  =====================================  ==============================
``color_of_shape``      What color is the {shape}?             the colour (the scene holds
                                                               exactly one {shape})
``shape_of_color``      What shape is the {color} object?      circle / square / triangle
                                                               (exactly one {color} object)
``count``               How many shapes are there?             one / two / three / four
``exists``              Is there a {color} {shape}?            yes / no (half each)
======================  =====================================  ==============================

Everything is a function of a seed: :func:`generate` with the same ``seed`` and ``split`` returns
the same items. Splits are disjoint random streams (``train`` for training, ``eval`` for held-out
evaluation; ``himap-trt eval --data shapes:N`` uses ``eval``).

    >>> from himap_trt.data.shapes import generate
    >>> item = generate(1, seed=0)[0]
    >>> item.question, item.answer          # doctest: +SKIP
    ('How many shapes are there?', 'three')
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
MIN_SHAPE_SIZE, MAX_SHAPE_SIZE = 12, 32
MAX_SHAPES = 4
GAP = 2  # least distance between two shapes' bounding boxes (px)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Colour name -> RGB.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
}
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")

#: Template name -> question format.
TEMPLATES: dict[str, str] = {
    "color_of_shape": "What color is the {shape}?",
    "shape_of_color": "What shape is the {color} object?",
    "count": "How many shapes are there?",
    "exists": "Is there a {color} {shape}?",
}

#: Seed-stream id of each split (the second word of the generator's seed sequence).
SPLITS: dict[str, int] = {"train": 0, "eval": 1}


@dataclass(frozen=True)
class Shape:
    """One shape of a scene.

    Attributes:
        kind: ``circle``, ``square`` or ``triangle``.
        color: a key of :data:`COLORS`.
        x, y: top-left corner of the bounding box (px).
        size: side of the square bounding box (px, 12-32).
    """

    kind: str
    color: str
    x: int
    y: int
    size: int


@dataclass(frozen=True)
class Scene:
    """A scene description: background RGB and the shapes (drawn in order, never overlapping)."""

    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]

    def to_dict(self) -> dict:
        """JSON-ready form (see :meth:`from_dict`)."""
        return {"background": list(self.background), "shapes": [asdict(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(data["background"]), tuple(Shape(**s) for s in data["shapes"]))


@dataclass(frozen=True)
class Question:
    """One question about a scene.

    Attributes:
        template: a key of :data:`TEMPLATES`.
        question: the question text.
        shape, color: the template's slots (None where the template has none).
    """

    template: str
    question: str
    shape: str | None = None
    color: str | None = None


@dataclass(frozen=True)
class Item:
    """A generated example: the scene, the question and its answer (one word)."""

    scene: Scene
    question: str
    template: str
    answer: str

    @property
    def image(self) -> Image.Image:
        """The scene rendered (RGB, 96 x 96)."""
        return render(self.scene)


def _overlaps(a: Shape, b: Shape) -> bool:
    return not (a.x + a.size + GAP <= b.x or b.x + b.size + GAP <= a.x
                or a.y + a.size + GAP <= b.y or b.y + b.size + GAP <= a.y)


def random_scene(rng: np.random.Generator, num_shapes: int | None = None) -> Scene:
    """Draw a scene: 1-4 shapes (uniform unless ``num_shapes`` is given), kind and colour uniform,
    size uniform in 12-32 px, position uniform where the shape fits without touching another.

    Args:
        rng: the random source (consumed).
        num_shapes: shapes to place (1-4), or None to draw it.
    """
    count = int(rng.integers(1, MAX_SHAPES + 1)) if num_shapes is None else num_shapes
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    while True:  # rejection: a placement that leaves no room for the rest is drawn again
        shapes: list[Shape] = []
        for _ in range(200):
            size = int(rng.integers(MIN_SHAPE_SIZE, MAX_SHAPE_SIZE + 1))
            x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
            shape = Shape(SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))],
                          x, y, size)
            if not any(_overlaps(shape, other) for other in shapes):
                shapes.append(shape)
                if len(shapes) == count:
                    return Scene(background, tuple(shapes))


def render(scene: Scene) -> Image.Image:
    """Draw a scene: RGB, 96 x 96 px. Circles and squares fill their box; a triangle has its base
    on the box's bottom edge and its apex at the top centre."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        _draw(draw, s, COLORS[s.color])
    return image


def _draw(draw: ImageDraw.ImageDraw, s: Shape, fill) -> None:
    box = (s.x, s.y, s.x + s.size - 1, s.y + s.size - 1)
    if s.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif s.kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(s.x + (s.size - 1) / 2, s.y), (s.x, s.y + s.size - 1), (s.x + s.size - 1, s.y + s.size - 1)],
                     fill=fill)


def shape_mask(shape: Shape) -> np.ndarray:
    """The pixels :func:`render` paints for one shape: [96, 96] bool (row = y, column = x)."""
    image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _draw(ImageDraw.Draw(image), shape, 255)
    return np.asarray(image) > 0


def answer(scene: Scene, question: Question) -> str:
    """The one-word answer to ``question``, computed from the scene description.

    Raises:
        ValueError: if the template does not apply to the scene (e.g. two circles for
            ``color_of_shape``).
    """
    kinds = Counter(s.kind for s in scene.shapes)
    colors = Counter(s.color for s in scene.shapes)
    if question.template == "color_of_shape":
        if kinds[question.shape] != 1:
            raise ValueError(f"the scene holds {kinds[question.shape]} {question.shape}(s), not exactly one")
        return next(s.color for s in scene.shapes if s.kind == question.shape)
    if question.template == "shape_of_color":
        if colors[question.color] != 1:
            raise ValueError(f"the scene holds {colors[question.color]} {question.color} objects, not exactly one")
        return next(s.kind for s in scene.shapes if s.color == question.color)
    if question.template == "count":
        return NUMBERS[len(scene.shapes)]
    if question.template == "exists":
        return "yes" if any(s.kind == question.shape and s.color == question.color for s in scene.shapes) else "no"
    raise ValueError(f"unknown template {question.template!r}")


def _make(template: str, shape: str | None = None, color: str | None = None) -> Question:
    return Question(template, TEMPLATES[template].format(shape=shape, color=color), shape, color)


def applicable_questions(scene: Scene) -> dict[str, list[Question]]:
    """Every question of every template that has one right answer for ``scene``, by template.

    ``exists`` lists all 15 colour/shape pairs (present and absent).
    """
    kinds = Counter(s.kind for s in scene.shapes)
    colors = Counter(s.color for s in scene.shapes)
    return {
        "color_of_shape": [_make("color_of_shape", shape=k) for k in SHAPES if kinds[k] == 1],
        "shape_of_color": [_make("shape_of_color", color=c) for c in COLORS if colors[c] == 1],
        "count": [_make("count")],
        "exists": [_make("exists", shape=k, color=c) for c in COLORS for k in SHAPES],
    }


def random_item(rng: np.random.Generator, template: str | None = None) -> Item:
    """Draw one item: a template (uniform unless given), a scene it applies to, one of its questions.

    ``exists`` questions are "yes" for half of the items (a present pair) and "no" for the other
    half (an absent pair).
    """
    template = template or list(TEMPLATES)[int(rng.integers(len(TEMPLATES)))]
    want_yes = bool(rng.integers(2)) if template == "exists" else None
    while True:
        scene = random_scene(rng)
        candidates = applicable_questions(scene)[template]
        if template == "exists":
            candidates = [q for q in candidates if (answer(scene, q) == "yes") == want_yes]
        if candidates:
            question = candidates[int(rng.integers(len(candidates)))]
            return Item(scene, question.question, template, answer(scene, question))


def generate(n: int, seed: int = 0, split: str = "eval") -> list[Item]:
    """``n`` items of a split, deterministic for ``(seed, split)``; templates cycle in
    :data:`TEMPLATES` order so each has n/4 items.

    Raises:
        ValueError: unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS[split]])
    names = list(TEMPLATES)
    return [random_item(rng, names[i % len(names)]) for i in range(n)]


def write_jsonl(directory: str | Path, n: int, seed: int = 0, split: str = "eval") -> Path:
    """Write ``n`` items as PNG images and ``questions.jsonl`` (the format ``himap-trt eval --data``
    reads: ``image`` relative to the file, ``question``, ``answers``, plus ``template`` and the
    ``scene`` description).

    Returns:
        The path of ``questions.jsonl``.
    """
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, item in enumerate(generate(n, seed, split)):
        name = f"images/{split}-{seed}-{i:05d}.png"
        item.image.save(directory / name)
        lines.append(json.dumps({"image": name, "question": item.question, "answers": [item.answer],
                                 "template": item.template, "scene": item.scene.to_dict()}))
    path = directory / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m himap_trt.data.shapes --out DIR --n N [--seed S] [--split eval]``: write a question set."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", required=True, help="directory for questions.jsonl and images/")
    parser.add_argument("--n", type=int, default=500, help="questions (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--split", choices=list(SPLITS), default="eval", help="seed stream (default eval)")
    args = parser.parse_args(argv)
    path = write_jsonl(args.out, args.n, args.seed, args.split)
    for line in path.read_text().splitlines():
        item = json.loads(line)
        print(f"{Path(args.out) / item['image']}: {item['question']} (right answer: {item['answers'][0]})")
    print(f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
