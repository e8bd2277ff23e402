"""A backend on ``onnx.reference.ReferenceEvaluator`` (numpy): slow, but it runs every dtype the
graphs use (bfloat16 through ml_dtypes), so graphs ONNX Runtime's CPU kernels do not cover can
still be validated on a machine without a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from himap_trt.graphs.spec import GraphSpec
from himap_trt.runtime.backend import BackendBase, place_outputs


def _gather_elements_op():
    from onnx.reference.op_run import OpRun

    class GatherElements(OpRun):
        """``np.take_along_axis``: the stock implementation uses ``np.choose``, limited to 64 entries
        along the gathered axis (a scoring graph gathers hundreds of tokens)."""

        op_domain = ""

        def _run(self, data, indices, axis=None):
            axis = 0 if axis is None else axis
            indices = np.where(indices < 0, indices + data.shape[axis], indices)
            return (np.take_along_axis(data, indices, axis=axis),)

    return GatherElements


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy view/copy of ``tensor`` (bfloat16 as ``ml_dtypes.bfloat16``)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`to_numpy`."""
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


class ReferenceEvaluatorBackend(BackendBase):
    """Runs one graph with ONNX's reference evaluator, on CPU tensors."""

    label = "onnx.reference"

    def __init__(self, spec: GraphSpec, path: Path):
        from onnx.reference import ReferenceEvaluator

        self.spec = spec
        self.evaluator = ReferenceEvaluator(str(path), new_ops=[_gather_elements_op()])

    def run(self, feeds: Mapping[str, torch.Tensor],
            outputs: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        values = self.evaluator.run(None, {t.name: to_numpy(feeds[t.name]) for t in self.spec.inputs})
        return place_outputs({name: from_numpy(value) for name, value in zip(self.spec.output_names, values)}, outputs)

    def close(self) -> None:
        self.evaluator = None
