"""The static check (engines/compat.py) against the real ONNX parser (TensorRT-RTX 1.7.1).

The static table is the fast pre-check; it must never accept a graph the real parser rejects.
Corpus: every distinct graph of the exports the real-build test uses (every model family, method,
dtype, TensorRT kv-write), the two non-TensorRT kv-writes (gqa, tensorscatter), and small graphs
made to break one rule each. What the static check rejects but the parser accepts (it is stricter
there) is printed and kept in docs/ARCHITECTURE.md ("TensorRT and TensorRT-RTX").
"""

from __future__ import annotations

import hashlib
import importlib.util

import onnx
import pytest
from onnx import TensorProto, helper

from conftest import exported
from himap_trt.engines.parser import parse_file
from himap_trt.engines.compat import check_onnx_file
from himap_trt.engines.flavour import RTX
from test_tensorrt_rtx_build import VARIANTS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                                reason="needs TensorRT-RTX: module 'tensorrt_rtx' is not installed "
                                       "(`make install` installs it; TRT_RTX=0 skips it)")


def _model(nodes, inputs, outputs, opset=18, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _synthetic(tmp_path):
    """Small graphs, each breaking one rule of the static table (or none: the control)."""
    f = TensorProto.FLOAT
    x = helper.make_tensor_value_info("x", f, [2, 4])
    i64 = helper.make_tensor_value_info("m", TensorProto.INT64, [2, 4])
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [1])
    cases = {
        "control-relu": _model([helper.make_node("Relu", ["x"], ["y"])], [x], [helper.make_tensor_value_info("y", f, [2, 4])]),
        "unique": _model([helper.make_node("Unique", ["x"], ["y"])], [x], [helper.make_tensor_value_info("y", f, [None])]),
        "cumsum-int64": _model([helper.make_node("CumSum", ["m", "axis"], ["y"])], [i64],
                               [helper.make_tensor_value_info("y", TensorProto.INT64, [2, 4])], initializers=[axis]),
        "cumsum-axis-input": _model([helper.make_node("CumSum", ["x", "a"], ["y"])],
                                    [x, helper.make_tensor_value_info("a", TensorProto.INT64, [])],
                                    [helper.make_tensor_value_info("y", f, [2, 4])]),
        "relu-opset-23": _model([helper.make_node("Relu", ["x"], ["y"])], [x],
                                [helper.make_tensor_value_info("y", f, [2, 4])], opset=23),
        "custom-domain": _model([helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")], [x],
                                [helper.make_tensor_value_info("y", f, [2, 4])]),
    }
    cases["custom-domain"].opset_import.append(helper.make_opsetid("com.microsoft", 1))
    paths = {}
    for name, model in cases.items():
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(model, paths[name])
    return paths


def test_static_check_never_accepts_what_the_parser_rejects(tmp_path_factory, tmp_path):
    graphs: dict[str, object] = {}
    seen = set()
    exports = [exported(tmp_path_factory, m, method, dtype=dtype, validate=validate, kv_write=kv, **kw)
               for m, method, dtype, kv, validate, kw in VARIANTS]
    exports.append(exported(tmp_path_factory, "tiny", "fastv", kv_write="tensorscatter", k=2, r=0.5))
    exports.append(exported(tmp_path_factory, "tiny", "himap", kv_write="gqa", k1=2, r1=0.5, k2=8, r2=0.75))
    for out, manifest, _ in exports:
        for spec in manifest.graphs:
            digest = hashlib.sha256((out / spec.file).read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                graphs[f"{out.name}/{spec.file}"] = out / spec.file
    graphs.update(_synthetic(tmp_path))
    static_only, both, disagree = [], [], []
    for label, path in graphs.items():
        static = check_onnx_file(path).offenses
        parser = parse_file(RTX, path)
        if not static and parser:
            disagree.append((label, parser[:1]))
        elif static and not parser:
            static_only.append((label, sorted({o.reason for o in static})[:1]))
        elif static and parser:
            both.append(label)
    print(f"\n{len(graphs)} graphs; rejected by both: {len(both)}; by the static check only (the parser "
          f"accepts): {static_only}")
    assert not disagree, f"the static check accepts graphs TensorRT-RTX's parser rejects: {disagree}"
    # the corpus exercises both verdicts: the tensorscatter and gqa segments and the rule breakers
    assert any(label.startswith("tiny-fastv-fp32-tensorscatter") for label in both)
    assert any("-gqa-" in label for label in both)
    # every family's graphs are in the corpus (VARIANTS holds each; test_tensorrt_rtx_build checks it)
    assert {label.split("-")[1] for label in graphs if label.startswith("tiny-qwen")} == {"qwen2.5", "qwen3"}
    assert "control-relu" not in both + [s[0] for s in static_only]


def test_check_tensorrt_compat_on_a_qwen3_vl_export(tmp_path_factory):
    """`himap-trt check --tensorrt-compat` on the Qwen3-VL export (the session's, test_qwen3_vl.py's):
    every graph of the manifest passes the static table and is parsed by TensorRT-RTX's parser."""
    import json

    from typer.testing import CliRunner

    from himap_trt.cli import app

    out, manifest, _ = exported(tmp_path_factory, "tiny-qwen3-vl", "himap")
    result = CliRunner().invoke(app, ["check", "--export-dir", str(out), "--tensorrt-compat", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    names = [g.file for g in manifest.graphs]
    assert report["ok"] and sorted(g["graph"] for g in report["graphs"]) == sorted(names)
    assert all(not g["offenses"] for g in report["graphs"])
    assert report["parser"]["flavour"] == "rtx" and sorted(g["graph"] for g in report["parser"]["graphs"]) == sorted(names)
    assert all(not g["errors"] for g in report["parser"]["graphs"])
