"""Everything around TensorRT that can be checked without it: reduced-precision graphs, the static
parser-compatibility check, `check`, and the refusals of build/run."""

import importlib.util
import json
import shutil

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from conftest import exported
from himap_trt.confine import record_files
from himap_trt.cli import app
from himap_trt.engines.compat import check_onnx_file, support_table
from himap_trt.engines.manifest import (EngineEntry, EnginesManifest, ENGINES_FORMAT_VERSION, check_compatible,
                                        read_engines_manifest)
from himap_trt.errors import HimapError
from himap_trt.export.validate import TOLERANCES
from himap_trt.plan import build_plan

runner = CliRunner()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
FP32_PLANS = [("none", {}), ("fastv", dict(k=2, r=0.5)), ("himap", dict(k1=2, r1=0.5, k2=8, r2=0.75)),
              ("himap", dict(k1=3, r1=0.6, k2=6, r2=0.5))]
# fp16: FastV and HiMAP (their segments cover what none's single segment would; CI time)
FP16_PLANS = [("fastv", dict(k=2, r=0.5)), ("himap", dict(k1=2, r1=0.5, k2=8, r2=0.75))]


def _ids(plans):
    return [m + "".join(f"-{k}{v}" for k, v in kw.items()) for m, kw in plans]


# ---- the static TensorRT compatibility check -----------------------------------------------------
@pytest.mark.parametrize("name,method,kw", [
    pytest.param(name, method, kw, id=f"{name}-{plan_id}")
    for name in ("tiny", "tiny-gqa") for (method, kw), plan_id in zip(FP32_PLANS, _ids(FP32_PLANS))
    if not (name == "tiny-gqa" and kw.get("k1") == 3)])   # the exports test_onnx_pipeline makes
