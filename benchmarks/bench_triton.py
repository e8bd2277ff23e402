"""Triton vs `himap-trt serve`, side by side: startup time to ready, memory, output tokens/s at
concurrency 1 and 16 (the figures of docs/PERFORMANCE.md, "Triton Inference Server").

    nice -n 10 python benchmarks/bench_triton.py --export-dir export-tiny --export-dir export-medium \\
        --rounds 2 --max-tokens 32 --max-seq-len 1024

For each export and round, each server in turn (the order alternates between rounds, only one runs at
a time, both on the same export, engine settings and requests):

- ``triton``: ``himap-trt triton repo`` (in a temporary directory) + the bundled tritonserver
  (``TritonServer``, as ``himap-trt triton serve``), the ``himap`` model through tritonclient gRPC
  streaming, one stream per client thread;
- ``serve``: ``himap-trt serve`` (OpenAI API), through ``bench-serve``'s streaming client.

Startup: from process start to ready (Triton ``/v2/health/ready``, serve ``/health``), seconds.
Memory: resident set of the server's whole process tree (Triton: the server and its stubs), after
the load, MiB. Load: a warm-up request, then ``--requests-c1`` requests at concurrency 1 and
``--requests-c16`` at concurrency 16 (closed loops), greedy, ``ignore_eos`` so every answer has
``--max-tokens`` tokens. Output tokens/s = tokens received / wall time of the level; TTFT p50 from
the client's clock (ms). Prints one JSON report (rounds and medians).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

QUESTION = "Describe the image in detail."


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def free_port() -> int:
    from himap_trt.triton.server import free_port as free

    return free()


# -- triton ---------------------------------------------------------------------------------------
def triton_request(client_module, client, image: bytes, max_tokens: int, events: queue.Queue) -> tuple[float, float, int]:
    """One streamed request on ``client``'s open stream: (TTFT s, E2E s, tokens)."""
    from himap_trt.triton.protocol import Answer, make_inputs

    answer = Answer()
    start = time.perf_counter()
    ttft = None
    client.async_stream_infer("himap", make_inputs(client_module, image, QUESTION, max_tokens=max_tokens,
                                                   ignore_eos=True), enable_empty_final_response=True)
    while True:
        result, error = events.get(timeout=600)
        if error is not None:
            raise RuntimeError(f"triton request failed: {error}")
        answer.add(result.as_numpy)
        if ttft is None and answer.text:
            ttft = time.perf_counter() - start
        if result.get_response().parameters["triton_final_response"].bool_param:
            return ttft or 0.0, time.perf_counter() - start, len(answer.token_ids)


def triton_level(url: str, image: bytes, concurrency: int, requests: int, max_tokens: int) -> dict:
    import tritonclient.grpc as grpcclient

    todo = queue.Queue()
    for _ in range(requests):
        todo.put(1)
    results, failures = [], []

    def worker():
        events: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(url)
        client.start_stream(callback=lambda result, error: events.put((result, error)))
        try:
            while True:
                try:
                    todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    results.append(triton_request(grpcclient, client, image, max_tokens, events))
                except Exception as exc:   # counted, reported
                    failures.append(str(exc))
        finally:
            client.stop_stream()
            client.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    duration = time.perf_counter() - start
    return level_summary(concurrency, [r[0] for r in results], [r[2] for r in results], duration, failures)


def level_summary(concurrency, ttfts, tokens, duration, failures) -> dict:
    return {"concurrency": concurrency, "completed": len(tokens), "failed": len(failures),
            "output_tokens": sum(tokens), "duration_s": duration,
            "output_tokens_per_s": sum(tokens) / duration if duration else 0.0,
            "ttft_p50_ms": statistics.median(ttfts) * 1e3 if ttfts else None, "errors": failures[:3]}


