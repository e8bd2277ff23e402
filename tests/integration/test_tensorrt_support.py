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
    from himap_trt.engines.flavour import installed_flavour

    if installed_flavour() is None:                # TRT_RTX=0 and no TensorRT: the static table only
        assert report["parser"] is None
    else:                                          # then the real parser, on every graph
        assert [g["graph"] for g in report["parser"]["graphs"]] == [g.file for g in manifest.graphs]
        assert all(g["errors"] == [] for g in report["parser"]["graphs"])


def test_tensorscatter_export_validates_and_needs_tensorrt_10_15(tmp_path_factory, requests_3):
    """--kv-write tensorscatter: segment graphs at opset 24 write the cache with TensorScatter;
    ONNX Runtime runs them in place, token for token equal to the ScatterND export; the static check
    names the TensorRT version they need and flags the dynamic cache length TensorRT's parser rejects
    (tests/integration/test_tensorrt_rtx_build.py shows the real parser's rejection)."""
    from conftest import tiny
    from himap_trt.runtime import GenerationConfig, reference_pipeline
    from himap_trt.runtime.loader import open_pipeline

    loaded = tiny("tiny")
    ts, manifest, checks = exported(tmp_path_factory, "tiny", "fastv", kv_write="tensorscatter", k=2, r=0.5)
    plan = manifest.plan
    assert checks and all(c.ok for c in checks) and manifest.kv_write == "tensorscatter"
    for spec in manifest.graphs:
        model = onnx.load(str(ts / spec.file), load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        report = check_onnx_file(ts / spec.file)
        if spec.kind == "segment":
            assert "TensorScatter" in ops and "ScatterND" not in ops and model.opset_import[0].version == 24
            assert report.min_tensorrt == "10.15"
            scatters = sum(n.op_type == "TensorScatter" for n in model.graph.node)
            assert len(report.offenses) == scatters and all(
                o.op_type == "TensorScatter" and "static length on axis 2" in o.reason for o in report.offenses)
        else:
            assert report.offenses == (), report.offenses
            assert report.min_tensorrt == "10.1"
    # not a TensorRT kv-write: build (also its dry run) refuses it in one line, with the parser's reason
    for args in (["build", "--export-dir", str(ts)], ["build", "--export-dir", str(ts), "--dry-run"]):
        _one_line(runner.invoke(app, args), "--kv-write tensorscatter", "static sequence length dimension")
    images, questions = requests_3
    pipe = open_pipeline(export_dir=ts, backend="onnxruntime").pipeline
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
    assert any(s.startswith("tensorrt: no engines") for s in report["skipped"])   # none beside the export


# ---- build / run refusals -------------------------------------------------------------------------
def _one_line(result, *fragments):
    """One error line on stderr (besides the build's progress display, whose lines start with a spinner)."""
    import re

    lines = [line for line in result.stderr.strip().splitlines()
             if not re.match(r"^\S (build|building \S+\.engine|engines complete)\b", line)]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def without(monkeypatch):
    """Hide flavours: ``without("tensorrt")`` makes that module look uninstalled to himap-trt."""
    from himap_trt.engines import flavour

    hidden = set()
    real = flavour._find_spec
    monkeypatch.setattr(flavour, "_find_spec", lambda name: None if name in hidden else real(name))

    def hide(*names):
        hidden.update(names)
    return hide


def test_build_refuses_bad_flavour_capability_and_precision_flags(tmp_path_factory, tmp_path, without):
    """Each new `build` flag's bad values: one line, exit 1, no engines directory written."""
    out, _, _ = exported(tmp_path_factory, "tiny", "fastv", k=2, r=0.5)
    engines = tmp_path / "engines"
    base = ["build", "--export-dir", str(out), "--engines", str(engines)]
    _one_line(runner.invoke(app, [*base, "--tensorrt", "tensorrt-llm"]), "--tensorrt must be one of auto, tensorrt, rtx")
    _one_line(runner.invoke(app, [*base, "--fp16"]), "--fp16", "export --dtype")
    _one_line(runner.invoke(app, [*base, "--int8"]), "--int8", "no FP16/INT8 builder flags")
    without("tensorrt")
    _one_line(runner.invoke(app, [*base, "--tensorrt", "tensorrt"]), "TensorRT is not installed",
              "himap-trt[tensorrt]")
    if importlib.util.find_spec("tensorrt_rtx") is not None:    # make install installs it
        _one_line(runner.invoke(app, [*base, "--compute-capability", "9.0"]), "'9.0' is not a compute capability",
                  "TensorRT-RTX 1.7", "8.6")
        _one_line(runner.invoke(app, [*base, "--tensorrt", "rtx", "--compute-capability", "8.6,sm89"]), "'sm89'")
        _one_line(runner.invoke(app, [*base, "--compute-capability", "8.6,8.6"]), "names a capability twice")
        if not torch.cuda.is_available():
            _one_line(runner.invoke(app, [*base, "--compute-capability", "current"]), "no CUDA GPU")
            _one_line(runner.invoke(app, [*base, "--compute-capability", "8.6", "--timing-cache", str(tmp_path / "t")]),
                      "--timing-cache", "none is visible")
    without("tensorrt_rtx")
    _one_line(runner.invoke(app, [*base, "--tensorrt", "rtx"]), "TensorRT-RTX is not installed",
              "himap-trt[tensorrt-rtx]")
    _one_line(runner.invoke(app, base), "--tensorrt auto: neither TensorRT", "tensorrt_rtx")
    assert not engines.exists()


def test_capabilities_for_tensorrt_and_the_rtx_default(without):
    from himap_trt.engines.flavour import RTX, TENSORRT, has_fp32_gemms, parse_capabilities

    assert parse_capabilities(None, TENSORRT) == ("current",)
    with pytest.raises(HimapError, match="builds for the GPU it runs on"):
        parse_capabilities("8.6", TENSORRT)
    if importlib.util.find_spec("tensorrt_rtx") is not None:
        every = RTX.capabilities()
        assert every == ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")     # the enum of 1.7.1
        assert parse_capabilities(None, RTX, fp32_gemms=False) == every
        assert parse_capabilities(None, RTX) == every[1:]  # no fp32 GEMMs for Turing
        none, himap = build_plan("none", num_layers=12, num_image_tokens=144), build_plan("himap", num_layers=12,
                                                                                           num_image_tokens=144)
        assert not has_fp32_gemms("float16", none)
        assert has_fp32_gemms("float16", himap) and has_fp32_gemms("float32", none)   # scoring graphs: fp32
        assert parse_capabilities(" 12.0,8.6", RTX) == ("12.0", "8.6")


def test_failed_build_leaves_nothing_half_written(tmp_path_factory, tmp_path):
    """A graph the real parser rejects, after others were built: one line naming the graph and the
    parser's error; the old engines directory untouched, no partial directory left."""
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("needs TensorRT-RTX: module 'tensorrt_rtx' is not installed (`make install` installs it)")
    out, _, _ = exported(tmp_path_factory, "tiny", "fastv", k=2, r=0.5)
    bad = tmp_path / "export"
    shutil.copytree(out, bad)
    model = onnx.load(bad / "scoring_0.onnx")
    # kept_indices + (min(Unique(kept_indices)) - itself): the same I/O as the manifest records (the
    # load checks it), and a node the parser rejects on the output's path
    name = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{name}_pre" if o == name else o for o in node.output]
        node.input[:] = [f"{name}_pre" if i == name else i for i in node.input]
    model.graph.node.extend([
        helper.make_node("Unique", [f"{name}_pre"], ["unique_out"], name="extra"),
        helper.make_node("ReduceMin", ["unique_out"], ["unique_min"], keepdims=0),
        helper.make_node("Sub", ["unique_min", "unique_min"], ["zero"]),
        helper.make_node("Add", [f"{name}_pre", "zero"], [name])])
    onnx.checker.check_model(model)
    onnx.save(model, bad / "scoring_0.onnx")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"].update(record_files(bad, ["scoring_0.onnx"]))
    (bad / "manifest.json").write_text(json.dumps(manifest))
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "manifest.json").write_text(json.dumps({"format_version": 3, "engines": [], "export_fingerprint": "x"}))
    before = sorted(p.name for p in tmp_path.iterdir())
    line = _one_line(runner.invoke(app, ["build", "--export-dir", str(bad), "--engines", str(engines), "--tensorrt",
                                         "rtx", "--compute-capability", "8.6", "--max-batch", "1", "--max-seq-len",
                                         "160"]),
                     "graph 'scoring_0'", "ONNX parser rejects scoring_0.onnx")
    assert "extra (Unique): UNSUPPORTED_NODE in checkUnique" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert sorted(p.name for p in engines.iterdir()) == ["manifest.json"]


