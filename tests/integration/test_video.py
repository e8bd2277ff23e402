"""Video prompts (Qwen2.5-VL and Qwen3-VL) on a short clip of moving shapes made offline with PyAV.

- ``--method none`` greedy tokens = transformers' ``generate`` given the same frames as
  ``pixel_values_videos`` (Qwen2.5-VL: ``second_per_grid_ts``; Qwen3-VL: the timestamped prompt), and
  our M-RoPE positions = transformers' ``get_rope_index`` for the video;
- ONNX Runtime = the PyTorch reference on a video and an image in one batch (the exports the Qwen
  tests already made: HiMAP);
- the server takes a ``video_url`` data URL (answer = the pipeline's), refuses bad videos, an image
  plus a video, and a video to a LLaVA export with HTTP 400 and keeps serving;
- bad inputs of ``run --video`` / ``--frames``: one line, exit 1.
"""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import exported, tiny
from himap_trt import video as video_module
from himap_trt.cli import app
from himap_trt.errors import HimapError
from himap_trt.plan import build_plan
from himap_trt.runtime import GenerationConfig, reference_pipeline
from himap_trt.runtime.loader import open_pipeline
from himap_trt.video import frame_memory, frames_video, load_video, moving_shapes_clip, sample_indices

QUESTION = "What moves?"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return moving_shapes_clip(tmp_path_factory.mktemp("video") / "shapes.mp4", frames=16, fps=8)


def test_sampling_spreads_frames_over_the_clip(clip):
    video = load_video(clip, fps=4, max_frames=6)
    assert len(video.frames) == 6 and video.size == (96, 96)
    assert video.times[0] == 0 and video.times[-1] == pytest.approx(15 / 8)     # first and last frame
    assert list(video.times) == sorted(video.times)
    assert len(load_video(clip, fps=2, max_frames=16).frames) == 4               # 2 s at 2 fps


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_no_pruning_equals_generate_on_a_video(model, clip):
    loaded = tiny(model)
    d = loaded.dims
    pipe = reference_pipeline(loaded, build_plan("none", num_layers=d.num_layers, num_image_tokens=d.num_image_tokens))
    video = load_video(clip, fps=2, max_frames=4)
    batch = pipe.prepare([video], [QUESTION])
    config = loaded.model.config
    ids = torch.where(batch.input_ids == config.image_token_id, config.video_token_id, batch.input_ids)
    types = (ids == config.video_token_id).long() * 2
    extra = {"second_per_grid_ts": torch.tensor([2 / video.fps])} if model == "tiny-qwen2.5-vl" else {}
    positions, _ = loaded.model.model.get_rope_index(ids, types, None, batch.image_grid_thw,
                                                     attention_mask=batch.attention_mask, **extra)
    assert torch.equal(positions, batch.position_ids)
    assert batch.image_grid_thw.tolist() == [[2, 6, 6]]                 # 4 frames -> 2 temporal patches
    if model == "tiny-qwen3-vl":
        assert "<0.3 seconds><|vision_start|>" in batch.prompts[0] and "<1.6 seconds>" in batch.prompts[0]
    with torch.inference_mode():
        ours = pipe.generate(batch, GenerationConfig(max_new_tokens=10))
        hf = loaded.model.generate(input_ids=ids, attention_mask=batch.attention_mask, mm_token_type_ids=types,
                                   pixel_values_videos=batch.pixel_values, video_grid_thw=batch.image_grid_thw,
                                   max_new_tokens=10, do_sample=False, **extra)
    assert torch.equal(ours.sequences, hf[:, ids.shape[1]:])


def test_frames_equal_the_decoded_video(clip):
    """--frames with the decoded frames gives the same prompt and patches as --video."""
    loaded = tiny("tiny-qwen3-vl")
    pipe = reference_pipeline(loaded, build_plan("none", num_layers=12, num_image_tokens=loaded.dims.num_image_tokens))
    video = load_video(clip, fps=4, max_frames=4)
    listed = frames_video(list(video.frames), fps=4)
    # frames_video spaces the frames 1/fps apart; the sampled ones are 0, 5, 10, 15 of 8 fps
    assert listed.times == (0, 0.25, 0.5, 0.75)
    a, b = pipe.prepare([video], [QUESTION]), pipe.prepare([listed], [QUESTION])
    assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.image_grid_thw, b.image_grid_thw)


