"""Validation after export: every graph, in ONNX Runtime, against the PyTorch reference.

Like optimum's exporters: the reference pipeline runs a small real request (two synthetic
images, two questions of different lengths, so the batch is padded) through prefill and two
decode steps; every graph call is recorded; each exported graph then runs on the recorded inputs
of its prefill and decode calls, and each output's max abs difference is reported. All failures
are collected and raised once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from himap_trt.errors import HimapError
from himap_trt.export.quantize import TOLERANCES as QUANTIZED  # tolerances of quantized graphs
from himap_trt.graphs.spec import GraphSpec, past_names, present_names
from himap_trt.runtime.backend import Backend, TorchBackend
from himap_trt.runtime.onnxrt import OnnxRuntimeBackend
from himap_trt.runtime.reference_eval import ReferenceEvaluatorBackend
from himap_trt.runtime.sampling import GenerationConfig

#: (atol, rtol) per dtype: an output passes when ``max |ours - ref| <= atol + rtol * max |ref|``
#: over the tensor (the residual stream's scale sets what rounding can do to every element of it).
#: Integer outputs (kept indices, positions, masks) must match exactly. Worst cases measured on the
#: tiny models, both configurations, none/FastV/HiMAP x2 (docs/PERFORMANCE.md, "Numerical
#: agreement"), with about 2x margin: fp32 ORT vs PyTorch 6e-5 at |x| ~ 54; fp16 0.055 at |x| ~ 6.3
#: (rel 8.6e-3) and 0.14 at |x| ~ 46; bf16 (reference evaluator) 0.27 at |x| ~ 5.2 (rel 5.1e-2).
TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (1e-2, 1.5e-2), "bfloat16": (5e-2, 1e-1)}


@dataclass(frozen=True)
class OutputCheck:
    """One output of one graph call compared with PyTorch."""

    graph: str
    phase: str
    output: str
    max_abs_diff: float
    max_abs_ref: float
    ok: bool
    backend: str = "onnxruntime"
    exact: bool = False   # an integer output: max_abs_diff counts mismatching elements


class RecordingBackend:
    """Wraps a backend and keeps the first prefill and first decode call's feeds and outputs."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.spec = inner.spec
        self.calls: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    @property
    def inputs(self):
        return self.inner.inputs

    @property
    def outputs(self):
        return self.inner.outputs

    def run(self, feeds: Mapping[str, torch.Tensor],
            outputs: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        phase = call_phase(self.spec, feeds)
        record = phase not in self.calls
        before = {k: v.clone() for k, v in feeds.items()} if record else None   # segments write their pasts in place
        result = self.inner.run(feeds, outputs) if outputs else self.inner.run(feeds)
        if record:
            self.calls[phase] = (before, {k: v.clone() for k, v in result.items()})
        return result

    def close(self) -> None:
        self.inner.close()


def call_phase(spec: GraphSpec, feeds: Mapping[str, torch.Tensor]) -> str:
    """``prefill`` or ``decode`` for a call of graph ``spec`` with ``feeds``."""
    if spec.kind == "segment":   # prefill fills an exact-size buffer; decode feeds 1 token into a longer one
        # (--kv-write attention: prefill feeds S > 1 tokens into the static-length buffer)
        seq = feeds["hidden_states"].shape[1]
        return "prefill" if seq > 1 or seq == feeds["attention_mask"].shape[1] else "decode"
    if spec.kind == "embed":
        return "prefill" if feeds["input_ids"].shape[1] > 1 else "decode"
    return "prefill"


def sample_requests() -> tuple[list[Image.Image], list[str]]:
    """Two deterministic synthetic images (different sizes and content) and questions of
    different lengths."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    gradient = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.float64)
    first = np.clip(gradient + rng.normal(0, 20, gradient.shape), 0, 255).astype(np.uint8)
    second = rng.integers(0, 256, (200, 150, 3), dtype=np.uint8)
    return ([Image.fromarray(first), Image.fromarray(second)],
            ["What is in this picture?", "Describe the colours of this image in a few words, please."])


def record_reference(pipeline_factory, torch_modules: dict[str, TorchBackend]):
    """Run the sample request through a reference pipeline whose backends record their calls.

    Args:
        pipeline_factory: ``backends -> Pipeline`` (so the caller decides processor, ids, plan).
        torch_modules: name -> torch backend.

    Returns:
        name -> {phase: (feeds, outputs)} (for a backend with ``records_itself``: its parts' names).
    """
    # a backend with ``records_itself`` (a segment run as chunks: export/chunked.py) records its parts
    recorders = {name: backend if getattr(backend, "records_itself", False) else RecordingBackend(backend)
                 for name, backend in torch_modules.items()}
    pipeline = pipeline_factory(recorders)
    images, questions = sample_requests()
    batch = pipeline.prepare(images, questions)
    pipeline.generate(batch, GenerationConfig(max_new_tokens=3))
    recorded = {}
    for name, rec in recorders.items():
        recorded.update(rec.recorded() if getattr(rec, "records_itself", False) else {name: rec.calls})
    return recorded


def real_positions(spec: GraphSpec, phase: str, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """[B,S] bool mask of the positions whose values a segment's prefill defines, or None (compare all).

    At a segment's prefill, the outputs at a left-padded prompt's padding positions (their hidden
    states, keys, values, queries) are unspecified: no real position attends to them (the bias masks
    them) and :meth:`SlotKVCache.store` copies only real tokens into the slots. A fully masked padding
    row's softmax is uniform over whichever keys a kernel considers (all M in the reference, the causal
    prefix in ONNX Runtime's GroupQueryAttention), so only real positions are compared there.
    """
    if spec.kind != "segment" or phase != "prefill":
        return None
    return feeds["attention_mask"].bool()


def compare(spec: GraphSpec, phase: str, expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
            dtype: str, backend: str = "onnxruntime",
            tolerances: Mapping[str, tuple[float, float]] | None = None,
            positions: torch.Tensor | None = None) -> list[OutputCheck]:
    """Compare one call's outputs with the reference's (see :data:`TOLERANCES`).

    Args:
        positions: optional [B,S] bool (:func:`real_positions`): outputs with that sequence axis
            ([B,S,...] or [B,N,S,...]) are compared at these positions only; every element must still
            be finite.
    """
    atol, rtol = (tolerances or TOLERANCES)[dtype]
    checks = []
    for name in spec.output_names:
        ref = expected[name].detach().cpu()
        ours = got[name].detach().cpu()
        if positions is not None and ours.shape == ref.shape and ref.is_floating_point():
            if not bool(torch.isfinite(ours.double()).all()):
                checks.append(OutputCheck(spec.name, phase, name, float("nan"), 0.0, False, backend))
                continue
            keep = positions.cpu()
            # a static-length cache (--kv-write attention): the mask covers M >= S positions, the S new
            # tokens at 0..S-1, the rest never written
            if ref.dim() == 3 and ref.shape[1] <= keep.shape[1]:
                keep = keep[:, :ref.shape[1]]
                ref, ours = ref[keep], ours[keep]
            elif ref.dim() == 4 and ref.shape[2] <= keep.shape[1]:
                keep = keep[:, :ref.shape[2]]
                ref, ours = ref.transpose(1, 2)[keep], ours.transpose(1, 2)[keep]
        scale = float(ref.double().abs().max()) if ref.numel() else 0.0
        if ours.shape != ref.shape:
            checks.append(OutputCheck(spec.name, phase, name, float("inf"), scale, False, backend))
        elif not ref.is_floating_point():
            mismatches = float((ours != ref).sum())
            checks.append(OutputCheck(spec.name, phase, name, mismatches, scale, mismatches == 0, backend, exact=True))
        else:
            err = (ours.double() - ref.double()).abs()
            worst = float(err.max()) if err.numel() else 0.0
            ok = bool(torch.isfinite(ours.double()).all()) and worst <= atol + rtol * scale
            checks.append(OutputCheck(spec.name, phase, name, worst, scale, ok, backend))
    return checks


def graph_tolerances(spec: GraphSpec, dtype: str) -> dict[str, tuple[float, float]] | None:
    """The (atol, rtol) of a graph with quantized weights (``attrs['quantization']``; against the fp32
    PyTorch model: :data:`himap_trt.export.quantize.TOLERANCES`), or None (:data:`TOLERANCES`)."""
    quantization = spec.attrs.get("quantization")
    if not quantization:
        return None
    return {dtype: QUANTIZED[quantization["scheme"]]}


def validation_backend(spec: GraphSpec, path: Path) -> Backend:
    """ONNX Runtime on CPU where it can run the graph, else ONNX's reference evaluator (e.g. for
    bfloat16, which ONNX Runtime's Python binding cannot feed, or fp16 kernels missing on CPU)."""
    try:
        return OnnxRuntimeBackend(spec, path)
    except HimapError:
        return ReferenceEvaluatorBackend(spec, path)


def validate_graphs(export_dir: Path, specs: list[GraphSpec], recorded: dict[str, Any], dtype: str,
                    open_backend=validation_backend, on_graph=None) -> list[OutputCheck]:
    """Run every exported graph on its recorded inputs and compare with the recorded outputs.

    Args:
        export_dir: where the graph files are.
        specs: graphs with ``file`` set.
        recorded: from :func:`record_reference`.
        dtype: the graphs' floating dtype (selects the tolerance).
        open_backend: ``(spec, path) -> Backend`` for the backend under test.
        on_graph: optional callback ``(spec) -> None`` called before each graph.

    Returns:
        Every output check (pass or fail); see :func:`raise_on_failures`.
    """
    checks: list[OutputCheck] = []
    for spec in specs:
        if on_graph:
            on_graph(spec)
        backend = open_backend(spec, Path(export_dir) / spec.file)
        label = getattr(backend, "label", type(backend).__name__)
        try:
            for phase, (feeds, outputs) in sorted(recorded[spec.name].items(), key=lambda item: item[0] != "prefill"):
                feeds, presents = in_place_feeds(spec, feeds)
                with torch.inference_mode():
                    got = backend.run(feeds, presents) if presents else backend.run(feeds)
                checks += compare(spec, phase, outputs, got, dtype, backend=label,
                                  tolerances=graph_tolerances(spec, dtype),
                                  positions=real_positions(spec, phase, feeds))
        finally:
            backend.close()
    return checks


def in_place_feeds(spec: GraphSpec, feeds: Mapping[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Feeds and output buffers that run a segment graph as the pipeline does: every ``past`` input a
    fresh copy of the recorded one, its ``present`` output bound to that same copy (written in place; a
    ``kv_write='gqa'`` graph needs the two to share one buffer). Other graphs: the feeds, no outputs.
    The recorded feeds are not modified."""
    if spec.kind != "segment":
        return dict(feeds), {}

    feeds, presents = dict(feeds), {}
    for layer in range(*spec.layers):
        for past, present in zip(past_names(layer), present_names(layer)):
            feeds[past] = feeds[past].clone()
            presents[present] = feeds[past]
    return feeds, presents


def raise_on_failures(checks: list[OutputCheck]) -> None:
    """Raise one :class:`HimapError` listing every failed check, if any."""
    failed = [c for c in checks if not c.ok]
    if failed:
        lines = "; ".join(f"{c.graph}/{c.phase}/{c.output} ({c.backend}): max abs diff {c.max_abs_diff:.3g} "
                          f"(max |ref| {c.max_abs_ref:.3g})" for c in failed)
        raise HimapError(f"validation against PyTorch failed for {len(failed)} output(s): {lines}")
