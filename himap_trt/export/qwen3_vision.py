"""Export of the Qwen3-VL vision graph (:mod:`himap_trt.graphs.qwen3_vision`), DeepStack outputs included.

Traced once with ``torch.onnx.export(dynamo=True)``, the patch axis symbolic, on a two-image call
(:data:`himap_trt.export.qwen_vision.TRACE_GRID`); one graph serves every image size, every number
of images and video frames per call. The export's validation step compares it with the PyTorch
module on the sample request (every output, :mod:`himap_trt.export.validate`), and
``tests/integration/test_qwen3_vl.py`` compares that module with transformers' ``Qwen3VLVisionModel``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from himap_trt.errors import HimapError
from himap_trt.export.onnx_export import DEFAULT_OPSET
from himap_trt.export.qwen_vision import TRACE_GRID, trace_vision
from himap_trt.graphs.qwen3_vision import Qwen3VisionEncoder, qwen3_vision_attrs, qwen3_vision_feeds, qwen3_vision_spec
from himap_trt.graphs.spec import GraphSpec, torch_dtype


def export_qwen3_vision(visual: torch.nn.Module, path: Path, *, dtype: str = "float32",
                        opset: int = DEFAULT_OPSET, name: str = "vision") -> GraphSpec:
    """Export transformers' ``Qwen3VLVisionModel`` (already in ``dtype``) to ``path``.

    Returns:
        The graph's spec (:func:`qwen3_vision_spec`) with ``file`` set.

    Raises:
        HimapError: the tower is not in ``dtype``, the exporter fails or specialises the patch axis,
            or ``onnx.checker`` rejects the file.
    """
    param = next(visual.parameters())
    if param.dtype != torch_dtype(dtype):
        raise HimapError(f"the vision tower is {param.dtype}, the export asks for {dtype}")
    spec = qwen3_vision_spec(visual.config, dtype, name=name)
    module = Qwen3VisionEncoder(visual).eval()
    grid = np.array(TRACE_GRID, dtype=np.int64)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(int(grid.prod(-1).sum()), spec.inputs[0].shape[1], generator=gen).to(param.dtype)
    return trace_vision(module, qwen3_vision_feeds(pixels, grid, qwen3_vision_attrs(visual.config)), spec, path,
                        opset=opset)


def export_vision_graph(model: torch.nn.Module, spec: GraphSpec, path: Path, *, opset: int, vocab_size: int) -> None:
    """Export Qwen3-VL's ``vision`` graph of ``spec`` to ``path`` (the export's vision exporter for
    this family, see :data:`himap_trt.export.VISION_EXPORTERS`; ``vocab_size`` is unused).

    Raises:
        HimapError: if the written graph's inputs/outputs (DeepStack output included) differ from ``spec``.
    """
    written = export_qwen3_vision(model.model.visual, path, dtype=spec.inputs[0].dtype, opset=opset)
    if (written.inputs, written.outputs) != (spec.inputs, spec.outputs):
        raise HimapError(f"the exported vision graph's I/O differ from its spec: {written.outputs} vs {spec.outputs}")
