"""The ``himap-trt bench`` command; the measuring is in :mod:`himap_trt.analysis.bench`."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from himap_trt.cli.app import app, err, out, print_table, user_errors
from himap_trt.cli.options import KernelSpecializationOpt
from himap_trt.errors import HimapError
from himap_trt.flops import request_flops
from himap_trt.plan import build_plan
from himap_trt.cli.lazy import lazy_import

# Library modules, imported when a command first uses them (himap_trt/cli/lazy.py: --help stays fast).
bench_lib = lazy_import("himap_trt.analysis.bench")
export_lib = lazy_import("himap_trt.export")
arch = lazy_import("himap_trt.arch")
export_manifest = lazy_import("himap_trt.manifest")
loader = lazy_import("himap_trt.runtime.loader")
models = lazy_import("himap_trt.models")
video_mod = lazy_import("himap_trt.video")
evs_mod = lazy_import("himap_trt.runtime.evs")


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HimapError(f"{flag} must be comma-separated integers such as 1,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise HimapError(f"{flag} must hold integers >= 1, got {text!r}")
    return values


def _exports_for(model: str, methods: list[str], work_dir: Path, max_seq_len: Optional[int],
                 kv_writes: tuple[str, ...] = ("scatternd",)) -> list[Path]:
    """Export ``model`` once per method and KV-cache write form into ``work_dir/<model>-<method>``
    (``-<kv_write>`` appended unless ``scatternd``; reused when present)."""
    bad = [k for k in kv_writes if k not in export_manifest.KV_WRITES]
    if bad or not kv_writes:
        raise HimapError(f"--kv-write must be comma-separated values of {', '.join(export_manifest.KV_WRITES)}, got {','.join(kv_writes)!r}")
    return [path for kv_write in kv_writes for path in _exports_one(model, methods, work_dir, max_seq_len, kv_write)]


def _exports_one(model: str, methods: list[str], work_dir: Path, max_seq_len: Optional[int], kv_write: str) -> list[Path]:
    dirs, loaded = [], None
    for method in methods:
        target = work_dir / (f"{model.replace('/', '_')}-{method}" + ("" if kv_write == "scatternd" else f"-{kv_write}"))
        if not (target / export_manifest.MANIFEST_NAME).is_file():
            loaded = loaded or models.load_model(model)
            dims = loaded.dims
            plan = build_plan(method, num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens)
            err.print(f"exporting {model} ({plan.describe()}) to {target}")
            export_lib.export_model(loaded, plan, export_lib.ExportOptions(out=target, validate=False, max_seq_len=max_seq_len,
                                                     kv_write=kv_write))
        dirs.append(target)
    return dirs


@app.command(name="bench")
@user_errors
def bench(
    export_dirs: Annotated[Optional[list[Path]], typer.Option(
        "--export-dir", metavar="<path>", help="An export to measure (repeat for several: side by side).",
        show_default="none: use --model")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Instead of --export-dir: export this model once per --methods into --work-dir (reused "
                        "when present), e.g. medium.", show_default=False)] = None,
    methods: Annotated[str, typer.Option("--methods", help="With --model: comma-separated plans (default "
                                                           "settings of each).")] = "none,fastv,himap",
    work_dir: Annotated[Path, typer.Option("--work-dir", help="With --model: where the exports go.")] = Path("bench-exports"),
    max_seq_len: Annotated[Optional[int], typer.Option(
        "--max-seq-len", help="With --model: the exports' --max-seq-len.",
        show_default="the model's, at most 2048")] = None,
    kv_write: Annotated[str, typer.Option(
        "--kv-write", metavar="[scatternd|tensorscatter|gqa|attention]",
        help="With --model: comma-separated KV-cache write forms (export --kv-write); each method is "
             "exported and measured once per form, e.g. scatternd,gqa.")] = "scatternd",
    backend: Annotated[str, typer.Option("--backend", metavar="[auto|onnxruntime|tensorrt|torch]",
                                         help="Backend running every export.")] = "onnxruntime",
    device: Annotated[Optional[str], typer.Option("--device", metavar="[cpu|cuda|cuda:N]",
                                                  help="Device of the torch / onnxruntime backends.",
                                                  show_default="cuda if usable, else cpu")] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes to sweep.")] = "1",
    new_tokens: Annotated[str, typer.Option("--max-new-tokens", help="Comma-separated answer lengths (tokens).")] = "32",
    repeats: Annotated[int, typer.Option("--repeats", help="Interleaved rounds per setting (medians over them).")] = 3,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos/--stop-at-eos",
                                             help="Generate exactly --max-new-tokens.")] = True,
    vs_transformers: Annotated[bool, typer.Option(
        "--vs-transformers", help="Also time transformers' generate (sdpa attention) on the same checkpoint.")] = False,
    plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG plot here.", show_default=False)] = None,
    video: Annotated[Optional[Path], typer.Option(
        "--video", help="Measure on this video (Qwen exports; every row of a batch asks about it) instead of "
                        "the synthetic 640x480 image; also prints each plan's prefill FLOPs for it.",
        show_default="none: the synthetic image")] = None,
    video_fps: Annotated[float, typer.Option("--video-fps", help="With --video: frames per second sampled.")] = 2.0,
    max_frames: Annotated[int, typer.Option("--max-frames", help="With --video: most frames sampled.")] = 16,
    kernel_specialization: KernelSpecializationOpt = "eager",
    full_cache: Annotated[bool, typer.Option(
        "--full-cache", help="Allocate every export's KV caches to its max_seq_len (as a server's slots; the "
                             "attention form's always are) instead of prompt + new tokens.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")] = False,
):
    """Measure several exports (methods) side by side in one interleaved run: TTFT, TPOT, inter-token
    latency (mean/p50/p99), tokens/s, peak memory, KV-cache bytes and the per-graph prefill breakdown,
    over batch sizes and answer lengths; optionally against transformers' generate."""
    import torch

    sizes = _ints(batch_sizes, "--batch-sizes")
    lengths = _ints(new_tokens, "--max-new-tokens")
    if export_dirs and model:
        raise HimapError("pass either --export-dir (one or more) or --model with --methods, not both")
    if model:
        export_dirs = _exports_for(model, [m.strip() for m in methods.split(",") if m.strip()], work_dir, max_seq_len,
                                   tuple(k.strip() for k in kv_write.split(",") if k.strip()))
    if not export_dirs:
        raise HimapError("pass --export-dir (one or more exports) or --model (with --methods)")
    clip = video_mod.video_request(video, None, fps=video_fps, max_frames=max_frames) if video is not None else None
    contenders, first, manifests = [], None, []
    for directory in export_dirs:
        manifest = export_manifest.load_manifest(directory, families=arch.get_architecture)
        manifests.append(manifest)
        opened = loader.open_pipeline(export_dir=directory, backend=backend, device=device,
                                      kernel_specialization=kernel_specialization)
        name = (f"evs{manifest.plan.evs_rate:g}+" if manifest.plan.evs_rate else "") + manifest.plan.method \
            + ("" if manifest.kv_write == "scatternd" else f" ({manifest.kv_write})") \
            + ("" if manifest.quantize == "none" else f" {manifest.quantize}")
        if any(c.name == name for c in contenders):
            name = f"{name} ({directory})"
        opened.pipeline.full_cache = full_cache
        contenders.append(bench_lib.PipelineContender(name, opened.pipeline, ignore_eos))
        first = first or (manifest, opened)
    if vs_transformers:
        manifest, opened = first
        dev = opened.device if opened.backend != "tensorrt" else "cuda"
        loaded = models.load_model(manifest.source_model, dtype={"float32": torch.float32, "float16": torch.float16,
                                                          "bfloat16": torch.bfloat16}[manifest.dtype],
                            device=dev, attn_implementation="sdpa")
        contenders.append(bench_lib.TransformersContender("transformers (sdpa)", loaded.model))
    pipe = contenders[0].pipeline
    question = "What happens in this video? Answer in one sentence."
    factory = ((lambda size: pipe.prepare([clip] * size, [question] * size)) if clip else
               (lambda size: bench_lib.sample_batch(pipe, size)))
    flops = video_flops(pipe.prepare([clip], [question]), manifests, contenders) if clip else None
    load_before = os.getloadavg()
    figures = bench_lib.run_bench(contenders, factory, batch_sizes=sizes, new_tokens=lengths,
                        repeats=repeats, progress=lambda text: err.print(f"[dim]{text}[/]"))
    setup = {"backend": first[1].backend, "device": first[1].device, "model": first[0].source_model,
             "dtype": first[0].dtype, "threads": torch.get_num_threads(), "repeats": repeats,
             "ignore_eos": ignore_eos, "full_cache": full_cache,
             "load_average": {"start": _load(load_before), "end": _load(os.getloadavg())},
             "exports": [str(d) for d in export_dirs]}
    if clip:
        setup["video"] = {"file": str(video), "frames": len(clip.frames), "fps": clip.fps, "prefill_flops": flops}
    if plot_path:
        bench_lib.plot(figures, plot_path)
    if as_json:
        print(json.dumps(bench_lib.figures_to_json(figures, setup), indent=1))
        return
    from rich.table import Table

    load = setup["load_average"]
    title = " ".join(f"{k}={v}" for k, v in setup.items() if k not in ("exports", "load_average"))
    title += f" load_average(1/5/15 min)={'/'.join(load['start'])} at start, {'/'.join(load['end'])} at end"
    table = Table(title=title, title_justify="left")
    # ratios: each contender's median over the base's at the same batch size and answer length (< 1: faster)
    base = contenders[-1].name if vs_transformers else contenders[0].name
    for column in ("contender", "batch", "new", "prompt", "TTFT ms", "TPOT ms", "TTFT/base", "TPOT/base", "ITL p50",
                   "ITL p99", "tok/s", "peak RSS +MiB", "KV MiB"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    for f in figures:
        ref = next(g for g in figures if g.contender == base and (g.batch_size, g.new_tokens) == (f.batch_size, f.new_tokens))
        table.add_row(f.contender, str(f.batch_size), str(f.new_tokens), str(f.prompt_tokens), f"{f.ttft_s * 1e3:.1f}",
                      f"{f.tpot_s * 1e3:.2f}", _ratio(f.ttft_s, ref.ttft_s), _ratio(f.tpot_s, ref.tpot_s),
                      f"{f.itl_p50_s * 1e3:.2f}", f"{f.itl_p99_s * 1e3:.2f}",
                      f"{f.tokens_per_s:.1f}", f"{f.peak_rss_delta_bytes / 2**20:.1f}",
                      "-" if f.kv_cache_bytes is None else f"{f.kv_cache_bytes / 2**20:.1f}")
    print_table(table)
    out.print(f"base of the ratios: {base}")
    for f in figures:
        if f.prefill_graph_s:
            total = sum(f.prefill_graph_s.values())
            parts = ", ".join(f"{k} {v * 1e3:.1f} ms ({v / total:.1%})" for k, v in f.prefill_graph_s.items())
            out.print(f"prefill per graph, {f.contender} (batch {f.batch_size}, {f.new_tokens} new): {parts}; "
                      f"sum {total * 1e3:.1f} ms", soft_wrap=True)
    for name, f in (flops or {}).items():
        evs = f" -> {f['evs_kept']} (EVS)" if f["evs_kept"] != f["image_tokens"] else ""
        stages = "".join(f" -> {k}" for k in f["kept"])
        out.print(f"prefill FLOPs of the video request, {name}: {f['image_tokens']}{evs}{stages} "
                  f"visual tokens; Eq. 10 {f['eq10'] / 1e9:.3f} GFLOPs, "
                  f"decoder {f['decoder'] / 1e9:.3f} GFLOPs, whole prompt {f['total'] / 1e9:.3f} GFLOPs")
    if plot_path:
        out.print(f"plot: {plot_path}")


def _load(values: tuple[float, float, float]) -> list[str]:
    """``os.getloadavg()`` as printed by ``uptime`` (1, 5 and 15 minutes)."""
    return [f"{v:.2f}" for v in values]


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "-"


def video_flops(batch, manifests, contenders) -> dict[str, dict]:
    """Per contender: the video request's visual tokens per segment and its prefill FLOPs
    (:func:`himap_trt.flops.request_flops`: Eq. 10, decoder, whole prompt)."""
    n, length = batch.image_tokens[0], batch.prompt_lengths[0]
    t, h, w = (int(v) for v in batch.image_grid_thw[0])      # the vision tower attends per temporal patch
    result = {}
    for manifest, contender in zip(manifests, contenders):
        plan, dims = manifest.plan, manifest.dims
        eq10, prompt = request_flops(plan, dims, n, length, vision_blocks=t)
        kept = n
        if plan.evs_rate:      # EVS before the LLM: the decoder sees its kept tokens; the vision tower all
            merge = dims.spatial_merge_size
            kept = evs_mod.evs_keep_count(t, h // merge, w // merge, plan.evs_rate)
            vision = prompt.vision
            eq10, prompt = request_flops(plan, dims, kept, length - (n - kept))
            prompt = replace(prompt, vision=vision)
        result[contender.name] = {"image_tokens": n, "prompt_tokens": length, "evs_kept": kept,
                                  "kept": plan.image_tokens_for(kept)[1:], "eq10": eq10,
                                  "decoder": prompt.decoder, "total": prompt.total}
    return result
