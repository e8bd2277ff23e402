"""Opening a pipeline for ``himap-trt run``: which backend, which graphs, which checks.

- ``onnxruntime``: the export directory's graphs (CPU, or CUDA with onnxruntime-gpu).
- ``tensorrt``: the engines built from the export (``himap-trt build``).
- ``torch``: the PyTorch reference, from ``--model`` directly or from the export's source model.
- ``auto``: TensorRT if engines for this export are on disk and their TensorRT flavour and a GPU are usable,
  else ONNX Runtime (on the GPU if onnxruntime-gpu and a GPU are there).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from himap_trt.arch import get_architecture
from himap_trt.confine import confined_path, refuse_custom_code
from himap_trt.engines.flavour import FLAVOURS
from himap_trt.engines.manifest import engines_present, load_engines_manifest, read_engines_manifest
from himap_trt.errors import HimapError
from himap_trt.manifest import load_manifest, model_hash
from himap_trt.models import load_model
from himap_trt.models.loading import parse_dtype
from himap_trt.plan import PruningPlan, build_plan
from himap_trt.prompt import check_chat_template
from himap_trt.runtime import Pipeline, reference_pipeline
from himap_trt.runtime.onnxrt import OnnxRuntimeBackend, cuda_provider_available
from himap_trt.runtime.tensorrt import DEFAULT_KERNEL_SPECIALIZATION, check_kernel_specialization, tensorrt_backends
from himap_trt.signing import check_public_key, verify_directory

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
#: ``--device`` values: ``cpu``, ``cuda`` or ``cuda:<index>``.
DEVICES = ("cpu", "cuda")


def check_device(device: str | None) -> str | None:
    """Validate a ``--device`` value (``cpu``, ``cuda``, ``cuda:N``) before anything is loaded.

    Raises:
        HimapError: for any other value.
    """
    if device is None:
        return None
    import re

    if not re.fullmatch(r"cpu|cuda(:\d{1,3})?", device):
        raise HimapError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    return device


@dataclass(frozen=True)
class OpenedPipeline:
    """A pipeline and what was chosen to build it."""

    pipeline: object
    backend: str
    device: str
    source: str


def check_plan(manifest_plan: PruningPlan, requested: PruningPlan | None, where: str) -> None:
    """Raise if a plan was requested on the command line and the export implements another (the
    decoder's stages; the EVS rate before the LLM is the export's default, not part of the graphs)."""
    if requested is not None and replace(requested, evs_rate=manifest_plan.evs_rate) != manifest_plan:
        raise HimapError(
            f"{where} implements '{manifest_plan.describe()}', but the options request '{requested.describe()}'; "
            "re-export with those options, or drop --method/--k*/--r* to use the export's plan"
        )


def _tensorrt_usable(engines_dir: Path) -> bool:
    """Whether a GPU is visible and the TensorRT flavour the engines were built with is installed
    (an unreadable manifest counts as usable, so ``auto`` reports it rather than falling back)."""
    if not torch.cuda.is_available():
        return False
    try:
        flavour = FLAVOURS.get(read_engines_manifest(engines_dir).tensorrt_flavour)
    except HimapError:
        return True
    return flavour is None or flavour.installed()


def open_pipeline(*, export_dir: Path, backend: str = "auto", model: str | None = None,
                  requested_plan=None, engines_dir: Path | None = None, device: str | None = None,
                  dtype: str | None = None, require_signature: Path | None = None,
                  kernel_specialization: str = DEFAULT_KERNEL_SPECIALIZATION) -> OpenedPipeline:
    """Build the pipeline ``run`` uses.

    Args:
        export_dir: the export directory (unused for ``torch`` with ``model``).
        backend: one of :data:`BACKENDS`.
        model: with ``backend='torch'``: run the reference from this checkpoint, no export needed.
        requested_plan: ``(num_layers, num_image_tokens) -> PruningPlan`` or None: the plan the user
            asked for, checked against the export's (or used directly with ``model``; default HiMAP).
        engines_dir: TensorRT engines directory (default: :func:`default_engines_dir`).
        device: ``cpu``/``cuda`` for torch and onnxruntime (default: cuda if usable, else cpu).
        dtype: ``fp32``/``fp16``/``bf16`` for the torch backend with ``model``.
        require_signature: an EC public key (PEM): the export (and the engines, for TensorRT) must
            carry a model-signing signature by its private key (:mod:`himap_trt.signing`), verified
            before anything else is read from them.
        kernel_specialization: TensorRT-RTX engines: ``lazy``/``eager``/``none``
            (:data:`~himap_trt.runtime.tensorrt.KERNEL_SPECIALIZATIONS`); ignored by other backends.

    Raises:
        HimapError: unknown backend, missing/incompatible export or engines, plan mismatch. With
            ``auto``, engines that are present but stale (another export, TensorRT or GPU) are an
            error, not a silent fall-back to ONNX Runtime.
    """
    if backend not in BACKENDS:
        raise HimapError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    check_device(device)
    check_kernel_specialization(kernel_specialization)
    if require_signature is not None:
        check_public_key(require_signature)
        if model is not None:
            raise HimapError("--require-signature verifies an export; it does not apply to --model (a checkpoint)")
    if model is not None and backend != "torch":
        raise HimapError("--model runs the PyTorch reference without an export; pass --backend torch with it "
                         "(other backends read the export directory given by --export-dir)")
    if backend == "torch" and model is not None:
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_model(model, dtype=parse_dtype(dtype or "fp32"), device=dev)
        dims = loaded.dims
        if requested_plan is not None:
            plan = requested_plan(dims.num_layers, dims.num_image_tokens)
        else:
            plan = build_plan("himap", num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens)
        return OpenedPipeline(reference_pipeline(loaded, plan), "torch", dev, model)

    if require_signature is not None:
        verify_directory(Path(export_dir), require_signature, what="--export-dir")
    manifest = load_manifest(export_dir, families=get_architecture)
    export_dir = Path(export_dir)
    if requested_plan is not None:
        requested = requested_plan(manifest.dims.num_layers, manifest.dims.num_image_tokens)
        check_plan(manifest.plan, requested, f"the export in {str(export_dir)!r}")
    if backend == "auto":
        engines = engines_dir or default_engines_dir(export_dir)
        if engines_present(engines) and _tensorrt_usable(engines):
            backend = "tensorrt"
        else:
            backend = "onnxruntime"

    if backend == "torch":
        if manifest.quantize != "none":
            raise HimapError(f"the export in {str(export_dir)!r} has {manifest.quantize} weights (export --quantize); "
                             "--backend torch would run the float checkpoint instead: use --backend onnxruntime "
                             "or tensorrt, or --backend torch --model <checkpoint> for the float reference")
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_model(manifest.source_model, dtype=parse_dtype(manifest.dtype), device=dev)
        if model_hash(loaded.model) != manifest.model_hash:
            raise HimapError(f"the model {manifest.source_model!r} loaded for --backend torch differs from the one "
                             f"exported to {str(export_dir)!r} (content hash mismatch)")
        return OpenedPipeline(reference_pipeline(loaded, manifest.plan, max_seq_len=manifest.max_seq_len),
                              "torch", dev, manifest.source_model)

    processor = load_export_processor(export_dir, manifest)
    if backend == "onnxruntime":
        dev = device or ("cuda" if cuda_provider_available() else "cpu")
        backends = {spec.name: OnnxRuntimeBackend(spec, export_dir / spec.file, device=dev) for spec in manifest.graphs}
        max_seq_len = manifest.max_seq_len
    else:  # tensorrt

        engines = engines_dir or default_engines_dir(export_dir)
        if require_signature is not None:
            verify_directory(Path(engines), require_signature, what="--engines")
        engines_manifest = load_engines_manifest(engines, export=manifest, export_dir=export_dir)
        dev = "cuda"
        backends = tensorrt_backends(engines, engines_manifest, manifest, kernel_specialization=kernel_specialization,
                                     keep_runtime_cache=require_signature is None)
        max_seq_len = engines_manifest.max_seq_len
    pipeline = Pipeline(list(manifest.graphs), backends, processor, manifest.plan,
                        image_token_id=manifest.image_token_id, device=dev,
                        eos_token_ids=list(manifest.eos_token_ids), pad_token_id=manifest.pad_token_id,
                        max_seq_len=max_seq_len, max_positions=manifest.dims.max_position_embeddings,
                        architecture=manifest.dims.architecture)
    return OpenedPipeline(pipeline, backend, dev, manifest.source_model)


def default_engines_dir(export_dir: Path) -> Path:
    """Engines live beside the export by default: ``engines/`` next to ``export/``."""
    return Path(export_dir).absolute().parent / "engines"


def load_export_processor(export_dir: Path, manifest):
    """The processor saved in an export (already verified by ``load_manifest``), loaded without
    running any code from it.

    Raises:
        HimapError: naming the directory if it declares custom code or transformers cannot load it.
    """
    path = confined_path(export_dir, manifest.processor_dir, field="processor_dir",
                         source=Path(export_dir) / "manifest.json", kind="dir")
    refuse_custom_code(path, "processor")
    try:
        processor = get_architecture(manifest.dims.architecture).load_processor(str(path), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - a bad processor directory is input, not a bug
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HimapError(f"cannot load the processor saved in {str(path)!r}: {text}") from None
    check_chat_template(processor, path)
    return processor
