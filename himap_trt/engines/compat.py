"""Static TensorRT compatibility check, runnable without TensorRT or a GPU.

Every node of every exported graph must use an operator TensorRT's ONNX parser supports, with
input element types it supports for that operator, constant inputs where the parser needs
constants (``axes`` of Slice/Squeeze/Reduce*, ``axis`` of CumSum), and the default-domain opset
must be in the parser's range. The table is ``tensorrt_onnx_support.json`` beside this file; it
cites its source (onnx-tensorrt's support matrix) and the TensorRT versions it covers.

This cannot prove a build will succeed (shape constraints, tactics and memory are only known to
the builder) but it catches the common failure early: an exporter choosing an operator or a dtype
the parser rejects (e.g. ``CumSum`` on int64), or a ``TensorScatter`` on a cache of dynamic length.
It is the fast pre-check: where TensorRT or TensorRT-RTX is installed, ``check --tensorrt-compat``
also runs the real ONNX parser on every graph (:func:`parser_check`), and a test asserts that this
table never accepts a graph that parser rejects (tests/integration/test_parser_vs_static.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from himap_trt.engines.parser import parse_file
from himap_trt.errors import HimapError

TABLE_PATH = Path(__file__).with_name("tensorrt_onnx_support.json")


@dataclass(frozen=True)
class Offense:
    """A node TensorRT's ONNX parser would reject.

    Attributes:
        graph: the ONNX file's name.
        node: the node's name ('' for graph-level problems such as the opset).
        op_type: the node's operator.
        reason: what is wrong, with the expected value.
        rule: which rule of the table: ``opset`` for the opset range, ``""`` for the node rules.
    """

    graph: str
    node: str
    op_type: str
    reason: str
    rule: str = ""


@dataclass(frozen=True)
class CompatReport:
    """Result of checking one graph."""

    graph: str
    nodes: int
    opset: int
    offenses: tuple[Offense, ...]
    unchecked_types: int
    min_tensorrt: str = "10.1"     # first TensorRT whose parser takes every operator of the graph


@lru_cache(maxsize=1)
def support_table() -> dict[str, Any]:
    """The parsed ``tensorrt_onnx_support.json``."""
    return json.loads(TABLE_PATH.read_text())


def _type_name(elem_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(elem_type)


def check_onnx_file(path: str | Path, table: dict[str, Any] | None = None) -> CompatReport:
    """Check one ONNX file (weights are not loaded).

    Raises:
        HimapError: if the file cannot be read as ONNX.
    """
    import onnx

    table = table or support_table()
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have several types
        raise HimapError(f"cannot read {str(path)!r} as ONNX: {exc}") from None
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is best effort; unknown types are counted, not guessed
        inferred = model
    graph = inferred.graph
    offenses: list[Offense] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    low, high = table["opset"]["min"], table["opset"]["max"]
    since = table.get("since", {}).get("ops", {})
    newer = [since[n.op_type] for n in graph.node if n.op_type in since and n.domain in ("", "ai.onnx")]
    min_tensorrt = max([table.get("since", {}).get("base", "10.1"), *(e["tensorrt"] for e in newer)],
                       key=lambda v: tuple(int(x) for x in v.split(".")))
    high = max([high, *(e["opset"] for e in newer)])      # an operator of a later parser brings its opset
    if not low <= opset <= high:
        offenses.append(Offense(path.name, "", "", f"opset {opset} is outside TensorRT's parser range {low}..{high}",
                                "opset"))

    types: dict[str, int] = {}
    shapes: dict[str, list[int | None]] = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None
                                  for d in value.type.tensor_type.shape.dim]
    constants = {init.name for init in graph.initializer}
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            constants.update(node.output)
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type

    allowed_names = table["type_names"]
    unchecked = 0
    for node in graph.node:
        name = node.name or f"<{node.op_type}>"
        if node.domain not in ("", "ai.onnx"):
            offenses.append(Offense(path.name, name, node.op_type,
                                    f"custom domain {node.domain!r}: TensorRT needs a plugin for it"))
            continue
        if node.op_type in table["unsupported"]:
            offenses.append(Offense(path.name, name, node.op_type, "operator not supported by TensorRT's ONNX parser"))
            continue
        if node.op_type not in table["supported"] and node.op_type not in since:
            offenses.append(Offense(path.name, name, node.op_type, "operator not in TensorRT's ONNX parser support table"))
            continue
        types_ = table["supported"][node.op_type] if node.op_type in table["supported"] else since[node.op_type]["types"]
        allowed = {allowed_names[t] for t in types_ if t in allowed_names}
        spec = table["typed_inputs"].get(node.op_type, [0])
        indices = range(len(node.input)) if spec == "all" else spec
        checked = [(f"input {i}", node.input[i]) for i in indices if i < len(node.input) and node.input[i]]
        if node.op_type in table["typed_outputs"]:
            checked += [("output 0", node.output[0])]
        for where, value in checked:
            if value not in types:
                unchecked += 1
                continue
            type_name = _type_name(types[value])
            if allowed and type_name not in allowed:
                offenses.append(Offense(path.name, name, node.op_type,
                                        f"{where} ({value}) is {type_name}; TensorRT supports {', '.join(sorted(allowed))}"))
        if node.op_type == "TensorScatter":
            # TensorRT lowers TensorScatter to its KV-cache update layer, which needs the cache's
            # sequence dimension static (measured: TensorRT-RTX 1.7.1's parser rejects a dynamic one)
            axis = next((a.i for a in node.attribute if a.name == "axis"), -2)
            shape = shapes.get(node.input[0])
            if shape is None or not -len(shape) <= axis < len(shape) or shape[axis] is None:
                offenses.append(Offense(path.name, name, node.op_type,
                                        f"input 0 ({node.input[0]}) must have a static length on axis {axis} "
                                        "(TensorRT's KV-cache update layer)"))
        for index in table["constant_inputs"].get(node.op_type, []):
            if index < len(node.input) and node.input[index] and node.input[index] not in constants:
                offenses.append(Offense(path.name, name, node.op_type,
                                        f"input {index} ({node.input[index]}) must be a constant (initializer)"))
    return CompatReport(path.name, len(graph.node), opset, tuple(offenses), unchecked, min_tensorrt)


def missing_operators(operators: dict[str, int], table: dict[str, Any] | None = None) -> list[str]:
    """The operators of ``operators`` (``{op_type: opset it is used at}``) that TensorRT's ONNX parser does not
    take at that opset according to ``table`` (default :func:`support_table`): neither in the matrix (``supported``,
    up to its opset maximum) nor in ``since`` (a later parser, up to the opset it brings).

    Returns:
        ``["Attention (opset 24)", ...]`` in the order given; empty when the table takes all of them.
    """
    table = table or support_table()
    since = table.get("since", {}).get("ops", {})
    missing = []
    for op_type, opset in operators.items():
        if op_type in table["supported"] and opset <= table["opset"]["max"]:
            continue
        if op_type in since and opset <= since[op_type]["opset"]:
            continue
        missing.append(f"{op_type} (opset {opset})")
    return missing


def check_export(export_dir: Path, manifest) -> list[CompatReport]:
    """Check every graph of an export (see :func:`check_onnx_file`)."""
    return [check_onnx_file(Path(export_dir) / spec.file) for spec in manifest.graphs]


@dataclass(frozen=True)
class ParserReport:
    """The real ONNX parser's verdict on one graph (``errors`` empty: parsed)."""

    graph: str
    errors: tuple[str, ...]


