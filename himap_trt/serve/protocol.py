"""The OpenAI chat-completions request and response shapes the server speaks (pydantic).

Types are strict where OpenAI's API is (pydantic strict mode on the JSON body): ``"5"`` is not an
integer, ``"true"`` not a boolean; integers are accepted for numbers. ``messages`` is any conversation :mod:`himap_trt.chat` accepts
(system / developer / user / assistant, string or parts content, images and, for Qwen exports,
videos in user messages). Fields OpenAI defines that this server cannot honour (tools, functions,
``response_format`` other than text, ``logit_bias``, audio) are refused with 400 rather than
ignored. Extensions, as vLLM names them: ``ignore_eos``, ``return_token_ids``,
``repetition_penalty`` and ``min_tokens`` in the request, ``himap`` (image tokens kept per
segment) in the response.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

#: OpenAI's limit on stop sequences.
MAX_STOP = 4
#: ``seed`` is a signed 64-bit integer in OpenAI's API (torch.manual_seed takes no more).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
STRICT = ConfigDict(strict=True)


class ImageURL(BaseModel):
    model_config = STRICT

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = STRICT

    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    """The video and, as vLLM-style extension fields, this request's sampling (``fps``, ``max_frames``:
    default the server's ``--video-fps`` / ``--max-frames``; ``max_frames`` at most the latter) and
    EVS rate (``evs_rate`` in [0, 1): default the export's ``--evs-rate``)."""

    model_config = STRICT

    url: str
    fps: float | None = None
    max_frames: int | None = None
    evs_rate: float | None = None


class VideoPart(BaseModel):
    """vLLM's video content part (Qwen exports): ``{"type": "video_url", "video_url": {"url": ...}}``."""

    model_config = STRICT

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body (the fields this server reads; others are allowed and ignored
    unless listed in :data:`UNSUPPORTED`)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                          Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # extensions (vLLM's names)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool = False
    return_token_ids: bool = False


#: Request fields that change what OpenAI returns and that this server does not implement:
#: refused (400) when set to anything but their "off" value.
UNSUPPORTED: dict[str, Any] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "logit_bias": (None, {}), "audio": (None,),
    "modalities": (None, ["text"]), "continue_final_message": (None, False),
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, the answer to every 4xx and 5xx."""

    error: ErrorDetail


class ResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class HimapExtension(BaseModel):
    image_tokens_per_segment: list[int]
    token_ids: list[int] | None = None


class ChatCompletion(BaseModel):
    """``POST /v1/chat/completions`` answer (not streamed)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    himap: HimapExtension


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    """``GET /v1/models`` answer."""

    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    """``GET /health`` answer: ``ok`` (200), else ``loading``, ``draining``, ``failed`` or ``wedged`` (503)."""

    status: Literal["ok", "loading", "draining", "failed", "wedged"]
    error: str | None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
