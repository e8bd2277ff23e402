"""LLaVA-1.5 (transformers' ``LlavaForConditionalGeneration``: CLIP vision tower, Llama decoder).

A fixed number of image tokens per prompt (|V| = (image_size / patch_size)², 576 for LLaVA-1.5),
position ids [batch, sequence], the vision graph takes ``pixel_values`` [batch, 3, H, W].
"""

from __future__ import annotations

from typing import Any

import torch

from himap_trt.arch.base import Architecture, decoder_dims, supported_models
from himap_trt.arch.llava_known import KNOWN_MODELS, known_config
from himap_trt.dims import ModelDims
from himap_trt.errors import HimapError
from himap_trt.graphs.modules import VisionEncoder
from himap_trt.graphs.spec import GraphSpec, TensorSpec
from himap_trt.chat import check_special_text, conversation_types, encode_rendered, render
from himap_trt.prompt import PromptBatch, position_ids_from_mask, prepare_batch
from himap_trt.video import Video


class Llava(Architecture):
    name = "llava"
    model_type = "llava"
    streams_weights = True
    supported = ("LLaVA-1.5-style checkpoints in transformers' format: LlavaForConditionalGeneration "
                 "(model_type 'llava') with a CLIP vision tower ('clip_vision_model') and a Llama decoder ('llama')")

    def check_supported(self, config: Any, source: str) -> None:
        text_type = getattr(getattr(config, "text_config", None), "model_type", None)
        vision_type = getattr(getattr(config, "vision_config", None), "model_type", None)
        if text_type != "llama" or vision_type != "clip_vision_model":
            raise HimapError(
                f"unsupported model {source!r} (model_type={config.model_type!r}, decoder={text_type!r}, "
                f"vision={vision_type!r}); supported: {supported_models()}"
            )
        if not isinstance(config.vision_feature_layer, int):
            raise HimapError(
                f"unsupported model {source!r}: vision_feature_layer={config.vision_feature_layer!r}; "
                "only a single feature layer (an int) is supported"
            )

    def dims(self, config: Any):
        text, vision = config.text_config, config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        layer = config.vision_feature_layer
        used = layer if layer >= 0 else vision.num_hidden_layers + 1 + layer
        return ModelDims(
            **decoder_dims(text),
            num_image_tokens=patches if config.vision_feature_select_strategy == "default" else patches + 1,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            vision_hidden_size=vision.hidden_size,
            vision_intermediate_size=vision.intermediate_size,
            vision_layers_used=used,
            vision_tokens=patches + 1,
            image_token_id=config.image_token_id,
        )

    def model_class(self) -> type:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def known_models(self):
        return {name: (hub, lambda name=name: known_config(name)) for name, (hub, *_) in KNOWN_MODELS.items()}

    def vision_spec(self, dims, dtype: str):
        b = "batch"
        return GraphSpec(
            name="vision", kind="vision",
            inputs=(TensorSpec("pixel_values", dtype, (b, 3, dims.image_size, dims.image_size)),),
            outputs=(TensorSpec("image_features", dtype, (b, dims.num_image_tokens, dims.hidden_size)),),
        )

    def vision_module(self, model):
        return VisionEncoder(model)

    def prepare_batch(self, processor, images, questions, image_token_id, num_image_tokens):
        if any(isinstance(item, Video) for item in images):
            raise HimapError("video prompts need a Qwen2.5-VL or Qwen3-VL export; this export is LLaVA-1.5 "
                             "(one image per prompt)")

        return prepare_batch(processor, images, questions, image_token_id, num_image_tokens)

    def prepare_conversation(self, processor, conversation, visuals, image_token_id, num_image_tokens):
        """LLaVA-1.5's graphs hold one image per prompt (a scoring graph drops a constant
        |V| - keep): zero or one image, in any user message."""
        parts = conversation.visual_parts
        if any(p.kind == "video" for p in parts):
            where = next(p.where for p in parts if p.kind == "video")
            raise HimapError(f"{where}: video prompts need a Qwen2.5-VL or Qwen3-VL export; this export is LLaVA-1.5")
        if len(parts) > 1:
            raise HimapError(f"{parts[1].where}: {len(parts)} images in the conversation; this LLaVA-1.5 export's "
                             "graphs hold one image per conversation")
        check_special_text(conversation, processor.tokenizer)
        placeholder = getattr(processor, "image_token", None) or "<image>"
        rendered = render(processor, conversation)
        ids, located = encode_rendered(processor.tokenizer, rendered,
                                       lambda text: text.replace(placeholder, placeholder * num_image_tokens))
        count = sum(t == image_token_id for t in ids)
        if count != num_image_tokens * len(parts):
            raise HimapError(f"the chat template placed {count // max(num_image_tokens, 1)} image(s) for the "
                             f"conversation's {len(parts)}")
        if parts:
            pixels = processor.image_processor(list(visuals), return_tensors="pt")["pixel_values"].float()
        else:
            size = processor.image_processor.crop_size
            pixels = torch.zeros((0, 3, size["height"], size["width"]))
        input_ids = torch.tensor([ids], dtype=torch.int64)
        mask = torch.ones_like(input_ids)
        return PromptBatch(input_ids=input_ids, attention_mask=mask, pixel_values=pixels,
                           token_type_ids=torch.tensor([conversation_types(ids, image_token_id, located)]),
                           position_ids=position_ids_from_mask(mask), prompts=[rendered.prompt])

    def vision_feeds(self, batch, spec) -> dict[str, torch.Tensor]:
        return {"pixel_values": batch.pixel_values}
