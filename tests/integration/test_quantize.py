"""``export --quantize``: weight-only int8/int4 and dynamic int8 decoder graphs checked against the
fp32 PyTorch model.

One export per scheme of the smallest model (``tiny``, plan ``none``: one segment of all layers);
the export's own validation compares every segment output with PyTorch within
:data:`himap_trt.export.quantize.TOLERANCES`, and these tests check independently that the stored
codes dequantize to the checkpoint's weights within half a quantization step, that ONNX Runtime runs
them as fused ``MatMulNBits`` kernels (weight-only) or ``DynamicQuantizeMatMul`` /
``MatMulIntegerToFloat`` kernels (``int8-dynamic``, whose result is also checked against a numpy
emulation of the per-call activation quantization), and that TensorRT-RTX parses and builds the
weight-only graphs and ``build`` refuses the dynamic ones.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import exported, tiny
from himap_trt.cli import app
from himap_trt.engines.build import check_buildable
from himap_trt.engines.flavour import installed_flavour
from himap_trt.engines.profiles import graph_profiles
from himap_trt.errors import HimapError
from himap_trt.export.quantize import TOLERANCES, Quantization, check_quantization, fused_op_counts, quantize_model
from himap_trt.manifest import Manifest
from typer.testing import CliRunner

runner = CliRunner()
SCHEMES = ("int8", "int4", "int8-dynamic")
WEIGHT_ONLY = ("int8", "int4")


@pytest.fixture(scope="module", params=SCHEMES)
def quantized(request, tmp_path_factory):
    export_dir, manifest, checks = exported(tmp_path_factory, "tiny", "none", quantize=request.param)
    return request.param, export_dir, manifest, checks


def _codes(tensor: onnx.TensorProto) -> np.ndarray:
    if tensor.data_type == onnx.TensorProto.INT4:   # two's-complement nibbles, low nibble first
        raw = np.frombuffer(tensor.raw_data, np.uint8)
        nibbles = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1)[:int(np.prod(tensor.dims))]
        return np.where(nibbles > 7, nibbles.astype(np.int16) - 16, nibbles).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor).astype(np.int16)


def test_quantized_segments_match_pytorch_within_tolerance(quantized):
    scheme, _, manifest, checks = quantized
    assert manifest.quantize == scheme and manifest.quantization["accuracy_level"] == (0 if scheme == "int8-dynamic" else 4)
    assert manifest.quantization["block_size"] == (16 if scheme == "int4" else None)   # tiny's FFN is 176 = 11 x 16
    segment = [c for c in checks if c.graph.startswith("segment_0")]     # validated layer by layer
    assert {c.graph for c in segment} == {f"segment_0.layers_{i}-{i}" for i in range(manifest.dims.num_layers)}
    assert {c.phase for c in segment} == {"prefill", "decode"} and all(c.ok for c in checks), \
        [c for c in checks if not c.ok]
    atol, rtol = TOLERANCES[scheme]
    hidden = [c for c in segment if c.output == "logits"]
    assert hidden and all(c.max_abs_diff <= atol + rtol * c.max_abs_ref for c in hidden)
    # the weights really are quantized: the logits differ from the float model's by more than fp32 rounding
    assert max(c.max_abs_diff for c in hidden) > 1e-3


def test_codes_dequantize_to_the_checkpoint_weights(quantized):
    """Independent of ONNX Runtime: every linear weight of every layer, rebuilt from the stored codes
    and scales, is within half a quantization step of the PyTorch parameter (int4: a block's clipped
    maximum within one step)."""
    scheme, export_dir, manifest, _ = quantized
    model = onnx.load(str(export_dir / manifest.graph("segment_0").file))
    inits = {t.name: t for t in model.graph.initializer}
    lm = tiny("tiny").model.model.language_model
    seen = 0
    for node in model.graph.node:
        if node.op_type not in ("DequantizeLinear", "MatMulInteger"):
            continue
        codes_name = node.input[0] if node.op_type == "DequantizeLinear" else node.input[1]
        # int8-dynamic: MatMulInteger(x_q, W_q, x_zp) without a weight zero point (symmetric)
        assert node.op_type == "DequantizeLinear" or (scheme == "int8-dynamic" and len(node.input) == 3), node
        name = codes_name.rsplit(".transposed", 1)[0]                    # <checkpoint name>.transposed_DQ_Q*
        weight = dict(lm.named_parameters())[name.removeprefix("model.language_model.")].detach().numpy().T  # [K,N]
        codes = _codes(inits[codes_name]).astype(np.float64)
        scales_name = node.input[1] if node.op_type == "DequantizeLinear" else codes_name.replace("_DQ_Q8", "_DQ_scales")
        scales = numpy_helper.to_array(inits[scales_name]).astype(np.float64)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if scheme == "int8-dynamic":
            assert scales.shape == (weight.shape[1],) and codes.min() >= -127 and inits[codes_name].data_type == onnx.TensorProto.INT8
            step, bound = scales[None, :], 0.5
        elif scheme == "int8":
            assert attrs["axis"] == 1 and scales.shape == (weight.shape[1],) and codes.min() >= -127
            step, bound = scales[None, :], 0.5       # round to nearest, scale = absmax / 127: half a step
        else:
            block = attrs["block_size"]
            assert attrs["axis"] == 0 and block == 16 and scales.shape == (weight.shape[0] // block, weight.shape[1])
            step = np.repeat(scales, block, axis=0)
            assert -8 <= codes.min() and codes.max() <= 7
            # ONNX Runtime's symmetric int4 maps |max| to 8 steps: a block's largest positive weight is
            # clipped to +7, up to one step off; every other weight is within half a step
            bound = 1.0
        error = np.abs(codes * step - weight) / np.abs(step)
        assert error.max() <= bound + 1e-4 and np.mean(error <= 0.5 + 1e-4) > 0.97, (error.max(), np.mean(error <= 0.5))
        seen += 1
    assert seen == 7 * manifest.dims.num_layers     # q, k, v, o, gate, up, down of every layer
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and "proj" in t.name
                   and not t.name.endswith("_DQ_scales") for t in model.graph.initializer)   # no float weight left


def test_onnxruntime_fuses_the_quantized_linear_layers(quantized, tmp_path_factory):
    """In the optimised graph ONNX Runtime runs: every weight-only pair is one MatMulNBits; every
    dynamic chain (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul) is one DynamicQuantizeMatMul
    (a layer that quantizes its input alone: o_proj, down_proj) or MatMulIntegerToFloat behind the
    DynamicQuantizeLinear its siblings share (q/k/v, gate/up), with no float weight MatMul left."""
    scheme, export_dir, manifest, _ = quantized
    spec = manifest.graph("segment_0")
    layers = manifest.dims.num_layers
    ops = fused_op_counts(export_dir / spec.file, spec.attrs["quantization"])
    if scheme in WEIGHT_ONLY:
        assert ops.get("MatMulNBits") == 7 * layers and "DequantizeLinear" not in ops, ops
        return
    assert ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) == 7 * layers, ops
    assert ops.get("DynamicQuantizeMatMul") == 2 * layers and ops.get("DynamicQuantizeLinear") == 2 * layers, ops
    assert "MatMulInteger" not in ops and "MatMulNBits" not in ops and "DequantizeLinear" not in ops, ops
    # what stays float (attention's products, in whatever form the export writes them; the LM head's
    # Gemm): the fp32 export's float MatMuls less the 7 linear layers of each layer
    fp32_dir, fp32_manifest, _ = exported(tmp_path_factory, "tiny", "none")
    float_ops = fused_op_counts(fp32_dir / fp32_manifest.graph("segment_0").file)
    products = ("MatMul", "FusedMatMul", "Gemm")
    assert sum(ops.get(op, 0) for op in products) == sum(float_ops.get(op, 0) for op in products) - 7 * layers, \
        (ops, float_ops)


def test_build_refuses_int8_dynamic_in_one_line(quantized):
    """TensorRT takes no DynamicQuantizeLinear/MatMulInteger: `build` (and export --build) refuse."""
    scheme, export_dir, manifest, _ = quantized
    if scheme != "int8-dynamic":
        pytest.skip("weight-only exports build (test_tensorrt_rtx_builds_quantized_segment)")
    with pytest.raises(HimapError, match="exported with --quantize int8-dynamic .*ONNX Runtime's CPU int8 form"):
        check_buildable(manifest, export_dir)
    result = runner.invoke(app, ["build", "--export-dir", str(export_dir), "--dry-run"])
    _one_line_error(result, "--quantize int8-dynamic", "re-export with --quantize int8 or int4")


def test_tensorrt_rtx_builds_quantized_segment(quantized):
    scheme, export_dir, manifest, _ = quantized
    if scheme not in WEIGHT_ONLY:
        pytest.skip("int8-dynamic is refused (test_build_refuses_int8_dynamic_in_one_line)")
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13)")

    spec = manifest.graph("segment_0")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)            # TensorRT-RTX: strongly typed networks only
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(export_dir / spec.file)), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    layers = [network.get_layer(i).type for i in range(network.num_layers)]
    assert layers.count(trt.LayerType.DEQUANTIZE) == 7 * manifest.dims.num_layers
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM86, 0)
    for profile in graph_profiles(spec, manifest.plan, max_batch=1, max_seq_len=256):
        trt_profile = builder.create_optimization_profile()
        for name, shape in profile.shapes.items():
            trt_profile.set_shape(name, shape.min, shape.opt, shape.max)
        config.add_optimization_profile(trt_profile)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None and engine.nbytes > 0


# ---- bad inputs: one line, exit 1, nothing written --------------------------------------------------
def _one_line_error(result, *fragments):
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("args,fragments", [
    (["--quantize", "fp8"], ["--quantize must be one of none, int8, int4, int8-dynamic", "'fp8'"]),
    (["--quantize", "int4", "--quant-block-size", "32"], ["--quant-block-size 32 does not divide", "176"]),
    (["--quantize", "int4", "--quant-block-size", "48"], ["--quant-block-size must be one of 16, 32"]),
    (["--quantize", "int8", "--quant-block-size", "16"], ["int8 has one scale per output channel"]),
    (["--quantize", "int8-dynamic", "--quant-block-size", "16"], ["int8-dynamic has one scale per output channel"]),
    (["--quantize", "int8-dynamic", "--dtype", "fp16"], ["--quantize int8-dynamic needs --dtype fp32"]),
    (["--quantize", "int8-dynamic", "--build"], ["--quantize int8-dynamic is ONNX Runtime only"]),
    (["--quantize", "int8", "--dtype", "fp16"], ["--quantize int8 needs --dtype fp32"]),
    (["--quant-block-size", "16"], ["--quant-block-size needs --quantize int4"]),
    (["--quantize-lm-head"], ["--quantize-lm-head needs --quantize"]),
])
def test_export_refuses_bad_quantization(tmp_path, args, fragments):
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", "--model", "tiny", "--out", str(out), *args])
    _one_line_error(result, *fragments)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_torch_backend_refuses_quantized_export(quantized, photo_path):
    scheme, export_dir, _, _ = quantized
    result = runner.invoke(app, ["run", str(photo_path), "Hi?", "--export-dir", str(export_dir), "--backend", "torch"])
    _one_line_error(result, f"has {scheme} weights", "--backend torch")


def test_quantized_export_runs_and_manifest_round_trips(quantized, photo_path):
    scheme, export_dir, _, _ = quantized
    result = runner.invoke(app, ["run", str(photo_path), "What is shown?", "--export-dir", str(export_dir),
                                 "--backend", "onnxruntime", "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == scheme
    bad = dict(manifest, quantization={"scheme": "int3"})
    with pytest.raises(HimapError, match="quantization.scheme"):
        Manifest.from_dict(bad)


def test_tensorrt_compat_of_int4_opset_21(tmp_path_factory):
    """int4 graphs are opset 21, outside the static table's 9..20: the real parser's acceptance waives
    that rule (engines/compat.py PARSER_OVERRIDES); without a parser installed the static rule stands."""
    export_dir, manifest, _ = exported(tmp_path_factory, "tiny", "none", quantize="int4")
    result = runner.invoke(app, ["check", "--tensorrt-compat", "--export-dir", str(export_dir), "--json"])
    segment = next(g for g in json.loads(result.stdout)["graphs"] if g["graph"] == manifest.graph("segment_0").file)
    assert segment["opset"] == 21 and [o["rule"] for o in segment["offenses"]] == ["opset"]
    if installed_flavour() is None:
        assert result.exit_code == 1 and "would be rejected" in result.stderr
        return
    report = json.loads(result.stdout)
    assert result.exit_code == 0, result.stderr
    assert report["ok"] and not any(g["errors"] for g in report["parser"]["graphs"])
    assert [o["reason"] for o in report["waived"]] == ["opset 21 is outside TensorRT's parser range 9..20"]


def test_block_size_default_fits_the_model():
    dims = tiny("tiny").dims
    assert check_quantization("int4", None, dims, "float32").block_size == 16
    medium = type(dims)(**{**dims.__dict__, "hidden_size": 512, "intermediate_size": 1408, "num_heads": 8,
                           "head_dim": 64})
    assert check_quantization("int4", None, medium, "float32").block_size == 32
    assert check_quantization("int8", None, medium, "float32").block_size is None
    assert check_quantization("int8-dynamic", None, medium, "float32").accuracy_level == 0
    with pytest.raises(HimapError, match="does not divide"):
        check_quantization("int4", 256, medium, "float32")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_lm_head_gemm_is_quantized_when_asked(scheme):
    """The LM head is a Gemm(x, W, transB=1) whose output is the graph's ``logits``: with lm_head it
    becomes DequantizeLinear -> MatMul (int8-dynamic: DynamicQuantizeLinear -> MatMulInteger -> Cast ->
    Mul) and still matches x @ W^T (numpy) within the quantization error; int8-dynamic also matches a
    numpy emulation of ONNX's DynamicQuantizeLinear (uint8, one scale and zero point per call) and the
    integer product, to float rounding."""
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.2, (48, 64)).astype(np.float32)                        # [V, D]
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["logits"], transB=1, name="head/linear")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 48])],
                              [numpy_helper.from_array(weight, "W")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    with pytest.raises(HimapError, match="quantized 0 linear"):      # without lm_head the head stays a float Gemm
        quantize_model(ir.serde.deserialize_model(ir.serde.serialize_model(model)), Quantization(scheme, 16 if scheme == "int4" else None))
    out = quantize_model(model, Quantization(scheme, 16 if scheme == "int4" else None, lm_head=True))
    ops = ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul"] if scheme == "int8-dynamic" \
        else ["DequantizeLinear", "MatMul"]
    assert [n.op_type for n in out.graph] == ops and out.graph.outputs[0].name == "logits"
    session = ort.InferenceSession(ir.serde.serialize_model(out).SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.normal(0, 1, (3, 64)).astype(np.float32)
    x[1] *= 3.0        # rows of different ranges: the activation scale is one per call (the whole tensor)
    expected = x @ weight.T
    got = session.run(None, {"x": x})[0]
    atol, rtol = TOLERANCES[scheme]
    assert np.abs(got - expected).max() <= atol + rtol * np.abs(expected).max()
    if scheme == "int8-dynamic":
        inits = {name: value.const_value.numpy() for name, value in out.graph.initializers.items()}
        codes, scales = inits["W.transposed_DQ_Q8"].astype(np.int64), inits["W.transposed_DQ_scales"]   # [K,N], [N]
        low, high = min(0.0, float(x.min())), max(0.0, float(x.max()))
        x_scale = np.float32((high - low) / 255)
        x_zp = int(np.clip(np.rint(-low / x_scale), 0, 255))
        x_q = np.clip(np.rint(x / x_scale) + x_zp, 0, 255).astype(np.int64)
        emulated = ((x_q - x_zp) @ codes).astype(np.float32) * (x_scale * scales)
        assert np.allclose(got, emulated, rtol=1e-5, atol=1e-5 * np.abs(expected).max()), np.abs(got - emulated).max()
        # and a different call's range gives a different scale: the quantization is per call
        assert not np.allclose(session.run(None, {"x": x[:1]})[0], got[:1], rtol=0, atol=1e-7)
