"""The ``serve`` and ``bench-serve`` commands (:mod:`himap_trt.serve`).

Heavy imports (FastAPI, uvicorn, the runtime) happen inside the commands, so ``--help`` is quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from himap_trt import signing
from himap_trt.cli.app import app, user_errors
from himap_trt.errors import HimapError
from himap_trt.cli.lazy import lazy_import

# Library modules, imported when a command first uses them (himap_trt/cli/lazy.py: --help stays fast).
arch = lazy_import("himap_trt.arch")
export_manifest = lazy_import("himap_trt.manifest")
images = lazy_import("himap_trt.serve.images")
serve_app = lazy_import("himap_trt.serve.app")
serve_bench = lazy_import("himap_trt.serve.bench")
serve_server = lazy_import("himap_trt.serve.server")
serve_videos = lazy_import("himap_trt.serve.videos")
video_mod = lazy_import("himap_trt.video")


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise HimapError(f"--concurrency must be a comma-separated list of positive integers such as 1,2,4,8, got {text!r}")
    return values


@app.command("serve")
@user_errors
def serve(
    export_dir: Annotated[Path, typer.Option("--export-dir", help="Export directory written by `himap-trt export`.")]
    = Path("export"),
    backend: Annotated[str, typer.Option(
        "--backend", help="auto (TensorRT if engines, TensorRT and a GPU are there, else ONNX Runtime), "
                          "onnxruntime, tensorrt, or torch (the PyTorch reference).")] = "auto",
    engines_dir: Annotated[Optional[Path], typer.Option(
        "--engines", help="TensorRT engines directory [default: engines/ beside the export directory].")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda for the torch / onnxruntime backends.")]
    = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", help="KV-cache slots: most requests decoded together.")] = 8,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", help="Most requests waiting for a slot; more are refused with HTTP 429.")] = 64,
    mixed_prefill: Annotated[bool, typer.Option(
        "--mixed-prefill/--equal-prefill", help="Prefill waiting prompts of different lengths in one padded, masked "
                                                "call, or only prompts of equal length together (docs/PERFORMANCE.md).")]
    = False,
    max_seq_len: Annotated[Optional[int], typer.Option(
        "--max-seq-len", help="Most tokens (prompt + generated) per request; each slot's KV cache is this long "
                              "and decode steps attend over it [default: the export's].", show_default=False)] = None,
    model_name: Annotated[Optional[str], typer.Option(
        "--served-model-name", help="Model name clients send [default: the export's source model].",
        show_default=False)] = None,
    image_root: Annotated[Optional[Path], typer.Option(
        "--image-root", help="Allow file:// image URLs under this directory (refused without it).",
        show_default=False)] = None,
    allow_remote_images: Annotated[bool, typer.Option(
        "--allow-remote-images", help="Fetch http(s) image URLs (with --max-image-bytes and --image-timeout).")]
    = False,
    max_image_bytes: Annotated[int, typer.Option("--max-image-bytes", help="Largest encoded image (bytes).")]
    = 20 * 2**20,
    max_image_pixels: Annotated[int, typer.Option("--max-image-pixels", help="Largest decoded image (pixels).")]
    = 50_000_000,
    max_image_memory: Annotated[int, typer.Option(
        "--max-image-memory", help="Most memory decoding and preprocessing one image (or one video's kept frames) "
                                   "may take, estimated from its header before decoding (bytes; 7000x7000 RGB "
                                   "needs ~735 MB).")] = 256 * 2**20,
    image_timeout: Annotated[float, typer.Option("--image-timeout", help="Time limit of a remote image fetch "
                                                                         "(seconds).")] = 10.0,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", help="Largest request body; larger get HTTP 413 "
                                                                         "(bytes).")] = 32 * 2**20,
    video_fps: Annotated[float, typer.Option("--video-fps", help="Frames per second sampled from a video_url "
                                                                  "(Qwen exports).")] = 2.0,
    max_frames: Annotated[int, typer.Option("--max-frames", help="Most frames kept from a video_url (spread over "
                                                                  "the clip; 2..256).")] = 16,
    max_video_bytes: Annotated[int, typer.Option("--max-video-bytes", help="Largest encoded video (bytes).")]
    = 20 * 2**20,
    max_video_pixels: Annotated[int, typer.Option("--max-video-pixels", help="Largest video frame (pixels).")]
    = 4096 * 4096,
    drain_timeout: Annotated[float, typer.Option(
        "--drain-timeout", help="On SIGTERM: most seconds to let requests in flight finish.")] = 600.0,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level: critical, error, warning, info, "
                                                               "debug.")] = "info",
    require_signature: Annotated[Optional[Path], typer.Option(
        "--require-signature", metavar="PUB.pem",
        help="Refuse an export (and TensorRT engines) without a model-signing signature by this EC public key "
             "(PEM); checked before loading.", show_default="signatures not checked")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="HIMAP_TRT_API_KEY", show_default=False,
        help="Require 'Authorization: Bearer KEY' on /v1/* (401 otherwise), as vLLM's --api-key; prefer the "
             "environment variable (command lines are visible to other users) [default: none: no key].")] = None,
    insecure_no_auth: Annotated[bool, typer.Option(
        "--insecure-no-auth", help="Allow a --host beyond loopback without --api-key (anyone who can connect "
                                   "may use the server).")] = False,
    metrics_auth: Annotated[bool, typer.Option(
        "--metrics-auth/--no-metrics-auth", help="/metrics wants the API key too (/health never does).")] = False,
    read_timeout: Annotated[float, typer.Option(
        "--read-timeout", help="Most seconds a client may take to send a whole request (request line, headers, "
                               "body); slower connections are closed.")] = 30.0,
    keep_alive_timeout: Annotated[float, typer.Option(
        "--keep-alive-timeout", help="Close an idle kept-alive connection after this many seconds.")] = 5.0,
    wedged_after: Annotated[float, typer.Option(
        "--wedged-after", help="GET /health answers 503 'wedged' once one engine iteration has run this many "
                               "seconds.")] = 60.0,
):
    """Serve the export over an OpenAI-compatible API with continuous batching.

    POST /v1/chat/completions (one user message: an image_url part and text; stream, max_tokens,
    temperature, top_p, seed, stop), GET /v1/models, GET /health, GET /metrics (Prometheus).
    SIGTERM stops accepting requests, finishes those in flight, then exits.
    """
    serve_server.check_exposure(host, api_key, insecure_no_auth, metrics_auth)
    serve_server.check_positive(**{"--max-image-memory": max_image_memory, "--read-timeout": read_timeout,
                                   "--keep-alive-timeout": keep_alive_timeout, "--wedged-after": wedged_after})
    if not 0 < port < 65536:
        raise HimapError(f"--port must be in 1..65535, got {port}")
    if max_batch < 1:
        raise HimapError(f"--max-batch must be at least 1, got {max_batch}")
    if max_queue < 0:
        raise HimapError(f"--max-queue must be >= 0, got {max_queue}")
    if max_seq_len is not None and max_seq_len < 2:
        raise HimapError(f"--max-seq-len must be at least 2, got {max_seq_len}")
    frame_limit = video_mod.FRAME_LIMIT
    if not (video_fps > 0) or not 2 <= max_frames <= frame_limit:
        raise HimapError(f"--video-fps must be > 0 and --max-frames in [2, {frame_limit}], got {video_fps} and {max_frames}")
    if image_root is not None and not image_root.is_dir():
        raise HimapError(f"--image-root {str(image_root)!r} is not a directory")
    if log_level.lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise HimapError(f"--log-level must be one of critical, error, warning, info, debug; got {log_level!r}")
    if require_signature is not None:
        signing.check_public_key(require_signature)
        signing.verify_directory(export_dir, require_signature, what="--export-dir")
    manifest = export_manifest.load_manifest(export_dir, families=arch.get_architecture)
    if max_seq_len is not None and max_seq_len > manifest.max_seq_len:
        raise HimapError(f"--max-seq-len {max_seq_len} exceeds the export's max_seq_len {manifest.max_seq_len}")
    name = model_name or manifest.source_model
    config = serve_app.ServeConfig(
        export_dir=export_dir, backend=backend, device=device, engines_dir=engines_dir, max_batch=max_batch,
        max_queue=max_queue, model_name=name, max_seq_len=max_seq_len, mixed_prefill=mixed_prefill,
        images=images.ImagePolicy(image_root=image_root, allow_remote=allow_remote_images, max_bytes=max_image_bytes,
                                  max_pixels=max_image_pixels, max_memory=max_image_memory, timeout_s=image_timeout),
        videos=serve_videos.VideoPolicy(fps=video_fps, max_frames=max_frames, max_bytes=max_video_bytes,
                                        max_pixels=max_video_pixels, max_memory=max_image_memory),
        max_body_bytes=max_body_bytes, drain_timeout_s=drain_timeout, api_key=api_key, metrics_auth=metrics_auth,
        wedged_after_s=wedged_after, read_timeout_s=read_timeout, keep_alive_s=keep_alive_timeout,
        require_signature=require_signature)
    serve_server.serve(config, host=host, port=port, log_level=log_level.lower())


@app.command("bench-serve")
@user_errors
def bench_serve(
    url: Annotated[str, typer.Option("--url", help="Base URL of an OpenAI-compatible server.")]
    = "http://127.0.0.1:8000",
    concurrency: Annotated[str, typer.Option("--concurrency", help="Comma-separated concurrency levels.")]
    = "1,2,4,8,16",
    requests: Annotated[int, typer.Option("--requests", help="Requests per concurrency level.")] = 32,
    model: Annotated[Optional[str], typer.Option("--model", help="Model name [default: the first of GET /v1/models].",
                                                 show_default=False)] = None,
    image: Annotated[Optional[Path], typer.Option(
        "--image", help="Image sent with every request [default: a generated 336x336 PNG].", show_default=False)]
    = None,
    video: Annotated[Optional[Path], typer.Option(
        "--video", help="Send this video (.mp4, .webm, .mov, .mkv) as a video_url instead of an image (Qwen "
                        "exports).", show_default=False)] = None,
    video_fps: Annotated[Optional[float], typer.Option(
        "--video-fps", help="With --video: the request's fps field [default: the server's].", show_default=False)] = None,
    max_frames: Annotated[Optional[int], typer.Option(
        "--max-frames", help="With --video: the request's max_frames field [default: the server's].",
        show_default=False)] = None,
    evs_rate: Annotated[Optional[float], typer.Option(
        "--evs-rate", help="With --video: the request's evs_rate field [default: the export's].",
        show_default=False)] = None,
    prompt: Annotated[str, typer.Option("--prompt", help="Question sent with every request.")]
    = "Describe the image in detail.",
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="max_tokens of every request.")] = 64,
    conversations: Annotated[Optional[Path], typer.Option(
        "--conversations", help="JSONL of conversations (OpenAI messages arrays), sent in turn instead of --image "
                                "and --prompt: varied prompts.", show_default=False)] = None,
    ignore_eos: Annotated[bool, typer.Option(
        "--ignore-eos/--no-ignore-eos", help="Send the ignore_eos extension (vLLM's) so every answer has max_tokens "
                                             "tokens.")] = True,
    warmup: Annotated[int, typer.Option("--warmup", help="Requests sent (one at a time) before measuring.")] = 1,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="OPENAI_API_KEY",
                                                   help="Bearer token, if the server wants one.",
                                                   show_default=False)] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Time limit of one request (seconds).")] = 600.0,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of throughput and latencies here.",
                                                 show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")]
    = False,
):
    """Measure an OpenAI-compatible server: TTFT, TPOT, ITL, E2E (mean/p50/p99 ms), requests/s and
    output tokens/s per concurrency level (streamed requests, closed loop)."""
    from rich.console import Console
    from rich.table import Table

    levels = _concurrencies(concurrency)
    if requests < 1:
        raise HimapError(f"--requests must be at least 1, got {requests}")
    if max_tokens < 1:
        raise HimapError(f"--max-tokens must be at least 1, got {max_tokens}")
    if image is not None and not image.is_file():
        raise HimapError(f"--image {str(image)!r} does not exist")
    fields = {k: v for k, v in (("fps", video_fps), ("max_frames", max_frames), ("evs_rate", evs_rate)) if v is not None}
    if video is None and fields:
        raise HimapError("--video-fps, --max-frames and --evs-rate go with --video")
    if video is not None and image is not None:
        raise HimapError("pass either --image or --video, not both")
    if video is not None and conversations is not None:
        raise HimapError("pass either --conversations or --video, not both (a conversation's video_url parts "
                         "carry their own fields)")
    if video is not None:
        serve_bench.check_video_file(video)       # before any request
    err = Console(stderr=True)

    def progress(level):
        err.print(f"concurrency {level['concurrency']}: {level['completed']}/{level['requests']} ok, "
                  f"{level['output_throughput']:.1f} output tok/s", highlight=False)

    dataset = serve_bench.read_conversations(conversations) if conversations is not None else None
    report = serve_bench.benchmark(url, levels, requests, model=model, image=image, prompt=prompt, max_tokens=max_tokens,
                             ignore_eos=ignore_eos, warmup=warmup, api_key=api_key, timeout_s=timeout,
                             progress=None if as_json else progress, conversations=dataset, video=video,
                             video_fields=fields)
    if plot is not None:
        serve_bench.plot(report, plot)
    if as_json:
        print(serve_bench.as_json(report))
    else:
        def fmt(stats):
            return " / ".join("-" if stats[k] is None else f"{stats[k]:.1f}" for k in ("mean", "p50", "p99"))

        table = Table(title=f"{report['setup']['model']} at {report['setup']['url']} "
                            f"({requests} requests per level, max_tokens {max_tokens}); ms as mean / p50 / p99",
                      title_justify="left")
        for column in ("conc.", "ok", "req/s", "out tok/s", "TTFT ms", "TPOT ms", "ITL ms", "E2E ms"):
            table.add_column(column, justify="right")
        for level in report["levels"]:
            table.add_row(str(level["concurrency"]), f"{level['completed']}/{level['requests']}",
                          f"{level['request_throughput']:.2f}", f"{level['output_throughput']:.1f}",
                          fmt(level["ttft_ms"]), fmt(level["tpot_ms"]), fmt(level["itl_ms"]), fmt(level["e2e_ms"]))
        Console(highlight=False).print(table)
        for level in report["levels"]:
            for error in level["errors"]:
                err.print(f"concurrency {level['concurrency']}: failed: {error}", highlight=False, markup=False)
        if plot is not None:
            err.print(f"plot: {plot}")
    failed = sum(level["failed"] for level in report["levels"])
    if failed:
        raise HimapError(f"{failed} request(s) failed (see above)")
