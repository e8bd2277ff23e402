"""Qwen2.5-VL's vision tower as one exportable graph with a dynamic number of patches.

transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` runs data-dependent Python on
``grid_thw`` (2-D rotary positions, the window permutation, ``cu_seqlens`` split into per-window
attention calls) that ``torch.export`` cannot trace with a dynamic patch count. Here that Python
is replaced by numpy on the host (:func:`qwen_vision_inputs`) producing three small per-patch
integer tensors, and the graph (:class:`QwenVisionEncoder`) does everything else.

Contract (named sizes: ``num_patches`` = sum over images of t*h*w; ``num_image_tokens`` =
``num_patches / merge**2``, merge = ``spatial_merge_size`` = 2; ``patch_dim`` = C*T*P*P, 1176 for
Qwen2.5-VL; ``out_hidden`` = ``out_hidden_size``, the decoder's hidden size; ``num_frames`` = sum of
t (temporal patches; an image is one); ``frame_len`` = the largest h*w of the call; ``num_windows``
= attention windows of the call; ``window_len`` = (window / patch)**2 patches, fixed by the config
(64 for Qwen2.5-VL); dtype = the export's, ``float32`` or ``float16``)::

    host:   image_grid_thw [num_images, 3] int64 ──► qwen_vision_inputs(grid, vision_config) ──► block_feeds
              ├─ vision_position_ids [num_patches, 2]             int64  (row, column) of each patch in its image
              ├─ window_blocks       [num_windows, window_len]    int64  the patches of each window, -1 = padding
              ├─ window_slots        [num_patches]                int64  each patch's place in window_blocks
              ├─ frame_blocks        [num_frames, frame_len]      int64  the patches of each frame, -1 = padding
              └─ frame_slots         [num_patches]                int64  each patch's place in frame_blocks
    graph:  pixel_values [num_patches, patch_dim] dtype  (the image processor's patches, concatenated
            over the images of the call in image_grid_thw order, exactly as transformers takes them)
            + the five tensors above
              ──► image_embeds [num_image_tokens, out_hidden] dtype   (transformers' ``pooler_output``
                  of ``model.visual``: images in order, each image's tokens in its order)

What the graph computes, and why nothing is permuted: the processor emits patches block-major (the
merge x merge patches of one merged token are consecutive), and transformers' window index only
permutes whole merged tokens so that windows become contiguous for variable-length attention;
the merger then runs per merged token and the permutation is undone. Attention restricted to blocks
is permutation-equivariant, so the graph keeps the processor's order throughout and no
permutation (and no undo) is needed: its output order *is* transformers' output order.

- patch embedding: the Conv3d whose kernel equals its stride is a matmul of each flattened patch
  with the kernel reshaped to [hidden, patch_dim] (same weights, same result up to rounding);
- 2-D rotary embedding: ``cos/sin`` of ``position x inv_freq`` for row and column, computed in
  float32 from ``vision_position_ids`` by transformers' own rotary module (no position table, so
  no bound on the image size; positions stay below a few hundred, small angles);
- attention per block (:func:`block_attention`), as transformers' ``cu_seqlens``: q, k, v are
  gathered into [blocks, heads, block_len, head_dim] (padding masked as keys), attended per block and
  gathered back by the slots. Windowed blocks use the windows (one window of one frame), the
  ``fullatt_block_indexes`` blocks the frames (one temporal patch of one image), so images of one call
  and temporal patches of one video never attend to each other. Cost and memory are linear in the
  number of frames (a [num_patches, num_patches] matrix is never formed): frames x frame_len**2 and
  windows x window_len**2 scores. Scores in the model dtype; bias and softmax in float32;
- the blocks and the 2x2 patch merger are transformers' modules, weights shared (no copies).

A call mixing a large image with many small frames pads every frame block to the large image's
length (the blocks are of equal size); the pipeline runs one request's visual input per row, and
videos have frames of one size, so the padding is at most the batch's spread of image sizes.

Export and validation: :func:`himap_trt.export.qwen_vision.export_qwen_vision` and
:func:`himap_trt.export.qwen_vision.validate_qwen_vision`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from himap_trt.errors import HimapError
from himap_trt.graphs.spec import GraphSpec, TensorSpec

_MASKED = torch.finfo(torch.float32).min

#: Names of the graph's inputs, in the module's argument order.
INPUT_NAMES = ("pixel_values", "vision_position_ids", "window_blocks", "window_slots", "frame_blocks", "frame_slots")
#: Name of the graph's one output.
OUTPUT_NAME = "image_embeds"
#: The named sizes of the vision graph's symbolic dims.
PATCHES, TOKENS = "num_patches", "num_image_tokens"
#: The block dims: attention windows (Qwen2.5-VL; their length is fixed), and frames (temporal
#: patches; an image is one) with the longest frame's patch count of the call.
WINDOWS, FRAMES, FRAME_LEN = "num_windows", "num_frames", "frame_len"


def _cfg(config: Any, name: str) -> Any:
    value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
    if value is None:
        raise HimapError(f"the Qwen2.5-VL vision config has no {name!r}")
    return value


def qwen_vision_inputs(image_grid_thw, vision_config) -> dict[str, np.ndarray]:
    """The host-side inputs of the vision graph for the images of one call.

    Reproduces transformers' ``get_vision_position_ids`` and the grouping of
    ``get_vision_window_index`` / ``get_vision_cu_seqlens`` (``transformers.vision_utils``), as
    per-patch ids in the processor's (block-major) patch order, so the graph needs no permutation.

    Args:
        image_grid_thw: [num_images, 3] integers (the processor's ``image_grid_thw``: temporal
            patches t, patch rows h, patch columns w of each image), numpy or torch.
        vision_config: the model's ``vision_config`` (object or dict) with ``spatial_merge_size``,
            ``window_size`` (pixels), ``patch_size`` (pixels).

    Returns:
        ``vision_position_ids`` [num_patches, 2] int64 (row, column of each patch within its
        image), ``window_segment_ids`` [num_patches] int64 and ``frame_segment_ids``
        [num_patches] int64 (ids unique across the call, ascending), num_patches = sum(t*h*w).

    Raises:
        HimapError: if the grid is not [num_images, 3] positive integers with h and w divisible by
            the merge size, or the config's window is smaller than one merged token.
    """
    grid = np.asarray(image_grid_thw.cpu() if isinstance(image_grid_thw, torch.Tensor) else image_grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] < 1 or not np.issubdtype(grid.dtype, np.integer):
        raise HimapError(f"image_grid_thw must be [num_images, 3] integers (t, h, w), got shape {grid.shape} "
                         f"{grid.dtype}")
    merge = int(_cfg(vision_config, "spatial_merge_size"))
    window = int(_cfg(vision_config, "window_size")) // merge // int(_cfg(vision_config, "patch_size"))
    if window < 1:
        raise HimapError(f"vision config window_size {_cfg(vision_config, 'window_size')} is smaller than one "
                         f"merged token (spatial_merge_size x patch_size pixels)")
    positions, windows, frames = [], [], []
    next_window = next_frame = 0
    for index, (t, h, w) in enumerate(grid.tolist()):
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise HimapError(f"image_grid_thw[{index}] = {[t, h, w]}: t, h, w must be positive and h, w "
                             f"divisible by spatial_merge_size {merge}")
        mh, mw = h // merge, w // merge
        # block-major patch order (processor and transformers): merged row, merged column, then the
        # merge x merge patches inside the merged token
        br, bc, r, c = np.meshgrid(np.arange(mh), np.arange(mw), np.arange(merge), np.arange(merge), indexing="ij")
        rows, cols = (br * merge + r).reshape(-1), (bc * merge + c).reshape(-1)
        # windows of window x window merged tokens, numbered row-major per frame; transformers' padding
        # only adds empty windows, which it drops
        per_row = -(-mw // window)
        local = ((br // window) * per_row + bc // window).reshape(-1)
        _, local = np.unique(local, return_inverse=True)       # consecutive ids, order kept
        count = int(local.max()) + 1
        for _ in range(t):
            positions.append(np.stack([rows, cols], axis=-1))
            windows.append(local + next_window)
            frames.append(np.full(h * w, next_frame))
            next_window += count
            next_frame += 1
    return {
        "vision_position_ids": np.concatenate(positions).astype(np.int64),
        "window_segment_ids": np.concatenate(windows).astype(np.int64),
        "frame_segment_ids": np.concatenate(frames).astype(np.int64),
    }


def segment_blocks(segment_ids: np.ndarray, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Attention blocks of equal size from per-patch segment ids (the block-diagonal layout of
    transformers' ``cu_seqlens``, batched so that ONNX Runtime and TensorRT run it as plain matmuls).

    Args:
        segment_ids: [num_patches] int64, consecutive ids 0 .. S-1 (any order of patches).
        length: the block length (``None``: the largest segment); segments longer than it raise.

    Returns:
        ``blocks`` [S, length] int64: the patches of segment s in ascending order, then -1 (padding,
        masked as keys; its query rows are never read back), and ``slots`` [num_patches] int64: where
        each patch sits in the flattened blocks (``s * length + rank``), for gathering the results
        back into patch order.

    Raises:
        HimapError: if a segment holds more than ``length`` patches.
    """
    ids = np.asarray(segment_ids, dtype=np.int64)
    counts = np.bincount(ids)
    width = int(counts.max()) if length is None else int(length)
    if int(counts.max()) > width:
        raise HimapError(f"a segment holds {int(counts.max())} patches, more than the block length {width}")
    order = np.argsort(ids, kind="stable")                      # patches grouped by segment, ascending
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty_like(ids)
    rank[order] = np.arange(ids.shape[0]) - starts[ids[order]]
    blocks = np.full((counts.shape[0], width), -1, dtype=np.int64)
    blocks[ids, rank] = np.arange(ids.shape[0])
    return blocks, ids * width + rank


