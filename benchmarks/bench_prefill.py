"""Prefill and decode time of pruning plans, per backend: the figures behind docs/PERFORMANCE.md.

    python benchmarks/bench_prefill.py --model medium --backend torch --device cpu
    python benchmarks/bench_prefill.py --model tiny --backend onnxruntime
    python benchmarks/bench_prefill.py --model llava-1.5-7b --device cuda --dtype fp16   # random weights

Models: ``tiny`` / ``tiny-gqa`` / ``medium`` (built in; ``medium``: random weights, 576 image tokens,
decoder hidden 512 x 12 layers: a decoder-dominated CPU workload), or a known name such as
``llava-1.5-7b`` (random weights with that checkpoint's dimensions). Prints a table (and JSON with
--json): median prefill time (vision + embeddings + segments + scoring, seconds), median TTFT and
TPOT over up to 3 generations, and KV-cache bytes per plan, and the prefill speed-up against no pruning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from himap_trt.models import load_model
from himap_trt.arch.llava_known import KNOWN_MODELS, known_config
from himap_trt.models.loading import parse_dtype
from himap_trt.models.tiny import random_model
from himap_trt.plan import build_plan
from himap_trt.runtime import GenerationConfig, reference_pipeline

PLANS = {"none": ("none", {}), "fastv": ("fastv", {}), "himap": ("himap", {}), "visipruner": ("visipruner", {})}


def load(name: str, dtype: torch.dtype, device: str):
    if name in KNOWN_MODELS:
        return random_model(known_config(name), dtype=dtype, device=device)
    return load_model(name, dtype=dtype, device=device)


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _timed_run(run, times: list[float], device: str):
    """Wrap a backend's ``run`` to append each call's duration (seconds) to ``times``."""
    def wrapper(feeds, outputs=None):
        start_ = time.perf_counter()
        result = run(feeds, outputs) if outputs else run(feeds)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start_)
        return result
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="medium")
    parser.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--plans", default="none,fastv,himap,visipruner")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--per-graph", action="store_true", help="also print the median time of each graph's prefill call")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load(args.model, parse_dtype(args.dtype), args.device)
    dims = loaded.dims
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    question = "What is happening in this picture? Answer in one sentence."
    rows = []
    for key in args.plans.split(","):
        method, kw = PLANS[key]
        plan = build_plan(method, num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens, **kw)
        if args.backend == "torch":
            pipe = reference_pipeline(loaded, plan)
        else:
            from himap_trt.export import ExportOptions, export_model
            from himap_trt.runtime.loader import open_pipeline

            out = Path(tempfile.mkdtemp()) / "export"
            export_model(loaded, plan, ExportOptions(out=out, dtype={"float32": "fp32", "float16": "fp16"}[
                str(loaded.model.dtype).split(".")[1]], validate=False))
            pipe = open_pipeline(export_dir=out, backend="onnxruntime", device=args.device).pipeline
        batch = pipe.prepare([image], [question])
        per_graph: dict[str, list[float]] = {}
        with torch.inference_mode():
            pipe.prefill(batch)  # warm-up
            if args.per_graph:
                for name, backend in pipe.backends.items():
                    backend.run = _timed_run(backend.run, per_graph.setdefault(name, []), args.device)
            prefill = [timed(lambda: pipe.prefill(batch), args.device) for _ in range(args.repeats)]
            for backend in pipe.backends.values():
                backend.__dict__.pop("run", None)   # back to the class's run
            runs = [pipe.generate(batch, GenerationConfig(max_new_tokens=args.new_tokens))
                    for _ in range(max(1, min(3, args.repeats)))]
        rows.append({"plan": key, "describe": plan.describe(), "prompt_tokens": batch.prompt_lengths[0],
                     "prefill_s": statistics.median(prefill), "prefill_min_s": min(prefill),
                     "ttft_s": statistics.median(r.ttft_s for r in runs),
                     "tpot_s": statistics.median(r.tpot_s for r in runs),
                     "kv_cache_bytes": runs[0].kv_cache_bytes,
                     "per_graph_ms": {k: statistics.median(v) * 1e3 for k, v in per_graph.items() if v}})
    base = next((r["prefill_s"] for r in rows if r["plan"] == "none"), None)
    for row in rows:
        row["prefill_speedup"] = base / row["prefill_s"] if base else None
    header = {"model": args.model, "backend": args.backend, "device": args.device, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "torch": torch.__version__}
    if args.device == "cuda":
        header["gpu"] = torch.cuda.get_device_name()
    if args.json:
        print(json.dumps({"setup": header, "rows": rows}, indent=1))
        return
    print(" ".join(f"{k}={v}" for k, v in header.items()))
    print(f"{'plan':6} {'prompt':>6} {'prefill ms':>11} {'speed-up':>8} {'TTFT ms':>8} {'TPOT ms':>8} {'KV MiB':>7}")
    for r in rows:
        speed = f"{r['prefill_speedup']:.2f}x" if r["prefill_speedup"] else "-"
        print(f"{r['plan']:6} {r['prompt_tokens']:6d} {r['prefill_s'] * 1e3:11.1f} {speed:>8} {r['ttft_s'] * 1e3:8.1f} "
              f"{r['tpot_s'] * 1e3:8.2f} {r['kv_cache_bytes'] / 2**20:7.2f}")
    for r in rows:
        if r["per_graph_ms"]:
            print(f"  {r['plan']}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["per_graph_ms"].items()))


if __name__ == "__main__":
    main()
