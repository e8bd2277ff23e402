"""The synthetic shapes scenes and questions (himap_trt.data.shapes)."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from himap_trt.data import shapes as S


def test_generation_is_deterministic_per_seed_and_split():
    a = S.generate(40, seed=3)
    b = S.generate(40, seed=3)
    assert a == b
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a[:5], b[:5]))
    assert S.generate(40, seed=4) != a
    assert S.generate(40, seed=3, split="train") != a
    with pytest.raises(ValueError, match="split"):
        S.generate(1, split="test")


def _expected(scene: S.Scene, question: str) -> str:
    """The answer recomputed from the description, independently of the module's code."""
    shapes = [(s.kind, s.color) for s in scene.shapes]
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        matching = [c for k, c in shapes if k == m[1]]
        assert len(matching) == 1
        return matching[0]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        matching = [k for k, c in shapes if c == m[1]]
        assert len(matching) == 1
        return matching[0]
    if question == "How many shapes are there?":
        return ["one", "two", "three", "four"][len(shapes) - 1]
    m = re.fullmatch(r"Is there a (\w+) (\w+)\?", question)
    assert m, question
    return "yes" if (m[2], m[1]) in shapes else "no"


def test_answers_follow_from_the_scene_description():
    items = S.generate(400, seed=0)
    for item in items:
        assert item.answer == _expected(item.scene, item.question)
    assert Counter(i.template for i in items) == {t: 100 for t in S.TEMPLATES}
    exists = Counter(i.answer for i in items if i.template == "exists")
    assert 35 <= exists["yes"] <= 65 and exists["yes"] + exists["no"] == 100
    assert {i.answer for i in items if i.template == "count"} == {"one", "two", "three", "four"}
    assert {i.answer for i in items if i.template == "color_of_shape"} == set(S.COLORS)
    assert {i.answer for i in items if i.template == "shape_of_color"} == set(S.SHAPES)


def test_scenes_obey_the_spec_and_render_what_they_describe():
    for item in S.generate(100, seed=1, split="train"):
        scene = item.scene
        assert 1 <= len(scene.shapes) <= 4
        assert all(225 <= v <= 255 for v in scene.background)
        pixels = np.asarray(item.image)
        assert pixels.shape == (96, 96, 3)
        for i, s in enumerate(scene.shapes):
            assert 12 <= s.size <= 32 and 0 <= s.x <= 96 - s.size and 0 <= s.y <= 96 - s.size
            for t in scene.shapes[i + 1:]:  # no two boxes touch
                assert (s.x + s.size + 2 <= t.x or t.x + t.size + 2 <= s.x
                        or s.y + s.size + 2 <= t.y or t.y + t.size + 2 <= s.y)
            # a point inside the shape has its colour (triangle: low on the axis, where it is wide)
            cx, cy = s.x + s.size // 2, s.y + (3 * s.size) // 4
            assert tuple(pixels[cy, cx]) == S.COLORS[s.color], (s, tuple(pixels[cy, cx]))
        corner_free = all(not (s.x <= 0 <= s.x + s.size and s.y <= 0 <= s.y + s.size) for s in scene.shapes)
        if corner_free:
            assert tuple(pixels[0, 0]) == scene.background


def test_shape_masks_are_the_pixels_render_paints():
    for item in S.generate(20, seed=2, split="train"):
        pixels = np.asarray(item.image)
        painted = (pixels != np.array(item.scene.background)).any(-1)
        masks = [S.shape_mask(s) for s in item.scene.shapes]
        assert np.array_equal(painted, np.logical_or.reduce(masks))
        for s, mask in zip(item.scene.shapes, masks):
            assert (pixels[mask] == S.COLORS[s.color]).all()
            ys, xs = np.nonzero(mask)   # inside the shape's box, touching its bottom edge
            assert s.x <= xs.min() and xs.max() < s.x + s.size and s.y <= ys.min() and ys.max() == s.y + s.size - 1
    square = S.Shape("square", "red", 10, 20, 15)
    assert S.shape_mask(square).sum() == 15 * 15


def test_write_jsonl_round_trips(tmp_path):
    path = S.write_jsonl(tmp_path, 6, seed=2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    items = S.generate(6, seed=2)
    assert [(x["question"], x["answers"]) for x in lines] == [(i.question, [i.answer]) for i in items]
    assert S.Scene.from_dict(lines[0]["scene"]) == items[0].scene
    assert (tmp_path / lines[0]["image"]).is_file()
