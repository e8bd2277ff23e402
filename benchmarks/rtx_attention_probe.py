"""Which attention forms TensorRT-RTX's real ONNX parser and builder accept (issue 20's experiment
on the prefix-reading decode path; docs/ARCHITECTURE.md, "TensorRT and TensorRT-RTX").

Four one-layer graphs (fp32, 4 heads of 16, dynamic batch), each parsed and built for SM86 on the
CPU: ONNX ``Attention`` (opset 23) with ``past_key``/``past_value`` and present outputs; opset-24
``Attention`` with ``nonpad_kv_seqlen`` over a cache of M positions (1 query token: decode);
the same without it; and ``TensorScatter`` into a static cache (M = 64) followed by that Attention
(an in-place write then an attention over each row's occupied prefix). Prints, per graph, parsed or
the parser's error, the network's layer types and the engine size.

Run: ``python benchmarks/rtx_attention_probe.py [WORK_DIR]`` (needs tensorrt_rtx; ~10 s).
Building is all it shows: whether ``nonpad_kv_seqlen`` masks correctly needs a GPU run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto, helper

HEADS, HEAD_DIM, CACHE = 4, 16, 64


def probe(model: onnx.ModelProto, path: Path) -> str:
    import tensorrt_rtx as trt

    onnx.save(model, path)
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        return "REJECTED: " + "; ".join(" ".join(str(parser.get_error(i).desc()).split()) for i in range(parser.num_errors))
    layers = sorted({network.get_layer(i).type.name for i in range(network.num_layers)})
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM86, 0)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        low = [1 if d < 0 else d for d in tensor.shape]
        high = [(2 if j == 0 else CACHE) if d < 0 else d for j, d in enumerate(tensor.shape)]
        profile.set_shape(tensor.name, low, low, high)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    size = "build failed" if engine is None else f"engine {len(bytes(engine))} bytes"
    return f"parsed into {', '.join(layers)}; {size}"


def main(work: Path) -> None:
    f = TensorProto.FLOAT

    def value(name, shape, dtype=f):
        return helper.make_tensor_value_info(name, dtype, shape)

    def model(nodes, inputs, outputs, opset):
        return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                                 opset_imports=[helper.make_opsetid("", opset)])

    b, h, d = "B", HEADS, HEAD_DIM
    decode = [value("q", [b, h, 1, d]), value("k", [b, h, "M", d]), value("v", [b, h, "M", d])]
    cases = {
        "attention23-past-present": model(
            [helper.make_node("Attention", ["q", "k", "v", "", "past_k", "past_v"], ["y", "present_k", "present_v"],
                              is_causal=1)],
            [value("q", [b, h, "S", d]), value("k", [b, h, "S", d]), value("v", [b, h, "S", d]),
             value("past_k", [b, h, "P", d]), value("past_v", [b, h, "P", d])],
            [value("y", [b, h, "S", d]), value("present_k", None), value("present_v", None)], 23),
        "attention24-nonpad-kv-seqlen": model(
            [helper.make_node("Attention", ["q", "k", "v", "", "", "", "nonpad"], ["y"])],
            [*decode, value("nonpad", [b], TensorProto.INT64)], [value("y", [b, h, 1, d])], 24),
        "attention24-plain": model([helper.make_node("Attention", ["q", "k", "v"], ["y"])], decode,
                                   [value("y", [b, h, 1, d])], 24),
        "tensorscatter-static-then-attention24": model(
            [helper.make_node("TensorScatter", ["cache_k", "k_new", "pos"], ["present_k"], axis=2),
             helper.make_node("TensorScatter", ["cache_v", "v_new", "pos"], ["present_v"], axis=2),
             helper.make_node("Attention", ["q", "present_k", "present_v", "", "", "", "nonpad"], ["y"])],
            [value("q", [b, h, 1, d]), value("k_new", [b, h, 1, d]), value("v_new", [b, h, 1, d]),
             value("cache_k", [b, h, CACHE, d]), value("cache_v", [b, h, CACHE, d]),
             value("pos", [b], TensorProto.INT64), value("nonpad", [b], TensorProto.INT64)],
            [value("y", [b, h, 1, d]), value("present_k", [b, h, CACHE, d]), value("present_v", [b, h, CACHE, d])], 24),
    }
    for name, case in cases.items():
        print(f"{name}: {probe(case, work / f'{name}.onnx')}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="rtx-attention-")))
