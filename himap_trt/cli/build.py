"""``himap-trt build``: TensorRT engines from an export, or their optimization profiles (``--dry-run``; :mod:`himap_trt.engines`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from himap_trt import signing
from himap_trt.cli.app import app, out, print_table, user_errors
from himap_trt.cli.engines import build_with_progress, print_built, require_tensorrt
from himap_trt.cli.options import (
    DeepOpt,
    EnginesOpt,
    ExportDirOpt,
    JsonOpt,
    K1Opt,
    K2Opt,
    KOpt,
    MaxImageTokensOpt,
    MaxKeepOpt,
    MethodOpt,
    MidOpt,
    R1Opt,
    R2Opt,
    ROpt,
    SignOpt,
    ThresholdOpt,
    plan_from_options,
)
from himap_trt.engines.flavour import TENSORRT_CHOICES, has_fp32_gemms, installed_flavour
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
from himap_trt.cli.lazy import lazy_import

# Library modules, imported when a command first uses them (himap_trt/cli/lazy.py: --help stays fast).
arch = lazy_import("himap_trt.arch")
engine_build = lazy_import("himap_trt.engines.build")
engine_profiles = lazy_import("himap_trt.engines.profiles")
fsutil = lazy_import("himap_trt.fsutil")
export_lib = lazy_import("himap_trt.export")
export_manifest = lazy_import("himap_trt.manifest")
graph_spec = lazy_import("himap_trt.graphs.spec")
loader = lazy_import("himap_trt.runtime.loader")
loading = lazy_import("himap_trt.models.loading")
models = lazy_import("himap_trt.models")


def _parse_bytes(text: str, flag: str = "--workspace") -> int:
    """``4294967296``, ``4G``, ``512MiB``, ``2.5G`` -> bytes."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise HimapError(f"{flag} must be a byte count such as 4294967296, 4G or 512MiB, got {text!r}")
    return int(float(match.group(1)) * 1024 ** " KMGT".index((match.group(2) or " ").upper()))



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


