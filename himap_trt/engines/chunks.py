"""A decoder segment built as consecutive engines of a few layers each ("layer chunks", issue 34).

Why: TensorRT-RTX 1.7's builder holds about 2.7x an engine's weights in host memory while it builds
(its own copy of the weights, the serialized engine, and the parser's; measured on a 7B-dims
2-layer segment, docs/PERFORMANCE.md "TensorRT-RTX engine size and build memory"), so a 24-layer 7B segment (10 GB of fp16 weights) needs
~27 GiB. Built in chunks of ``n`` layers, the peak follows the chunk's weights, not the segment's.

How: the exported segment graph is composed in named parts (:mod:`himap_trt.export.compose`):
``prelude/...`` (attention bias, RoPE tables, write indices: computed from the small inputs),
``layers.{i}/...`` per decoder layer, and ``head/...`` (final norm and logits, last segment only);
layer ``i`` hands the hidden states to layer ``i + 1`` through one tensor,
``layers.{i}/attention/hidden_out`` (:data:`BOUNDARY`). A chunk ``[s, e)`` is the subgraph of
the prelude, layers ``s .. e-1`` and (for the last chunk of the last segment) the head that its
outputs need: the segment's outputs those nodes produce plus, for every chunk but the last, the
boundary ``layers.{e-1}/attention/hidden_out``; its inputs are the segment inputs it reads plus,
for every chunk but the first, the previous boundary. Initializers keep their external-data
references (no weight is read or copied): the chunk is parsed with the segment file's path, so the
parser reads the weights from the export's own ``.onnx.data`` file.

At run time (:class:`himap_trt.runtime.backend.ChunkedBackend`) the chunks run in order, each fed
from the segment's feeds and the earlier chunks' boundary outputs; ONNX Runtime runs the same chunk
graphs in a test and matches the whole segment (tests/integration/test_engine_chunks.py).
"""

from __future__ import annotations

from pathlib import Path

from himap_trt.confine import load_onnx_proto
from himap_trt.errors import HimapError
from himap_trt.graphs.spec import GraphSpec, TensorSpec

#: The tensor carrying the hidden states from decoder layer ``i`` to layer ``i + 1``.
BOUNDARY = "layers.{}/attention/hidden_out"
#: Node-name prefixes every chunk may use besides its layers.
PRELUDE, HEAD = "prelude", "head"


