"""``himap-trt export``: a checkpoint and a plan -> a directory of ONNX graphs + ``manifest.json``.

The directory is written beside its target and swapped in only when every graph exported,
passed ``onnx.checker`` and (unless skipped) validated against PyTorch; see
:func:`himap_trt.fsutil.atomic_directory`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from himap_trt.errors import HimapError
from himap_trt.export.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    PROCESSOR_DIR,
    Manifest,
    is_export_manifest,
    model_hash,
)
from himap_trt.export.onnx_export import DEFAULT_OPSET, OPSETS
from himap_trt.graphs.spec import DTYPE_NAMES, GraphSpec, graph_specs
from himap_trt.plan import PruningPlan

__all__ = ["ExportOptions", "export_model", "default_max_seq_len", "check_max_seq_len", "DEFAULT_OPSET", "OPSETS"]


@dataclass(frozen=True)
class ExportOptions:
    """What to export.

    Attributes:
        out: the export directory.
        dtype: ``fp32``, ``fp16`` or ``bf16`` (graphs are exported in this precision; scoring and
            softmax compute in float32 inside them).
        opset: ONNX opset (18-20).
        max_seq_len: most tokens (prompt + generated) per sequence (tokens); None: the model's
            ``max_position_embeddings``, capped at 2048.
        validate: compare every graph with PyTorch in ONNX Runtime after export.
        kv_write: how segment graphs write their KV caches in place: ``scatternd`` (ScatterND, any
            opset here; ONNX Runtime and every TensorRT 10.x) or ``tensorscatter`` (ONNX opset-24
            TensorScatter, TensorRT 10.15+/11's in-place KV-cache update; segment graphs at opset 24).
    """

    out: Path
    dtype: str = "fp32"
    opset: int = DEFAULT_OPSET
    max_seq_len: int | None = None
    validate: bool = True
    kv_write: str = "scatternd"

    def __post_init__(self):
        from himap_trt.export.manifest import KV_WRITES

        if self.kv_write not in KV_WRITES:
            raise HimapError(f"--kv-write must be one of {', '.join(KV_WRITES)}, got {self.kv_write!r}")
        if self.opset not in OPSETS:
            raise HimapError(f"--opset must be one of {', '.join(map(str, OPSETS))}, got {self.opset}")
        if self.dtype not in DTYPE_NAMES:
            raise HimapError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")


Progress = Callable[[str, int, int], None]

#: Cap of the default --max-seq-len (LLaVA-1.5 allows 4096 positions; 2048 keeps the TensorRT
#: profiles' maxima and KV-cache memory moderate).
DEFAULT_MAX_SEQ_LEN_CAP = 2048


def default_max_seq_len(dims) -> int:
    """The ``--max-seq-len`` used when none is given: the model's positions, at most 2048 tokens."""
    return min(dims.max_position_embeddings, DEFAULT_MAX_SEQ_LEN_CAP)


def check_max_seq_len(dims, max_seq_len: int | None) -> int:
    """The ``--max-seq-len`` to export with (:func:`default_max_seq_len` if None), checked against the model.

    Raises:
        HimapError: unless more than the image tokens and at most the model's positions.
    """
    value = default_max_seq_len(dims) if max_seq_len is None else max_seq_len
    if not dims.num_image_tokens < value <= dims.max_position_embeddings:
        raise HimapError(f"--max-seq-len must be in ({dims.num_image_tokens}, {dims.max_position_embeddings}] "
                         f"(more than the image tokens, at most the model's positions), got {value}")
    return value


def _describe(spec: GraphSpec) -> str:
    if spec.kind == "segment":
        start, end = spec.layers
        return f"{spec.name} (layers {start}-{end - 1})"
    if spec.kind == "scoring":
        return f"{spec.name} ({spec.attrs['criterion']}, keep {spec.attrs['keep']} of {spec.attrs['entering']})"
    return spec.name


def export_model(loaded, plan: PruningPlan, options: ExportOptions, progress: Progress | None = None):
    """Export ``loaded`` (a :class:`~himap_trt.models.LoadedModel`, already in the export dtype) under
    ``plan`` into ``options.out``.

    Args:
        progress: optional ``(description, step, total_steps)`` callback, called before each step.

    Returns:
        ``(manifest, checks)``: the written :class:`Manifest` and the validation's output checks
        (empty with ``validate=False``).

    Raises:
        HimapError: --max-seq-len out of range, an export/checker failure, or a validation failure (then
            nothing is written and an existing export at ``options.out`` is untouched).
    """
    import torch

    from himap_trt import __version__
    from himap_trt.arch import get_architecture, plan_dims
    from himap_trt.export.compose import SegmentComposer
    from himap_trt.export.onnx_export import export_graph
    from himap_trt.export.validate import raise_on_failures, record_reference, validate_graphs
    from himap_trt.confine import files_under, record_files
    from himap_trt.fsutil import atomic_directory, pause_point
    from himap_trt.graphs.modules import build_module
    from himap_trt.runtime import Pipeline, generation_token_ids, torch_backends

    dims = plan_dims(loaded.dims, plan)        # a per-request-count model: the plan's --max-image-tokens
    dtype = DTYPE_NAMES[options.dtype]
    max_seq_len = check_max_seq_len(dims, options.max_seq_len)
    specs = graph_specs(dims, plan, dtype)
    eos, pad = generation_token_ids(loaded.model.generation_config, loaded.processor.tokenizer)
    steps = len(specs) + (len(specs) + 1 if options.validate else 0) + 1
    step = 0

    def report(text: str) -> None:
        nonlocal step
        if progress:
            progress(text, step, steps)
        step += 1

    with atomic_directory(options.out, marker=MANIFEST_NAME, flag="--out", recognise=is_export_manifest) as tmp:
        composer = SegmentComposer(loaded.model, dtype, options.opset, options.kv_write)
        written = []
        for spec in specs:
            report(f"exporting {_describe(spec)}")
            path = tmp / f"{spec.name}.onnx"
            if spec.kind == "segment":
                composer.export(spec, path)
            elif spec.kind == "vision":
                get_architecture(dims.architecture).export_vision(loaded.model, spec, path, opset=options.opset,
                                                                  vocab_size=dims.vocab_size)
            else:
                export_graph(build_module(loaded.model, spec), spec, path, opset=options.opset,
                             vocab_size=dims.vocab_size)
            written.append(replace(spec, file=path.name))
            pause_point("export:graph")
        report("hashing the model's config and weights")
        digest = model_hash(loaded.model)
        loaded.processor.save_pretrained(tmp / PROCESSOR_DIR)
        checks = []
        if options.validate:
            report("running the PyTorch reference on a sample request")
            torch_modules = torch_backends(loaded.model, specs)

            def factory(backends):
                return Pipeline(specs, backends, loaded.processor, plan, image_token_id=dims.image_token_id,
                                device=loaded.model.device, eos_token_ids=eos, pad_token_id=pad,
                                architecture=dims.architecture)

            with torch.inference_mode():
                recorded = record_reference(factory, torch_modules)
            checks = validate_graphs(tmp, written, recorded, dtype,
                                     on_graph=lambda spec: report(f"validating {spec.name}"))
            raise_on_failures(checks)
        manifest = Manifest(
            format_version=FORMAT_VERSION, package_version=__version__, source_model=loaded.source,
            model_hash=digest, plan=plan, dtype=dtype, opset=options.opset, max_seq_len=max_seq_len, dims=dims,
            image_token_id=dims.image_token_id, eos_token_ids=tuple(eos), pad_token_id=pad, graphs=tuple(written),
            validation={f"{c.graph}/{c.phase}/{c.output}": c.max_abs_diff for c in checks},
            files=record_files(tmp, files_under(tmp)),
            kv_write=options.kv_write,
        )
        manifest.save(tmp)
    return manifest, checks
