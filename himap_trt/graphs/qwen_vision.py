"""Qwen2.5-VL's vision tower as one exportable graph with a dynamic number of patches.

transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` runs data-dependent Python on
``grid_thw`` (2-D rotary positions, the window permutation, ``cu_seqlens`` split into per-window
attention calls) that ``torch.export`` cannot trace with a dynamic patch count. Here that Python
is replaced by numpy on the host (:func:`qwen_vision_inputs`) producing three small per-patch
integer tensors, and the graph (:class:`QwenVisionEncoder`) does everything else.

Contract (named sizes: ``num_patches`` = sum over images of t*h*w; ``num_image_tokens`` =
``num_patches / merge**2``, merge = ``spatial_merge_size`` = 2; ``patch_dim`` = C*T*P*P, 1176 for
Qwen2.5-VL; ``out_hidden`` = ``out_hidden_size``, the decoder's hidden size; dtype = the
export's, ``float32`` or ``float16``)::

    host:   image_grid_thw [num_images, 3] int64 ──► qwen_vision_inputs(grid, vision_config)
              ├─ vision_position_ids [num_patches, 2] int64   (row, column) of each patch in its image
              ├─ window_segment_ids  [num_patches]    int64   which attention window a patch is in
              └─ frame_segment_ids   [num_patches]    int64   which image (video frame) a patch is in
    graph:  pixel_values [num_patches, patch_dim] dtype  (the image processor's patches, concatenated
            over the images of the call in image_grid_thw order, exactly as transformers takes them)
            + the three tensors above
              ──► image_embeds [num_image_tokens, out_hidden] dtype   (transformers' ``pooler_output``
                  of ``model.visual``: images in order, each image's tokens in its order)

What the graph computes, and why nothing is permuted: the processor emits patches block-major (the
merge x merge patches of one merged token are consecutive), and transformers' window index only
permutes whole merged tokens so that windows become contiguous for variable-length attention;
the merger then runs per merged token and the permutation is undone. Attention restricted by a
mask is permutation-equivariant, so the graph keeps the processor's order throughout and no
permutation (and no undo) is needed: its output order *is* transformers' output order.

- patch embedding: the Conv3d whose kernel equals its stride is a matmul of each flattened patch
  with the kernel reshaped to [hidden, patch_dim] (same weights, same result up to rounding);
- 2-D rotary embedding: ``cos/sin`` of ``position x inv_freq`` for row and column, computed in
  float32 from ``vision_position_ids`` by transformers' own rotary module (no position table, so
  no bound on the image size; positions stay below a few hundred, small angles);
- attention bias, built in the graph from the segment ids with ``Equal``: patch i may attend to j
  iff their ``window_segment_ids`` are equal (window blocks) or their ``frame_segment_ids`` are
  equal (the ``fullatt_block_indexes`` blocks), so images of one call never attend to each other.
  Scores are computed in the model dtype; bias and softmax in float32 (as the decoder graphs do);
- the blocks and the 2x2 patch merger are transformers' modules, weights shared (no copies).

The dense [num_patches, num_patches] bias costs ``4 * num_patches**2`` bytes per bias (two of them):
64 MiB for a 1024x1024 image (5,476 patches). Segmented attention would avoid it but needs
``cu_seqlens`` loops, which are not ONNX.

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
INPUT_NAMES = ("pixel_values", "vision_position_ids", "window_segment_ids", "frame_segment_ids")
#: Name of the graph's one output.
OUTPUT_NAME = "image_embeds"
#: The named sizes of the vision graph's symbolic dims.
PATCHES, TOKENS = "num_patches", "num_image_tokens"


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


def segment_bias(segment_ids: torch.Tensor) -> torch.Tensor:
    """[N] int64 segment ids -> [N, N] float32 additive bias: 0 within a segment, the most negative
    float32 across segments (finite; every row has its own patch unmasked, so no row is empty)."""
    return torch.where(segment_ids[:, None] == segment_ids[None, :], 0.0, _MASKED)


class QwenVisionEncoder(nn.Module):
    """The graph: see the module docstring for the contract.

    Args:
        visual: transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` (``model.model.visual``
            of ``Qwen2_5_VLForConditionalGeneration``); its parameters are shared, not copied.

    ``forward(pixel_values [N, patch_dim] dtype, vision_position_ids [N, 2] int64,
    window_segment_ids [N] int64, frame_segment_ids [N] int64) -> (image_embeds [N/4, out_hidden],)``
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

    def _attention(self, attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        n = hidden.shape[0]
        q, k, v = attn.qkv(hidden).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)        # [N, H, Dh], float32 inside
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)   # [H, N, Dh]
        scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling          # model dtype
        probs = torch.softmax(scores.float() + bias, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(0, 1).reshape(n, -1)
        return attn.proj(out)

    def forward(self, pixel_values: torch.Tensor, vision_position_ids: torch.Tensor,
                window_segment_ids: torch.Tensor, frame_segment_ids: torch.Tensor) -> tuple[torch.Tensor]:
        weight = self.patch_embed.proj.weight                               # [hidden, C, T, P, P]
        hidden = torch.matmul(pixel_values.to(weight.dtype), weight.flatten(1).t())
        cos, sin = self.rotary_pos_emb(hidden, vision_position_ids)         # [N, Dh] float32
        window_bias, frame_bias = segment_bias(window_segment_ids), segment_bias(frame_segment_ids)
        for index, block in enumerate(self.blocks):
            bias = frame_bias if index in self.full_attention else window_bias
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), cos, sin, bias)
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
                TensorSpec("window_segment_ids", i64, (PATCHES,)),
                TensorSpec("frame_segment_ids", i64, (PATCHES,))),
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
    """All four graph inputs for one call: ``pixel_values`` plus :func:`qwen_vision_inputs`.

    Raises:
        HimapError: if ``pixel_values`` does not hold sum(t*h*w) patches of the grid.
    """
    host = {k: torch.from_numpy(v) for k, v in qwen_vision_inputs(image_grid_thw, vision_config).items()}
    patches = host["frame_segment_ids"].shape[0]
    if pixel_values.ndim != 2 or pixel_values.shape[0] != patches:
        raise HimapError(f"pixel_values must be [num_patches={patches}, patch_dim] for image_grid_thw "
                         f"{np.asarray(image_grid_thw).tolist()}, got {tuple(pixel_values.shape)}")
    return {"pixel_values": pixel_values, **host}
