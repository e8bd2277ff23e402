"""``himap-trt export``: a checkpoint and a plan -> a directory of ONNX graphs + ``manifest.json``.

The directory is written beside its target and swapped in only when every graph exported,
passed ``onnx.checker`` and (unless skipped) validated against PyTorch; see
:func:`himap_trt.fsutil.atomic_directory`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from himap_trt import __version__
from himap_trt.arch import get_architecture, plan_dims
from himap_trt.confine import files_under, record_files
from himap_trt.errors import HimapError
from himap_trt.export.chunked import (
    ChunkedSegmentBackend,
    chunk_specs,
    release_memory,
    resolve_chunk_layers,
    validate_in_chunks,
)
from himap_trt.export.compose import SegmentComposer
from himap_trt.export.quantize import check_quantization
from himap_trt.export.onnx_export import DEFAULT_OPSET, OPSETS, export_graph
from himap_trt.export.validate import raise_on_failures, record_reference
from himap_trt.fsutil import atomic_directory, write_point
from himap_trt.export.qwen_vision import export_vision_graph as export_qwen2_5_vl_vision
from himap_trt.export.qwen3_vision import export_vision_graph as export_qwen3_vl_vision
from himap_trt.graphs.build import build_module
from himap_trt.graphs.spec import DTYPE_NAMES, GraphSpec, graph_specs, segment_cache_lengths, static_cache_specs
from himap_trt.manifest import (
    FORMAT_VERSION,
    KV_WRITE_OPSETS,
    KV_WRITES,
    MANIFEST_NAME,
    TARGETS,
    target_kv_write,
    Manifest,
    PROCESSOR_DIR,
    is_export_manifest,
    model_hash,
    recorded_specs,
)
from himap_trt.models.streaming import streamed_model_hash
from himap_trt.plan import PruningPlan
from himap_trt.runtime import Pipeline, generation_token_ids, torch_backends
from himap_trt.runtime.kv_cache import torch_dtype
from himap_trt.runtime.loader import check_device
from himap_trt.signing import check_private_key, sign_directory

__all__ = ["ExportOptions", "export_model", "export_specs", "check_reference_device", "default_max_seq_len", "check_max_seq_len", "DEFAULT_OPSET", "OPSETS"]


@dataclass(frozen=True)
class ExportOptions:
    """What to export.

    Attributes:
        out: the export directory.
        dtype: ``fp32``, ``fp16`` or ``bf16`` (graphs are exported in this precision; scoring and
            softmax compute in float32 inside them).
        opset: ONNX opset (18-20) of the graphs; None: 18 (:data:`DEFAULT_OPSET`). The segment graphs of the
            ``tensorscatter`` and ``attention`` forms are at opset 24 whatever it is
            (:data:`himap_trt.manifest.KV_WRITE_OPSETS`), so those forms refuse an explicit ``opset`` below 24.
        max_seq_len: most tokens (prompt + generated) per sequence (tokens); None: the model's
            ``max_position_embeddings``, capped at 2048.
        validate: compare every graph with PyTorch in ONNX Runtime after export.
        kv_write: how segment graphs write their KV caches in place: ``scatternd`` (ScatterND, any
            opset here; ONNX Runtime and every TensorRT 10.x) or ``tensorscatter`` (ONNX opset-24
            TensorScatter, TensorRT 10.15+/11's in-place KV-cache update; segment graphs at opset 24) or
            ``gqa`` (ONNX Runtime's ``com.microsoft.GroupQueryAttention`` writes the cache and attends
            over each row's occupied prefix only: flat decode on ONNX Runtime; fp32/fp16; TensorRT cannot
            parse it) or ``attention`` (opset-24 ``TensorScatter`` into caches of static length
            ``max_seq_len`` + one ONNX ``Attention`` per layer: TensorRT's fused attention and
            KV-cache-update layers; fp16/bf16 for TensorRT-RTX). None: the ``target``'s form
            (:func:`himap_trt.manifest.target_kv_write`).
        target: ``onnxruntime`` or ``tensorrt``: the backend the export is for (recorded in the manifest).
        validate_chunk_layers: validate decoder segments in chunks of this many layers (0: whole
            segments; None: as many layers as fit 1 GiB of weights, see :mod:`himap_trt.export.chunked`;
            one layer with ``quantize``, so each layer's error is measured on the fp32 model's inputs).
        device: where the PyTorch reference of the validation runs (``cpu``, ``cuda``, ``cuda:N``);
            tracing and the ONNX Runtime checks stay on the CPU.
        quantize: ``none``, ``int8`` or ``int4`` (weight-only), or ``int8-dynamic`` (int8 weights and
            activations quantized per call, ONNX Runtime only): quantization of the decoder's linear
            layers (:mod:`himap_trt.export.quantize`); fp32 only.
        quant_block_size: int4: input rows per scale (None: 32); int8 and int8-dynamic take none (per
            output channel).
        quantize_lm_head: quantize the LM head too.
        sign_key: an unencrypted EC private key (PEM): sign the export with OpenSSF model-signing
            (``model.sig`` inside it, see :mod:`himap_trt.signing`); None: unsigned.
    """

    out: Path
    dtype: str = "fp32"
    opset: int | None = None
    max_seq_len: int | None = None
    validate: bool = True
    kv_write: str | None = None
    validate_chunk_layers: int | None = None
    device: str = "cpu"
    quantize: str = "none"
    quant_block_size: int | None = None
    quantize_lm_head: bool = False
    sign_key: Path | None = None
    target: str = "onnxruntime"

    def __post_init__(self):
        check_device(self.device)
        if self.dtype not in DTYPE_NAMES:
            raise HimapError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        form = "--kv-write"
        if self.kv_write is None:       # the target's form (manifest.target_kv_write)
            object.__setattr__(self, "kv_write", target_kv_write(self.target, DTYPE_NAMES[self.dtype]))
            form = f"--target {self.target}'s --kv-write"
        elif self.target not in TARGETS:
            raise HimapError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.validate_chunk_layers is not None and self.validate_chunk_layers < 0:
            raise HimapError(f"--validate-chunk-layers must be >= 0 (0: whole segments), got {self.validate_chunk_layers}")

        if self.kv_write not in KV_WRITES:
            raise HimapError(f"--kv-write must be one of {', '.join(KV_WRITES)}, got {self.kv_write!r}")
        needed = KV_WRITE_OPSETS.get(self.kv_write)
        if self.opset is None:
            object.__setattr__(self, "opset", DEFAULT_OPSET)
        elif needed is not None and self.opset < needed:
            raise HimapError(f"{form} {self.kv_write} needs ONNX opset {needed} in its segment graphs, got --opset "
                             f"{self.opset}: leave --opset out (segment graphs at opset {needed}, the others at "
                             f"{DEFAULT_OPSET}), or export --kv-write scatternd at --opset {self.opset}")
        if self.opset not in OPSETS:
            raise HimapError(f"--opset must be one of {', '.join(map(str, OPSETS))}, got {self.opset}")
        if self.dtype not in DTYPE_NAMES:
            raise HimapError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.kv_write == "gqa" and self.dtype not in ("fp32", "fp16", "float32", "float16"):
            raise HimapError(f"--kv-write gqa needs --dtype fp32 or fp16 (ONNX Runtime runs it), got {self.dtype!r}")
        if self.sign_key is not None:
            check_private_key(self.sign_key, "--sign")
        self.quantization(None)   # scheme, block size and dtype (the model's sizes: export_model)

    def quantization(self, dims):
        """The checked :class:`~himap_trt.export.quantize.Quantization` (None: ``--quantize none``);
        ``dims`` (or None) for the block-size checks against the model's layer sizes.

        Raises:
            HimapError: see :func:`himap_trt.export.quantize.check_quantization`.
        """
        return check_quantization(self.quantize, self.quant_block_size, dims, DTYPE_NAMES[self.dtype],
                                  self.quantize_lm_head)


Progress = Callable[[str, int, int], None]

#: Cap of the default --max-seq-len (LLaVA-1.5 allows 4096 positions; 2048 keeps the TensorRT
#: profiles' maxima and KV-cache memory moderate).
DEFAULT_MAX_SEQ_LEN_CAP = 2048

#: Families whose ``vision`` graph is not exported by tracing ``arch.vision_module`` like any other
#: graph: ``Architecture.name`` -> ``(model, spec, path, *, opset, vocab_size) -> None``. (The
#: families sit below the export in the layers of docs/ARCHITECTURE.md, so the export, not the
#: family, holds the exporter.)
VISION_EXPORTERS = {"qwen2_5_vl": export_qwen2_5_vl_vision, "qwen3_vl": export_qwen3_vl_vision}


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

    With ``loaded.weights`` set (:func:`himap_trt.models.streaming.load_streamed`) the decoder layers
    are read from the checkpoint files when their graph is written or the reference runs them, and
    released after; the model hash is computed from the files.

    Raises:
        HimapError: --max-seq-len out of range, an export/checker failure, or a validation failure (then
            nothing is written and an existing export at ``options.out`` is untouched); ``--device cuda``
            without a usable GPU.
    """
    import contextlib

    import torch

    dims = plan_dims(loaded.dims, plan)        # a per-request-count model: the plan's --max-image-tokens
    arch = get_architecture(dims.architecture)
    dtype = DTYPE_NAMES[options.dtype]
    max_seq_len = check_max_seq_len(dims, options.max_seq_len)
    specs = export_specs(loaded.dims, plan, dtype, options.kv_write, max_seq_len)
    quantization = options.quantization(dims)
    specs = recorded_specs(specs, quantization.to_dict() if quantization is not None else {})
    eos, pad = generation_token_ids(loaded.model.generation_config, loaded.processor.tokenizer)
    check_reference_device(options.device)
    weights = getattr(loaded, "weights", None)
    itemsize = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    chunk_layers = resolve_chunk_layers(options.validate_chunk_layers, dims, itemsize)
    if quantization is not None and options.validate_chunk_layers is None:
        # one layer per check: each layer's quantization error against the fp32 model on the same inputs
        # (over a whole segment it compounds layer after layer: the tolerance would say nothing)
        chunk_layers = 1
    chunks = {spec.name: parts for spec in specs if spec.kind == "segment" and (parts := chunk_specs(spec, chunk_layers))}
    validation_steps = sum(len(chunks.get(spec.name) or [spec]) for spec in specs)
    steps = len(specs) + (validation_steps + 1 if options.validate else 0) + 1
    step = 0

    def report(text: str) -> None:
        nonlocal step
        if progress:
            progress(text, step, steps)
        step += 1

    with atomic_directory(options.out, marker=MANIFEST_NAME, flag="--out", recognise=is_export_manifest) as tmp:
        composer = SegmentComposer(loaded.model, dtype, options.opset, options.kv_write,
                                   initializer=weights.initializer if weights else None, quantization=quantization)
        if weights:   # the layer templates are traced on layer 0's modules
            with weights.materialized([0]):
                composer.trace_pieces()
        written = []
        for spec in specs:
            report(f"exporting {_describe(spec)}")
            path = tmp / f"{spec.name}.onnx"
            if spec.kind == "segment":
                composer.export(spec, path)
            elif spec.kind == "vision" and arch.name in VISION_EXPORTERS:
                VISION_EXPORTERS[arch.name](loaded.model, spec, path, opset=options.opset, vocab_size=dims.vocab_size)
            else:
                export_graph(build_module(loaded.model, spec, arch), spec, path, opset=options.opset,
                             vocab_size=dims.vocab_size)
            written.append(replace(spec, file=path.name))
            write_point("export:graph")
        report("hashing the model's config and weights")
        if weights:
            digest = streamed_model_hash(loaded.model, weights.files, weights.dtype)
        else:
            digest = model_hash(loaded.model)
        loaded.processor.save_pretrained(tmp / PROCESSOR_DIR)
        write_point("export:processor")
        checks = []
        if options.validate:
            report("running the PyTorch reference on a sample request")
            device = torch.device(options.device)
            if device.type != "cpu":
                weights.to(device) if weights else loaded.model.to(device)
            torch_modules = torch_backends(loaded.model, specs)
            for spec in specs:
                if spec.name in chunks:
                    torch_modules[spec.name] = ChunkedSegmentBackend(spec, chunks[spec.name], loaded.model)

            def factory(backends):
                return Pipeline(specs, backends, loaded.processor, plan, image_token_id=dims.image_token_id,
                                device=device, eos_token_ids=eos, pad_token_id=pad,
                                architecture=dims.architecture)

            with torch.inference_mode(), (weights.streaming() if weights else contextlib.nullcontext()):
                recorded = record_reference(factory, torch_modules)
            del torch_modules
            release_memory()
            if device.type != "cpu":   # ONNX Runtime is fed from host memory
                recorded = _to_cpu(recorded)
            checks = validate_in_chunks(tmp, written, chunks, recorded, dtype, composer,
                                        on_graph=lambda spec: report(f"validating {spec.name}"))
            del recorded
            raise_on_failures(checks)
        manifest = Manifest(
            format_version=FORMAT_VERSION, package_version=__version__, source_model=loaded.source,
            model_hash=digest, plan=plan, dtype=dtype, opset=options.opset, max_seq_len=max_seq_len, dims=dims,
            image_token_id=dims.image_token_id, eos_token_ids=tuple(eos), pad_token_id=pad, graphs=tuple(written),
            validation={f"{c.graph}/{c.phase}/{c.output}": c.max_abs_diff for c in checks},
            files=record_files(tmp, files_under(tmp)),
            kv_write=options.kv_write,
            target=options.target,
            quantization=quantization.to_dict() if quantization else {},
        )
        manifest.save(tmp)
        write_point("export:manifest")
        if options.sign_key is not None:
            sign_directory(tmp, options.sign_key, "--sign")
            write_point("export:signature")
    return manifest, checks


def export_specs(dims, plan: PruningPlan, dtype: str, kv_write: str, max_seq_len: int) -> list[GraphSpec]:
    """The graphs an export of ``plan`` declares, in execution order (before quantization is recorded on them).

    Args:
        dims: the model's :class:`~himap_trt.dims.ModelDims` (its image-token bound set from ``plan`` here).
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        kv_write: the export's form; ``attention`` fixes every segment's cache axis to its static length
            (TensorRT's KV-cache update needs a cache of static length;
            :func:`himap_trt.graphs.spec.segment_cache_lengths`).
        max_seq_len: tokens (prompt + generated) per sequence, already checked.
    """
    dims = plan_dims(dims, plan)
    arch = get_architecture(dims.architecture)
    specs = graph_specs(dims, plan, dtype, arch=arch)
    if kv_write == "attention":
        specs = static_cache_specs(specs, segment_cache_lengths(plan, max_seq_len,
                                                                variable_image_tokens=arch.variable_image_tokens))
    return specs


def check_reference_device(device: str) -> None:
    """Raise unless the PyTorch reference can run on ``device`` (``export --device``).

    Raises:
        HimapError: ``cuda`` asked for but torch sees no usable CUDA device (one line, nothing exported).
    """
    import torch

    check_device(device)
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available():
            raise HimapError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                             "no usable GPU or a CPU-only build); export with --device cpu")
        if index >= torch.cuda.device_count():
            raise HimapError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")


def _to_cpu(recorded):
    return {name: {phase: tuple({k: v.cpu() for k, v in part.items()} for part in call)
                   for phase, call in calls.items()} for name, calls in recorded.items()}
