"""Soak test of `himap-trt serve`: many requests at a fixed concurrency, with malformed requests and
clients that disconnect mid-stream mixed in; checks answers, statuses, slots and memory.

    himap-trt export --model medium --out export-medium
    python benchmarks/serve_soak.py --export-dir export-medium --requests 500 --concurrency 8

Starts the server itself (a subprocess on a free loopback port) so it can read its RSS. Request i is
- malformed when i % 10 == 9 (10%): invalid JSON, no image, a data URL that is not an image, n=2,
  an unknown model, a prompt over max_seq_len, a body over --max-body-bytes, a string for an integer
  or a boolean, a seed over 64 bits, JSON nested 100,000 deep, a 1.5 MB question (refused by its
  bytes before tokenizing), a 7000x7000 PNG (refused from its header); expected 400 / 413;
- a client that disconnects after two chunks when i % 20 == 4 (5%);
- otherwise good (streamed or not, alternately), greedy, one of four (image, question) prompts; its
  tokens must equal the same prompt run alone in this process (`Pipeline.generate`).
Then: every slot free, no request running or queued, cancelled == disconnects, every accepted
request finished in the engine (finished == good + disconnected), and RSS at the end <= RSS after
the first 50 requests + 10%; the server's RSS is sampled every 0.2 s (peak reported). Prints a JSON
report; exit 1 on a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from himap_trt.serve.bench import stream_request, wait_healthy

MAX_BODY = 2_000_000


def bomb_url() -> str:
    """A 7000x7000 PNG of one colour (~160 KB encoded, 147 MB decoded)."""
    buffer = io.BytesIO()
    Image.new("RGB", (7000, 7000), (40, 80, 120)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def small_url() -> str:
    """An 8x8 PNG (so that a 1.5 MB question stays under the body limit)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


BOMB = None
SMALL = small_url()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def metric(base: str, name: str, labels: str = "") -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else "") + " "):
            return float(line.split()[-1])
    return 0.0


def prompts(photo: Image.Image):
    out = []
    for image, fmt, question in ((photo, "JPEG", "What is shown?"), (photo.rotate(90), "PNG", "Describe it."),
                                 (photo.convert("L"), "PNG", "Who is this person, and what is she wearing?"),
                                 (photo.resize((200, 260)), "WEBP", "What colour is the background?")):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        data = buffer.getvalue()
        out.append((f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode(),
                    Image.open(io.BytesIO(data)), question))
    return out


def malformed(k: int, model: str, url: str) -> tuple[dict, int]:
    """(httpx request kwargs, expected status) of malformed request number k."""
    def msgs(image_url, question="What?"):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                             {"type": "text", "text": question}]}]
    kinds = [
        ({"content": b'{"model": "x", "messages": [', "headers": {"content-type": "application/json"}}, 400),
        ({"json": {"model": model, "messages": [{"role": "user", "content": "no image"}]}}, 400),
        ({"json": {"model": model, "messages": msgs("data:image/png;base64," + base64.b64encode(b"nope").decode())}},
         400),
        ({"json": {"model": model, "messages": msgs(url), "n": 2}}, 400),
        ({"json": {"model": "not-" + model, "messages": msgs(url)}}, 400),
        ({"json": {"model": model, "messages": msgs(url, "why? " * 600)}}, 400),
        ({"json": {"model": model, "messages": msgs("data:image/png;base64," + "A" * MAX_BODY)}}, 413),
        ({"json": {"model": model, "messages": msgs(url), "max_tokens": "5"}}, 400),
        ({"json": {"model": model, "messages": msgs(url), "stream": "true"}}, 400),
        ({"json": {"model": model, "messages": msgs(url), "seed": 2**64}}, 400),
        ({"content": b"[" * 100_000, "headers": {"content-type": "application/json"}}, 400),
        ({"json": {"model": model, "messages": msgs(SMALL, "x" * 1_500_000)}}, 400),
        ({"json": {"model": model, "messages": msgs(BOMB)}}, 400),
    ]
    return kinds[k % len(kinds)]


