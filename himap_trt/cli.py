"""The ``himap-trt`` command line.

User errors (:class:`~himap_trt.errors.HimapError`) print one line on stderr and exit with
status 1, without a traceback. Heavy imports happen inside the commands so ``--help`` is quick.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from himap_trt.errors import HimapError
from himap_trt.plan import (
    METHODS,
    DEFAULT_K,
    DEFAULT_K1,
    DEFAULT_K2,
    DEFAULT_MAX_KEEP,
    DEFAULT_R,
    DEFAULT_R1,
    DEFAULT_R2,
    DEFAULT_THRESHOLD,
)

app = typer.Typer(
    name="himap-trt",
    help="Deploy LLaVA-style multimodal LLMs with in-decoder image-token pruning (HiMAP, FastV): "
         "export the model as a chain of ONNX graphs, build TensorRT engines, run with per-segment KV caches.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: rich markup would swallow "[default: ...]" and keep docstrings' line breaks.
    rich_markup_mode=None,
    add_completion=False,
)
err = Console(stderr=True)
out = Console(highlight=False)


def _plain(line: str) -> None:
    """Print a line as is (no rich markup: '[I]' and user text stay literal)."""
    out.print(escape(line), soft_wrap=True, highlight=False)


def user_errors(func):
    """Turn a :class:`HimapError` into a one-line message on stderr and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except HimapError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        from himap_trt import __version__

        print(f"himap-trt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Deploy LLaVA-style multimodal LLMs with in-decoder image-token pruning (HiMAP, FastV)."""


METHOD_CHOICES = f"[{'|'.join(METHODS)}]"

# -- shared options -------------------------------------------------------------------------------
ModelOpt = Annotated[str, typer.Option(
    "--model", help="Hugging Face hub id, local checkpoint directory, built-in 'tiny' / 'tiny-gqa' / 'medium' "
                    "(random weights) or 'shapes' (trained on synthetic scenes), or a known name "
                    "('llava-1.5-7b', 'llava-1.5-13b').")]
MethodOpt = Annotated[str, typer.Option("--method", metavar=METHOD_CHOICES,
                                        help="Pruning method (random: HiMAP's layers and counts, a seeded random "
                                             "subset of image tokens; the control).")]
PlanSeedOpt = Annotated[int, typer.Option("--plan-seed", help="--method random: seed of the random image-token "
                                                              "permutation baked into the scoring graphs.")]
K1Opt = Annotated[int, typer.Option("--k1", help="HiMAP: layer of the shallow stage (img->txt scores of layer K1-1).")]
R1Opt = Annotated[float, typer.Option("--r1", help="HiMAP: fraction of image tokens dropped at K1.")]
K2Opt = Annotated[int, typer.Option("--k2", help="HiMAP: layer of the deep stage (img->img scores of layer K2-1).")]
R2Opt = Annotated[float, typer.Option("--r2", help="HiMAP: fraction of the remaining image tokens dropped at K2.")]
KOpt = Annotated[int, typer.Option("--k", help="FastV: layer of the stage (last-token scores of layer K-1).")]
ROpt = Annotated[float, typer.Option("--r", help="FastV: fraction of image tokens dropped at K.")]
MidOpt = Annotated[Optional[int], typer.Option(
    "--mid-layer", help="VisiPruner: K_M, layer of the middle stage (value-contribution scores of layer K_M-1).",
    show_default="L/2")]
DeepOpt = Annotated[Optional[int], typer.Option(
    "--deep-layer", help="VisiPruner: K_E, from this layer on no image token is left.",
    show_default="3L/4")]
ThresholdOpt = Annotated[float, typer.Option(
    "--threshold", help="VisiPruner: tau, keep image tokens whose value contribution norm exceeds it.")]
MaxKeepOpt = Annotated[int, typer.Option("--max-keep", help="VisiPruner: C, most image tokens kept at K_M.")]
MaxImageTokensOpt = Annotated[Optional[int], typer.Option(
    "--max-image-tokens", help="Models with per-request image-token counts (Qwen2.5-VL): the most image tokens "
                               "one request may have (bounds graphs, profiles, FLOPs).",
    show_default="the processor's max pixels / 28², 16384 for the published Qwen2.5-VL")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")]
SignOpt = Annotated[Optional[Path], typer.Option(
    "--sign", metavar="KEY.pem", help="Sign the written directory with this EC private key (PEM, unencrypted) "
                                      "using OpenSSF model-signing: model.sig inside it.", show_default="unsigned")]
RequireSignatureOpt = Annotated[Optional[Path], typer.Option(
    "--require-signature", metavar="PUB.pem",
    help="Refuse an export (and TensorRT engines) without a model-signing signature by this EC public key (PEM).",
    show_default="signatures not checked")]
ExportDirOpt = Annotated[Path, typer.Option("--export-dir", help="Export directory written by `himap-trt export`.")]
EnginesOpt = Annotated[Optional[Path], typer.Option(
    "--engines", help="TensorRT engines directory.", show_default="engines/ beside the export directory")]


def _plan(config: Any, method: str, k1: int, r1: float, k2: int, r2: float, k: int, r: float, *, dims=None,
          **extra):
    from himap_trt.models import model_dims
    from himap_trt.plan import build_plan

    dims = dims or model_dims(config)
    return build_plan(method, num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens,
                      k1=k1, r1=r1, k2=k2, r2=r2, k=k, r=r, **extra)


# -- flops ------------------------------------------------------------------------------------------
@app.command()
@user_errors
def flops(
    model: ModelOpt = "llava-hf/llava-1.5-7b-hf",
    method: MethodOpt = "himap",
    k1: K1Opt = DEFAULT_K1, r1: R1Opt = DEFAULT_R1, k2: K2Opt = DEFAULT_K2, r2: R2Opt = DEFAULT_R2,
    k: KOpt = DEFAULT_K, r: ROpt = DEFAULT_R,
    mid_layer: MidOpt = None, deep_layer: DeepOpt = None, threshold: ThresholdOpt = DEFAULT_THRESHOLD,
    max_keep: MaxKeepOpt = DEFAULT_MAX_KEEP,
    assume_kept: Annotated[Optional[float], typer.Option(
        "--assume-kept", help="VisiPruner: image tokens a request keeps at K_M, for Eq. 10 (e.g. a measured mean).",
        show_default="--max-keep, the slots the static graphs compute")] = None,
    prompt_len: Annotated[Optional[int], typer.Option(
        "--prompt-len", help="Prompt tokens (image tokens included) for the whole-prompt count.",
        show_default="image tokens + 64")] = None,
    image_tokens: Annotated[Optional[int], typer.Option(
        "--image-tokens", help="This request's image tokens |V| (models with per-request counts, Qwen2.5-VL).",
        show_default="the model's |V| (its bound where it varies)")] = None,
    max_image_tokens: MaxImageTokensOpt = None,
    as_json: JsonOpt = False,
):
    """FLOPs of a plan: the paper's image-token count (Eq. 10) and the whole-prompt prefill count.

    Eq. 10 (HiMAP Sec. 4.2) counts image tokens only and is printed, like the paper's Table 1, in
    TFLOPs truncated to two decimals. The whole-prompt count (2 FLOPs per multiply-accumulate: all
    tokens, vision tower, scoring, lm_head) is the one to compare with measured time.
    """
    from himap_trt.arch import resolve_dims
    from himap_trt.flops import flops_report, format_tflops
    from himap_trt.models import load_config

    config = load_config(model)
    dims = resolve_dims(model, config, max_image_tokens)
    if image_tokens is not None:
        if image_tokens < 1:
            raise HimapError(f"--image-tokens must be at least 1, got {image_tokens}")
        from himap_trt.arch import get_architecture

        if not get_architecture(dims.architecture).variable_image_tokens and image_tokens != dims.num_image_tokens:
            raise HimapError(f"--image-tokens: {model!r} always has {dims.num_image_tokens} image tokens per request")
        dims = get_architecture(dims.architecture).with_max_image_tokens(dims, image_tokens)   # Eq. 10 with this |V|
    plan = _plan(config, method, k1, r1, k2, r2, k, r, dims=dims, mid_layer=mid_layer, deep_layer=deep_layer,
                 threshold=threshold, max_keep=max_keep)
    if assume_kept is not None:
        if method != "visipruner":
            raise HimapError("--assume-kept is for --method visipruner (its per-request kept count)")
        if not 0 <= assume_kept <= max_keep:
            raise HimapError(f"--assume-kept must be between 0 and --max-keep {max_keep}, got {assume_kept:g}")
    report = flops_report(model, plan, dims, prompt_len or dims.num_image_tokens + 64, kept=assume_kept)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{model}: {plan.describe()}", title_justify="left")
    table.add_column("count")
    table.add_column("no pruning", justify="right")
    table.add_column(plan.method, justify="right")
    table.add_column("ratio", justify="right")
    label = "image tokens, Eq. 10 (TFLOPs)"
    if plan.method == "visipruner":
        label += f", n kept = {plan.stages[0].keep if assume_kept is None else assume_kept:g}"
    table.add_row(label, format_tflops(report.image_tokens_baseline),
                  format_tflops(report.image_tokens_plan), f"{report.image_tokens_ratio:.3f}")
    pb, pp = report.prompt_baseline, report.prompt_plan
    table.add_row(f"whole prompt, {pb.prompt_tokens} tokens (TFLOPs)", f"{pb.total / 1e12:.3f}",
                  f"{pp.total / 1e12:.3f}", f"{report.prompt_ratio:.3f}")
    table.add_row("  of which decoder", f"{pb.decoder / 1e12:.3f}", f"{pp.decoder / 1e12:.3f}", "")
    table.add_row("  vision tower + projector", f"{pb.vision / 1e12:.3f}", f"{pp.vision / 1e12:.3f}", "")
    out.print(table)


# -- export ---------------------------------------------------------------------------------------
def _progress():
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err, transient=False)


@app.command()
@user_errors
def export(
    model: ModelOpt = "llava-hf/llava-1.5-7b-hf",
    method: MethodOpt = "himap",
    k1: K1Opt = DEFAULT_K1, r1: R1Opt = DEFAULT_R1, k2: K2Opt = DEFAULT_K2, r2: R2Opt = DEFAULT_R2,
    k: KOpt = DEFAULT_K, r: ROpt = DEFAULT_R,
    mid_layer: MidOpt = None, deep_layer: DeepOpt = None, threshold: ThresholdOpt = DEFAULT_THRESHOLD,
    max_keep: MaxKeepOpt = DEFAULT_MAX_KEEP,
    plan_seed: PlanSeedOpt = 0,
    max_image_tokens: MaxImageTokensOpt = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Export directory (replaced atomically on success).")] = Path("export"),
    dtype: Annotated[str, typer.Option("--dtype", metavar="[fp32|fp16|bf16]", help="Graph precision (TensorRT "
                                                   "builds strongly typed networks from it).")] = "fp32",
    max_seq_len: Annotated[Optional[int], typer.Option(
        "--max-seq-len", help="Most tokens (prompt + generated) per sequence; sizes the TensorRT profiles.",
        show_default="the model's positions, at most 2048")] = None,
    opset: Annotated[int, typer.Option("--opset", metavar="[18|19|20]", help="ONNX opset.")] = 18,
    kv_write: Annotated[str, typer.Option(
        "--kv-write", metavar="[scatternd|tensorscatter|gqa]",
        help="How segment graphs write KV caches in place: scatternd (ScatterND; ONNX Runtime, every "
             "TensorRT 10.x), tensorscatter (opset-24 TensorScatter; TensorRT 10.15+/11 in-place "
             "KV-cache update) or gqa (ONNX Runtime's GroupQueryAttention: decode attends over the "
             "occupied cache only, flat TPOT; ONNX Runtime only, fp32/fp16).")] = "scatternd",
    validate: Annotated[bool, typer.Option(
        "--validate/--no-validate", help="Compare every graph with PyTorch after export (ONNX Runtime; ONNX's "
                                         "reference evaluator where ONNX Runtime cannot run the dtype).")] = True,
    validate_chunk_layers: Annotated[Optional[int], typer.Option(
        "--validate-chunk-layers", min=0,
        help="Validate decoder segments in chunks of this many layers (bounds the memory of validation; "
             "0: whole segments).",
        show_default="auto: as many layers as fit 1 GiB of weights (2 for 7B fp16, 1 for 13B, whole "
                     "segments for the tiny models)")] = None,
    device: Annotated[str, typer.Option(
        "--device", metavar="[cpu|cuda|cuda:N]",
        help="Where the PyTorch reference of the validation runs (tracing and ONNX Runtime stay on the CPU).")] = "cpu",
    build_engines_too: Annotated[bool, typer.Option(
        "--build", help="Then build TensorRT engines into engines/ beside --out (batch 1; see `himap-trt build`).")] = False,
    sign: SignOpt = None,
    as_json: JsonOpt = False,
):
    """Export a LLaVA checkpoint as a chain of ONNX graphs for a pruning plan.

    Writes vision.onnx, embed.onnx, one segment_<j>.onnx per decoder segment of the plan (each with
    KV-cache inputs/outputs and dynamic sequence length), one scoring_<j>.onnx per pruning stage, the
    processor and manifest.json. A failed export leaves an existing export at --out untouched.
    A local safetensors checkpoint is streamed: each decoder layer's weights are read from the files
    when its graph is written (or the reference runs it) and released after.
    """
    from himap_trt.export import ExportOptions, check_max_seq_len, check_reference_device, export_model
    from himap_trt.export.manifest import MANIFEST_NAME, is_export_manifest
    from himap_trt.fsutil import check_target, output_lock
    from himap_trt.arch import resolve_dims
    from himap_trt.models import load_config, load_model
    from himap_trt.models.loading import DTYPES, canonical_dtype

    # bad options, a foreign or busy --out, or (with --build) a missing TensorRT fail before any work
    options = ExportOptions(out=out_dir, dtype=canonical_dtype(dtype), opset=opset, max_seq_len=max_seq_len,
                            validate=validate, kv_write=kv_write, validate_chunk_layers=validate_chunk_layers,
                            device=device, sign_key=sign)
    if validate:
        check_reference_device(device)
    config = load_config(model)
    dims = resolve_dims(model, config, max_image_tokens)
    check_max_seq_len(dims, max_seq_len)
    plan = _plan(config, method, k1, r1, k2, r2, k, r, dims=dims, mid_layer=mid_layer, deep_layer=deep_layer,
                 threshold=threshold, max_keep=max_keep, seed=plan_seed)
    check_target(out_dir, marker=MANIFEST_NAME, flag="--out", recognise=is_export_manifest)
    if build_engines_too:
        if kv_write == "gqa":
            raise HimapError("--build needs a TensorRT-parsable export: --kv-write gqa is ONNX Runtime only; "
                             "use --kv-write scatternd or tensorscatter")
        _require_tensorrt()
    with output_lock(out_dir, flag="--out"):
        err.print(f"loading {model} ({options.dtype})")
        from himap_trt.models.streaming import load_streamed

        loaded = load_streamed(model, dtype=DTYPES[options.dtype]) or load_model(model, dtype=DTYPES[options.dtype])
        err.print(f"plan: {plan.describe()}")
        with _progress() as progress:
            task = progress.add_task("export", total=None)

            def report(text: str, done: int, total: int) -> None:
                progress.update(task, description=text, completed=done, total=total)

            manifest, checks = export_model(loaded, plan, options, progress=report)
            progress.update(task, description="export complete", completed=progress.tasks[0].total)
    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    built = _build_engines(out_dir, None, manifest, max_batch=1, max_seq_len=manifest.max_seq_len, workspace=0,
                           timing_cache=None, sign_key=sign) if build_engines_too else None
    if as_json:
        print(json.dumps({"out": str(out_dir), "manifest": manifest.to_dict(), "bytes": size,
                          "checks": [c.__dict__ for c in checks],
                          "engines": built.to_dict() if built else None}, indent=2))
        return
    _print_checks(checks)
    out.print(f"exported {len(manifest.graphs)} graphs to {out_dir}/ ({size / 1e6:.1f} MB): "
              + ", ".join(p.name for p in files if p.suffix == ".onnx"))
    if built:
        _print_built(built)


def _check_run_memory(export_dir: Path, backend: str, model: Optional[str], device: Optional[str], *,
                      batch: int, force: bool) -> None:
    """Print run's memory estimate on ONNX Runtime (CPU) for a big export (>= 1 GiB of weights, or a
    quarter of the available memory) and refuse unless it fits or --force (himap_trt/runtime/memory.py);
    other backends and unreadable exports are left to open_pipeline."""
    import torch

    from himap_trt.export.manifest import load_manifest
    from himap_trt.runtime.memory import check_run_memory

    on_cpu = device in (None, "cpu") and not (device is None and torch.cuda.is_available())
    if model is not None or backend not in ("auto", "onnxruntime") or not on_cpu:
        return
    try:
        manifest = load_manifest(export_dir, verify=False)
    except HimapError:
        return      # open_pipeline reports it
    from himap_trt.runtime.memory import GiB, available_bytes

    estimate = check_run_memory(export_dir, manifest, batch=batch, force=force)
    available = available_bytes()
    if estimate.weights >= GiB or (available and estimate.total > available / 4):   # big exports only
        err.print(f"memory: {estimate.describe()}", highlight=False, soft_wrap=True)


def _print_checks(checks) -> None:
    if not checks:
        out.print("validation skipped (--no-validate)")
        return
    from rich.table import Table

    table = Table(title="validation against PyTorch", title_justify="left")
    for column in ("graph", "phase", "backend", "outputs", "worst output", "max abs diff", "status"):
        table.add_column(column, justify="right" if column in ("outputs", "max abs diff") else "left")
    groups: dict[tuple[str, str], list] = {}
    for check in checks:
        groups.setdefault((check.graph, check.phase), []).append(check)
    for (graph, phase), items in groups.items():
        worst = max(items, key=lambda c: c.max_abs_diff)
        status = "ok" if all(c.ok for c in items) else "[red]FAIL[/]"
        table.add_row(graph, phase, worst.backend, str(len(items)), worst.output, f"{worst.max_abs_diff:.2e}", status)
    out.print(table)


# -- run --------------------------------------------------------------------------------------------
def _requests(image: Optional[Path], question: Optional[str], batch: Optional[Path]):
    """(image paths, questions) from the arguments or a JSONL file (checked, nothing loaded yet)."""
    from himap_trt.inputs import read_batch_file
    from himap_trt.prompt import check_question

    if batch is not None:
        if image is not None or question is not None:
            raise HimapError("pass either IMAGE QUESTION or --batch FILE, not both")
        requests = read_batch_file(batch)
        return [r.image for r in requests], [r.question for r in requests]
    if image is None or question is None:
        raise HimapError("pass an IMAGE and a QUESTION (or --batch FILE with one JSON request per line)")
    return [image], [check_question(question)]


@app.command()
@user_errors
def run(
    image: Annotated[Optional[Path], typer.Argument(help="Image file (JPEG, PNG, ...).", show_default=False)] = None,
    question: Annotated[Optional[str], typer.Argument(help="Question about the image.", show_default=False)] = None,
    batch: Annotated[Optional[Path], typer.Option(
        "--batch", help="JSONL file of requests, one {\"image\": path, \"question\": text} per line; run as one "
                        "padded batch (relative paths are relative to the file).",
        show_default="none: IMAGE QUESTION")] = None,
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
    require_signature: RequireSignatureOpt = None,
    as_json: JsonOpt = False,
):
    """Answer a question about an image with the exported pipeline.

    Prints the answer, the image tokens kept by each pruning stage, TTFT, TPOT, tokens/s and the
    KV-cache size. --json prints everything (and the kept tokens' positions) as JSON.
    """
    import time

    from himap_trt.prompt import load_image
    from himap_trt.runtime.loader import open_pipeline
    from himap_trt.runtime.sampling import GenerationConfig

    from himap_trt.models.loading import canonical_dtype
    from himap_trt.runtime.loader import BACKENDS, check_device

    # every option and request is checked before an image or a model is loaded
    paths, questions = _requests(image, question, batch)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, ignore_eos=ignore_eos)
    if backend not in BACKENDS:
        raise HimapError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    check_device(device)
    canonical_dtype(dtype)
    if require_signature is not None:
        from himap_trt.signing import check_public_key

        check_public_key(require_signature)
    if config.ignored_options:
        err.print(f"note: {' and '.join(config.ignored_options)} ignored: sampling is off (--temperature 0), "
                  "decoding greedily", highlight=False, soft_wrap=True)
    images = [load_image(p) for p in paths]
    requested = None
    if any(v is not None for v in (method, k1, r1, k2, r2, k, r, mid_layer, deep_layer, threshold, max_keep)):
        from himap_trt.plan import build_plan

        def requested(num_layers: int, num_image_tokens: int):
            return build_plan(method or "himap", num_layers=num_layers, num_image_tokens=num_image_tokens,
                              k1=DEFAULT_K1 if k1 is None else k1, r1=DEFAULT_R1 if r1 is None else r1,
                              k2=DEFAULT_K2 if k2 is None else k2, r2=DEFAULT_R2 if r2 is None else r2,
                              k=DEFAULT_K if k is None else k, r=DEFAULT_R if r is None else r,
                              mid_layer=mid_layer, deep_layer=deep_layer,
                              threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                              max_keep=DEFAULT_MAX_KEEP if max_keep is None else max_keep)

    _check_run_memory(export_dir, backend, model, device, batch=len(images), force=force)
    opened = open_pipeline(export_dir=export_dir, backend=backend, model=model, requested_plan=requested,
                           engines_dir=engines_dir, device=device, dtype=dtype, require_signature=require_signature)
    pipeline = opened.pipeline
    try:
        started = time.perf_counter()
        prepared = pipeline.prepare(images, questions)
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
    if not streaming:
        for i, request in enumerate(report["requests"]):
            prefix = escape(f"[{i}] ") if len(report["requests"]) > 1 else ""
            out.print(f"[bold]{prefix}answer:[/] {escape(request['answer'])}")
    from himap_trt.models.tiny import TINY_MODELS

    from himap_trt.models.tiny_qwen import TINY_QWEN_MODELS

    if report["model"] in TINY_MODELS or report["model"] in TINY_QWEN_MODELS:
        out.print(f"[dim]note: {report['model']} is a built-in model with random weights; its text is meaningless[/]")
    _print_run_stats(report)


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
    out.print(table)


