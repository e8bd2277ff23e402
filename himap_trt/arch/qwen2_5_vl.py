"""Qwen2.5-VL (transformers' ``Qwen2_5_VLForConditionalGeneration``): dynamic-resolution vision
tower (window attention, 2-D rotary, 2x2 patch merger), Qwen2 decoder with M-RoPE.

What differs from LLaVA-1.5 (METHODS.md, "Models with a variable number of image tokens"):

- |V| per request: ``(h/28)·(w/28)`` after the processor's resize (bounded by its min/max
  pixels) and the 2x2 merge. ``ModelDims.num_image_tokens`` is the *bound* (the processor's max
  pixels, or the export's ``--max-image-tokens``); keep counts are computed per request.
- Position ids [3, batch, sequence] (temporal, height, width). Text tokens advance all three
  together; an image's tokens get ``start + (0, row, col)`` on its merged grid and the text after it
  continues at ``start + max(rows, cols)`` (:func:`mrope_positions`). A decoded token's three
  positions are ``max(prompt positions) + 1 + step`` (transformers' ``rope_deltas``).
- Batch layout (:meth:`Qwen2_5_VL.prepare_batch`): every row of a batch holds the same number E of
  image *slots* (E = the batch's largest |V|); a row with fewer image tokens gets ``E - |V|_b``
  masked image slots (token type image, attention mask 0, the pad id) before its prompt, after
  the left padding. So scoring graphs see one image-slot count per batch, and masked slots are
  never attended (they change no real token's output, like VisiPruner's slots).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from himap_trt.arch.base import Architecture, decoder_dims
from himap_trt.dims import ModelDims
from himap_trt.errors import HimapError
from himap_trt.graphs.qwen_vision import QwenVisionEncoder, qwen_vision_spec, vision_feeds
from himap_trt.prompt import (
    TOKEN_IMAGE,
    PromptBatch,
    build_prompt,
    check_question,
    check_requests,
    encode_as_text,
    has_special_text,
    token_type_ids,
)
from himap_trt.chat import check_special_text, conversation_types, encode_rendered, render
from himap_trt.video import Video

#: The published checkpoints' processors bound images to 12845056 pixels = 16384 tokens of 28x28 px.
DEFAULT_MAX_IMAGE_TOKENS = 16384

#: Short name -> (hub id, hidden, FFN, layers, heads, kv heads, vocab, tied embeddings).
KNOWN_QWEN: dict[str, tuple[str, int, int, int, int, int, int, bool]] = {
    "qwen2.5-vl-7b": ("Qwen/Qwen2.5-VL-7B-Instruct", 3584, 18944, 28, 28, 4, 152064, False),
    "qwen2.5-vl-3b": ("Qwen/Qwen2.5-VL-3B-Instruct", 2048, 11008, 36, 16, 2, 151936, True),
}


def known_qwen_config(name: str):
    """The ``Qwen2_5_VLConfig`` of a published checkpoint (dimensions of its ``config.json``), offline.

    Raises:
        KeyError: if ``name`` is not a key of :data:`KNOWN_QWEN`.
    """
    from transformers import Qwen2_5_VLConfig

    _, hidden, ffn, layers, heads, kv, vocab, tied = KNOWN_QWEN[name]
    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]},
                         bos_token_id=151643, eos_token_id=151645),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3,
                           out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653, tie_word_embeddings=tied,
    )


def mrope_positions(input_ids: torch.Tensor, image_token_id: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """M-RoPE position ids of one unpadded prompt holding one image (Qwen2-VL paper, Sec. 2.1).

    Args:
        input_ids: [sequence] int64, one contiguous span of ``rows·cols`` image tokens.
        image_token_id: the image placeholder id.
        grid_hw: (rows, cols) of the image's *merged* token grid.

    Returns:
        [3, sequence] int64: text tokens ``(p, p, p)`` with p counting on; the image's token
        (r, c) in row-major order ``(s, s + r, s + c)`` with s the position after the text before
        it; text after the image continues at ``s + max(rows, cols)``.
    """
    rows, cols = grid_hw
    where = (input_ids == image_token_id).nonzero().flatten()
    seq = int(input_ids.shape[0])
    first = int(where[0]) if where.numel() else seq
    count = int(where.numel())
    out = torch.empty((3, seq), dtype=torch.int64)
    out[:, :first] = torch.arange(first)
    if count:
        r = torch.arange(rows).repeat_interleave(cols)
        c = torch.arange(cols).repeat(rows)
        out[0, first:first + count] = first
        out[1, first:first + count] = first + r
        out[2, first:first + count] = first + c
        after = first + max(rows, cols)
        out[:, first + count:] = after + torch.arange(seq - first - count)
    return out


def mrope_group_positions(input_ids: torch.Tensor, image_token_id: int,
                          groups: list[tuple[int, int, int, float]]) -> torch.Tensor:
    """M-RoPE position ids of one unpadded prompt whose visual tokens come in ``groups``, as
    transformers' ``get_rope_index`` (Qwen2.5-VL, Qwen3-VL) computes them.

    Args:
        input_ids: [sequence] int64; the visual tokens (``image_token_id``) form ``len(groups)``
            contiguous runs, in order.
        groups: per run, (t, rows, cols, interval): its merged grid (t temporal patches of rows x
            cols tokens, t-major then row-major) and the temporal step per patch (1 for an image;
            ``tokens_per_second · second_per_grid_t`` for a Qwen2.5-VL video).

    Returns:
        [3, sequence] int64: text tokens ``(p, p, p)`` with p counting on; token (k, r, c) of a run
        starting at s: ``(s + floor(k·interval), s + r, s + c)``; text after the run continues at
        ``s + max(rows, cols)``.

    Raises:
        HimapError: if the runs do not match ``groups``.
    """
    visual = (input_ids == image_token_id).tolist()
    seq = len(visual)
    out = torch.empty((3, seq), dtype=torch.int64)
    pos, i, runs = 0, 0, iter(groups)
    while i < seq:
        if not visual[i]:
            out[:, i] = pos
            pos += 1
            i += 1
            continue
        try:
            t, rows, cols, interval = next(runs)
        except StopIteration:
            raise HimapError("the prompt holds more visual-token runs than its visual inputs give") from None
        count = t * rows * cols
        if visual[i:i + count] != [True] * count or (i + count < seq and visual[i + count]):
            raise HimapError(f"a visual-token run at {i} does not hold the {count} tokens of its grid {t}x{rows}x{cols}")
        k = (torch.arange(t, dtype=torch.float64) * interval).long().repeat_interleave(rows * cols)
        r = torch.arange(rows).repeat_interleave(cols).repeat(t)
        c = torch.arange(cols).repeat(rows * t)
        out[0, i:i + count] = pos + k
        out[1, i:i + count] = pos + r
        out[2, i:i + count] = pos + c
        pos += max(rows, cols)
        i += count
    return out


def video_patches(image_processor, video, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A video's frames as Qwen temporal patches, for the vision graph.

    Each frame is resized and normalised by the checkpoint's own image processor (transformers'
    ``Qwen2VLImageProcessorPil``: sides multiples of patch x merge px, within its min/max pixels and
    within this video's share of ``max_tokens``), which lays each frame's patches out block-major and
    repeats it along the temporal axis; consecutive frame pairs are then put into that axis, which is
    the layout of transformers' Qwen video processors (``[t·h·w, C·T·P·P]``, C outer, then T; t-major).
    transformers' video processors are not used: they need torchvision, which the project does not
    install.

    Args:
        image_processor: the checkpoint's image processor.
        video: :class:`himap_trt.video.Video` (an even number of same-size frames).
        max_tokens: the most visual tokens the whole video may give (the export's bound).

    Returns:
        pixel_values [t·h·w, C·T·P·P] float32 and grid [1, 3] int64 (t, h, w), t = frames / T.

    Raises:
        HimapError: more temporal patches than ``max_tokens`` (no frame size fits).
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    temporal = int(image_processor.temporal_patch_size)
    frames = list(video.frames)
    if len(frames) % temporal:
        frames += [frames[-1]] * (temporal - len(frames) % temporal)
    t = len(frames) // temporal
    patch, merge = int(image_processor.patch_size), int(image_processor.merge_size)
    side = patch * merge
    per_frame = max_tokens // t
    if per_frame < 1:
        raise HimapError(f"{video.source}: {len(frames)} frames make {t} temporal patches, more visual tokens than "
                         f"the {max_tokens} the export allows (--max-image-tokens); use fewer frames "
                         "(--max-frames / --video-fps) or re-export with a larger --max-image-tokens")
    size = image_processor.size
    low = min(int(size["shortest_edge"]), per_frame * side * side)
    high = min(int(size["longest_edge"]), per_frame * side * side)
    width, height = video.size
    h, w = smart_resize(height, width, factor=side, min_pixels=low, max_pixels=high)
    if (h // side) * (w // side) > per_frame:        # smart_resize keeps at least one token per side
        raise HimapError(f"{video.source}: frames of {width}x{height} px cannot fit {per_frame} visual tokens per "
                         "temporal patch; use fewer frames or re-export with a larger --max-image-tokens")
    out = image_processor(frames, size={"shortest_edge": h * w, "longest_edge": h * w}, return_tensors="pt")
    grid = out["image_grid_thw"]
    if not bool((grid[:, 1:] == grid[0, 1:]).all()):
        raise HimapError(f"{video.source}: frames resized to different grids {grid.tolist()}")
    gh, gw = int(grid[0, 1]), int(grid[0, 2])
    channels = out["pixel_values"].shape[1] // (temporal * patch * patch)
    per = out["pixel_values"].reshape(len(frames), gh * gw, channels, temporal, patch, patch)[:, :, :, 0]
    pairs = per.reshape(t, temporal, gh * gw, channels, patch, patch).permute(0, 2, 3, 1, 4, 5)
    return pairs.reshape(t * gh * gw, channels * temporal * patch * patch), torch.tensor([[t, gh, gw]])


class Qwen2_5_VL(Architecture):
    name = "qwen2_5_vl"
    model_type = "qwen2_5_vl"
    supported = "Qwen2.5-VL checkpoints in transformers' format: Qwen2_5_VLForConditionalGeneration (model_type 'qwen2_5_vl')"
    variable_image_tokens = True
    position_axes = 3

    def check_supported(self, config: Any, source: str) -> None:
        text = getattr(config, "text_config", None)
        section = (getattr(text, "rope_parameters", None) or {}).get("mrope_section")
        head_dim = decoder_dims(text)["head_dim"]
        if not section or sum(section) != head_dim // 2 or len(section) != 3:
            raise HimapError(f"unsupported model {source!r}: rope_parameters.mrope_section={section!r} must be three "
                             f"numbers summing to head_dim/2 = {head_dim // 2}")
        tps = getattr(getattr(config, "vision_config", None), "tokens_per_second", self.tokens_per_second)
        if tps != self.tokens_per_second:
            raise HimapError(f"unsupported model {source!r}: vision_config.tokens_per_second={tps!r} (video positions "
                             f"are implemented for {self.tokens_per_second})")
        if getattr(text, "use_sliding_window", False):
            raise HimapError(f"unsupported model {source!r}: use_sliding_window=true (sliding-window decoder "
                             "attention is not implemented in the graphs)")

    def dims(self, config: Any):
        return self.vision_dims(config, vision_window_size=config.vision_config.window_size)

    def vision_dims(self, config: Any, **family: Any) -> ModelDims:
        """The dims every Qwen-VL family shares (decoder, merged patches, dynamic resolution), plus the
        ``family``'s own :class:`ModelDims` fields."""
        text, vision = config.text_config, config.vision_config
        merge = vision.spatial_merge_size
        return ModelDims(
            **decoder_dims(text),
            num_image_tokens=DEFAULT_MAX_IMAGE_TOKENS,
            image_size=0,                                   # dynamic resolution
            patch_size=vision.patch_size,
            vision_hidden_size=vision.hidden_size,
            vision_intermediate_size=vision.intermediate_size,
            vision_layers_used=vision.depth,
            vision_tokens=DEFAULT_MAX_IMAGE_TOKENS * merge * merge,
            image_token_id=config.image_token_id,
            architecture=self.name,
            spatial_merge_size=merge,
            temporal_patch_size=vision.temporal_patch_size,
            **family,
        )

    def max_image_tokens(self, processor: Any) -> int | None:
        """The processor's bound on |V|: ``max_pixels / (patch·merge)²`` (tokens)."""
        image = getattr(processor, "image_processor", None)
        size = getattr(image, "size", None) or {}
        max_pixels = size.get("longest_edge") or getattr(image, "max_pixels", None)
        if not max_pixels:
            return None
        side = image.patch_size * image.merge_size
        return int(max_pixels // (side * side))

    def max_image_tokens_in(self, path: str) -> int | None:
        import json
        import os

        try:
            with open(os.path.join(path, "preprocessor_config.json"), encoding="utf-8") as handle:
                data = json.load(handle)
            pixels = (data.get("size") or {}).get("longest_edge") or data.get("max_pixels")
            side = int(data.get("patch_size", 14)) * int(data.get("merge_size", 2))
            return int(pixels) // (side * side) if pixels else None
        except (OSError, ValueError, TypeError, AttributeError):
            return None    # unreadable here: the processor's load reports it

    def with_max_image_tokens(self, dims, tokens: int):
        from dataclasses import replace

        return replace(dims, num_image_tokens=tokens, vision_tokens=tokens * dims.spatial_merge_size ** 2)

    def load_processor(self, path: str, **kwargs):
        return load_qwen_processor(path, **kwargs)

    def model_class(self) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def known_models(self):
        return {name: (hub, lambda name=name: known_qwen_config(name)) for name, (hub, *_) in KNOWN_QWEN.items()}

    def vision_spec(self, dims, dtype: str):
        """:func:`himap_trt.graphs.qwen_vision.qwen_vision_spec`; its attrs also carry what the host
        side (:func:`~himap_trt.graphs.qwen_vision.qwen_vision_inputs`) needs at run time."""
        from dataclasses import replace

        config = self._vision_config(dims)
        spec = qwen_vision_spec(config, dtype)
        return replace(spec, attrs={**spec.attrs, **config})

    @staticmethod
    def _vision_config(dims) -> dict[str, int]:
        return {"in_channels": 3, "temporal_patch_size": dims.temporal_patch_size, "patch_size": dims.patch_size,
                "out_hidden_size": dims.hidden_size, "spatial_merge_size": dims.spatial_merge_size,
                "window_size": dims.vision_window_size}

    def vision_module(self, model):
        return QwenVisionEncoder(model.model.visual)

    #: transformers' ``vision_config.tokens_per_second`` this family's video positions assume
    #: (every published Qwen2.5-VL checkpoint: 2; ``check_supported`` refuses others).
    tokens_per_second = 2

    def _encode_image(self, processor, image, question, image_token_id, num_image_tokens):
        """One image request -> (ids [S], pixel patches, grid [1,3], |V|, M-RoPE groups, prompt)."""
        merge = processor.image_processor.merge_size
        vision = processor.image_processor([image], return_tensors="pt")
        grid = vision["image_grid_thw"].long()                                  # [1, 3]
        count = int(grid.prod()) // (merge * merge)
        if count > num_image_tokens:
            raise HimapError(f"the image gives {count} image tokens, more than the {num_image_tokens} the "
                             "export allows (--max-image-tokens); downscale it or re-export")
        if has_special_text(processor.tokenizer, question):
            ids, _, [prompt] = encode_as_text(processor, [question], image_token_id, count)
            ids = ids[0]
        else:
            prompt = build_prompt(processor, question)
            ids = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"][0].long()
        _, h, w = (int(v) for v in grid[0])
        return ids, vision["pixel_values"], grid, count, [(1, h // merge, w // merge, 1.0)], prompt

    def _video_placeholder(self, processor, video, grid) -> str:
        """The text that replaces the template's ``<|vision_start|><|video_pad|><|vision_end|>``: one pad
        per visual token (transformers' ``Qwen2_5_VLProcessor``)."""
        merge = processor.image_processor.merge_size
        return "<|vision_start|>" + "<|video_pad|>" * (int(grid.prod()) // (merge * merge)) + "<|vision_end|>"

    def _video_groups(self, video, grid, merge) -> list[tuple[int, int, int, float]]:
        """M-RoPE groups of a video (transformers' ``get_rope_index``): one (t, rows, cols) span whose
        temporal ids advance by ``tokens_per_second · second_per_grid_t`` per temporal patch."""
        t, h, w = (int(v) for v in grid[0])
        return [(t, h // merge, w // merge, self.tokens_per_second * 2 / video.fps)]

    def _encode_video(self, processor, video, question, image_token_id, num_image_tokens):
        """One video request (:class:`himap_trt.video.Video`): frames -> temporal patches, the
        template's video placeholder expanded, the video pads relabelled as image tokens."""
        check_question(question)
        if has_special_text(processor.tokenizer, question):
            raise HimapError("a question about a video must not contain special-token text (such as "
                             "'<|im_end|>'); rephrase it")
        merge = processor.image_processor.merge_size
        pixels, grid = video_patches(processor.image_processor, video, num_image_tokens)
        count = int(grid.prod()) // (merge * merge)
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        wrapper = "<|vision_start|><|video_pad|><|vision_end|>"
        if prompt.count(wrapper) != 1:
            raise HimapError("the model's chat template does not place a video ('<|vision_start|><|video_pad|>"
                             "<|vision_end|>'); this checkpoint cannot take video prompts")
        prompt = prompt.replace(wrapper, self._video_placeholder(processor, video, grid))
        ids = processor.tokenizer(prompt, return_tensors="pt")["input_ids"][0].long()
        video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        if int((ids == video_id).sum()) != count:
            raise HimapError(f"the video prompt holds {int((ids == video_id).sum())} video tokens, expected {count}")
        ids = torch.where(ids == video_id, image_token_id, ids)        # handled as image tokens from here on
        return ids, pixels, grid, count, self._video_groups(video, grid, merge), prompt

    def prepare_batch(self, processor, images, questions, image_token_id, num_image_tokens):
        """Requests are images or :class:`himap_trt.video.Video` s (one visual input per prompt,
        mixed freely across rows); a video's tokens are image tokens to everything after this."""
        check_requests(images, questions)
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        rows, pixels, grids, prompts, counts, groups, media = [], [], [], [], [], [], []
        for item, question in zip(images, questions):
            encode = self._encode_video if isinstance(item, Video) else self._encode_image
            ids, patches, grid, count, group, prompt = encode(processor, item, question, image_token_id,
                                                              num_image_tokens)
            rows.append(ids)
            pixels.append(patches)
            grids.append(grid)
            prompts.append(prompt)
            counts.append(count)
            groups.append(group)
            media.append("video" if isinstance(item, Video) else "image")
        slots = max(counts)                                              # E: image slots per row
        width = max(len(ids) - n for ids, n in zip(rows, counts)) + slots
        size = len(rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.full((size, width), pad, dtype=torch.int64)
        mask = torch.zeros((size, width), dtype=torch.int64)
        types = torch.zeros((size, width), dtype=torch.int64)
        positions = torch.zeros((3, size, width), dtype=torch.int64)
        for b, (ids, n, group) in enumerate(zip(rows, counts, groups)):
            length = len(ids)
            start = width - length
            input_ids[b, start:] = ids
            mask[b, start:] = 1
            types[b, start:] = token_type_ids(ids[None], torch.ones_like(ids)[None], image_token_id, n,
                                              contiguous=len(group) == 1)[0]
            types[b, start - (slots - n):start] = TOKEN_IMAGE              # masked image slots
            positions[:, b, start:] = mrope_group_positions(ids, image_token_id, group)
        return PromptBatch(
            input_ids=input_ids, attention_mask=mask, pixel_values=torch.cat(pixels).float(),
            token_type_ids=types, position_ids=positions, prompts=prompts,
            image_grid_thw=torch.cat(grids), image_tokens=counts, media=media,
        )

    #: What the chat template renders for an image / a video (transformers' Qwen templates).
    IMAGE_WRAPPER = "<|vision_start|><|image_pad|><|vision_end|>"
    VIDEO_WRAPPER = "<|vision_start|><|video_pad|><|vision_end|>"

    def prepare_conversation(self, processor, conversation, visuals, image_token_id, num_image_tokens):
        """Any number of images and videos in any user message; their visual tokens are pooled (one
        keep count from the total, ranked together by every stage) and bounded in total by the
        export's ``--max-image-tokens``."""
        parts = conversation.visual_parts
        check_special_text(conversation, processor.tokenizer)
        merge = processor.image_processor.merge_size
        encoded = []                                       # per visual input: (pixels, grid, placeholder, groups)
        total = 0
        for part, item in zip(parts, visuals):
            if isinstance(item, Video):
                pixels, grid = video_patches(processor.image_processor, item, max(num_image_tokens - total, 0))
                placeholder, groups = self._video_placeholder(processor, item, grid), self._video_groups(item, grid, merge)
            else:
                vision = processor.image_processor([item], return_tensors="pt")
                pixels, grid = vision["pixel_values"], vision["image_grid_thw"].long()
                _, h, w = (int(v) for v in grid[0])
                count = h * w // (merge * merge)
                placeholder, groups = "<|vision_start|>" + "<|image_pad|>" * count + "<|vision_end|>", \
                    [(1, h // merge, w // merge, 1.0)]
            total += int(grid.prod()) // (merge * merge)
            if total > num_image_tokens:
                raise HimapError(f"{part.where}: the conversation's visual inputs give {total} visual tokens so far, "
                                 f"more than the {num_image_tokens} this export's graphs hold (--max-image-tokens); "
                                 "send fewer or smaller images, or re-export")
            encoded.append((pixels, grid, placeholder, groups))
        pending = list(zip(parts, encoded))

        def expand(text: str) -> str:
            out = []
            while True:
                at = [i for i in (text.find(self.IMAGE_WRAPPER), text.find(self.VIDEO_WRAPPER)) if i >= 0]
                if not at:
                    return "".join(out) + text
                start = min(at)
                kind = "image" if text.startswith(self.IMAGE_WRAPPER, start) else "video"
                if not pending or pending[0][0].kind != kind:
                    raise HimapError(f"messages: the chat template placed an {kind} where the conversation has none")
                out.append(text[:start] + pending.pop(0)[1][2])
                text = text[start + len(self.IMAGE_WRAPPER if kind == "image" else self.VIDEO_WRAPPER):]

        rendered = render(processor, conversation)
        ids, located = encode_rendered(processor.tokenizer, rendered, expand)
        if pending:
            raise HimapError(f"{pending[0][0].where}: the model's chat template does not place this {pending[0][0].kind}")
        video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        ids = [image_token_id if t == video_id else t for t in ids]     # video tokens are image tokens from here on
        input_ids = torch.tensor([ids], dtype=torch.int64)
        groups = [g for e in encoded for g in e[3]]
        if encoded:
            pixels, grids = torch.cat([e[0] for e in encoded]).float(), torch.cat([e[1] for e in encoded])
        else:
            width = (processor.image_processor.temporal_patch_size * processor.image_processor.patch_size ** 2 * 3)
            pixels, grids = torch.zeros((0, width)), torch.zeros((0, 3), dtype=torch.int64)
        return PromptBatch(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
            token_type_ids=torch.tensor([conversation_types(ids, image_token_id, located)]),
            position_ids=mrope_group_positions(input_ids[0], image_token_id, groups)[:, None],
            prompts=[rendered.prompt], image_grid_thw=grids, image_tokens=[total],
            media=["video" if any(isinstance(v, Video) for v in visuals) else "image"],
        )

    def vision_feeds(self, batch, spec) -> dict[str, torch.Tensor]:
        return vision_feeds(batch.pixel_values, batch.image_grid_thw, spec.attrs)

    def next_positions(self, batch) -> torch.Tensor:
        real = batch.attention_mask.bool()[None].expand_as(batch.position_ids)
        return torch.where(real, batch.position_ids, 0).amax(dim=(0, 2)) + 1

    def decode_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[None, :, None].expand(3, -1, 1)

    def image_token_counts(self, batch, num_image_tokens) -> list[int]:
        return list(batch.image_tokens)


def _image_only_processor_class():
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class QwenImageProcessor(Qwen2_5_VLProcessor):
        """transformers' ``Qwen2_5_VLProcessor`` for images only: the same prompt expansion (one
        ``<|image_pad|>`` per merged 28x28 patch), without the video processor, which needs
        torchvision (not a dependency of this project)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.video_processor = None
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return QwenImageProcessor


def load_qwen_processor(path: str, **kwargs):
    """Tokenizer, image processor and chat template of a Qwen2.5-VL directory (or hub id), as one
    image-only processor (see :func:`_image_only_processor_class`).

    ``kwargs`` go to every ``from_pretrained`` (``trust_remote_code=False``, ``local_files_only``).
    The image processor is transformers' PIL ``Qwen2VLImageProcessorPil`` with the directory's
    settings (min/max pixels, patch, merge, normalisation).
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    kwargs.pop("trust_remote_code", None)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kwargs)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
    return _image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                         chat_template=getattr(tokenizer, "chat_template", None))
