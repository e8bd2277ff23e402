"""``himap-trt export``: a checkpoint as a chain of ONNX graphs (:mod:`himap_trt.export`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from himap_trt.cli.app import app, err, out, progress_bar, print_table, user_errors
from himap_trt.cli.engines import build_with_progress, print_built, require_tensorrt
from himap_trt.engines.flavour import has_fp32_gemms
from himap_trt.cli.options import (
    DeepOpt,
    JsonOpt,
    K1Opt,
    K2Opt,
    KOpt,
    MaxImageTokensOpt,
    MaxKeepOpt,
    MethodOpt,
    MidOpt,
    ModelOpt,
    PlanSeedOpt,
    R1Opt,
    R2Opt,
    ROpt,
    SignOpt,
    ThresholdOpt,
    plan_from_options,
)
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
    with_evs,
)
from himap_trt.fsutil import check_target, output_lock
from himap_trt.cli.lazy import lazy_import

# Library modules, imported when a command first uses them (himap_trt/cli/lazy.py: --help stays fast).
export_lib = lazy_import("himap_trt.export")
export_manifest = lazy_import("himap_trt.manifest")
loading = lazy_import("himap_trt.models.loading")
models = lazy_import("himap_trt.models")
streaming = lazy_import("himap_trt.models.streaming")


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
    prune_before: Annotated[str, typer.Option(
        "--prune-before", metavar="[none|evs]",
        help="Pruning before the LLM: evs = Efficient Video Sampling on videos (Qwen2.5-VL, Qwen3-VL): drop the "
             "--evs-rate fraction of a video's visual tokens least changed since the previous temporal patch; "
             "--method then prunes the tokens EVS kept. Recorded in the manifest; requests may ask for "
             "another rate.")] = "none",
    evs_rate: Annotated[float, typer.Option(
        "--evs-rate", help="With --prune-before evs: the fraction q in [0, 1) of a video's visual tokens EVS drops "
                           "(keeps max(H'W', int(T H'W' (1 - q))).")] = 0.0,
    out_dir: Annotated[Path, typer.Option("--out", help="Export directory (replaced atomically on success).")] = Path("export"),
    dtype: Annotated[str, typer.Option("--dtype", metavar="[fp32|fp16|bf16]", help="Graph precision (TensorRT "
                                                   "builds strongly typed networks from it).")] = "fp32",
    max_seq_len: Annotated[Optional[int], typer.Option(
        "--max-seq-len", help="Most tokens (prompt + generated) per sequence; sizes the TensorRT profiles.",
        show_default="the model's positions, at most 2048")] = None,
    opset: Annotated[Optional[int], typer.Option(
        "--opset", metavar="[18|19|20]",
        help="ONNX opset of the graphs. The segment graphs of --kv-write tensorscatter and attention are at "
             "opset 24 (their TensorScatter and Attention operators), so those forms refuse an explicit --opset.",
        show_default="18; 24 for the segment graphs of --kv-write tensorscatter/attention")] = None,
    kv_write: Annotated[Optional[str], typer.Option(
        "--kv-write", metavar="[scatternd|tensorscatter|gqa|attention]",
        help="How segment graphs write KV caches in place: scatternd (ScatterND; ONNX Runtime, every "
             "TensorRT 10.x and TensorRT-RTX), tensorscatter (opset-24 TensorScatter; ONNX Runtime only: "
             "TensorRT's parser needs a static cache length there), gqa (ONNX Runtime's GroupQueryAttention: decode attends over the "
             "occupied cache only, flat TPOT; ONNX Runtime only, fp32/fp16) or attention (opset-24 TensorScatter into "
             "caches of static length --max-seq-len + one ONNX Attention per layer: TensorRT's fused attention and "
             "KV-cache-update layers; TensorRT-RTX builds it in fp16/bf16).",
        show_default="the --target's form")] = None,
    target: Annotated[str, typer.Option(
        "--target", metavar="[onnxruntime|tensorrt]",
        help="The backend the export is for (recorded in the manifest): onnxruntime gets the default --kv-write "
             "(himap_trt.manifest.DEFAULT_KV_WRITE), tensorrt gets attention (fp16/bf16; scatternd for "
             "fp32, which TensorRT-RTX's Attention layer cannot build).")] = "onnxruntime",
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
    quantize: Annotated[str, typer.Option(
        "--quantize", metavar="[none|int8|int4|int8-dynamic]",
        help="Quantization of the decoder's linear layers; fp32 only. int8/int4: weight-only (DequantizeLinear -> "
             "MatMul; ONNX Runtime fuses it into MatMulNBits, TensorRT parses weight-only GEMMs), int8 per output "
             "channel, int4 in blocks of --quant-block-size. int8-dynamic: int8 weights per output channel and "
             "activations quantized per call (DynamicQuantizeLinear -> MatMulInteger, fused by ONNX Runtime into "
             "DynamicQuantizeMatMul: int8 GEMMs for the prefill on CPU); ONNX Runtime only.")] = "none",
    quant_block_size: Annotated[Optional[int], typer.Option(
        "--quant-block-size", metavar="[16|32|64|128|256]",
        help="int4: input rows per scale; must divide the model's hidden, attention and FFN sizes.",
        show_default="32 with int4, or the largest smaller size dividing the model's (16 for tiny/shapes)")] = None,
    quantize_lm_head: Annotated[bool, typer.Option(
        "--quantize-lm-head", help="Quantize the LM head too (with --quantize int8/int4/int8-dynamic).")] = False,
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
    # bad options, a foreign or busy --out, or (with --build) a missing TensorRT fail before any work
    options = export_lib.ExportOptions(out=out_dir, dtype=loading.canonical_dtype(dtype), opset=opset, max_seq_len=max_seq_len,
                            validate=validate, kv_write=kv_write, validate_chunk_layers=validate_chunk_layers,
                            device=device, quantize=quantize, quant_block_size=quant_block_size,
                            quantize_lm_head=quantize_lm_head, sign_key=sign, target=target)
    kv_write = options.kv_write
    if validate:
        export_lib.check_reference_device(device)
    config = models.load_config(model)
    dims = models.resolve_dims(model, config, max_image_tokens)
    export_lib.check_max_seq_len(dims, max_seq_len)
    options.quantization(dims)
    plan = plan_from_options(config, method, k1, r1, k2, r2, k, r, dims=dims, mid_layer=mid_layer, deep_layer=deep_layer,
                 threshold=threshold, max_keep=max_keep, seed=plan_seed)
    plan = with_evs(plan, prune_before, evs_rate)
    if plan.evs_rate and dims.architecture not in ("qwen2_5_vl", "qwen3_vl"):
        raise HimapError(f"--prune-before evs needs a video model (Qwen2.5-VL, Qwen3-VL); {model} is "
                         f"{dims.architecture}")
    check_target(out_dir, marker=export_manifest.MANIFEST_NAME, flag="--out", recognise=export_manifest.is_export_manifest)
    if build_engines_too:
        if kv_write in export_manifest.NOT_TENSORRT:
            raise HimapError(f"--build needs a TensorRT-parsable export: --kv-write {kv_write} is ONNX Runtime only "
                             f"({export_manifest.NOT_TENSORRT[kv_write]}); use --kv-write scatternd")
        if quantize in export_manifest.NOT_TENSORRT_QUANTIZE:
            raise HimapError(f"--build needs a TensorRT-parsable export: --quantize {quantize} is ONNX Runtime only "
                             f"({export_manifest.NOT_TENSORRT_QUANTIZE[quantize]}); use --quantize int8 or int4")
        build_target = require_tensorrt(fp32_gemms=has_fp32_gemms(options.dtype, plan))
    with output_lock(out_dir, flag="--out"):
        err.print(f"loading {model} ({options.dtype})")

        loaded = streaming.load_streamed(model, dtype=loading.DTYPES[options.dtype]) or models.load_model(model, dtype=loading.DTYPES[options.dtype])
        err.print(f"plan: {plan.describe()}")
        with progress_bar() as progress:
            task = progress.add_task("export", total=None)

            def report(text: str, done: int, total: int) -> None:
                progress.update(task, description=text, completed=done, total=total)

            manifest, checks = export_lib.export_model(loaded, plan, options, progress=report)
            progress.update(task, description="export complete", completed=progress.tasks[0].total)
    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    built = build_with_progress(out_dir, None, manifest, max_batch=1, max_seq_len=manifest.max_seq_len, workspace=0,
                           timing_cache=None, target=build_target, sign_key=sign) if build_engines_too else None
    if as_json:
        print(json.dumps({"out": str(out_dir), "manifest": manifest.to_dict(), "bytes": size,
                          "checks": [c.__dict__ for c in checks],
                          "engines": built.to_dict() if built else None}, indent=2))
        return
    _print_checks(checks)
    out.print(f"exported {len(manifest.graphs)} graphs to {out_dir}/ ({size / 1e6:.1f} MB): "
              + ", ".join(p.name for p in files if p.suffix == ".onnx"))
    if built:
        print_built(built)



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
    print_table(table)

