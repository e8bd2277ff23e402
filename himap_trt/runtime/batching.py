"""Preparing requests (any thread) and putting admitted ones into one prefill batch (the scheduler).

:class:`RequestPreparer` is the part of :class:`~himap_trt.runtime.engine.Engine` that callers run
in their own threads: bounds checked before tokenizing, the chat template, tokenization and image
preprocessing with a per-thread processor copy. :func:`merge_prompts` left-pads one-row prompts of
different lengths (and different visual-token counts) into one batch for a mixed-length prefill:
padding is masked (``attention_mask`` 0, token type ``TOKEN_PAD``) and the pipeline copies only each
row's real tokens into its slot, so no padding enters a slot.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from himap_trt.errors import HimapError
from himap_trt.prompt import TOKEN_IMAGE, TOKEN_PAD, PromptBatch


def merge_prompts(prompts: list[PromptBatch], pad_token_id: int) -> PromptBatch:
    """One left-padded batch of one-row prompts (as ``prepare_batch`` pads a batch).

    Rows with fewer visual tokens than the batch's most get masked image slots (token type image,
    mask 0) just before their first token, as :meth:`Qwen2_5_VL.prepare_batch` lays them out, so
    every row holds the same number of image-typed positions (the scoring graphs' contract).
    Padding positions are 1 ([batch, sequence] positions, transformers' convention) or 0 (M-RoPE).

    Args:
        prompts: one-row :class:`PromptBatch` es, all with visual tokens or all without.

    Returns:
        [len(prompts), width] tensors; ``pixel_values`` / ``image_grid_thw`` / ``evs_rates`` (one per
        visual input) concatenated in row order.
    """
    if len(prompts) == 1:
        return prompts[0]
    counts = [int((p.token_type_ids[0] == TOKEN_IMAGE).sum()) for p in prompts]
    lengths = [int(p.input_ids.shape[1]) for p in prompts]
    slots = max(counts)
    width = max(n - c for n, c in zip(lengths, counts)) + slots
    size = len(prompts)
    input_ids = torch.full((size, width), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((size, width), dtype=torch.int64)
    types = torch.full((size, width), TOKEN_PAD, dtype=torch.int64)
    axes = prompts[0].position_ids.dim()
    positions = (torch.ones((size, width), dtype=torch.int64) if axes == 2
                 else torch.zeros((3, size, width), dtype=torch.int64))
    for row, (prompt, length, count) in enumerate(zip(prompts, lengths, counts)):
        start = width - length
        input_ids[row, start:] = prompt.input_ids[0]
        mask[row, start:] = prompt.attention_mask[0]
        types[row, start:] = prompt.token_type_ids[0]
        types[row, start - (slots - count):start] = TOKEN_IMAGE          # masked image slots
        if axes == 2:
            positions[row, start:] = prompt.position_ids[0]
        else:
            positions[:, row, start:] = prompt.position_ids[:, 0]
    return PromptBatch(
        input_ids=input_ids, attention_mask=mask, pixel_values=torch.cat([p.pixel_values for p in prompts]),
        token_type_ids=types, position_ids=positions, prompts=[q for p in prompts for q in p.prompts],
        image_grid_thw=None if prompts[0].image_grid_thw is None else torch.cat([p.image_grid_thw for p in prompts]),
        image_tokens=None if prompts[0].image_tokens is None else [n for p in prompts for n in p.image_tokens],
        media=None if any(p.media is None for p in prompts) else [m for p in prompts for m in p.media],
        evs_rates=None if all(p.evs_rates is None for p in prompts) else   # requests' own EVS rates, per visual
        [r for p in prompts for r in (p.evs_rates or [None] * p.visual_inputs)],
    )


class RequestPreparer:
    """Request preparation, run in the caller's thread (needs ``pipeline``, ``max_seq_len``,
    ``max_question_bytes`` and a ``threading.local`` ``_local`` on the object)."""

    pipeline: Any
    max_seq_len: int | None
    max_question_bytes: int | None

    def _processor(self) -> Any:
        # The processor's fast tokenizer is not safe to use from several threads at once (prepare sets
        # its padding): each thread that prepares prompts has its own copy, so no lock is shared.
        processor = getattr(self._local, "processor", None)
        if processor is None:
            processor = self._local.processor = copy.deepcopy(self.pipeline.processor)
        return processor

    def check_question(self, question: str) -> None:
        """Refuse a question that cannot fit ``max_seq_len`` by its UTF-8 length alone (no tokenizing).

        Raises:
            HimapError: more than ``max_question_bytes`` bytes.
        """
        if self.max_question_bytes is not None and len(question) * 4 > self.max_question_bytes:
            size = len(question.encode("utf-8", "surrogatepass"))
            if size > self.max_question_bytes:
                raise HimapError(f"the question has {size} bytes; no question over {self.max_question_bytes} bytes "
                                 f"fits the server's --max-seq-len of {self.max_seq_len} tokens")

    def prepare(self, image: Any, question: str) -> PromptBatch:
        """The model inputs of one (PIL image, question) pair (thread-safe, no shared lock: each calling
        thread tokenizes with its own copy of the processor).

        Raises:
            HimapError: empty question, a question over ``max_question_bytes`` (refused before
                tokenizing), or a prompt that does not fit ``max_seq_len``.
        """
        self.check_question(question)
        prompt = self.pipeline.prepare([image], [question], processor=self._processor())
        length = int(prompt.input_ids.shape[1])
        if self.max_seq_len is not None and length >= self.max_seq_len:
            raise HimapError(f"the prompt has {length} tokens but the server's --max-seq-len is {self.max_seq_len} "
                             "(prompt plus at least one generated token must fit)")
        return prompt

    def prepare_conversation(self, conversation: Any, visuals: list[Any]) -> PromptBatch:
        """The model inputs of one conversation (:class:`himap_trt.chat.Conversation`; ``visuals``: its
        loaded images / videos in prompt order); thread-safe like :meth:`prepare`.

        Raises:
            HimapError: a message's text over ``max_question_bytes`` (refused before tokenizing), a
                conversation the export cannot take, or one that does not fit ``max_seq_len`` (naming
                its token count).
        """
        for i, message in enumerate(conversation.messages):
            for part in message.parts:
                if part.kind == "text":
                    try:
                        self.check_question(part.text)
                    except HimapError as exc:
                        raise HimapError(f"messages[{i}].content: {exc}") from None
        prompt = self.pipeline.prepare_conversation(conversation, visuals, processor=self._processor())
        length = int(prompt.attention_mask.sum())
        limit = self.capacity(prompt)
        if limit is not None and length >= limit:
            raise HimapError(f"messages: the conversation has {length} prompt tokens but the server's --max-seq-len "
                             f"of {self.max_seq_len} leaves room for {limit - 1}"
                             f"{' without an image' if limit != self.max_seq_len else ''} (prompt plus at least one "
                             "generated token must fit); shorten the conversation")
        return prompt

    def capacity(self, prompt: PromptBatch) -> int | None:
        """Most tokens (prompt + generated) ``prompt`` may hold in this engine's slots (tokens), or None."""
        if self.max_seq_len is None:
            return None
        whole = self.pipeline.capacity(prompt)
        if whole is None or self.pipeline.max_seq_len is None:
            return self.max_seq_len
        return self.max_seq_len - (self.pipeline.max_seq_len - whole)