def test_run_refuses_engines_of_a_missing_flavour_or_without_a_gpu(tmp_path_factory, tmp_path, photo_path, without):
    """run/serve --backend tensorrt read the engines' flavour from their manifest: engines built with
    a flavour that is not installed, or (here) on a machine without a GPU, are refused in one line."""
    from himap_trt.engines.manifest import export_fingerprint
    from himap_trt.arch import get_architecture
    from himap_trt.manifest import load_manifest

    out, _, _ = exported(tmp_path_factory, "tiny", "fastv", k=2, r=0.5)
    manifest = load_manifest(out, families=get_architecture)
    engines = tmp_path / "engines"
    engines.mkdir()
    entries = []
    for spec in manifest.graphs:
        (engines / f"{spec.name}.engine").write_bytes(b"engine bytes of " + spec.name.encode())
        entries.append(EngineEntry(spec.name, f"{spec.name}.engine", ()))
    for flavour, version, message in (("tensorrt", "10.9.0", "built with TensorRT 10.9.0, which is not installed"),
                                      ("rtx", "1.7.1.116", "no CUDA GPU")):
        _engines(manifest.plan, export_fingerprint=export_fingerprint(out), tensorrt_flavour=flavour,
                 tensorrt_version=version, engines=tuple(entries),
                 files=record_files(engines, [e.file for e in entries])).save(engines)
        without("tensorrt")
        if flavour == "rtx" and (torch.cuda.is_available() or importlib.util.find_spec("tensorrt_rtx") is None):
            continue
        _one_line(runner.invoke(app, ["run", str(photo_path), "Hi?", "--export-dir", str(out), "--backend",
                                      "tensorrt", "--engines", str(engines)]), message)
    data = json.loads((engines / "manifest.json").read_text())
    data["tensorrt_flavour"] = "tensorrt-llm"
    (engines / "manifest.json").write_text(json.dumps(data))
    _one_line(runner.invoke(app, ["run", str(photo_path), "Hi?", "--export-dir", str(out), "--backend", "tensorrt",
                                  "--engines", str(engines)]), "field 'tensorrt_flavour' must be one of tensorrt, rtx")


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
                  plan=plan, dtype="float16", tensorrt_flavour="tensorrt", tensorrt_version="10.9.0",
                  gpu_name="NVIDIA H200", compute_capabilities=("9.0",), kv_write="scatternd", max_batch=1,
                  max_seq_len=512, workspace_bytes=0,
                  engines=(EngineEntry("vision", "vision.engine", ()),))
    fields.update(changes)
    return EnginesManifest(**fields)