def run_triton(export_dir: Path, args, image: bytes) -> dict:
    from himap_trt.triton.repository import RepositoryOptions, write_repository
    from himap_trt.triton.server import TritonServer

    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        repo = Path(tmp) / "model_repository"
        write_repository(export_dir, repo, RepositoryOptions(max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                                                             max_queue=256))
        with open(Path(tmp) / "triton.log", "w") as log:
            server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                                  model_config_name="cpu", log=log)
            started = time.perf_counter()
            server.start()
            try:
                server.wait_ready(600)
                startup = time.perf_counter() - started
                levels = load(lambda c, n, t: triton_level(server.grpc_url, image, c, n, t), args)
                rss = tree_rss_bytes(server.process.pid)
            finally:
                server.stop()
    return {"startup_s": startup, "rss_mib": rss / 2**20, "levels": levels}


# -- serve ----------------------------------------------------------------------------------------
def serve_level(base: str, image_path: Path, concurrency: int, requests: int, max_tokens: int) -> dict:
    from himap_trt.serve.bench import chat_body, image_data_url, run_level

    body = chat_body("himap", image_data_url(image_path), QUESTION, max_tokens, ignore_eos=True)
    results, duration = asyncio.run(run_level(f"{base}/v1/chat/completions", body, concurrency, requests))
    good = [r for r in results if r.ok]
    return level_summary(concurrency, [r.ttft_s for r in good if r.ttft_s is not None],
                         [r.output_tokens for r in good], duration, [r.error for r in results if not r.ok])


def run_serve(export_dir: Path, args, image_path: Path) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "himap_trt.cli", "serve", "--export-dir", str(export_dir), "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-queue", "256", "--served-model-name", "himap",
               "--log-level", "warning", "--backend", "onnxruntime"]
    if args.max_seq_len:
        command += ["--max-seq-len", str(args.max_seq_len)]
    started = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.perf_counter() - started > 600:
                raise SystemExit("himap-trt serve did not start")
            time.sleep(0.1)
        startup = time.perf_counter() - started
        levels = load(lambda c, n, t: serve_level(base, image_path, c, n, t), args)
        rss = tree_rss_bytes(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    return {"startup_s": startup, "rss_mib": rss / 2**20, "levels": levels}


def load(level, args) -> list[dict]:
    level(1, 1, args.max_tokens)   # warm-up
    return [level(1, args.requests_c1, args.max_tokens), level(16, args.requests_c16, args.max_tokens)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, action="append", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--requests-c1", type=int, default=4)
    parser.add_argument("--requests-c16", type=int, default=32)
    args = parser.parse_args()
    from matplotlib import cbook

    image_path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    image = image_path.read_bytes()
    report = {"setup": {**{k: (v if not isinstance(v, list) else [str(p) for p in v]) for k, v in vars(args).items()},
                        "question": QUESTION, "image": image_path.name, "cpus": os.cpu_count()}, "exports": {}}
    for export_dir in args.export_dir:
        rounds = []
        for r in range(args.rounds):
            order = ("triton", "serve") if r % 2 == 0 else ("serve", "triton")
            figures = {}
            for name in order:
                figures[name] = (run_triton(export_dir, args, image) if name == "triton"
                                 else run_serve(export_dir, args, image_path))
                print(json.dumps({"export": str(export_dir), "round": r, "server": name, **figures[name]}),
                      file=sys.stderr, flush=True)
            rounds.append(figures)
        medians = {}
        for name in ("triton", "serve"):
            runs = [f[name] for f in rounds]
            medians[name] = {
                "startup_s": statistics.median(x["startup_s"] for x in runs),
                "rss_mib": statistics.median(x["rss_mib"] for x in runs),
                **{f"c{lvl['concurrency']}_tokens_per_s": statistics.median(
                    x["levels"][i]["output_tokens_per_s"] for x in runs)
                   for i, lvl in enumerate(runs[0]["levels"])},
                **{f"c{lvl['concurrency']}_ttft_p50_ms": statistics.median(
                    x["levels"][i]["ttft_p50_ms"] for x in runs)
                   for i, lvl in enumerate(runs[0]["levels"])},
            }
        medians["triton/serve"] = {k: medians["triton"][k] / medians["serve"][k] for k in medians["triton"]}
        report["exports"][str(export_dir)] = {"rounds": rounds, "medians": medians}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
