"""Bounded-memory export (issue 14): weights streamed from the checkpoint files, segments validated
in chunks of layers, ``export --device``. Small models only; the 7B/13B figures are benchmarks
(docs/PERFORMANCE.md)."""

from __future__ import annotations

import filecmp
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from conftest import exported, tiny

PLAN = dict(k1=2, r1=0.5, k2=8, r2=0.75)


def test_streamed_weights_match_the_loaded_model_in_every_dtype():
    """Every tensor read from the files (converted per tensor) equals the fully loaded model's, and the
    hash computed from the files equals model_hash of the loaded model (so --backend torch and check
    accept streamed exports)."""
    from himap_trt.manifest import model_hash
    from himap_trt.models import load_model
    from himap_trt.models.streaming import load_streamed, streamed_model_hash

    for dtype in (torch.float32, torch.float16):
        full = tiny("tiny") if dtype == torch.float32 else load_model("tiny", dtype=dtype)
        streamed = load_streamed("tiny", dtype=dtype)
        params = dict(full.model.named_parameters())
        layer = [name for name, p in streamed.model.named_parameters() if p.is_meta]
        assert layer and all(name.startswith("model.language_model.layers.") for name in layer)
        for name, param in streamed.model.named_parameters():
            value = streamed.weights.read(name) if param.is_meta else param
            assert value.dtype == dtype and torch.equal(value, params[name]), name
        assert streamed_model_hash(streamed.model, streamed.weights.files, dtype) == model_hash(full.model)


def test_streamed_fp16_export_of_an_fp32_checkpoint_is_byte_identical(tmp_path_factory, tmp_path):
    """The tiny checkpoint is stored in fp32: a streamed --dtype fp16 export converts per tensor and
    writes the same bytes as exporting the fully loaded fp16 model (the session's fixture)."""
    from himap_trt.export import ExportOptions, export_model
    from himap_trt.models.streaming import load_streamed
    from himap_trt.plan import build_plan

    ref_dir, ref_manifest, _ = exported(tmp_path_factory, "tiny-gqa", "himap", dtype="fp16", **PLAN)
    loaded = load_streamed("tiny-gqa", dtype=torch.float16)
    plan = build_plan("himap", num_layers=loaded.dims.num_layers, num_image_tokens=loaded.dims.num_image_tokens, **PLAN)
    manifest, checks = export_model(loaded, plan, ExportOptions(out=tmp_path / "x", dtype="fp16", validate=False))
    assert checks == [] and manifest.model_hash == ref_manifest.model_hash
    for spec in ref_manifest.graphs:
        assert filecmp.cmp(ref_dir / spec.file, tmp_path / "x" / spec.file, shallow=False), spec.file


