"""Model families behind one interface (:class:`~himap_trt.arch.base.Architecture`).

:data:`ARCHITECTURES` is the one place that maps a Hugging Face ``config.model_type`` to its
implementation; adding a family is one new module and one line here (docs/ARCHITECTURE.md,
"Model families").
"""

from __future__ import annotations

from typing import Any

from himap_trt.arch.base import Architecture, register, supported_models
from himap_trt.arch.llava import Llava
from himap_trt.arch.qwen2_5_vl import Qwen2_5_VL
from himap_trt.errors import HimapError

#: ``config.model_type`` -> the family implementing it.
ARCHITECTURES: dict[str, Architecture] = register(Llava(), Qwen2_5_VL())


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
           "supported_models"]
