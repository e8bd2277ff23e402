"""The ONNX Runtime backend: one ``InferenceSession`` per graph, driven through I/O binding.

Inputs are bound to the torch tensors' memory and outputs are handed back through DLPack, so no
copy is made between the pipeline and ONNX Runtime (on CPU with ``onnxruntime``, on the GPU with
``onnxruntime-gpu``'s CUDA execution provider: the two packages install into the same folder, pick
one).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from himap_trt.errors import HimapError
from himap_trt.graphs.spec import GraphSpec
from himap_trt.runtime.backend import BackendBase
from himap_trt.runtime.kv_cache import torch_dtype

_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64"}


def session_config(quantization: dict | None) -> dict[str, str]:
    """ONNX Runtime session config entries for a graph with quantized weights (``spec.attrs['quantization']``,
    written by ``export --quantize``; see :mod:`himap_trt.export.quantize`), or ``{}``: the accuracy level
    of the ``MatMulNBits`` kernels ONNX Runtime fuses the ``DequantizeLinear -> MatMul`` pairs into
    (``int8-dynamic`` has none: ``{}``)."""
    if not quantization or quantization.get("scheme") == "int8-dynamic":
        return {}
    return {"session.qdq_matmulnbits_accuracy_level": str(int(quantization.get("accuracy_level", 4)))}


def cuda_provider_available() -> bool:
    """Whether the installed ONNX Runtime has the CUDA execution provider and torch sees a GPU."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


class OnnxRuntimeBackend(BackendBase):
    """Runs one exported graph with ONNX Runtime.

    Args:
        spec: the graph's declaration (from the manifest).
        path: its ``.onnx`` file.
        device: ``cpu`` (CPU execution provider) or ``cuda`` (CUDA execution provider).

    Raises:
        HimapError: if the session cannot be created, the file's inputs/outputs differ from the
            spec, or the dtype (bfloat16) has no ONNX Runtime binding here.
    """

    label = "onnxruntime"

    def __init__(self, spec: GraphSpec, path: Path, *, device: str = "cpu"):
        import onnxruntime as ort

        self.spec = spec
        self.device = torch.device(device)
        if self.device.type == "cuda" and not cuda_provider_available():
            raise HimapError("ONNX Runtime's CUDA execution provider is not available: install onnxruntime-gpu "
                             "instead of onnxruntime, on a machine with an NVIDIA GPU")
        for tensor in (*spec.inputs, *spec.outputs):
            if tensor.dtype not in _NUMPY:
                raise HimapError(f"graph {spec.name!r}: ONNX Runtime cannot bind {tensor.dtype} tensors "
                                 f"({tensor.name}); export with --dtype fp32 or fp16 for this backend")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Each graph has its own session and thread pool; a pool whose threads spin after a run steals
        # cores from the next graph's pool (measured: docs/PERFORMANCE.md, "ONNX Runtime threads").
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # quantized weights (export --quantize): the MatMulNBits accuracy level the export recorded
        for key, value in session_config(spec.attrs.get("quantization")).items():
            options.add_session_config_entry(key, value)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" \
            else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented...)
            raise HimapError(f"ONNX Runtime cannot load graph {spec.name!r} from {str(path)!r}: "
                             f"{str(exc).strip().splitlines()[0]}") from None
        self._check_io()
        self._device_type = self.device.type
        self._device_id = self.device.index or 0

    def _check_io(self) -> None:
        got = [(i.name, _ORT_TYPES.get(i.type, i.type)) for i in self.session.get_inputs()]
        want = [(t.name, t.dtype) for t in self.spec.inputs]
        if sorted(got) != sorted(want):
            raise HimapError(f"graph {self.spec.name!r}: the file's inputs {got} differ from the manifest's {want}")
        got_out = [o.name for o in self.session.get_outputs()]
        if got_out != self.spec.output_names:
            raise HimapError(f"graph {self.spec.name!r}: the file's outputs {got_out} differ from the manifest's "
                             f"{self.spec.output_names}")

    def run(self, feeds: Mapping[str, torch.Tensor],
            outputs: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run with I/O binding: inputs, and the given ``outputs``, bound to the tensors' memory; a
        ``present`` bound to its ``past`` buffer is written in place (the scatter kernels skip their
        input copy when input and output are one buffer)."""
        outputs = outputs or {}
        binding = self.session.io_binding()
        alive = []
        for tensor in self.spec.inputs:
            value = feeds[tensor.name]
            if value.dtype != torch_dtype(tensor.dtype):
                raise HimapError(f"graph {self.spec.name!r}: input {tensor.name} is {value.dtype}, expected {tensor.dtype}")
            value = value.contiguous()
            alive.append(value)
            binding.bind_input(tensor.name, self._device_type, self._device_id, _NUMPY[tensor.dtype],
                               tuple(value.shape), value.data_ptr())
        for tensor in self.spec.outputs:
            target = outputs.get(tensor.name)
            if target is None:
                binding.bind_output(tensor.name, self._device_type, self._device_id)
                continue
            if not target.is_contiguous() or target.dtype != torch_dtype(tensor.dtype):
                raise HimapError(f"graph {self.spec.name!r}: output buffer {tensor.name} must be a contiguous "
                                 f"{tensor.dtype} tensor, got {target.dtype}")
            binding.bind_output(tensor.name, self._device_type, self._device_id, _NUMPY[tensor.dtype],
                                tuple(target.shape), target.data_ptr())
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {tensor.name: outputs[tensor.name] if tensor.name in outputs else torch.from_dlpack(value._ortvalue)
                for tensor, value in zip(self.spec.outputs, values)}

    def close(self) -> None:
        self.session = None
