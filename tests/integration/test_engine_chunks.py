"""A decoder segment split into layer chunks (issue 34: bounded-memory builds) computes what the whole
segment computes: ONNX Runtime runs the chunk graphs of :mod:`himap_trt.engines.chunks` in sequence
through :class:`himap_trt.runtime.backend.ChunkedBackend` (the class the TensorRT backend uses for
chunked engines), on the very feeds the pipeline gave the whole segment during a generation
(prefill and decode steps), and the outputs (hidden states / logits, every present, the scoring
query) equal the whole segment's."""

from __future__ import annotations

import onnx
import pytest
import torch

from conftest import exported
from himap_trt.engines.chunks import BOUNDARY, layer_ranges, layers_per_chunk, segment_chunks
from himap_trt.errors import HimapError
from himap_trt.runtime.backend import ChunkedBackend
from himap_trt.runtime.onnxrt import OnnxRuntimeBackend


def test_layer_ranges_are_balanced_and_cover_the_segment():
    assert layer_ranges((8, 32), 7) == [(8, 14), (14, 20), (20, 26), (26, 32)]
    assert layer_ranges((8, 32), 6) == [(8, 14), (14, 20), (20, 26), (26, 32)]
    assert layer_ranges((2, 8), 0) == [(2, 8)] and layer_ranges((2, 8), 6) == [(2, 8)]
    assert layer_ranges((0, 5), 2) == [(0, 2), (2, 4), (4, 5)]
    # 7B fp16 layers are ~404 MB: a 2.5 GB budget takes 6 of them; a segment that fits is not chunked
    assert layers_per_chunk(24 * 404_000_000, 24, 2_500_000_000) == 6
    assert layers_per_chunk(6 * 404_000_000, 6, 2_500_000_000) == 0


def test_chunked_segments_equal_whole_segments_in_onnx_runtime(tmp_path_factory, tmp_path, requests_3):
    from himap_trt.runtime import GenerationConfig
    from himap_trt.runtime.loader import open_pipeline

    out, manifest, _ = exported(tmp_path_factory, "tiny", "himap", k1=2, r1=0.5, k2=8, r2=0.75)
    opened = open_pipeline(export_dir=out, backend="onnxruntime")
    pipe = opened.pipeline
    calls: dict[str, list] = {}
    for spec in manifest.graphs:
        if spec.kind != "segment":
            continue
        backend = pipe.backends[spec.name]

        def recording(feeds, outputs=None, run=backend.run, name=spec.name):
            calls.setdefault(name, []).append({k: v.clone() for k, v in feeds.items()})
            return run(feeds, outputs)
        backend.run = recording
    images, questions = requests_3
    pipe.generate(pipe.prepare(images[:2], questions[:2]), GenerationConfig(max_new_tokens=2))
    checked = 0
    for spec in manifest.graphs:
        if spec.kind != "segment" or spec.layers[1] - spec.layers[0] <= 2:
            continue
        whole = OnnxRuntimeBackend(spec, out / spec.file)
        parts = []
        for i, (data, part) in enumerate(segment_chunks(out / spec.file, spec, 2)):
            path = tmp_path / f"{part.name}.onnx"
            path.write_bytes(data)
            onnx.checker.check_model(str(path))
            parts.append(OnnxRuntimeBackend(part, path))
        assert len(parts) == len(layer_ranges(spec.layers, 2)) >= 2
        assert [p.spec.layers for p in parts] == layer_ranges(spec.layers, 2)
        assert BOUNDARY.format(parts[0].spec.layers[1] - 1) in parts[1].spec.input_names
        chunked = ChunkedBackend(spec, parts)
        for feeds in calls[spec.name][:2]:          # the prefill and the first decode step
            expected = whole.run({k: v.clone() for k, v in feeds.items()})
            got = chunked.run({k: v.clone() for k, v in feeds.items()})
            assert list(got) == spec.output_names
            for name in spec.output_names:
                torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=f"{spec.name} {name}")
            checked += 1
    assert checked >= 4


def test_a_graph_without_layer_names_is_refused(tmp_path_factory):
    out, manifest, _ = exported(tmp_path_factory, "tiny", "himap", k1=2, r1=0.5, k2=8, r2=0.75)
    with pytest.raises(HimapError, match="only segments"):
        segment_chunks(out / manifest.graph("embed").file, manifest.graph("embed"), 2)


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt_rtx") is None,
                    reason="needs TensorRT-RTX: module 'tensorrt_rtx' is not installed")
def test_build_in_layer_chunks_with_tensorrt_rtx(tmp_path_factory, tmp_path):
    """`build --engine-weight-limit` small: every multi-layer segment becomes one engine per chunk;
    the manifest lists the parts (specs, profiles, files recorded and verified), each part's real
    parsed network declares the part's inputs and outputs, and a changed part file is refused."""
    import json

    from typer.testing import CliRunner

    from himap_trt.cli import app
    from himap_trt.engines.flavour import RTX, rtx_header_capabilities
    from himap_trt.engines.manifest import read_engines_manifest, verify_engine_files
    from himap_trt.engines.parser import parse_network

    out, manifest, _ = exported(tmp_path_factory, "tiny", "none")     # vision, embed, one 12-layer segment
    engines = tmp_path / "engines"
    result = CliRunner().invoke(app, ["build", "--export-dir", str(out), "--engines", str(engines), "--tensorrt", "rtx",
                                      "--compute-capability", "8.6", "--max-seq-len", "256",
                                      "--engine-weight-limit", "1300K"])
    assert result.exit_code == 0, result.output
    built = read_engines_manifest(engines)
    trt = RTX.module()
    chunked = 0
    for spec in manifest.graphs:
        entry = built.entry(spec.name)
        if spec.kind != "segment" or not entry.parts:
            assert not entry.parts
            continue
        chunked += 1
        assert [p.spec.layers for p in entry.parts] == layer_ranges(spec.layers, entry.parts[0].spec.layers[1]
                                                                     - entry.parts[0].spec.layers[0])
        assert entry.engine_bytes == sum((engines / p.file).stat().st_size for p in entry.parts)
        for part in entry.parts:
            assert rtx_header_capabilities((engines / part.file).read_bytes()) == ("8.6",)
            assert [set(p.shapes) for p in part.profiles] == [set(part.spec.input_names)]
            data = next(d for d, p in segment_chunks(out / spec.file, spec, part.spec.layers[1] - part.spec.layers[0])
                        if p.name == part.spec.name)
            logger = trt.Logger(trt.Logger.ERROR)
            network, _parser = parse_network(trt, trt.Builder(logger), logger, out / spec.file, data)
            assert sorted(network.get_input(i).name for i in range(network.num_inputs)) == sorted(part.spec.input_names)
            assert sorted(network.get_output(i).name for i in range(network.num_outputs)) == \
                sorted(part.spec.output_names)
    assert chunked == 1 and len(built.entry("segment_0").parts) >= 2
    assert "segment_0.part*.engine" in result.output and "layer chunks" in result.output
    text = json.loads((engines / "manifest.json").read_text())
    part_file = next(p["file"] for e in text["engines"] for p in e.get("parts", []))
    assert part_file in text["files"]
    with open(engines / part_file, "r+b") as handle:      # one byte changed in a part: refused, naming it
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(HimapError, match=part_file.replace(".", r"\.")):
        verify_engine_files(engines, built)
