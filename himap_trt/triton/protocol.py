"""The ``himap`` Triton model's inputs and outputs: declared once, used by the config writer, the model
and the client helpers.

Request (every tensor has shape [1]; the optional ones may be left out)::

    image        BYTES   encoded image (JPEG, PNG, WebP, ... anything PIL reads), or a video (MP4, WebM, ...:
                         Qwen exports; decoded with PyAV, 2 frames per second, at most 16 frames)
    question     BYTES   UTF-8 question
    messages     BYTES   instead of image and question: a conversation, OpenAI's ``messages`` as UTF-8 JSON
                         (the rules of ``serve``, himap_trt/chat.py); image_url / video_url parts hold
                         ``data:`` URLs (base64)
    max_tokens   INT32   most new tokens (tokens)           [default: the model's default_max_tokens]
    temperature  FP32    0: greedy; > 0: sample              [0]
    top_p        FP32    nucleus threshold                   [1: off]
    seed         INT64   sampling seed                       [none: nondeterministic]
    ignore_eos   BOOL    keep generating after EOS            [false] (benchmarks: fixed answer lengths)
    video_fps    FP32    a video's frames sampled per second  [2]      (with messages: the default of every
    max_frames   INT32   most frames of a video, 2..256       [16]      video_url part, whose own fps /
    evs_rate     FP32    a video's EVS rate in [0, 1)         [export]  max_frames / evs_rate win)

Responses (``himap``: one per decode step, the last flagged final; ``himap_unary``: one)::

    text                  BYTES [1]  this response's piece of the answer (UTF-8); pieces concatenate to the answer
    token_ids             INT64 [n]  final response: the answer's token ids (EOS included); else empty
    kept_image_tokens     INT32 [s]  final response: image tokens each decoder segment saw (s segments); else empty
    kept_image_positions  INT32 [m]  final response: prompt positions of the image tokens each pruning stage kept,
                                     stage after stage (m = sum of kept_image_tokens[1:]); else empty
    finish_reason         BYTES [1]  final response: stop (EOS) or length (max_tokens / max_seq_len); else empty
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from himap_trt.chat import parse_messages, video_options
from himap_trt.errors import HimapError
from himap_trt.runtime.sampling import GenerationConfig
from himap_trt.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, FRAME_LIMIT, load_video


@dataclass(frozen=True)
class TensorDecl:
    """One input or output of the model (Triton config names and the numpy dtype clients send)."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    dtype: Any
    optional: bool = False
    doc: str = ""

    @property
    def datatype(self) -> str:
        """The KServe/tritonclient datatype string (``BYTES``, ``INT32``, ...)."""
        return {"TYPE_STRING": "BYTES", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_FP32": "FP32",
                "TYPE_BOOL": "BOOL"}[self.data_type]


INPUTS = (
    TensorDecl("image", "TYPE_STRING", (1,), np.object_, True,
               doc="encoded image: JPEG, PNG, WebP, ... (what PIL reads) [or messages]"),
    TensorDecl("question", "TYPE_STRING", (1,), np.object_, True, doc="UTF-8 question about the image [or messages]"),
    TensorDecl("messages", "TYPE_STRING", (1,), np.object_, True,
               doc="a conversation: OpenAI messages as UTF-8 JSON, visual parts as data: URLs"),
    TensorDecl("max_tokens", "TYPE_INT32", (1,), np.int32, True, "most new tokens [parameter default_max_tokens]"),
    TensorDecl("temperature", "TYPE_FP32", (1,), np.float32, True, "0: greedy (default); > 0: sample"),
    TensorDecl("top_p", "TYPE_FP32", (1,), np.float32, True, "nucleus sampling threshold (1: off)"),
    TensorDecl("seed", "TYPE_INT64", (1,), np.int64, True, "sampling seed (absent: nondeterministic)"),
    TensorDecl("ignore_eos", "TYPE_BOOL", (1,), np.bool_, True, "keep generating after EOS (benchmarks)"),
    TensorDecl("video_fps", "TYPE_FP32", (1,), np.float32, True, "a video's frames sampled per second (default 2)"),
    TensorDecl("max_frames", "TYPE_INT32", (1,), np.int32, True,
               f"most frames sampled from a video, 2 .. {FRAME_LIMIT} (default {DEFAULT_MAX_FRAMES})"),
    TensorDecl("evs_rate", "TYPE_FP32", (1,), np.float32, True,
               "a video's EVS rate in [0, 1) (default: the export's --evs-rate)"),
)
OUTPUTS = (
    TensorDecl("text", "TYPE_STRING", (1,), np.object_, doc="this response's piece of the answer (UTF-8)"),
    TensorDecl("token_ids", "TYPE_INT64", (-1,), np.int64, doc="final response: the answer's token ids (EOS included); else empty"),
    TensorDecl("kept_image_tokens", "TYPE_INT32", (-1,), np.int32,
               doc="final response: image tokens per decoder segment; else empty"),
    TensorDecl("kept_image_positions", "TYPE_INT32", (-1,), np.int32,
               doc="final response: prompt positions kept by each stage, concatenated; else empty"),
    TensorDecl("finish_reason", "TYPE_STRING", (1,), np.object_,
               doc="final response: stop (EOS) or length (max_tokens, max_seq_len); else empty"),
)
INPUT_NAMES = tuple(t.name for t in INPUTS)
OUTPUT_NAMES = tuple(t.name for t in OUTPUTS)

