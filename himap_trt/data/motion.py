"""Synthetic clips of moving shapes and one-word questions that need time: the data the built-in
``motion`` model (:mod:`himap_trt.models.motion`) is trained and evaluated on.

A **clip** is :data:`FRAMES` frames of :data:`FRAME_SIZE` x :data:`FRAME_SIZE` px at :data:`FPS`
frames per second (so 8 frames give Qwen's 4 temporal patches of 2 frames, 9 visual tokens each
at 96 px with 32 px merged patches: 36 in all). It shows 1-3 shapes (circle, square, triangle; the colours of
:mod:`himap_trt.data.shapes`, all different within a clip), each :data:`MIN_SIZE`-:data:`MAX_SIZE`
px across. Each shape appears at an even frame (0, 2, 4 or 6, all different within a clip, so
"first" and "last" are one shape each and an appearance starts a temporal patch), then stays, and
either stays still or moves :data:`MIN_SPEED`-:data:`MAX_SPEED` px per frame along one axis
(left, right, up or down), never leaving the frame. A clip is a plain description
(:class:`Clip`); :func:`render_frames` draws it with PIL (later shapes over earlier ones where
they meet), and every answer is computed from the description alone (:func:`answer`), never from
pixels.

A **still image** is one frame of a clip whose shapes all appear at frame 0, stand still and never
touch (1-4 shapes; colours may repeat).

Question **templates** (:data:`TEMPLATES`), each answered with one word:

==================  ======================================  =======================================
template            question                                answer
==================  ======================================  =======================================
``direction``       Which way does the {color} shape move?  left / right / up / down / still (the
                                                            shape appears at frame 4 at the latest)
``first_color``     Which color appears first?              the colour of the earliest shape (2-3
                                                            shapes)
``last_color``      Which color appears last?               the colour of the latest shape (2-3)
``count_moving``    How many shapes move?                   zero / one / two / three
``meet``            Do the {color} and {other} shapes       yes / no (their boxes overlap in a frame
                    meet?                                   where both are shown; half each; asked
                                                            only where the answer is clear:
                                                            :func:`clear_meet`)
``image_color``     What color is the {shape}?              the colour (still image; exactly one
                                                            {shape})
``image_count``     How many shapes are there?              one / two / three / four (still image)
==================  ======================================  =======================================

Everything is a function of a seed: :func:`generate` with the same ``seed`` and ``split`` returns
the same items. Splits are disjoint random streams (``train`` for training, ``eval`` for held-out
evaluation; ``himap-trt eval --data motion:N`` uses ``eval``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from himap_trt.data.shapes import COLORS, NUMBERS, SHAPES

FRAME_SIZE = 96
FRAMES = 8
FPS = 4
MIN_SIZE, MAX_SIZE = 16, 26
MIN_SPEED, MAX_SPEED = 4, 5
MAX_CLIP_SHAPES = 3
MAX_IMAGE_SHAPES = 4
GAP = 2  # least distance between two still-image shapes' boxes (px)
#: A ``meet`` question is asked only about a pair whose answer is clear at this resolution: "yes" when
#: their boxes overlap by at least MEET_DEPTH px on both axes in some frame showing both, "no" when
#: they stay at least MEET_GAP px apart in every such frame (grazing contacts and near misses are
#: a pixel or two either way, below what 16 px patches resolve; such pairs get no meet question).
MEET_DEPTH, MEET_GAP = 4, 6
APPEAR_FRAMES: tuple[int, ...] = (0, 2, 4, 6)
#: Latest appearance frame of a shape a ``direction`` question names (visible in >= 2 temporal patches).
DIRECTION_LATEST = 4

#: Direction name -> (dx, dy) unit step (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
                                          "still": (0, 0)}

#: Template name -> question format.
TEMPLATES: dict[str, str] = {
    "direction": "Which way does the {color} shape move?",
    "first_color": "Which color appears first?",
    "last_color": "Which color appears last?",
    "count_moving": "How many shapes move?",
    "meet": "Do the {color} and {other} shapes meet?",
    "image_color": "What color is the {shape}?",
    "image_count": "How many shapes are there?",
}
#: Templates asked about a still image (the rest are about a clip).
IMAGE_TEMPLATES: tuple[str, ...] = ("image_color", "image_count")

#: Seed-stream id of each split (the second word of the generator's seed sequence).
SPLITS: dict[str, int] = {"train": 0, "eval": 1}


@dataclass(frozen=True)
class Mover:
    """One shape of a clip.

    Attributes:
        kind: ``circle``, ``square`` or ``triangle``.
        color: a key of :data:`himap_trt.data.shapes.COLORS`.
        x, y: top-left corner of the bounding box at frame 0 (px; where it would be had it been shown).
        size: side of the square bounding box (px).
        direction: a key of :data:`DIRECTIONS`.
        speed: px per frame (0 when still).
        appear: first frame showing it (even).
    """

    kind: str
    color: str
    x: int
    y: int
    size: int
    direction: str
    speed: int
    appear: int

    def box(self, frame: int) -> tuple[int, int]:
        """Top-left corner (x, y) at ``frame`` (px)."""
        dx, dy = DIRECTIONS[self.direction]
        return self.x + dx * self.speed * frame, self.y + dy * self.speed * frame

    @property
    def moves(self) -> bool:
        return self.direction != "still"


@dataclass(frozen=True)
class Clip:
    """A clip description: background RGB and the shapes (drawn in order). A still image is a clip
    with ``still=True`` (every shape shown from frame 0, none moving, none touching)."""

    background: tuple[int, int, int]
    shapes: tuple[Mover, ...]
    still: bool = False

    def to_dict(self) -> dict:
        """JSON-ready form (see :meth:`from_dict`)."""
        return {"background": list(self.background), "shapes": [asdict(s) for s in self.shapes],
                "still": self.still}

    @classmethod
    def from_dict(cls, data: dict) -> Clip:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(data["background"]), tuple(Mover(**s) for s in data["shapes"]), bool(data.get("still")))

    def shown(self, frame: int) -> list[Mover]:
        """The shapes shown at ``frame``."""
        return [s for s in self.shapes if s.appear <= frame]


@dataclass(frozen=True)
class Item:
    """A generated example: the clip (or still image), the question and its answer (one word)."""

    clip: Clip
    question: str
    template: str
    answer: str

    @property
    def media(self) -> str:
        """``image`` (a still image) or ``video``."""
        return "image" if self.clip.still else "video"

    @property
    def frames(self) -> list[Image.Image]:
        """The rendered frames: :data:`FRAMES` of them for a clip, one for a still image (RGB)."""
        return render_frames(self.clip)


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> tuple[int, int]:
    """Signed overlap (x, y) of boxes (x, y, size) in px: > 0 the depth of overlap on that axis, <= 0
    minus the gap between them along it."""
    (ax, ay, asz), (bx, by, bsz) = a, b
    return min(ax + asz, bx + bsz) - max(ax, bx), min(ay + asz, by + bsz) - max(ay, by)


def _touch(a: tuple[int, int, int], b: tuple[int, int, int], gap: int = 0) -> bool:
    """Whether boxes (x, y, size) come closer than ``gap`` px (gap 0: they overlap)."""
    return min(_overlap(a, b)) > -gap


def _overlaps(a: Mover, b: Mover) -> list[tuple[int, int]]:
    """:func:`_overlap` of the boxes of ``a`` and ``b`` in each frame showing both."""
    return [_overlap((*a.box(f), a.size), (*b.box(f), b.size)) for f in range(max(a.appear, b.appear), FRAMES)]


def meet(clip: Clip, a: Mover, b: Mover) -> bool:
    """Whether the boxes of ``a`` and ``b`` overlap in some frame showing both."""
    return any(min(o) > 0 for o in _overlaps(a, b))


def clear_meet(clip: Clip, a: Mover, b: Mover) -> bool:
    """Whether the ``meet`` answer for ``a`` and ``b`` is clear: their boxes overlap by >=
    :data:`MEET_DEPTH` px on both axes in some frame showing both (a clear "yes"), or stay >=
    :data:`MEET_GAP` px apart in every such frame (a clear "no")."""
    overlaps = _overlaps(a, b)
    if any(min(o) > 0 for o in overlaps):
        return any(min(o) >= MEET_DEPTH for o in overlaps)
    return all(-min(o) >= MEET_GAP for o in overlaps)


def _random_mover(rng: np.random.Generator, color: str, appear: int, still: bool) -> Mover:
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    direction = "still" if still else list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    speed = 0 if direction == "still" else int(rng.integers(MIN_SPEED, MAX_SPEED + 1))
    dx, dy = DIRECTIONS[direction]
    travel = speed * (FRAMES - 1)
    # x range so that x + dx·speed·f stays in [0, FRAME_SIZE - size] for every frame
    lo_x, hi_x = max(0, -dx * travel), FRAME_SIZE - size - max(0, dx * travel)
    lo_y, hi_y = max(0, -dy * travel), FRAME_SIZE - size - max(0, dy * travel)
    return Mover(kind, color, int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1)), size,
                 direction, speed, appear)


def random_clip(rng: np.random.Generator, num_shapes: int | None = None) -> Clip:
    """Draw a clip: 1-3 shapes (uniform unless ``num_shapes`` is given), colours all different,
    appearance frames all different (frame 0 for one of them), direction uniform over
    :data:`DIRECTIONS` (so 1/5 stand still), speed uniform, position uniform where the shape stays in
    the frame."""
    count = int(rng.integers(1, MAX_CLIP_SHAPES + 1)) if num_shapes is None else num_shapes
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    colors = rng.permutation(list(COLORS))[:count]
    appears = [0] + sorted(int(v) for v in rng.permutation(APPEAR_FRAMES[1:])[:count - 1])
    order = rng.permutation(count)            # which shape gets which appearance frame
    shapes = tuple(_random_mover(rng, str(colors[i]), appears[int(order[i])], still=False) for i in range(count))
    return Clip(background, shapes)


def random_still(rng: np.random.Generator, num_shapes: int | None = None) -> Clip:
    """Draw a still image: 1-4 shapes, kind and colour uniform (repeats allowed), never touching."""
    count = int(rng.integers(1, MAX_IMAGE_SHAPES + 1)) if num_shapes is None else num_shapes
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    while True:
        shapes: list[Mover] = []
        for _ in range(200):
            shape = _random_mover(rng, list(COLORS)[int(rng.integers(len(COLORS)))], 0, still=True)
            if not any(_touch((shape.x, shape.y, shape.size), (o.x, o.y, o.size), GAP) for o in shapes):
                shapes.append(shape)
                if len(shapes) == count:
                    return Clip(background, tuple(shapes), still=True)


def _draw(draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, size: int, fill) -> None:
    box = (x, y, x + size - 1, y + size - 1)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x + (size - 1) / 2, y), (x, y + size - 1), (x + size - 1, y + size - 1)], fill=fill)


def render_frame(clip: Clip, frame: int) -> Image.Image:
    """Frame ``frame`` of a clip: RGB, :data:`FRAME_SIZE` px square, shapes shown at that frame in order."""
    image = Image.new("RGB", (FRAME_SIZE, FRAME_SIZE), clip.background)
    draw = ImageDraw.Draw(image)
    for s in clip.shown(frame):
        _draw(draw, s.kind, *s.box(frame), s.size, COLORS[s.color])
    return image


def render_frames(clip: Clip) -> list[Image.Image]:
    """Every frame of a clip (:data:`FRAMES`), or the one frame of a still image."""
    return [render_frame(clip, f) for f in range(1 if clip.still else FRAMES)]


@dataclass(frozen=True)
class Question:
    """One question: its template, text and slots (None where the template has none)."""

    template: str
    question: str
    shape: str | None = None
    color: str | None = None
    other: str | None = None


def _make(template: str, shape: str | None = None, color: str | None = None, other: str | None = None) -> Question:
    return Question(template, TEMPLATES[template].format(shape=shape, color=color, other=other), shape, color, other)


def answer(clip: Clip, question: Question) -> str:
    """The one-word answer to ``question``, computed from the clip description.

    Raises:
        ValueError: the template does not apply to the clip (a still-image template on a clip or the
            reverse, a colour not shown or shown twice, fewer than 2 shapes for first/last, ...).
    """
    t = question.template
    if t not in TEMPLATES:
        raise ValueError(f"unknown template {t!r}")
    if (t in IMAGE_TEMPLATES) != clip.still:
        raise ValueError(f"template {t!r} is asked about {'a still image' if t in IMAGE_TEMPLATES else 'a clip'}")
    by_color = {c: [s for s in clip.shapes if s.color == c] for c in COLORS}

    def one(color):
        if len(by_color.get(color, [])) != 1:
            raise ValueError(f"the clip holds {len(by_color.get(color, []))} {color} shapes, not exactly one")
        return by_color[color][0]

    if t == "direction":
        shape = one(question.color)
        if shape.appear > DIRECTION_LATEST:
            raise ValueError(f"the {question.color} shape appears at frame {shape.appear}, after {DIRECTION_LATEST}")
        return shape.direction
    if t in ("first_color", "last_color"):
        if len(clip.shapes) < 2:
            raise ValueError("first/last need at least two shapes")
        pick = min if t == "first_color" else max
        return pick(clip.shapes, key=lambda s: s.appear).color
    if t == "count_moving":
        return NUMBERS[sum(s.moves for s in clip.shapes)]
    if t == "meet":
        a, b = one(question.color), one(question.other)
        if a is b:
            raise ValueError("meet needs two different shapes")
        return "yes" if meet(clip, a, b) else "no"
    if t == "image_color":
        kinds = [s for s in clip.shapes if s.kind == question.shape]
        if len(kinds) != 1:
            raise ValueError(f"the image holds {len(kinds)} {question.shape}(s), not exactly one")
        return kinds[0].color
    return NUMBERS[len(clip.shapes)]                  # image_count


def applicable_questions(clip: Clip) -> dict[str, list[Question]]:
    """Every question of every template that has one right answer for ``clip``, by template
    (``meet`` lists each pair of shapes whose answer is clear (:func:`clear_meet`) once, in clip order)."""
    empty = {t: [] for t in TEMPLATES}
    if clip.still:
        kinds = Counter(s.kind for s in clip.shapes)
        return {**empty, "image_color": [_make("image_color", shape=k) for k in SHAPES if kinds[k] == 1],
                "image_count": [_make("image_count")]}
    shapes = clip.shapes
    several = len(shapes) >= 2
    return {**empty,
            "direction": [_make("direction", color=s.color) for s in shapes if s.appear <= DIRECTION_LATEST],
            "first_color": [_make("first_color")] if several else [],
            "last_color": [_make("last_color")] if several else [],
            "count_moving": [_make("count_moving")],
            "meet": [_make("meet", color=a.color, other=b.color) for i, a in enumerate(shapes) for b in shapes[i + 1:]
                     if clear_meet(clip, a, b)]}


def random_item(rng: np.random.Generator, template: str | None = None) -> Item:
    """Draw one item: a template (uniform unless given), a clip or still image it applies to, one of
    its questions. ``meet`` is "yes" for half of the items and "no" for the other half (rejection:
    clips are drawn until one has a pair with the wanted answer)."""
    template = template or list(TEMPLATES)[int(rng.integers(len(TEMPLATES)))]
    want_yes = bool(rng.integers(2)) if template == "meet" else None
    while True:
        clip = random_still(rng) if template in IMAGE_TEMPLATES else random_clip(rng)
        candidates = applicable_questions(clip)[template]
        if template == "meet":
            candidates = [q for q in candidates if (answer(clip, q) == "yes") == want_yes]
        if candidates:
            question = candidates[int(rng.integers(len(candidates)))]
            return Item(clip, question.question, template, answer(clip, question))


def generate(n: int, seed: int = 0, split: str = "eval") -> list[Item]:
    """``n`` items of a split, deterministic for ``(seed, split)``; templates cycle in
    :data:`TEMPLATES` order so each has n/7 items.

    Raises:
        ValueError: unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS[split], 7])
    names = list(TEMPLATES)
    return [random_item(rng, names[i % len(names)]) for i in range(n)]


