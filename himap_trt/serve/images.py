"""``image_url`` parts -> PIL images, with the server's limits.

- ``data:image/{jpeg,png,webp};base64,...``: decoded in memory.
- ``file:///path``: only under ``--image-root`` (after resolving symbolic links); opened with
  :func:`himap_trt.prompt.load_image`.
- ``http://`` / ``https://``: refused unless ``--allow-remote-images``; then fetched with a timeout
  and a size limit (bytes), redirects followed at most :data:`MAX_REDIRECTS` times.

Every failure raises :class:`ImageError` (HTTP 400) naming the request field.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from anyio import to_thread
from PIL import Image, UnidentifiedImageError

from himap_trt.errors import HimapError
from himap_trt.prompt import load_image, to_8bit

#: Formats accepted in data URLs and remote images (what OpenAI accepts, less GIF).
FORMATS = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
MAX_REDIRECTS = 3


class ImageError(HimapError):
    """An ``image_url`` that cannot be used (HTTP 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how big they may be.

    Attributes:
        image_root: directory ``file://`` URLs must lie under (None: ``file://`` refused).
        allow_remote: fetch ``http(s)://`` URLs.
        max_bytes: most encoded bytes of one image (bytes).
        max_pixels: most pixels of one decoded image (pixels).
        max_memory: most memory decoding and preprocessing one image may take, as estimated from its
            header before anything is decoded by :func:`image_memory` (bytes).
        timeout_s: time limit of one remote fetch (seconds).
    """

    image_root: Path | None = None
    allow_remote: bool = False
    max_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000
    max_memory: int = 256 * 2**20
    timeout_s: float = 10.0


#: Bytes per pixel and band of PIL's decoded modes (1-bit images are stored a byte per pixel).
_BAND_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}
#: Bytes per pixel the processors' preprocessing holds at its peak: the image as float32 RGB.
PREPROCESS_BYTES_PER_PIXEL = 3 * 4


def image_memory(width: int, height: int, mode: str) -> int:
    """Memory decoding and preprocessing a width x height image of PIL ``mode`` takes at its peak (bytes):
    the decoded pixels plus a float32 RGB copy (what the image processors make before resizing).
    A 7000x7000 RGB PNG: 147 MB decoded + 588 MB = 735 MB (measured: +654 MB of RSS)."""
    try:
        bands = Image.getmodebands(mode)
    except (KeyError, ValueError):    # a mode PIL does not list: assume the widest common one
        bands = 4
    pixels = width * height
    return pixels * (bands * _BAND_BYTES.get(mode, 1) + PREPROCESS_BYTES_PER_PIXEL)


def check_budget(image: Image.Image, param: str, policy: ImagePolicy) -> None:
    """Refuse an opened (not yet decoded) image over the pixel or memory limit.

    Raises:
        ImageError: more than ``policy.max_pixels`` pixels, or :func:`image_memory` over ``policy.max_memory``.
    """
    width, height = image.size
    if width * height > policy.max_pixels:
        raise ImageError(f"{param}: the image is {width}x{height} pixels, more than the limit of "
                         f"{policy.max_pixels} pixels", param)
    needed = image_memory(width, height, image.mode)
    if needed > policy.max_memory:
        raise ImageError(f"{param}: the {width}x{height} {image.mode} image would take {needed / 2**20:.0f} MiB to "
                         f"decode and preprocess, more than the limit of {policy.max_memory / 2**20:.0f} MiB "
                         "(--max-image-memory)", param)


def decode_image_bytes(data: bytes, param: str, policy: ImagePolicy, formats: tuple[str, ...]) -> Image.Image:
    """Open and fully decode an encoded image received in a request.

    Raises:
        ImageError: over the size limits, not an image of ``formats``, or corrupt.
    """
    if len(data) > policy.max_bytes:
        raise ImageError(f"{param}: the image has {len(data)} bytes, more than the limit of {policy.max_bytes}", param)
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))
        check_budget(image, param, policy)     # from the header: nothing is decoded yet
        image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{param}: the data is not a {'/'.join(formats)} image", param) from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{param}: the image is too large: {exc}", param) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{param}: the image is truncated or corrupt: {exc}", param) from None
    return to_8bit(image)   # 16-bit greyscale scaled by its range, as `run` does (not clipped to white)


def _data_url(url: str, param: str, policy: ImagePolicy) -> Image.Image:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise ImageError(f"{param}: a data URL must look like data:image/png;base64,<data>", param)
    fields = [f.strip().lower() for f in header.split(";")]
    media_type = fields[0]
    if media_type not in FORMATS:
        raise ImageError(f"{param}: data URL of type {media_type or 'text/plain'!r}; expected one of "
                         f"{', '.join(sorted(set(FORMATS) - {'image/jpg'}))}", param)
    if "base64" not in fields[1:]:
        raise ImageError(f"{param}: the data URL must be base64-encoded (data:{media_type};base64,...)", param)
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise ImageError(f"{param}: the image is larger than the limit of {policy.max_bytes} bytes", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{param}: the data URL's payload is not valid base64", param) from None
    return decode_image_bytes(data, param, policy, (FORMATS[media_type],))


def _file_url(url: str, param: str, policy: ImagePolicy) -> Image.Image:
    if policy.image_root is None:
        raise ImageError(f"{param}: file:// images are refused; start the server with --image-root DIR to allow "
                         "files under DIR", param)
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ImageError(f"{param}: file:// URL with host {parsed.netloc!r}; expected file:///absolute/path", param)
    root = policy.image_root.resolve()
    path = Path(urllib.parse.unquote(parsed.path)).resolve()
    if not path.is_relative_to(root):
        raise ImageError(f"{param}: {str(path)!r} is outside the --image-root {str(root)!r}", param)
    try:
        with Image.open(path) as probe:    # the header only
            check_budget(probe, param, policy)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        pass                               # load_image names what is wrong
    try:
        return load_image(path)
    except HimapError as exc:
        raise ImageError(f"{param}: {exc}", param) from None


async def _remote_url(url: str, param: str, policy: ImagePolicy) -> Image.Image:
    if not policy.allow_remote:
        raise ImageError(f"{param}: remote images are refused; send the image as a data: URL, or start the server "
                         "with --allow-remote-images", param)
    import httpx

    chunks, size = [], 0
    try:
        async with httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=True,
                                     max_redirects=MAX_REDIRECTS) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise ImageError(f"{param}: fetching {url!r} answered HTTP {response.status_code}", param)
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > policy.max_bytes:
                        raise ImageError(f"{param}: the image at {url!r} is larger than the limit of "
                                         f"{policy.max_bytes} bytes", param)
                    chunks.append(chunk)
    except httpx.TimeoutException:
        raise ImageError(f"{param}: fetching {url!r} took longer than {policy.timeout_s:g} s", param) from None
    except httpx.HTTPError as exc:
        raise ImageError(f"{param}: cannot fetch {url!r}: {exc}", param) from None
    return await to_thread.run_sync(decode_image_bytes, b"".join(chunks), param, policy,
                                    tuple(sorted(set(FORMATS.values()))))


async def open_image_url(url: str, param: str, policy: ImagePolicy) -> Image.Image:
    """The decoded image an ``image_url`` points at.

    Args:
        url: the part's ``image_url.url``.
        param: the request field, for error messages (``messages[0].content[1].image_url.url``).
        policy: the server's limits.

    Raises:
        ImageError: any URL that is refused, unreachable, too large, or not an image.

    Decoding runs in a worker thread, so the event loop keeps serving.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return await to_thread.run_sync(_data_url, url, param, policy)
    if scheme == "file":
        return await to_thread.run_sync(_file_url, url, param, policy)
    if scheme in ("http", "https"):
        return await _remote_url(url, param, policy)
    raise ImageError(f"{param}: unsupported image URL scheme {scheme or url[:20]!r}; expected data:, file:// or "
                     "http(s)://", param)
