"""Quantization of the decoder's linear layers (``himap-trt export --quantize``): weight-only
(``int8``, ``int4``) and dynamic int8 (``int8-dynamic``, below).

The composed segment graphs (:mod:`himap_trt.export.compose`) are rewritten so that every linear
layer's weight is stored quantized and dequantized in the graph by a standard ONNX
``DequantizeLinear`` feeding the ``MatMul``::

    x [B,S,K] ──────────────────────────────► MatMul ──► y [B,S,N]
    W_q [K,N] int4/int8, scale ─► DequantizeLinear ─┘

Schemes (:data:`SCHEMES`), all symmetric (no zero point: TensorRT's weight-only GEMMs need zero
points of 0):

- ``int8``: one scale per output channel (``DequantizeLinear`` axis 1, scale [N]); int8 codes in
  [-127, 127] from ONNX Runtime's ``quant_utils.compute_scale_zp`` / ``quantize_nparray`` (the
  per-channel weight quantization of its QDQ quantizer). The graph keeps its opset (>= 13).
- ``int4``: blocks of ``block_size`` input rows per output channel (``DequantizeLinear`` axis 0,
  ``block_size``, scale [K/block, N], INT4 codes in [-8, 7]) from ONNX Runtime's
  ``MatMulNBitsQuantizer`` in its QDQ format (round-to-nearest); the graph moves to opset 21 (blocked
  ``DequantizeLinear`` and the INT4 type are opset 21).

ONNX Runtime fuses each ``DequantizeLinear -> MatMul`` pair into its ``com.microsoft.MatMulNBits``
kernel at session creation (``DQMatMulToMatMulNBits``; checked by :func:`fused_op_counts`), with the
``accuracy_level`` of the session option ``session.qdq_matmulnbits_accuracy_level``: the export
records :data:`ACCURACY_LEVEL` (4: activations quantized to int8 per block at run time and the
products computed in int8 with VNNI where the CPU has it) and the ONNX Runtime backend sets it.
TensorRT(-RTX) parses the same pairs as ``DEQUANTIZE`` + ``MATRIX_MULTIPLY`` layers (weight-only GEMMs).

``int8-dynamic`` (int8 weights, activations quantized per call: ONNX Runtime's dynamic quantization,
the form its ``quantize_dynamic`` writes, written here node for node with the int8 codes above)::

    x [B,S,K] ─► DynamicQuantizeLinear ─► x_q uint8 [B,S,K], x_scale [], x_zp uint8 []
    MatMulInteger(x_q, W_q int8 [K,N], x_zp) int32 ─► Cast float ─► Mul(·, x_scale * W_scale [N]) ─► y [B,S,N]

``DynamicQuantizeLinear`` (ONNX opset 11) computes one asymmetric uint8 scale and zero point from
the whole tensor's range (0 included) at every call: per tensor, not per token, so in a batch the
rows of one prompt share a scale with the others' (padding, all zeros, never widens the range), and
one outlier token coarsens the step of every token of the call. ONNX Runtime fuses each chain into
``com.microsoft.DynamicQuantizeMatMul``, or ``MatMulIntegerToFloat`` behind a ``DynamicQuantizeLinear``
shared by the layers reading the same input (q/k/v, gate/up); their u8s8 GEMMs use AVX-512 VNNI /
AMX-INT8 where the CPU has them. Weights are full-range int8 (no ``reduce_range``): on a CPU without
VNNI, MLAS's AVX2 u8s8 kernel may saturate int16 sums (ONNX Runtime's quantization docs advise 7-bit
weights there), not measured here. TensorRT has no form of it: ``build`` refuses such an export
(:data:`himap_trt.manifest.NOT_TENSORRT_QUANTIZE`). Attention, norms, the scoring graphs, vision and
the LM head (unless ``lm_head``) stay fp32.

Before quantizing, weight transposes are folded: the traced layers compute ``x @ Transpose(W)``
with ``W`` [N,K] an initializer, which becomes ``x @ W^T`` with ``W^T`` [K,N] the initializer. The
LM head (a ``Gemm`` with ``transB=1``) becomes such a ``MatMul`` only with ``lm_head=True``.
"""