def test_two_pass_sampling_equals_a_full_decode(clip, monkeypatch):
    """load_video keeps only the sampled frames (two passes) and gives exactly the frames and times of
    decoding the whole clip with PyAV and picking the sampled indices; memory and frame-count limits are
    refused in one line before any frame becomes an image."""
    import av

    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        everything = [(frame.to_image().convert("RGB"), float(frame.time)) for frame in container.decode(stream)]
        rate = float(stream.average_rate)
    keep = sample_indices(len(everything), rate, 4, 6)
    video = load_video(clip, fps=4, max_frames=6)
    assert [np.asarray(f).tobytes() for f in video.frames] == [np.asarray(everything[i][0]).tobytes() for i in keep]
    assert video.times == tuple(everything[i][1] - everything[0][1] for i in keep)
    width, height = video.size
    needed = len(keep) * frame_memory(width, height)
    assert load_video(clip, fps=4, max_frames=6, max_memory=needed).times == video.times
    with pytest.raises(HimapError, match=r"6 frames of 96x96 px would take .*\(--max-image-memory\)"):
        load_video(clip, fps=4, max_frames=6, max_memory=needed - 1)
    monkeypatch.setattr(video_module, "DECODE_LIMIT", len(everything) - 1)
    with pytest.raises(HimapError, match=f"more than {len(everything) - 1} frames"):
        load_video(clip, fps=4, max_frames=6)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_onnxruntime_equals_reference_on_video_and_image(tmp_path_factory, model, clip, photo):
    out, manifest, _ = exported(tmp_path_factory, model, "himap")
    onnx_pipe = open_pipeline(export_dir=out, backend="onnxruntime").pipeline
    ref_pipe = reference_pipeline(tiny(model), manifest.plan)
    batch = ref_pipe.prepare([load_video(clip, fps=2, max_frames=4), photo.convert("RGB").resize((100, 120))],
                             [QUESTION, "What is shown?"])
    assert batch.media == ["video", "image"]
    with torch.inference_mode():
        ours = onnx_pipe.generate(batch, GenerationConfig(max_new_tokens=6))
        ref = ref_pipe.generate(batch, GenerationConfig(max_new_tokens=6))
    assert torch.equal(ours.sequences, ref.sequences)
    for mine, theirs in zip(ours.stages, ref.stages):
        assert torch.equal(mine.kept_indices, theirs.kept_indices)


def _data_url(path, media="video/mp4"):
    return f"data:{media};base64," + base64.b64encode(path.read_bytes()).decode()


