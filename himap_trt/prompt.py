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


def _describe_os_error(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or type(exc).__name__


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file (see :func:`decode_image`).

    Raises:
        HimapError: missing file, not a regular file (a directory, FIFO or device), permission denied,
            not an image, truncated/corrupt data, or over PIL's decompression-bomb limit; one line
            naming the file.
    """
    import stat

    path = Path(path)
    name = f"image file {str(path)!r}"
    try:
        info = path.stat()
    except FileNotFoundError:
        raise HimapError(f"{name} does not exist") from None
    except OSError as exc:
        raise HimapError(f"{name} cannot be read: {_describe_os_error(exc)}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else \
            "a device or socket"
        raise HimapError(f"{name} is not a regular file (it is {kind})")
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise HimapError(f"{name} cannot be read: {_describe_os_error(exc)}") from None
    with handle:
        return decode_image(handle, name)


def decode_image(source: Any, name: str = "the image") -> Image.Image:
    """Decode an image from an open binary file or ``bytes`` (an upload), in a mode the processor reads
    faithfully.

    The image is decoded fully here, so truncated data fails now, with ``name`` in the message.
    PIL's decompression-bomb guard (more than ``Image.MAX_IMAGE_PIXELS`` pixels, a warning in PIL)
    is an error. Modes are kept except those the processor's RGB conversion would clip
    (:func:`to_8bit`): 16-bit greyscale is scaled by its value range, not clipped to white.

    Args:
        source: a binary file object or ``bytes``.
        name: how messages refer to the image (e.g. ``image file 'cat.png'``).

    Raises:
        HimapError: not an image PIL reads, truncated/corrupt, too many pixels, or a read error.
    """
    import io
    import warnings

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            image.load()
    except UnidentifiedImageError:
        raise HimapError(f"{name} is not an image PIL can read (expected JPEG, PNG, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise HimapError(f"{name} has more than {Image.MAX_IMAGE_PIXELS} pixels (PIL's decompression-bomb "
                         "limit); downscale it") from None
    except OSError as exc:
        if isinstance(exc, PermissionError) or getattr(exc, "errno", None) is not None:
            raise HimapError(f"{name} cannot be read: {_describe_os_error(exc)}") from None
        raise HimapError(f"{name} is truncated or corrupt: {exc}") from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise HimapError(f"{name} is truncated or corrupt: {exc}") from None
    return to_8bit(image)


def to_8bit(image: Image.Image) -> Image.Image:
    """Map integer and float greyscale modes (``I;16*``, ``I``, ``F``) to 8-bit ``L``; other modes as is.

    PIL's ``convert("RGB")`` (what the processor does) clips these modes at 255, which turns a
    16-bit image almost white. Here ``I;16*`` is scaled by its type's range (``v / 257``); ``I`` and
    ``F`` by the range their values occupy: kept if within 0..255, ``v / 257`` within 0..65535,
    ``v * 255`` for floats within 0..1, else min-max scaled.
    """
    import numpy as np

    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image).astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0
    elif low >= 0 and high <= 1 and image.mode == "F":
        scaled = values * 255.0
    elif low >= 0 and high <= 255:
        scaled = values
    elif low >= 0 and high <= 65535:
        scaled = values / 257.0
    else:
        scaled = (values - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def check_question(text: Any, where: str = "the question") -> str:
    """Validate user text used as a question: a non-empty string of valid Unicode.

    Special-token text in it (``<image>``, ``</s>``, ...) is allowed: :func:`prepare_batch` tokenizes
    it as plain text.

    Args:
        text: the question.
        where: how messages refer to it (e.g. ``requests.jsonl:3: "question"``).

    Returns:
        ``text`` unchanged.

    Raises:
        HimapError: not a string, empty or blank, or holding bytes that are not UTF-8 text (command-line
            arguments with invalid bytes arrive as lone surrogates).
    """
    if not isinstance(text, str):
        raise HimapError(f"{where} must be a string, got {json_type_name(text)}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HimapError(f"{where} holds bytes that are not UTF-8 text (at character {exc.start}); "
                         "pass the question as UTF-8") from None
    if not text.strip():
        raise HimapError(f"{where} is empty; pass a non-empty question")
    return text


def check_requests(images: list[Any], questions: list[Any]) -> None:
    """Check one prompt batch's (image, question) pairs before tokenizing (every family's
    ``prepare_batch``).

    Raises:
        HimapError: the lists differ in length, are empty, or a question is invalid
            (:func:`check_question`).
    """
    if len(images) != len(questions):
        raise HimapError(f"got {len(images)} images and {len(questions)} questions; pass one question per image")
    if not images:
        raise HimapError("no (image, question) pairs given")
    for question in questions:
        check_question(question)


def json_type_name(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array",
             dict: "an object", str: "a string"}
    return names.get(type(value), type(value).__name__)


def build_prompt(processor: Any, question: str) -> str:
    """The LLaVA-1.5 conversation prompt for one image and one question.

    Uses the processor's chat template (``USER: <image>\\n{question} ASSISTANT:`` for LLaVA-1.5).

    Raises:
        HimapError: if the question is empty or not valid text (see :func:`check_question`).
    """
    check_question(question)
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        try:
            prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - the template is input (jinja errors, sandbox violations)
            raise HimapError(f"the processor's chat template failed: {_first_line(exc)}") from None
        if not isinstance(prompt, str):
            raise HimapError(f"the processor's chat template rendered {type(prompt).__name__}, not text")
        return prompt
    return FALLBACK_TEMPLATE.format(question=question)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


#: Files of a saved processor that may hold its chat template, in the order transformers reads them.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json", "tokenizer_config.json")


def check_chat_template(processor: Any, directory: str | Path) -> None:
    """Render the processor's chat template once with a probe question, at load time.

    A template is code run in transformers' jinja sandbox: one that raises (a syntax error, a
    sandbox violation such as reaching for ``__class__``, ``raise_exception``) or drops the question
    would fail every request, so the load fails instead (``run``: one error line; ``serve``: the
    server never reports ready).

    Args:
        processor: the loaded processor.
        directory: the directory it was loaded from (named in the message, with the template file).

    Raises:
        HimapError: naming the template file, if rendering fails or the prompt lacks the question.
    """
    directory = Path(directory)
    source = next((directory / name for name in TEMPLATE_FILES
                   if (directory / name).is_file() and (name.startswith("chat_template")
                                                        or '"chat_template"' in (directory / name).read_text(errors="replace"))),
                  directory)
    probe = "himap probe question"
    try:
        prompt = build_prompt(processor, probe)
    except HimapError as exc:
        raise HimapError(f"the chat template in {str(source)!r} cannot be used: {exc}") from None
    if probe not in prompt:
        raise HimapError(f"the chat template in {str(source)!r} drops the question from the prompt "
                         f"(rendered {prompt[:80]!r})")


def token_type_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int,
                   num_image_tokens: int, contiguous: bool = True) -> torch.Tensor:
    """Label every prompt position as padding, system, image or instruction.

    Args:
        input_ids: [batch, sequence] int64, left-padded prompts.
        attention_mask: [batch, sequence] int64, 1 for real tokens, 0 for padding.
        image_token_id: the placeholder id of image tokens.
        num_image_tokens: |V|, image tokens each prompt must hold (one contiguous span).
        contiguous: False: the image tokens may come in several groups (Qwen3-VL's video frames with
            timestamps between them); tokens between the groups are labelled system tokens.

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
        if count != num_image_tokens or (contiguous and count and int(where[-1] - where[0]) + 1 != count):
            raise HimapError(
                f"prompt {row} holds {count} image tokens (contiguous: {count and int(where[-1] - where[0]) + 1 == count}); "
                f"the model expects one contiguous span of {num_image_tokens}"
            )
        first, last = int(where[0]), int(where[-1])
        real = attention_mask[row].bool()
        types[row, real & (positions < first)] = TOKEN_SYSTEM
        types[row, first:last + 1] = TOKEN_SYSTEM       # text between visual groups (timestamps) counts as system
        types[row, where] = TOKEN_IMAGE
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
        position_ids: [batch, sequence] int64 (see :func:`position_ids_from_mask`); [3, batch,
            sequence] for M-RoPE models (:mod:`himap_trt.arch.qwen2_5_vl`).
        prompts: the prompt strings.
        image_grid_thw: [images, 3] int64 (temporal, height, width) patch grid of each image, for
            dynamic-resolution models (then ``pixel_values`` is [patches, C·T·P·P]); else None.
        image_tokens: |V| of each row (tokens) where it varies per request; else None.
        media: per row, ``image`` or ``video`` (Qwen families: a video's visual tokens are handled as
            image tokens, docs/QWEN3VL.md "Video"); None: images only.
        evs_rates: per visual input (``image_grid_thw`` row; one per row where each row holds one, as
            every ``prepare`` batch and LLaVA), the EVS rate q in [0, 1) of a request that overrides the
            export's, or None for the export's (:mod:`himap_trt.runtime.evs`); None: the export's rate
            for every visual input. A conversation's videos each carry their own (``video_url.evs_rate``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    prompts: list[str]
    image_grid_thw: torch.Tensor | None = None
    image_tokens: list[int] | None = None
    media: list[str] | None = None
    evs_rates: list[float | None] | None = None

    @property
    def batch_size(self) -> int:
        """Prompts in the batch."""
        return int(self.input_ids.shape[0])

    @property
    def visual_inputs(self) -> int:
        """Images and videos in the batch: ``image_grid_thw``'s rows (Qwen families; 0 for text-only
        prompts), else one per row (LLaVA)."""
        return self.batch_size if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])

    @property
    def prompt_lengths(self) -> list[int]:
        """Real (non-padding) prompt tokens per row (tokens)."""
        return [int(n) for n in self.attention_mask.sum(-1)]


