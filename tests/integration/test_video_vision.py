"""Video through the Qwen vision graphs (attention per temporal patch and per window, issue 29):
Qwen3-VL's exported vision graph against transformers' ``Qwen3VLVisionModel`` (``pooler_output``
and every DeepStack feature) on an image, 2 frames, 16 frames and 16 frames of a size that fills no
whole merged-token grid of windows; and TensorRT-RTX parses and builds both Qwen vision graphs with
the video profiles (Qwen2.5-VL's also builds in tests/integration/test_tensorrt_rtx_build.py from the
session's exports). The Qwen2.5-VL graph's video equality is in tests/integration/test_qwen_vision.py."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from conftest import tiny
from himap_trt.engines.build import BuildTarget, build_engine_bytes
from himap_trt.engines.flavour import RTX
from himap_trt.engines.profiles import graph_profiles
from himap_trt.export.qwen3_vision import export_qwen3_vision
from himap_trt.export.qwen_vision import export_qwen_vision
from himap_trt.graphs.qwen3_vision import qwen3_vision_attrs, qwen3_vision_feeds
from himap_trt.graphs.qwen_vision import tiny_qwen_vision_config
from himap_trt.plan import build_plan
from himap_trt.runtime.onnxrt import OnnxRuntimeBackend

GRIDS = {"image": [[1, 4, 6]], "2-frames": [[1, 8, 8]], "16-frames": [[8, 4, 4]], "16-frames-6x10": [[8, 6, 10]]}


@pytest.fixture(scope="module")
def qwen3_graph(tmp_path_factory):
    visual = tiny("tiny-qwen3-vl").model.model.visual
    path = tmp_path_factory.mktemp("qwen3-vision") / "vision.onnx"
    return visual, export_qwen3_vision(visual, path), path


@pytest.mark.parametrize("name", list(GRIDS))
def test_qwen3_vision_graph_equals_transformers_on_video(qwen3_graph, name):
    visual, spec, path = qwen3_graph
    grid = torch.tensor(GRIDS[name])
    pixels = torch.randn(int(grid.prod(-1).sum()), 1536, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = visual(pixels, grid_thw=grid)
    got = OnnxRuntimeBackend(spec, path).run(qwen3_vision_feeds(pixels, grid, qwen3_vision_attrs(visual.config)))
    torch.testing.assert_close(got["image_embeds"], theirs.pooler_output, rtol=1e-4, atol=1e-4)
    assert got["deepstack_embeds"].shape[0] == len(theirs.deepstack_features) == 3
    for ours, expected in zip(got["deepstack_embeds"], theirs.deepstack_features):
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert float(theirs.pooler_output.abs().max()) > 0.5           # not a near-zero output passing trivially


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                    reason="needs TensorRT-RTX: module 'tensorrt_rtx' is not installed")
def test_tensorrt_rtx_builds_both_vision_graphs(qwen3_graph, tmp_path):
    """Both vision graphs parse and build (SM86, ahead of time on this CPU machine) with the
    profiles of a 64-token bound and 2 requests: up to 128 frames of 1 .. 256 patches."""
    torch.manual_seed(0)
    qwen25 = Qwen2_5_VisionTransformerPretrainedModel._from_config(tiny_qwen_vision_config()).eval()
    spec25 = export_qwen_vision(qwen25, tmp_path / "vision25.onnx")
    _, spec3, path3 = qwen3_graph
    plan = build_plan("none", num_layers=12, num_image_tokens=64)
    for spec, path in ((spec25, tmp_path / "vision25.onnx"), (spec3, path3)):
        profiles = graph_profiles(spec, plan, max_batch=2, max_seq_len=256)
        ranges = profiles[0].shapes["frame_blocks"]
        assert ranges.min == (1, 4) and ranges.max == (128, 256)
        engine = build_engine_bytes(BuildTarget(RTX, ("8.6",)), path, profiles)
        assert len(engine) > 10_000, spec.name
    assert np.asarray(profiles[0].shapes["pixel_values"].max).tolist() == [512, 1536]
