"""The backend interface: one object runs one graph.

Backends exchange ``torch.Tensor`` objects with the pipeline (on CPU for ONNX Runtime's CPU
provider, on the GPU for CUDA backends), so the pipeline never copies between host and device
itself. A backend is a context manager; ``close`` releases its session / engine / memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from himap_trt.arch import architecture_for
from himap_trt.errors import HimapError
from himap_trt.graphs.build import build_module
from himap_trt.graphs.spec import GraphSpec, TensorSpec


@runtime_checkable
class Backend(Protocol):
    """Runs one graph of the chain.

    Attributes:
        spec: the graph's declaration (name, inputs, outputs).
    """

    spec: GraphSpec

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The graph's inputs (names, dtypes, symbolic shapes), in spec order."""
        ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """The graph's outputs, in spec order."""
        ...

    def run(self, feeds: Mapping[str, torch.Tensor],
            outputs: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run the graph once.

        Args:
            feeds: one tensor per input name, on the backend's device, in the spec's dtype.
            outputs: optional preallocated tensors (contiguous, of the output's shape and dtype) to
                write outputs into. A segment's ``present.{l}.*`` output given here as the very
                tensor fed as ``past_key_values.{l}.*`` is written **in place** (the KV-cache
                update); ONNX Runtime binds both names to that memory, TensorRT uses its aliased
                I/O, torch writes into it.

        Returns:
            One tensor per output name (the given ``outputs`` tensors where given). The caller owns
            them (they are not overwritten by the next call).
        """
        ...

    def close(self) -> None:
        """Release the backend's resources; ``run`` must not be called afterwards."""
        ...


class BackendBase:
    """Shared plumbing: spec-derived ``inputs``/``outputs`` and the context-manager protocol."""

    spec: GraphSpec
    #: Short name of the backend kind, for reports.
    label = "backend"

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.spec.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.spec.outputs

    def close(self) -> None:  # pragma: no cover - overridden where there is something to release
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def place_outputs(results: dict[str, torch.Tensor],
                  outputs: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Copy results into the caller's preallocated ``outputs`` where they are not already there."""
    for name, target in (outputs or {}).items():
        value = results[name]
        if value.data_ptr() != target.data_ptr() or value.shape != target.shape:
            target.copy_(value)
        results[name] = target
    return results


class TorchBackend(BackendBase):
    """Runs a graph's PyTorch module (:func:`himap_trt.graphs.build.build_module`) in inference mode.

    This is the PyTorch reference of the pipeline, on CPU or CUDA in any dtype the model was
    loaded in.
    """

    label = "torch"

    def __init__(self, spec: GraphSpec, module: torch.nn.Module):
        self.spec = spec
        self.module = module

    def run(self, feeds: Mapping[str, torch.Tensor],
            outputs: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        # A segment module writes its new keys/values into the fed past tensors (in place).
        with torch.inference_mode():
            results = dict(zip(self.spec.output_names, self.module(*(feeds[name] for name in self.spec.input_names))))
        return place_outputs(results, outputs)

    def close(self) -> None:
        self.module = None


def torch_backends(llava: torch.nn.Module, specs: list[GraphSpec]) -> dict[str, TorchBackend]:
    """One :class:`TorchBackend` per spec, sharing ``llava``'s parameters."""
    arch = architecture_for(llava.config)
    return {spec.name: TorchBackend(spec, build_module(llava, spec, arch)) for spec in specs}


class ChunkedBackend(BackendBase):
    """Runs one decoder segment as consecutive layer chunks (:mod:`himap_trt.engines.chunks`), one
    backend per chunk, in order: each chunk is fed from the segment's feeds and the earlier chunks'
    outputs (the hidden states crossing a chunk boundary); a ``present`` buffer given in
    ``outputs`` goes to the chunk that writes it (in place, as for a whole segment).

    Args:
        spec: the segment's declaration (the pipeline's view: the segment's inputs and outputs).
        parts: one backend per chunk, in layer order; each ``part.spec`` names its own inputs
            (segment inputs and the previous boundary) and outputs.

    Raises:
        HimapError: if the chunks do not produce every output of the segment.
    """

    label = "chunked"

    def __init__(self, spec: GraphSpec, parts: list):
        self.spec = spec
        self.parts = list(parts)
        produced = {t.name for part in self.parts for t in part.spec.outputs}
        missing = [name for name in spec.output_names if name not in produced]
        if missing:
            raise HimapError(f"graph {spec.name!r}: its chunks produce no {', '.join(missing)}")
        self.label = f"{self.parts[0].label} x{len(self.parts)}" if self.parts else "chunked"

    def run(self, feeds: Mapping[str, torch.Tensor],
            outputs: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        outputs = outputs or {}
        available = dict(feeds)
        for part in self.parts:
            part_feeds = {t.name: available[t.name] for t in part.spec.inputs}
            part_outputs = {t.name: outputs[t.name] for t in part.spec.outputs if t.name in outputs}
            available.update(part.run(part_feeds, part_outputs))
        return {name: available[name] for name in self.spec.output_names}

    def close(self) -> None:
        for part in self.parts:
            part.close()
        self.parts = []
