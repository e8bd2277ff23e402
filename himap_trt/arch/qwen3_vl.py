"""Qwen3-VL (transformers' ``Qwen3VLForConditionalGeneration``): ViT with a learned, resampled
position table and per-frame attention, DeepStack, Qwen3 decoder with interleaved M-RoPE.

What differs from Qwen2.5-VL (:mod:`himap_trt.arch.qwen2_5_vl`, whose request handling it
inherits: per-request |V|, masked image slots, [3, batch, sequence] positions; docs/QWEN3VL.md):

- vision graph (:mod:`himap_trt.graphs.qwen3_vision`): 16-pixel patches (32 px per merged token),
  no windows, and a second output ``deepstack_embeds`` [n_deep, num_image_tokens, D]: the features
  that transformers adds to the image tokens' hidden states after decoder layers 0..n_deep-1.
  Segment graphs covering those layers take them as ``deepstack.{l}`` inputs
  (:func:`himap_trt.graphs.spec.graph_specs`); a pruning stage gathers them with its kept indices.
- decoder: Qwen3 layers (per-head RMSNorm of queries and keys, :func:`himap_trt.graphs.modules.layer_qkv`),
  interleaved M-RoPE (transformers' rotary module, called by the segment graphs: the positions are
  the same three ids per token as Qwen2.5-VL's, only the frequency layout differs).
- image positions: for an image (t = 1), transformers' ``get_rope_index`` gives the same ids as
  Qwen2.5-VL's (:func:`~himap_trt.arch.qwen2_5_vl.mrope_positions`).
- chat template: the checkpoint's (no default system message in the published ones).
"""

from __future__ import annotations

from typing import Any

from himap_trt.arch.base import decoder_dims
from himap_trt.arch.qwen2_5_vl import Qwen2_5_VL
from himap_trt.errors import HimapError
from himap_trt.graphs.qwen3_vision import Qwen3VisionEncoder, qwen3_vision_feeds, qwen3_vision_spec

#: Short name -> (hub id, hidden, FFN, layers, heads, kv heads, tied embeddings, vision depth,
#: vision hidden, vision FFN, DeepStack vision layers). From the published ``config.json`` files.
KNOWN_QWEN3: dict[str, tuple] = {
    "qwen3-vl-8b": ("Qwen/Qwen3-VL-8B-Instruct", 4096, 12288, 36, 32, 8, False, 27, 1152, 4304, (8, 16, 24)),
    "qwen3-vl-4b": ("Qwen/Qwen3-VL-4B-Instruct", 2560, 9728, 36, 32, 8, True, 24, 1024, 4096, (5, 11, 17)),
}


def known_qwen3_config(name: str):
    """The ``Qwen3VLConfig`` of a published checkpoint (:data:`KNOWN_QWEN3`), offline.

    Raises:
        KeyError: if ``name`` is not a key of :data:`KNOWN_QWEN3`.
    """
    from transformers import Qwen3VLConfig

    _, hidden, ffn, layers, heads, kv, tied, depth, v_hidden, v_ffn, deep = KNOWN_QWEN3[name]
    return Qwen3VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                         rms_norm_eps=1e-6, tie_word_embeddings=tied,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                         bos_token_id=151643, eos_token_id=151645),
        vision_config=dict(depth=depth, hidden_size=v_hidden, intermediate_size=v_ffn, num_heads=16, in_channels=3,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                           num_position_embeddings=2304, deepstack_visual_indexes=list(deep)),
        tie_word_embeddings=tied,
    )


