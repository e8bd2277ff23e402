"""The built-in random-weight Qwen checkpoints' dimensions are ones transformers' models accept."""

from __future__ import annotations

import pytest

from himap_trt.models.tiny_qwen import TINY_QWEN_MODELS, _config, _config_qwen3


@pytest.mark.parametrize("name", sorted(TINY_QWEN_MODELS))
def test_builtin_qwen_dimensions_are_consistent(name):
    spec = TINY_QWEN_MODELS[name]
    head_dim = spec.hidden_size // spec.num_heads
    assert spec.hidden_size % spec.num_heads == 0 and spec.num_heads % spec.num_key_value_heads == 0
    # M-RoPE splits the rotary half of each head into (temporal, height, width) frequencies
    assert sum(spec.mrope_section) == head_dim // 2
    # the vision tower's 2-D rotary embedding rotates halves of each head's half
    assert spec.vision_hidden % spec.vision_heads == 0 and (spec.vision_hidden // spec.vision_heads) % 4 == 0
    config = (_config_qwen3 if spec.family == "qwen3_vl" else _config)(spec, vocab_size=300)
    assert config.text_config.num_hidden_layers == spec.num_layers
    assert config.text_config.max_position_embeddings == spec.max_positions
    assert config.vision_config.out_hidden_size == spec.hidden_size
