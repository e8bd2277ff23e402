"""TTFT of video prompts against the number of frames: none, HiMAP, EVS, EVS + HiMAP (issue 29).

    python benchmarks/bench_video_evs.py --work-dir /tmp/evs-bench --frames 16,64,256 --rounds 3 \
        --json out.json --plot docs/images/video_ttft.png

Per family (tiny-qwen2.5-vl, tiny-qwen3-vl: random weights, CPU) two exports are made (``none`` and
``himap`` with their defaults, ``--max-image-tokens 512``, reused when present); EVS runs as the
per-request rate (``batch.evs_rates``, the same code path as ``--prune-before evs``), so the four
contenders are none, himap, evs(q), evs(q)+himap. Two clips of 256 frames (96x96 px): moving shapes
(:func:`himap_trt.video.moving_shapes_clip`) and a mostly static scene (one small shape moves one
pixel per frame). For each (family, clip, frames) ONE interleaved run: every round prefills the same
prompt once per contender in turn (ONNX Runtime CPU), medians over the rounds of TTFT (prefill =
vision graph + EVS + decoder segments up to the first token's logits, into a slot cache allocated
once per pipeline as the serving engine does) and of its vision / decoder parts. Also printed:
visual tokens per stage (|V| -> EVS -> K1 -> K2), Eq. 10 FLOPs ratio with the
unpruned |V| as the baseline's n (so it counts what EVS removed), whole-prompt prefill FLOPs
(vision tower on the whole clip, decoder on what each stage kept). Prints the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from himap_trt.data.shapes import random_scene, render
from himap_trt.errors import HimapError
from himap_trt.export import ExportOptions, export_model
from himap_trt.flops import omega, request_flops
from himap_trt.models import load_model
from himap_trt.plan import build_plan
from himap_trt.runtime.loader import open_pipeline
from himap_trt.video import frames_video, load_video, moving_shapes_clip

QUESTION = "What moves in this video?"


def static_frames(count: int, seed: int = 1, size: int = 96):
    """A mostly static scene (``size`` px): its shapes stay, a small extra square moves one pixel per
    frame (of the 96 px scene, scaled with it)."""
    from PIL import ImageDraw

    scene = render(random_scene(np.random.default_rng(seed), num_shapes=3))
    frames = []
    for t in range(count):
        image = scene.copy()
        x = 4 + (t * 1) % 80
        ImageDraw.Draw(image).rectangle([x, 84, x + 8, 92], fill=(250, 250, 250))
        frames.append(image.resize((size, size)) if size != image.width else image)
    return frames


def exports(model: str, work: Path, bound: int, max_seq_len: int) -> dict[str, Path]:
    loaded, dirs = None, {}
    for method in ("none", "himap"):
        target = work / f"{model}-{method}-{bound}"
        if not (target / "manifest.json").is_file():
            loaded = loaded or load_model(model)
            plan = build_plan(method, num_layers=loaded.dims.num_layers, num_image_tokens=bound)
            export_model(loaded, plan, ExportOptions(out=target, validate=False, max_seq_len=max_seq_len))
        dirs[method] = target
    return dirs


def eq10(counts: list[int], plan, dims, baseline: int) -> float:
    """Eq. 10 over the segments' image tokens, as a ratio of L * Omega(|V| before EVS)."""
    d, m = dims.hidden_size, dims.intermediate_size
    bounds = [0, *[s.layer for s in plan.stages], dims.num_layers]
    spent = sum((b - a) * omega(n, d, m) for a, b, n in zip(bounds, bounds[1:], counts))
    return spent / (dims.num_layers * omega(baseline, d, m))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/evs-bench"))
    parser.add_argument("--frames", default="16,64,128,256")
    parser.add_argument("--models", default="tiny-qwen2.5-vl,tiny-qwen3-vl")
    parser.add_argument("--evs-rate", type=float, default=0.75)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=96, help="frame side (px) of both clips")
    parser.add_argument("--bound", type=int, default=512, help="the exports' --max-image-tokens")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--clips", default="moving,static")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    frames = [int(f) for f in args.frames.split(",")]
    moving = moving_shapes_clip(args.work_dir / f"moving-{args.size}.mp4", frames=256, fps=8, size=args.size)
    still = static_frames(256, size=args.size)
    clips = {"moving": lambda n: load_video(moving, fps=8, max_frames=n),
             "static": lambda n: frames_video(still[:: 256 // n][:n], fps=8 * n / 256, max_frames=n)}
    clips = {name: clips[name] for name in args.clips.split(",")}
    rows = []
    q = args.evs_rate
    for model in args.models.split(","):
        dirs = exports(model, args.work_dir, args.bound, args.max_seq_len)
        pipes = {m: open_pipeline(export_dir=d, backend="onnxruntime").pipeline for m, d in dirs.items()}
        # one slot cache per pipeline, allocated once (as the serving engine does): TTFT without allocation
        caches = {m: p.allocate(1) for m, p in pipes.items()}
        dims = load_model(model).dims
        contenders = [("none", "none", None), ("himap", "himap", None), (f"evs{q:g}", "none", q),
                      (f"evs{q:g}+himap", "himap", q)]
        for clip, make in clips.items():
            for n in frames:
                video = make(n)
                batches = {}
                try:
                    pipes["none"].prepare([video], [QUESTION])
                except HimapError as exc:       # e.g. Qwen3-VL's per-patch timestamps at 256 frames
                    print(f"{model} {clip} {n}f: skipped: {exc}", flush=True)
                    continue
                for name, method, rate in contenders:
                    batch = pipes[method].prepare([video], [QUESTION])
                    batch.evs_rates = [rate or 0.0]
                    batches[name] = batch
                times = {name: [] for name, _, _ in contenders}
                info = {}
                for round_ in range(args.rounds + 1):                  # round 0: warm-up
                    for name, method, _ in contenders:
                        timings = {}
                        with torch.inference_mode():
                            started = time.perf_counter()
                            state = pipes[method].prefill(batches[name], timings, cache=caches[method], slots=[0])
                            total = time.perf_counter() - started
                        pipes[method].release(caches[method], [0])
                        if round_:
                            times[name].append((total, timings["vision"], timings["prefill"]))
                        info[name] = state
                load = os.getloadavg()
                base_tokens = batches["none"].image_tokens[0]
                base_prompt = batches["none"].prompt_lengths[0]
                none_ttft = statistics.median(t[0] for t in times["none"])
                for name, method, rate in contenders:
                    state = info[name]
                    counts = list(state.image_tokens[0])
                    plan = pipes[method].plan
                    dropped = base_tokens - counts[0]
                    temporal = int(batches["none"].image_grid_thw[0][0])     # vision attention per temporal patch
                    _, full = request_flops(plan, dims, base_tokens, base_prompt, vision_blocks=temporal)
                    _, ours = request_flops(plan, dims, counts[0], base_prompt - dropped)
                    whole = full.vision + ours.decoder + ours.scoring + ours.lm_head
                    ttft = statistics.median(t[0] for t in times[name])
                    rows.append({
                        "model": model, "clip": clip, "frames": n, "contender": name, "tokens": [base_tokens, *counts],
                        "eq10_ratio": eq10(counts, plan, dims, base_tokens), "whole_prompt_gflops": whole / 1e9,
                        "ttft_ms": ttft * 1e3, "vision_ms": statistics.median(t[1] for t in times[name]) * 1e3,
                        "decoder_ms": statistics.median(t[2] for t in times[name]) * 1e3,
                        "ttft_vs_none": ttft / none_ttft, "load": load, "rounds": args.rounds})
                    r = rows[-1]
                    print(f"{model} {clip} {n}f {name}: tokens {'->'.join(map(str, r['tokens']))} eq10 "
                          f"{r['eq10_ratio']:.3f} whole {r['whole_prompt_gflops']:.3f} GFLOPs TTFT {r['ttft_ms']:.1f} ms "
                          f"(vision {r['vision_ms']:.1f}, decoder {r['decoder_ms']:.1f}) x{r['ttft_vs_none']:.2f} "
                          f"load {load[0]:.1f}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        models = args.models.split(",")
        fig, axes = plt.subplots(len(models), len(clips), figsize=(5 * len(clips), 4 * len(models)), squeeze=False)
        for i, model in enumerate(models):
            for j, clip in enumerate(clips):
                ax = axes[i][j]
                for name in dict.fromkeys(r["contender"] for r in rows):
                    pts = [(r["frames"], r["ttft_ms"]) for r in rows
                           if r["model"] == model and r["clip"] == clip and r["contender"] == name]
                    ax.plot(*zip(*pts), marker="o", label=name)
                ax.set_xscale("log", base=2)
                ax.set_title(f"{model}, {clip} clip")
                ax.set_xlabel("frames")
                ax.set_ylabel("TTFT (ms, ONNX Runtime CPU)")
                ax.legend()
        fig.suptitle(f"TTFT vs frames (2-core CPU, load {os.getloadavg()[0]:.1f})")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=90)


if __name__ == "__main__":
    main()
