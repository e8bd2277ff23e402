"""``himap-trt triton repo`` and ``himap-trt triton serve`` (:mod:`himap_trt.triton`)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from himap_trt.cli.app import app, user_errors
from himap_trt.triton.server import TritonServer, gpu_visible
from himap_trt.cli.lazy import lazy_import

# Library modules, imported when a command first uses them (himap_trt/cli/lazy.py: --help stays fast).
repository = lazy_import("himap_trt.triton.repository")

triton_app = typer.Typer(
    name="triton",
    help="Scale out on NVIDIA Triton Inference Server: write a model repository, serve it locally.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@triton_app.command("repo")
@user_errors
def repo(
    export_dir: Annotated[Path, typer.Option("--export-dir", help="Export directory written by `himap-trt export`.")]
    = Path("export"),
    engines_dir: Annotated[Optional[Path], typer.Option(
        "--engines", help="TensorRT engines built from the export (`himap-trt build`), copied in for GPU "
                          "instances (default: none: ONNX Runtime).", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", help="Model repository to write (replaced atomically).")]
    = Path("model_repository"),
    max_batch: Annotated[int, typer.Option(
        "--max-batch", help="Slots of each instance's continuous-batching engine (requests decoded together).")] = 8,
    instances: Annotated[int, typer.Option(
        "--instances", help="Instances of the himap model (per GPU for the gpu config); each loads the pipeline.")] = 1,
    model_config_name: Annotated[Optional[str], typer.Option(
        "--model-config-name", help="Which config is also config.pbtxt (loaded without tritonserver "
                                    "--model-config-name): cpu or gpu (default: gpu with --engines, else cpu).",
        show_default=False)] = None,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", help="Requests waiting for a slot per instance; more are refused (UNAVAILABLE).")] = 64,
    max_seq_len: Annotated[Optional[int], typer.Option(
        "--max-seq-len", help="Most tokens (prompt + generated) per request; each slot's KV cache is this long and "
                              "decode steps attend over it (default: the export's).", show_default=False)] = None,
    default_max_tokens: Annotated[int, typer.Option(
        "--default-max-tokens", help="New tokens for requests without max_tokens.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
):
    """Write a Triton model repository serving an export.

    The `himap` model (Python backend, decoupled: streams text pieces) runs the export, which is
    copied in (hard links where possible) so the repository is relocatable; `himap_unary` answers
    with one response per request (HTTP /infer clients). configs/cpu.pbtxt and configs/gpu.pbtxt hold
    the instance groups; pick one with tritonserver --model-config-name.
    """
    default = model_config_name or ("gpu" if engines_dir is not None else "cpu")
    options = repository.RepositoryOptions(max_batch=max_batch, instances=instances, default_config=default,
                                default_max_tokens=default_max_tokens, max_queue=max_queue, max_seq_len=max_seq_len)
    info = repository.write_repository(export_dir, out, options, engines_dir=engines_dir)
    if as_json:
        print(json.dumps({"out": str(out), **info.to_dict()}, indent=1))
        return
    print(f"wrote {out}/: models {', '.join(info.models)} ({info.source_model}, {info.plan}, {info.dtype}); "
          f"export {'and engines ' if info.engines else ''}as {info.files}; config.pbtxt = configs/{default}.pbtxt, "
          f"{instances} instance(s) x {max_batch} slots")
    print(f"serve it: himap-trt triton serve --repository {out}")


@triton_app.command("serve")
@user_errors
def serve(
    repository: Annotated[Path, typer.Option("--repository", help="Model repository (`himap-trt triton repo`).")]
    = Path("model_repository"),
    host: Annotated[str, typer.Option("--host", help="Address of the HTTP, gRPC and metrics endpoints.")]
    = "127.0.0.1",
    http_port: Annotated[int, typer.Option("--http-port", help="HTTP/REST port (KServe v2 API).")] = 8000,
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="gRPC port (streaming).")] = 8001,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Prometheus /metrics port.")] = 8002,
    model_config_name: Annotated[Optional[str], typer.Option(
        "--model-config-name", help="cpu or gpu: load each model's configs/<name>.pbtxt (default: gpu if an NVIDIA "
                                    "GPU is visible, else cpu).", show_default=False)] = None,
    log_verbose: Annotated[int, typer.Option("--log-verbose", help="tritonserver --log-verbose level.")] = 0,
    ready_timeout: Annotated[float, typer.Option("--ready-timeout", help="Seconds to wait for readiness.")] = 300.0,
):
    """Start the tritonserver of the nvidia-pytriton wheel on a repository (local use, tests).

    Sets up the Python backend for this Python (a backend directory with its stub, LD_LIBRARY_PATH,
    PATH). Stops on Ctrl-C / SIGTERM, finishing in-flight requests. In production, run NGC's Triton
    container instead: docs/DEPLOY.md.
    """
    name = model_config_name or ("gpu" if gpu_visible() else "cpu")
    server = TritonServer(repository, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          model_config_name=name, log_verbose=log_verbose)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        server.start()
        seconds = server.wait_ready(ready_timeout)
        print(f"ready in {seconds:.1f} s ({name} config): HTTP {server.http_url}, gRPC {server.grpc_url}, "
              f"metrics {server.metrics_url}", file=sys.stderr, flush=True)
        code = server.process.wait()
        if code:
            raise typer.Exit(code)
    except KeyboardInterrupt:
        print("stopping tritonserver (in-flight requests finish)", file=sys.stderr, flush=True)
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


app.add_typer(triton_app, name="triton")
