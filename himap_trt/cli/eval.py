"""``himap-trt eval``: the command-line layer over :mod:`himap_trt.analysis.evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from himap_trt.cli.app import app, err, print_table, progress_bar, user_errors
from himap_trt.errors import HimapError
from himap_trt.plan import DEFAULT_K, DEFAULT_K1, DEFAULT_K2, DEFAULT_R, DEFAULT_R1, DEFAULT_R2
from himap_trt.plan import build_plan
from himap_trt.cli.lazy import lazy_import

# Library modules, imported when a command first uses them (himap_trt/cli/lazy.py: --help stays fast).
evaluate = lazy_import("himap_trt.analysis.evaluate")
arch = lazy_import("himap_trt.arch")
export_manifest = lazy_import("himap_trt.manifest")
loader = lazy_import("himap_trt.runtime.loader")
models = lazy_import("himap_trt.models")

DEFAULT_MODEL_METHODS = ("none", "fastv", "himap", "random")


def _open_methods(export_dirs: list[Path], model: Optional[str], methods: list[str], backend: str,
                  device: Optional[str], plan_kw: dict) -> list:
    """One :class:`himap_trt.analysis.evaluate.Method` per export directory (or per ``--method`` with ``--model``)."""
    if export_dirs and model:
        raise HimapError("pass either --export-dir (one or more exports) or --model with --backend torch, not both")
    if not export_dirs and not model:
        raise HimapError("pass one or more --export-dir (exports to compare), or --model with --backend torch")
    if model and backend not in ("torch", "auto"):
        raise HimapError(f"--model runs the PyTorch reference; use --backend torch (got --backend {backend})")
    if export_dirs and methods:
        raise HimapError("--method is for --model; an export's plan is fixed when it is exported")
    opened = []
    if model:
        dims = models.model_dims(models.load_config(model))
        for method in methods or DEFAULT_MODEL_METHODS:
            def plan_of(layers, tokens, method=method):
                return build_plan(method, num_layers=layers, num_image_tokens=tokens, **plan_kw)

            plan_of(dims.num_layers, dims.num_image_tokens)  # a bad plan fails before the model loads
            pipe = loader.open_pipeline(export_dir=Path("."), backend="torch", model=model, requested_plan=plan_of,
                                 device=device)
            opened.append((pipe, dims, model))
    else:
        for directory in export_dirs:
            manifest = export_manifest.load_manifest(directory, families=arch.get_architecture)
            pipe = loader.open_pipeline(export_dir=directory, backend=backend, device=device)
            opened.append((pipe, manifest.dims, str(directory)))
    names = [pipe.pipeline.plan.method for pipe, _, _ in opened]
    result = []
    for (pipe, dims, source), name in zip(opened, names):
        label = name if names.count(name) == 1 else f"{name} ({Path(source).name})"
        result.append(evaluate.Method(label=label, opened=pipe, dims=dims, source=source))
    labels = [m.label for m in result]
    if len(set(labels)) != len(labels):
        raise HimapError(f"two methods would be reported under the same name ({', '.join(labels)}); "
                         "pass each export directory once")
    return result


@app.command("eval")
@user_errors
def eval_command(
    data: Annotated[str, typer.Option(
        "--data", help="Questions: a JSONL file (one {\"image\", \"question\", \"answers\": [..], \"choices\": [..]?} per "
                       "line, or {\"video\", \"fps\"?, \"max_frames\"?, ...} for a clip; paths relative to the file), "
                       "shapes:N (N generated held-out questions about images) or motion:N (about clips and images).",
        show_default=False)],
    export_dirs: Annotated[Optional[list[Path]], typer.Option(
        "--export-dir", help="An export to evaluate (repeat for each method; a 'none' export gives the agreement "
                             "column).", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Instead of exports: run these --method plans with the PyTorch reference from this "
                        "checkpoint (e.g. shapes, motion).", show_default=False)] = None,
    methods: Annotated[Optional[list[str]], typer.Option(
        "--method", help="With --model: a plan to run (repeat): none, fastv, himap, random "
                         "(default: all four).", show_default=False)] = None,
    k1: Annotated[int, typer.Option("--k1", help="With --model: HiMAP / random K1.")] = DEFAULT_K1,
    r1: Annotated[float, typer.Option("--r1", help="With --model: HiMAP / random R1.")] = DEFAULT_R1,
    k2: Annotated[int, typer.Option("--k2", help="With --model: HiMAP / random K2.")] = DEFAULT_K2,
    r2: Annotated[float, typer.Option("--r2", help="With --model: HiMAP / random R2.")] = DEFAULT_R2,
    k: Annotated[int, typer.Option("--k", help="With --model: FastV K.")] = DEFAULT_K,
    r: Annotated[float, typer.Option("--r", help="With --model: FastV R.")] = DEFAULT_R,
    plan_seed: Annotated[int, typer.Option("--plan-seed", help="With --model: seed of the random plan.")] = 0,
    backend: Annotated[str, typer.Option(
        "--backend", help="auto, onnxruntime, tensorrt, or torch (see `himap-trt run`).")] = "auto",
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda for torch / onnxruntime.",
                                                  show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate only the first N questions.",
                                                 show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated questions (shapes:N, motion:N).")] = 0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most tokens per answer.")] = 16,
    plot_path: Annotated[Optional[Path], typer.Option(
        "--plot", help="PNG of accuracy against prefill-FLOPs ratio (default: eval.png).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout (with every "
                                                         "prediction) instead of tables.")] = False,
):
    """Accuracy of pruning methods on a question set, side by side: per method accuracy (exact match;
    VQA score with several answers; chosen letter for multiple choice), agreement with the unpruned
    answers, image tokens kept per stage, prefill FLOPs (Eq. 10 and whole prompt) and TTFT, and a plot."""
    items = evaluate.load_items(data, limit=limit, seed=seed)
    if max_new_tokens < 1:
        raise HimapError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    plan_kw = dict(k1=k1, r1=r1, k2=k2, r2=r2, k=k, r=r, seed=plan_seed)
    methods_ = _open_methods(list(export_dirs or []), model, list(methods or []), backend, device, plan_kw)
    try:
        with progress_bar() as progress:
            task = progress.add_task(f"eval: {len(items)} questions x {len(methods_)} methods",
                                     total=len(items) * len(methods_))
            evaluate.run_items(items, methods_, max_new_tokens=max_new_tokens, on_step=lambda: progress.advance(task))
    finally:
        for m in methods_:
            m.opened.pipeline.close()
    result = evaluate.report(items, methods_, data)
    png = evaluate.plot(result, plot_path or Path("eval.png"))
    result["plot"] = str(png)
    if as_json:
        print(json.dumps(result, indent=1))
        return
    from rich.table import Table

    table = Table(title=f"{data}: {len(items)} questions, {methods_[0].opened.backend} on "
                        f"{methods_[0].opened.device}", title_justify="left")
    columns = ["method", "accuracy", "agreement", "image tokens kept", "FLOPs Eq.10", "FLOPs prompt", "TTFT median"]
    for c in columns:
        table.add_column(c, justify="left" if c in ("method", "image tokens kept") else "right")
    for row in result["methods"]:
        kept = " -> ".join([str(row["image_tokens"]), *(f"{n:g}" for n in row["mean_image_tokens_kept_per_stage"])])
        agreement = "" if row["agreement_with_none"] is None else f"{row['agreement_with_none']:.3f}"
        table.add_row(row["label"], f"{row['accuracy']:.3f}", agreement, kept, f"{row['flops_eq10_ratio']:.3f}",
                      f"{row['flops_prompt_ratio']:.3f}", f"{row['ttft_median_s'] * 1e3:.1f} ms")
    print_table(table)
    media = list(result["methods"][0]["by_media"])
    if len(media) > 1:   # clips and still images: accuracy and tokens kept per stage of each
        by_media = Table(title="per media (tokens: into the decoder -> kept per stage)", title_justify="left")
        by_media.add_column("method")
        for name in media:
            by_media.add_column(f"{name}s ({result['methods'][0]['by_media'][name]['items']})", justify="right")
            by_media.add_column(f"{name} tokens", justify="left")
        for row in result["methods"]:
            cells = []
            for name in media:
                entry = row["by_media"][name]
                first = entry.get("mean_visual_tokens_into_decoder")
                tokens = [] if first is None else [f"{first:.3g}"]
                tokens += [f"{n:.3g}" for n in entry["mean_image_tokens_kept_per_stage"]]
                cells += [f"{entry['accuracy']:.3f}", " -> ".join(tokens) or "-"]
            by_media.add_row(row["label"], *cells)
        print_table(by_media)
    if result["groups"]:
        groups = Table(title="accuracy per template / category", title_justify="left")
        groups.add_column("group")
        for row in result["methods"]:
            groups.add_column(row["label"], justify="right")
        for g in result["groups"]:
            groups.add_row(g, *(f"{row['accuracy_by_group'][g]:.3f}" for row in result["methods"]))
        print_table(groups)
    err.print(f"FLOPs are ratios to no pruning; plot: {png}")
