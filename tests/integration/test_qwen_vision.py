"""The Qwen2.5-VL vision graph: host inputs against transformers' own index code, the torch module
and ONE exported graph (fp32 and fp16) against transformers' vision tower on several grids and a
two-image call, images isolated from each other, the static TensorRT check, bad input."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from himap_trt.engines.compat import check_onnx_file
from himap_trt.errors import HimapError
from himap_trt.export.onnx_export import OPSETS
from himap_trt.export.qwen_vision import (export_qwen_vision, reference_embeds, validate_qwen_vision,
                                          validation_grids, vision_feeds)
from himap_trt.export.validate import TOLERANCES
from himap_trt.graphs.qwen_vision import (QwenVisionEncoder, qwen_image_processor, qwen_vision_inputs,
                                          segment_blocks, tiny_qwen_vision_config)
from himap_trt.runtime.onnxrt import OnnxRuntimeBackend

QWEN_7B_VISION = Qwen2_5_VLVisionConfig(window_size=112, patch_size=14, spatial_merge_size=2)


# ---- host inputs against transformers.vision_utils ------------------------------------------------
def _segments_from_cu(cu: torch.Tensor) -> np.ndarray:
    """cu_seqlens [segments + 1] -> a segment number per position."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    return np.repeat(np.arange(len(lengths)), lengths)


@settings(max_examples=40, deadline=None)
@given(grid=st.lists(st.tuples(st.integers(1, 2), st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=3),
       window=st.sampled_from([28, 56, 84, 112]))
def test_host_inputs_match_transformers_index_code(grid, window):
    """Positions equal transformers'; window/frame segment ids, permuted by transformers' window
    index, are exactly its cu_window_seqlens / cu_seqlens segments (same grouping, same order)."""
    config = Qwen2_5_VLVisionConfig(window_size=window, patch_size=14, spatial_merge_size=2)
    grid_thw = torch.tensor([[t, 2 * h, 2 * w] for t, h, w in grid])
    host = qwen_vision_inputs(grid_thw, config)
    np.testing.assert_array_equal(host["vision_position_ids"], get_vision_position_ids(grid_thw, 2).numpy())
    window_index, cu_window = get_vision_window_index(grid_thw, 2, window, 14)
    patch_order = (window_index[:, None] * 4 + torch.arange(4)).reshape(-1).numpy()   # merged token -> 4 patches
    np.testing.assert_array_equal(host["window_segment_ids"][patch_order], _segments_from_cu(cu_window))
    np.testing.assert_array_equal(host["frame_segment_ids"], _segments_from_cu(get_vision_cu_seqlens(grid_thw)))
    assert all(v.dtype == np.int64 for v in host.values())


@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.integers(0, 5), min_size=1, max_size=40), extra=st.integers(0, 3))
def test_segment_blocks_hold_each_segment_in_order(ids, extra):
    """Block s holds segment s's patches ascending, then -1; slots point back to each patch; a block
    length shorter than the largest segment raises."""
    _, ids = np.unique(np.array(ids), return_inverse=True)
    width = int(np.bincount(ids).max()) + extra
    blocks, slots = segment_blocks(ids, width)
    assert blocks.shape == (ids.max() + 1, width)
    for segment in range(ids.max() + 1):
        members = np.flatnonzero(ids == segment)
        assert blocks[segment].tolist() == members.tolist() + [-1] * (width - len(members))
    assert blocks.reshape(-1)[slots].tolist() == list(range(len(ids)))
    if width > 1 and extra == 0:
        with pytest.raises(HimapError, match="more than the block length"):
            segment_blocks(ids, width - 1)


def test_host_inputs_really_partition_into_windows():
    """The tiny config splits 4x6 patches into 2 windows and 8x8 into 4; Qwen2.5-VL-7B's 112-pixel
    windows (8x8 patches) split 12x12 into 4."""
    tiny = tiny_qwen_vision_config()
    ids = qwen_vision_inputs(np.array([[1, 4, 6], [1, 8, 8]]), tiny)
    assert np.bincount(ids["window_segment_ids"]).tolist() == [16, 8, 16, 16, 16, 16]
    assert np.bincount(ids["frame_segment_ids"]).tolist() == [24, 64]
    real = qwen_vision_inputs(np.array([[1, 12, 12]]), QWEN_7B_VISION)
    assert np.bincount(real["window_segment_ids"]).tolist() == [64, 32, 32, 16]


