"""Vision-graph time against the number of video frames, before and after issue 29, interleaved.

    python benchmarks/bench_video_vision.py --frames 16,64,256 --rounds 3 [--json out.json]

"Before" is the vision graph as it was until issue 29 (commit ``ad305d7``: one attention over all
of a clip's patches with a dense [patches, patches] per-frame mask, read with ``git show`` from this
repository's history); "after" is the current graph (attention per temporal patch and per window,
:func:`himap_trt.graphs.qwen_vision.block_attention`). Both are exported from the SAME random-weight
tiny tower (tiny-qwen2.5-vl's vision config; tiny-qwen3-vl's tower) to ONNX and run with ONNX Runtime
on the CPU on the same clip: N frames of 8x8 patches (112 px for Qwen2.5-VL, 128 px for Qwen3-VL;
16 visual tokens per temporal patch), N/2 temporal patches. Each round runs every (family, graph,
frames) once in turn after a warm-up; medians over the rounds, and after/before ratios. Prints the
load average. Needs git (the before graph comes from the history).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from himap_trt.export.qwen_vision import trace_vision
from himap_trt.graphs import qwen3_vision, qwen_vision
from himap_trt.models import load_model
from himap_trt.runtime.onnxrt import OnnxRuntimeBackend

BEFORE = "ad305d7"


def _old_module(name: str, path: str, replace: dict[str, str]):
    """Load ``path`` as of commit :data:`BEFORE` as module ``name`` (text substitutions applied)."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{BEFORE}:{path}"], cwd=root, check=True, capture_output=True,
                            text=True).stdout
    for old, new in replace.items():
        source = source.replace(old, new)
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(compile(source, f"{BEFORE}:{path}", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="16,64,256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    frames = [int(f) for f in args.frames.split(",")]
    old25 = _old_module("old_qwen_vision", "himap_trt/graphs/qwen_vision.py", {})
    old3 = _old_module("old_qwen3_vision", "himap_trt/graphs/qwen3_vision.py",
                       {"from himap_trt.graphs.qwen_vision import": "from old_qwen_vision import"})
    torch.manual_seed(0)
    v25 = load_model("tiny-qwen2.5-vl").model.model.visual
    v3 = load_model("tiny-qwen3-vl").model.model.visual
    out = Path(tempfile.mkdtemp(prefix="video-vision-"))
    # family -> graph -> (backend, feeds(grid, pixels))
    attrs3 = qwen3_vision.qwen3_vision_attrs(v3.config)
    graphs = {}
    for family, visual, old, new, feeds_old, feeds_new, spec_old, spec_new, patch in (
        ("qwen2.5-vl", v25, old25.QwenVisionEncoder, qwen_vision.QwenVisionEncoder,
         lambda p, g: old25.vision_feeds(p, g, v25.config), lambda p, g: qwen_vision.vision_feeds(p, g, v25.config),
         old25.qwen_vision_spec(v25.config), qwen_vision.qwen_vision_spec(v25.config), 1176),
        ("qwen3-vl", v3, old3.Qwen3VisionEncoder, qwen3_vision.Qwen3VisionEncoder,
         lambda p, g: old3.qwen3_vision_feeds(p, g, attrs3), lambda p, g: qwen3_vision.qwen3_vision_feeds(p, g, attrs3),
         old3.qwen3_vision_spec(v3.config), qwen3_vision.qwen3_vision_spec(v3.config), 1536),
    ):
        for label, module, feeds, spec in (("before", old, feeds_old, spec_old), ("after", new, feeds_new, spec_new)):
            path = out / f"{family}-{label}.onnx"
            # each graph traced on its own exporter's grid (the old one had a dynamic first axis only)
            trace = np.array([[1, 4, 6], [1, 8, 8]] if label == "before" else [[1, 4, 6], [1, 6, 8], [3, 4, 4]])
            pixels = torch.randn(int(trace.prod(-1).sum()), patch)
            spec = trace_vision(module(visual).eval(), feeds(pixels, trace), spec, path, opset=18)
            graphs[(family, label)] = (OnnxRuntimeBackend(spec, path), feeds, patch)
    cases = {}
    for (family, label), (backend, feeds, patch) in graphs.items():
        for n in frames:
            grid = np.array([[n // 2, 8, 8]])
            pixels = torch.randn(int(grid.prod()), patch, generator=torch.Generator().manual_seed(n))
            cases[(family, label, n)] = (backend, feeds(pixels, grid))
    times: dict[tuple, list[float]] = {key: [] for key in cases}
    for backend, feed in cases.values():            # warm-up
        backend.run(feed)
    for _ in range(args.rounds):
        for key, (backend, feed) in cases.items():
            started = time.perf_counter()
            backend.run(feed)
            times[key].append((time.perf_counter() - started) * 1e3)
    load = os.getloadavg()
    rows = []
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (shared 2-core machine); ONNX Runtime CPU, "
          f"fp32, {args.rounds} interleaved rounds, medians")
    print("| family | frames | patches | before ms | after ms | after / before |")
    print("|---|---|---|---|---|---|")
    for family in ("qwen2.5-vl", "qwen3-vl"):
        for n in frames:
            before = statistics.median(times[(family, "before", n)])
            after = statistics.median(times[(family, "after", n)])
            rows.append({"family": family, "frames": n, "patches": n // 2 * 64, "before_ms": before,
                         "after_ms": after, "before_all": times[(family, "before", n)],
                         "after_all": times[(family, "after", n)]})
            print(f"| {family} | {n} | {n // 2 * 64} | {before:.1f} | {after:.1f} | {after / before:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"load": load, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
