"""Overload and faults of `himap-trt serve`, measured on loopback (bounded: every loop stops by itself).

    himap-trt export --model tiny --out export-tiny
    python benchmarks/serve_overload.py --export-dir export-tiny --max-batch 4 --max-queue 8 --waves 3

Starts its own servers (subprocesses on free 127.0.0.1 ports) and reports JSON:

- overload: ``--waves`` bursts of 4 x (max_batch + max_queue) concurrent non-streamed requests
  (``--max-tokens`` tokens each, ignore_eos). Every request must end in 200, 429 (with a
  ``Retry-After`` header) or 503 within ``--timeout`` seconds (a client timeout counts as a hang);
  p50/p99 latency of the 200s; then one ordinary request must get 200 and every slot be free.
- fault: a server started with the test-only hook ``HIMAP_TRT_TEST_FAULT=decode:N`` (the N-th
  decode call raises, as a crashing backend would) while a burst of max_batch + max_queue requests
  runs: the requests of the failed batch get 500 (error body naming the fault), every other request
  200, the server log has the line, and an ordinary request afterwards gets 200.
- wedge: ``decode:N:hang=S`` with ``--wedged-after 1``: ``GET /health`` must answer 503 ``wedged``
  while the decode call hangs, then 200 again; the request that hung completes with 200.

Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from himap_trt.arch import get_architecture
from himap_trt.manifest import load_manifest
from himap_trt.serve.bench import image_data_url, wait_healthy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`himap-trt serve` in a subprocess; its stderr goes to a temporary log file."""

    def __init__(self, export_dir: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="himap-serve-", suffix=".log")[1])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "himap_trt.cli", "serve", "--export-dir", str(export_dir), "--port", str(self.port),
             "--log-level", "warning", *args], stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"),
            env={**os.environ, **(env or {})})
        wait_healthy(self.base, self.proc)

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.base}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def body(model: str, url: str, max_tokens: int, stream: bool = False) -> dict:
    return {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What is shown?"}]}]}


async def burst(base: str, payload: dict, n: int, timeout_s: float) -> list[dict]:
    """n concurrent requests; per request: status (0: client timeout or connection error), seconds,
    Retry-After header, error message."""
    async with httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=n)) as client:
        async def one():
            started = time.perf_counter()
            try:
                response = await client.post(f"{base}/v1/chat/completions", json=payload)
                error = response.json().get("error", {}).get("message") if response.status_code != 200 else None
                return {"status": response.status_code, "s": time.perf_counter() - started,
                        "retry_after": response.headers.get("retry-after"), "error": error}
            except httpx.HTTPError as exc:
                return {"status": 0, "s": time.perf_counter() - started, "retry_after": None, "error": repr(exc)}

        return await asyncio.gather(*(one() for _ in range(n)))


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ms = np.asarray(values) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "max_ms": round(float(ms.max()), 1)}


