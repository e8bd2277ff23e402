"""The ``himap-trt`` command line.

User errors (:class:`~himap_trt.errors.HimapError`) print one line on stderr and exit with
status 1, without a traceback. Heavy imports happen inside the commands so ``--help`` is quick.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from himap_trt.errors import HimapError
from himap_trt.plan import DEFAULT_K, DEFAULT_K1, DEFAULT_K2, DEFAULT_R, DEFAULT_R1, DEFAULT_R2

app = typer.Typer(
    name="himap-trt",
    help="Deploy LLaVA-style multimodal LLMs with in-decoder image-token pruning (HiMAP, FastV): "
         "export the model as a chain of ONNX graphs, build TensorRT engines, run with per-segment KV caches.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
out = Console(highlight=False)


def user_errors(func):
    """Turn a :class:`HimapError` into a one-line message on stderr and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except HimapError as exc:
            err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
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


# -- shared options -------------------------------------------------------------------------------
ModelOpt = Annotated[str, typer.Option(
    "--model", help="Hugging Face hub id, local checkpoint directory, built-in 'tiny' / 'tiny-gqa', "
                    "or a known name ('llava-1.5-7b', 'llava-1.5-13b').")]
MethodOpt = Annotated[str, typer.Option("--method", help="Pruning method: himap, fastv or none.")]
K1Opt = Annotated[int, typer.Option("--k1", help="HiMAP: layer of the shallow stage (img->txt scores of layer K1-1).")]
R1Opt = Annotated[float, typer.Option("--r1", help="HiMAP: fraction of image tokens dropped at K1.")]
K2Opt = Annotated[int, typer.Option("--k2", help="HiMAP: layer of the deep stage (img->img scores of layer K2-1).")]
R2Opt = Annotated[float, typer.Option("--r2", help="HiMAP: fraction of the remaining image tokens dropped at K2.")]
KOpt = Annotated[int, typer.Option("--k", help="FastV: layer of the stage (last-token scores of layer K-1).")]
ROpt = Annotated[float, typer.Option("--r", help="FastV: fraction of image tokens dropped at K.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")]


def _plan(config: Any, method: str, k1: int, r1: float, k2: int, r2: float, k: int, r: float):
    from himap_trt.models import model_dims
    from himap_trt.plan import build_plan

    dims = model_dims(config)
    return build_plan(method, num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens,
                      k1=k1, r1=r1, k2=k2, r2=r2, k=k, r=r)


# -- flops ------------------------------------------------------------------------------------------
@app.command()
@user_errors
def flops(
    model: ModelOpt = "llava-hf/llava-1.5-7b-hf",
    method: MethodOpt = "himap",
    k1: K1Opt = DEFAULT_K1, r1: R1Opt = DEFAULT_R1, k2: K2Opt = DEFAULT_K2, r2: R2Opt = DEFAULT_R2,
    k: KOpt = DEFAULT_K, r: ROpt = DEFAULT_R,
    prompt_len: Annotated[Optional[int], typer.Option(
        "--prompt-len", help="Prompt tokens (image tokens included) for the whole-prompt count "
                             "[default: image tokens + 64].")] = None,
    as_json: JsonOpt = False,
):
    """FLOPs of a plan: the paper's image-token count (Eq. 10) and the whole-prompt prefill count.

    Eq. 10 (HiMAP Sec. 4.2) counts image tokens only and is printed, like the paper's Table 1, in
    TFLOPs truncated to two decimals. The whole-prompt count (2 FLOPs per multiply-accumulate: all
    tokens, vision tower, scoring, lm_head) is the one to compare with measured time.
    """
    from himap_trt.flops import flops_report, format_tflops
    from himap_trt.models import load_config, model_dims

    config = load_config(model)
    plan = _plan(config, method, k1, r1, k2, r2, k, r)
    dims = model_dims(config)
    report = flops_report(model, plan, dims, prompt_len or dims.num_image_tokens + 64)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{model}: {plan.describe()}", title_justify="left")
    table.add_column("count")
    table.add_column("no pruning", justify="right")
    table.add_column(plan.method, justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("image tokens, Eq. 10 (TFLOPs)", format_tflops(report.image_tokens_baseline),
                  format_tflops(report.image_tokens_plan), f"{report.image_tokens_ratio:.3f}")
    pb, pp = report.prompt_baseline, report.prompt_plan
    table.add_row(f"whole prompt, {pb.prompt_tokens} tokens (TFLOPs)", f"{pb.total / 1e12:.3f}",
                  f"{pp.total / 1e12:.3f}", f"{report.prompt_ratio:.3f}")
    table.add_row("  of which decoder", f"{pb.decoder / 1e12:.3f}", f"{pp.decoder / 1e12:.3f}", "")
    table.add_row("  vision tower + projector", f"{pb.vision / 1e12:.3f}", f"{pp.vision / 1e12:.3f}", "")
    out.print(table)


def main() -> None:  # pragma: no cover - the console-script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