async def soak(base: str, model: str, cases, expected, args, pid: int) -> dict:
    url = f"{base}/v1/chat/completions"
    semaphore = asyncio.Semaphore(args.concurrency)
    done = 0
    rss_at_50 = None
    peak = {"rss": rss_bytes(pid)}
    failures: list[str] = []

    async def sample():
        while True:
            peak["rss"] = max(peak["rss"], rss_bytes(pid))
            await asyncio.sleep(0.2)
    counts = {"good": 0, "malformed": 0, "disconnected": 0}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=args.concurrency)) as client:
        async def one(i: int):
            nonlocal done, rss_at_50
            async with semaphore:
                image_url, _, question = cases[i % len(cases)]
                body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0, "return_token_ids": True,
                        "messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]}]}
                if i % 10 == 9:
                    counts["malformed"] += 1
                    kwargs, status = malformed(i // 10, model, image_url)
                    response = await client.post(url, **kwargs)
                    if response.status_code != status or "error" not in response.json():
                        failures.append(f"request {i}: expected {status}, got {response.status_code} {response.text[:200]}")
                elif i % 20 == 4:
                    counts["disconnected"] += 1
                    result = await stream_request(client, url, {**body, "stream": True, "ignore_eos": True,
                                                                "max_tokens": max(args.max_tokens, 64)},
                                                  disconnect_after=2)
                    if result.error != "disconnected on purpose":
                        failures.append(f"request {i}: the disconnecting client got {result.status} {result.error}")
                else:
                    counts["good"] += 1
                    want = expected[i % len(cases)]
                    if i % 2:
                        response = await client.post(url, json=body)
                        got = response.json().get("himap", {}).get("token_ids") if response.status_code == 200 else None
                        if got != want["ids"]:
                            failures.append(f"request {i}: {response.status_code} tokens {got} != {want['ids']}")
                    else:
                        result = await stream_request(client, url, {**body, "stream": True})
                        if not result.ok or result.text != want["text"]:
                            failures.append(f"request {i}: streamed {result.text!r} != {want['text']!r} ({result.error})")
                done += 1
                if done == 50:
                    rss_at_50 = rss_bytes(pid)

        start = time.perf_counter()
        sampler = asyncio.ensure_future(sample())
        await asyncio.gather(*(one(i) for i in range(args.requests)))
        sampler.cancel()
        duration = time.perf_counter() - start
    return {"duration_s": duration, "counts": counts, "failures": failures, "rss_after_50": rss_at_50,
            "rss_peak": peak["rss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=None, help="serve --max-seq-len (default: the export's)")
    args = parser.parse_args()

    from matplotlib import cbook

    from himap_trt.arch import get_architecture
    from himap_trt.manifest import load_manifest
    from himap_trt.prompt import load_image
    from himap_trt.runtime import GenerationConfig
    from himap_trt.runtime.loader import open_pipeline

    global BOMB
    BOMB = bomb_url()
    model = load_manifest(args.export_dir, families=get_architecture).source_model
    photo = load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    cases = prompts(photo)
    pipeline = open_pipeline(export_dir=args.export_dir, backend="onnxruntime", device="cpu").pipeline
    expected = []
    for _, image, question in cases:
        result = pipeline.generate(pipeline.prepare([image], [question]), GenerationConfig(max_new_tokens=args.max_tokens))
        expected.append({"ids": result.tokens[0], "text": result.texts[0]})
    pipeline.close()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "himap_trt.cli", "serve", "--export-dir", str(args.export_dir),
                               "--port", str(port), "--max-batch", str(args.concurrency), "--max-queue", "64",
                               "--max-body-bytes", str(MAX_BODY), "--log-level", "warning",
                               *(["--max-seq-len", str(args.max_seq_len)] if args.max_seq_len else [])])
    try:
        wait_healthy(base, server)
        rss_start = rss_bytes(server.pid)
        report = asyncio.run(soak(base, model, cases, expected, args, server.pid))
        time.sleep(0.5)
        report.update({
            "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
            "rss_start": rss_start, "rss_end": rss_bytes(server.pid),
            "free_slots": metric(base, "himap_free_slots"), "running": metric(base, "himap_running_requests"),
            "queue": metric(base, "himap_queue_length"),
            "cancelled": metric(base, "himap_requests_total", 'finish_reason="cancelled"'),
            "finished": sum(metric(base, "himap_requests_total", f'finish_reason="{r}"')
                            for r in ("stop", "length", "cancelled", "error")),
            "load_average": os.getloadavg(),
        })
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    checks = {
        "answers and statuses": not report["failures"],
        "slots free": report["free_slots"] == args.concurrency and report["running"] == 0 and report["queue"] == 0,
        "cancelled == disconnected": report["cancelled"] == report["counts"]["disconnected"],
        "every accepted request finished": report["finished"] == report["counts"]["good"]
        + report["counts"]["disconnected"],
        "rss_end <= rss_after_50 * 1.1": report["rss_end"] <= report["rss_after_50"] * 1.1,
    }
    report["checks"] = checks
    report["failures"] = report["failures"][:20]
    print(json.dumps(report, indent=1))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
