"""Model families behind one interface (:class:`~himap_trt.arch.base.Architecture`).

:data:`ARCHITECTURES` is the one place that maps a Hugging Face ``config.model_type`` to its
implementation; adding a family is one new module and one line here (docs/ARCHITECTURE.md,
"Model families").
"""

from __future__ import annotations

from typing import Any

from himap_trt.arch.base import Architecture
from himap_trt.arch.llava import Llava
from himap_trt.arch.qwen2_5_vl import Qwen2_5_VL
from himap_trt.arch.qwen3_vl import Qwen3_VL
from himap_trt.errors import HimapError

#: ``config.model_type`` -> the family implementing it.
ARCHITECTURES: dict[str, Architecture] = {arch.model_type: arch for arch in (Llava(), Qwen2_5_VL(), Qwen3_VL())}


def supported_models() -> str:
    """What every family supports, one line each joined by '; '."""
    return "; ".join(arch.supported for arch in ARCHITECTURES.values())


def architecture_for(config: Any, source: str = "the model") -> Architecture:
    """The family of a Hugging Face config (by ``config.model_type``).

    Raises:
        HimapError: naming ``source`` and what is supported, for any other model type.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        text_type = getattr(getattr(config, "text_config", None), "model_type", None)
        vision_type = getattr(getattr(config, "vision_config", None), "model_type", None)
        raise HimapError(
            f"unsupported model {source!r} (model_type={model_type!r}, decoder={text_type!r}, "
            f"vision={vision_type!r}); supported: {supported_models()}"
        )
    return ARCHITECTURES[model_type]


def get_architecture(name: str) -> Architecture:
    """The family called ``name`` (``ModelDims.architecture``; a manifest's).

    Raises:
        HimapError: for an unknown name.
    """
    for arch in ARCHITECTURES.values():
        if arch.name == name:
            return arch
    raise HimapError(f"unknown architecture {name!r}; known: {', '.join(a.name for a in ARCHITECTURES.values())}")


def resolve_dims(model: str, config: Any, max_image_tokens: int | None = None):
    """The :class:`~himap_trt.models.loading.ModelDims` of ``--model`` without loading weights.

    For a family with per-request image-token counts, ``num_image_tokens`` is the bound:
    ``--max-image-tokens`` if given, else the processor's max pixels of a local directory (its
    ``preprocessor_config.json``), else the published processors' bound.

    Raises:
        HimapError: ``--max-image-tokens`` below 1, or given for a model whose |V| is fixed.
    """
    from himap_trt.models.loading import _resolve

    arch = architecture_for(config, model)
    dims = arch.dims(config)
    if not arch.variable_image_tokens:
        if max_image_tokens is not None:
            raise HimapError(f"--max-image-tokens is for models with per-request image-token counts (Qwen2.5-VL); "
                             f"{model!r} always has {dims.num_image_tokens}")
        return dims
    if max_image_tokens is not None and max_image_tokens < 1:
        raise HimapError(f"--max-image-tokens must be at least 1, got {max_image_tokens}")
    bound = max_image_tokens
    if bound is None and model not in known_models():
        path, is_local = _resolve(model)
        bound = arch.max_image_tokens_in(path) if is_local else None
    return arch.with_max_image_tokens(dims, bound or dims.num_image_tokens)


def plan_dims(dims: Any, plan: Any):
    """``dims`` with the image-token bound of ``plan`` (an export's ``--max-image-tokens``) where
    |V| varies per request; ``dims`` unchanged otherwise."""
    arch = get_architecture(dims.architecture)
    if arch.variable_image_tokens and plan.num_image_tokens != dims.num_image_tokens:
        return arch.with_max_image_tokens(dims, plan.num_image_tokens)
    return dims


def known_models() -> dict[str, tuple[str, Any]]:
    """Every family's built-in configurations: short name -> (hub id, config factory)."""
    known: dict[str, tuple[str, Any]] = {}
    for arch in ARCHITECTURES.values():
        known.update(arch.known_models())
    return known


__all__ = ["ARCHITECTURES", "Architecture", "architecture_for", "get_architecture", "known_models", "plan_dims",
           "resolve_dims", "supported_models"]
