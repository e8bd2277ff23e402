"""The TensorRT backend: one deserialised engine per graph, one execution context per profile.

Inputs and outputs are CUDA ``torch.Tensor`` objects bound by address (``set_tensor_address``), so
KV caches stay on the GPU between steps; every call runs with ``execute_async_v3`` on torch's
current CUDA stream, ordered with the pipeline's own torch work, without host round trips. Every
TensorRT call's return value is checked.

Written against the TensorRT 10.x / 11.x name-based Python API. It has not run here: no TensorRT
is installable on this project's machines (see README, "What was verified where").
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from himap_trt.engines.profiles import Profile
from himap_trt.errors import HimapError
from himap_trt.graphs.spec import GraphSpec
from himap_trt.runtime.backend import BackendBase
from himap_trt.runtime.kv_cache import torch_dtype


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


class TensorRTBackend(BackendBase):
    """Runs one engine.

    Args:
        spec: the graph's declaration.
        path: its ``.engine`` file.
        profiles: the engine's optimization profiles, in build order (from the engines manifest).
        runtime: a shared ``trt.Runtime``.

    Raises:
        HimapError: if the engine cannot be deserialised, lacks a tensor of the spec, or a context
            cannot be created / bound to its profile.
    """

    label = "tensorrt"

    def __init__(self, spec: GraphSpec, path: Path, profiles: tuple[Profile, ...], runtime):
        import tensorrt as trt

        self.spec = spec
        self.profiles = profiles
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise HimapError(f"TensorRT could not deserialise {str(path)!r} (built for another TensorRT or GPU?)")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        missing = [t.name for t in (*spec.inputs, *spec.outputs) if t.name not in names]
        if missing:
            raise HimapError(f"engine {str(path)!r} lacks tensors {missing} of graph {spec.name!r}")
        if self.engine.num_optimization_profiles != len(profiles):
            raise HimapError(f"engine {str(path)!r} has {self.engine.num_optimization_profiles} profiles, "
                             f"the manifest lists {len(profiles)}")
        stream = torch.cuda.current_stream().cuda_stream
        self.contexts = []
        for index in range(len(profiles)):
            context = self.engine.create_execution_context()
            if context is None:
                raise HimapError(f"TensorRT could not create an execution context for {spec.name!r} (out of GPU memory?)")
            if not context.set_optimization_profile_async(index, stream):
                raise HimapError(f"TensorRT refused optimization profile {index} of {spec.name!r}")
            self.contexts.append(context)
        torch.cuda.current_stream().synchronize()
        self._placeholder = torch.empty(1, dtype=torch.uint8, device="cuda")  # address for zero-size tensors
        self._trt = trt

    def _select(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for index, profile in enumerate(self.profiles):
            if profile.covers(shapes):
                return index
        raise HimapError(f"graph {self.spec.name!r}: no optimization profile covers input shapes {shapes}; "
                         "rebuild the engines with a larger --max-batch / --max-seq-len")

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = {t.name: tuple(feeds[t.name].shape) for t in self.spec.inputs}
        context = self.contexts[self._select(shapes)]
        alive = []
        for tensor in self.spec.inputs:
            value = feeds[tensor.name]
            if value.device.type != "cuda" or value.dtype != torch_dtype(tensor.dtype):
                raise HimapError(f"graph {self.spec.name!r}: input {tensor.name} must be a CUDA {tensor.dtype} tensor, "
                                 f"got {value.device} {value.dtype}")
            value = value.contiguous()
            alive.append(value)
            if not context.set_input_shape(tensor.name, tuple(value.shape)):
                raise HimapError(f"graph {self.spec.name!r}: TensorRT rejected shape {tuple(value.shape)} for {tensor.name}")
            address = value.data_ptr() if value.numel() else self._placeholder.data_ptr()
            if not context.set_tensor_address(tensor.name, address):
                raise HimapError(f"graph {self.spec.name!r}: TensorRT rejected the address of {tensor.name}")
        unresolved = context.infer_shapes()
        if unresolved:
            raise HimapError(f"graph {self.spec.name!r}: TensorRT cannot infer the shapes of {list(unresolved)}")
        outputs = {}
        for tensor in self.spec.outputs:
            shape = tuple(context.get_tensor_shape(tensor.name))
            if any(d < 0 for d in shape):
                raise HimapError(f"graph {self.spec.name!r}: output {tensor.name} has unresolved shape {shape}")
            value = torch.empty(shape, dtype=torch_dtype(tensor.dtype), device="cuda")
            outputs[tensor.name] = value
            address = value.data_ptr() if value.numel() else self._placeholder.data_ptr()
            if not context.set_tensor_address(tensor.name, address):
                raise HimapError(f"graph {self.spec.name!r}: TensorRT rejected the address of {tensor.name}")
        if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise HimapError(f"graph {self.spec.name!r}: TensorRT execution failed (execute_async_v3 returned False)")
        return outputs

    def close(self) -> None:
        self.contexts = []
        self.engine = None


def tensorrt_backends(engines_dir: Path, engines, export) -> dict[str, TensorRTBackend]:
    """One :class:`TensorRTBackend` per graph of the export, keyed by graph name.

    Args:
        engines_dir: the engines directory.
        engines: its checked :class:`~himap_trt.engines.manifest.EnginesManifest`.
        export: the export's :class:`~himap_trt.export.manifest.Manifest` (graph declarations).
    """
    from himap_trt.engines.build import import_tensorrt

    trt = import_tensorrt()
    logger = _logger(trt)
    runtime = trt.Runtime(logger)
    backends = {}
    for spec in export.graphs:
        entry = engines.entry(spec.name)
        backends[spec.name] = TensorRTBackend(spec, Path(engines_dir) / entry.file, entry.profiles, runtime)
        backends[spec.name]._keep = (runtime, logger)  # the engine must not outlive its runtime
    return backends
