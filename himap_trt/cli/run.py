"""``himap-trt run``: answer questions about images with an export (:mod:`himap_trt.runtime`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from himap_trt.cli.app import app, err, out, print_table, user_errors
from rich.markup import escape

from himap_trt import signing
from himap_trt.cli.options import (METHOD_CHOICES, EnginesOpt, ExportDirOpt, JsonOpt, KernelSpecializationOpt,
                                   RequireSignatureOpt)
from himap_trt.errors import HimapError
from himap_trt.plan import (
    DEFAULT_K,
    DEFAULT_K1,
    DEFAULT_K2,
    DEFAULT_MAX_KEEP,
    DEFAULT_R,
    DEFAULT_R1,
    DEFAULT_R2,
    DEFAULT_THRESHOLD,
)
from himap_trt.plan import build_plan
from himap_trt.cli.lazy import lazy_import

# Library modules, imported when a command first uses them (himap_trt/cli/lazy.py: --help stays fast).
arch = lazy_import("himap_trt.arch")
export_manifest = lazy_import("himap_trt.manifest")
inputs = lazy_import("himap_trt.inputs")
loader = lazy_import("himap_trt.runtime.loader")
loading = lazy_import("himap_trt.models.loading")
memory = lazy_import("himap_trt.runtime.memory")
prompt = lazy_import("himap_trt.prompt")
sampling = lazy_import("himap_trt.runtime.sampling")
tiny = lazy_import("himap_trt.models.tiny")
tiny_qwen = lazy_import("himap_trt.models.tiny_qwen")
video_mod = lazy_import("himap_trt.video")
chat = lazy_import("himap_trt.chat")


def _check_run_memory(export_dir: Path, backend: str, model: Optional[str], device: Optional[str], *,
                      batch: int, force: bool) -> None:
    """Print run's memory estimate on ONNX Runtime (CPU) for a big export (>= 1 GiB of weights, or a
    quarter of the available memory) and refuse unless it fits or --force (himap_trt/runtime/memory.py);
    other backends and unreadable exports are left to open_pipeline."""
    import torch

    on_cpu = device in (None, "cpu") and not (device is None and torch.cuda.is_available())
    if model is not None or backend not in ("auto", "onnxruntime") or not on_cpu:
        return
    try:
        manifest = export_manifest.load_manifest(export_dir, verify=False, families=arch.get_architecture)
    except HimapError:
        return      # open_pipeline reports it

    estimate = memory.check_run_memory(export_dir, manifest, batch=batch, force=force)
    available = memory.available_bytes()
    if estimate.weights >= memory.GiB or (available and estimate.total > available / 4):   # big exports only
        err.print(f"memory: {estimate.describe()}", highlight=False, soft_wrap=True)



def _requests(image: Optional[Path], question: Optional[str], batch: Optional[Path]):
    """(image paths, questions, the batch file's requests or None) from the arguments or a JSONL file
    (checked, nothing loaded yet)."""
    if batch is not None:
        if image is not None or question is not None:
            raise HimapError("pass either IMAGE QUESTION or --batch FILE, not both")
        requests = inputs.read_batch_file(batch)
        return [r.image for r in requests], [r.question for r in requests], requests
    if image is None or question is None:
        raise HimapError("pass an IMAGE and a QUESTION (or --batch FILE with one JSON request per line)")
    return [image], [prompt.check_question(question)], None


def _load_request(request, fps: float, max_frames: int):
    """A batch-file request's image, or its video sampled at its own (else the flags') fps / max_frames."""
    if not request.video:
        return prompt.load_image(request.image)
    return video_mod.video_request(request.image, None, fps=fps if request.fps is None else request.fps,
                                   max_frames=max_frames if request.max_frames is None else request.max_frames)


def _single_conversation(request):
    """A ``--batch`` image / video line as a one-message conversation (its video fields on the part)."""
    options = {k: v for k, v in (("fps", request.fps), ("max_frames", request.max_frames),
                                 ("evs_rate", request.evs_rate)) if v is not None}
    return chat.Conversation.single(request.question, "video" if request.video else "image", str(request.image),
                                    options)


def _load_part(part, fps: float, max_frames: int):
    """A conversation's visual part: an image, or a video sampled at the part's own (else the flags')
    fps / max_frames (its ``evs_rate`` is applied by ``Pipeline.prepare_conversation``)."""
    if part.kind != "video":
        return prompt.load_image(part.source)
    own = chat.video_options(part, video_mod.FRAME_LIMIT)
    return video_mod.video_request(part.source, None, fps=fps if own.fps is None else own.fps,
                                   max_frames=max_frames if own.max_frames is None else own.max_frames)


@app.command()
@user_errors
def run(
    image: Annotated[Optional[Path], typer.Argument(help="Image file (JPEG, PNG, ...).", show_default=False)] = None,
    question: Annotated[Optional[str], typer.Argument(help="Question about the image.", show_default=False)] = None,
    batch: Annotated[Optional[Path], typer.Option(
        "--batch", help="JSONL file of requests, one {\"image\": path, \"question\": text} (or {\"video\": path, ...} "
                        "with optional fps, max_frames, evs_rate) per line; run as one padded batch (relative "
                        "paths are relative to the file). A line may instead hold a conversation, "
                        "{\"messages\": [...]}: then every line runs on its own, in order.",
        show_default="none: IMAGE QUESTION")] = None,
    messages: Annotated[Optional[Path], typer.Option(
        "--messages", help="JSON file of one conversation (OpenAI's messages: system / developer / user / assistant, "
                           "string or parts content; image_url / video_url parts hold local paths, relative to "
                           "the file).", show_default="none: IMAGE QUESTION")] = None,
    export_dir: ExportDirOpt = Path("export"),
    engines_dir: EnginesOpt = None,
    backend: Annotated[str, typer.Option(
        "--backend", metavar="[auto|onnxruntime|tensorrt|torch]",
        help="auto: TensorRT if engines, TensorRT and a GPU are there, else ONNX Runtime; torch: the "
             "PyTorch reference.")] = "auto",
    model: Annotated[Optional[str], typer.Option(
        "--model", help="With --backend torch: run the reference straight from this checkpoint (no export).",
        show_default="none: read --export-dir")] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", metavar="[cpu|cuda|cuda:N]", help="Device of the torch / onnxruntime backends.",
        show_default="cuda if usable, else cpu")] = None,
    dtype: Annotated[str, typer.Option("--dtype", metavar="[fp32|fp16|bf16]", help="With --model: the dtype.")] = "fp32",
    method: Annotated[Optional[str], typer.Option(
        "--method", metavar=METHOD_CHOICES, help="Expected plan (checked against the export).",
        show_default="the export's")] = None,
    k1: Annotated[Optional[int], typer.Option("--k1", show_default="the export's", help="Expected HiMAP K1.")] = None,
    r1: Annotated[Optional[float], typer.Option("--r1", show_default="the export's", help="Expected HiMAP R1.")] = None,
    k2: Annotated[Optional[int], typer.Option("--k2", show_default="the export's", help="Expected HiMAP K2.")] = None,
    r2: Annotated[Optional[float], typer.Option("--r2", show_default="the export's", help="Expected HiMAP R2.")] = None,
    k: Annotated[Optional[int], typer.Option("--k", show_default="the export's", help="Expected FastV K.")] = None,
    r: Annotated[Optional[float], typer.Option("--r", show_default="the export's", help="Expected FastV R.")] = None,
    mid_layer: Annotated[Optional[int], typer.Option("--mid-layer", show_default="the export's",
                                                     help="Expected VisiPruner K_M.")] = None,
    deep_layer: Annotated[Optional[int], typer.Option("--deep-layer", show_default="the export's",
                                                      help="Expected VisiPruner K_E.")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", show_default="the export's",
                                                       help="Expected VisiPruner tau.")] = None,
    max_keep: Annotated[Optional[int], typer.Option("--max-keep", show_default="the export's",
                                                    help="Expected VisiPruner C.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate.")] = 32,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy; > 0: sample.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k most likely tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold (1: off).")] = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed.", show_default="random")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Generate exactly --max-new-tokens (EOS does "
                                                                  "not stop a row; for benchmarks).")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print the answer as it is generated "
                                                                      "(one request, no --json).")] = True,
    force: Annotated[bool, typer.Option(
        "--force", help="Run even when the memory estimate of ONNX Runtime on CPU exceeds the available "
                        "memory.")] = False,
    video: Annotated[Optional[Path], typer.Option(
        "--video", help="Ask QUESTION about this video file (MP4, WebM, ...; decoded with PyAV; Qwen2.5-VL / "
                        "Qwen3-VL exports): himap-trt run --video clip.mp4 \"question\".",
        show_default="none: an image")] = None,
    frames: Annotated[Optional[list[Path]], typer.Option(
        "--frames", help="A video given as frames, in order, 1/--video-fps seconds apart (repeat: --frames a.png "
                         "--frames b.png).", show_default="none")] = None,
    video_fps: Annotated[float, typer.Option("--video-fps", help="Frames per second sampled from --video (the "
                                                                  "rate of --frames).")] = 2.0,
    max_frames: Annotated[int, typer.Option("--max-frames", help="Most frames sampled from --video (spread over "
                                                                  "the whole clip; even count).")] = 16,
    require_signature: RequireSignatureOpt = None,
    kernel_specialization: KernelSpecializationOpt = "lazy",
    as_json: JsonOpt = False,
):
    """Answer a question about an image (or a video: --video, --frames) with the exported pipeline.

    Prints the answer, the image tokens kept by each pruning stage, TTFT, TPOT, tokens/s and the
    KV-cache size. --json prints everything (and the kept tokens' positions) as JSON.
    """
    import time

    # every option and request is checked before an image or a model is loaded
    clip = video is not None or bool(frames)
    if clip and question is None and image is not None:
        image, question = None, str(image)          # himap-trt run --video clip.mp4 "question"
    if clip and (image is not None or batch is not None):
        raise HimapError("--video / --frames take the place of IMAGE (and of --batch); pass QUESTION only")
    conversations, listed = None, None
    if messages is not None:
        if image is not None or question is not None or batch is not None or clip:
            raise HimapError("--messages FILE holds the whole conversation; pass no IMAGE, QUESTION, --batch or --video")
        conversations = [inputs.read_messages_file(messages)]
        paths, questions = [str(messages)], [conversations[0].messages[-1].text]
    elif batch is not None and not clip and image is None and question is None:
        listed = inputs.read_batch_file(batch)
        if any(r.conversation is not None for r in listed):     # every line on its own, as a conversation
            conversations = [r.conversation or _single_conversation(r) for r in listed]
        paths = [str(r.image) if r.image else f"{batch}:{i + 1}" for i, r in enumerate(listed)]
        questions = [r.question or r.conversation.messages[-1].text for r in listed]
    else:
        paths, questions, listed = (([video or "--frames"], [prompt.check_question(question or "")], None) if clip
                                    else _requests(image, question, batch))
    config = sampling.GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, ignore_eos=ignore_eos)
    if backend not in loader.BACKENDS:
        raise HimapError(f"--backend must be one of {', '.join(loader.BACKENDS)}, got {backend!r}")
    loader.check_device(device)
    loading.canonical_dtype(dtype)
    if require_signature is not None:
        signing.check_public_key(require_signature)
    if config.ignored_options:
        err.print(f"note: {' and '.join(config.ignored_options)} ignored: sampling is off (--temperature 0), "
                  "decoding greedily", highlight=False, soft_wrap=True)
    if conversations is not None:       # each conversation's visual inputs, in prompt order (a video part's own
        visuals = [[_load_part(p, video_fps, max_frames) for p in c.visual_parts] for c in conversations]   # fields)
        images = [v for vs in visuals for v in vs]
    else:
        images = ([video_mod.video_request(video, frames, fps=video_fps, max_frames=max_frames)] if clip
                  else [_load_request(r, video_fps, max_frames) for r in listed] if listed is not None
                  else [prompt.load_image(p) for p in paths])
    requested = None
    if any(v is not None for v in (method, k1, r1, k2, r2, k, r, mid_layer, deep_layer, threshold, max_keep)):
        def requested(num_layers: int, num_image_tokens: int):
            return build_plan(method or "himap", num_layers=num_layers, num_image_tokens=num_image_tokens,
                              k1=DEFAULT_K1 if k1 is None else k1, r1=DEFAULT_R1 if r1 is None else r1,
                              k2=DEFAULT_K2 if k2 is None else k2, r2=DEFAULT_R2 if r2 is None else r2,
                              k=DEFAULT_K if k is None else k, r=DEFAULT_R if r is None else r,
                              mid_layer=mid_layer, deep_layer=deep_layer,
                              threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                              max_keep=DEFAULT_MAX_KEEP if max_keep is None else max_keep)

    _check_run_memory(export_dir, backend, model, device, batch=max(len(images), 1), force=force)
    opened = loader.open_pipeline(export_dir=export_dir, backend=backend, model=model, requested_plan=requested,
                           engines_dir=engines_dir, device=device, dtype=dtype, require_signature=require_signature,
                           kernel_specialization=kernel_specialization)
    pipeline = opened.pipeline
    if conversations is not None:
        _run_conversations(opened, conversations, visuals, paths, questions, config, stream and not as_json, as_json)
        return
    try:
        started = time.perf_counter()
        prepared = pipeline.prepare(images, questions)
        if listed is not None and any(r.evs_rate is not None for r in listed):
            prepared.evs_rates = [r.evs_rate for r in listed]      # a line's own EVS rate (runtime/evs.py)
        preprocess_s = time.perf_counter() - started
        streamer = None
        streaming = stream and not as_json and len(images) == 1
        if streaming:
            from transformers import TextStreamer

            out.print("[bold]answer:[/] ", end="")
            streamer = TextStreamer(pipeline.processor.tokenizer, skip_special_tokens=True)
        result = pipeline.generate(prepared, config, streamer=streamer, preprocess_s=preprocess_s)
    finally:
        pipeline.close()
    report = _run_report(opened, paths, questions, result)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_answers(report, streaming)

    if report["model"] in tiny.TINY_MODELS or report["model"] in tiny_qwen.TINY_QWEN_MODELS:
        out.print(f"[dim]note: {report['model']} is a built-in model with random weights; its text is meaningless[/]")
    _print_run_stats(report)


def _run_conversations(opened, conversations, visuals, paths, questions, config, stream: bool, as_json: bool) -> None:
    """``run --messages`` / a ``--batch`` file with conversations: each conversation prepared and
    generated on its own, in order (their prompts are not padded into one batch)."""
    import time

    pipeline = opened.pipeline
    reports = []
    streaming = stream and len(conversations) == 1
    try:
        for conversation, items in zip(conversations, visuals):
            started = time.perf_counter()
            prepared = pipeline.prepare_conversation(conversation, items)
            streamer = None
            if streaming:
                from transformers import TextStreamer

                out.print("[bold]answer:[/] ", end="")
                streamer = TextStreamer(pipeline.processor.tokenizer, skip_special_tokens=True)
            result = pipeline.generate(prepared, config, streamer=streamer, preprocess_s=time.perf_counter() - started)
            reports.append(_run_report(opened, [None], [None], result))
    finally:
        pipeline.close()
    report = reports[0]
    report["requests"] = [{**r["requests"][0], "image": path, "question": question}
                          for r, path, question in zip(reports, paths, questions)]
    report["stats"]["batch_size"] = 1
    report["stats"]["conversations"] = len(reports)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_answers(report, streaming)
    _print_run_stats(report)


def _print_answers(report: dict, streaming: bool) -> None:
    """Each request's answer, numbered when there are several (nothing when it was streamed)."""
    if streaming:
        return
    for i, request in enumerate(report["requests"]):
        prefix = escape(f"[{i}] ") if len(report["requests"]) > 1 else ""
        out.print(f"[bold]{prefix}answer:[/] {escape(request['answer'])}")


def _run_report(opened, paths, questions, result) -> dict:
    plan = opened.pipeline.plan
    requests = []
    for row, (path, question) in enumerate(zip(paths, questions)):
        kept_positions = [stage.kept_image_positions[row] for stage in result.stages]
        requests.append({
            "image": str(path), "question": question, "answer": result.texts[row], "tokens": result.tokens[row],
            "finish_reason": result.finish_reasons[row], "prompt_tokens": result.prompt_tokens[row],
            "new_tokens": len(result.tokens[row]),
            "image_tokens_per_segment": (result.image_tokens_per_row[row] if result.image_tokens_per_row
                                         else result.image_tokens_per_segment),
            "kept_image_positions": kept_positions,
        })
    return {
        "backend": opened.backend, "device": opened.device, "model": opened.source, "plan": plan.to_dict(),
        "plan_description": plan.describe(), "segments": [list(s) for s in plan.segments],
        "requests": requests,
        "stats": {"batch_size": len(requests), "ttft_s": result.ttft_s, "tpot_s": result.tpot_s,
                  "tokens_per_s": result.tokens_per_s, "kv_cache_bytes": result.kv_cache_bytes,
                  "timings_s": result.timings},
    }


def _print_run_stats(report: dict) -> None:
    from rich.table import Table

    stats = report["stats"]
    first = report["requests"][0]
    segments = report["segments"]
    kept = " -> ".join(f"{n} (layers {a}-{b - 1})" for n, (a, b) in zip(first["image_tokens_per_segment"], segments))
    table = Table(show_header=False, title=f"{report['backend']} on {report['device']}: {report['plan_description']}",
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = {tuple(r["image_tokens_per_segment"]) for r in report["requests"]}
    if len(rows) == 1:
        table.add_row("image tokens per segment", kept)
    else:  # per-request image-token counts (Qwen2.5-VL): one row per request
        for i, request in enumerate(report["requests"]):
            table.add_row(f"[{i}] image tokens per segment", " -> ".join(
                f"{n} (layers {a}-{b - 1})" for n, (a, b) in zip(request["image_tokens_per_segment"], segments)))
    table.add_row("prompt tokens", ", ".join(str(r["prompt_tokens"]) for r in report["requests"]))
    table.add_row("new tokens", ", ".join(f"{r['new_tokens']} ({r['finish_reason']})" for r in report["requests"]))
    table.add_row("TTFT", f"{stats['ttft_s'] * 1e3:.1f} ms")
    table.add_row("TPOT", f"{stats['tpot_s'] * 1e3:.1f} ms")
    table.add_row("tokens/s", f"{stats['tokens_per_s']:.1f}")
    table.add_row("KV cache", f"{stats['kv_cache_bytes'] / 1e6:.2f} MB ({stats['batch_size']} request(s))")
    print_table(table)

