"""Qwen3-VL's vision tower, with its DeepStack features, as one exportable graph.

transformers' ``Qwen3VLVisionModel`` computes three things from ``grid_thw`` with data-dependent
Python: the 2-D rotary positions, the bilinear resampling of its learned position table to each
image's grid, and ``cu_seqlens`` (one attention block per frame). Here the host computes them with
transformers' own helpers (:func:`qwen3_vision_inputs`: ``get_vision_position_ids``,
``get_vision_interpolation_indices_and_weights``) as per-patch tensors, and the graph
(:class:`Qwen3VisionEncoder`) does the rest.

Contract (``num_patches`` = sum over images of t*h*w; ``num_image_tokens`` = num_patches / merge**2;
``patch_dim`` = C*T*P*P = 1536 for Qwen3-VL's 16-pixel patches; ``D`` = ``out_hidden_size``;
``n_deep`` = ``len(deepstack_visual_indexes)``; dtype = the export's)::

    host:  image_grid_thw [num_images, 3] ──► qwen3_vision_inputs(grid, attrs)
             ├─ vision_position_ids [num_patches, 2] int64    (row, column) of each patch in its image
             ├─ pos_embed_indices   [num_patches, 4] int64    bilinear taps into the position table
             ├─ pos_embed_weights   [num_patches, 4] float32  their weights
             ├─ frame_blocks        [num_frames, frame_len] int64  the patches of each frame (temporal
             │                                                    patch; an image is one), -1 = padding
             └─ frame_slots         [num_patches]    int64    each patch's place in frame_blocks
    graph: pixel_values [num_patches, patch_dim] dtype + the five above
             ──► image_embeds    [num_image_tokens, D] dtype          (transformers' ``pooler_output``)
                 deepstack_embeds [n_deep, num_image_tokens, D] dtype  (its ``deepstack_features``, stacked)

- patch embedding: the Conv3d (kernel = stride, with bias) as a matmul of each flattened patch;
- position embedding: ``sum_k table[indices[:, k]] * weights[:, k]`` (transformers' own formula);
- attention: every block attends within a frame, computed per frame
  (:func:`himap_trt.graphs.qwen_vision.block_attention`: transformers' per-frame ``cu_seqlens`` as
  batched equal-size blocks, padding masked), so cost and memory are linear in the number of frames;
  scores in the model dtype, bias and softmax in float32;
- after block ``deepstack_visual_indexes[i]``, ``deepstack_merger_list[i]`` gives DeepStack
  feature i; the blocks and mergers are transformers' modules (weights shared).

Processor order is kept throughout (block-major patches), which is transformers' order, so no
permutation is needed (as :mod:`himap_trt.graphs.qwen_vision`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

from himap_trt.errors import HimapError
from himap_trt.graphs.qwen_vision import FRAME_LEN, FRAMES, PATCHES, TOKENS, block_attention, block_feeds
from himap_trt.graphs.spec import DEEPSTACK_OUTPUT, GraphSpec, TensorSpec

INPUT_NAMES = ("pixel_values", "vision_position_ids", "pos_embed_indices", "pos_embed_weights", "frame_blocks",
               "frame_slots")


def _cfg(config: Any, name: str) -> Any:
    value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
    if value is None:
        raise HimapError(f"the Qwen3-VL vision config has no {name!r}")
    return value


def qwen3_vision_inputs(image_grid_thw, vision_config) -> dict[str, np.ndarray]:
    """The host-side inputs of the graph for the images (or video frames) of one call.

    Args:
        image_grid_thw: [num_images, 3] integers (t, h, w patches), numpy or torch.
        vision_config: ``spatial_merge_size`` and ``num_position_embeddings`` (object or dict).

    Returns:
        ``vision_position_ids`` [N, 2] int64, ``pos_embed_indices`` [N, 4] int64,
        ``pos_embed_weights`` [N, 4] float32, ``frame_segment_ids`` [N] int64 (which frame a patch
        is in; :func:`~himap_trt.graphs.qwen_vision.block_feeds` turns it into blocks); N = sum(t*h*w).

    Raises:
        HimapError: a grid that is not [num_images, 3] positive integers with h, w divisible by the merge size.
    """
    grid = np.asarray(image_grid_thw.cpu() if isinstance(image_grid_thw, torch.Tensor) else image_grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] < 1 or not np.issubdtype(grid.dtype, np.integer):
        raise HimapError(f"image_grid_thw must be [num_images, 3] integers (t, h, w), got shape {grid.shape} "
                         f"{grid.dtype}")
    merge = int(_cfg(vision_config, "spatial_merge_size"))
    for index, (t, h, w) in enumerate(grid.tolist()):
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise HimapError(f"image_grid_thw[{index}] = {[t, h, w]}: t, h, w must be positive and h, w "
                             f"divisible by spatial_merge_size {merge}")
    thw = torch.from_numpy(grid.astype(np.int64))
    side = int(int(_cfg(vision_config, "num_position_embeddings")) ** 0.5)
    indices, weights = get_vision_interpolation_indices_and_weights(
        thw, num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=merge)
    positions = get_vision_position_ids(thw, merge)
    frames = np.repeat(np.arange(int(grid[:, 0].sum())), np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]))
    return {
        "vision_position_ids": positions.numpy().astype(np.int64),
        "pos_embed_indices": indices.numpy().astype(np.int64),
        "pos_embed_weights": weights.numpy().astype(np.float32),
        "frame_segment_ids": frames.astype(np.int64),
    }


class Qwen3VisionEncoder(nn.Module):
    """The graph (module docstring). ``visual``: transformers' ``Qwen3VLVisionModel``
    (``model.model.visual``), parameters shared.

    ``forward(pixel_values [N, patch_dim], vision_position_ids [N, 2], pos_embed_indices [N, 4],
    pos_embed_weights [N, 4] float32, frame_blocks [num_frames, frame_len], frame_slots [N])
    -> (image_embeds [N/4, D],
    deepstack_embeds [n_deep, N/4, D])``
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.patch_embed = visual.patch_embed
        self.pos_embed = visual.pos_embed
        self.rotary_pos_emb = visual.rotary_pos_emb
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.deepstack_mergers = visual.deepstack_merger_list
        self.deepstack_indexes = [int(i) for i in visual.config.deepstack_visual_indexes]
        self.num_heads = visual.config.num_heads

    def forward(self, pixel_values, vision_position_ids, pos_embed_indices, pos_embed_weights, frame_blocks,
                frame_slots):
        proj = self.patch_embed.proj
        hidden = torch.matmul(pixel_values.to(proj.weight.dtype), proj.weight.flatten(1).t()) + proj.bias
        table = (self.pos_embed(pos_embed_indices) * pos_embed_weights[:, :, None]).sum(1)
        hidden = hidden + table.to(hidden.dtype)
        cos, sin = self.rotary_pos_emb(hidden, vision_position_ids)
        deepstack = []
        for index, block in enumerate(self.blocks):
            hidden = hidden + block_attention(block.attn, block.norm1(hidden), cos, sin, frame_blocks, frame_slots,
                                              self.num_heads, apply_rotary_pos_emb_vision)
            hidden = hidden + block.mlp(block.norm2(hidden))
            if index in self.deepstack_indexes:
                deepstack.append(self.deepstack_mergers[self.deepstack_indexes.index(index)](hidden))
        return self.merger(hidden), torch.stack(deepstack)


