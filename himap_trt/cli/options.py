"""Options shared by several commands (model, pruning plan, export and engines directories) and the
plan they describe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from himap_trt.plan import METHODS
from himap_trt.plan import build_plan
from himap_trt.cli.lazy import lazy_import

# Library modules, imported when a command first uses them (himap_trt/cli/lazy.py: --help stays fast).
models = lazy_import("himap_trt.models")

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
#: ``--kernel-specialization`` (TensorRT-RTX engines; himap_trt.runtime.tensorrt.KERNEL_SPECIALIZATIONS). The
#: defaults are written where each command declares it: ``run`` uses the runtime's DEFAULT_KERNEL_SPECIALIZATION
#: (``lazy``, TensorRT-RTX's own), ``bench`` ``eager`` (timed runs on the specialised kernels); a unit test ties them.
KERNEL_SPECIALIZATION_HELP = (
    "TensorRT-RTX engines: when shape-specialised kernels are JIT-compiled. lazy: a fallback kernel runs until "
    "the specialised one is compiled in the background (TensorRT-RTX's default); eager: compiled before a new "
    "shape's first run; none: fallback kernels only. Compiled kernels are kept in <engines>/runtime.rtxcache "
    "for the next process. Ignored by other backends and TensorRT proper.")
KernelSpecializationOpt = Annotated[str, typer.Option("--kernel-specialization", metavar="[lazy|eager|none]",
                                                      help=KERNEL_SPECIALIZATION_HELP)]


def plan_from_options(config: Any, method: str, k1: int, r1: float, k2: int, r2: float, k: int, r: float, *, dims=None,
          **extra):
    """The pruning plan of the plan options for ``config`` (``dims``: the model's, if already resolved)."""
    dims = dims or models.model_dims(config)
    return build_plan(method, num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens,
                      k1=k1, r1=r1, k2=k2, r2=r2, k=k, r=r, **extra)