#: Most bytes accepted for one encoded image (or video).
MAX_IMAGE_BYTES = 32 * 2**20
#: Most pixels of one video frame.
MAX_VIDEO_FRAME_PIXELS = 4096 * 4096


@dataclass
class ParsedRequest:
    """A validated request: the decoded image, the question and the generation settings."""

    image: Any
    question: str | None
    config: Any
    ignore_eos: bool = False
    conversation: Any = None
    visuals: list = field(default_factory=list)
    evs_rate: float | None = None


def _scalar(get: Callable[[str], np.ndarray | None], decl: TensorDecl):
    value = get(decl.name)
    if value is None:
        if not decl.optional:
            raise HimapError(f"input {decl.name!r} is missing ({decl.doc})")
        return None
    value = np.asarray(value)
    if value.size != 1:
        raise HimapError(f"input {decl.name!r} must hold one element, got shape {list(value.shape)}")
    return value.reshape(-1)[0]


def _text(value, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise HimapError(f"input {name!r} is not valid UTF-8") from None
    return str(value)


def decode_image(data: bytes, *, fps: float = DEFAULT_FPS, max_frames: int = DEFAULT_MAX_FRAMES):
    """Decode an encoded image (PIL) fully, or else a video sampled at ``fps`` up to ``max_frames``.

    Raises:
        HimapError: empty, too large, or not an image PIL can read.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise HimapError("input 'image' is empty; send the encoded image file's bytes (JPEG, PNG, ...)")
    if len(data) > MAX_IMAGE_BYTES:
        raise HimapError(f"input 'image' has {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        return _decode_video(data, fps, max_frames)
    except Image.DecompressionBombError as exc:
        raise HimapError(f"input 'image' is too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise HimapError(f"input 'image' is truncated or corrupt: {exc}") from None
    return image


def _decode_video(data: bytes, fps: float, max_frames: int):
    """An ``image`` input that PIL does not read, tried as a video (Qwen exports; PyAV, sampled at
    the request's ``video_fps`` / ``max_frames``, default ``run --video``'s 2 fps, at most 16 frames).

    Raises:
        HimapError: neither an image nor a decodable video.
    """
    try:
        return load_video(data, fps=fps, max_frames=max_frames, name="input 'image'", max_pixels=MAX_VIDEO_FRAME_PIXELS)
    except HimapError as exc:
        if "not a readable video" in str(exc):
            raise HimapError("input 'image' is neither an image PIL can read (JPEG, PNG, WebP, ...) nor a video "
                             "PyAV can decode (MP4, WebM, ...)") from None
        raise


def parse_request(get: Callable[[str], np.ndarray | None], default_max_tokens: int) -> ParsedRequest:
    """Validate a request's tensors.

    Args:
        get: input name -> its numpy array, or None when the request does not carry it.
        default_max_tokens: new tokens when ``max_tokens`` is absent.

    Raises:
        HimapError: one line naming the input and what was expected.
    """
    decl = {t.name: t for t in INPUTS}
    conversation, visuals = None, []
    raw_messages = _scalar(get, decl["messages"])
    if raw_messages is not None:
        if get("image") is not None or get("question") is not None:
            raise HimapError("send either input 'messages' or inputs 'image' and 'question', not both")
        conversation = _conversation(_text(raw_messages, "messages"))
    else:
        image_value = _scalar(get, decl["image"])
        if image_value is None or get("question") is None:
            raise HimapError("inputs 'image' and 'question' are missing; send both (or a conversation in 'messages')")
        if not isinstance(image_value, (bytes, np.bytes_)):
            raise HimapError("input 'image' must be BYTES holding the encoded image file")
        question = _text(_scalar(get, decl["question"]), "question")
        if not question.strip():
            raise HimapError("input 'question' is empty; send a non-empty question")
    values = {name: _scalar(get, decl[name]) for name in ("max_tokens", "temperature", "top_p", "seed",
                                                           "ignore_eos", "video_fps", "max_frames", "evs_rate")}
    fps = DEFAULT_FPS if values["video_fps"] is None else float(values["video_fps"])
    if not 0 < fps < float("inf"):
        raise HimapError(f"input 'video_fps' must be a positive number of frames per second, got {fps}")
    frames = DEFAULT_MAX_FRAMES if values["max_frames"] is None else int(values["max_frames"])
    if not 2 <= frames <= FRAME_LIMIT:
        raise HimapError(f"input 'max_frames' must be between 2 and {FRAME_LIMIT}, got {frames}")
    rate = None if values["evs_rate"] is None else float(values["evs_rate"])
    if rate is not None and not 0 <= rate < 1:
        raise HimapError(f"input 'evs_rate' must be in [0, 1) (the fraction of a video's visual tokens EVS drops), "
                         f"got {rate}")
    try:
        config = GenerationConfig(
            max_new_tokens=int(values["max_tokens"]) if values["max_tokens"] is not None else default_max_tokens,
            temperature=float(values["temperature"]) if values["temperature"] is not None else 0.0,
            top_p=float(values["top_p"]) if values["top_p"] is not None else 1.0,
            seed=int(values["seed"]) if values["seed"] is not None else None,
        )
    except HimapError as exc:  # GenerationConfig names CLI flags; name the inputs instead
        message = str(exc)
        for flag, name in (("--max-new-tokens", "max_tokens"), ("--temperature", "temperature"),
                           ("--top-p", "top_p")):
            message = message.replace(flag, f"input {name!r}")
        raise HimapError(message) from None
    if conversation is not None:        # 29's inputs are the defaults of every video part's own fields
        conversation, visuals = _conversation_visuals(conversation, fps, frames, rate)
        return ParsedRequest(image=None, question=None, config=config, ignore_eos=bool(values["ignore_eos"]),
                             conversation=conversation, visuals=visuals)
    return ParsedRequest(image=decode_image(bytes(image_value), fps=fps, max_frames=frames), question=question,
                         config=config, ignore_eos=bool(values["ignore_eos"]), evs_rate=rate)


#: Most visual inputs of one conversation (each decoded and held until the prompt is prepared).
MAX_VISUAL_INPUTS = 8


def _conversation(text: str):
    """The ``messages`` input -> a checked conversation (its visual parts not decoded yet).

    Raises:
        HimapError: not JSON, an invalid conversation (naming the message and field: a ``video_url``'s
            ``fps`` / ``max_frames`` / ``evs_rate`` included), or more than ``MAX_VISUAL_INPUTS``.
    """
    import json

    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise HimapError(f"input 'messages' is not JSON: {exc}") from None
    conversation = parse_messages(value.get("messages") if isinstance(value, dict) else value,
                                  "input 'messages': messages")
    parts = conversation.visual_parts
    if len(parts) > MAX_VISUAL_INPUTS:
        raise HimapError(f"input 'messages': {len(parts)} visual inputs; at most {MAX_VISUAL_INPUTS}")
    return conversation


def _conversation_visuals(conversation, fps: float, max_frames: int, evs_rate: float | None):
    """(the conversation with every video part's ``evs_rate`` defaulted to the ``evs_rate`` input,
    its decoded visual inputs in prompt order: a video sampled at its part's own ``fps`` /
    ``max_frames``, else the ``video_fps`` / ``max_frames`` inputs').

    Raises:
        HimapError: a visual part that is not a base64 ``data:`` URL, a part's ``max_frames`` over
            FRAME_LIMIT, or an undecodable image or video.
    """
    import base64
    import binascii
    from dataclasses import replace

    visuals, messages = [], []
    for message in conversation.messages:
        parts = []
        for part in message.parts:
            if part.kind == "video" and evs_rate is not None and part.options.get("evs_rate") is None:
                part = replace(part, options={**part.options, "evs_rate": evs_rate})
            parts.append(part)
        messages.append(replace(message, parts=tuple(parts)))
    conversation = replace(conversation, messages=tuple(messages))
    for part in conversation.visual_parts:
        own = video_options(part, FRAME_LIMIT)
        header, _, data = part.source.partition(",")
        if not (header.startswith("data:") and header.endswith(";base64")):
            raise HimapError(f"{part.where}: expected a data: URL (data:image/png;base64,...); Triton requests carry "
                             "their images")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise HimapError(f"{part.where}: not valid base64") from None
        visuals.append(decode_image(raw, fps=fps if own.fps is None else own.fps,
                                    max_frames=max_frames if own.max_frames is None else own.max_frames))
    return conversation, visuals


# -- client side ----------------------------------------------------------------------------------
def make_inputs(client_module: Any, image: bytes | None, question: str | None, *, max_tokens: int | None = None,
                temperature: float | None = None, top_p: float | None = None,
                seed: int | None = None, ignore_eos: bool | None = None, messages: list | None = None,
                video_fps: float | None = None, max_frames: int | None = None, evs_rate: float | None = None) -> list:
    """The request tensors for ``tritonclient.http`` or ``tritonclient.grpc`` (pass the module).

    Args:
        client_module: ``tritonclient.http`` or ``tritonclient.grpc`` (both have ``InferInput``).
        image: the encoded image file's bytes (None with ``messages``).
        question: the question (None with ``messages``).
        messages: a conversation (OpenAI's messages, visual parts as ``data:`` URLs) instead.
        max_tokens, temperature, top_p, seed, ignore_eos: see the module docstring; None leaves
            them out.
    """
    import json

    values = {"image": image, "question": None if question is None else question.encode("utf-8"),
              "messages": None if messages is None else json.dumps(messages).encode("utf-8"), "max_tokens": max_tokens,
              "temperature": temperature, "top_p": top_p, "seed": seed, "ignore_eos": ignore_eos,
              "video_fps": video_fps, "max_frames": max_frames, "evs_rate": evs_rate}
    inputs = []
    for decl in INPUTS:
        value = values[decl.name]
        if value is None:
            continue
        tensor = client_module.InferInput(decl.name, [1], decl.datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=decl.dtype))
        inputs.append(tensor)
    return inputs


@dataclass
class Answer:
    """Responses of one request, accumulated (``add`` each result's ``as_numpy``)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    kept_image_tokens: list[int] = field(default_factory=list)
    kept_image_positions: list[list[int]] = field(default_factory=list)
    finish_reason: str = ""
    responses: int = 0

    def add(self, as_numpy: Callable[[str], np.ndarray | None]) -> None:
        """Add one response (``result.as_numpy`` of a tritonclient result)."""
        self.responses += 1
        text = as_numpy("text")
        if text is not None and text.size:
            self.text += bytes(text.reshape(-1)[0]).decode("utf-8")
        ids = as_numpy("token_ids")
        if ids is not None:
            self.token_ids += [int(i) for i in ids.reshape(-1)]
        kept = as_numpy("kept_image_tokens")
        if kept is not None and kept.size:
            self.kept_image_tokens = [int(n) for n in kept.reshape(-1)]
            flat = [int(p) for p in as_numpy("kept_image_positions").reshape(-1)]
            self.kept_image_positions, start = [], 0
            for n in self.kept_image_tokens[1:]:
                self.kept_image_positions.append(flat[start:start + n])
                start += n
        reason = as_numpy("finish_reason")
        if reason is not None and reason.size and reason.reshape(-1)[0]:
            self.finish_reason = bytes(reason.reshape(-1)[0]).decode("utf-8")
