"""Configurations of published LLaVA-1.5 checkpoints, built in so that FLOPs, plans and
TensorRT profiles can be computed offline (no weights needed).

The dimensions are those of ``llava-hf/llava-1.5-{7b,13b}-hf`` (CLIP ViT-L/14 at 336 px,
Vicuna-1.5 decoder, 2-layer GELU projector).
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

#: Short name -> (hub id, decoder hidden size d, FFN size m, layers L, attention heads).
KNOWN_MODELS: dict[str, tuple[str, int, int, int, int]] = {
    "llava-1.5-7b": ("llava-hf/llava-1.5-7b-hf", 4096, 11008, 32, 32),
    "llava-1.5-13b": ("llava-hf/llava-1.5-13b-hf", 5120, 13824, 40, 40),
}


def known_config(name: str) -> LlavaConfig:
    """The ``LlavaConfig`` of a known checkpoint (see :data:`KNOWN_MODELS`), without downloading.

    Raises:
        KeyError: if ``name`` is not a key of :data:`KNOWN_MODELS`.
    """
    _, hidden, ffn, layers, heads = KNOWN_MODELS[name]
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=32001,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
