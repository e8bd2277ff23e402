"""The ``himap-trt analyze`` command (:mod:`himap_trt.analysis.analyze`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from himap_trt.cli.app import app, err, out, progress_bar, user_errors
from himap_trt.errors import HimapError
from himap_trt.cli.lazy import lazy_import

# Library modules, imported when a command first uses them (himap_trt/cli/lazy.py: --help stays fast).
analysis_report = lazy_import("himap_trt.analysis.analyze.report")
analyze_lib = lazy_import("himap_trt.analysis.analyze")
loading = lazy_import("himap_trt.models.loading")
models = lazy_import("himap_trt.models")
prompt = lazy_import("himap_trt.prompt")
video_defaults = lazy_import("himap_trt.video")

#: Parameters below which ``--threads 0`` runs PyTorch on one CPU thread.
SMALL_MODEL = 100_000_000


def read_requests(data: Optional[Path], image: Optional[Path], question: Optional[str], limit: Optional[int]):
    """(image path, question, answer or None, video sampling or None) from ``--data`` JSONL or IMAGE
    QUESTION. A line may name a ``video`` instead of an ``image`` (Qwen families), with optional
    ``fps`` and ``max_frames`` (defaults: ``run``'s ``--video-fps`` / ``--max-frames``); its
    sampling is then ``{"fps": .., "max_frames": ..}``.

    Raises:
        HimapError: naming the file and line for malformed input.
    """
    if data is not None:
        if image is not None or question is not None:
            raise HimapError("pass either IMAGE QUESTION or --data FILE, not both")
        if not data.is_file():
            raise HimapError(f"--data file {str(data)!r} does not exist")
        items = []
        for number, line in enumerate(data.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                path, text = Path(item["video"] if "video" in item else item["image"]), str(item["question"])
                answer = item.get("answer")
                sampling = None
                if "video" in item:
                    sampling = {"fps": float(item.get("fps", video_defaults.DEFAULT_FPS)),
                                "max_frames": int(item.get("max_frames", video_defaults.DEFAULT_MAX_FRAMES))}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
                raise HimapError(f"{data}:{number}: expected a JSON object with \"image\" (or \"video\", with "
                                 f"optional numbers \"fps\" and \"max_frames\") and \"question\" "
                                 f"(and optionally \"answer\")") from None
            items.append((path if path.is_absolute() else data.parent / path, text,
                          None if answer is None else str(answer), sampling))
        if not items:
            raise HimapError(f"--data file {str(data)!r} holds no requests")
    elif image is not None and question is not None:
        items = [(image, question, None, None)]
    else:
        raise HimapError("pass an IMAGE and a QUESTION, or --data FILE with one JSON request per line")
    if limit is not None:
        if limit < 1:
            raise HimapError(f"--limit must be at least 1, got {limit}")
        items = items[:limit]
    return items


def _summary(console: Any, document: dict) -> None:
    from rich.table import Table

    means = document["per_layer"]
    table = Table(title=f"{document['model']}: per layer, mean over {document['requests']} request(s)",
                  title_justify="left")
    for column in ("layer", "img->instr", "img->img", "->system", "S_vt", "S_vv", "label vt/vv",
                   "top-5 vt/vv", "D_l"):
        table.add_column(column, justify="right")

    def f(value, spec):
        return "-" if value is None else format(value, spec)

    d = means["disruption"]
    for layer in range(document["num_layers"]):
        table.add_row(
            str(layer), f(means["image_to_instruction"][layer], ".3f"), f(means["image_to_image"][layer], ".3f"),
            f(means["to_system"][layer], ".3f"), f(means["s_vt"][layer], ".2e"), f(means["s_vv"][layer], ".2e"),
            f"{f(d['vt']['label'][layer], '.2f')}/{f(d['vv']['label'][layer], '.2f')}",
            f"{f(d['vt']['score'][layer], '.2f')}/{f(d['vv']['score'][layer], '.2f')}",
            f(means["bias_ratio"][layer], "+.2f"))
    from rich.console import Console

    Console(width=max(console.width, 120), highlight=False, file=console.file).print(table)
    rec = document["recommended"]
    h, v = rec["himap"], rec["visipruner"]
    from rich.markup import escape

    lines = [
        f"[bold]HiMAP[/]: --k1 {h['k1']} --r1 {h['r1']} --k2 {h['k2']} --r2 {h['r2']}  "
        f"(Eq. 10: {h['eq10_flops'] / 1e12:.3g} TFLOPs, {h['eq10_ratio']:.1%} of no pruning)",
        f"  K1: {escape(h['k1_rule'])}",
        f"  K2: {escape(h['k2_rule'])}",
        f"  R1, R2: {escape(h['ratios_rule'])}",
        f"[bold]VisiPruner[/]: --mid-layer {v['mid_layer']} --deep-layer {v['deep_layer']} "
        f"--threshold {v['threshold']} --max-keep {v['max_keep']}  (Eq. 10 with the measured mean kept "
        f"{v['kept_mean']:.1f}: {v['eq10_flops'] / 1e12:.3g} TFLOPs, {v['eq10_ratio']:.1%}; as computed, "
        f"padded to min(C, |V|) slots: {v['eq10_ratio_padded']:.1%})",
        f"  K_M: {escape(v['mid_rule'])}",
        f"  K_E: {escape(v['deep_rule'])}",
        f"  kept: {escape(v['kept_rule'])}",
    ]
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


@app.command()
@user_errors
def analyze(
    image: Annotated[Optional[Path], typer.Argument(help="Image file.", show_default=False)] = None,
    question: Annotated[Optional[str], typer.Argument(help="Question about the image.", show_default=False)] = None,
    model: Annotated[str, typer.Option(
        "--model", help="Hugging Face hub id, local checkpoint directory, or built-in 'tiny' / 'tiny-gqa'.")] = "tiny",
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="JSONL file, one {\"image\": path, \"question\": text, \"answer\": text (optional)} per "
                       "line, or {\"video\": path, \"fps\"?, \"max_frames\"?, ...} for a clip (Qwen families) (relative "
                       "paths: relative to the file). Without an answer, the model's greedy next token is the "
                       "target of the saliency.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for analysis.json and the PNG plots.")] = Path("analysis"),
    limit: Annotated[Optional[int], typer.Option("--limit", help="Analyze only the first N requests.",
                                                 show_default=False)] = None,
    threshold: Annotated[float, typer.Option(
        "--threshold", help="VisiPruner tau: value-contribution threshold (reference critical set, static kept counts).")] = 0.2,
    max_keep: Annotated[int, typer.Option("--max-keep", help="VisiPruner cap C on kept image tokens.")] = 64,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, fp16 or bf16.")] = "fp32",
    threads: Annotated[int, typer.Option(
        "--threads", help="CPU threads for PyTorch. 0: one for models under 100M parameters on CPU (their "
                          "matrices are too small to split; measured 10x faster on a busy 2-core machine), "
                          "else PyTorch's default.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print analysis.json on stdout instead of tables.")] = False,
):
    """The papers' diagnostics per layer (attention mass, Eq. 1 saliency flows S_vv / S_vt, disruptions
    and the bias ratio D_l, VisiPruner's reference trigger layers) on the PyTorch model with eager
    attention, averaged over requests; recommends HiMAP (K1, K2) and VisiPruner (K_M, K_E) plans.

    Writes analysis.json, flows.png, disruption.png, triggers.png and attention_mass.png to --out.
    """
    import torch

    if not threshold >= 0:
        raise HimapError(f"--threshold must be >= 0, got {threshold}")
    if max_keep < 1:
        raise HimapError(f"--max-keep must be at least 1, got {max_keep}")
    if threads < 0:
        raise HimapError(f"--threads must be >= 0, got {threads}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise HimapError(f"--device must be cpu or cuda, got {device!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise HimapError(f"--out {str(out_dir)!r} exists and is not a directory")
    items = read_requests(data, image, question, limit)
    torch_dtype = loading.parse_dtype(dtype)
    requests = [analyze_lib.Request(prompt.load_image(path) if sampling is None else
                                    video_defaults.load_video(path, name=str(path), **sampling), q, answer)
                for path, q, answer, sampling in items]
    err.print(f"loading {model} ({dtype}, {device})")
    loaded = models.load_model(model, dtype=torch_dtype, device=device)
    dims = loaded.dims

    if threads == 0 and device == "cpu" and sum(p.numel() for p in loaded.model.parameters()) < SMALL_MODEL:
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    if max_keep > dims.num_image_tokens:
        raise HimapError(f"--max-keep {max_keep} exceeds the model's {dims.num_image_tokens} image tokens")
    with progress_bar() as progress:
        task = progress.add_task("analyze", total=len(requests))
        results = analyze_lib.analyze_model(loaded, requests, tau=threshold,
                                on_request=lambda i, _: progress.update(task, completed=i + 1))
    means = analysis_report.aggregate(results, dims.num_layers)
    plans = analysis_report.recommend(results, means, dims, tau=threshold, max_keep=max_keep)
    settings = {"threshold": threshold, "max_keep": max_keep, "dtype": dtype, "device": device,
                "data": None if data is None else str(data)}
    document = analysis_report.analysis_document(model, dims, results, means, plans, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "analysis.json").write_text(json.dumps(document, indent=1))
    plots = analysis_report.write_plots(document, out_dir)
    if as_json:
        print(json.dumps(document, indent=1))
        return
    _summary(out, document)
    out.print(f"wrote {out_dir / 'analysis.json'} and {', '.join(p.name for p in plots)}", highlight=False)
