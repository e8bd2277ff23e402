"""Video inputs for the Qwen families: decoding (PyAV), frame sampling, frame lists, and a short
offline test clip of moving shapes.

A :class:`Video` is the frames a prompt sees (RGB PIL images, in order) and the time of each
(seconds from the clip's start). It is what ``prepare_batch`` of a Qwen family accepts in place of
an image (:mod:`himap_trt.arch.qwen2_5_vl`); how frames become visual tokens is the family's.

Sampling (:func:`sample_indices`), as transformers' Qwen video processors sample: ``n = round(duration
· fps)`` frames, at most ``max_frames``, at least 2, rounded down to an even count (Qwen's temporal
patches hold 2 frames), spread evenly over the clip (``linspace`` over the decoded frames,
rounded), so a long clip is covered end to end rather than truncated. Never more distinct frames
than the clip has: a clip shorter than ``n`` frames (a frame rate below ``--video-fps``, a
``--video-fps`` above the clip's rate, a 1-frame clip) gives all its frames, rounded down to an
even count; a 1-frame clip gives its frame twice (one temporal patch, as transformers pads).

Limits are checked on every frame as it is decoded, not only on the container's header (a stream
can change frame size mid-stream): see :func:`load_video`.

Decoding is PyAV's (FFmpeg); nothing here parses a container or codec itself.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from himap_trt.data.shapes import random_scene, render
from himap_trt.errors import HimapError
from himap_trt.prompt import load_image

#: Defaults of ``--video-fps`` (frames per second sampled) and ``--max-frames``.
DEFAULT_FPS = 2.0
DEFAULT_MAX_FRAMES = 16
#: A request's frames are refused above this (the server's and CLI's hard limit).
FRAME_LIMIT = 256
#: A video with more frames than this is refused (decoding each costs CPU even when dropped: ~10 minutes at 30 fps).
DECODE_LIMIT = 18_000


@dataclass(frozen=True)
class Video:
    """Frames of one prompt's video.

    Attributes:
        frames: RGB images, all the same size, an even number >= 2.
        times: [len(frames)] seconds from the clip's start of each frame.
        fps: the rate the frames were sampled at (frames per second): Qwen2.5-VL's
            ``second_per_grid_ts`` = temporal_patch_size / fps.
        source: where they came from (messages).
    """

    frames: tuple[Image.Image, ...]
    times: tuple[float, ...]
    fps: float
    source: str = "the video"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every frame (px)."""
        return self.frames[0].size


def _check_sampling(fps: float, max_frames: int) -> None:
    if not (fps > 0 and np.isfinite(fps)):
        raise HimapError(f"--video-fps must be a positive number of frames per second, got {fps}")
    if not 2 <= max_frames <= FRAME_LIMIT:
        raise HimapError(f"--max-frames must be in [2, {FRAME_LIMIT}], got {max_frames}")


def sample_indices(total: int, source_fps: float, fps: float, max_frames: int) -> list[int]:
    """Which of ``total`` decoded frames (at ``source_fps``) to keep (see the module docstring).

    Distinct and increasing: never more indices than the clip has frames. ``round(duration · fps)``
    capped at ``max_frames`` and at ``total``, at least 2 (1 for a 1-frame clip), then rounded down to
    an even count; a clip of fewer frames than that gives all of them (an odd count is padded later by
    repeating the last frame, see :func:`load_video`).

    Raises:
        HimapError: fewer than one decoded frame.
    """
    if total < 1:
        raise HimapError("the video has no frames")
    wanted = int(round(total / source_fps * fps))
    count = min(total, max(2, min(max_frames, wanted)))
    if count > 1:
        count -= count % 2
    indices = [int(round(i)) for i in np.linspace(0, total - 1, count)]
    assert len(set(indices)) == len(indices), indices   # linspace steps are >= 1 when count <= total
    return indices


def frame_memory(width: int, height: int) -> int:
    """Memory one kept frame takes at its peak (bytes): the RGB image plus the float32 RGB copy the
    image processors make (the same estimate as the server's images, 3 + 12 bytes per pixel)."""
    return width * height * (3 + 3 * 4)


