"""Validating decoder segments in chunks of layers, so the memory of validation does not grow with depth.

ONNX Runtime's CPU provider converts an fp16 graph's weights to float32 when it opens a session
(about 2.9x the graph's weight bytes while opening, 1.8-2x once open: docs/PERFORMANCE.md), so
validating a 24-layer segment of a 7B model whole needs ~27 GiB. Here a segment [a, b) longer
than the chunk size is validated as consecutive chunks [a, a+n), [a+n, a+2n), ...:

- the PyTorch reference runs the segment as its chunks in sequence (each chunk is a
  :class:`~himap_trt.graphs.modules.DecoderSegment` of its layers; the same functions on the same
  inputs, so the segment's outputs are bitwise those of the unchunked reference) and records each
  chunk's feeds and outputs for the first prefill and the first decode call: the hidden states at
  the chunk boundaries, and the chunk's slice of the KV caches;
- each chunk graph is composed by the same :class:`~himap_trt.export.compose.SegmentComposer`
  (the same templates and weights as the segment graph), written to a scratch directory, run in
  ONNX Runtime on the recorded inputs of its chunk, compared, closed and deleted;
- the export keeps the full segment graph (composed from the same pieces), which is not run whole.

Each chunk is compared on the reference's own boundary activations, so its error is the chunk's own
(errors do not accumulate across chunks as they do through a whole segment); the checks are named
``segment_<j>.layers_<a>-<b-1>``.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from himap_trt.errors import HimapError
from himap_trt.export.validate import RecordingBackend, validate_graphs
from himap_trt.graphs.modules import DecoderSegment
from himap_trt.graphs.spec import GraphSpec, TensorSpec, past_names, present_names, query_name
from himap_trt.runtime.backend import BackendBase, TorchBackend, place_outputs

#: ``--validate-chunk-layers`` default (auto): as many layers per chunk as fit this many bytes of
#: weights in the export dtype (7B fp16: 2 layers; 13B fp16: 1; the tiny models: whole segments).
VALIDATE_CHUNK_BYTES = 1024**3
#: Scratch directory (inside the partial export) for chunk graphs, removed before the manifest is written.
SCRATCH = ".validate-chunks"


def layer_weight_bytes(dims, itemsize: int) -> int:
    """Bytes of one decoder layer's weights (q, k, v, o, gate, up, down projections and two norms)."""
    d, q, kv = dims.hidden_size, dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    return itemsize * (d * q + 2 * d * kv + q * d + 3 * d * dims.intermediate_size + 2 * d)