def layer_ranges(layers: tuple[int, int], max_layers: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of at most ``max_layers`` layers covering ``layers`` in order (one
    range: the whole segment, for ``max_layers`` <= 0 or >= its length). Chunks are balanced: 24
    layers by at most 7 give 6, 6, 6, 6, not 7, 7, 7, 3."""
    start, end = layers
    count = end - start
    if max_layers <= 0 or max_layers >= count:
        return [(start, end)]
    parts = -(-count // max_layers)
    sizes = [count // parts + (1 if i < count % parts else 0) for i in range(parts)]
    ranges, at = [], start
    for size in sizes:
        ranges.append((at, at + size))
        at += size
    return ranges


def layers_per_chunk(weight_bytes: int, layers: int, budget_bytes: int) -> int:
    """Most layers per chunk so that a chunk holds at most ``budget_bytes`` of weights (at least 1),
    from the segment's weights spread evenly over its layers; 0 (no chunking) if the whole segment fits."""
    if budget_bytes <= 0 or weight_bytes <= budget_bytes or layers <= 1:
        return 0
    return max(1, int(budget_bytes // max(1, weight_bytes // layers)))


def _namespace(node) -> str:
    return node.name.split("/", 1)[0]


def chunk_graph(model, spec: GraphSpec, start: int, end: int, index: int):
    """The ONNX model and the graph declaration of chunk ``[start, end)`` of segment ``spec``.

    Args:
        model: the segment's ``ModelProto``, loaded without external data.
        spec: the segment's declaration (``layers`` set).
        start, end: the chunk's layers, inside ``spec.layers``.
        index: the chunk's position (its name is ``{segment}.part{index}``).

    Returns:
        ``(ModelProto, GraphSpec)``; initializers keep their external-data references.

    Raises:
        HimapError: if the graph is not composed as described in the module docstring (a node the
            chunk needs lies outside its prelude, layers and head, or a boundary tensor is missing).
    """
    import onnx

    first, last = spec.layers
    if not first <= start < end <= last:
        raise HimapError(f"{spec.name}: chunk layers [{start}, {end}) outside the segment's [{first}, {last})")
    graph = model.graph
    allowed = {PRELUDE, *(f"layers.{i}" for i in range(start, end))} | ({HEAD} if end == last else set())
    producer = {out: node for node in graph.node for out in node.output if out}
    boundary_in = BOUNDARY.format(start - 1) if start > first else None
    boundary_out = BOUNDARY.format(end - 1) if end < last else None
    for name in (boundary_in, boundary_out):
        if name is not None and name not in producer:
            raise HimapError(f"{spec.name}: no tensor {name!r} in the graph (chunks need the composed layer names)")
    own = [o for o in spec.outputs if o.name in producer and _namespace(producer[o.name]) in allowed
           and _namespace(producer[o.name]) != PRELUDE]
    wanted = [o.name for o in own] + ([boundary_out] if boundary_out else [])
    graph_inputs = {i.name: i for i in graph.input}
    initializers = {t.name: t for t in graph.initializer}
    needed_nodes, seen, stack, taken = [], set(), list(wanted), set()
    used_inputs, used_inits = set(), set()
    while stack:
        name = stack.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name == boundary_in:
            continue
        if name in graph_inputs:
            used_inputs.add(name)
            continue
        if name in initializers:
            used_inits.add(name)
            continue
        node = producer.get(name)
        if node is None:
            continue            # an outer-scope name of a subgraph, resolved by its own graph
        if _namespace(node) not in allowed:
            raise HimapError(f"{spec.name}: chunk [{start}, {end}) needs node {node.name!r} outside its layers")
        if id(node) not in taken:
            taken.add(id(node))
            needed_nodes.append(node)
            stack.extend(node.input)
            for attr in node.attribute:          # names read inside subgraphs (If/Loop bodies)
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    stack.extend(i for n in sub.node for i in n.input)
    order = {id(n): i for i, n in enumerate(graph.node)}
    nodes = sorted(needed_nodes, key=lambda n: order[id(n)])
    hidden = spec.input("hidden_states")
    inputs = []
    if boundary_in is not None:
        value = onnx.ValueInfoProto()
        value.CopyFrom(graph_inputs["hidden_states"])
        value.name = boundary_in
        inputs.append(value)
    inputs += [graph_inputs[t.name] for t in spec.inputs if t.name in used_inputs]
    outputs = {o.name: o for o in graph.output}
    out_values = [outputs[name] for name in (o.name for o in own)]
    if boundary_out is not None:
        value = onnx.ValueInfoProto()
        value.CopyFrom(graph_inputs["hidden_states"])
        value.name = boundary_out
        out_values.append(value)
    names = {o for n in nodes for o in n.output}
    chunk = onnx.helper.make_graph(
        nodes, f"{spec.name}.part{index}", inputs, out_values,
        initializer=[t for t in graph.initializer if t.name in used_inits],
        value_info=[v for v in graph.value_info if v.name in names])
    result = onnx.helper.make_model(chunk, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                    functions=list(model.functions))
    part_inputs = ((TensorSpec(boundary_in, hidden.dtype, hidden.shape),) if boundary_in else ()) + tuple(
        t for t in spec.inputs if t.name in used_inputs)
    part_outputs = tuple(own) + ((TensorSpec(boundary_out, hidden.dtype, hidden.shape),) if boundary_out else ())
    part = GraphSpec(f"{spec.name}.part{index}", spec.kind, part_inputs, part_outputs, layers=(start, end),
                     stage=spec.stage, file=spec.file, attrs=dict(spec.attrs))
    return result, part


def segment_chunks(path: Path, spec: GraphSpec, max_layers: int):
    """Every chunk of a segment: ``[(model bytes, GraphSpec)]`` in order (see :func:`chunk_graph`);
    the bytes parse with ``path`` as the model path, for its external data.

    Raises:
        HimapError: see :func:`chunk_graph`; a graph that is not a segment, or chunks that do not
            produce every output of the segment exactly once.
    """
    if spec.kind != "segment" or spec.layers is None:
        raise HimapError(f"graph {spec.name!r} is not a decoder segment: only segments are built in layer chunks")
    model = load_onnx_proto(path)
    parts = [chunk_graph(model, spec, s, e, i) for i, (s, e) in enumerate(layer_ranges(spec.layers, max_layers))]
    produced = [o.name for _, part in parts for o in part.outputs if o.name in spec.output_names]
    if sorted(produced) != sorted(spec.output_names):
        raise HimapError(f"{spec.name}: its chunks produce {sorted(produced)}, the segment {sorted(spec.output_names)}")
    return [(m.SerializeToString(), part) for m, part in parts]
