"""Equal-length vs mixed-length prefill in `himap-trt serve`, with varied conversations (bench-serve's
client: TTFT from the first content chunk, ITL between chunks, requests/s per level).

    himap-trt export --model tiny-qwen2.5-vl --out export-qwen
    python benchmarks/serve_mixed_prefill.py --export-dir export-qwen --requests 24 --repeats 2

Starts two servers (`--equal-prefill` and `--mixed-prefill`, same flags otherwise) on free loopback
ports. The request set is fixed (seeded): 1 to 3 user turns, 0 to 2 images (images only on Qwen
exports, else 0 or 1), questions of 2 to 40 words; streamed, `--max-tokens` tokens each with
ignore_eos. For each concurrency level and repeat, the two servers run the same requests one after
the other (the order alternates between repeats: interleaved), and the medians over repeats of
TTFT p50/p99, ITL p99 and requests/s are reported with their ratios (mixed / equal) and the load
average. JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from himap_trt.serve.bench import stream_request, summarize

WORDS = "what is shown in the picture and why does the person look at the camera with such a calm face".split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def conversations(count: int, max_images: int, max_tokens: int, seed: int = 0) -> list[dict]:
    """``count`` streamed request bodies of varied shape (seeded)."""
    rng = random.Random(seed)
    from PIL import Image

    import base64
    import io

    def image(size):
        buffer = io.BytesIO()
        Image.effect_mandelbrot(size, (-2, -1.5, 1, 1.5), 50).convert("RGB").save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    pictures = [image((112, 112)), image((140, 112)), image((84, 84))]      # 16, 20, 9 tokens on tiny Qwen
    bodies = []
    for _ in range(count):
        turns, images = rng.randint(1, 3), rng.randint(0, max_images)
        slots = sorted(rng.sample(range(turns), min(images, turns))) if images else []
        messages = [{"role": "system", "content": "Answer briefly."}] if rng.random() < 0.5 else []
        for turn in range(turns):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40))) + "?"
            content = [{"type": "text", "text": text}]
            if turn in slots:
                content.insert(0, {"type": "image_url", "image_url": {"url": rng.choice(pictures)}})
            messages.append({"role": "user", "content": content})
            if turn < turns - 1:
                messages.append({"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(8))})
        bodies.append({"model": "m", "messages": messages, "max_tokens": max_tokens, "ignore_eos": True,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    return bodies


async def level(url: str, bodies: list[dict], concurrency: int):
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(body):
            async with semaphore:
                return await stream_request(client, url, body)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(b) for b in bodies))
        return summarize(concurrency, list(results), time.perf_counter() - start)


def start(export_dir: Path, mode: str, max_batch: int, log: Path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "himap_trt.cli", "serve", "--export-dir", str(export_dir),
                             "--port", str(port), "--max-batch", str(max_batch), "--served-model-name", "m",
                             f"--{mode}-prefill", "--log-level", "warning", "--max-body-bytes", "33554432"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the {mode} server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, f"{base}/v1/chat/completions"
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"the {mode} server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    manifest = json.loads((args.export_dir / "manifest.json").read_text())
    qwen = "qwen" in json.dumps(manifest.get("architecture", manifest.get("dims", {}).get("architecture", ""))).lower()
    bodies = conversations(args.requests, 2 if qwen else 1, args.max_tokens)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    servers = {mode: start(args.export_dir, mode, args.max_batch, logs / f"mixed-prefill-{mode}.log")
               for mode in ("equal", "mixed")}
    report = {"load_average_before": os.getloadavg(), "requests": args.requests, "max_tokens": args.max_tokens,
              "levels": []}
    try:
        for concurrency in args.concurrency:
            runs = {"equal": [], "mixed": []}
            for repeat in range(args.repeats):
                order = ("equal", "mixed") if repeat % 2 == 0 else ("mixed", "equal")
                for mode in order:
                    runs[mode].append(asyncio.run(level(servers[mode][1], bodies, concurrency)))
            row = {"concurrency": concurrency, "load_average": os.getloadavg()}
            for mode, summaries in runs.items():
                assert all(s["failed"] == 0 for s in summaries), [s["errors"] for s in summaries]
                row[mode] = {
                    "ttft_p50_ms": float(np.median([s["ttft_ms"]["p50"] for s in summaries])),
                    "ttft_p99_ms": float(np.median([s["ttft_ms"]["p99"] for s in summaries])),
                    "itl_p99_ms": float(np.median([s["itl_ms"]["p99"] for s in summaries])),
                    "requests_per_s": float(np.median([s["request_throughput"] for s in summaries])),
                }
            row["ratio_mixed_over_equal"] = {k: row["mixed"][k] / row["equal"][k] for k in row["equal"]}
            report["levels"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