def resolve_chunk_layers(requested: int | None, dims, itemsize: int) -> int:
    """Layers per validation chunk: ``requested``, or for None the most whose weights fit
    :data:`VALIDATE_CHUNK_BYTES` (at least 1); 0 means whole segments.

    Raises:
        HimapError: a negative value (naming ``--validate-chunk-layers``).
    """
    if requested is None:
        return max(1, VALIDATE_CHUNK_BYTES // layer_weight_bytes(dims, itemsize))
    if requested < 0:
        raise HimapError(f"--validate-chunk-layers must be >= 0 (0: whole segments), got {requested}")
    return requested


def chunk_specs(segment: GraphSpec, chunk_layers: int) -> list[GraphSpec]:
    """The chunk graphs of ``segment`` with at most ``chunk_layers`` layers each, or [] if the segment
    is not longer than that (or ``chunk_layers`` is 0).

    A chunk takes the segment's ``hidden_states``/``position_ids``/``attention_mask``/``cache_position``
    and its layers' ``past_key_values``; it returns ``last_hidden_state`` and its layers' ``present``
    tensors, except the last chunk, which returns what the segment returns after its layers (``logits``
    or ``last_hidden_state`` and ``query.{b-1}``).
    """
    start, end = segment.layers
    if chunk_layers <= 0 or end - start <= chunk_layers:
        return []
    hidden = segment.input("hidden_states")
    common = [segment.input(name) for name in ("hidden_states", "position_ids", "attention_mask", "cache_position")]
    chunks = []
    for a in range(start, end, chunk_layers):
        b = min(a + chunk_layers, end)
        last = b == end
        inputs = common + [segment.input(n) for layer in range(a, b) for n in past_names(layer)]
        head = [segment.outputs[0]] if last else [TensorSpec("last_hidden_state", hidden.dtype, hidden.shape)]
        outputs = head + [segment.output(n) for layer in range(a, b) for n in present_names(layer)]
        if last and not segment.attrs["final"]:
            outputs.append(segment.output(query_name(end - 1)))
        chunks.append(replace(segment, name=f"{segment.name}.layers_{a}-{b - 1}", inputs=tuple(inputs),
                              outputs=tuple(outputs), layers=(a, b), file=None,
                              attrs={**segment.attrs, "final": last and segment.attrs["final"], "chunk_of": segment.name}))
    return chunks


def chunk_module(llava: torch.nn.Module, spec: GraphSpec) -> torch.nn.Module:
    """The PyTorch reference of a chunk (or of any segment spec): its layers as one DecoderSegment."""
    start, end = spec.layers
    emit_query = any(name.startswith("query.") for name in spec.output_names)
    return DecoderSegment(llava, start, end, final=spec.attrs["final"], emit_query=emit_query).eval()


class ChunkedSegmentBackend(BackendBase):
    """A segment's reference run as its chunks in sequence, each chunk's calls recorded.

    Args:
        spec: the segment.
        chunks: its chunk specs (:func:`chunk_specs`).
        llava: the model (its layers may be streamed from the files).
    """

    label = "torch"
    #: :func:`himap_trt.export.validate.record_reference` takes this backend's own per-chunk records.
    records_itself = True

    def __init__(self, spec: GraphSpec, chunks: list[GraphSpec], llava: torch.nn.Module):
        self.spec = spec
        self.chunks = [RecordingBackend(TorchBackend(chunk, chunk_module(llava, chunk))) for chunk in chunks]

    def run(self, feeds, outputs=None):
        hidden = feeds["hidden_states"]
        results: dict[str, torch.Tensor] = {}
        for chunk in self.chunks:
            chunk_feeds = {name: feeds[name] for name in chunk.spec.input_names if name != "hidden_states"}
            chunk_feeds["hidden_states"] = hidden
            got = chunk.run(chunk_feeds)
            hidden = got.get("last_hidden_state")
            results.update(got)
        return place_outputs({name: results[name] for name in self.spec.output_names}, outputs)

    def recorded(self) -> dict:
        """chunk name -> {phase: (feeds, outputs)}."""
        return {chunk.spec.name: chunk.calls for chunk in self.chunks}

    def close(self) -> None:
        self.chunks = []


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``): ONNX Runtime's
    fp32 copies of a closed session's weights otherwise stay in the process's heap (measured ~1 GiB
    after the 7B vision session) and add to the next session's peak."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def validate_in_chunks(export_dir: Path, specs: list[GraphSpec], chunks: dict[str, list[GraphSpec]],
                       recorded: dict, dtype: str, composer, on_graph=None) -> list:
    """:func:`~himap_trt.export.validate.validate_graphs` for every graph of the export, with each
    segment in ``chunks`` replaced by its chunk graphs, composed one at a time into a scratch
    directory (``export_dir/.validate-chunks``), validated and deleted.

    Returns:
        Every output check, in chain order.
    """
    checks = []
    scratch = Path(export_dir) / SCRATCH
    try:
        for spec in specs:
            parts = chunks.get(spec.name)
            if not parts:
                checks += validate_graphs(export_dir, [spec], recorded, dtype, on_graph=on_graph)
                release_memory()
                continue
            for part in parts:
                if on_graph:
                    on_graph(part)
                scratch.mkdir(exist_ok=True)
                path = composer.export(part, scratch / f"{part.name}.onnx")
                try:
                    checks += validate_graphs(scratch, [replace(part, file=path.name)], recorded, dtype)
                finally:
                    for file in scratch.iterdir():
                        file.unlink()
                    release_memory()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return checks
