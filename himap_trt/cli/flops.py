"""``himap-trt flops``: the FLOPs of a pruning plan (:mod:`himap_trt.flops`)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from himap_trt.cli.app import app, out, print_table, user_errors
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
    R1Opt,
    R2Opt,
    ROpt,
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
)
from himap_trt.flops import flops_report, format_tflops
from himap_trt.cli.lazy import lazy_import

# Library modules, imported when a command first uses them (himap_trt/cli/lazy.py: --help stays fast).
arch = lazy_import("himap_trt.arch")
models = lazy_import("himap_trt.models")


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
    config = models.load_config(model)
    dims = models.resolve_dims(model, config, max_image_tokens)
    if image_tokens is not None:
        if image_tokens < 1:
            raise HimapError(f"--image-tokens must be at least 1, got {image_tokens}")

        if not arch.get_architecture(dims.architecture).variable_image_tokens and image_tokens != dims.num_image_tokens:
            raise HimapError(f"--image-tokens: {model!r} always has {dims.num_image_tokens} image tokens per request")
        dims = arch.get_architecture(dims.architecture).with_max_image_tokens(dims, image_tokens)   # Eq. 10 with this |V|
    plan = plan_from_options(config, method, k1, r1, k2, r2, k, r, dims=dims, mid_layer=mid_layer, deep_layer=deep_layer,
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
    print_table(table)
