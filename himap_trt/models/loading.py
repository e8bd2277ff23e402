"""Loading LLaVA-1.5 checkpoints (hub id, local directory, built-in ``tiny``) and their configs.

Supported: ``LlavaForConditionalGeneration`` with a CLIP vision tower and a Llama decoder, in
transformers' format (e.g. ``llava-hf/llava-1.5-7b-hf``), with its processor.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch

from himap_trt.errors import HimapError
from himap_trt.models.known import KNOWN_MODELS, known_config
from himap_trt.models.shapes import SHAPES_MODELS, shapes_model_dir
from himap_trt.models.tiny import TINY_MODELS, tiny_model_dir

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"

SUPPORTED = (
    "LLaVA-1.5-style checkpoints in transformers' format: LlavaForConditionalGeneration "
    "(model_type 'llava') with a CLIP vision tower ('clip_vision_model') and a Llama decoder ('llama')"
)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _model_choices() -> str:
    return ", ".join([*TINY_MODELS, *SHAPES_MODELS, *KNOWN_MODELS])


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


@dataclass(frozen=True)
class ModelDims:
    """The dimensions the graphs, plans, FLOPs and profiles need, read from a ``LlavaConfig``.

    All sizes are element counts; ``num_image_tokens`` is |V| per prompt (tokens).
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


def check_supported(config: Any, source: str) -> None:
    """Raise unless ``config`` describes a supported architecture.

    Raises:
        HimapError: naming ``source`` and what is supported.
    """
    model_type = getattr(config, "model_type", None)
    text_type = getattr(getattr(config, "text_config", None), "model_type", None)
    vision_type = getattr(getattr(config, "vision_config", None), "model_type", None)
    if model_type != "llava" or text_type != "llama" or vision_type != "clip_vision_model":
        raise HimapError(
            f"unsupported model {source!r} (model_type={model_type!r}, decoder={text_type!r}, "
            f"vision={vision_type!r}); supported: {SUPPORTED}"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise HimapError(
            f"unsupported model {source!r}: vision_feature_layer={config.vision_feature_layer!r}; "
            "only a single feature layer (an int) is supported"
        )


def model_dims(config: Any) -> ModelDims:
    """Dimensions of a supported ``LlavaConfig`` (see :class:`ModelDims`)."""
    text, vision = config.text_config, config.vision_config
    heads = text.num_attention_heads
    patches = (vision.image_size // vision.patch_size) ** 2
    layer = config.vision_feature_layer
    used = layer if layer >= 0 else vision.num_hidden_layers + 1 + layer
    return ModelDims(
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=text.num_key_value_heads or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab_size=text.vocab_size,
        max_position_embeddings=text.max_position_embeddings,
        num_image_tokens=patches if config.vision_feature_select_strategy == "default" else patches + 1,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        vision_hidden_size=vision.hidden_size,
        vision_intermediate_size=vision.intermediate_size,
        vision_layers_used=used,
        vision_tokens=patches + 1,
        image_token_id=config.image_token_id,
    )


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
    if model in SHAPES_MODELS:
        return str(shapes_model_dir(model)), True
    if model in KNOWN_MODELS:
        return KNOWN_MODELS[model][0], False
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
        from himap_trt.confine import refuse_custom_code

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

    known = {name: name for name in KNOWN_MODELS} | {hub: name for name, (hub, *_) in KNOWN_MODELS.items()}
    if model in known and not os.path.isdir(model):
        config = known_config(known[model])  # the published checkpoints' dimensions, offline
    else:
        source, is_local = _resolve(model)
        config = _from_pretrained(AutoConfig.from_pretrained, source, is_local, "config")
    check_supported(config, model)
    return config


@dataclass
class LoadedModel:
    """A loaded checkpoint.

    Attributes:
        model: the ``LlavaForConditionalGeneration``, in eval mode, on ``device`` in ``dtype``.
        processor: its ``LlavaProcessor`` (tokenizer + image processor + chat template).
        source: the ``--model`` value it was loaded from (hub id, directory or built-in name).
        path: the directory or hub id actually loaded.
        weights: None when every weight is in ``model``; a
            :class:`himap_trt.models.streaming.StreamedWeights` when the decoder layers stay in the
            checkpoint files (``load_streamed``: the bounded-memory export).
    """

    model: Any
    processor: Any
    source: str
    path: str
    weights: Any = None

    @property
    def dims(self) -> ModelDims:
        """The model's :class:`ModelDims`."""
        return model_dims(self.model.config)


def load_model(model: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str = "eager") -> LoadedModel:
    """Load a supported checkpoint and its processor.

    Args:
        model: hub id (e.g. ``llava-hf/llava-1.5-7b-hf``), local directory, a built-in tiny model
            (``tiny``, ``tiny-gqa``), the built-in trained ``shapes`` model, or a known short name
            (``llava-1.5-7b``).
        dtype: parameter dtype.
        device: where to put the parameters.
        attn_implementation: transformers' attention implementation for the HF model itself
            (the project's graphs use their own attention code; ``eager`` lets tests read
            attention probabilities).

    Raises:
        HimapError: unknown model, hub unreachable, unsupported architecture, broken files.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our commands show their own progress
    config = load_config(model)  # fails fast on unsupported architectures
    source, is_local = _resolve(model)
    processor = _from_pretrained(AutoProcessor.from_pretrained, source, is_local, "processor")
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise HimapError(f"the processor of {model!r} is not a multimodal (image + text) processor")
    hf_model = _from_pretrained(
        LlavaForConditionalGeneration.from_pretrained, source, is_local, "weights",
        config=config, dtype=dtype, attn_implementation=attn_implementation,
    )
    hf_model.to(device).eval()
    return LoadedModel(model=hf_model, processor=processor, source=model, path=source)
