"""User requests from files: ``--batch`` JSONL, one ``{"image": path, "question": text}`` (or, for
Qwen exports, ``{"video": path, "question": text}`` with optional ``fps``, ``max_frames`` and
``evs_rate``) or one ``{"messages": [...]}`` conversation per line (a ``video_url`` part may hold the
same three fields); ``--messages`` a JSON conversation.

Every line is checked before anything is loaded; errors name ``file:line`` and the field, and say
what was expected. Questions are checked with :func:`himap_trt.prompt.check_question`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from himap_trt.chat import Conversation, parse_messages
from himap_trt.errors import HimapError
from himap_trt.prompt import json_type_name, check_question

#: Largest ``--batch`` file read (bytes): requests are small; anything bigger is a mistake.
MAX_BATCH_FILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Request:
    """One request: an image (or video) path (relative paths resolved against the batch file's
    directory) and a question, with a video's sampling (``fps``, ``max_frames``: None = the command's
    flags) and EVS rate (``evs_rate``: None = the export's); or a conversation (``conversation``; then
    ``image`` and ``question`` are None and its video parts carry their own fields)."""

    image: Path | None
    question: str | None
    video: bool = False
    fps: float | None = None
    max_frames: int | None = None
    evs_rate: float | None = None
    conversation: Conversation | None = None


def local_conversation(value, where: str, base: Path) -> Conversation:
    """A ``messages`` array from a file -> a conversation whose visual parts are local paths (relative
    ones resolved against ``base``; ``file://`` URLs taken as paths).

    Raises:
        HimapError: an invalid conversation (naming the message) or a visual source that is not a
            local path (``http(s)://`` or ``data:`` URLs are for ``serve``).
    """
    from dataclasses import replace
    from urllib.parse import unquote, urlparse

    conversation = parse_messages(value, where)
    messages = []
    for message in conversation.messages:
        parts = []
        for part in message.parts:
            if part.kind != "text":
                source = part.source
                if source.startswith("file://"):
                    source = unquote(urlparse(source).path)
                elif "://" in source or source.startswith("data:"):
                    raise HimapError(f"{part.where}: {source[:40]!r} "
                                     "is not a local path; run reads image and video files (URLs are for serve)")
                path = Path(source)
                part = replace(part, source=str(path if path.is_absolute() else base / path))
            parts.append(part)
        messages.append(replace(message, parts=tuple(parts)))
    return Conversation(tuple(messages))


def read_messages_file(path: str | Path, flag: str = "--messages") -> Conversation:
    """A JSON file holding a conversation: an array of messages, or an object with ``messages``.

    Raises:
        HimapError: the file missing or unreadable, not JSON, or an invalid conversation (naming the message).
    """
    path = Path(path)
    name = f"{flag} file {str(path)!r}"
    if not path.is_file():
        raise HimapError(f"{name} does not exist or is not a regular file")
    if path.stat().st_size > MAX_BATCH_FILE_BYTES:
        raise HimapError(f"{name} is larger than {MAX_BATCH_FILE_BYTES} bytes")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise HimapError(f"{name}: byte {exc.start + 1} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise HimapError(f"{name}: not JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise HimapError(f"{name}: JSON nested too deeply") from None
    except OSError as exc:
        raise HimapError(f"{name} cannot be read: {exc.strerror}") from None
    if isinstance(value, dict):
        if "messages" not in value:
            raise HimapError(f"{name}: expected an array of messages or an object with \"messages\"")
        value = value["messages"]
    return local_conversation(value, f"{path}: messages", path.parent)


def _video_fields(item: dict, where: str) -> dict:
    """The optional ``fps`` (> 0), ``max_frames`` (integer >= 2) and ``evs_rate`` ([0, 1)) of a video line."""
    out = {}
    for key, ok, expected in (
        ("fps", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"),
         "a positive number of frames per second"),
        ("max_frames", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2, "an integer >= 2"),
        ("evs_rate", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
         "a number in [0, 1)"),
    ):
        if key in item:
            if not ok(item[key]):
                raise HimapError(f"{where}: field \"{key}\" must be {expected}, got {item[key]!r:.40}")
            out[key] = item[key]
    return out


def read_batch_file(path: str | Path, flag: str = "--batch") -> list[Request]:
    """Parse a JSONL requests file.

    Blank lines are skipped. Each other line must be a JSON object with a string ``image`` (a path,
    relative to the file's directory unless absolute) and a string ``question``; other keys are ignored.

    Raises:
        HimapError: ``flag`` file missing, not a regular file, unreadable, not UTF-8 (naming the line),
            a line that is not a JSON object, a missing or non-string field (naming line and field),
            an empty question, or no requests at all.
    """
    path = Path(path)
    name = f"{flag} file {str(path)!r}"
    if not path.exists():
        raise HimapError(f"{name} does not exist")
    if not path.is_file():
        raise HimapError(f"{name} is not a regular file")
    try:
        if path.stat().st_size > MAX_BATCH_FILE_BYTES:
            raise HimapError(f"{name} is larger than {MAX_BATCH_FILE_BYTES} bytes")
        data = path.read_bytes()
    except PermissionError:
        raise HimapError(f"{name} cannot be read: permission denied") from None
    except OSError as exc:
        raise HimapError(f"{name} cannot be read: {exc.strerror}") from None
    requests = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HimapError(f"{where}: byte {exc.start + 1} of the line is not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HimapError(f"{where}: not JSON ({exc.msg} at column {exc.colno}); expected an object with "
                             "\"image\" and \"question\"") from None
        except RecursionError:
            raise HimapError(f"{where}: JSON nested too deeply; expected an object with \"image\" and \"question\"") from None
        if not isinstance(item, dict):
            raise HimapError(f"{where}: expected a JSON object with \"image\" and \"question\", got {json_type_name(item)}")
        if "messages" in item:
            conversation = local_conversation(item["messages"], f"{where}: messages", path.parent)
            requests.append(Request(None, None, conversation=conversation))
            continue
        if "image" in item and "video" in item:
            raise HimapError(f"{where}: fields \"image\" and \"video\" both given; a request holds one of them")
        field = "video" if "video" in item else "image"
        for key in (field, "question"):
            if key not in item:
                raise HimapError(f"{where}: field \"{key}\" is missing; expected a JSON object with \"image\" (or "
                                 "\"video\") and \"question\"")
        image = item[field]
        if not isinstance(image, str) or not image or "\x00" in image:
            raise HimapError(f"{where}: field \"{field}\" must be a non-empty path string, got {json_type_name(image)}")
        try:
            image.encode("utf-8")
        except UnicodeEncodeError:
            raise HimapError(f"{where}: field \"{field}\" is not valid UTF-8 text") from None
        extra = [k for k in ("fps", "max_frames", "evs_rate") if k in item]
        if field == "image" and extra:
            raise HimapError(f"{where}: field \"{extra[0]}\" applies to a \"video\" request, not an image")
        options = _video_fields(item, where) if field == "video" else {}
        question = check_question(item["question"], f"{where}: field \"question\"")
        image_path = Path(image)
        requests.append(Request(image_path if image_path.is_absolute() else path.parent / image_path, question,
                                video=field == "video", **options))
    if not requests:
        raise HimapError(f"{name} holds no requests")
    return requests
