"""The serving figures of docs/PERFORMANCE.md: `bench-serve` at concurrency 1 and 8 against
`himap-trt serve`, and the in-process TTFT of `himap-trt run` on the same image and question,
interleaved (run, bench c=1, bench c=8, repeated).

    himap-trt export --model medium --out export-medium
    python benchmarks/serve_acceptance.py --export-dir export-medium --rounds 3 --requests 16 --max-tokens 64

Prints a JSON report with per-round figures and the medians: output tokens/s at 8 vs 1 (ratio) and
the server's TTFT p50 at concurrency 1 vs `run`'s TTFT (ratio).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
from pathlib import Path

from himap_trt.serve.bench import wait_healthy

QUESTION = "Describe the image in detail."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=None, help="serve --max-seq-len (default: the export's)")
    args = parser.parse_args()
    from matplotlib import cbook

    image = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    himap = [sys.executable, "-m", "himap_trt.cli"]
    server = subprocess.Popen([*himap, "serve", "--export-dir", str(args.export_dir), "--port", str(port),
                               "--max-batch", str(args.max_batch), "--log-level", "warning",
                               *(["--max-seq-len", str(args.max_seq_len)] if args.max_seq_len else [])])
    rounds = []
    try:
        wait_healthy(base, server)
        for r in range(args.rounds):
            run = subprocess.run([*himap, "run", str(image), QUESTION, "--export-dir", str(args.export_dir),
                                  "--backend", "onnxruntime", "--max-new-tokens", str(args.max_tokens), "--ignore-eos",
                                  "--json"],
                                 capture_output=True, text=True, check=True)
            run_stats = json.loads(run.stdout)["stats"]
            bench = subprocess.run([*himap, "bench-serve", "--url", base, "--concurrency", "1,8", "--requests",
                                    str(args.requests), "--max-tokens", str(args.max_tokens), "--image", str(image),
                                    "--prompt", QUESTION, "--json"], capture_output=True, text=True, check=True)
            levels = {level["concurrency"]: level for level in json.loads(bench.stdout)["levels"]}
            rounds.append({
                "run_ttft_ms": run_stats["ttft_s"] * 1e3, "run_tpot_ms": run_stats["tpot_s"] * 1e3,
                "c1_ttft_p50_ms": levels[1]["ttft_ms"]["p50"], "c1_tpot_p50_ms": levels[1]["tpot_ms"]["p50"],
                "c1_output_tok_s": levels[1]["output_throughput"], "c8_output_tok_s": levels[8]["output_throughput"],
                "c8_ttft_p50_ms": levels[8]["ttft_ms"]["p50"], "c8_ttft_p99_ms": levels[8]["ttft_ms"]["p99"],
                "c8_tpot_p50_ms": levels[8]["tpot_ms"]["p50"], "c8_itl_p99_ms": levels[8]["itl_ms"]["p99"],
                "c8_e2e_p50_ms": levels[8]["e2e_ms"]["p50"],
            })
            print(json.dumps({"round": r, **rounds[-1]}), file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    report = {
        "export_dir": str(args.export_dir), "max_seq_len": args.max_seq_len, "requests": args.requests, "max_tokens": args.max_tokens, "rounds": rounds,
        "median": median,
        "throughput_ratio_c8_vs_c1": median["c8_output_tok_s"] / median["c1_output_tok_s"],
        "ttft_ratio_serve_c1_vs_run": median["c1_ttft_p50_ms"] / median["run_ttft_ms"],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
