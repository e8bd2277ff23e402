"""The built-in ``shapes`` model: a small LLaVA-1.5 trained by this project to answer questions
about synthetic scenes (:mod:`himap_trt.data.shapes`), so accuracy under pruning can be measured
offline.

Architecture: LLaVA-1.5's (CLIP vision tower, features from the second-to-last layer without CLS,
2-layer GELU projector, Llama decoder), with the offline byte-level tokenizer and LLaVA-1.5 chat
template of the ``tiny`` models (:mod:`himap_trt.models.tiny`). Sizes (:data:`SHAPES_SPEC`):

- vision: CLIP, 96 x 96 px, 12 x 12 px patches -> 8 x 8 = 64 image tokens, hidden 64, 3 layers;
- decoder: Llama, 10 layers (so the default HiMAP plan K1=2, K2=8 applies), hidden 64, 4 heads.

The trained weights ship in the package (``models/weights/shapes.safetensors``, written by
``scripts/train_shapes.py``). On first use they are written, with the config, tokenizer, image
processor and chat template, to the cache as an ordinary Hugging Face model directory and loaded
back through the same code path as any checkpoint (like ``tiny``).
"""

from __future__ import annotations

from pathlib import Path

from himap_trt.models.tiny import PAD_ID, TinySpec, _config, _processor, _tokenizer, trained_model_dir

SHAPES_MODELS: tuple[str, ...] = ("shapes",)

#: The shipped model's dimensions (``scripts/train_shapes.py`` trains exactly these).
SHAPES_SPEC = TinySpec("shapes", num_key_value_heads=4, num_layers=10, hidden_size=64, num_heads=4,
                       intermediate_size=176, image_size=96, patch_size=12, vision_hidden=64, vision_layers=3)

#: transformers' init scale for training from scratch (the tiny models' 0.2 is for random weights).
TRAIN_INIT_STD = 0.02

WEIGHTS = Path(__file__).parent / "weights" / "shapes.safetensors"


def shapes_config(spec: TinySpec = SHAPES_SPEC):
    """The ``LlavaConfig`` of the shapes model (built-in tokenizer's vocabulary)."""
    config = _config(spec, vocab_size=len(_tokenizer()))
    config.text_config.initializer_range = TRAIN_INIT_STD
    config.vision_config.initializer_range = TRAIN_INIT_STD
    return config


def shapes_processor(spec: TinySpec = SHAPES_SPEC):
    """The ``LlavaProcessor`` of the shapes model (byte-level tokenizer, LLaVA-1.5 chat template)."""
    return _processor(spec, _tokenizer())


def new_shapes_model(spec: TinySpec = SHAPES_SPEC, seed: int = 0):
    """An untrained shapes model (transformers' init, seeded), in train mode: what training starts from."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(shapes_config(spec))
    model.generation_config.pad_token_id = PAD_ID
    return model


def shapes_model_dir(name: str = "shapes") -> Path:
    """The cache directory of the trained shapes model, written from the shipped weights on first use
    (:func:`himap_trt.models.tiny.trained_model_dir`).

    Raises:
        KeyError: ``name`` is not one of :data:`SHAPES_MODELS`.
        HimapError: the weights file is missing from the installation or does not fit the model.
    """
    if name not in SHAPES_MODELS:
        raise KeyError(name)
    return trained_model_dir(name, WEIGHTS, new_shapes_model,
                             lambda tmp: shapes_processor().save_pretrained(tmp), "scripts/train_shapes.py")