def _post(state, content):
    from himap_trt.serve.app import create_app

    async def main():
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            return await client.post("/v1/chat/completions", json={
                "model": "m", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": content}]})

    return asyncio.run(main())


@pytest.mark.slow
def test_server_video_url(tmp_path_factory, clip, tmp_path):
    from himap_trt.serve.app import ServeConfig, ServerState
    from himap_trt.serve.videos import VideoPolicy

    out, manifest, _ = exported(tmp_path_factory, "tiny-qwen3-vl", "himap")
    state = ServerState(ServeConfig(export_dir=out, backend="onnxruntime", model_name="m", max_batch=2,
                                    videos=VideoPolicy(fps=2, max_frames=4, max_bytes=100_000)))
    state.load()
    try:
        assert state.status == "ready", state.error
        video = {"type": "video_url", "video_url": {"url": _data_url(clip)}}
        answer = _post(state, [video, {"type": "text", "text": QUESTION}])
        assert answer.status_code == 200, answer.text
        ref = reference_pipeline(tiny("tiny-qwen3-vl"), manifest.plan)
        with torch.inference_mode():
            expected = ref.generate(ref.prepare([load_video(clip, fps=2, max_frames=4)], [QUESTION]),
                                    GenerationConfig(max_new_tokens=4))
        assert answer.json()["choices"][0]["message"]["content"] == expected.texts[0]
        not_video = tmp_path / "x.mp4"
        not_video.write_bytes(b"\x00not a video" * 50)
        big = tmp_path / "big.mp4"
        big.write_bytes(clip.read_bytes() * 40)
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        for content, fragment in [
            ([{"type": "video_url", "video_url": {"url": _data_url(not_video)}}, {"type": "text", "text": "?"}],
             "not a readable video"),
            ([{"type": "video_url", "video_url": {"url": _data_url(big)}}, {"type": "text", "text": "?"}],
             "larger than the limit"),
            ([{"type": "video_url", "video_url": {"url": _data_url(clip, "image/png")}}, {"type": "text", "text": "?"}],
             "data:video/mp4"),
            # a video and an image are one conversation's pooled visual inputs (issue 30): each is checked
            ([video, image, {"type": "text", "text": "?"}], "messages[0].content[1].image_url.url: the data is not a PNG"),
        ]:
            response = _post(state, content)
            assert response.status_code == 400, response.text
            assert fragment in response.json()["error"]["message"], response.json()
        assert _post(state, [video, {"type": "text", "text": QUESTION}]).status_code == 200   # still serving
    finally:
        state.close()


@pytest.mark.slow
def test_server_refuses_a_video_for_llava(tmp_path_factory, clip):
    from himap_trt.serve.app import ServeConfig, ServerState

    out, _, _ = exported(tmp_path_factory, "tiny", "himap", k1=2, r1=0.5, k2=8, r2=0.75)
    state = ServerState(ServeConfig(export_dir=out, backend="onnxruntime", model_name="m", max_batch=1))
    state.load()
    try:
        response = _post(state, [{"type": "video_url", "video_url": {"url": _data_url(clip)}},
                                 {"type": "text", "text": QUESTION}])
        assert response.status_code == 400 and "Qwen2.5-VL or Qwen3-VL" in response.json()["error"]["message"]
    finally:
        state.close()


@pytest.mark.parametrize("args,fragment", [
    (["--video", "{bad}", "What?"], "not a readable video"),
    (["--video", "{missing}", "What?"], "is not a file"),
    (["--video", "{clip}", "What?", "--max-frames", "1"], "--max-frames must be in [2, 256]"),
    (["--video", "{clip}", "What?", "--video-fps", "0"], "--video-fps must be a positive"),
    (["--frames", "{clip}", "What?"], "--frames"),
    (["--video", "{clip}", "--frames", "{clip}", "What?"], "not both"),
    (["--video", "{clip}", "{clip}", "What?"], "take the place of IMAGE"),
])
def test_run_video_bad_inputs_are_one_line(args, fragment, clip, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    values = {"bad": bad, "missing": tmp_path / "none.mp4", "clip": clip}
    result = CliRunner().invoke(app, ["run", "--backend", "torch", "--model", "tiny-qwen3-vl",
                                      *[a.format(**values) for a in args]])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert fragment in result.output and len(lines) == 1 and "Traceback" not in result.output, result.output


def test_too_many_frames_for_the_token_bound():
    """130 frames = 65 temporal patches of at least one token each: more than tiny-qwen3-vl's 64."""
    from PIL import Image

    loaded = tiny("tiny-qwen3-vl")
    pipe = reference_pipeline(loaded, build_plan("none", num_layers=12, num_image_tokens=loaded.dims.num_image_tokens))
    frames = frames_video([Image.new("RGB", (32, 32))] * 130, fps=2, max_frames=256)
    with pytest.raises(HimapError, match="--max-image-tokens"):
        pipe.prepare([frames], [QUESTION])
    with pytest.raises(HimapError, match="zero frames"):
        frames_video([], fps=2)


def test_run_video_answers_as_the_pipeline(clip):
    """`himap-trt run --video clip.mp4 "question"` (torch reference): the pipeline's own answer."""
    import json

    result = CliRunner().invoke(app, ["run", "--backend", "torch", "--model", "tiny-qwen3-vl", "--method", "himap",
                                      "--video", str(clip), QUESTION, "--max-frames", "4", "--max-new-tokens", "3",
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    loaded = tiny("tiny-qwen3-vl")
    pipe = reference_pipeline(loaded, build_plan("himap", num_layers=12, num_image_tokens=loaded.dims.num_image_tokens))
    with torch.inference_mode():
        expected = pipe.generate(pipe.prepare([load_video(clip, fps=2, max_frames=4)], [QUESTION]),
                                 GenerationConfig(max_new_tokens=3))
    request = report["requests"][0]
    assert request["image"] == str(clip) and request["tokens"] == expected.tokens[0]
    assert request["image_tokens_per_segment"] == expected.image_tokens_per_row[0] == [18, 9, 2]
