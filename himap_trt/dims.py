"""The dimensions of a model: what the graphs, plans, FLOPs and profiles need to know about it.

A foundation module (no imports from the package), so that every layer can take a
:class:`ModelDims` without importing model loading (``himap_trt.models``) or the model families
(``himap_trt.arch``, which produce it from a Hugging Face config).
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class ModelDims:
    """The dimensions the graphs, plans, FLOPs and profiles need, read from a model config (by its family, :mod:`himap_trt.arch`).

    All sizes are element counts; ``num_image_tokens`` is |V| per prompt (tokens), or its bound for
    a family with per-request counts (``architecture``: the :mod:`himap_trt.arch` family's name;
    ``spatial_merge_size`` / ``temporal_patch_size``: Qwen2.5-VL's patch merger and temporal
    patches, 1 elsewhere).
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    num_image_tokens: int
    image_size: int
    patch_size: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers_used: int
    vision_tokens: int
    image_token_id: int
    architecture: str = "llava"
    spatial_merge_size: int = 1
    temporal_patch_size: int = 1
    vision_window_size: int = 0

