"""Model sources: Hugging Face LLaVA-1.5 checkpoints, the built-in ``tiny`` models, and known
configurations (for FLOPs and profiles without downloading weights)."""

from himap_trt.models.loading import (
    DEFAULT_MODEL,
    LoadedModel,
    ModelDims,
    check_supported,
    load_config,
    load_model,
    model_dims,
    resolve_dims,
)

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelDims",
    "check_supported",
    "load_config",
    "load_model",
    "model_dims",
    "resolve_dims",
]