@pytest.mark.parametrize("grid,message", [
    (np.array([1, 4, 6]), "must be \\[num_images, 3\\]"),
    (np.array([[1.0, 4, 6]]), "integers"),
    (np.array([[1, 5, 6]]), "image_grid_thw\\[0\\] = \\[1, 5, 6\\].*divisible by spatial_merge_size 2"),
    (np.array([[1, 4, 6], [0, 4, 4]]), "image_grid_thw\\[1\\]"),
])
def test_bad_grid_is_one_line_error(grid, message):
    with pytest.raises(HimapError, match=message):
        qwen_vision_inputs(grid, tiny_qwen_vision_config())


def test_pixel_count_must_match_grid():
    with pytest.raises(HimapError, match="pixel_values must be \\[num_patches=24, patch_dim\\]"):
        vision_feeds(torch.zeros(20, 1176), np.array([[1, 4, 6]]), tiny_qwen_vision_config())


# ---- the module and ONE exported graph against transformers ----------------------------------------
@pytest.fixture(scope="module")
def visual():
    torch.manual_seed(0)
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(tiny_qwen_vision_config()).eval()


@pytest.fixture(scope="module")
def photo_cases(photo):
    """grace_hopper.jpg at two resolutions through the real processor: 4x6 and 8x8 patches (6 and 16
    image tokens), each alone and both in one call."""
    processor = qwen_image_processor()
    small, large = photo.resize((84, 56)), photo.resize((112, 112))
    cases = []
    for images in ([small], [large], [small, large]):
        out = processor(images=images, return_tensors="pt")
        cases.append((out["pixel_values"], out["image_grid_thw"].numpy()))
    assert [c[1].tolist() for c in cases] == [[[1, 4, 6]], [[1, 8, 8]], [[1, 4, 6], [1, 8, 8]]]
    return cases


@pytest.fixture(scope="module")
def exported(tmp_path_factory, visual):
    """One fp32 and one fp16 graph, each exported once."""
    out = tmp_path_factory.mktemp("qwen-vision")
    half = copy.deepcopy(visual).to(torch.float16)
    return {"float32": (visual, export_qwen_vision(visual, out / "vision32.onnx"), out / "vision32.onnx"),
            "float16": (half, export_qwen_vision(half, out / "vision16.onnx", dtype="float16"),
                        out / "vision16.onnx")}


