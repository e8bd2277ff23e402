"""``himap-trt check``: backends compared graph by graph and end to end.

Graph by graph, on the inputs a PyTorch run of a sample request fed each graph (prefill and
decode calls): ONNX Runtime vs PyTorch always (ONNX's reference evaluator where ONNX Runtime cannot
run the dtype), TensorRT vs PyTorch where engines, TensorRT and a GPU are available. End to end:
each backend's pipeline generates greedily on the sample request; kept indices of every stage and
the generated tokens are compared with PyTorch's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from himap_trt.errors import HimapError
from himap_trt.export.validate import OutputCheck, compare, record_reference, sample_requests, validation_backend


@dataclass(frozen=True)
class EndToEnd:
    """Agreement of one backend's pipeline with PyTorch's on the sample request."""

    backend: str
    kept_indices_equal: bool
    stages: int
    tokens_equal: int
    tokens_total: int
    tokens_required: bool

    @property
    def ok(self) -> bool:
        """Kept indices equal, and tokens equal where required (fp32)."""
        return self.kept_indices_equal and (not self.tokens_required or self.tokens_equal == self.tokens_total)


@dataclass
class CheckReport:
    """Everything ``check`` compared."""

    dtype: str
    graph_checks: dict[str, list[OutputCheck]] = field(default_factory=dict)   # backend -> checks
    end_to_end: list[EndToEnd] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every graph output within tolerance and every end-to-end comparison passed."""
        return all(c.ok for checks in self.graph_checks.values() for c in checks) and all(e.ok for e in self.end_to_end)


def run_check(export_dir: Path, *, engines_dir: Path | None = None, max_new_tokens: int = 8,
              on_step=None) -> CheckReport:
    """Compare the export's backends (see the module docstring).

    Args:
        export_dir: the export directory.
        engines_dir: TensorRT engines (default: ``engines/`` beside the export).
        max_new_tokens: tokens generated end to end per request.
        on_step: optional ``(description) -> None`` progress callback.

    Raises:
        HimapError: missing export, model not loadable, or weights differing from the export's.
    """
    from himap_trt.engines.manifest import engines_present
    from himap_trt.export.manifest import load_manifest, model_hash
    from himap_trt.models import load_model
    from himap_trt.models.loading import parse_dtype
    from himap_trt.runtime import GenerationConfig, Pipeline, torch_backends
    from himap_trt.runtime.loader import default_engines_dir, open_pipeline

    step = on_step or (lambda text: None)
    manifest = load_manifest(export_dir)
    report = CheckReport(dtype=manifest.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    step(f"loading the PyTorch reference ({manifest.source_model}, {manifest.dtype}, {device})")
    loaded = load_model(manifest.source_model, dtype=parse_dtype(manifest.dtype), device=device)
    if model_hash(loaded.model) != manifest.model_hash:
        raise HimapError(f"the model {manifest.source_model!r} differs from the one exported to {str(export_dir)!r} "
                         "(content hash mismatch); check needs the exported weights")
    specs = list(manifest.graphs)

    def reference_factory(backends):
        return Pipeline(specs, backends, loaded.processor, manifest.plan, image_token_id=manifest.image_token_id,
                        device=device, eos_token_ids=list(manifest.eos_token_ids), pad_token_id=manifest.pad_token_id)

    step("recording the PyTorch reference on a sample request")
    with torch.inference_mode():
        recorded = record_reference(reference_factory, torch_backends(loaded.model, specs))

    backends = ["onnxruntime"]
    engines = Path(engines_dir) if engines_dir else default_engines_dir(export_dir)
    if not engines_present(engines):
        report.skipped.append(f"tensorrt: no engines in {str(engines)!r} (build them with `himap-trt build`)")
    else:
        try:
            from himap_trt.engines.build import gpu_identity, import_tensorrt

            import_tensorrt()
            gpu_identity()
            backends.append("tensorrt")
        except HimapError as exc:
            report.skipped.append(f"tensorrt: {exc}")

    pipelines = {}
    for backend in backends:
        step(f"comparing {backend} with PyTorch, graph by graph")
        opened = open_pipeline(export_dir=export_dir, backend=backend, engines_dir=engines)
        pipelines[backend] = opened.pipeline
        checks = []
        for spec in specs:
            runner = opened.pipeline.backends[spec.name] if backend == "tensorrt" else \
                validation_backend(spec, Path(export_dir) / spec.file)
            label = runner.label
            dev = torch.device(opened.device)
            for phase, (feeds, outputs) in recorded[spec.name].items():
                with torch.inference_mode():
                    got = runner.run({k: v.to(dev) for k, v in feeds.items()})
                checks += compare(spec, phase, outputs, got, manifest.dtype, backend=label)
            if backend != "tensorrt":
                runner.close()
        report.graph_checks[backend] = checks

    step(f"end to end: greedy generation of {max_new_tokens} tokens on every backend")
    images, questions = sample_requests()
    reference = reference_factory(torch_backends(loaded.model, specs))
    batch = reference.prepare(images, questions)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    expected = reference.generate(batch, config)
    for backend, pipeline in pipelines.items():
        got = pipeline.generate(batch, config)
        kept = all(torch.equal(a.kept_indices.cpu(), b.kept_indices.cpu()) for a, b in zip(got.stages, expected.stages))
        equal = int((got.sequences == expected.sequences).sum()) if got.sequences.shape == expected.sequences.shape else 0
        report.end_to_end.append(EndToEnd(backend, kept, len(expected.stages), equal, expected.sequences.numel(),
                                          tokens_required=manifest.dtype == "float32"))
        pipeline.close()
    return report
