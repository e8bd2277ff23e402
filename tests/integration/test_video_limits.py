"""Video decoding limits and sampling on hostile and unusual clips (issue 33, cases 1 and 2).

- A stream whose frame size changes mid-stream (two MPEG-TS clips joined byte for byte, made here
  with PyAV): every decoded frame is checked against the pixel limit as it is decoded, whatever the
  header said, in ``load_video`` and through the server's ``video_url`` path; kept frames of
  different sizes are refused.
- Sampling never asks for more distinct frames than the clip has: a 1-frame clip, a clip whose
  frame rate is below ``--video-fps``, ``--video-fps`` above the clip's rate; the frames returned
  equal an independent full decode with PyAV at the sampled indices.
"""

from __future__ import annotations

import asyncio
import base64
import itertools

import numpy as np
import pytest

from conftest import tiny
from himap_trt.errors import HimapError
from himap_trt.plan import build_plan
from himap_trt.runtime import reference_pipeline
from himap_trt.serve.images import ImageError
from himap_trt.serve.videos import VideoPolicy, open_video_url
from himap_trt.video import load_video, mpegts_clip, sample_indices


@pytest.fixture(scope="module")
def joined():
    """40 frames of 64x64 then 16 of 320x320, one MPEG-TS stream (the header says 64x64)."""
    return mpegts_clip(64, 64, 40) + mpegts_clip(320, 320, 16, shade=100)


def _full_decode(data: bytes):
    import io

    import av

    with av.open(io.BytesIO(data)) as container:
        return [(np.asarray(f.to_image().convert("RGB")), float(f.time)) for f in container.decode(video=0)]


def test_a_frame_larger_than_its_header_is_refused_as_decoded(joined):
    everything = _full_decode(joined)
    assert [f.shape[:2] for f, _ in everything] == [(64, 64)] * 40 + [(320, 320)] * 16   # the input is what it says
    limit = 128 * 128                       # the header's 64x64 is within it; frame 40 is not
    with pytest.raises(HimapError, match=r"^video_url: frame 40 is 320x320 px \(its header said 64x64\), "
                                         rf"over the limit of {limit} pixels per frame$"):
        load_video(joined, name="video_url", max_pixels=limit)
    # the server's path: one 400 naming the field, from the same check
    url = "data:video/mp4;base64," + base64.b64encode(joined).decode()
    with pytest.raises(ImageError, match=r"messages\[0\].content\[0\].video_url: frame 40 is 320x320 px") as info:
        asyncio.run(open_video_url(url, "messages[0].content[0].video_url", VideoPolicy(max_pixels=limit)))
    assert info.value.param == "messages[0].content[0].video_url"
    # within the pixel limit, the sampled frames span both sizes: refused, not returned mixed
    with pytest.raises(HimapError, match=r"frames change size mid-stream \(64x64 px at frame 0, 320x320 px at frame \d+\)"):
        load_video(joined, name="video_url")
    # the first clip alone is accepted and equals the full decode at the sampled indices
    first = mpegts_clip(64, 64, 40)
    video = load_video(first, fps=2, max_frames=16, max_pixels=limit)
    keep = sample_indices(40, 8, 2, 16)
    assert [np.asarray(f).tobytes() for f in video.frames] == [everything[i][0].tobytes() for i in keep]


def test_the_memory_budget_counts_the_decoded_size_not_the_header():
    """The kept frames' decoded sizes (3 + 12 bytes per pixel each) against --max-image-memory: the
    exact budget is accepted, one byte less refused before any frame becomes an image. (A header
    smaller than the frames cannot reach this check: frame 0 is always kept, so such a clip is
    refused above as mixed sizes or by the pixel limit.)"""
    big = mpegts_clip(320, 320, 8, shade=50)
    per_frame = 320 * 320 * 15
    video = load_video(big, fps=8, max_frames=8, max_memory=8 * per_frame)
    assert len(video.frames) == 8 and video.size == (320, 320)
    with pytest.raises(HimapError, match=r"8 frames of 320x320 px would take 11\.7 MiB .*\(--max-image-memory\)"):
        load_video(big, fps=8, max_frames=8, max_memory=8 * per_frame - 1)


def test_sample_indices_are_distinct_and_within_the_clip():
    for total, source_fps, fps, max_frames in itertools.product(range(1, 41), (0.5, 1, 8, 30), (0.5, 2, 10), (2, 5, 16)):
        keep = sample_indices(total, source_fps, fps, max_frames)
        assert keep == sorted(set(keep)), (total, source_fps, fps, max_frames)
        assert 0 <= keep[0] and keep[-1] <= total - 1
        assert len(keep) <= min(total, max_frames)
        assert len(keep) % 2 == 0 or (total == 1 and keep == [0])
        wanted = max(2, min(max_frames, round(total / source_fps * fps)))
        assert len(keep) == min(wanted, total) - min(wanted, total) % 2 or total == 1
        if len(keep) >= 2:
            assert keep[0] == 0 and keep[-1] == total - 1           # the clip is covered end to end


@pytest.mark.parametrize("frames, clip_fps, fps, expected", [
    (1, 8, 2, 1),           # a 1-frame clip: its frame, repeated to fill the temporal patch
    (3, 1, 2, 2),           # 1 fps clip, sampled at 2 fps: 2 of its 3 frames
    (8, 8, 10, 8),          # 8 fps clip, --video-fps 10: all 8
    (5, 8, 10, 4),          # 5 frames at 10 fps: 4 distinct, even
])
def test_short_and_slow_clips_give_every_frame_they_have(frames, clip_fps, fps, expected):
    data = mpegts_clip(32, 32, frames, fps=clip_fps, shade=20)
    everything = _full_decode(data)
    assert len(everything) == frames
    video = load_video(data, fps=fps, max_frames=16, name="clip")
    keep = sample_indices(frames, clip_fps, fps, 16)
    assert len(keep) == expected
    padded = keep + keep[-1:] * (len(keep) % 2)
    assert [np.asarray(f).tobytes() for f in video.frames] == [everything[i][0].tobytes() for i in padded]
    assert video.times == tuple(everything[i][1] - everything[0][1] for i in padded)
    assert len(video.frames) % 2 == 0 and len(video.frames) == max(2, expected)


def test_a_one_frame_clip_is_one_temporal_patch():
    loaded = tiny("tiny-qwen3-vl")
    pipe = reference_pipeline(loaded, build_plan("none", num_layers=loaded.dims.num_layers,
                                                 num_image_tokens=loaded.dims.num_image_tokens))
    batch = pipe.prepare([load_video(mpegts_clip(64, 64, 1), name="clip")], ["What is shown?"])
    assert batch.image_grid_thw[0, 0].item() == 1                   # 2 equal frames -> 1 temporal patch
