"""Loading LLaVA-1.5 checkpoints (hub id, local directory, built-in ``tiny``) and their configs.

Supported: ``LlavaForConditionalGeneration`` with a CLIP vision tower and a Llama decoder, in
transformers' format (e.g. ``llava-hf/llava-1.5-7b-hf``), with its processor.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

import torch

from himap_trt.arch import architecture_for, known_models
from himap_trt.confine import refuse_custom_code
from himap_trt.dims import ModelDims
from himap_trt.errors import HimapError
from himap_trt.models.loaded import LoadedModel  # noqa: F401  (re-exported: himap_trt.models.LoadedModel)
from himap_trt.models.motion import MOTION_MODELS, motion_model_dir
from himap_trt.models.shapes import SHAPES_MODELS, shapes_model_dir
from himap_trt.models.tiny import TINY_MODELS, tiny_model_dir
from himap_trt.models.tiny_qwen import TINY_QWEN_MODELS, tiny_qwen_model_dir

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"

SUPPORTED = (
    "LLaVA-1.5-style checkpoints in transformers' format: LlavaForConditionalGeneration "
    "(model_type 'llava') with a CLIP vision tower ('clip_vision_model') and a Llama decoder ('llama')"
)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _model_choices() -> str:
    return ", ".join([*TINY_MODELS, *TINY_QWEN_MODELS, *SHAPES_MODELS, *MOTION_MODELS, *known_models()])


def canonical_dtype(name: str, flag: str = "--dtype") -> str:
    """``fp32``/``fp16``/``bf16`` (also accepts ``float32``, ``float16``, ``half``, ``bfloat16``).

    Raises:
        HimapError: naming ``flag`` for any other value.
    """
    aliases = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise HimapError(f"{flag} must be one of {', '.join(DTYPES)}, got {name!r}")
    return key


def parse_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """Like :func:`canonical_dtype`, returning the torch dtype."""
    return DTYPES[canonical_dtype(name, flag)]



def check_supported(config: Any, source: str) -> None:
    """Raise unless ``config`` describes a supported architecture (:func:`himap_trt.arch.architecture_for`).

    Raises:
        HimapError: naming ``source`` and what is supported.
    """
    architecture_for(config, source).check_supported(config, source)


def model_dims(config: Any) -> ModelDims:
    """Dimensions of a supported config (see :class:`ModelDims`), by its architecture."""
    return architecture_for(config).dims(config)


def resolve_dims(model: str, config: Any, max_image_tokens: int | None = None):
    """The :class:`~himap_trt.models.loading.ModelDims` of ``--model`` without loading weights.

    For a family with per-request image-token counts, ``num_image_tokens`` is the bound:
    ``--max-image-tokens`` if given, else the processor's max pixels of a local directory (its
    ``preprocessor_config.json``), else the published processors' bound.

    Raises:
        HimapError: ``--max-image-tokens`` below 1, or given for a model whose |V| is fixed.
    """
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


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection within ``timeout`` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _resolve(model: str) -> tuple[str, bool]:
    """(path or hub id, is_local) for a ``--model`` value."""
    if model in TINY_MODELS:
        return str(tiny_model_dir(model)), True
    if model in TINY_QWEN_MODELS:
        return str(tiny_qwen_model_dir(model)), True
    if model in SHAPES_MODELS:
        return str(shapes_model_dir(model)), True
    if model in MOTION_MODELS:
        return str(motion_model_dir(model)), True
    if model in known_models():
        return known_models()[model][0], False
    if os.path.isdir(model):
        return model, True
    if os.path.exists(model):
        raise HimapError(f"--model {model!r} is a file; expected a directory holding a checkpoint, a hub id, "
                         f"or one of {_model_choices()}")
    return model, False


def _from_pretrained(loader, source: str, is_local: bool, what: str, **kwargs):
    """Call ``loader(source, trust_remote_code=False, ...)``: from the local cache first, the hub only
    if reachable. A local directory that declares custom code is refused before the loader runs."""
    kwargs["trust_remote_code"] = False  # never run code from a model directory, never prompt for it
    if is_local:
        refuse_custom_code(source, "model")
        try:
            return loader(source, **kwargs)
        except HimapError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here is the directory's content (bad JSON,
            # a pickle refused by weights_only loading, truncated safetensors, ...): report it, no traceback
            raise HimapError(f"could not load the {what} from directory {source!r}: {_first_line(exc)}") from None
    try:
        return loader(source, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise HimapError(
            f"--model {source!r} is not a local directory and the Hugging Face hub cannot be reached to "
            f"download it; pass a local directory holding a LLaVA-1.5 checkpoint in transformers' format, "
            f"or --model tiny (built in: {_model_choices()})"
        )
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise HimapError(f"could not load the {what} of {source!r} from the hub: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # some messages carry terminal colours
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def load_config(model: str):
    """The ``LlavaConfig`` for a ``--model`` value, downloading nothing but the config.

    Known names (``llava-1.5-7b``, ``llava-1.5-13b``) and their hub ids are built in and need no
    network.

    Raises:
        HimapError: unknown/unreachable model, or an unsupported architecture.
    """
    from transformers import AutoConfig

    builtin = known_models()
    known = {name: name for name in builtin} | {hub: name for name, (hub, _) in builtin.items()}
    if model in known and not os.path.isdir(model):
        config = builtin[known[model]][1]()  # the published checkpoints' dimensions, offline
    else:
        source, is_local = _resolve(model)
        config = _from_pretrained(AutoConfig.from_pretrained, source, is_local, "config")
    check_supported(config, model)
    return config


def load_model(model: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str = "eager") -> LoadedModel:
    """Load a supported checkpoint and its processor.

    Args:
        model: hub id (e.g. ``llava-hf/llava-1.5-7b-hf``), local directory, a built-in tiny model
            (``tiny``, ``tiny-gqa``), the built-in trained ``shapes`` and ``motion`` models, or a known short name
            (``llava-1.5-7b``).
        dtype: parameter dtype.
        device: where to put the parameters.
        attn_implementation: transformers' attention implementation for the HF model itself
            (the project's graphs use their own attention code; ``eager`` lets tests read
            attention probabilities).

    Raises:
        HimapError: unknown model, hub unreachable, unsupported architecture, broken files.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our commands show their own progress
    config = load_config(model)  # fails fast on unsupported architectures
    source, is_local = _resolve(model)
    processor = _from_pretrained(architecture_for(config).load_processor, source, is_local, "processor")
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise HimapError(f"the processor of {model!r} is not a multimodal (image + text) processor")
    hf_model = _from_pretrained(
        architecture_for(config).model_class().from_pretrained, source, is_local, "weights",
        config=config, dtype=dtype, attn_implementation=attn_implementation,
    )
    hf_model.to(device).eval()
    return LoadedModel(model=hf_model, processor=processor, source=model, path=source)