def parser_check(export_dir: Path, manifest, flavour) -> list[ParserReport]:
    """Parse every graph of an export with the real ONNX parser of ``flavour``
    (:class:`~himap_trt.engines.flavour.Flavour`; imports its module). No engine is built.

    Raises:
        HimapError: if the flavour is not installed.
    """
    return [ParserReport(spec.file, tuple(parse_file(flavour, Path(export_dir) / spec.file))) for spec in manifest.graphs]


#: Static rules the real parser overrides on a graph it parses. The opset range (9..20, onnx-tensorrt
#: 10.1's matrix) stands in for "this parser version reads this opset", which an installed parser
#: answers for itself: int4 exports are opset 21 (blocked ``DequantizeLinear``, INT4), and
#: TensorRT-RTX 1.7.1's parser takes them (tests/integration/test_quantize.py). The node rules
#: (operators, dtypes, constant inputs) stand whatever the installed parser says: they describe
#: the TensorRT 10.x parsers the project also targets.
PARSER_OVERRIDES = ("opset",)


def reconcile(reports: list[CompatReport], parsed: list[ParserReport]) -> tuple[list[Offense], list[Offense]]:
    """Split the static offenses of ``reports`` (:func:`check_export`) by the real parser's verdicts
    ``parsed`` (:func:`parser_check`; empty where no parser is installed).

    Returns:
        ``(standing, waived)``: waived are the offenses of a rule in :data:`PARSER_OVERRIDES` on a graph
        the real parser parsed without error; every other offense stands.
    """
    accepted = {p.graph for p in parsed if not p.errors}
    standing: list[Offense] = []
    waived: list[Offense] = []
    for report in reports:
        for offense in report.offenses:
            (waived if offense.rule in PARSER_OVERRIDES and report.graph in accepted else standing).append(offense)
    return standing, waived