def _check_frame(label: str, index: int, size: tuple[int, int], header: tuple[int, int],
                 max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        said = "" if size == header else f" (its header said {header[0]}x{header[1]})"
        raise HimapError(f"{label}: frame {index} is {width}x{height} px{said}, over the limit of {max_pixels} "
                         "pixels per frame")


def _decoded(container, label: str, header: tuple[int, int], max_pixels: int | None):
    """Yield ``(index, frame)`` for every frame of the first video stream, each checked against
    ``max_pixels`` as decoded. FFmpeg's own ``max_pixels`` decoder option is set too, so a frame
    over the limit is refused inside the decoder before its buffers are allocated (a 6000x6000
    frame's would take ~100 MB); that refusal is reported as the size, not as a corrupt file."""
    import av

    stream = container.streams.video[0]
    if max_pixels is not None:
        stream.codec_context.options = {**stream.codec_context.options, "max_pixels": str(max_pixels)}
    index = 0
    try:
        for frame in container.decode(stream):
            _check_frame(label, index, (frame.width, frame.height), header, max_pixels)
            yield index, frame
            index += 1
    except av.error.FFmpegError:
        size = (stream.codec_context.width, stream.codec_context.height)
        _check_frame(label, index, size, header, max_pixels)     # the decoder refused a frame over the limit
        raise


def load_video(path: str | Path | bytes, *, fps: float = DEFAULT_FPS, max_frames: int = DEFAULT_MAX_FRAMES,
               name: str | None = None, max_pixels: int | None = None, max_memory: int | None = None) -> Video:
    """Decode a video file (or its bytes) with PyAV and sample its frames.

    Two passes, so memory stays bounded by the frames kept whatever the clip's length: the first
    decodes every frame only for its time and size (each frame is dropped at once; at most
    :data:`DECODE_LIMIT` frames), the second converts just the sampled frames to images.

    Every decoded frame is checked as it is decoded, whatever the container's header says (a stream
    may change frame size mid-stream, e.g. two clips joined): its pixels against ``max_pixels`` in
    both passes, and the kept frames' own sizes against ``max_memory`` before any becomes an image.
    Kept frames of different sizes are refused (a :class:`Video`'s frames share one size). A clip of
    fewer frames than sampling asks for gives all its frames; an odd count is padded by repeating the
    last frame (as transformers pads a temporal patch), so a 1-frame clip gives 2 equal frames.

    Args:
        path: a file path, or the file's bytes (the server's data URLs).
        fps: frames per second to sample (``--video-fps``).
        max_frames: most frames kept (``--max-frames``).
        name: what to call it in messages (default: the path).
        max_pixels: refuse any frame larger than this (width x height): from the header before
            decoding, then each frame as it is decoded.
        max_memory: refuse a clip whose kept frames would take more than this (bytes,
            :func:`frame_memory` of each kept frame's decoded size), before converting any frame to
            an image.

    Raises:
        HimapError: not a readable video (one line naming it), no video stream, no frames, more than
            :data:`DECODE_LIMIT` frames, a frame over ``max_pixels``, kept frames over ``max_memory``
            or of different sizes.
    """
    import av

    _check_sampling(fps, max_frames)
    label = name or (str(path) if not isinstance(path, bytes) else "the video")

    def source():
        return io.BytesIO(path) if isinstance(path, bytes) else str(path)

    try:
        with av.open(source(), mode="r") as container:
            if not container.streams.video:
                raise HimapError(f"{label} holds no video stream")
            stream = container.streams.video[0]
            header = (stream.codec_context.width, stream.codec_context.height)
            if max_pixels is not None and header[0] * header[1] > max_pixels:
                raise HimapError(f"{label}: frames of {header[0]}x{header[1]} px exceed the limit of {max_pixels} "
                                 "pixels per frame")
            times, sizes = [], []
            for _, frame in _decoded(container, label, header, max_pixels):
                if len(times) == DECODE_LIMIT:
                    raise HimapError(f"{label}: more than {DECODE_LIMIT} frames (the most a video may hold here)")
                times.append(float(frame.time or 0.0))
                sizes.append((frame.width, frame.height))
                del frame
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        if not times:
            raise HimapError(f"{label} has no frames")
        if rate is None:
            span = times[-1] - times[0]
            rate = (len(times) - 1) / span if span > 0 else 1.0
        keep = sample_indices(len(times), rate, fps, max_frames)
        kept_sizes = sorted({sizes[i] for i in keep})
        if len(kept_sizes) > 1:
            first = next(i for i in keep if sizes[i] != sizes[keep[0]])
            raise HimapError(f"{label}: the frames change size mid-stream ({sizes[keep[0]][0]}x{sizes[keep[0]][1]} px "
                             f"at frame {keep[0]}, {sizes[first][0]}x{sizes[first][1]} px at frame {first}); "
                             "give a clip of one frame size")
        memory = sum(frame_memory(*sizes[i]) for i in keep)
        if max_memory is not None and memory > max_memory:
            width, height = sizes[keep[0]]
            raise HimapError(f"{label}: {len(keep)} frames of {width}x{height} px would take "
                             f"{memory / 2**20:.1f} MiB to decode and preprocess, "
                             f"more than the limit of {max_memory / 2**20:.1f} MiB (--max-image-memory)")
        wanted, images = set(keep), {}
        with av.open(source(), mode="r") as container:
            for index, frame in _decoded(container, label, header, max_pixels):
                if index < len(sizes) and (frame.width, frame.height) != sizes[index]:
                    raise HimapError(f"{label}: decoding again gave frame {index} as {frame.width}x{frame.height} px, "
                                     f"not {sizes[index][0]}x{sizes[index][1]}")
                if index in wanted:
                    images[index] = frame.to_image().convert("RGB")
                del frame
                if index >= keep[-1]:
                    break
    except HimapError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise HimapError(f"{label} is not a readable video: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if len(images) != len(keep):
        raise HimapError(f"{label}: decoding again gave {len(images)} of the {len(keep)} sampled frames")
    frames = [images[i] for i in keep]
    stamps = [times[i] - times[0] for i in keep]
    if len(frames) % 2:             # a 1-frame clip (the only odd count sample_indices gives)
        frames.append(frames[-1])
        stamps.append(stamps[-1])
    effective = min(fps, rate)
    return Video(tuple(frames), tuple(stamps), effective, label)


def frames_video(images: list[Image.Image], *, fps: float = DEFAULT_FPS, max_frames: int = DEFAULT_MAX_FRAMES,
                 source: str = "the frames") -> Video:
    """A video from a list of frames taken ``1/fps`` seconds apart (``--frames a.png b.png ...``).

    An odd count repeats the last frame (as transformers pads a temporal patch).

    Raises:
        HimapError: no frames, more than ``max_frames``, or frames of different sizes.
    """
    _check_sampling(fps, max_frames)
    if not images:
        raise HimapError(f"{source}: zero frames given; a video needs at least one")
    if len(images) > max_frames:
        raise HimapError(f"{source}: {len(images)} frames, more than --max-frames {max_frames}")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise HimapError(f"{source}: frames have different sizes {sorted(sizes)}; give frames of one size")
    frames = [im.convert("RGB") for im in images]
    if len(frames) % 2:
        frames.append(frames[-1])
    return Video(tuple(frames), tuple(i / fps for i in range(len(frames))), fps, source)


def moving_shapes_clip(path: str | Path, *, frames: int = 16, fps: int = 8, size: int = 96, seed: int = 0) -> Path:
    """Write a short MP4 (H.264 via PyAV, yuv420p) of shapes from :mod:`himap_trt.data.shapes`
    moving across a scene: a test clip made offline.

    Args:
        path: where to write (``.mp4``).
        frames: number of frames; fps: frames per second of the file; size: width = height (px,
            even); seed: the scene.

    Returns:
        ``path``.
    """
    import av

    rng = np.random.default_rng(seed)
    scene = random_scene(rng, num_shapes=3)
    velocities = rng.integers(-3, 4, size=(len(scene.shapes), 2))
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for t in range(frames):
            moved = tuple(type(s)(s.kind, s.color, int(np.clip(s.x + t * vx, 0, 96 - s.size)),
                                  int(np.clip(s.y + t * vy, 0, 96 - s.size)), s.size)
                          for s, (vx, vy) in zip(scene.shapes, velocities))
            image = render(type(scene)(scene.background, moved)).resize((size, size))
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def mpegts_clip(width: int, height: int, frames: int, *, fps: int = 8, shade: int = 0) -> bytes:
    """The bytes of an MPEG-TS clip (H.264 via PyAV, ultrafast) of ``frames`` flat grey frames of
    ``width`` x ``height`` px, each a different shade: a test input. MPEG-TS streams can be joined by
    concatenating their bytes (``cat a.ts b.ts``), which gives one stream whose frame size changes
    where the second clip starts, while its header keeps the first clip's size.
    """
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "30"}
        for t in range(frames):
            pixels = np.full((height, width, 3), (shade + 9 * t) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def video_request(video: str | Path | None, frames: list | None, *, fps: float = DEFAULT_FPS,
                  max_frames: int = DEFAULT_MAX_FRAMES) -> Video | None:
    """The :class:`Video` of ``himap-trt run --video FILE`` or ``--frames A --frames B ...`` (None if neither).

    Raises:
        HimapError: both given, a missing/unreadable file, zero or too many frames, bad sampling flags.
    """
    if video is not None and frames:
        raise HimapError("pass either --video FILE or --frames IMAGE ..., not both")
    if video is not None:
        if not Path(video).is_file():
            raise HimapError(f"--video {str(video)!r} is not a file")
        return load_video(video, fps=fps, max_frames=max_frames, name=f"--video {str(video)!r}")
    if frames:
        _check_sampling(fps, max_frames)
        if len(frames) > max_frames:
            raise HimapError(f"--frames: {len(frames)} frames, more than --max-frames {max_frames}")
        images = []
        for path in frames:
            try:
                images.append(load_image(path))
            except HimapError as exc:
                raise HimapError(f"--frames: {exc}") from None
        return frames_video(images, fps=fps, max_frames=max_frames, source="--frames")
    return None