def special_token_texts(tokenizer: Any) -> list[str]:
    """The texts of the tokenizer's special tokens (``<s>``, ``</s>``, ``<image>``, ...), longest first."""
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        texts |= {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    return sorted((t for t in texts if t), key=len, reverse=True)


def has_special_text(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` contains the text of a special token (which a tokenizer would turn into it)."""
    return any(special in text for special in special_token_texts(tokenizer))


def encode_as_text(processor: Any, questions: list[str], image_token_id: int, num_image_tokens: int,
                   ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Tokenize prompts so that the question is plain text, whatever it contains.

    The image span comes only from the template's image placeholder: it is replaced by a random
    one-off marker registered (non-special, with the placeholder's strip flags) in a private copy of
    the tokenizer that encodes special-token text as text; the marker's id is then expanded to
    ``num_image_tokens`` image tokens. Because added tokens split the input the same way, prompts
    without special-token text get exactly the ids of the processor's own path (tested).

    Returns:
        ``(input_ids, attention_mask, prompts)``: [batch, sequence] int64 each, left-padded.

    Raises:
        HimapError: if the tokenizer is not a ``tokenizers`` one, or the chat template changes the
            question text (so it cannot be located).
    """
    import secrets

    from tokenizers import AddedToken, Tokenizer

    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise HimapError("this model's tokenizer cannot encode special-token text in a question as plain text; "
                         "remove text such as '<image>' or '</s>' from the question")
    image_text = getattr(processor, "image_token", None) or "<image>"
    template = next((t for t in backend.get_added_tokens_decoder().values() if t.content == image_text), None)
    private = Tokenizer.from_str(backend.to_str())
    marker = f"<himap-image-{secrets.token_hex(8)}>"
    private.add_tokens([AddedToken(marker, special=False, normalized=False,
                                   lstrip=bool(template and template.lstrip), rstrip=bool(template and template.rstrip),
                                   single_word=bool(template and template.single_word))])
    marker_id = private.token_to_id(marker)
    private.encode_special_tokens = True
    private.no_padding()
    private.no_truncation()
    slot = f"himapquestion{secrets.token_hex(8)}"
    rows, prompts = [], []
    for question in questions:
        prompt = build_prompt(processor, question)
        skeleton = build_prompt(processor, slot)
        if skeleton.count(slot) != 1 or skeleton.count(image_text) != 1 or skeleton.replace(slot, question) != prompt:
            raise HimapError("the chat template changes the question or holds no single image placeholder; "
                             "remove special-token text such as '<image>' from the question")
        before, after = skeleton.split(slot)
        ids = private.encode(before.replace(image_text, marker) + question + after.replace(image_text, marker)).ids
        if ids.count(marker_id) != 1:
            raise HimapError("the prompt's image placeholder could not be located after tokenization")
        at = ids.index(marker_id)
        rows.append(ids[:at] + [image_token_id] * num_image_tokens + ids[at + 1:])
        prompts.append(prompt)
    pad = tokenizer.pad_token_id
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], dtype=torch.int64)
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=torch.int64)
    return input_ids, attention_mask, prompts


def prepare_batch(processor: Any, images: list[Image.Image], questions: list[str], image_token_id: int,
                  num_image_tokens: int) -> PromptBatch:
    """Run the processor on (image, question) pairs: prompt, tokenize with left padding, preprocess.

    Questions are user text: one holding special-token text (``<image>``, ``</s>``, ...) is tokenized
    as plain text (:func:`encode_as_text`); the image span comes only from the image we insert.

    Raises:
        HimapError: empty or invalid question, mismatched list lengths, or an unexpected image-token count.
    """
    check_requests(images, questions)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if any(has_special_text(tokenizer, q) for q in questions):
        input_ids, attention_mask, prompts = encode_as_text(processor, questions, image_token_id, num_image_tokens)
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    else:
        prompts = [build_prompt(processor, q) for q in questions]
        encoded = processor(images=images, text=prompts, padding=True, return_tensors="pt")
        input_ids = encoded["input_ids"].long()
        attention_mask = encoded["attention_mask"].long()
        pixel_values = encoded["pixel_values"]
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values.float(),
        token_type_ids=token_type_ids(input_ids, attention_mask, image_token_id, num_image_tokens),
        position_ids=position_ids_from_mask(attention_mask),
        prompts=prompts,
    )