def overload(args, model: str, url: str) -> dict:
    server = Server(args.export_dir, "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue))
    n = 4 * (args.max_batch + args.max_queue)
    waves, ok_times, counts = [], [], {}
    try:
        for _ in range(args.waves):
            started = time.perf_counter()
            results = asyncio.run(burst(server.base, body(model, url, args.max_tokens), n, args.timeout))
            wave = {}
            for r in results:
                wave[r["status"]] = wave.get(r["status"], 0) + 1
                counts[r["status"]] = counts.get(r["status"], 0) + 1
            ok_times += [r["s"] for r in results if r["status"] == 200]
            waves.append({"statuses": wave, "wall_s": round(time.perf_counter() - started, 2),
                          "429_without_retry_after": sum(r["status"] == 429 and not r["retry_after"] for r in results)})
        after = httpx.post(f"{server.base}/v1/chat/completions", json=body(model, url, args.max_tokens), timeout=60)
        time.sleep(0.3)
        free, running, queue = (server.metric("himap_free_slots"), server.metric("himap_running_requests"),
                                server.metric("himap_queue_length"))
    finally:
        server.stop()
    report = {"concurrent": n, "waves": waves, "statuses": counts, "answered": percentiles(ok_times),
              "after": after.status_code, "free_slots": free, "running": running, "queue": queue}
    report["checks"] = {
        "only 200/429/503": set(counts) <= {200, 429, 503},
        "no hang (client timeout)": 0 not in counts,
        "every 429 has Retry-After": all(w["429_without_retry_after"] == 0 for w in waves),
        "answers normally afterwards": after.status_code == 200,
        "slots free": free == args.max_batch and running == 0 and queue == 0,
    }
    return report


def fault(args, model: str, url: str) -> dict:
    n = args.max_batch + args.max_queue
    server = Server(args.export_dir, "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue),
                    env={"HIMAP_TRT_TEST_FAULT": f"decode:{args.fault_at}"})
    try:
        results = asyncio.run(burst(server.base, body(model, url, args.max_tokens), n, args.timeout))
        after = httpx.post(f"{server.base}/v1/chat/completions", json=body(model, url, 4), timeout=60)
        health = httpx.get(f"{server.base}/health", timeout=10).status_code
        time.sleep(0.3)
        free = server.metric("himap_free_slots")
    finally:
        server.stop()
    log = server.log.read_text(errors="replace")
    failed = [r for r in results if r["status"] == 500]
    statuses: dict = {}
    for r in results:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    report = {"requests": n, "fault": f"decode:{args.fault_at}", "statuses": statuses,
              "log_lines": [line for line in log.splitlines() if "decode failed for requests" in line]}
    report["checks"] = {
        "some requests failed with 500": len(failed) >= 1,
        "at most one batch failed": len(failed) <= args.max_batch,
        "500s name the fault": all("injected fault" in (r["error"] or "") for r in failed),
        "the others got 200": statuses.get(200, 0) == n - len(failed),
        "a log line": len(report["log_lines"]) == 1,
        "serves afterwards": after.status_code == 200 and health == 200,
        "slots free": free == args.max_batch,
    }
    os.unlink(server.log)
    return report


def wedge(args, model: str, url: str) -> dict:
    server = Server(args.export_dir, "--max-batch", "2", "--wedged-after", "1",
                    env={"HIMAP_TRT_TEST_FAULT": "decode:10:hang=4"})
    seen = []
    try:
        async def main():
            async with httpx.AsyncClient(timeout=args.timeout) as client:
                task = asyncio.ensure_future(client.post(f"{server.base}/v1/chat/completions",
                                                         json=body(model, url, 20)))
                deadline = time.monotonic() + 15
                while not task.done() and time.monotonic() < deadline:
                    response = await client.get(f"{server.base}/health")
                    seen.append((round(time.monotonic(), 2), response.status_code, response.json()["status"]))
                    await asyncio.sleep(0.25)
                return await task

        answer = asyncio.run(main())
        health_after = httpx.get(f"{server.base}/health", timeout=10).status_code
    finally:
        server.stop()
    os.unlink(server.log)
    states = [s for _, _, s in seen]
    report = {"fault": "decode:10:hang=4", "health_states": sorted(set(states)),
              "wedged_polls": states.count("wedged"), "answer": answer.status_code, "health_after": health_after}
    report["checks"] = {"wedged reported": "wedged" in states, "the hung request completes": answer.status_code == 200,
                        "healthy afterwards": health_after == 200}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, required=True)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout of one request (seconds)")
    parser.add_argument("--fault-at", type=int, default=6, help="decode call that fails in the fault phase")
    parser.add_argument("--only", choices=["overload", "fault", "wedge"], default=None)
    args = parser.parse_args()

    model = load_manifest(args.export_dir, families=get_architecture).source_model
    url = image_data_url(None)
    report = {"load_average": os.getloadavg(), "setup": {k: str(v) for k, v in vars(args).items()}}
    for name, phase in (("overload", overload), ("fault", fault), ("wedge", wedge)):
        if args.only in (None, name):
            started = time.perf_counter()
            report[name] = phase(args, model, url)
            report[name]["wall_s"] = round(time.perf_counter() - started, 1)
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    sys.exit(0 if all(all(p["checks"].values()) for p in report.values() if isinstance(p, dict) and "checks" in p)
             else 1)


if __name__ == "__main__":
    main()
