"""Conversations: OpenAI-style ``messages`` (system / developer / user / assistant, string or parts
content, images and videos in user turns), checked once and rendered by the export's chat template.

One parser serves ``serve`` (after pydantic), ``run --messages`` / ``run --batch`` and the Triton
model, so every entry point accepts and refuses the same conversations with the same messages.

**Which tokens are "instruction" tokens** (img->txt scoring, METHODS.md): the non-visual tokens after
both the last visual token and the start of the last user message (its role header included), up to
the end of the prompt (the generation prompt included). Reason: img->txt ranks image tokens by the
attention the *question being answered* pays them; in a conversation that question is the last user
message, while earlier turns (and a system prompt) are context like the paper's system prompt. For a
one-turn prompt with one image the rule is the paper's (everything after the image), so single-turn
results are unchanged. docs/ARCHITECTURE.md, "Conversations", has the decision in full.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from himap_trt.errors import HimapError
from himap_trt.prompt import (
    TOKEN_IMAGE,
    TOKEN_INSTRUCTION,
    TOKEN_SYSTEM,
    check_question,
    has_special_text,
    json_type_name,
)

#: Roles a conversation may hold; ``developer`` is OpenAI's newer name for ``system``.
ROLES = ("system", "developer", "user", "assistant")
#: Most messages in one conversation (a bound on work before tokenizing; any real chat fits).
MAX_MESSAGES = 256
#: Most content parts in one message.
MAX_PARTS = 64


@dataclass(frozen=True)
class Part:
    """One content part: ``text`` (with its text), ``image`` or ``video`` (with its source: a URL for
    ``serve`` / Triton, a path for ``run``).

    Attributes:
        kind: ``text``, ``image`` or ``video``.
        text: the text of a text part.
        source: where a visual part comes from.
        where: the field it came from (``messages[2].content[0].image_url.url``), for error messages.
        options: per-part extras (e.g. a video's ``fps``), passed on unchanged.
    """

    kind: str
    text: str | None = None
    source: str | None = None
    where: str = ""
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ChatMessage:
    """One message: its role and its parts, in order."""

    role: str
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        """The message's text parts joined (how a plain-string content arrives)."""
        return "".join(p.text or "" for p in self.parts if p.kind == "text")


@dataclass(frozen=True)
class Conversation:
    """A checked conversation: roles in order, the last message a user message, visual inputs only in
    user messages (see :func:`check_conversation`)."""

    messages: tuple[ChatMessage, ...]

    @property
    def visual_parts(self) -> list[Part]:
        """Every image and video part, in prompt order."""
        return [p for m in self.messages for p in m.parts if p.kind != "text"]

    @property
    def last_user(self) -> int:
        """Index of the last user message."""
        return max(i for i, m in enumerate(self.messages) if m.role == "user")

    def template_messages(self, upto: int | None = None) -> list[dict]:
        """The messages as transformers' ``apply_chat_template`` takes them (``developer`` as
        ``system``; content always a list of parts, as LLaVA-1.5's template iterates it)."""
        out = []
        for message in self.messages[:upto]:
            content = [{"type": "text", "text": p.text} if p.kind == "text" else {"type": p.kind}
                       for p in message.parts]
            out.append({"role": "system" if message.role == "developer" else message.role, "content": content})
        return out

    @classmethod
    def single(cls, question: str, kind: str | None = "image", source: str | None = None,
               options: dict | None = None) -> Conversation:
        """One user message: an optional visual input (with a video's ``options``: :data:`VIDEO_FIELDS`)
        then the question (``run``'s flags, a ``--batch`` line)."""
        parts = ((Part(kind, source=source, where=kind or "image", options=dict(options or {})),) if kind else ()) \
            + (Part("text", text=question),)
        return check_conversation(cls((ChatMessage("user", parts),)))


def check_conversation(conversation: Conversation, where: str = "messages") -> Conversation:
    """Check a conversation's shape (every entry point: serve, run, Triton).

    Rules: 1..``MAX_MESSAGES`` messages; system / developer messages only before the first user
    message; after it, user and assistant messages alternate; the last message is a user message
    (no ``continue_final_message``: an answer is always a new assistant turn); every message has
    content (a system or assistant message non-blank text, a user message text or a visual input);
    images and videos only in user messages; text is valid UTF-8 and holds no special-token text
    (checked later, with the tokenizer: :func:`check_special_text`).

    Returns:
        ``conversation`` unchanged.

    Raises:
        HimapError: naming the message (``messages[2]``) and what was expected.
    """
    messages = conversation.messages
    if not messages:
        raise HimapError(f"{where}: no messages; send at least one user message")
    if len(messages) > MAX_MESSAGES:
        raise HimapError(f"{where}: {len(messages)} messages, more than the {MAX_MESSAGES} a conversation may hold")
    seen_user = False
    previous = None
    for i, message in enumerate(messages):
        name = f"{where}[{i}]"
        if message.role not in ROLES:
            raise HimapError(f"{name}.role: {message.role!r} is not one of {', '.join(ROLES)}")
        if len(message.parts) > MAX_PARTS:
            raise HimapError(f"{name}.content: {len(message.parts)} parts, more than {MAX_PARTS}")
        for j, part in enumerate(message.parts):
            if part.kind == "text":
                check_question(part.text, f"{name}.content[{j}].text" if len(message.parts) > 1 else f"{name}.content")
            elif message.role != "user":
                article = "an" if message.role == "assistant" else "a"
                raise HimapError(f"{part.where or name + '.content'}: an {part.kind} in {article} {message.role} message; "
                                 "images and videos go in user messages")
        if not message.parts:
            raise HimapError(f"{name}.content: empty; a {message.role} message needs text"
                             + (" or an image" if message.role == "user" else ""))
        if message.role in ("system", "developer"):
            if seen_user:
                raise HimapError(f"{name}.role: a {message.role} message after a user message; system and developer "
                                 "messages come first")
        elif message.role == "user":
            if previous == "user":
                raise HimapError(f"{name}.role: two user messages in a row; an assistant message goes between them")
            seen_user = True
        else:
            if not seen_user:
                raise HimapError(f"{name}.role: an assistant message before any user message")
            if previous == "assistant":
                raise HimapError(f"{name}.role: two assistant messages in a row")
        previous = message.role if message.role in ("user", "assistant") else previous
    if messages[-1].role != "user":
        raise HimapError(f"{where}[{len(messages) - 1}].role: the last message is a {messages[-1].role} message; "
                         "end the conversation with a user message (continuing an assistant message is not supported)")
    return conversation


def check_special_text(conversation: Conversation, tokenizer: Any, where: str = "messages") -> None:
    """Refuse text holding a special token's text (``<image>``, ``<|im_end|>``, ...): in a conversation
    it would forge turns or visual tokens. (A one-turn, one-image prompt tokenizes it as plain text
    instead: :func:`himap_trt.prompt.encode_as_text`.)

    Raises:
        HimapError: naming the message.
    """
    for i, message in enumerate(conversation.messages):
        for j, part in enumerate(message.parts):
            if part.kind == "text" and has_special_text(tokenizer, part.text):
                raise HimapError(f"{where}[{i}].content: holds special-token text (such as '<image>' or "
                                 "'<|im_end|>'); in a conversation of several messages or visual inputs it is not "
                                 "accepted, remove it")


def parse_messages(value: Any, where: str = "messages") -> Conversation:
    """OpenAI's ``messages`` JSON (already decoded) -> a checked :class:`Conversation`.

    Content is a string or a list of parts ``{"type": "text", "text"}``, ``{"type": "image_url",
    "image_url": {"url"}}`` (or ``"image_url": "..."``), ``{"type": "video_url", "video_url": {"url", ...}}``;
    ``run`` files may also write ``{"type": "image", "image": path}`` / ``{"type": "video", "video": path}``.
    Other part types (``input_audio``, ``file``, ``refusal``) and roles (``tool``, ``function``) are refused.

    Raises:
        HimapError: naming the field and what was expected.
    """
    if not isinstance(value, list):
        raise HimapError(f"{where} must be an array of messages, got {json_type_name(value)}")
    if len(value) > MAX_MESSAGES:
        raise HimapError(f"{where}: {len(value)} messages, more than the {MAX_MESSAGES} a conversation may hold")
    messages = []
    for i, item in enumerate(value):
        name = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise HimapError(f"{name} must be an object with role and content, got {json_type_name(item)}")
        role = item.get("role")
        if role not in ROLES:
            hint = "; tool calls are not supported" if role in ("tool", "function") else ""
            raise HimapError(f"{name}.role: expected one of {', '.join(ROLES)}, got {json.dumps(role)}{hint}")
        content = item.get("content")
        if isinstance(content, str):
            parts = (Part("text", text=content, where=f"{name}.content"),)
        elif isinstance(content, list):
            if len(content) > MAX_PARTS:
                raise HimapError(f"{name}.content: {len(content)} parts, more than {MAX_PARTS}")
            parts = tuple(_part(p, f"{name}.content[{j}]") for j, p in enumerate(content))
        elif content is None:
            parts = ()
        else:
            raise HimapError(f"{name}.content must be a string or an array of parts, got {json_type_name(content)}")
        messages.append(ChatMessage(role, parts))
    return check_conversation(Conversation(tuple(messages)), where)


def _part(value: Any, where: str) -> Part:
    if not isinstance(value, dict):
        raise HimapError(f"{where} must be an object with a type, got {json_type_name(value)}")
    kind = value.get("type")
    if kind == "text":
        return Part("text", text=value.get("text"), where=f"{where}.text")
    if kind in ("image_url", "video_url", "image", "video"):
        media = kind.split("_")[0]
        inner = value.get(kind)
        source = inner.get("url") if isinstance(inner, dict) else inner
        field_name = f"{where}.{kind}" + (".url" if isinstance(inner, dict) else "")
        if not isinstance(source, str) or not source:
            raise HimapError(f"{field_name}: expected a non-empty string (a URL or path), got {json_type_name(source)}")
        options = {k: v for k, v in inner.items() if k not in ("url", "detail")} if isinstance(inner, dict) else {}
        if media == "video":
            _check_video_fields(options, f"{where}.{kind}")
        return Part(media, source=source, where=field_name, options=options)
    raise HimapError(f"{where}.type: expected text, image_url or video_url, got {json.dumps(kind)}")


#: A video part's own sampling and EVS fields (issue 29; vLLM-style extensions of ``video_url``).
VIDEO_FIELDS = ("fps", "max_frames", "evs_rate")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_video_fields(options: dict, where: str) -> None:
    """A video part's ``fps`` (> 0, finite), ``max_frames`` (integer >= 2) and ``evs_rate`` ([0, 1)).

    Raises:
        HimapError: naming the field (``messages[0].content[1].video_url.evs_rate``) and what was expected.
    """
    fps, frames, rate = (options.get(k) for k in VIDEO_FIELDS)
    if fps is not None and not (_number(fps) and 0 < fps < float("inf")):
        raise HimapError(f"{where}.fps must be a positive number of frames per second, got {fps!r:.40}")
    if frames is not None and not (isinstance(frames, int) and not isinstance(frames, bool) and frames >= 2):
        raise HimapError(f"{where}.max_frames must be an integer >= 2, got {frames!r:.40}")
    if rate is not None and not (_number(rate) and 0 <= rate < 1):
        raise HimapError(f"{where}.evs_rate must be in [0, 1) (the fraction of the video's visual tokens EVS drops), "
                         f"got {rate!r:.40}")


@dataclass(frozen=True)
class VideoOptions:
    """A video part's own sampling (``fps``: frames per second, ``max_frames``: frames) and EVS rate
    (``evs_rate`` in [0, 1)); None: the entry point's default (its flags / inputs, the export's rate)."""

    fps: float | None = None
    max_frames: int | None = None
    evs_rate: float | None = None


def video_options(part: Part, max_frames: int) -> VideoOptions:
    """The checked sampling and EVS fields of a visual part (all None for an image), ``max_frames``
    bounded by the entry point's most frames (``serve --max-frames``, Triton's and ``run``'s frame limit).

    Raises:
        HimapError: naming the field: a value out of its range (checked again here for parts built by
            hand), or ``max_frames`` above ``max_frames``.
    """
    if part.kind != "video":
        return VideoOptions()
    where = part.where.removesuffix(".url")
    _check_video_fields(part.options, where)
    fps, frames, rate = (part.options.get(k) for k in VIDEO_FIELDS)
    if frames is not None and frames > max_frames:
        raise HimapError(f"{where}.max_frames must be between 2 and {max_frames} (the most frames this server "
                         f"samples), got {frames}")
    return VideoOptions(None if fps is None else float(fps), frames, None if rate is None else float(rate))


@dataclass(frozen=True)
class Rendered:
    """A conversation rendered by the chat template.

    Attributes:
        prompt: the whole prompt text (generation prompt included), one placeholder per visual input.
        prefix: the text before the last user message (a prefix of ``prompt``), or None when the
            template does not render turn by turn (then instruction tokens are those after the
            last visual token).
    """

    prompt: str
    prefix: str | None


def render(processor: Any, conversation: Conversation) -> Rendered:
    """Render with the processor's chat template (``add_generation_prompt=True``).

    Raises:
        HimapError: the template fails, renders no text, or the processor has none and the
            conversation is more than one user message (LLaVA-1.5's fallback format holds one turn).
    """
    template = getattr(processor, "chat_template", None)
    if not template:
        raise HimapError("this export's processor has no chat template; only one-question prompts can be formed")

    def apply(messages, generation):
        try:
            text = processor.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - the template is input (jinja errors, raise_exception)
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise HimapError(f"messages: the model's chat template refused the conversation: {first}") from None
        if not isinstance(text, str):
            raise HimapError(f"the processor's chat template rendered {type(text).__name__}, not text")
        return text

    prompt = apply(conversation.template_messages(), True)
    last = conversation.last_user
    prefix = apply(conversation.template_messages(last), False) if last else ""
    return Rendered(prompt, prefix if prompt.startswith(prefix) else None)


def instruction_start(offsets: list[tuple[int, int]], prefix_chars: int | None, visual: list[bool]) -> int:
    """The first instruction token of one prompt (see the module docstring).

    Args:
        offsets: per token, its (start, end) characters in the tokenized text (0, 0 for added special
            tokens without text).
        prefix_chars: characters before the last user message, or None (unknown).
        visual: per token, whether it is a visual token.

    Returns:
        The token index from which non-visual tokens are instruction tokens.
    """
    after_visual = max((i + 1 for i, v in enumerate(visual) if v), default=0)
    if prefix_chars is None:
        return after_visual
    start = next((i for i, (_, end) in enumerate(offsets) if end > prefix_chars), len(offsets))
    return max(after_visual, start)


def encode_rendered(tokenizer: Any, rendered: Rendered, expand) -> tuple[list[int], tuple]:
    """Tokenize a rendered conversation whose visual placeholders ``expand`` replaces (called on the
    text before the last user message, then on the rest, so it meets the placeholders in order).

    Returns:
        (token ids, (characters of the expanded prefix or None, per-token character offsets)): the ids are what the processor gives
        for the same text (it expands the placeholders the same way, then calls the tokenizer).
    """
    if rendered.prefix is None:
        text, prefix_chars = expand(rendered.prompt), None
    else:
        before = expand(rendered.prefix)
        text, prefix_chars = before + expand(rendered.prompt[len(rendered.prefix):]), len(before)
    encoded = tokenizer(text, return_offsets_mapping=True)
    return list(encoded["input_ids"]), (prefix_chars, [tuple(o) for o in encoded["offset_mapping"]])


def conversation_types(ids: list[int], image_token_id: int, located: tuple) -> list[int]:
    """``token_type_ids`` of one unpadded conversation prompt: image, instruction (see the module
    docstring), else system.

    Args:
        ids: the prompt's token ids (visual tokens as ``image_token_id``).
        located: the second value of :func:`encode_rendered`.
    """
    prefix_chars, offsets = located
    visual = [t == image_token_id for t in ids]
    start = instruction_start(offsets, prefix_chars, visual)
    return [TOKEN_IMAGE if v else TOKEN_INSTRUCTION if i >= start else TOKEN_SYSTEM for i, v in enumerate(visual)]