from __future__ import annotations

import collections
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from himap_trt.errors import HimapError
from himap_trt.manifest import ACCURACY_LEVEL, SCHEMES, Quantization  # the manifest's record (re-exported here)
from himap_trt.runtime.onnxrt import session_config

#: ``--quant-block-size`` choices for int4 (what ONNX Runtime's MLAS block quantizer and MatMulNBits take).
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_INT4_BLOCK_SIZE = 32
#: Opset of an int4 graph (blocked DequantizeLinear, INT4).
INT4_OPSET = 21
#: The dtypes quantized exports support (ONNX Runtime's CPU MatMulNBits takes float32 activations here).
QUANTIZE_DTYPES = ("float32",)

#: (atol, rtol) of a quantized segment graph against the fp32 PyTorch model, per scheme, as in
#: :data:`himap_trt.export.validate.TOLERANCES`: pass when ``max |ours - ref| <= atol + rtol * max |ref|``
#: over one output of ONE decoder layer (a quantized export is validated layer by layer on the fp32
#: model's inputs: across layers the error compounds, and in a random-weight model it grows without
#: bound). Worst cases measured on tiny and tiny-gqa, plans none and HiMAP (docs/PERFORMANCE.md,
#: "Quantized exports"): int8 0.025 and int4 0.157 of max |ref| (layer 0's hidden states, |x| ~ 14-37;
#: int4 in blocks of 16 on N(0, 0.2) weights: ~12% rms error per weight), with about 2x margin.
#: Accuracy of whole answers: the shapes eval (``himap-trt eval``), same section. int8-dynamic: worst
#: 0.027 of max |ref| on the same models and plans (docs/PERFORMANCE.md, "Dynamic int8"), the int8
#: tolerance (~1.9x margin).
TOLERANCES = {"int8": (1e-2, 5e-2), "int4": (5e-2, 3e-1), "int8-dynamic": (1e-2, 5e-2)}


def linear_input_sizes(dims) -> dict[str, int]:
    """The K (input) size of every linear layer of a decoder layer: name -> size."""
    return {"hidden size (q/k/v/gate/up projections)": dims.hidden_size,
            "attention output size (o_proj)": dims.num_heads * dims.head_dim,
            "FFN size (down_proj)": dims.intermediate_size}


def check_quantization(scheme: str, block_size: int | None, dims, dtype: str, lm_head: bool = False) -> Quantization | None:
    """Check ``--quantize``/``--quant-block-size``/``--quantize-lm-head`` against the model and dtype.

    Args:
        scheme: ``none``, ``int8``, ``int4`` or ``int8-dynamic``.
        block_size: int4 only: K rows per scale (None: :data:`DEFAULT_INT4_BLOCK_SIZE`, or the largest
            smaller block size that divides the model's sizes: 16 for the tiny models' FFN of 176).
        dims: the model's :class:`~himap_trt.dims.ModelDims` (None: skip the size checks).
        dtype: the export dtype (``float32`` ...).

    Returns:
        The :class:`Quantization`, or None for ``none``.

    Raises:
        HimapError: an unknown scheme, a block size with int8/int8-dynamic or without --quantize, an int4 block size
            that is not one of :data:`INT4_BLOCK_SIZES` or does not divide every linear layer's input
            size, a dtype other than fp32, or --quantize-lm-head without --quantize.
    """
    if scheme not in SCHEMES:
        raise HimapError(f"--quantize must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if scheme == "none":
        if block_size is not None:
            raise HimapError("--quant-block-size needs --quantize int4")
        if lm_head:
            raise HimapError("--quantize-lm-head needs --quantize int8, int4 or int8-dynamic")
        return None
    if dtype not in QUANTIZE_DTYPES:
        raise HimapError(f"--quantize {scheme} needs --dtype fp32 (the quantized graphs dequantize to float32), "
                         f"got {dtype!r}")
    if scheme in ("int8", "int8-dynamic"):
        if block_size is not None:
            raise HimapError(f"--quant-block-size applies to --quantize int4; {scheme} has one scale per output channel")
        if scheme == "int8-dynamic":    # no MatMulNBits: accuracy level 0 (unset)
            return Quantization(scheme, None, lm_head, accuracy_level=0,
                                tool=_tool("quant_utils.quantize_nparray (per channel), quantize_dynamic's form"))
        return Quantization("int8", None, lm_head, tool=_tool("quant_utils.quantize_nparray (per channel)"))
    if block_size is None and dims is not None:   # 32, or the largest smaller block that divides every size
        fits = [b for b in INT4_BLOCK_SIZES if b <= DEFAULT_INT4_BLOCK_SIZE
                and all(size % b == 0 for size in linear_input_sizes(dims).values())]
        block_size = max(fits) if fits else DEFAULT_INT4_BLOCK_SIZE
    block = DEFAULT_INT4_BLOCK_SIZE if block_size is None else block_size
    if block not in INT4_BLOCK_SIZES:
        raise HimapError(f"--quant-block-size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))} for int4, got {block}")
    if dims is not None:
        for what, size in linear_input_sizes(dims).items():
            if size % block:
                raise HimapError(f"--quant-block-size {block} does not divide the model's {what} {size}; "
                                 f"pick a block size that divides {size}")
        if lm_head and dims.hidden_size % block:
            raise HimapError(f"--quant-block-size {block} does not divide the hidden size {dims.hidden_size} (LM head)")
    return Quantization("int4", block, lm_head, tool=_tool("MatMulNBitsQuantizer (QDQ, RTN)"))


def _tool(what: str) -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} {what}"


