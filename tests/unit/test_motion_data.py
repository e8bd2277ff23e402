"""The synthetic clips of moving shapes and their questions (himap_trt.data.motion)."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from himap_trt.data import motion as M


def test_generation_is_deterministic_per_seed_and_split():
    a = M.generate(21, seed=3)
    assert a == M.generate(21, seed=3)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a[0].frames, M.generate(1, seed=3)[0].frames))
    assert M.generate(21, seed=4) != a
    assert M.generate(21, seed=3, split="train") != a
    with pytest.raises(ValueError, match="split"):
        M.generate(1, split="test")


def _position(s: M.Mover, frame: int) -> tuple[int, int]:
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}[s.direction]
    return s.x + step[0] * s.speed * frame, s.y + step[1] * s.speed * frame


def _expected(clip: M.Clip, question: str) -> str:
    """The answer recomputed from the description, independently of the module's code."""
    numbers = ["zero", "one", "two", "three", "four"]
    shapes = clip.shapes
    if m := re.fullmatch(r"Which way does the (\w+) shape move\?", question):
        [s] = [s for s in shapes if s.color == m[1]]
        return s.direction
    if question in ("Which color appears first?", "Which color appears last?"):
        times = sorted((s.appear, s.color) for s in shapes)
        assert len({t for t, _ in times}) == len(times) >= 2
        return times[0][1] if "first" in question else times[-1][1]
    if question == "How many shapes move?":
        return numbers[sum(s.direction != "still" for s in shapes)]
    if m := re.fullmatch(r"Do the (\w+) and (\w+) shapes meet\?", question):
        [a] = [s for s in shapes if s.color == m[1]]
        [b] = [s for s in shapes if s.color == m[2]]
        for frame in range(max(a.appear, b.appear), M.FRAMES):
            (ax, ay), (bx, by) = _position(a, frame), _position(b, frame)
            if ax < bx + b.size and bx < ax + a.size and ay < by + b.size and by < ay + a.size:
                return "yes"
        return "no"
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        [color] = [s.color for s in shapes if s.kind == m[1]]
        return color
    assert question == "How many shapes are there?", question
    return numbers[len(shapes)]


def test_answers_follow_from_the_clip_description():
    items = M.generate(700, seed=0)
    for item in items:
        assert item.answer == _expected(item.clip, item.question), item
        assert item.clip.still == (item.template in M.IMAGE_TEMPLATES)
    assert Counter(i.template for i in items) == {t: 100 for t in M.TEMPLATES}
    meet = Counter(i.answer for i in items if i.template == "meet")
    assert 35 <= meet["yes"] <= 65 and meet["yes"] + meet["no"] == 100
    assert {i.answer for i in items if i.template == "direction"} == set(M.DIRECTIONS)
    assert {i.answer for i in items if i.template == "count_moving"} == {"zero", "one", "two", "three"}
    assert {i.answer for i in items if i.template == "image_count"} == {"one", "two", "three", "four"}
    for template in ("first_color", "last_color", "image_color"):
        assert {i.answer for i in items if i.template == template} == set(M.COLORS)
    # a meet question is asked only where the answer is clear: a deep overlap or a wide gap
    for item in items:
        if item.template == "meet":
            m = re.fullmatch(r"Do the (\w+) and (\w+) shapes meet\?", item.question)
            [a] = [s for s in item.clip.shapes if s.color == m[1]]
            [b] = [s for s in item.clip.shapes if s.color == m[2]]
            depths, gaps = [], []
            for frame in range(max(a.appear, b.appear), M.FRAMES):
                (ax, ay), (bx, by) = _position(a, frame), _position(b, frame)
                ox = min(ax + a.size, bx + b.size) - max(ax, bx)
                oy = min(ay + a.size, by + b.size) - max(ay, by)
                depths.append(min(ox, oy))
                gaps.append(max(-ox, -oy))
            if item.answer == "yes":
                assert max(depths) >= M.MEET_DEPTH, item
            else:
                assert min(gaps) >= M.MEET_GAP, item
    # a direction question names a shape seen in two temporal patches at least
    for item in items:
        if item.template == "direction":
            color = re.fullmatch(r"Which way does the (\w+) shape move\?", item.question)[1]
            assert next(s for s in item.clip.shapes if s.color == color).appear <= 4


