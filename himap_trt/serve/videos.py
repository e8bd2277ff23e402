"""``video_url`` parts (vLLM's name) -> :class:`himap_trt.video.Video`, with the server's limits.

- ``data:video/{mp4,webm,quicktime,x-matroska};base64,...``: decoded in memory with PyAV;
- ``file:///path``: only under ``--image-root`` (the same rule as images);
- ``http(s)://``: refused (send the video as a data URL).

Limits (:class:`VideoPolicy`): encoded bytes, pixels per frame (checked before the frames are
decoded), memory of the kept frames (``--max-image-memory``, before any becomes an image), frames kept (sampling at ``fps``, at most ``max_frames``). Every failure raises
:class:`~himap_trt.serve.images.ImageError` (HTTP 400) naming the request field; decoding runs in a
worker thread, so the event loop keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from anyio import to_thread

from himap_trt.errors import HimapError
from himap_trt.serve.images import ImageError
from himap_trt.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, Video, load_video

#: Media types accepted in data URLs.
VIDEO_TYPES = ("video/mp4", "video/webm", "video/quicktime", "video/x-matroska")


@dataclass(frozen=True)
class VideoPolicy:
    """How videos are sampled and how big they may be.

    Attributes:
        fps: frames per second sampled; max_frames: most frames kept (spread over the clip).
        max_bytes: most encoded bytes of one video (bytes).
        max_pixels: most pixels of one frame (pixels).
        max_memory: most memory the kept frames may take decoded and preprocessed (bytes; the server's
            ``--max-image-memory``, estimated before any frame becomes an image).
        image_root: directory ``file://`` URLs must lie under (None: refused); the server's ``--image-root``.
    """

    fps: float = DEFAULT_FPS
    max_frames: int = DEFAULT_MAX_FRAMES
    max_bytes: int = 20 * 2**20
    max_pixels: int = 4096 * 4096
    max_memory: int = 256 * 2**20
    image_root: Path | None = None


def _decode(data: bytes | Path, param: str, policy: VideoPolicy) -> Video:
    try:
        return load_video(data, fps=policy.fps, max_frames=policy.max_frames, name=param, max_pixels=policy.max_pixels,
                          max_memory=policy.max_memory)
    except HimapError as exc:
        raise ImageError(str(exc), param) from None


def _data_url(url: str, param: str, policy: VideoPolicy) -> Video:
    header, sep, payload = url[len("data:"):].partition(",")
    fields = [f.strip().lower() for f in header.split(";")]
    if not sep or fields[0] not in VIDEO_TYPES or "base64" not in fields[1:]:
        raise ImageError(f"{param}: expected a base64 data URL of type {', '.join(VIDEO_TYPES)} "
                         f"(data:video/mp4;base64,...), got {url[:40]!r}", param)
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise ImageError(f"{param}: the video is larger than the limit of {policy.max_bytes} bytes", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{param}: the data URL's payload is not valid base64", param) from None
    return _decode(data, param, policy)


def _file_url(url: str, param: str, policy: VideoPolicy) -> Video:
    if policy.image_root is None:
        raise ImageError(f"{param}: file:// videos are refused; start the server with --image-root DIR to allow "
                         "files under DIR", param)
    root = policy.image_root.resolve()
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).resolve()
    if not path.is_relative_to(root):
        raise ImageError(f"{param}: {str(path)!r} is outside the --image-root {str(root)!r}", param)
    if not path.is_file() or path.stat().st_size > policy.max_bytes:
        raise ImageError(f"{param}: {str(path)!r} is not a file of at most {policy.max_bytes} bytes", param)
    return _decode(path, param, policy)


async def open_video_url(url: str, param: str, policy: VideoPolicy) -> Video:
    """The sampled frames a ``video_url`` points at.

    Raises:
        ImageError: a refused scheme, over a limit, not a video, no frames.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return await to_thread.run_sync(_data_url, url, param, policy)
    if scheme == "file":
        return await to_thread.run_sync(_file_url, url, param, policy)
    raise ImageError(f"{param}: unsupported video URL scheme {scheme or url[:20]!r}; send the video as a "
                     "data:video/mp4;base64,... URL (or file:// under --image-root)", param)