class Qwen3_VL(Qwen2_5_VL):
    name = "qwen3_vl"
    model_type = "qwen3_vl"
    supported = "Qwen3-VL checkpoints in transformers' format: Qwen3VLForConditionalGeneration (model_type 'qwen3_vl')"

    def check_supported(self, config: Any, source: str) -> None:
        text, vision = getattr(config, "text_config", None), getattr(config, "vision_config", None)
        section = (getattr(text, "rope_parameters", None) or {}).get("mrope_section")
        head_dim = decoder_dims(text)["head_dim"]
        if not section or sum(section) != head_dim // 2 or len(section) != 3:
            raise HimapError(f"unsupported model {source!r}: rope_parameters.mrope_section={section!r} must be three "
                             f"numbers summing to head_dim/2 = {head_dim // 2}")
        deep = list(getattr(vision, "deepstack_visual_indexes", None) or [])
        if not deep or len(deep) > text.num_hidden_layers:
            raise HimapError(f"unsupported model {source!r}: vision_config.deepstack_visual_indexes={deep!r} must name "
                             f"1..{text.num_hidden_layers} vision layers (one per early decoder layer)")
        side = int(vision.num_position_embeddings ** 0.5)
        if side * side != vision.num_position_embeddings:
            raise HimapError(f"unsupported model {source!r}: vision_config.num_position_embeddings="
                             f"{vision.num_position_embeddings} is not a square grid")

    def dims(self, config: Any):
        vision = config.vision_config
        return self.vision_dims(config, deepstack_layers=len(vision.deepstack_visual_indexes),
                                vision_position_embeddings=vision.num_position_embeddings)

    def model_class(self) -> type:
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def load_processor(self, path: str, **kwargs):
        return load_qwen3_processor(path, **kwargs)

    def known_models(self):
        return {name: (hub, lambda name=name: known_qwen3_config(name)) for name, (hub, *_) in KNOWN_QWEN3.items()}

    def vision_spec(self, dims, dtype: str):
        return qwen3_vision_spec(self._vision_config(dims), dtype)

    @staticmethod
    def _vision_config(dims) -> dict[str, Any]:
        return {"in_channels": 3, "temporal_patch_size": dims.temporal_patch_size, "patch_size": dims.patch_size,
                "out_hidden_size": dims.hidden_size, "spatial_merge_size": dims.spatial_merge_size,
                "num_position_embeddings": dims.vision_position_embeddings,
                "deepstack_visual_indexes": list(range(dims.deepstack_layers))}

    def vision_module(self, model):
        return Qwen3VisionEncoder(model.model.visual)

    def _video_placeholder(self, processor, video, grid) -> str:
        """transformers' ``Qwen3VLProcessor.replace_video_token``: per temporal patch, its timestamp
        (the mean time of its first and last frame, seconds, one decimal) then the patch's tokens
        between vision markers."""
        merge = processor.image_processor.merge_size
        t, h, w = (int(v) for v in grid[0])
        temporal = int(processor.image_processor.temporal_patch_size)
        times = list(video.times) + [video.times[-1]] * (t * temporal - len(video.times))
        per = h * w // (merge * merge)
        return "".join(f"<{(times[k * temporal] + times[k * temporal + temporal - 1]) / 2:.1f} seconds>"
                       + "<|vision_start|>" + "<|video_pad|>" * per + "<|vision_end|>" for k in range(t))

    def _video_groups(self, video, grid, merge):
        """transformers' ``get_rope_index`` splits a video into its temporal patches, each placed like
        an image (t = 1) after its timestamp text."""
        t, h, w = (int(v) for v in grid[0])
        return [(1, h // merge, w // merge, 1.0)] * t

    def vision_feeds(self, batch, spec):
        return qwen3_vision_feeds(batch.pixel_values, batch.image_grid_thw, spec.attrs)


def _image_only_processor_class():
    from transformers import Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen3ImageProcessor(Qwen3VLProcessor):
        """transformers' ``Qwen3VLProcessor`` for images: the same prompt expansion (one
        ``<|image_pad|>`` per merged 32x32 patch) and ``mm_token_type_ids``, without the video
        processor (it needs torchvision, not a dependency of this project)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.video_processor = None
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
            self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
            self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)

    return Qwen3ImageProcessor


def load_qwen3_processor(path: str, **kwargs):
    """Tokenizer, image processor (transformers' PIL ``Qwen2VLImageProcessorPil`` with the
    directory's settings: 16-pixel patches, min/max pixels, normalisation) and chat template of a
    Qwen3-VL directory, as one image-only processor. ``kwargs`` go to every ``from_pretrained``."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    kwargs.pop("trust_remote_code", None)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kwargs)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
    return _image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                         chat_template=getattr(tokenizer, "chat_template", None))