def window_length(vision_config) -> int:
    """Patches in one full attention window of Qwen2.5-VL (the window blocks' fixed length):
    (``window_size`` / ``patch_size``)**2, 64 for Qwen2.5-VL's 112-pixel windows of 14-pixel patches."""
    merge = int(_cfg(vision_config, "spatial_merge_size"))
    return (int(_cfg(vision_config, "window_size")) // merge // int(_cfg(vision_config, "patch_size")) * merge) ** 2


def block_feeds(host: dict[str, np.ndarray], window: int | None) -> dict[str, np.ndarray]:
    """The graph's block inputs from :func:`qwen_vision_inputs`' segment ids: ``frame_blocks``
    [num_frames, frame_len] / ``frame_slots`` [num_patches] always, and ``window_blocks``
    [num_windows, window] / ``window_slots`` [num_patches] when ``window`` is given (Qwen2.5-VL)."""
    out = {"vision_position_ids": host["vision_position_ids"]}
    if window is not None:
        out["window_blocks"], out["window_slots"] = segment_blocks(host["window_segment_ids"], window)
    out["frame_blocks"], out["frame_slots"] = segment_blocks(host["frame_segment_ids"])
    return out


def block_attention(attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    blocks: torch.Tensor, slots: torch.Tensor, num_heads: int, rotary) -> torch.Tensor:
    """Self-attention of transformers' vision ``attn`` module (``qkv``, ``proj``, ``scaling``)
    restricted to blocks: patches attend only within their block, computed per block, so the cost
    is linear in the number of blocks (frames, windows) and no [num_patches, num_patches] tensor exists.

    Args:
        hidden: [num_patches, hidden] model dtype (normed); cos, sin: [num_patches, head_dim] float32.
        blocks: [num_blocks, block_len] int64 patch indices, -1 = padding (:func:`segment_blocks`).
        slots: [num_patches] int64, each patch's place in the flattened blocks.
        rotary: transformers' ``apply_rotary_pos_emb_vision`` of the family.

    Returns:
        [num_patches, hidden] model dtype: ``attn.proj`` of the attention output, in patch order.
    """
    n = hidden.shape[0]
    q, k, v = attn.qkv(hidden).reshape(n, 3, num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotary(q, k, cos, sin)                                       # [N, H, Dh]
    count, length = blocks.shape
    valid = blocks >= 0
    flat = torch.where(valid, blocks, torch.zeros_like(blocks)).reshape(-1)    # padding reads patch 0, masked
    q, k, v = (x[flat].reshape(count, length, num_heads, -1).transpose(1, 2) for x in (q, k, v))  # [B, H, L, Dh]
    bias = torch.where(valid, 0.0, _MASKED)[:, None, None, :]           # [B, 1, 1, L] float32, keys only
    scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling          # model dtype
    probs = torch.softmax(scores.float() + bias, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(count * length, -1)   # [B*L, H*Dh]
    return attn.proj(out[slots])


class QwenVisionEncoder(nn.Module):
    """The graph: see the module docstring for the contract.

    Args:
        visual: transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` (``model.model.visual``
            of ``Qwen2_5_VLForConditionalGeneration``); its parameters are shared, not copied.

    ``forward(pixel_values [N, patch_dim] dtype, vision_position_ids [N, 2] int64,
    window_blocks [num_windows, window_len] int64, window_slots [N] int64,
    frame_blocks [num_frames, frame_len] int64, frame_slots [N] int64) -> (image_embeds [N/4, out_hidden],)``
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        config = visual.config
        self.patch_embed = visual.patch_embed
        self.rotary_pos_emb = visual.rotary_pos_emb
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.full_attention = frozenset(int(i) for i in config.fullatt_block_indexes)
        self.num_heads = config.num_heads

    def forward(self, pixel_values: torch.Tensor, vision_position_ids: torch.Tensor, window_blocks: torch.Tensor,
                window_slots: torch.Tensor, frame_blocks: torch.Tensor, frame_slots: torch.Tensor) -> tuple[torch.Tensor]:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        weight = self.patch_embed.proj.weight                               # [hidden, C, T, P, P]
        hidden = torch.matmul(pixel_values.to(weight.dtype), weight.flatten(1).t())
        cos, sin = self.rotary_pos_emb(hidden, vision_position_ids)         # [N, Dh] float32
        for index, block in enumerate(self.blocks):
            blocks, slots = ((frame_blocks, frame_slots) if index in self.full_attention
                             else (window_blocks, window_slots))
            hidden = hidden + block_attention(block.attn, block.norm1(hidden), cos, sin, blocks, slots,
                                              self.num_heads, apply_rotary_pos_emb_vision)
            hidden = hidden + block.mlp(block.norm2(hidden))
        return (self.merger(hidden),)


def qwen_vision_spec(vision_config, dtype: str = "float32", name: str = "vision") -> GraphSpec:
    """The vision graph's declaration (named dims ``num_patches``, ``num_image_tokens`` =
    ``num_patches / spatial_merge_size**2``; the spec language has no division, so both are named).

    Args:
        vision_config: the model's ``vision_config``.
        dtype: ``float32``, ``float16`` (or ``bfloat16``): pixel_values' and image_embeds' dtype.
        name: the graph's name.
    """
    patch_dim = (int(_cfg(vision_config, "in_channels")) * int(_cfg(vision_config, "temporal_patch_size"))
                 * int(_cfg(vision_config, "patch_size")) ** 2)
    i64 = "int64"
    return GraphSpec(
        name=name, kind="vision",
        inputs=(TensorSpec("pixel_values", dtype, (PATCHES, patch_dim)),
                TensorSpec("vision_position_ids", i64, (PATCHES, 2)),
                TensorSpec("window_blocks", i64, (WINDOWS, window_length(vision_config))),
                TensorSpec("window_slots", i64, (PATCHES,)),
                TensorSpec("frame_blocks", i64, (FRAMES, FRAME_LEN)),
                TensorSpec("frame_slots", i64, (PATCHES,))),
        outputs=(TensorSpec(OUTPUT_NAME, dtype, (TOKENS, int(_cfg(vision_config, "out_hidden_size")))),),
        attrs={"architecture": "qwen2_5_vl", "spatial_merge_size": int(_cfg(vision_config, "spatial_merge_size"))},
    )


def tiny_qwen_vision_config(out_hidden_size: int = 64, **overrides):
    """A small random-weight Qwen2.5-VL vision config for tests and the built-in tiny model.

    Depth 4 with one full-attention block (index 1: window, full, window, window), hidden 64,
    4 heads (head dim 16), patch 14, temporal patch 2, merge 2 (so the real image processor's
    1176-value patches fit), window 56 pixels = 2x2 merged tokens = 4x4 patches, so a 4x6 or 8x8
    patch grid really splits into several windows.

    Args:
        out_hidden_size: the decoder's hidden size (the merger's output width).
        overrides: any other ``Qwen2_5_VLVisionConfig`` field.

    Returns:
        ``transformers.Qwen2_5_VLVisionConfig``.
    """
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    fields = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, in_channels=3, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1],
                  out_hidden_size=out_hidden_size, hidden_act="silu", tokens_per_second=2,
                  initializer_range=0.1)
    fields.update(overrides)
    return Qwen2_5_VLVisionConfig(**fields)


def qwen_image_processor(min_pixels: int = 28 * 28, max_pixels: int = 112 * 112):
    """Qwen2.5-VL's real image processor (transformers' ``Qwen2VLImageProcessor``, its PIL backend:
    the project installs no torchvision) with patch 14, temporal patch 2, merge 2, bounded to
    ``[min_pixels, max_pixels]`` pixels per image (the defaults give at most 8x8 patches = 16
    image tokens, for tests; Qwen2.5-VL's own bounds are 3136 .. 12845056).

    Returns:
        The processor; ``processor(images=[...], return_tensors="pt")`` gives ``pixel_values``
        [num_patches, 1176] float32 and ``image_grid_thw`` [num_images, 3] int64.
    """
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                    temporal_patch_size=2, merge_size=2)


def vision_feeds(pixel_values: torch.Tensor, image_grid_thw, vision_config) -> dict[str, torch.Tensor]:
    """All six graph inputs for one call: ``pixel_values``, the positions of :func:`qwen_vision_inputs`
    and the window and frame blocks of its segment ids (:func:`block_feeds`).

    Raises:
        HimapError: if ``pixel_values`` does not hold sum(t*h*w) patches of the grid.
    """
    host = block_feeds(qwen_vision_inputs(image_grid_thw, vision_config), window_length(vision_config))
    host = {k: torch.from_numpy(v) for k, v in host.items()}
    patches = host["frame_slots"].shape[0]
    if pixel_values.ndim != 2 or pixel_values.shape[0] != patches:
        raise HimapError(f"pixel_values must be [num_patches={patches}, patch_dim] for image_grid_thw "
                         f"{np.asarray(image_grid_thw).tolist()}, got {tuple(pixel_values.shape)}")
    return {"pixel_values": pixel_values, **host}
