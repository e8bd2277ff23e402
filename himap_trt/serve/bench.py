"""``himap-trt bench-serve``: a load generator for any OpenAI-compatible chat-completions endpoint.

For each concurrency level c, ``requests`` streamed requests are sent with at most c in flight
(a closed loop, as ``vllm bench serve --max-concurrency``). Per request, from the client's clock:

- TTFT: request sent -> first chunk carrying answer content (not the role chunk; its text may be
  empty, as servers stream tokens whose text is not complete yet);
- ITL: time between successive content chunks;
- TPOT: (E2E - TTFT) / (output tokens - 1);
- E2E: request sent -> ``data: [DONE]``;

output tokens from the final ``usage`` chunk (``stream_options.include_usage``), else the number
of text chunks. Per level: mean / p50 / p99 of each (milliseconds), requests/s and output tokens/s
over the level's wall time.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from himap_trt.errors import HimapError
from himap_trt.prompt import load_image


@dataclass
class RequestResult:
    """One request as the client saw it (times in seconds)."""

    ok: bool
    status: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    text: str = ""
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def image_data_url(path: Path | None) -> str:
    """A ``data:`` URL of the image file at ``path`` (PNG or JPEG as found), or of a deterministic
    336x336 gradient PNG when ``path`` is None.

    Raises:
        HimapError: the file is missing or not an image.
    """
    from PIL import Image

    if path is None:
        ramp = np.linspace(0, 255, 336, dtype=np.uint8)
        pixels = np.stack([np.tile(ramp, (336, 1)), np.tile(ramp[:, None], (1, 336)),
                           np.full((336, 336), 128, np.uint8)], axis=-1)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    image = load_image(path)
    mime = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}.get(image.format)
    data = Path(path).read_bytes()
    if mime is None:    # another format: re-encode as PNG
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        mime, data = "image/png", buffer.getvalue()
    return f"data:{mime};base64," + base64.b64encode(data).decode()


#: MIME types of the video files ``bench-serve --video`` sends, by suffix.
VIDEO_TYPES = {".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime", ".mkv": "video/x-matroska"}


def check_video_file(path: Path) -> str:
    """The MIME type of the video file at ``path``.

    Raises:
        HimapError: a missing file or a suffix other than .mp4, .webm, .mov, .mkv.
    """
    kind = VIDEO_TYPES.get(Path(path).suffix.lower())
    if kind is None:
        raise HimapError(f"--video {str(path)!r}: expected a {', '.join(VIDEO_TYPES)} file")
    if not Path(path).is_file():
        raise HimapError(f"--video {str(path)!r} does not exist")
    return kind


def video_data_url(path: Path) -> str:
    """A ``data:video/...;base64,`` URL of the video file at ``path`` (:func:`check_video_file`'s errors)."""
    return f"data:{check_video_file(path)};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def chat_body(model: str, image_url: str, prompt: str, max_tokens: int, *, ignore_eos: bool,
              temperature: float = 0.0, video: dict | None = None) -> dict:
    """A streamed chat-completions request with one image (or, with ``video`` = the ``video_url``
    object: ``url`` plus any of ``fps``, ``max_frames``, ``evs_rate``, one video) and one question."""
    part = ({"type": "video_url", "video_url": video} if video is not None
            else {"type": "image_url", "image_url": {"url": image_url}})
    body = {
        "model": model, "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": max_tokens, "temperature": temperature,
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": prompt}]}],
    }
    if ignore_eos:
        body["ignore_eos"] = True
    return body


async def stream_request(client, url: str, body: dict, headers: dict | None = None,
                         disconnect_after: int | None = None) -> RequestResult:
    """Send one streamed request and time it.

    Args:
        client: an ``httpx.AsyncClient``.
        url: the chat-completions URL.
        body: the JSON body (``stream`` true).
        headers: extra headers (authorization).
        disconnect_after: close the connection after this many text chunks (a client that goes away).
    """
    import httpx

    result = RequestResult(ok=False)
    start = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:500]
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    result.ok = result.error is None
                    break
                event = json.loads(payload)
                if "error" in event:
                    result.error = event["error"].get("message", str(event["error"]))
                    continue
                if event.get("usage"):
                    result.output_tokens = int(event["usage"].get("completion_tokens", 0))
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text = delta.get("content")
                    if text is not None and not delta.get("role"):   # a token's chunk (text may be empty)
                        now = time.perf_counter()
                        if result.ttft_s is None:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        chunks += 1
                        result.text += text
                if disconnect_after is not None and chunks >= disconnect_after:
                    result.error = "disconnected on purpose"
                    return result
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e_s = time.perf_counter() - start
    if not result.output_tokens:
        result.output_tokens = chunks
    return result


def _summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ms = np.asarray(values) * 1e3
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def summarize(concurrency: int, results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    """Per-level figures: latencies in ms (mean/p50/p99), requests/s, output tokens/s."""
    good = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in good)
    return {
        "concurrency": concurrency, "requests": len(results), "completed": len(good),
        "failed": len(results) - len(good), "duration_s": duration_s,
        "request_throughput": len(good) / duration_s if duration_s else 0.0,
        "output_throughput": tokens / duration_s if duration_s else 0.0,
        "output_tokens": tokens,
        "ttft_ms": _summary([r.ttft_s for r in good if r.ttft_s is not None]),
        "tpot_ms": _summary([r.tpot_s for r in good if r.tpot_s is not None]),
        "itl_ms": _summary([d for r in good for d in r.itl_s]),
        "e2e_ms": _summary([r.e2e_s for r in good if r.e2e_s is not None]),
        "errors": sorted({f"{r.status}: {r.error}" for r in results if not r.ok})[:5],
    }