def test_engines_of_another_export_plan_version_or_gpu_are_refused(tmp_path):
    plan = build_plan("himap", num_layers=12, num_image_tokens=144)
    ok = dict(fingerprint="sha256:aa", plan=plan, flavour="tensorrt", tensorrt_version="10.9.0",
              compute_capability="9.0", where="e")
    check_compatible(_engines(plan), **ok)
    cases = [({"fingerprint": "sha256:bb"}, "another export"),
             ({"plan": build_plan("fastv", num_layers=12, num_image_tokens=144)}, "implement"),
             ({"flavour": "rtx"}, "built with TensorRT, this run uses TensorRT-RTX"),
             ({"tensorrt_version": "11.0.0"}, "TensorRT 10.9.0"),
             ({"compute_capability": "8.9"}, r"compute capability 9.0 \(NVIDIA H200\), this GPU is compute capability 8.9")]
    for change, message in cases:
        with pytest.raises(HimapError, match=message):
            check_compatible(_engines(plan), **(ok | change))
    # TensorRT-RTX, ahead of time for two architectures: either GPU runs them, a Hopper does not
    rtx = _engines(plan, tensorrt_flavour="rtx", tensorrt_version="1.7.1.116", gpu_name=None,
                   compute_capabilities=("8.6", "12.0"))
    rtx_ok = ok | dict(flavour="rtx", tensorrt_version="1.7.1.116")
    for capability in ("8.6", "12.0"):
        check_compatible(rtx, **(rtx_ok | {"compute_capability": capability}))
    with pytest.raises(HimapError, match=r"compute capability 8.6, 12.0 \(ahead of time\), this GPU is compute "
                                         r"capability 9.0; rebuild with `himap-trt build --compute-capability current`"):
        check_compatible(rtx, **rtx_ok)
    manifest = _engines(plan)
    manifest.save(tmp_path)
    assert read_engines_manifest(tmp_path) == manifest
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["compute_capabilities"] == ["9.0"] and data["tensorrt_flavour"] == "tensorrt"
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