def test_compat_passes_on_fp32_exports(tmp_path_factory, name, method, kw):
    out, manifest, _ = exported(tmp_path_factory, name, method, **kw)
    result = runner.invoke(app, ["check", "--tensorrt-compat", "--export-dir", str(out), "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and len(report["graphs"]) == len(manifest.graphs)
    assert all(g["unchecked_types"] == 0 and g["opset"] == 18 for g in report["graphs"])
    assert report["min_tensorrt"] == "10.1"        # ScatterND cache writes: in the 10.1 GA matrix


def test_tensorscatter_export_validates_and_needs_tensorrt_10_15(tmp_path, requests_3):
    """--kv-write tensorscatter: segment graphs at opset 24 write the cache with TensorScatter
    (TensorRT 10.15+'s in-place KV-cache update); ONNX Runtime runs them in place, token for token
    equal to the ScatterND export; the static check names the TensorRT version they need."""
    from conftest import tiny
    from himap_trt.export import ExportOptions, export_model
    from himap_trt.runtime import GenerationConfig, reference_pipeline
    from himap_trt.runtime.loader import open_pipeline

    loaded = tiny("tiny")
    plan = build_plan("fastv", num_layers=12, num_image_tokens=144)
    manifest, checks = export_model(loaded, plan, ExportOptions(out=tmp_path / "ts", kv_write="tensorscatter"))
    assert checks and all(c.ok for c in checks) and manifest.kv_write == "tensorscatter"
    for spec in manifest.graphs:
        model = onnx.load(str(tmp_path / "ts" / spec.file), load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        report = check_onnx_file(tmp_path / "ts" / spec.file)
        assert report.offenses == (), report.offenses
        if spec.kind == "segment":
            assert "TensorScatter" in ops and "ScatterND" not in ops and model.opset_import[0].version == 24
            assert report.min_tensorrt == "10.15"
        else:
            assert report.min_tensorrt == "10.1"
    images, questions = requests_3
    pipe = open_pipeline(export_dir=tmp_path / "ts", backend="onnxruntime").pipeline
    batch = pipe.prepare(images, questions)
    ref = reference_pipeline(loaded, plan)
    assert torch.equal(pipe.generate(batch, GenerationConfig(max_new_tokens=6)).sequences,
                       ref.generate(batch, GenerationConfig(max_new_tokens=6)).sequences)


@pytest.mark.parametrize("method,kw", FP16_PLANS, ids=_ids(FP16_PLANS))
def test_fp16_exports_validate_and_pass_compat(tmp_path_factory, method, kw):
    out, manifest, checks = exported(tmp_path_factory, "tiny-gqa", method, dtype="fp16", **kw)
    assert manifest.dtype == "float16"
    assert checks and all(c.ok for c in checks)
    kept = [c for c in checks if c.output == "kept_indices"]
    assert len(kept) == len(manifest.plan.stages) and all(c.exact and c.max_abs_diff == 0 for c in kept)
    atol, rtol = TOLERANCES["float16"]
    assert all(c.max_abs_diff <= atol + rtol * c.max_abs_ref for c in checks if not c.exact)
    for spec in manifest.graphs:
        report = check_onnx_file(out / spec.file)
        assert report.offenses == () and report.unchecked_types == 0, report.offenses


def test_bf16_export_validates_with_the_reference_evaluator(tmp_path_factory):
    out, manifest, checks = exported(tmp_path_factory, "tiny", "himap", dtype="bf16")
    assert {c.backend for c in checks} == {"onnx.reference"}   # ONNX Runtime cannot bind bfloat16
    assert all(c.ok for c in checks)
    assert [c.max_abs_diff for c in checks if c.output == "kept_indices"] == [0, 0]
    assert all(check_onnx_file(out / spec.file).offenses == () for spec in manifest.graphs)


def test_compat_fails_on_an_unsupported_operator(tmp_path):
    node = helper.make_node("Unique", ["x"], ["y"], name="dedupe")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    path = tmp_path / "unique.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    (offense,) = check_onnx_file(path).offenses
    assert (offense.node, offense.op_type) == ("dedupe", "Unique") and "not supported" in offense.reason
    assert "Unique" in support_table()["unsupported"]


def test_compat_fails_on_int64_cumsum_and_high_opset(tmp_path):
    class RunningCount(torch.nn.Module):
        def forward(self, mask):
            return mask.long().cumsum(-1)    # what the scoring graph must avoid (TensorRT: float CumSum only)

    path = tmp_path / "cumsum.onnx"
    torch.onnx.export(RunningCount().eval(), (torch.ones(2, 5, dtype=torch.bool),), str(path), dynamo=True, opset_version=18)
    offenses = check_onnx_file(path).offenses
    assert [o.op_type for o in offenses] == ["CumSum"] and "INT64" in offenses[0].reason
    model = onnx.load(path)
    model.opset_import[0].version = 23
    onnx.save(model, path)
    assert any("opset 23" in o.reason for o in check_onnx_file(path).offenses)


def test_compat_cli_fails_naming_the_node(tmp_path_factory, tmp_path):
    out, _, _ = exported(tmp_path_factory, "tiny", "fastv", k=2, r=0.5)
    bad = tmp_path / "export"
    shutil.copytree(out, bad)
    model = onnx.load(bad / "scoring_0.onnx")
    model.graph.node.append(helper.make_node("Unique", [model.graph.output[0].name], ["unique_out"], name="extra"))
    onnx.save(model, bad / "scoring_0.onnx")
    manifest = json.loads((bad / "manifest.json").read_text())  # record the edit, or the sha256 check refuses it
    manifest["files"].update(record_files(bad, ["scoring_0.onnx"]))
    (bad / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["check", "--tensorrt-compat", "--export-dir", str(bad)])
    assert result.exit_code == 1
    assert "[E]         extra (Unique)" in result.stdout and "FAILED | scoring_0.onnx" in result.stdout
    assert result.stderr.strip().splitlines() == ["error: 1 node(s) in " + str(bad) + " would be rejected by "
                                                  "TensorRT's ONNX parser"]


# ---- check --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,name", [("fp32", "tiny-gqa"), ("fp16", "tiny-gqa"), ("bf16", "tiny")])
def test_check_compares_backends(tmp_path_factory, dtype, name):
    plan_kw = {} if dtype == "bf16" else dict(k1=2, r1=0.5, k2=8, r2=0.75)   # share the session's exports
    out, _, _ = exported(tmp_path_factory, name, "himap", dtype=dtype, **plan_kw)
    result = runner.invoke(app, ["check", "--export-dir", str(out), "--json", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"]
    checks = report["graphs"]["onnxruntime"]
    # bf16 graphs run in ONNX's reference evaluator: ONNX Runtime's Python API cannot feed bfloat16
    assert {c["backend"] for c in checks} == {"onnx.reference" if dtype == "bf16" else "onnxruntime"}
    assert {c["graph"] for c in checks} == {"vision", "embed", "segment_0", "scoring_0", "segment_1", "scoring_1", "segment_2"}
    (e2e,) = report["end_to_end"]
    assert e2e["stages"] == 2 and e2e["tokens_total"] == 12
    assert e2e["tokens_required"] == (dtype == "fp32") and e2e["kept_required"] == (dtype != "bf16")
    if dtype != "bf16":
        assert e2e["kept_indices_equal"] and e2e["kept_overlap"] == 1.0
    else:   # compounded bf16 rounding may flip near-ties end to end: reported with the overlap
        assert e2e["kept_overlap"] >= 0.9   # measured 0.934 (tiny) and 0.969 (tiny-gqa)
    if not HAS_TENSORRT:
        assert any(s.startswith("tensorrt:") for s in report["skipped"])


# ---- build / run refusals -------------------------------------------------------------------------
@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown where TensorRT is missing")
def test_build_and_tensorrt_run_without_tensorrt(tmp_path_factory, photo_path):
    out, _, _ = exported(tmp_path_factory, "tiny", "fastv", k=2, r=0.5)
    for args in (["build", "--export-dir", str(out)],
                 ["run", str(photo_path), "Hi?", "--export-dir", str(out), "--backend", "tensorrt",
                  "--engines", str(out)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    engines_missing = runner.invoke(app, ["run", str(photo_path), "Hi?", "--export-dir", str(out), "--backend",
                                          "tensorrt", "--engines", str(out / "nothing")])
    assert "holds no manifest.json" in engines_missing.stderr
    result = runner.invoke(app, ["build", "--export-dir", str(out)])
    assert "TensorRT is not installed" in result.stderr and "himap-trt[tensorrt]" in result.stderr


def test_groupqueryattention_export_is_refused_by_build_and_flagged_by_compat(tmp_path_factory, tmp_path):
    """--kv-write gqa is ONNX Runtime only: `build` (also its dry run, with or without TensorRT) refuses
    it in one line, `export --build` refuses the option pair, and the static check names the contrib node."""
    out, manifest, _ = exported(tmp_path_factory, "tiny", "himap", kv_write="gqa", k1=2, r1=0.5, k2=8, r2=0.75)
    for args in (["build", "--export-dir", str(out)], ["build", "--export-dir", str(out), "--dry-run"],
                 ["export", "--model", "tiny", "--out", str(tmp_path / "e"), "--kv-write", "gqa", "--build"]):
        result = runner.invoke(app, args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and "gqa" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "e").exists()
    report = check_onnx_file(out / manifest.graph("segment_0").file)
    assert any(o.op_type == "GroupQueryAttention" and "com.microsoft" in o.reason for o in report.offenses)


def _engines(plan, **changes):
    fields = dict(format_version=ENGINES_FORMAT_VERSION, package_version="x", export_fingerprint="sha256:aa",
                  plan=plan, dtype="float16", tensorrt_version="10.9.0", gpu_name="NVIDIA H200",
                  compute_capability="9.0", max_batch=1, max_seq_len=512, workspace_bytes=0,
                  engines=(EngineEntry("vision", "vision.engine", ()),))
    fields.update(changes)
    return EnginesManifest(**fields)


def test_engines_of_another_export_plan_version_or_gpu_are_refused(tmp_path):
    plan = build_plan("himap", num_layers=12, num_image_tokens=144)
    ok = dict(fingerprint="sha256:aa", plan=plan, tensorrt_version="10.9.0", compute_capability="9.0", where="e")
    check_compatible(_engines(plan), **ok)
    cases = [({"fingerprint": "sha256:bb"}, "another export"),
             ({"plan": build_plan("fastv", num_layers=12, num_image_tokens=144)}, "implement"),
             ({"tensorrt_version": "11.0.0"}, "TensorRT 10.9.0"),
             ({"compute_capability": "8.9"}, "compute capability 9.0")]
    for change, message in cases:
        with pytest.raises(HimapError, match=message):
            check_compatible(_engines(plan), **(ok | change))
    manifest = _engines(plan)
    manifest.save(tmp_path)
    assert read_engines_manifest(tmp_path) == manifest
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["format_version"] = 7
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(HimapError, match="engines manifest format version 7"):
        read_engines_manifest(tmp_path)


def test_dry_run_prints_profiles_for_7b_and_tiny():
    for model, expect in (("llava-1.5-7b", "1x32x1759x128"), ("tiny", "1x4x2047x16")):
        result = runner.invoke(app, ["build", "--dry-run", "--model", model], env={"COLUMNS": "150"})
        assert result.exit_code == 0, result.stderr
        assert "segment_2" in result.stdout and "decode" in result.stdout and expect in result.stdout
    result = runner.invoke(app, ["build", "--dry-run", "--model", "llava-1.5-7b", "--json"])
    data = json.loads(result.stdout)
    assert [p["name"] for p in data["profiles"]["segment_1"]] == ["prefill", "decode"]