def _dry_run(specs, plan, max_batch, max_seq_len, title, as_json, form: str = "phase", built: str = "phase") -> None:
    """Print the profiles in ``form`` (``phase``: one per phase, what the runtime's calls select
    between; ``shared``: merged per engine); ``built`` is the form a build with these options uses."""
    profiles = {spec.name: engine_profiles.engine_profiles(spec, plan, max_batch=max_batch, max_seq_len=max_seq_len,
                                                           form=form) for spec in specs}
    variable = any(s.attrs.get("variable") for s in specs)   # per-request counts: no segment is shorter
    per_segment = [max_seq_len - 1 - (0 if variable else plan.num_image_tokens - n) for n in plan.image_tokens_per_segment]
    kv = engine_profiles.kv_cache_bytes(specs, max_batch, per_segment)
    if as_json:
        print(json.dumps({"plan": plan.to_dict(), "max_batch": max_batch, "max_seq_len": max_seq_len, "profile_form": form,
                          "build_profile_form": built, "kv_cache_bytes_at_max": kv,
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
    print_table(table)
    out.print(f"KV caches at the maxima (batch {max_batch}, {max_seq_len} tokens): {kv / 2**20:.1f} MiB "
              f"(tokens per segment cache: {', '.join(map(str, per_segment))})")
    if built != form:
        out.print(f"A build with these options merges each engine's profiles into one covering its phases "
                  f"({built}; print them with --profiles {built}).")


def _dry_run_form(profiles: str, tensorrt: str) -> str:
    """The profile form a build with these options uses (``auto``: by the flavour --tensorrt names or,
    for auto, the installed one; phase when none is installed)."""
    if profiles != "auto":
        return profiles
    if tensorrt == "auto":
        installed = installed_flavour()
        return engine_profiles.resolve_profile_form("auto", installed.key if installed else "tensorrt")
    return engine_profiles.resolve_profile_form("auto", tensorrt)


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
    tensorrt: Annotated[str, typer.Option(
        "--tensorrt", metavar="[auto|tensorrt|rtx]",
        help="Which TensorRT builds: tensorrt (NVIDIA TensorRT, module tensorrt; builds for the GPU it runs on), "
             "rtx (TensorRT-RTX, module tensorrt_rtx; builds ahead of time, also without a GPU) or auto "
             "(tensorrt if installed, else rtx).")] = "auto",
    compute_capability: Annotated[Optional[str], typer.Option(
        "--compute-capability", metavar="[8.6,8.9,12.0|current]",
        help="TensorRT-RTX targets: comma-separated compute capabilities (7.5, 8.0, 8.6, 8.9, 12.0, 12.1 in "
             "TensorRT-RTX 1.7), or current (the GPU this runs on; the only choice for TensorRT).",
        show_default="rtx: every capability it targets ahead of time (without 7.5 where a graph holds fp32 GEMMs: fp32 exports, scoring graphs); "
                     "tensorrt: current")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", hidden=True)] = False,
    int8: Annotated[bool, typer.Option("--int8", hidden=True)] = False,
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
    profiles: Annotated[str, typer.Option(
        "--profiles", metavar="[auto|shared|phase]",
        help="Optimization profiles per engine: shared (one covering prefill and decode: the engine holds one "
             "copy of the weights) or phase (one per phase: TensorRT-RTX 1.7 stores the weights once per "
             "profile); auto is shared for TensorRT-RTX (it specialises kernels for the shapes met at run "
             "time), phase for TensorRT.")] = "auto",
    engine_weight_limit: Annotated[str, typer.Option(
        "--engine-weight-limit",
        help="Build a decoder segment holding more weights than this (bytes, e.g. 2.5G) as consecutive engines "
             "of as many layers as fit it (the builder needs ~2.7x an engine's weights in host memory); 0: "
             "every segment as one engine.")] = "2500000000",
    as_json: JsonOpt = False,
):
    """Build one TensorRT engine per exported graph, with optimization profiles covering prefill and decode.

    TensorRT-RTX engines get one profile for both (it stores the weights once per profile); a decoder
    segment holding more than --engine-weight-limit of weights is built as consecutive engines of a
    few layers, so the build's memory follows the largest engine. Prints each engine's bytes beside
    its weights and the build's peak RSS.

    Networks are parsed strongly typed from the exported graphs (export with --dtype fp16 or bf16
    for reduced precision). With TensorRT-RTX (--tensorrt rtx) engines are built ahead of time for
    the --compute-capability targets, also on a machine without a GPU. Engines are only valid for
    the TensorRT flavour and version and the GPU architectures they were built for; `run` refuses others.
    """
    workspace_bytes = _parse_bytes(workspace) if workspace else 0  # options first, before any file is read
    chunk_bytes = _parse_bytes(engine_weight_limit, "--engine-weight-limit")
    if fp16 or int8:
        raise HimapError(f"--{'fp16' if fp16 else 'int8'}: networks are strongly typed, precision comes from the "
                         "export (`himap-trt export --dtype fp16|bf16`); TensorRT-RTX has no FP16/INT8 builder flags")
    if tensorrt not in TENSORRT_CHOICES:
        raise HimapError(f"--tensorrt must be one of {', '.join(TENSORRT_CHOICES)}, got {tensorrt!r}")
    if max_batch < 1:
        raise HimapError(f"--max-batch must be at least 1, got {max_batch}")
    if profiles not in engine_profiles.PROFILE_FORMS:
        raise HimapError(f"--profiles must be one of {', '.join(engine_profiles.PROFILE_FORMS)}, got {profiles!r}")
    if sign is not None:
        signing.check_private_key(sign, "--sign")
    if model is not None:
        if not dry_run:
            raise HimapError("--model is for --dry-run (profiles without an export); build reads --export-dir")

        config = models.load_config(model)
        dims = models.resolve_dims(model, config, max_image_tokens)
        plan = plan_from_options(config, method, k1, r1, k2, r2, k, r, dims=dims, mid_layer=mid_layer, deep_layer=deep_layer,
                     threshold=threshold, max_keep=max_keep)
        specs = graph_spec.graph_specs(dims, plan, graph_spec.DTYPE_NAMES[loading.canonical_dtype(dtype)],
                                        arch=arch.get_architecture(dims.architecture))

        length = max_seq_len or export_lib.default_max_seq_len(dims)
        _dry_run(specs, plan, max_batch, length, f"{model}: {plan.describe()}", as_json,
                 "phase" if profiles == "auto" else profiles, _dry_run_form(profiles, tensorrt))
        return
    manifest = export_manifest.load_manifest(export_dir, families=arch.get_architecture)

    length = max_seq_len or manifest.max_seq_len
    if manifest.kv_write == "attention" and length > manifest.max_seq_len:
        raise HimapError(f"--max-seq-len {length} exceeds what the caches of this --kv-write attention export hold "
                         f"({manifest.max_seq_len} tokens, fixed at export); re-export with --max-seq-len {length}")
    chosen = installed_flavour() if tensorrt == "auto" else None       # auto: the flavour it would pick
    engine_build.check_flavour_parses(manifest, chosen.key if chosen else tensorrt)
    engine_build.check_buildable(manifest, export_dir)
    note = engine_build.attention_note(manifest)
    if note:
        typer.echo(note, err=True)
    if length > manifest.dims.max_position_embeddings:
        raise HimapError(f"--max-seq-len {length} exceeds the model's {manifest.dims.max_position_embeddings} positions")
    if dry_run:
        _dry_run(list(manifest.graphs), manifest.plan, max_batch, length,
                 f"{export_dir}: {manifest.plan.describe()} ({manifest.dtype})", as_json,
                 "phase" if profiles == "auto" else profiles, _dry_run_form(profiles, tensorrt))
        return
    # engines inside an export (or any artefact directory) would break its file list and signature:
    # refused before TensorRT is looked for
    fsutil.check_outside_artefacts(engines_dir or loader.default_engines_dir(export_dir), "--engines")
    target = require_tensorrt(tensorrt, compute_capability, has_fp32_gemms(manifest.dtype, manifest.plan))
    engine_build.check_timing_cache(target.flavour, timing_cache)
    built = build_with_progress(export_dir, engines_dir, manifest, max_batch=max_batch, max_seq_len=length,
                           workspace=workspace_bytes, timing_cache=timing_cache, target=target, sign_key=sign,
                           profiles=profiles, chunk_weight_bytes=chunk_bytes)
    if as_json:
        print(json.dumps(built.to_dict(), indent=1))
        return
    print_built(built)