def test_module_equals_transformers_tower(visual, photo_cases):
    """The torch module (no permutation, attention per block) against transformers' tower, and
    full-frame blocks in the windowed layers or no rotary positions is far outside the tolerance
    (the check can fail)."""
    module = QwenVisionEncoder(visual).eval()
    atol, rtol = TOLERANCES["float32"]
    for pixels, grid in photo_cases:
        ref = reference_embeds(visual, pixels, grid)
        feeds = vision_feeds(pixels, grid, visual.config)
        with torch.no_grad():
            ours, = module(**feeds)
            full_everywhere, = module(**{**feeds, "window_blocks": feeds["frame_blocks"],
                                         "window_slots": feeds["frame_slots"]})
            no_rope, = module(**{**feeds, "vision_position_ids": torch.zeros_like(feeds["vision_position_ids"])})
        bound = atol + rtol * float(ref.abs().max())
        assert ours.shape == (grid.prod(-1).sum() // 4, 64)
        assert float((ours - ref).abs().max()) <= bound
        assert float((full_everywhere - ref).abs().max()) > 100 * bound
        assert float((no_rope - ref).abs().max()) > 100 * bound


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_graph_validates_on_photos_and_grids(exported, photo_cases, dtype):
    """ONE graph per dtype: the photo at 4x6 and 8x8 patches, both in one call, the default grids,
    and a one-token image with a two-frame video (frames attend only within themselves), all
    within the export's tolerances of transformers' tower in that dtype."""
    tower, spec, path = exported[dtype]
    edge = np.array([[1, 2, 2], [2, 4, 4]])
    checks = (validate_qwen_vision(tower, spec, path, photo_cases) + validate_qwen_vision(tower, spec, path)
              + validate_qwen_vision(tower, spec, path, [(torch.randn(36, 1176), edge)]))
    assert [c.phase for c in checks] == ["grid 1x4x6", "grid 1x8x8", "grid 1x4x6+1x8x8",
                                         "grid 1x4x6", "grid 1x8x8", "grid 1x4x6+1x8x8", "grid 3x4x6",
                                         "grid 1x2x2+2x4x4"]
    assert all(c.ok for c in checks), checks
    assert all(c.max_abs_ref > 1 for c in checks)          # not a near-zero output passing trivially
    model = onnx.load(str(path), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert dims == {"pixel_values": ["num_patches", 1176], "vision_position_ids": ["num_patches", 2],
                    "window_blocks": ["num_windows", 16], "window_slots": ["num_patches"],
                    "frame_blocks": ["num_frames", "frame_len"], "frame_slots": ["num_patches"],
                    "image_embeds": ["num_image_tokens", 64]}
    assert model.opset_import[0].version in OPSETS


def test_images_of_one_call_do_not_attend_to_each_other(exported, photo_cases):
    """In the graph, each image's tokens in a two-image call equal that image alone, and changing
    the second image changes none of the first image's tokens."""
    _, spec, path = exported["float32"]
    backend = OnnxRuntimeBackend(spec, path)
    (small, g_small), (large, g_large), (both, g_both) = photo_cases
    config = tiny_qwen_vision_config()
    run = lambda pixels, grid: backend.run(vision_feeds(pixels, grid, config))["image_embeds"]  # noqa: E731
    alone_small, alone_large, together = run(small, g_small), run(large, g_large), run(both, g_both)
    torch.testing.assert_close(together[:6], alone_small, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[6:], alone_large, atol=1e-5, rtol=1e-5)
    other = run(torch.cat([small, torch.randn_like(large)]), g_both)
    torch.testing.assert_close(other[:6], together[:6], atol=1e-5, rtol=1e-5)
    assert float((other[6:] - together[6:]).abs().max()) > 0.1


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tensorrt_static_check_passes(exported, dtype):
    """Every operator and input type is in TensorRT 10.1's parser matrix."""
    _, _, path = exported[dtype]
    report = check_onnx_file(path)
    assert report.offenses == () and report.unchecked_types == 0 and report.min_tensorrt == "10.1"
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert {"Gather", "Where", "Softmax", "Cos", "Sin"} <= ops
    assert not ops & {"Loop", "NonZero", "TopK", "CumSum", "ScatterND", "Conv"}


def test_validation_grids_split_real_windows():
    """The default grids exercise several windows for the tiny and the 7B window size."""
    assert [g.tolist() for g in validation_grids(tiny_qwen_vision_config())] == \
        [[[1, 4, 6]], [[1, 8, 8]], [[1, 4, 6], [1, 8, 8]], [[3, 4, 6]]]
    assert validation_grids(QWEN_7B_VISION)[1].tolist() == [[1, 12, 12]]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_graph_equals_transformers_on_videos(exported, dtype):
    """The ONE exported graph on video grids: 2 frames (one temporal patch of 8x8 patches), 16 frames
    (8 temporal patches of 4x4, one window each), and 16 frames of 6x10 patches, whose frames fill no
    whole window (partial windows at the right and bottom); attention per temporal patch and window
    equals transformers' ``cu_seqlens`` tower within the export's tolerances."""
    tower, spec, path = exported[dtype]
    gen = torch.Generator().manual_seed(1)
    grids = [np.array([[1, 8, 8]]), np.array([[8, 4, 4]]), np.array([[8, 6, 10]])]
    checks = validate_qwen_vision(tower, spec, path, [(torch.randn(int(g.prod()), 1176, generator=gen), g)
                                                      for g in grids])
    assert [c.phase for c in checks] == ["grid 1x8x8", "grid 8x4x4", "grid 8x6x10"]
    assert all(c.ok for c in checks), checks
    assert all(c.max_abs_ref > 1 for c in checks)


def test_video_frames_do_not_attend_to_each_other(exported):
    """Temporal patches of one clip are independent before the merger: changing the last temporal
    patch's pixels changes none of the first seven's tokens (no attention across frames)."""
    _, spec, path = exported["float32"]
    backend = OnnxRuntimeBackend(spec, path)
    grid, config = np.array([[8, 6, 10]]), tiny_qwen_vision_config()
    pixels = torch.randn(480, 1176, generator=torch.Generator().manual_seed(2))
    changed = pixels.clone()
    changed[420:] = torch.randn(60, 1176)
    a, b = (backend.run(vision_feeds(p, grid, config))["image_embeds"] for p in (pixels, changed))
    torch.testing.assert_close(a[:105], b[:105], atol=1e-5, rtol=1e-5)
    assert float((a[105:] - b[105:]).abs().max()) > 0.1
