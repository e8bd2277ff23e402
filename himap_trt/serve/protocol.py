"""The OpenAI chat-completions request and response shapes the server speaks (pydantic).

Only what a LLaVA-1.5 prompt can hold is accepted: one user message with one ``image_url`` part
and text. Fields OpenAI defines that this server cannot honour (``n > 1``, ``logprobs``, tools,
penalties) are refused with 400 rather than ignored. Extensions, as vLLM names them:
``ignore_eos`` and ``return_token_ids`` in the request, ``himap`` (image tokens kept per segment)
in the response.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

#: OpenAI's limit on stop sequences.
MAX_STOP = 4


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    url: str


class VideoPart(BaseModel):
    """vLLM's video content part (Qwen exports): ``{"type": "video_url", "video_url": {"url": ...}}``."""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body (the fields this server reads; others are allowed and ignored
    unless listed in :data:`UNSUPPORTED`)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1)
    # extensions (vLLM's names)
    ignore_eos: bool = False
    return_token_ids: bool = False


#: Request fields that change what OpenAI returns and that this server does not implement:
#: refused (400) when set to anything but their "off" value.
UNSUPPORTED: dict[str, Any] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "response_format": (None, {"type": "text"}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "audio": (None,), "modalities": (None, ["text"]),
}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
