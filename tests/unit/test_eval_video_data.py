"""``himap-trt eval`` data on video: ``video`` lines of a question file and ``--data motion:N``."""

import json

import numpy as np
import pytest

from himap_trt.analysis.evaluate import load_items, read_jsonl
from himap_trt.data import motion
from himap_trt.errors import HimapError
from himap_trt.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, Video


def test_video_lines_are_decoded_with_their_own_sampling(tmp_path):
    path = motion.write_jsonl(tmp_path, 7, seed=3)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    items = read_jsonl(path)
    assert [it.media for it in items] == ["video" if "video" in x else "image" for x in lines]
    generated = motion.generate(7, seed=3)
    for item, line, gen in zip(items, lines, generated):
        assert item.group == gen.template and item.answers == (gen.answer,)
        visual = item.load_image()
        if item.media == "video":
            assert (item.fps, item.max_frames) == (motion.FPS, motion.FRAMES)
            assert isinstance(visual, Video) and len(visual.frames) == motion.FRAMES and visual.fps == motion.FPS
            for decoded, rendered in zip(visual.frames, gen.frames):
                assert np.abs(np.asarray(decoded, int) - np.asarray(rendered, int)).max() <= 2
        else:
            assert np.array_equal(np.asarray(visual), np.asarray(gen.frames[0]))
    # without fps / max_frames a clip is sampled with the CLI's defaults (2 fps: 4 of the 8 frames)
    line = next(x for x in lines if "video" in x)
    del line["fps"], line["max_frames"]
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps(line) + "\n")
    [item] = read_jsonl(bare)
    assert (item.fps, item.max_frames) == (DEFAULT_FPS, DEFAULT_MAX_FRAMES)
    assert len(item.load_image().frames) == round(motion.FRAMES / motion.FPS * DEFAULT_FPS)


def test_generated_motion_items_are_the_held_out_split():
    items = load_items("motion:14", seed=2)
    generated = motion.generate(14, seed=2, split="eval")
    assert [(it.question, it.answers, it.group) for it in items] == [(g.question, (g.answer,), g.template)
                                                                      for g in generated]
    for item, gen in zip(items, generated):
        visual = item.load_image()
        frames = visual.frames if isinstance(visual, Video) else (visual,)
        assert item.media == gen.media and len(frames) == len(gen.frames)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, gen.frames))
        if isinstance(visual, Video):
            assert visual.times == tuple(f / motion.FPS for f in range(motion.FRAMES))
    assert len(load_items("motion:14", limit=3)) == 3
    with pytest.raises(HimapError, match="motion:N"):
        load_items("motion:x")


@pytest.mark.parametrize("fields,message", [
    ({"image": "a.png", "video": "c.mp4"}, 'exactly one of "image" and "video"'),
    ({"video": 3}, '"video" must be a path'),
    ({"video": "missing.mp4"}, "video file"),
    ({"video": "c.mp4", "fps": 0}, '"fps" must be a positive number'),
    ({"video": "c.mp4", "fps": "2"}, '"fps" must be a positive number'),
    ({"video": "c.mp4", "max_frames": 1}, '"max_frames" must be an integer in \\[2, 256\\]'),
    ({"video": "c.mp4", "max_frames": 4.0}, '"max_frames" must be an integer'),
    ({"image": "a.png", "fps": 2}, '"fps" is for a "video" item'),
])
def test_video_line_errors_name_the_line_and_field(tmp_path, fields, message):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "c.mp4").write_bytes(b"")
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "Which way?", "answers": ["left"], **fields}) + "\n")
    with pytest.raises(HimapError, match=f"q.jsonl:1: .*{message}"):
        read_jsonl(path)


def test_an_unreadable_clip_is_one_line_naming_it(tmp_path):
    (tmp_path / "c.mp4").write_bytes(b"not a video")
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"video": "c.mp4", "question": "Which way?", "answers": ["left"]}) + "\n")
    [item] = read_jsonl(path)
    with pytest.raises(HimapError, match="c.mp4 is not a readable video"):
        item.load_image()