# -- build ----------------------------------------------------------------------------------------
def _parse_bytes(text: str) -> int:
    """``4294967296``, ``4G``, ``512MiB`` -> bytes."""
    import re

    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise HimapError(f"--workspace must be a byte count such as 4294967296, 4G or 512MiB, got {text!r}")
    return int(match.group(1)) * 1024 ** " KMGT".index((match.group(2) or " ").upper())


def _require_tensorrt() -> None:
    from himap_trt.engines.build import gpu_identity, import_tensorrt

    import_tensorrt()
    gpu_identity()


def _build_engines(export_dir: Path, engines_dir: Optional[Path], manifest, *, max_batch: int, max_seq_len: int,
                   workspace: int, timing_cache: Optional[Path], sign_key: Optional[Path] = None):
    """Build engines with a progress display (TensorRT and a GPU are checked first)."""
    from himap_trt.engines.build import build_engines
    from himap_trt.runtime.loader import default_engines_dir

    _require_tensorrt()
    with _progress() as progress:
        task = progress.add_task("build", total=len(manifest.graphs))

        def report(text: str, done: int, total: int) -> None:
            progress.update(task, description=text, completed=done, total=total)

        return build_engines(export_dir, engines_dir or default_engines_dir(export_dir), manifest,
                             max_batch=max_batch, max_seq_len=max_seq_len, workspace=workspace,
                             timing_cache=timing_cache, progress=report, sign_key=sign_key)