def fold_weight_transposes(model: ir.Model, lm_head: bool) -> int:
    """Make every linear layer ``MatMul(x, W^T)`` with ``W^T`` [K,N] an initializer (in place).

    ``Transpose(W)`` of a 2-D initializer used only there becomes the transposed initializer; with
    ``lm_head``, a ``Gemm(x, W, transB=1)`` without bias (alpha 1) becomes ``MatMul(x, W^T)``.

    Returns:
        How many weights were folded.
    """
    graph = model.graph
    folded = 0
    for node in list(graph):
        weight = node.inputs[1] if node.op_type == "Gemm" and len(node.inputs) >= 2 else \
            node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if weight is None or not weight.is_initializer() or weight.const_value is None or len(weight.uses()) != 1:
            continue
        if weight.shape is None or len(weight.shape) != 2:
            continue
        if node.op_type == "Gemm":
            attrs = {name: attr.value for name, attr in node.attributes.items()}
            if not lm_head or attrs.get("transB", 0) != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 \
                    or (len(node.inputs) > 2 and node.inputs[2] is not None):
                continue
        elif "perm" in node.attributes and list(node.attributes["perm"].value) != [1, 0]:
            continue
        array = np.ascontiguousarray(weight.const_value.numpy().T)
        name = f"{weight.name}.transposed"
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name), type=weight.type,
                         shape=ir.Shape(array.shape))
        graph.register_initializer(value)
        if node.op_type == "Transpose":
            ir.convenience.replace_all_uses_with(node.outputs[0], value)
            graph.remove(node, safe=True)
        else:
            matmul = ir.Node("", "MatMul", [node.inputs[0], value], name=f"{node.name}/matmul")
            graph.insert_before(node, matmul)
            old = node.outputs[0]
            name, matmul.outputs[0].type, matmul.outputs[0].shape = old.name, old.type, old.shape
            old.replace_all_uses_with(matmul.outputs[0], replace_graph_outputs=True)   # the head's output is 'logits'
            graph.remove(node, safe=True)
            matmul.outputs[0].name = name
        graph.initializers.pop(weight.name)
        folded += 1
    return folded


def _linear_matmuls(graph: ir.Graph) -> list[ir.Node]:
    return [node for node in graph if node.op_type == "MatMul" and node.inputs[1] is not None
            and node.inputs[1].is_initializer() and node.inputs[1].const_value is not None
            and node.inputs[1].shape is not None and len(node.inputs[1].shape) == 2]