def read_conversations(path: Path) -> list[list[dict]]:
    """``bench-serve --conversations FILE``: JSONL, one conversation per line (OpenAI's ``messages`` array,
    or an object holding one), sent in turn (request i takes line i modulo their number).

    Raises:
        HimapError: the file missing, unreadable, empty, or a line that is not a conversation (naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise HimapError(f"--conversations {str(path)!r} does not exist or is not a regular file")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HimapError(f"{path}:{number}: not JSON ({exc.msg})") from None
        messages = value.get("messages") if isinstance(value, dict) else value
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise HimapError(f"{path}:{number}: expected a non-empty array of messages (or an object with \"messages\")")
        out.append(messages)
    if not out:
        raise HimapError(f"--conversations {str(path)!r} holds no conversations")
    return out


async def run_level(url: str, body: dict | list[dict], concurrency: int, requests: int, *,
                    headers: dict | None = None, timeout_s: float = 600.0) -> tuple[list[RequestResult], float]:
    """``requests`` requests with at most ``concurrency`` in flight; (results, wall seconds). ``body``: one
    body for every request, or a list taken in turn (request i: ``body[i % len(body)]``)."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        semaphore = asyncio.Semaphore(concurrency)

        bodies = body if isinstance(body, list) else [body]

        async def one(i):
            async with semaphore:
                return await stream_request(client, url, bodies[i % len(bodies)], headers)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(requests)))
        return list(results), time.perf_counter() - start


async def first_model(base_url: str, headers: dict | None = None, timeout_s: float = 30.0) -> str:
    """The first id ``GET /v1/models`` lists.

    Raises:
        HimapError: the endpoint cannot be reached or lists no model.
    """
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(f"{base_url}/v1/models", headers=headers)
            response.raise_for_status()
            return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise HimapError(f"--url {base_url!r}: cannot list models (GET /v1/models): {exc}; pass --model") from None


def wait_healthy(base_url: str, process, timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
    """Block until ``GET {base_url}/health`` answers 200 (a `himap-trt serve` started as ``process``).

    Args:
        base_url: the server's root, e.g. ``http://127.0.0.1:8000``.
        process: the server's ``subprocess.Popen``; its exit ends the wait.
        timeout_s: most seconds to wait. poll_s: seconds between probes.

    Raises:
        SystemExit: the server exited or was not ready within ``timeout_s`` (benchmark scripts stop).
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base_url}/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit("the server did not start")
        time.sleep(poll_s)


def benchmark(base_url: str, concurrencies: list[int], requests: int, *, model: str | None, image: Path | None,
              prompt: str, max_tokens: int, ignore_eos: bool, warmup: int, api_key: str | None,
              timeout_s: float, progress=None, conversations: list[list[dict]] | None = None,
              video: Path | None = None, video_fields: dict | None = None) -> dict[str, Any]:
    """Run every concurrency level; returns ``{"setup": ..., "levels": [summarize(...), ...]}``.
    ``conversations``: varied requests (:func:`read_conversations`) instead of one image and prompt.
    ``video``: send this video file instead of the image, with ``video_fields`` (``fps``,
    ``max_frames``, ``evs_rate``) in its ``video_url``."""
    base_url = base_url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[:-3]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    url = f"{base_url}/v1/chat/completions"
    model = model or asyncio.run(first_model(base_url, headers))
    if conversations:
        body = [{**chat_body(model, "", "", max_tokens, ignore_eos=ignore_eos), "messages": messages}
                for messages in conversations]
    else:
        clip = None if video is None else {"url": video_data_url(video), **(video_fields or {})}
        body = chat_body(model, "" if clip else image_data_url(image), prompt, max_tokens, ignore_eos=ignore_eos,
                         video=clip)
    if warmup:
        results, _ = asyncio.run(run_level(url, body, 1, warmup, headers=headers, timeout_s=timeout_s))
        bad = [r for r in results if not r.ok]
        if bad:
            raise HimapError(f"--url {base_url!r}: the warm-up request failed: HTTP {bad[0].status}: {bad[0].error}")
    levels = []
    for concurrency in concurrencies:
        results, duration = asyncio.run(run_level(url, body, concurrency, requests, headers=headers,
                                                  timeout_s=timeout_s))
        levels.append(summarize(concurrency, results, duration))
        if progress is not None:
            progress(levels[-1])
    setup = {"url": base_url, "model": model, "requests": requests, "max_tokens": max_tokens, "ignore_eos": ignore_eos,
             "prompt": prompt, "image": str(image) if image else "generated 336x336 PNG"}
    if conversations:
        setup.update(prompt=None, image=None, conversations=len(conversations))
    elif video is not None:
        setup.update(image=None, video=str(video), video_fields=video_fields or {})
    return {"setup": setup, "levels": levels}


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput and latency percentiles against concurrency, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    x = [level["concurrency"] for level in levels]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    axes[0, 0].plot(x, [level["output_throughput"] for level in levels], "o-")
    axes[0, 0].set_title("output tokens/s")
    for ax, key, title in ((axes[0, 1], "ttft_ms", "TTFT (ms)"), (axes[1, 0], "tpot_ms", "TPOT (ms)"),
                           (axes[1, 1], "e2e_ms", "E2E latency (ms)")):
        for stat, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(x, [level[key][stat] if level[key][stat] is not None else np.nan for level in levels], style,
                    label=stat)
        ax.set_title(title)
        ax.legend()
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(c) for c in x])
        ax.set_xlabel("concurrency")
        ax.grid(alpha=0.3)
    setup = report["setup"]
    fig.suptitle(f"{setup['model']} at {setup['url']}: {setup['requests']} requests per level, "
                 f"max_tokens {setup['max_tokens']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def as_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)