def _print_built(built) -> None:
    out.print(f"built {len(built.engines)} engines with TensorRT {built.tensorrt_version} for {built.gpu_name} "
              f"(compute capability {built.compute_capability}), batch <= {built.max_batch}, "
              f"<= {built.max_seq_len} tokens")


def _profile_rows(profiles):
    """(profile, inputs, min, opt, max) rows, grouping inputs whose ranges are identical."""
    rows = []
    for profile in profiles:
        groups: dict[tuple, list[str]] = {}
        for name, shape in profile.shapes.items():
            groups.setdefault((shape.min, shape.opt, shape.max), []).append(name)
        for (low, opt, high), names in groups.items():
            prefix = os.path.commonprefix(names)
            label = f"{prefix}* ({len(names)})" if len(names) > 2 and len(prefix) >= 4 else ", ".join(names)
            rows.append((profile.name, label, *("x".join(map(str, shape)) for shape in (low, opt, high))))
    return rows


def _dry_run(specs, plan, max_batch, max_seq_len, title, as_json) -> None:
    from himap_trt.engines.profiles import graph_profiles, kv_cache_bytes

    profiles = {spec.name: graph_profiles(spec, plan, max_batch=max_batch, max_seq_len=max_seq_len) for spec in specs}
    variable = any(s.attrs.get("variable") for s in specs)   # per-request counts: no segment is shorter
    per_segment = [max_seq_len - 1 - (0 if variable else plan.num_image_tokens - n) for n in plan.image_tokens_per_segment]
    kv = kv_cache_bytes(specs, max_batch, per_segment)
    if as_json:
        print(json.dumps({"plan": plan.to_dict(), "max_batch": max_batch, "max_seq_len": max_seq_len,
                          "kv_cache_bytes_at_max": kv,
                          "profiles": {name: [p.to_dict() for p in items] for name, items in profiles.items()}}, indent=1))
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("graph", "profile", "input", "min", "opt", "max"):
        table.add_column(column)
    for spec in specs:
        rows = _profile_rows(profiles[spec.name])
        for i, (profile, label, low, opt, high) in enumerate(rows):
            table.add_row(spec.name if i == 0 else "", profile, label, low, opt, high, end_section=i == len(rows) - 1)
    out.print(table)
    out.print(f"KV caches at the maxima (batch {max_batch}, {max_seq_len} tokens): {kv / 2**20:.1f} MiB "
              f"(tokens per segment cache: {', '.join(map(str, per_segment))})")