def test_clips_obey_the_spec_and_render_what_they_describe():
    for item in M.generate(70, seed=1, split="train"):
        clip = item.clip
        frames = [np.asarray(f) for f in item.frames]
        assert len(frames) == (1 if clip.still else M.FRAMES)
        assert all(f.shape == (M.FRAME_SIZE, M.FRAME_SIZE, 3) for f in frames)
        if not clip.still:
            assert 1 <= len(clip.shapes) <= 3 and min(s.appear for s in clip.shapes) == 0
            assert len({s.color for s in clip.shapes}) == len({s.appear for s in clip.shapes}) == len(clip.shapes)
        for frame, pixels in enumerate(frames):
            shown = [s for s in clip.shapes if s.appear <= frame]
            for i, s in enumerate(shown):
                assert M.MIN_SIZE <= s.size <= M.MAX_SIZE and s.appear % 2 == 0
                assert (s.speed == 0) == (s.direction == "still")
                x, y = _position(s, frame)
                assert 0 <= x <= M.FRAME_SIZE - s.size and 0 <= y <= M.FRAME_SIZE - s.size
                # a point low on the shape's axis has its colour unless a later shape covers it
                cx, cy = x + s.size // 2, y + (3 * s.size) // 4
                covered = any(_position(t, frame)[0] <= cx < _position(t, frame)[0] + t.size
                              and _position(t, frame)[1] <= cy < _position(t, frame)[1] + t.size for t in shown[i + 1:])
                if not covered:
                    assert tuple(pixels[cy, cx]) == M.COLORS[s.color], (item, frame, s)
            painted = (pixels != np.array(clip.background)).any(-1)
            assert painted.sum() <= sum(s.size ** 2 for s in shown)
            if not shown:
                assert not painted.any()


def test_still_images_never_touch_and_clips_hide_shapes_before_they_appear():
    clip = M.Clip((240, 240, 240), (M.Mover("square", "red", 10, 10, 20, "right", 5, 0),
                                    M.Mover("circle", "blue", 60, 60, 20, "still", 0, 4)))
    frames = [np.asarray(f) for f in M.render_frames(clip)]
    blue = np.array(M.COLORS["blue"])
    assert not (frames[3] == blue).all(-1).any() and (frames[4] == blue).all(-1).any()
    red = [np.nonzero((f == np.array(M.COLORS["red"])).all(-1))[1].min() for f in frames]
    assert red == [10 + 5 * f for f in range(M.FRAMES)]               # moves right 5 px a frame
    for item in M.generate(28, seed=5):
        if item.clip.still:
            s = item.clip.shapes
            assert all(a.x + a.size + 2 <= b.x or b.x + b.size + 2 <= a.x or a.y + a.size + 2 <= b.y
                       or b.y + b.size + 2 <= a.y for i, a in enumerate(s) for b in s[i + 1:])


def test_templates_refuse_clips_they_do_not_apply_to():
    clip = M.Clip((240, 240, 240), (M.Mover("square", "red", 10, 10, 20, "right", 5, 0),))
    with pytest.raises(ValueError, match="at least two"):
        M.answer(clip, M._make("first_color"))
    with pytest.raises(ValueError, match="still image"):
        M.answer(clip, M._make("image_count"))
    with pytest.raises(ValueError, match="0 blue"):
        M.answer(clip, M._make("direction", color="blue"))


def test_write_jsonl_round_trips_through_mp4(tmp_path):
    from himap_trt.video import load_video

    path = M.write_jsonl(tmp_path, 7, seed=2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    items = M.generate(7, seed=2)
    assert [(x["question"], x["answers"], x["category"]) for x in lines] == \
        [(i.question, [i.answer], i.template) for i in items]
    assert M.Clip.from_dict(lines[0]["clip"]) == items[0].clip
    video = next(x for x in lines if "video" in x)
    item = items[lines.index(video)]
    clip = load_video(tmp_path / video["video"], fps=video["fps"], max_frames=video["max_frames"])
    assert len(clip.frames) == M.FRAMES and clip.times == tuple(f / M.FPS for f in range(M.FRAMES))
    for decoded, rendered in zip(clip.frames, item.frames):   # lossless H.264: only RGB<->YUV rounding
        assert np.abs(np.asarray(decoded, int) - np.asarray(rendered, int)).max() <= 2
    image = next(x for x in lines if "image" in x)
    assert (tmp_path / image["image"]).is_file()