def qwen3_vision_attrs(vision_config) -> dict[str, int]:
    """What the host side needs at run time (kept in the spec's attrs, hence in the manifest)."""
    return {"architecture": "qwen3_vl", "in_channels": int(_cfg(vision_config, "in_channels")),
            "temporal_patch_size": int(_cfg(vision_config, "temporal_patch_size")),
            "patch_size": int(_cfg(vision_config, "patch_size")),
            "spatial_merge_size": int(_cfg(vision_config, "spatial_merge_size")),
            "num_position_embeddings": int(_cfg(vision_config, "num_position_embeddings")),
            "out_hidden_size": int(_cfg(vision_config, "out_hidden_size")),
            "deepstack_layers": len(_cfg(vision_config, "deepstack_visual_indexes"))}


def qwen3_vision_spec(vision_config, dtype: str = "float32", name: str = "vision") -> GraphSpec:
    """The graph's declaration (named dims ``num_patches`` and ``num_image_tokens``)."""
    attrs = qwen3_vision_attrs(vision_config)
    patch_dim = attrs["in_channels"] * attrs["temporal_patch_size"] * attrs["patch_size"] ** 2
    d, deep, i64 = attrs["out_hidden_size"], attrs["deepstack_layers"], "int64"
    return GraphSpec(
        name=name, kind="vision",
        inputs=(TensorSpec("pixel_values", dtype, (PATCHES, patch_dim)),
                TensorSpec("vision_position_ids", i64, (PATCHES, 2)),
                TensorSpec("pos_embed_indices", i64, (PATCHES, 4)),
                TensorSpec("pos_embed_weights", "float32", (PATCHES, 4)),
                TensorSpec("frame_blocks", i64, (FRAMES, FRAME_LEN)),
                TensorSpec("frame_slots", i64, (PATCHES,))),
        outputs=(TensorSpec("image_embeds", dtype, (TOKENS, d)),
                 TensorSpec(DEEPSTACK_OUTPUT, dtype, (deep, TOKENS, d))),
        attrs=attrs,
    )


def qwen3_vision_feeds(pixel_values: torch.Tensor, image_grid_thw, attrs) -> dict[str, torch.Tensor]:
    """All six graph inputs for one call.

    Raises:
        HimapError: if ``pixel_values`` does not hold sum(t*h*w) patches of the grid.
    """
    host = qwen3_vision_inputs(image_grid_thw, attrs)
    host = {k: torch.from_numpy(v) for k, v in {**host, **block_feeds(host, None)}.items()
            if k != "frame_segment_ids"}
    patches = host["frame_slots"].shape[0]
    if pixel_values.ndim != 2 or pixel_values.shape[0] != patches:
        raise HimapError(f"pixel_values must be [num_patches={patches}, patch_dim] for image_grid_thw "
                         f"{np.asarray(image_grid_thw).tolist()}, got {tuple(pixel_values.shape)}")
    return {"pixel_values": pixel_values, **host}
