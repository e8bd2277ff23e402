"""The built-in ``motion`` model: a small Qwen3-VL trained by this project to answer questions about
synthetic clips of moving shapes and still images (:mod:`himap_trt.data.motion`), so accuracy under
pruning can be measured offline on a Qwen family and on video.

Qwen3-VL rather than Qwen2.5-VL: it is the newer family and its DeepStack (visual features of
vision blocks 1-3 added to the hidden states of decoder layers 0-2 at the visual positions) is a
path every pruning method must keep right, which random weights cannot show in accuracy. Its
vision tower also has no window attention, so a clip costs less to train on here.

Architecture: the ``tiny-qwen3-vl`` recipe (:mod:`himap_trt.models.tiny_qwen`: offline byte-level
tokenizer with Qwen's special tokens, Qwen3-VL chat template, ``Qwen2VLImageProcessorPil`` with
16 px patches, mean/std 0.5, 4..64 visual tokens; interleaved M-RoPE sections (4, 2, 2)) with sizes
for training (:data:`MOTION_SPEC`):

- vision: 4 blocks, hidden 64, 16 px patches, 2x2 merge (a 96 x 96 frame pair -> 9 tokens),
  8x8 learned position table, DeepStack from blocks 1, 2, 3 into decoder layers 0, 1, 2;
- decoder: 10 layers (so the default HiMAP plan K1=2, K2=8 applies), hidden 64, 4 query heads /
  2 KV heads, FFN 176.

The trained weights ship in the package (``models/weights/motion.safetensors``, written by
``scripts/train_motion.py``). On first use they are written, with the config, tokenizer, image
processor and chat template, to the cache as an ordinary Hugging Face model directory and loaded
back through the same code path as any checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from himap_trt.models.tiny import trained_model_dir
from himap_trt.models.tiny_qwen import (
    ENDOFTEXT_ID, IM_END_ID, TinyQwenSpec, _config_qwen3, _processor, _tokenizer)

MOTION_MODELS: tuple[str, ...] = ("motion",)

#: The shipped model's dimensions (``scripts/train_motion.py`` trains exactly these).
MOTION_SPEC = TinyQwenSpec("motion", num_layers=10, hidden_size=64, num_heads=4, num_key_value_heads=2,
                           intermediate_size=176, mrope_section=(4, 2, 2), vision_hidden=64, vision_depth=4,
                           min_image_tokens=4, max_image_tokens=64, family="qwen3_vl")

#: transformers' init scale for training from scratch.
TRAIN_INIT_STD = 0.02

WEIGHTS = Path(__file__).parent / "weights" / "motion.safetensors"


def motion_config(spec: TinyQwenSpec = MOTION_SPEC):
    """The ``Qwen3VLConfig`` of the motion model (built-in tokenizer's vocabulary)."""
    config = _config_qwen3(spec, vocab_size=len(_tokenizer()))
    config.text_config.initializer_range = TRAIN_INIT_STD
    config.vision_config.initializer_range = TRAIN_INIT_STD
    return config


def motion_processor(spec: TinyQwenSpec = MOTION_SPEC):
    """The image-only Qwen3-VL processor of the motion model (byte-level tokenizer, chat template)."""
    return _processor(spec, _tokenizer())


def new_motion_model(spec: TinyQwenSpec = MOTION_SPEC, seed: int = 0):
    """An untrained motion model (transformers' init, seeded), in train mode: what training starts from."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(motion_config(spec))
    model.generation_config.pad_token_id = ENDOFTEXT_ID
    model.generation_config.eos_token_id = IM_END_ID
    model.generation_config.bos_token_id = ENDOFTEXT_ID
    return model


def motion_model_dir(name: str = "motion") -> Path:
    """The cache directory of the trained motion model, written from the shipped weights on first use
    (:func:`himap_trt.models.tiny.trained_model_dir`; tokenizer and image processor files side by side,
    the hub's layout).

    Raises:
        KeyError: ``name`` is not one of :data:`MOTION_MODELS`.
        HimapError: the weights file is missing from the installation or does not fit the model.
    """
    if name not in MOTION_MODELS:
        raise KeyError(name)

    def save_processor(tmp: Path) -> None:
        processor = motion_processor()
        processor.tokenizer.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)

    return trained_model_dir(name, WEIGHTS, new_motion_model, save_processor, "scripts/train_motion.py")
