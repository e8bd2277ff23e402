"""Export and validation of the Qwen2.5-VL vision graph (:mod:`himap_trt.graphs.qwen_vision`).

One graph, traced once with ``torch.onnx.export(dynamo=True)`` with the patch axis symbolic
(``Dim.AUTO``, renamed to the spec's ``num_patches`` / ``num_image_tokens``), serves every image
size and every number of images per call. Validation runs it in ONNX Runtime (or ONNX's reference
evaluator where ONNX Runtime's CPU kernels lack the dtype) on several grids and a two-image call
and compares with transformers' own ``Qwen2_5_VisionTransformerPretrainedModel`` (``pooler_output``)
with the export's tolerances (:data:`himap_trt.export.validate.TOLERANCES`).

Usage::

    spec = export_qwen_vision(model.model.visual, out / "vision.onnx", dtype="float32")
    checks = validate_qwen_vision(model.model.visual, spec, out / "vision.onnx")
    raise_on_failures(checks)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from himap_trt.errors import HimapError
from himap_trt.export.onnx_export import DEFAULT_OPSET, _quiet_exporter, save_model
from himap_trt.export.validate import OutputCheck, compare, validation_backend
from himap_trt.graphs.qwen_vision import (  # noqa: F401  (vision_feeds: re-exported)
    QwenVisionEncoder,
    qwen_vision_spec,
    vision_feeds,
)
from himap_trt.graphs.spec import GraphSpec, torch_dtype

#: One (t, h, w) grid per image of the tracing call: two images and a three-temporal-patch video,
#: 120 patches, 30 image tokens, 5 frames of at most 48 patches, 9 windows of the tiny config (sizes
#: that coincide with no other axis, so none is specialised or unified).
TRACE_GRID = ((1, 4, 6), (1, 6, 8), (3, 4, 4))


def export_qwen_vision(visual: torch.nn.Module, path: Path, *, dtype: str = "float32",
                       opset: int = DEFAULT_OPSET, name: str = "vision") -> GraphSpec:
    """Export transformers' Qwen2.5-VL vision tower (already in ``dtype``) to ``path``.

    Args:
        visual: ``Qwen2_5_VisionTransformerPretrainedModel`` (``model.model.visual``).
        path: the ``.onnx`` file to write (weights external above 256 MiB).
        dtype: the graph's floating dtype (``float32``, ``float16``, ``bfloat16``); must be the
            tower's parameter dtype.
        opset: ONNX opset (18-20).
        name: the graph's name in its spec.

    Returns:
        The graph's :class:`GraphSpec` (:func:`qwen_vision_spec`) with ``file`` set to the file's name.

    Raises:
        HimapError: if the tower is not in ``dtype``, the exporter fails, specialises the patch
            axis, or ``onnx.checker`` rejects the file.
    """
    param = next(visual.parameters())
    if param.dtype != torch_dtype(dtype):
        raise HimapError(f"the vision tower is {param.dtype}, the export asks for {dtype}")
    config = visual.config
    spec = qwen_vision_spec(config, dtype, name=name)
    module = QwenVisionEncoder(visual).eval()
    grid = np.array(TRACE_GRID, dtype=np.int64)
    patches = int(grid.prod(-1).sum())
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(patches, spec.inputs[0].shape[1], generator=gen).to(param.dtype)
    return trace_vision(module, vision_feeds(pixels, grid, config), spec, path, opset=opset)


def trace_vision(module: torch.nn.Module, feeds: dict, spec: GraphSpec, path: Path, *, opset: int) -> GraphSpec:
    """Trace a Qwen-family vision encoder on ``feeds`` (its inputs by name: ``pixel_values``
    [patches, C*T*P*P] and the host-computed position tables and attention blocks, dynamic in the axes
    the spec names) and save
    it to ``path``; shared by Qwen2.5-VL's and Qwen3-VL's exporters.

    Returns:
        ``spec`` with ``file`` set to the file's name.

    Raises:
        HimapError: the exporter fails (naming the graph), or :func:`save_model` rejects the result.
    """
    args = tuple(feeds[n] for n in spec.input_names)
    dynamic = tuple({axis: torch.export.Dim.AUTO for axis, dim in enumerate(t.shape) if isinstance(dim, str)}
                    for t in spec.inputs)
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                        input_names=spec.input_names, output_names=spec.output_names,
                                        dynamic_shapes=dynamic, optimize=True, verbose=False)
    except Exception as exc:  # the exporter raises many types; say which graph failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise HimapError(f"exporting graph {spec.name!r} failed: {type(exc).__name__}: {first}") from exc
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    save_model(program.model, spec, Path(path), weight_bytes)
    return replace(spec, file=Path(path).name)


def export_vision_graph(model: torch.nn.Module, spec: GraphSpec, path: Path, *, opset: int, vocab_size: int) -> None:
    """Export Qwen2.5-VL's ``vision`` graph of ``spec`` to ``path`` (the export's vision exporter for
    this family, see :data:`himap_trt.export.VISION_EXPORTERS`; ``vocab_size`` is unused).

    Raises:
        HimapError: if the written graph's inputs/outputs differ from ``spec``.
    """
    written = export_qwen_vision(model.model.visual, path, dtype=spec.inputs[0].dtype, opset=opset)
    if (written.inputs, written.outputs) != (spec.inputs, spec.outputs):
        raise HimapError(f"the exported vision graph's I/O differ from its spec: {written.inputs} vs {spec.inputs}")


def validation_grids(vision_config) -> list[np.ndarray]:
    """The grids :func:`validate_qwen_vision` checks by default, from the config's window:
    a small image (4x6 patches), a square one two merged tokens wider than a window (so it splits
    into full and partial windows: 8x8 for the tiny config, 12x12 for Qwen2.5-VL's 112-pixel
    windows), both in one call, and a three-temporal-patch video of the small frames (6 frames that
    fill no whole window of the 7B config)."""
    merge = int(vision_config.spatial_merge_size)
    window = int(vision_config.window_size) // int(vision_config.patch_size)   # patches per window side
    small, large = [1, 2 * merge, 3 * merge], [1, window + 2 * merge, window + 2 * merge]
    return [np.array([small]), np.array([large]), np.array([small, large]), np.array([[3, 2 * merge, 3 * merge]])]


def reference_embeds(visual: torch.nn.Module, pixel_values: torch.Tensor, image_grid_thw) -> torch.Tensor:
    """transformers' own result: [num_image_tokens, out_hidden] (``pooler_output``)."""
    grid = torch.as_tensor(np.asarray(image_grid_thw), dtype=torch.int64)
    with torch.no_grad():
        return visual(pixel_values, grid_thw=grid).pooler_output


