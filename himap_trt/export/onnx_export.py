"""Exporting one graph to ONNX with ``torch.onnx.export(dynamo=True)``.

Dynamic axes come from the graph's :class:`~himap_trt.graphs.spec.GraphSpec`: every symbolic
dim is exported as ``Dim.AUTO`` (so relations such as ``sequence - 72`` are inferred,
not declared), then the graph's input/output dims are renamed to the spec's names and checked:
an axis the spec calls symbolic but the exporter specialised is an error.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from pathlib import Path

import torch

from himap_trt.errors import HimapError
from himap_trt.graphs.spec import GraphSpec, TensorSpec
from himap_trt.prompt import TOKEN_IMAGE, TOKEN_INSTRUCTION, TOKEN_SYSTEM
from himap_trt.runtime.kv_cache import torch_dtype

#: Opsets the exporter targets: 18-20 (no opset-23 fused Attention/RMSNorm, whose TensorRT parser
#: support is partial).
OPSETS = (18, 19, 20)
DEFAULT_OPSET = 18

#: Example sizes used for tracing: distinct values >= 2, so no axis is specialised to 0/1 and no
#: two axes are unified by coincidence.
TRACE_SIZES = {"batch": 3, "sequence": 7, "cache_sequence": 12}

#: Weights above this size go to an external data file (``<graph>.onnx.data``).
EXTERNAL_DATA_BYTES = 256 * 1024 * 1024


def trace_sizes(spec: GraphSpec) -> dict[str, int]:
    """Named sizes for tracing ``spec`` (a scoring graph needs room for its image tokens)."""
    sizes = dict(TRACE_SIZES)
    if spec.kind == "scoring":
        sizes["sequence"] = spec.attrs["entering"] + TRACE_SIZES["sequence"]
        if spec.attrs.get("variable"):   # per-request counts: E and C image slots at the export's bound
            sizes["image_slots"], sizes["kept_slots"] = spec.attrs["entering"], spec.attrs["keep"]
    return sizes


def example_inputs(spec: GraphSpec, sizes: dict[str, int], vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of the declared shapes with plausible values (for tracing and tests).

    Floating inputs are N(0, 1) (``pixel_values``) or N(0, 0.5); ``input_ids`` are random ids;
    ``position_ids`` count up; ``attention_mask`` is all ones; ``cache_position`` writes the new
    tokens at the end of the cache buffer; a scoring graph's
    ``token_type_ids`` hold 2 system tokens, its ``entering`` image tokens, then instruction tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    feeds = {}
    for tensor in spec.inputs:
        shape = tensor.concrete(sizes)
        dtype = torch_dtype(tensor.dtype)
        if tensor.name == "input_ids":
            value = torch.randint(0, vocab_size, shape, generator=gen)
        elif tensor.name == "position_ids":             # [B,S], or [3,B,S] (M-RoPE)
            start = sizes.get("cache_sequence", shape[-1]) - shape[-1]
            value = (torch.arange(shape[-1]) + start).expand(shape).contiguous()
        elif tensor.name in ("image_slots", "kept_slots"):   # per-request counts: slot ordinals
            value = torch.arange(shape[0])
        elif tensor.name == "keep_counts":
            value = torch.full(shape, sizes["kept_slots"], dtype=torch.int64)
        elif tensor.name == "cache_position":       # write the new tokens at the end of the buffer
            value = torch.full(shape, sizes.get("cache_sequence", sizes["sequence"]) - sizes["sequence"],
                               dtype=torch.int64)
        elif tensor.name == "attention_mask":
            value = torch.ones(shape, dtype=torch.int64)
        elif tensor.name == "token_type_ids":
            entering = spec.attrs["entering"]
            row = [TOKEN_SYSTEM] * 2 + [TOKEN_IMAGE] * entering + [TOKEN_INSTRUCTION] * (shape[1] - 2 - entering)
            value = torch.tensor(row).expand(shape).contiguous()
        else:
            scale = 1.0 if tensor.name == "pixel_values" else 0.5
            value = (torch.randn(shape, generator=gen) * scale).to(dtype)
        feeds[tensor.name] = value
    return feeds


def _arguments(module: torch.nn.Module, spec: GraphSpec, feeds: dict[str, torch.Tensor]):
    """(args, dynamic_shapes) as torch.export expects them: args flat, the dynamic shapes of
    varargs (the KV-cache inputs of a segment) grouped in one tuple."""
    def axes(tensor: TensorSpec):
        return {axis: torch.export.Dim.AUTO for axis, dim in enumerate(tensor.shape) if isinstance(dim, str)}

    params = list(inspect.signature(module.forward).parameters.values())
    fixed = [p for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    has_var = len(fixed) < len(params)
    head, tail = spec.inputs[:len(fixed)], spec.inputs[len(fixed):]
    args = [feeds[t.name] for t in head]
    dynamic = [axes(t) for t in head]
    if has_var:
        args.extend(feeds[t.name] for t in tail)
        dynamic.append(tuple(axes(t) for t in tail))
    elif tail:
        raise HimapError(f"graph {spec.name!r}: module takes {len(fixed)} inputs, spec declares {len(spec.inputs)}")
    return tuple(args), tuple(dynamic)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's progress prints and registration warnings (we show our own progress)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _apply_spec_shapes(model, spec: GraphSpec) -> None:
    """Rename the ONNX graph's I/O dims to the spec's; reject specialised symbolic axes."""
    import onnx_ir as ir

    def fix(values, tensors: tuple[TensorSpec, ...], what: str):
        if [v.name for v in values] != [t.name for t in tensors]:
            raise HimapError(f"graph {spec.name!r}: exported {what} {[v.name for v in values]} "
                             f"differ from the spec's {[t.name for t in tensors]}")
        for value, tensor in zip(values, tensors):
            if value.shape is None:  # a composed graph's output: take the spec's shape
                value.shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in tensor.shape])
            exported = [d if isinstance(d, int) else None for d in value.shape]
            if len(exported) != len(tensor.shape):
                raise HimapError(f"graph {spec.name!r}: {tensor.name} has rank {len(exported)}, spec {len(tensor.shape)}")
            dims = []
            for axis, (got, want) in enumerate(zip(exported, tensor.shape)):
                if isinstance(want, int):
                    if got is not None and got != want:
                        raise HimapError(f"graph {spec.name!r}: {tensor.name} axis {axis} is {got}, spec says {want}")
                    dims.append(want)
                else:
                    if got is not None:
                        raise HimapError(f"graph {spec.name!r}: the exporter fixed {tensor.name} axis {axis} "
                                         f"to {got}; the spec declares it dynamic ({want!r})")
                    dims.append(ir.SymbolicDim(want))
            value.shape = ir.Shape(dims)

    fix(model.graph.inputs, spec.inputs, "inputs")
    fix(model.graph.outputs, spec.outputs, "outputs")


def export_program(module: torch.nn.Module, spec: GraphSpec, *, opset: int, vocab_size: int):
    """Trace ``module`` (implementing ``spec``) with ``torch.onnx.export(dynamo=True)``.

    Returns:
        The exported ``onnx_ir.Model`` (optimised, not yet saved, I/O dims not yet renamed).

    Raises:
        HimapError: if the exporter fails.
    """
    feeds = example_inputs(spec, trace_sizes(spec), vocab_size)
    args, dynamic = _arguments(module, spec, feeds)
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, input_names=spec.input_names,
                output_names=spec.output_names, dynamic_shapes=dynamic, optimize=True, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; report which graph failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise HimapError(f"exporting graph {spec.name!r} failed: {type(exc).__name__}: {first}") from exc
    return program.model


def save_model(model, spec: GraphSpec, path: Path, weight_bytes: int) -> Path:
    """Rename I/O dims to the spec's, save (weights external above :data:`EXTERNAL_DATA_BYTES`)
    and check with ``onnx.checker``.

    Raises:
        HimapError: on a specialised dynamic axis or a checker failure.
    """
    import onnx
    import onnx_ir as ir

    _apply_spec_shapes(model, spec)
    external = f"{path.name}.data" if weight_bytes > EXTERNAL_DATA_BYTES else None
    ir.save(model, str(path), external_data=external)
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise HimapError(f"graph {spec.name!r} ({path.name}) fails onnx.checker: {str(exc).splitlines()[0]}") from None
    return path


def export_graph(module: torch.nn.Module, spec: GraphSpec, path: Path, *, opset: int, vocab_size: int) -> Path:
    """Export ``module`` (implementing ``spec``) to ``path`` as one traced graph and check it.

    Raises:
        HimapError: if the exporter fails, specialises a dynamic axis, or the checker rejects the graph.
    """
    model = export_program(module, spec, opset=opset, vocab_size=vocab_size)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return save_model(model, spec, path, weight_bytes)