def test_chunked_validation_matches_unchunked_and_localises_a_bad_layer(tmp_path_factory, tmp_path):
    """Segments validated in 2-layer chunks: the reference run as chunks gives bitwise the segment
    outputs of the unchunked reference, every chunk passes, and a chunk graph with one wrong layer
    weight fails in exactly the chunk holding that layer."""
    from himap_trt.export.chunked import ChunkedSegmentBackend, chunk_specs, validate_in_chunks
    from himap_trt.export.compose import SegmentComposer
    from himap_trt.export.validate import record_reference
    from himap_trt.runtime import Pipeline, generation_token_ids, torch_backends

    out, manifest, unchunked_checks = exported(tmp_path_factory, "tiny", "himap", **PLAN)
    loaded = tiny("tiny")
    specs = list(manifest.graphs)
    chunks = {s.name: parts for s in specs if s.kind == "segment" and (parts := chunk_specs(s, 2))}
    assert [len(chunks[name]) for name in sorted(chunks)] == [3, 2]      # segments [2,8) and [8,12)
    eos, pad = generation_token_ids(loaded.model.generation_config, loaded.processor.tokenizer)

    def factory(backends):
        return Pipeline(specs, backends, loaded.processor, manifest.plan, image_token_id=manifest.image_token_id,
                        device="cpu", eos_token_ids=eos, pad_token_id=pad)

    with torch.inference_mode():
        plain = record_reference(factory, torch_backends(loaded.model, specs))
        backends = torch_backends(loaded.model, specs)
        backends.update({name: ChunkedSegmentBackend(manifest.graph(name), parts, loaded.model)
                         for name, parts in chunks.items()})
        recorded = record_reference(factory, backends)
    for name, parts in chunks.items():   # the last chunk's outputs are the segment's, bitwise
        last = parts[-1]
        for phase in ("prefill", "decode"):
            want = plain[name][phase][1]
            for output in last.output_names:
                assert torch.equal(recorded[last.name][phase][1][output], want[output]), (last.name, phase, output)

    composer = SegmentComposer(loaded.model, "float32", manifest.opset)
    checks = validate_in_chunks(out, specs, chunks, recorded, "float32", composer)
    assert checks and all(c.ok for c in checks)
    assert {c.graph for c in checks} == ({s.name for s in specs} - set(chunks)) | {
        p.name for parts in chunks.values() for p in parts}
    assert all(c.ok for c in unchunked_checks)       # the same verdict as the whole-segment validation
    assert not (out / ".validate-chunks").exists()

    def broken(name, param):         # layer 5's q_proj doubled in the graphs only
        from onnx_ir.tensor_adapters import TorchTensor

        value = param.detach() * (2 if name == "model.language_model.layers.5.self_attn.q_proj.weight" else 1)
        return TorchTensor(value, name=name)

    bad = SegmentComposer(loaded.model, "float32", manifest.opset, initializer=broken)
    bad._models = composer._models      # the same traced pieces (tracing again costs seconds)
    segment = manifest.graph("segment_1")
    checks = validate_in_chunks(tmp_path, [replace(segment)], chunks, recorded, "float32", bad)
    failed = {c.graph for c in checks if not c.ok}
    assert failed == {"segment_1.layers_4-5"}


def test_validate_chunk_layers_default_and_errors():
    from himap_trt.errors import HimapError
    from himap_trt.export.chunked import resolve_chunk_layers
    from himap_trt.models import load_config, model_dims

    seven, thirteen = (model_dims(load_config(name)) for name in ("llava-1.5-7b", "llava-1.5-13b"))
    assert resolve_chunk_layers(None, seven, 2) == 2 and resolve_chunk_layers(None, thirteen, 2) == 1
    assert resolve_chunk_layers(None, tiny("tiny").dims, 4) >= 12          # tiny: whole segments
    assert resolve_chunk_layers(3, seven, 2) == 3
    with pytest.raises(HimapError, match="--validate-chunk-layers"):
        resolve_chunk_layers(-1, seven, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error path without a GPU")
def test_export_device_cuda_without_gpu_is_one_line(tmp_path):
    from himap_trt.cli import app

    result = CliRunner().invoke(app, ["export", "--model", "tiny", "--device", "cuda", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0
    text = result.output.strip()
    assert "--device cuda: CUDA is not available" in text and "Traceback" not in text and len(text.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_run_memory_estimate_refuses_unless_forced(tmp_path_factory, photo_path, monkeypatch):
    """run prints its ONNX Runtime (CPU) memory estimate, refuses in one line naming the export and the
    numbers when it exceeds the available memory, and runs with --force."""
    import himap_trt.runtime.memory as memory
    from himap_trt.cli import app
    from himap_trt.runtime.memory import estimate_run_memory

    out, manifest, _ = exported(tmp_path_factory, "tiny", "himap", **PLAN)
    estimate = estimate_run_memory(out, manifest, batch=1)
    files = sum(p.stat().st_size for spec in manifest.graphs for p in out.glob(f"{spec.file}*"))
    d = manifest.dims
    assert estimate.weights == files
    assert estimate.kv_cache == 2 * d.num_layers * d.num_kv_heads * manifest.max_seq_len * d.head_dim * 4
    runner = CliRunner()
    args = ["run", str(photo_path), "What?", "--export-dir", str(out), "--max-new-tokens", "2", "--backend", "onnxruntime",
            "--device", "cpu", "--no-stream"]
    monkeypatch.setattr(memory, "available_bytes", lambda: estimate.total - 1)
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "--force" in lines[0] and "GiB is available" in lines[0]
    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.stderr
    assert "memory: about" in forced.stderr and "answer" in forced.stdout
