"""The built-in ``tiny-qwen2.5-vl`` and ``tiny-qwen3-vl`` (and the video benchmark models
``medium-qwen2.5-vl`` / ``medium-qwen3-vl``, :data:`TINY_QWEN_MODELS`): deterministic random-weight
Qwen2.5-VL and Qwen3-VL checkpoints (``tiny-qwen3-vl``: the same decoder sizes with Qwen3's q/k norms and
interleaved M-RoPE sections (4, 2, 2); a 4-block vision tower of 16 px patches with an 8x8 learned
position table and DeepStack from blocks 1-3; image processor with mean/std 0.5, 4..64 tokens).

Written once to the cache as an ordinary Hugging Face directory (``config.json``,
``model.safetensors``, tokenizer, image processor, chat template) and loaded back through
:func:`himap_trt.models.load_model` like a real checkpoint (``trust_remote_code=False``).

- vision: Qwen2.5-VL's tower (window attention, 2-D rotary, 2x2 patch merger), 14 px patches,
  hidden 32, 4 blocks (full attention in blocks 1 and 3), window 112 px.
- image processor: transformers' ``Qwen2VLImageProcessorPil`` (Qwen2.5-VL's own resize: sides
  multiples of 28 px) with min/max pixels of 4 / 64 tokens, so a photo gives 4..64 image tokens.
- decoder: Qwen2, 12 layers, hidden 64, 4 query heads / 2 KV heads of 16 (grouped-query
  attention), FFN 176, M-RoPE sections (2, 3, 3).
- tokenizer: byte-level BPE without merges (one token per byte, built with ``tokenizers``) plus
  Qwen's special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``,
  ``<|vision_end|>``, ``<|vision_pad|>``, ``<|image_pad|>``, ``<|video_pad|>``) and Qwen's chat
  template (system prompt, ``<|vision_start|><|image_pad|><|vision_end|>`` for the image).

The weights are random: generated text is meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from himap_trt.arch import qwen2_5_vl, qwen3_vl
from himap_trt.models.tiny import _randomize, cache_root, cached_model_dir

RECIPE_VERSION = 2  # 2: the chat template places videos; Qwen's special tokens stay whole after loading

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
(ENDOFTEXT_ID, IM_START_ID, IM_END_ID, VISION_START_ID, VISION_END_ID, VISION_PAD_ID, IMAGE_PAD_ID,
 VIDEO_PAD_ID) = range(len(SPECIAL_TOKENS))

#: Qwen2.5-VL's conversation format (written for this project; the hub's processors carry an
#: equivalent template): a default system message, ``<|im_start|>role\n...<|im_end|>\n`` turns, the
#: image as ``<|vision_start|><|image_pad|><|vision_end|>``.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class TinyQwenSpec:
    """Dimensions of a built-in random-weight Qwen2.5-VL / Qwen3-VL (``family``).

    ``max_positions``: the decoder's ``max_position_embeddings`` (tokens); ``vision_heads``: the vision
    tower's attention heads (its head size ``vision_hidden / vision_heads`` must be a multiple of 4 for
    the 2-D rotary embedding); ``min_image_tokens`` / ``max_image_tokens``: the processor's bounds per
    image or frame pair (merged tokens)."""

    name: str
    num_layers: int = 12
    hidden_size: int = 64
    num_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 176
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    vision_hidden: int = 32
    vision_depth: int = 4
    min_image_tokens: int = 4
    max_image_tokens: int = 64
    seed: int = 3
    init_std: float = 0.2
    family: str = "qwen2_5_vl"
    max_positions: int = 2048
    vision_heads: int = 2


TINY_QWEN_MODELS: dict[str, TinyQwenSpec] = {
    "tiny-qwen2.5-vl": TinyQwenSpec("tiny-qwen2.5-vl"),
    # Qwen3-VL: interleaved M-RoPE over 8 frequencies (T 0,3,6,7; H 1,4; W 2,5), DeepStack from
    # vision blocks 1, 2, 3 into decoder layers 0, 1, 2 (so HiMAP's default K1 = 2 falls inside)
    "tiny-qwen3-vl": TinyQwenSpec("tiny-qwen3-vl", mrope_section=(4, 2, 2), seed=5, family="qwen3_vl"),
    # The video benchmark models (issue 29): decoder like ``medium`` (hidden 512, 12 layers, 8 query /
    # 2 KV heads of 64, FFN 1408) and a vision tower of hidden 128 (~6% of the decoder's FLOPs per visual
    # token, near Qwen2.5-VL-7B's ~15%), so a long video's prefill is decoder work as in the real models;
    # 64 tokens per frame, 4,096 positions.
    "medium-qwen2.5-vl": TinyQwenSpec("medium-qwen2.5-vl", hidden_size=512, num_heads=8, num_key_value_heads=2,
                                      intermediate_size=1408, mrope_section=(8, 12, 12), vision_hidden=128,
                                      vision_heads=4, seed=7, init_std=0.05, max_positions=4096),
    "medium-qwen3-vl": TinyQwenSpec("medium-qwen3-vl", hidden_size=512, num_heads=8, num_key_value_heads=2,
                                    intermediate_size=1408, mrope_section=(12, 10, 10), vision_hidden=128,
                                    vision_heads=4, seed=9, init_std=0.05, max_positions=4096, family="qwen3_vl"),
}

#: Qwen3-VL's conversation format (no default system message, as the published template), with
#: ``<|vision_start|><|image_pad|><|vision_end|>`` for an image and ``<|video_pad|>`` for a video.
CHAT_TEMPLATE_QWEN3 = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def _tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # registered in the backend itself, so tokenizer.json keeps them whole after save/load (transformers
    # 5 does not persist ``additional_special_tokens``: before recipe 2, '<|im_start|>' came back as bytes)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        padding_side="left",
    )


def _processor(spec: TinyQwenSpec, tokenizer):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    qwen3 = spec.family == "qwen3_vl"
    patch = 16 if qwen3 else 14
    side = 2 * patch  # patch x merge 2
    extra = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]) if qwen3 else {}
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": spec.min_image_tokens * side * side, "longest_edge": spec.max_image_tokens * side * side},
        patch_size=patch, temporal_patch_size=2, merge_size=2, **extra,
    )
    template = CHAT_TEMPLATE_QWEN3 if qwen3 else CHAT_TEMPLATE
    tokenizer.chat_template = template
    family = qwen3_vl if qwen3 else qwen2_5_vl
    return family._image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                                chat_template=template)


def _config_qwen3(spec: TinyQwenSpec, vocab_size: int):
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_key_value_heads,
            head_dim=spec.hidden_size // spec.num_heads, vocab_size=vocab_size,
            max_position_embeddings=spec.max_positions,
            rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(spec.mrope_section),
                             "mrope_interleaved": True},
            bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID,
        ),
        vision_config=dict(
            depth=spec.vision_depth, hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
            num_heads=spec.vision_heads, in_channels=3, out_hidden_size=spec.hidden_size, patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[1, 2, 3],
            hidden_act="gelu_pytorch_tanh",
        ),
        image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID, vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID, tie_word_embeddings=False,
    )


def _config(spec: TinyQwenSpec, vocab_size: int):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_key_value_heads, vocab_size=vocab_size,
            max_position_embeddings=spec.max_positions, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(spec.mrope_section)},
            bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID,
        ),
        vision_config=dict(
            depth=spec.vision_depth, hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
            num_heads=spec.vision_heads, in_chans=3, out_hidden_size=spec.hidden_size, patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3], tokens_per_second=2,
        ),
        image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID, vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID, tie_word_embeddings=False,
    )


def tiny_qwen_model_dir(name: str) -> Path:
    """Return the directory of built-in model ``name``, writing it (atomically) on first use.

    Raises:
        KeyError: if ``name`` is not one of :data:`TINY_QWEN_MODELS`.
    """
    spec = TINY_QWEN_MODELS[name]

    def build(tmp: Path) -> None:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

        tokenizer = _tokenizer()
        processor = _processor(spec, tokenizer)
        if spec.family == "qwen3_vl":
            model = Qwen3VLForConditionalGeneration(_config_qwen3(spec, vocab_size=len(tokenizer)))
        else:
            model = Qwen2_5_VLForConditionalGeneration(_config(spec, vocab_size=len(tokenizer)))
        with torch.no_grad():
            _randomize(model, spec.seed, spec.init_std)
        model.generation_config.pad_token_id = ENDOFTEXT_ID
        model.generation_config.eos_token_id = IM_END_ID
        model.generation_config.bos_token_id = ENDOFTEXT_ID
        model.save_pretrained(tmp)
        # the hub's layout: tokenizer (with its chat template) and image processor files side by side
        processor.tokenizer.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)

    return cached_model_dir(cache_root() / "models" / f"{name}-r{RECIPE_VERSION}", build)
