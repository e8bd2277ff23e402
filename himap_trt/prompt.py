"""Images, the LLaVA-1.5 prompt, and the system / image / instruction token spans.

Spans are found from ``input_ids`` (the image token id), never from hard-coded offsets
(METHODS.md, "Words"): system tokens are every prompt token before the first image token,
instruction tokens every token after the last one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from himap_trt.errors import HimapError

#: ``token_type_ids`` values: what each prompt position holds.
TOKEN_PAD, TOKEN_SYSTEM, TOKEN_IMAGE, TOKEN_INSTRUCTION = 0, 1, 2, 3

#: The conversation format of LLaVA-1.5, used when a processor carries no chat template.
FALLBACK_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file (any mode PIL reads; the processor converts to RGB).

    Raises:
        HimapError: missing file, not an image, truncated/corrupt data, or over PIL's size limit.
    """
    path = Path(path)
    if not path.is_file():
        raise HimapError(f"image file {str(path)!r} does not exist")
    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError:
        raise HimapError(f"image file {str(path)!r} is not an image PIL can read (expected JPEG, PNG, ...)") from None
    except Image.DecompressionBombError as exc:
        raise HimapError(f"image file {str(path)!r} is too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise HimapError(f"image file {str(path)!r} is truncated or corrupt: {exc}") from None
    return image


def build_prompt(processor: Any, question: str) -> str:
    """The LLaVA-1.5 conversation prompt for one image and one question.

    Uses the processor's chat template (``USER: <image>\\n{question} ASSISTANT:`` for LLaVA-1.5).

    Raises:
        HimapError: if the question is empty.
    """
    if not question or not question.strip():
        raise HimapError("the question is empty; pass a non-empty question")
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return FALLBACK_TEMPLATE.format(question=question)


def token_type_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int,
                   num_image_tokens: int) -> torch.Tensor:
    """Label every prompt position as padding, system, image or instruction.

    Args:
        input_ids: [batch, sequence] int64, left-padded prompts.
        attention_mask: [batch, sequence] int64, 1 for real tokens, 0 for padding.
        image_token_id: the placeholder id of image tokens.
        num_image_tokens: |V|, image tokens each prompt must hold (one contiguous span).

    Returns:
        [batch, sequence] int64 with values ``TOKEN_PAD/SYSTEM/IMAGE/INSTRUCTION``.

    Raises:
        HimapError: if a prompt does not hold exactly one contiguous span of ``num_image_tokens``.
    """
    is_image = (input_ids == image_token_id) & attention_mask.bool()
    types = torch.full_like(input_ids, TOKEN_PAD)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    for row in range(input_ids.shape[0]):
        where = positions[is_image[row]]
        count = int(where.numel())
        if count != num_image_tokens or (count and int(where[-1] - where[0]) + 1 != count):
            raise HimapError(
                f"prompt {row} holds {count} image tokens (contiguous: {count and int(where[-1] - where[0]) + 1 == count}); "
                f"the model expects one contiguous span of {num_image_tokens}"
            )
        first, last = int(where[0]), int(where[-1])
        real = attention_mask[row].bool()
        types[row, real & (positions < first)] = TOKEN_SYSTEM
        types[row, first:last + 1] = TOKEN_IMAGE
        types[row, real & (positions > last)] = TOKEN_INSTRUCTION
    return types


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions of left-padded prompts: 0.. for real tokens, 1 for padding (as transformers'
    ``generate`` does).

    Args:
        attention_mask: [batch, sequence] int64.

    Returns:
        [batch, sequence] int64.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@dataclass
class PromptBatch:
    """Processed inputs of a batch of (image, question) pairs, left-padded.

    Attributes:
        input_ids: [batch, sequence] int64.
        attention_mask: [batch, sequence] int64 (1 real, 0 padding).
        pixel_values: [batch, 3, height, width] float32, normalised as the processor does.
        token_type_ids: [batch, sequence] int64 (see :func:`token_type_ids`).
        position_ids: [batch, sequence] int64 (see :func:`position_ids_from_mask`).
        prompts: the prompt strings.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    prompts: list[str]

    @property
    def batch_size(self) -> int:
        """Prompts in the batch."""
        return int(self.input_ids.shape[0])

    @property
    def prompt_lengths(self) -> list[int]:
        """Real (non-padding) prompt tokens per row (tokens)."""
        return [int(n) for n in self.attention_mask.sum(-1)]


def prepare_batch(processor: Any, images: list[Image.Image], questions: list[str], image_token_id: int,
                  num_image_tokens: int) -> PromptBatch:
    """Run the processor on (image, question) pairs: prompt, tokenize with left padding, preprocess.

    Raises:
        HimapError: empty question, mismatched list lengths, or an unexpected image-token count.
    """
    if len(images) != len(questions):
        raise HimapError(f"got {len(images)} images and {len(questions)} questions; pass one question per image")
    if not images:
        raise HimapError("no (image, question) pairs given")
    prompts = [build_prompt(processor, q) for q in questions]
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    input_ids = encoded["input_ids"].long()
    attention_mask = encoded["attention_mask"].long()
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=encoded["pixel_values"].float(),
        token_type_ids=token_type_ids(input_ids, attention_mask, image_token_id, num_image_tokens),
        position_ids=position_ids_from_mask(attention_mask),
        prompts=prompts,
    )
