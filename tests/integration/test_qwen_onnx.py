"""Qwen2.5-VL's exported graphs: ONNX Runtime against the PyTorch reference token for token, fp32
and fp16 validation, the TensorRT static compatibility check, profiles covering real calls.

Plans none / HiMAP / FastV on tiny-qwen2.5-vl; batch 1 and a mixed batch of three image
sizes (three image-token counts: masked image slots, per-row keep counts); 8 new tokens.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import exported, tiny
from himap_trt.cli import app
from himap_trt.runtime import GenerationConfig, reference_pipeline
from himap_trt.runtime.loader import open_pipeline

MODEL = "tiny-qwen2.5-vl"
NEW_TOKENS = 8
# HiMAP's export is validated here (every graph, fp32); FastV's scoring graph is checked end to end
# against the reference (kept indices, tokens). The random control's scoring graph is shared with
# LLaVA's (tests/integration/test_random_plan.py) and not re-exported here, to keep CI short.
PLANS = [("none", {}, False), ("himap", {}, True), ("fastv", dict(k=3, r=0.75), False)]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method,kw,validate", PLANS, ids=[p[0] for p in PLANS])
def test_onnxruntime_equals_reference(tmp_path_factory, method, kw, validate, qwen_requests):
    out, manifest, checks = exported(tmp_path_factory, MODEL, method, validate=validate, **kw)
    if validate:   # every graph, prefill and decode, fp32
        assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
        assert {c.graph for c in checks} == {g.name for g in manifest.graphs}
    images, questions = qwen_requests
    onnx_pipe = open_pipeline(export_dir=out, backend="onnxruntime").pipeline
    ref_pipe = reference_pipeline(tiny(MODEL), manifest.plan)
    for rows in ([1], [0, 1, 2]):
        batch = ref_pipe.prepare([images[r] for r in rows], [questions[r] for r in rows])
        with torch.inference_mode():
            ours = onnx_pipe.generate(batch, GenerationConfig(max_new_tokens=NEW_TOKENS))
            ref = ref_pipe.generate(batch, GenerationConfig(max_new_tokens=NEW_TOKENS))
        assert torch.equal(ours.sequences, ref.sequences)
        assert ours.image_tokens_per_row == ref.image_tokens_per_row
        for mine, theirs in zip(ours.stages, ref.stages):
            assert torch.equal(mine.kept_indices, theirs.kept_indices)
            assert mine.kept_image_positions == theirs.kept_image_positions
    if manifest.plan.stages:
        assert len({tuple(r) for r in ours.image_tokens_per_row}) == 3     # three different per-row counts


def test_fp16_graphs_validate(tmp_path_factory):
    _, manifest, checks = exported(tmp_path_factory, MODEL, "himap", dtype="fp16")
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert {c.graph for c in checks} == {g.name for g in manifest.graphs}


def test_tensorrt_static_compat_passes(tmp_path_factory):
    out, manifest, _ = exported(tmp_path_factory, MODEL, "himap", validate=True)
    result = CliRunner().invoke(app, ["check", "--tensorrt-compat", "--export-dir", str(out), "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and len(report["graphs"]) == len(manifest.graphs)


def test_profiles_cover_every_call(tmp_path_factory, qwen_requests):
    """Every graph call of a mixed batch lies inside a profile of its graph (max_batch 3)."""
    from himap_trt.engines.profiles import graph_profiles
    from himap_trt.export.validate import record_reference
    from himap_trt.runtime import torch_backends
    from himap_trt.runtime.pipeline import Pipeline

    out, manifest, _ = exported(tmp_path_factory, MODEL, "himap", validate=True)
    loaded = tiny(MODEL)
    specs = list(manifest.graphs)
    profiles = {s.name: graph_profiles(s, manifest.plan, max_batch=3, max_seq_len=manifest.max_seq_len) for s in specs}
    ref = reference_pipeline(loaded, manifest.plan)
    with torch.inference_mode():
        recorded = record_reference(lambda backends: Pipeline(
            specs, backends, loaded.processor, manifest.plan, image_token_id=manifest.image_token_id,
            device="cpu", eos_token_ids=ref.eos_token_ids, pad_token_id=ref.pad_token_id,
            architecture="qwen2_5_vl"), torch_backends(loaded.model, specs))
    for name, calls in recorded.items():
        for feeds, _ in calls.values():
            shapes = {k: tuple(v.shape) for k, v in feeds.items()}
            assert any(p.covers(shapes) for p in profiles[name]), (name, shapes)


def test_cli_flops_and_dry_run_for_known_qwen():
    runner = CliRunner()
    result = runner.invoke(app, ["flops", "--model", "qwen2.5-vl-7b", "--image-tokens", "1024", "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    d, m, L = 3584, 18944, 28
    omega = lambda n: 4 * n * d * d + 2 * n * n * d + 2 * n * d * m   # noqa: E731 - Eq. 10
    assert report["image_tokens_baseline"] == L * omega(1024)
    assert report["image_tokens_plan"] == 2 * omega(1024) + 6 * omega(512) + 20 * omega(128)
    result = runner.invoke(app, ["build", "--dry-run", "--model", "qwen2.5-vl-7b", "--max-image-tokens", "1280",
                                 "--max-seq-len", "2048", "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    profiles = json.loads(result.stdout)["profiles"]
    vision = profiles["vision"][0]["shapes"]["pixel_values"]
    assert vision["max"] == [1280 * 4, 1176]
    scoring = profiles["scoring_0"][0]["shapes"]
    assert scoring["image_slots"]["max"] == [1280] and scoring["kept_slots"]["max"] == [640]
    assert scoring["position_ids"]["max"] == [3, 1, 2047]
    result = runner.invoke(app, ["build", "--dry-run", "--model", "qwen2.5-vl-7b"])
    assert result.exit_code != 0 and "--max-seq-len" in result.output


def test_serving_engine_runs_qwen_requests_like_solo_runs(tmp_path_factory, qwen_requests):
    """The continuous-batching engine (what `serve` runs) on a Qwen export: three requests of three
    image sizes submitted at once (one decode batch, per-request counts) answer like each alone."""
    from himap_trt.runtime.engine import Engine, SamplingParams

    out, manifest, _ = exported(tmp_path_factory, MODEL, "himap", validate=True)
    pipe = open_pipeline(export_dir=out, backend="onnxruntime").pipeline
    images, questions = qwen_requests
    solo = []
    for image, question in zip(images, questions):
        with torch.inference_mode():
            result = pipe.generate(pipe.prepare([image], [question]), GenerationConfig(max_new_tokens=5))
        solo.append((result.tokens[0], result.image_tokens_per_row[0]))
    engine = Engine(pipe, max_batch=3).start()
    try:
        handles = [engine.submit(engine.prepare(image, question), SamplingParams(max_tokens=5, temperature=0))
                   for image, question in zip(images, questions)]
        done = [h.result(timeout=300) for h in handles]
    finally:
        engine.stop(timeout=10)
    assert [(list(c.token_ids), c.image_tokens_per_segment) for c in done] == solo