@app.command()
@user_errors
def build(
    export_dir: ExportDirOpt = Path("export"),
    engines_dir: EnginesOpt = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most prompts per batch (profile maximum).")] = 1,
    max_seq_len: Annotated[Optional[int], typer.Option(
        "--max-seq-len", help="Most tokens per sequence (profile maxima).", show_default="the export's")] = None,
    workspace: Annotated[Optional[str], typer.Option(
        "--workspace", help="Builder workspace limit in bytes (e.g. 4G).", show_default="TensorRT's")] = None,
    timing_cache: Annotated[Optional[Path], typer.Option(
        "--timing-cache", help="Tactic timing cache, reused across builds (one per TensorRT version and GPU "
                               "architecture).",
        show_default="~/.cache/himap-trt/timing-trt<version>-sm<cc>.cache")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the optimization profiles and exit "
                                                            "(needs no TensorRT or GPU).")] = False,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="With --dry-run: profiles for this model and plan without an export "
                        "(e.g. llava-1.5-7b, tiny).", show_default="none: read --export-dir")] = None,
    method: MethodOpt = "himap",
    k1: K1Opt = DEFAULT_K1, r1: R1Opt = DEFAULT_R1, k2: K2Opt = DEFAULT_K2, r2: R2Opt = DEFAULT_R2,
    k: KOpt = DEFAULT_K, r: ROpt = DEFAULT_R,
    mid_layer: MidOpt = None, deep_layer: DeepOpt = None, threshold: ThresholdOpt = DEFAULT_THRESHOLD,
    max_keep: MaxKeepOpt = DEFAULT_MAX_KEEP,
    dtype: Annotated[str, typer.Option("--dtype", metavar="[fp32|fp16|bf16]",
                                       help="With --dry-run --model: graph dtype.")] = "fp16",
    max_image_tokens: MaxImageTokensOpt = None,
    sign: SignOpt = None,
    as_json: JsonOpt = False,
):
    """Build one TensorRT engine per exported graph, with prefill and decode optimization profiles.

    Networks are parsed strongly typed from the exported graphs (export with --dtype fp16 or bf16
    for reduced precision). Engines are only valid for the TensorRT version and GPU architecture
    they were built with; `run` refuses others.
    """
    from himap_trt.export.manifest import load_manifest
    from himap_trt.graphs.spec import DTYPE_NAMES, graph_specs
    from himap_trt.models.loading import canonical_dtype

    workspace_bytes = _parse_bytes(workspace) if workspace else 0  # options first, before any file is read
    if max_batch < 1:
        raise HimapError(f"--max-batch must be at least 1, got {max_batch}")
    if sign is not None:
        from himap_trt.signing import check_private_key

        check_private_key(sign, "--sign")
    if model is not None:
        if not dry_run:
            raise HimapError("--model is for --dry-run (profiles without an export); build reads --export-dir")
        from himap_trt.arch import resolve_dims
        from himap_trt.models import load_config

        config = load_config(model)
        dims = resolve_dims(model, config, max_image_tokens)
        plan = _plan(config, method, k1, r1, k2, r2, k, r, dims=dims, mid_layer=mid_layer, deep_layer=deep_layer,
                     threshold=threshold, max_keep=max_keep)
        specs = graph_specs(dims, plan, DTYPE_NAMES[canonical_dtype(dtype)])
        from himap_trt.export import default_max_seq_len

        length = max_seq_len or default_max_seq_len(dims)
        _dry_run(specs, plan, max_batch, length, f"{model}: {plan.describe()}", as_json)
        return
    manifest = load_manifest(export_dir)
    from himap_trt.engines.build import check_buildable

    check_buildable(manifest, export_dir)
    length = max_seq_len or manifest.max_seq_len
    if length > manifest.dims.max_position_embeddings:
        raise HimapError(f"--max-seq-len {length} exceeds the model's {manifest.dims.max_position_embeddings} positions")
    if dry_run:
        _dry_run(list(manifest.graphs), manifest.plan, max_batch, length,
                 f"{export_dir}: {manifest.plan.describe()} ({manifest.dtype})", as_json)
        return
    built = _build_engines(export_dir, engines_dir, manifest, max_batch=max_batch, max_seq_len=length,
                           workspace=workspace_bytes, timing_cache=timing_cache, sign_key=sign)
    if as_json:
        print(json.dumps(built.to_dict(), indent=1))
        return
    _print_built(built)