def write_clip(frames: list[Image.Image], path: str | Path, fps: int = FPS) -> Path:
    """Write frames as an MP4 (H.264 via PyAV, lossless: ``crf 0``, 4:4:4 chroma, so decoding gives
    the rendered colours back to within RGB<->YUV rounding).

    Returns:
        ``path``.
    """
    import av

    path = Path(path)
    width, height = frames[0].size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image).reformat(format="yuv444p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_jsonl(directory: str | Path, n: int, seed: int = 0, split: str = "eval") -> Path:
    """Write ``n`` items: clips as MP4 under ``clips/`` (:func:`write_clip`), still images as PNG
    under ``images/``, and ``questions.jsonl`` (the format ``himap-trt eval --data`` reads:
    ``video`` with ``fps`` and ``max_frames`` (every frame of the clip), or ``image``, relative to
    the file; ``question``, ``answers``, plus ``template``, ``category`` (= template) and the
    ``clip`` description).

    Returns:
        The path of ``questions.jsonl``.
    """
    directory = Path(directory)
    (directory / "clips").mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, item in enumerate(generate(n, seed, split)):
        record = {}
        if item.clip.still:
            name = f"images/{split}-{seed}-{i:05d}.png"
            item.frames[0].save(directory / name)
            record["image"] = name
        else:
            name = f"clips/{split}-{seed}-{i:05d}.mp4"
            write_clip(item.frames, directory / name)
            record.update(video=name, fps=FPS, max_frames=FRAMES)
        record.update(question=item.question, answers=[item.answer], template=item.template,
                      category=item.template, clip=item.clip.to_dict())
        lines.append(json.dumps(record))
    path = directory / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m himap_trt.data.motion --out DIR --n N [--seed S] [--split eval]``: write a question set."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", required=True, help="directory for questions.jsonl, clips/ and images/")
    parser.add_argument("--n", type=int, default=70, help="questions (default 70)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--split", choices=list(SPLITS), default="eval", help="seed stream (default eval)")
    args = parser.parse_args(argv)
    path = write_jsonl(args.out, args.n, args.seed, args.split)
    for line in path.read_text().splitlines():
        item = json.loads(line)
        print(f"{Path(args.out) / (item.get('video') or item['image'])}: {item['question']} "
              f"(right answer: {item['answers'][0]})")
    print(f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
