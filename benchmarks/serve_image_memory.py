"""Server memory for four 7000x7000 PNGs (~210 KB each) sent at once, where the image budget lets them in.

    python benchmarks/serve_image_memory.py --export-dir export-tiny -- --max-image-memory 1000000000
    python benchmarks/serve_image_memory.py --export-dir export-tiny --repo ../main     # another checkout

Starts ``REPO/.venv/bin/himap-trt serve`` (REPO: this checkout by default; another one, e.g. main,
to compare) on a free loopback port with the serve flags after ``--``, sends the four requests
concurrently (max_tokens 2), and prints one JSON line: statuses, the server's peak RSS growth
(VmHWM minus VmRSS before, MB) and the RSS still held one second after the answers (MB).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from himap_trt.serve.bench import wait_healthy


def status_mb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"no {key}")


def png_url(size: int) -> str:
    """A size x size RGB PNG of diagonal stripes (compresses to ~210 KB at 7000)."""
    pixels = (np.indices((size, size)).sum(0) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, required=True)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--size", type=int, default=7000)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("serve_args", nargs="*")
    args = parser.parse_args()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(args.repo / ".venv/bin/himap-trt"), "serve", "--export-dir",
                               str(args.export_dir.resolve()), "--port", str(port), "--log-level", "warning",
                               "--max-batch", "4", *args.serve_args], cwd=args.repo, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(base, server)
        url = png_url(args.size)
        body = {"model": json.loads((args.export_dir / "manifest.json").read_text())["source_model"],
                "max_tokens": 2, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]}]}
        before = status_mb(server.pid, "VmRSS")

        async def send():
            async with httpx.AsyncClient(timeout=600) as client:
                return await asyncio.gather(*(client.post(f"{base}/v1/chat/completions", json=body)
                                              for _ in range(args.images)))

        started = time.perf_counter()
        responses = asyncio.run(send())
        wall = time.perf_counter() - started
        time.sleep(1)
        print(json.dumps({
            "repo": str(args.repo), "encoded_kb": len(url) * 3 // 4 // 1024,
            "statuses": [r.status_code for r in responses], "wall_s": round(wall, 1), "rss_before_mb": before,
            "peak_growth_mb": status_mb(server.pid, "VmHWM") - before,
            "held_after_mb": status_mb(server.pid, "VmRSS") - before, "load_average": os.getloadavg()}))
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