# -- check ----------------------------------------------------------------------------------------
@app.command()
@user_errors
def check(
    export_dir: ExportDirOpt = Path("export"),
    engines_dir: EnginesOpt = None,
    tensorrt_compat: Annotated[bool, typer.Option(
        "--tensorrt-compat", help="Only the static check: every node's operator, input dtypes and constant inputs "
                                  "against TensorRT's ONNX parser support table (no TensorRT needed).")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens generated end to end.")] = 8,
    as_json: JsonOpt = False,
):
    """Compare backends graph by graph (ONNX Runtime vs PyTorch; TensorRT vs PyTorch where engines,
    TensorRT and a GPU are available) and end to end (kept indices and tokens), or with
    --tensorrt-compat statically check the graphs against TensorRT's ONNX parser."""
    import time

    started = time.perf_counter()
    if max_new_tokens < 1:
        raise HimapError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if tensorrt_compat:
        from himap_trt.engines.compat import check_export, support_table
        from himap_trt.export.manifest import load_manifest

        manifest = load_manifest(export_dir)
        reports = check_export(export_dir, manifest)
        offenses = [o for r in reports for o in r.offenses]
        if as_json:
            print(json.dumps({"ok": not offenses, "source": support_table()["source"],
                              "min_tensorrt": max((r.min_tensorrt for r in reports),
                                                  key=lambda v: tuple(map(int, v.split(".")))),
                              "graphs": [{"graph": r.graph, "nodes": r.nodes, "opset": r.opset,
                                          "min_tensorrt": r.min_tensorrt,
                                          "unchecked_types": r.unchecked_types,
                                          "offenses": [o.__dict__ for o in r.offenses]} for r in reports]}, indent=1))
        else:
            source = support_table()["source"]
            _plain(f"[I] TensorRT ONNX parser support table: {source['repository']} {source['path']} @ {source['ref']}")
            for r in reports:
                status = "PASSED" if not r.offenses else "FAILED"
                _plain(f"[I]     {status} | {r.graph} | {r.nodes} nodes | opset {r.opset} | "
                       f"TensorRT >= {r.min_tensorrt}")
                for o in r.offenses:
                    _plain(f"[E]         {o.node} ({o.op_type}): {o.reason}")
            _plain(f"[I] {'PASSED' if not offenses else 'FAILED'} | {len(reports)} graphs, "
                      f"{sum(r.nodes for r in reports)} nodes, {len(offenses)} offending | "
                      f"Runtime: {time.perf_counter() - started:.3f}s")
        if offenses:
            raise HimapError(f"{len(offenses)} node(s) in {export_dir} would be rejected by TensorRT's ONNX parser")
        return

    from himap_trt.check import run_check
    from himap_trt.export.validate import TOLERANCES

    report = run_check(export_dir, engines_dir=engines_dir, max_new_tokens=max_new_tokens,
                       on_step=lambda text: err.print(f"[dim]{text}[/]"))
    if as_json:
        print(json.dumps({"ok": report.ok, "dtype": report.dtype, "skipped": report.skipped,
                          "graphs": {b: [c.__dict__ for c in checks] for b, checks in report.graph_checks.items()},
                          "end_to_end": [e.__dict__ | {"ok": e.ok} for e in report.end_to_end]}, indent=1))
    else:
        atol, rtol = TOLERANCES[report.dtype]
        for checks in report.graph_checks.values():
            groups: dict[tuple[str, str], list] = {}
            for c in checks:
                groups.setdefault((c.graph, c.phase), []).append(c)
            for (graph, phase), items in groups.items():
                _plain(f"[I] {graph} ({phase}) | {items[0].backend} vs torch")
                for c in items:
                    status = "PASSED" if c.ok else "FAILED"
                    if c.exact:
                        _plain(f"[I]     {status} | Output: '{c.output}' | {int(c.max_abs_diff)} mismatching elements "
                               "(integer output: must be 0)")
                    else:
                        _plain(f"[I]     {status} | Output: '{c.output}' | max abs diff {c.max_abs_diff:.2e} "
                               f"(<= {atol + rtol * c.max_abs_ref:.2e})")
        for e in report.end_to_end:
            _plain(f"[I] end to end | {e.backend} vs torch")
            tag = "PASSED" if e.kept_indices_equal else ("FAILED" if e.kept_required else "WARNING")
            _plain(f"[I]     {tag} | kept indices of {e.stages} stage(s) "
                   f"{'equal' if e.kept_indices_equal else 'differ'} (overlap {e.kept_overlap:.3f})"
                   + ("" if e.kept_required else f" (reported, not required, in {report.dtype})"))
            tag = "PASSED" if e.tokens_equal == e.tokens_total else ("FAILED" if e.tokens_required else "WARNING")
            _plain(f"[I]     {tag} | tokens equal: {e.tokens_equal}/{e.tokens_total}"
                      + ("" if e.tokens_required else f" (reported, not required, in {report.dtype})"))
        for line in report.skipped:
            _plain(f"[W] skipped {line}")
        total = sum(len(c) for c in report.graph_checks.values())
        _plain(f"[I] {'PASSED' if report.ok else 'FAILED'} | {total} output comparisons, "
                  f"{len(report.end_to_end)} end-to-end | tolerance {report.dtype}: atol {atol:g} + rtol {rtol:g} x max|ref| "
                  f"| Runtime: {time.perf_counter() - started:.3f}s")
    if not report.ok:
        raise HimapError("backends disagree; see the FAILED lines above")


# -- bench (himap_trt/bench_cli.py) ----------------------------------------------------------------
def _register_bench() -> None:
    from himap_trt.bench_cli import bench

    app.command(name="bench")(user_errors(bench))


_register_bench()

# -- analyze (himap_trt/analyze/command.py) ---------------------------------------------------------
from himap_trt.analyze.command import register as _register_analyze  # noqa: E402

_register_analyze(app, user_errors, out, err)


# -- serve / bench-serve (himap_trt/serve/commands.py) ---------------------------------------------
def _register_serve_commands() -> None:
    from himap_trt.serve import commands

    app.command("serve")(user_errors(commands.serve))
    app.command("bench-serve")(user_errors(commands.bench_serve))


_register_serve_commands()


# -- triton (himap_trt/triton/commands.py) --------------------------------------------------------
def _register_triton_commands() -> None:
    from himap_trt.triton import commands

    commands.triton_app.command("repo")(user_errors(commands.repo))
    commands.triton_app.command("serve")(user_errors(commands.serve))
    app.add_typer(commands.triton_app, name="triton")


_register_triton_commands()

# -- eval (himap_trt/cli_eval.py) ----------------------------------------------------------------
def _register_eval() -> None:
    from himap_trt.cli_eval import eval_command

    app.command("eval")(user_errors(eval_command))


_register_eval()


def main() -> None:  # pragma: no cover - the console-script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