def _per_channel_int8(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes of a weight ``array`` [K,N] with one scale per output channel (column), from
    ONNX Runtime's quant_utils: codes int8 [K,N] in [-127, 127] and scales float32 [N] (absmax / 127)."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType, quantize_nparray

    qmin, qmax = get_qmin_qmax_for_qType(TensorProto.INT8, symmetric=True)
    lows, highs = array.min(axis=0), array.max(axis=0)
    scales = np.empty(array.shape[1], np.float32)
    for n in range(array.shape[1]):
        _, scale = compute_scale_zp(lows[n], highs[n], qmin, qmax, symmetric=True)
        scales[n] = scale
    scales[scales == 0] = 1.0       # an all-zero column: any scale dequantizes it exactly
    codes = quantize_nparray(TensorProto.INT8, array, scales[None, :], np.zeros_like(scales, np.int8)[None, :])
    return codes.astype(np.int8), scales


def _quantized_weight(graph: ir.Graph, weight: ir.Value) -> tuple[ir.Value, ir.Value]:
    """Register ``weight``'s per-channel int8 codes [K,N] and scales [N] as initializers (the float
    weight is removed by the caller once unused)."""
    codes, scales = _per_channel_int8(weight.const_value.numpy().astype(np.float32))      # [K,N], [N]
    q_name, s_name = f"{weight.name}_DQ_Q8", f"{weight.name}_DQ_scales"
    q_value = ir.Value(name=q_name, const_value=ir.tensor(codes, name=q_name),
                       type=ir.TensorType(ir.DataType.INT8), shape=ir.Shape(codes.shape))
    s_value = ir.Value(name=s_name, const_value=ir.tensor(scales, name=s_name),
                       type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(scales.shape))
    graph.register_initializer(q_value)
    graph.register_initializer(s_value)
    return q_value, s_value


def _quantize_int8(model: ir.Model) -> int:
    """Per-output-channel symmetric int8 (ONNX Runtime's quant_utils), DequantizeLinear axis 1."""
    graph = model.graph
    count = 0
    for node in _linear_matmuls(graph):
        weight = node.inputs[1]
        q_value, s_value = _quantized_weight(graph, weight)
        dq = ir.Node("", "DequantizeLinear", [q_value, s_value], attributes=[ir.AttrInt64("axis", 1)],
                     name=f"{node.name}/dequantize")
        dq.outputs[0].name = f"{weight.name}_DQ"
        dq.outputs[0].type, dq.outputs[0].shape = weight.type, weight.shape
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        graph.initializers.pop(weight.name)
        count += 1
    return count


def _quantize_int8_dynamic(model: ir.Model) -> int:
    """int8 weights per output channel, activations quantized per call: ONNX Runtime's dynamic form.

    Each ``MatMul(x, W)`` becomes what ONNX Runtime's ``quantize_dynamic`` writes (IntegerOps format)::

        x ─► DynamicQuantizeLinear ─► x_q uint8, x_scale [], x_zp uint8 []
        MatMulInteger(x_q, W_q, x_zp) int32 ─► Cast(float) ─► Mul(·, x_scale * W_scale [N]) ─► y

    with one ``DynamicQuantizeLinear`` per distinct input (q/k/v and gate/up share theirs) and no
    weight zero point (symmetric). ONNX Runtime fuses the chain into ``com.microsoft.DynamicQuantizeMatMul``
    (or ``MatMulIntegerToFloat`` behind a shared ``DynamicQuantizeLinear``), whose u8s8 kernels use
    VNNI / AMX where the CPU has them.
    """
    graph = model.graph
    quantized_inputs: dict[int, ir.Node] = {}       # id(x) -> its DynamicQuantizeLinear
    count = 0
    for node in _linear_matmuls(graph):
        x, weight = node.inputs[0], node.inputs[1]
        q_value, s_value = _quantized_weight(graph, weight)
        dql = quantized_inputs.get(id(x))
        if dql is None:
            dql = ir.Node("", "DynamicQuantizeLinear", [x], num_outputs=3, name=f"{node.name}/quantize_input")
            for value, suffix in zip(dql.outputs, ("quantized", "scale", "zero_point"), strict=True):
                value.name = f"{node.name}/input_{suffix}"
            graph.insert_before(node, dql)
            quantized_inputs[id(x)] = dql
        x_q, x_scale, x_zp = dql.outputs
        gemm = ir.Node("", "MatMulInteger", [x_q, q_value, x_zp], name=f"{node.name}/matmul_integer")
        cast = ir.Node("", "Cast", [gemm.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                       name=f"{node.name}/cast")
        scales = ir.Node("", "Mul", [x_scale, s_value], name=f"{node.name}/scales_mul")
        out = ir.Node("", "Mul", [cast.outputs[0], scales.outputs[0]], name=f"{node.name}/output_scale_mul")
        for new in (gemm, cast, scales, out):
            new.outputs[0].name = f"{new.name}_output"
            graph.insert_before(node, new)
        old = node.outputs[0]
        name, out.outputs[0].type, out.outputs[0].shape = old.name, old.type, old.shape
        old.replace_all_uses_with(out.outputs[0], replace_graph_outputs=True)   # the head's output is 'logits'
        graph.remove(node, safe=True)
        out.outputs[0].name = name
        graph.initializers.pop(weight.name)
        count += 1
    return count


def _quantize_int4(model: ir.Model, block_size: int) -> tuple[ir.Model, int]:
    """Blocked symmetric int4 with ONNX Runtime's MatMulNBitsQuantizer (QDQ format)."""
    from onnxruntime.quantization.quant_utils import QuantFormat

    MatMulNBitsQuantizer = _nbits_quantizer()

    count = len(_linear_matmuls(model.graph))
    proto = ir.serde.serialize_model(model)
    quant_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quant_logger.level
    quant_logger.setLevel(logging.WARNING)
    try:
        quantizer = MatMulNBitsQuantizer(proto, bits=4, block_size=block_size, is_symmetric=True,
                                         quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",))
        quantizer.process()
    finally:
        quant_logger.setLevel(level)
    out = ir.serde.deserialize_model(quantizer.model.model)
    return out, count


def _nbits_quantizer():
    """ONNX Runtime's MatMulNBitsQuantizer, imported without the ``logging.basicConfig(level=INFO)`` its
    module calls at import (which would print every INFO record of every library from then on)."""
    root = logging.getLogger()
    guard = None
    if not root.handlers:      # basicConfig does nothing when the root logger has a handler
        guard = logging.NullHandler()
        root.addHandler(guard)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        if guard is not None:
            root.removeHandler(guard)
    return MatMulNBitsQuantizer


def quantize_model(model: ir.Model, quantization: Quantization) -> ir.Model:
    """Quantize ``model``'s linear-layer weights as ``quantization`` says (see the module docstring).

    Returns:
        The quantized model (the same object for int8 and int8-dynamic, a new one for int4).

    Raises:
        HimapError: if the graph has no linear layer to quantize, or some weight was left unquantized.
    """
    fold_weight_transposes(model, lm_head=quantization.lm_head)
    if quantization.scheme == "int8":
        count = _quantize_int8(model)
    elif quantization.scheme == "int8-dynamic":
        count = _quantize_int8_dynamic(model)
    else:
        model, count = _quantize_int4(model, quantization.block_size)
    left = _linear_matmuls(model.graph)
    if not count or left:
        raise HimapError(f"graph {model.graph.name!r}: --quantize {quantization.scheme} quantized {count} linear "
                         f"layers and left {len(left)} float weights")
    return model


def fused_op_counts(path, quantization: dict | None = None) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (its optimised graph, CPU, all optimisations).

    What the export's tests and docs use to show that every DequantizeLinear -> MatMul pair became a
    ``MatMulNBits`` node.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        for key, value in session_config(quantization).items():
            options.add_session_config_entry(key, value)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return dict(collections.Counter(node.op_type for node in optimized.graph.node))