def validate_qwen_vision(visual: torch.nn.Module, spec: GraphSpec, path: Path,
                         cases: list[tuple[torch.Tensor, np.ndarray]] | None = None, *,
                         open_backend=validation_backend, seed: int = 0) -> list[OutputCheck]:
    """Run the exported graph on each case and compare with transformers' vision tower.

    Args:
        visual: the tower the graph was exported from (the reference, in the graph's dtype).
        spec: the graph's spec (from :func:`export_qwen_vision`).
        path: the graph's file.
        cases: ``(pixel_values [num_patches, patch_dim], image_grid_thw [num_images, 3])`` per call;
            default: N(0, 1) patches for each of :func:`validation_grids`.
        open_backend: ``(spec, path) -> Backend`` for the backend under test.
        seed: seeds the default cases' patches.

    Returns:
        One :class:`OutputCheck` per case (``phase`` names the grid, e.g. ``grid 1x4x6+1x8x8``);
        pass them to :func:`himap_trt.export.validate.raise_on_failures`.
    """
    dtype = spec.inputs[0].dtype
    if cases is None:
        gen = torch.Generator().manual_seed(seed)
        cases = [(torch.randn(int(g.prod(-1).sum()), spec.inputs[0].shape[1], generator=gen), g)
                 for g in validation_grids(visual.config)]
    backend = open_backend(spec, Path(path))
    label = getattr(backend, "label", type(backend).__name__)
    checks: list[OutputCheck] = []
    try:
        for pixel_values, grid in cases:
            pixel_values = pixel_values.to(torch_dtype(dtype))
            expected = {spec.output_names[0]: reference_embeds(visual, pixel_values, grid)}
            with torch.inference_mode():
                got = backend.run(vision_feeds(pixel_values, grid, visual.config))
            phase = "grid " + "+".join("x".join(str(int(v)) for v in row) for row in np.asarray(grid))
            checks += compare(spec, phase, expected, got, dtype, backend=label)
    finally:
        backend.close()
    return checks
