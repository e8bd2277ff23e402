"""Decoder-segment graphs composed from one exported layer template.

Every Llama decoder layer has the same structure, so instead of tracing a segment's N layers
(about 2.4 s of ``torch.export`` + decompositions per layer), the export traces four pieces
once per model and stamps them::

    prelude:   hidden_states, position_ids, attention_mask, cache_position
                   ──► cos, sin, bias, write_indices
    qkv:       hidden_states, cos, sin, <weights...> ──► query, key, value        (S new tokens)
    write:     past_key [B,Hkv,M,Dh], key [B,Hkv,S,Dh] ──► present_key [B,Hkv,M,Dh]   (built here,
               likewise values)                           ScatterND or TensorScatter, see below)
    attention: hidden_states, query, present_key, present_value, bias, <weights...> ──► hidden_out
    head:      hidden_states ──► logits                                        (final segment only)

    segment [a, b) = prelude ─► (qkv ─► write ─► attention)(a) ─► ... (b-1) ─► head | outputs

The cache write is the one node not traced: ``ScatterND(past, write_indices, new)`` (opset 11+,
every TensorRT 10.x parser), or with ``kv_write='tensorscatter'`` ONNX's opset-24
``TensorScatter(past, new, cache_position, axis=2)``, the form TensorRT 10.15+/11 lowers to its
in-place ``IKVCacheUpdateLayer``. Its output is the graph's ``present`` output and its data input
the graph's ``past`` input and nothing else reads that input, so a runtime that binds both to one
buffer (ONNX Runtime's I/O binding; TensorRT's aliased I/O) writes the S new tokens in place and
copies nothing (ONNX Runtime's CPU scatter kernels skip their input copy when input and output
share memory; measured in docs/ARCHITECTURE.md).

With ``kv_write='gqa'`` (ONNX Runtime only) the write and the attention of each layer are one
``com.microsoft.GroupQueryAttention`` node instead (past = present buffer, ``seqlens_k`` from
``cache_position``), which reads only each row's occupied prefix, followed by the traced ``output``
piece (o_proj, residual, MLP); see :meth:`SegmentComposer._gqa` and docs/ARCHITECTURE.md.

With ``kv_write='attention'`` (TensorRT's form, docs/ARCHITECTURE.md "The attention form") each
layer's write is ``TensorScatter`` (as ``tensorscatter``) into a cache whose length M is fixed at
export (:func:`himap_trt.graphs.spec.static_cache_specs`), and its attention one opset-24 ONNX
``Attention`` node over that cache: query [B,H,S,Dh] against key/value [B,Hkv,M,Dh] (grouped-query
heads by ``q_num_heads``/``kv_num_heads``, no ``repeat_kv``), a boolean mask [B,1,S,M] (causal and
padding, from the prelude's bias) and ``nonpad_kv_seqlen`` = cache_position + S (each row reads its
occupied prefix only); then the traced ``output`` piece. See :meth:`SegmentComposer._attention`.

The templates take their weights as graph *inputs*; each stamped copy binds them to that
layer's parameters as initializers named like the checkpoint
(``model.language_model.layers.{l}.self_attn.q_proj.weight``). The composed graph computes exactly
what :class:`himap_trt.graphs.modules.DecoderSegment` computes (the same functions are traced);
the export's validation step checks it numerically against PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor

from himap_trt.arch import architecture_for
from himap_trt.graphs.modules import LayerTemplate, SegmentHead, SegmentPrelude
from himap_trt.graphs.spec import GraphSpec, TensorSpec, deepstack_name, past_names, present_names, query_name
from himap_trt.manifest import ATTENTION_OPSET, KV_WRITES  # how segment graphs write their caches
from himap_trt.export.onnx_export import export_program, save_model
from himap_trt.export.quantize import Quantization, quantize_model

_TENSOR_TYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16,
                 "int64": ir.DataType.INT64}


#: ONNX opset that introduced TensorScatter.
TENSORSCATTER_OPSET = 24


def _piece_specs(llava: torch.nn.Module, dtype: str, qkv: LayerTemplate, attention: LayerTemplate,
                 output: LayerTemplate) -> dict[str, GraphSpec]:
    config = llava.config.text_config
    d = config.hidden_size
    heads = config.num_attention_heads
    kv = config.num_key_value_heads or heads
    hd = getattr(config, "head_dim", None) or d // heads
    b, s, m = "batch", "sequence", "cache_sequence"
    positions = architecture_for(llava.config).position_shape()      # [B,S], or [3,B,S] (M-RoPE)
    hidden = TensorSpec("hidden_states", dtype, (b, s, d))
    cos_sin = (TensorSpec("cos", dtype, (b, s, hd)), TensorSpec("sin", dtype, (b, s, hd)))
    bias = TensorSpec("bias", "float32", (b, 1, s, m))
    query = TensorSpec("query", dtype, (b, heads, s, hd))

    def weights(template: LayerTemplate):
        return tuple(TensorSpec(f"weight.{name}", dtype, tuple(param.shape))
                     for name, param in template.used_parameters(template.step.layer))

    return {
        "prelude": GraphSpec("prelude", "piece", (hidden, TensorSpec("position_ids", "int64", positions),
                                                  TensorSpec("attention_mask", "int64", (b, m)),
                                                  TensorSpec("cache_position", "int64", (b,))),
                             (*cos_sin, bias, TensorSpec("write_indices", "int64", (b, kv, s, 3)))),
        "qkv": GraphSpec("qkv", "piece", (hidden, *cos_sin, *weights(qkv)),
                         (query, TensorSpec("key", dtype, (b, kv, s, hd)), TensorSpec("value", dtype, (b, kv, s, hd)))),
        "attention": GraphSpec(
            "attention", "piece",
            (hidden, query, TensorSpec("key", dtype, (b, kv, m, hd)), TensorSpec("value", dtype, (b, kv, m, hd)), bias,
             *weights(attention)),
            (TensorSpec("hidden_out", dtype, (b, s, d)),)),
        "head": GraphSpec("head", "piece", (hidden,), (TensorSpec("logits", dtype, (b, config.vocab_size)),)),
        "output": GraphSpec("output", "piece", (hidden, TensorSpec("attention", dtype, (b, s, heads * hd)),
                                                *weights(output)),
                            (TensorSpec("hidden_out", dtype, (b, s, d)),)),
    }


class SegmentComposer:
    """Exports the prelude / qkv / attention / head templates of a model once, then composes any segment.

    Args:
        llava: the ``LlavaForConditionalGeneration`` (eval mode, export dtype).
        dtype: spec dtype name of the graphs.
        opset: ONNX opset of the traced pieces.
        kv_write: ``scatternd``, ``tensorscatter``, ``gqa`` or ``attention`` (:data:`KV_WRITES`;
            ``tensorscatter`` and ``attention`` raise the segment graphs' opset to 24, ``gqa`` adds the
            ``com.microsoft`` domain; ``attention`` needs specs with static caches,
            :func:`himap_trt.graphs.spec.static_cache_specs`).
        initializer: ``(state_dict name, parameter) -> onnx_ir tensor`` for a layer weight; default:
            the parameter's memory. A streamed export passes
            :meth:`himap_trt.models.streaming.StreamedWeights.initializer` (read from the checkpoint
            file when the graph is written; the parameters are then ``meta``).
        quantization: quantize the linear layers' weights of every composed segment
            (:mod:`himap_trt.export.quantize`; ``export --quantize``), or None.
    """

    def __init__(self, llava: torch.nn.Module, dtype: str, opset: int, kv_write: str = "scatternd",
                 initializer=None, quantization: Quantization | None = None):
        if kv_write not in KV_WRITES:
            raise ValueError(f"kv_write must be one of {KV_WRITES}, got {kv_write!r}")
        self.llava = llava
        self.dtype = dtype
        self.opset = opset
        self.kv_write = kv_write
        self.quantization = quantization
        lm = llava.model.language_model
        self.templates = {part: LayerTemplate(lm.layers[0], part).eval() for part in ("qkv", "attention", "output")}
        self.specs = _piece_specs(llava, dtype, self.templates["qkv"], self.templates["attention"],
                                  self.templates["output"])
        self._models: dict[str, ir.Model] = {}
        self._initializer = initializer or (lambda name, param: TorchTensor(param.detach(), name=name))

    def trace_pieces(self) -> None:
        """Trace the five pieces now (otherwise on first use); a streamed export calls this while
        layer 0's weights are materialised, since the templates are built on it."""
        for name in ("prelude", "qkv", "attention", "output", "head"):
            self._piece(name)

    def _piece(self, name: str) -> ir.Model:
        if name not in self._models:
            lm = self.llava.model.language_model
            kv = self.specs["prelude"].outputs[3].shape[1]
            module = {"prelude": lambda: SegmentPrelude(lm.rotary_emb, kv),
                      "qkv": lambda: self.templates["qkv"], "attention": lambda: self.templates["attention"],
                      "output": lambda: self.templates["output"], "head": lambda: SegmentHead(self.llava)}[name]()
            self._models[name] = export_program(module, self.specs[name], opset=self.opset,
                                                vocab_size=self.llava.config.text_config.vocab_size)
        return self._models[name]

    def _weights(self, graph: ir.Graph, layer: int, part: str) -> dict[str, ir.Value]:
        lm = self.llava.model.language_model
        template = self.templates[part]
        bindings = {}
        for name, param in template.used_parameters(lm.layers[layer]):
            full = f"model.language_model.layers.{layer}.{name}"
            value = ir.Value(name=full, const_value=self._initializer(full, param),
                             type=ir.TensorType(_TENSOR_TYPES[self.dtype]), shape=ir.Shape(tuple(param.shape)))
            graph.register_initializer(value)
            bindings[f"weight.{name}"] = value
        return bindings

    def _write(self, graph: ir.Graph, past: ir.Value, new: ir.Value, rope: dict[str, ir.Value],
               cache_position: ir.Value, name: str) -> ir.Value:
        """The in-place cache write: past [B,Hkv,M,Dh] with new [B,Hkv,S,Dh] at cache_position[b] + s."""
        if self.kv_write in ("tensorscatter", "attention"):
            node = ir.Node("", "TensorScatter", [past, new, cache_position], attributes=[ir.AttrInt64("axis", 2)],
                           name=name, version=TENSORSCATTER_OPSET)
        else:
            node = ir.Node("", "ScatterND", [past, rope["write_indices"], new], name=name)
        node.outputs[0].name = f"{name}/out"
        node.outputs[0].type = past.type
        node.outputs[0].shape = past.shape
        graph.append(node)
        return node.outputs[0]

    def _attention_inputs(self, graph: ir.Graph, rope: dict[str, ir.Value], inputs: dict[str, ir.Value]
                          ) -> dict[str, ir.Value]:
        """What every Attention node of a segment shares (``kv_write='attention'``).

        ``nonpad_kv_seqlen`` [B] int64 = cache_position + S: keys 0..cache_position[b] + S - 1 hold row
        b's tokens (a slot's cache is dense from position 0; the prompt at prefill written at 0..S-1).
        ``mask`` [B,1,S,M] bool: True where the prelude's bias is 0 (key visible: causal and not
        padding), or where the key is the query's own position: a left-padded prompt's padding queries
        then see themselves instead of nothing (a fully masked row is NaN in a kernel that masks with
        -inf; their outputs are unspecified either way: no real position reads them).
        """
        import numpy as np

        node, const = _graph_builders(graph, "attention")

        seq = node("Shape", [inputs["hidden_states"]], "seq", start=1, end=2)                       # [1]
        nonpad = node("Add", [inputs["cache_position"], seq], "nonpad_kv_seqlen")                    # [B]
        cache = node("Shape", [inputs["attention_mask"]], "cache", start=1, end=2)                   # [1] = M
        zero, one = const("zero", np.array(0, np.int64)), const("one", np.array(1, np.int64))
        scalar = const("scalar", np.array([], np.int64))
        keys = node("Range", [zero, node("Reshape", [cache, scalar], "cache_scalar"), one], "keys")     # [M]
        steps = node("Range", [zero, node("Reshape", [seq, scalar], "seq_scalar"), one], "steps")      # [S]
        queries = node("Add", [node("Unsqueeze", [inputs["cache_position"], const("axis1", np.array([1], np.int64))],
                                    "start"), steps], "queries")                                      # [B,S]
        own = node("Equal", [node("Unsqueeze", [queries, const("axes13", np.array([1, 3], np.int64))], "queries4"),
                             keys], "own")                                                            # [B,1,S,M]
        visible = node("Equal", [rope["bias"], const("zero_bias", np.array(0.0, np.float32))], "visible")
        return {"nonpad_kv_seqlen": nonpad, "mask": node("Or", [visible, own], "mask")}

    def _attention(self, graph: ir.Graph, layer: int, query: ir.Value, present_key: ir.Value,
                   present_value: ir.Value, shared: dict[str, ir.Value]) -> ir.Value:
        """One opset-24 ``Attention`` node: query [B,H,S,Dh] over the written cache [B,Hkv,M,Dh] with
        the shared mask and ``nonpad_kv_seqlen`` (softmax in the kernel's precision: TensorRT's parser
        rejects ``softmax_precision``); returns the
        heads concatenated, [B,S,H*Dh] (the ``output`` piece's input)."""
        import numpy as np

        attn = self.llava.model.language_model.layers[layer].self_attn
        config = self.llava.config.text_config
        heads = config.num_attention_heads
        kv = config.num_key_value_heads or heads
        prefix = f"layers.{layer}/attention"
        node = ir.Node("", "Attention", [query, present_key, present_value, shared["mask"], None, None,
                                         shared["nonpad_kv_seqlen"]],
                       attributes=[ir.AttrInt64("q_num_heads", heads), ir.AttrInt64("kv_num_heads", kv),
                                   ir.AttrFloat32("scale", float(attn.scaling))],
                       # no softmax_precision: TensorRT-RTX 1.7.1's parser rejects it ("Setting softmax
                       # precision is not supported in TensorRT Attention")
                       name=prefix, version=ATTENTION_OPSET)
        node.outputs[0].name = f"{prefix}/out"
        graph.append(node)
        flat = graph.initializers.get("attention/flat_shape")
        if flat is None:
            flat = ir.Value(name="attention/flat_shape",
                            const_value=ir.tensor(np.array([0, 0, -1], np.int64), name="attention/flat_shape"))
            graph.register_initializer(flat)
        t = ir.Node("", "Transpose", [node.outputs[0]], attributes=[ir.AttrInt64s("perm", [0, 2, 1, 3])],
                    name=f"{prefix}/bshd")
        t.outputs[0].name = f"{prefix}/bshd/out"
        graph.append(t)
        r = ir.Node("", "Reshape", [t.outputs[0], flat], name=f"{prefix}/bsh")
        r.outputs[0].name = f"{prefix}/bsh/out"
        graph.append(r)
        return r.outputs[0]

    def _gqa_inputs(self, graph: ir.Graph, rope: dict[str, ir.Value], inputs: dict[str, ir.Value]) -> dict[str, ir.Value]:
        """What every GroupQueryAttention node of a segment shares (``kv_write='gqa'``).

        ``seqlens_k`` [B] int32 = cache_position + S - 1 (the index of each row's last key: the row
        attends over keys 0..seqlens_k[b], its S new keys written at cache_position[b]);
        ``total_sequence_length`` scalar int32 T = max over rows of cache_position + S; ``bias``
        [B,1,S,T] in the model dtype: the prelude's causal + padding bias cut to the T columns
        GroupQueryAttention reads (left-padded prompts need it; at decode it masks nothing a row
        reads except a free slot's dummy position).
        """
        node, const = _graph_builders(graph, "gqa")

        import numpy as np

        seq = node("Shape", [inputs["hidden_states"]], "seq", start=1, end=2)                      # [1] int64
        ends = node("Add", [inputs["cache_position"], seq], "ends")                                  # [B]
        seqlens = node("Cast", [node("Sub", [ends, const("one", np.array([1], np.int64))], "last")], "seqlens_k",
                       to=ir.DataType.INT32)
        total64 = node("ReduceMax", [ends], "total64", keepdims=0)                                   # scalar
        total = node("Cast", [total64], "total_sequence_length", to=ir.DataType.INT32)
        bias = node("Slice", [rope["bias"], const("zero", np.array([0], np.int64)),
                              node("Unsqueeze", [total64, const("axis0", np.array([0], np.int64))], "total_1d"),
                              const("axis3", np.array([3], np.int64))], "bias")
        if self.dtype != "float32":
            # float32's most negative value is -inf in float16: clamp to the dtype's own (finite) minimum
            finite = np.finfo(np.float16).min
            bias = node("Max", [node("Cast", [bias], "bias_cast", to=_TENSOR_TYPES[self.dtype]),
                                const("min", np.array(finite, np.float16))], "bias_min")
        return {"seqlens_k": seqlens, "total_sequence_length": total, "bias": bias}

    def _gqa(self, graph: ir.Graph, layer: int, new: dict[str, ir.Value], past_key: ir.Value, past_value: ir.Value,
             shared: dict[str, ir.Value]) -> tuple[ir.Value, ir.Value, ir.Value]:
        """One ``com.microsoft.GroupQueryAttention`` node: writes the S new keys/values into the cache
        buffers at each row's position (in place when present and past share a buffer) and attends
        over each row's keys 0..seqlens_k[b] only. Returns (attention [B,S,H*Dh], present_key, present_value)."""
        import numpy as np

        attn = self.llava.model.language_model.layers[layer].self_attn
        config = self.llava.config.text_config
        heads = config.num_attention_heads
        kv = config.num_key_value_heads or heads
        prefix = f"layers.{layer}/gqa"
        flat = graph.initializers.get("gqa/flat_shape")
        if flat is None:
            flat = ir.Value(name="gqa/flat_shape", const_value=ir.tensor(np.array([0, 0, -1], np.int64),
                                                                          name="gqa/flat_shape"))
            graph.register_initializer(flat)

        def bsh(value: ir.Value, name: str) -> ir.Value:                 # [B,N,S,Dh] -> [B,S,N*Dh]
            t = ir.Node("", "Transpose", [value], attributes=[ir.AttrInt64s("perm", [0, 2, 1, 3])],
                        name=f"{prefix}/{name}_bsnh")
            t.outputs[0].name = f"{prefix}/{name}_bsnh/out"
            graph.append(t)
            r = ir.Node("", "Reshape", [t.outputs[0], flat], name=f"{prefix}/{name}_bsh")
            r.outputs[0].name = f"{prefix}/{name}_bsh/out"
            graph.append(r)
            return r.outputs[0]

        node = ir.Node("com.microsoft", "GroupQueryAttention",
                       [bsh(new["query"], "query"), bsh(new["key"], "key"), bsh(new["value"], "value"), past_key,
                        past_value, shared["seqlens_k"], shared["total_sequence_length"], None, None, None,
                        shared["bias"]],
                       attributes=[ir.AttrInt64("num_heads", heads), ir.AttrInt64("kv_num_heads", kv),
                                   ir.AttrFloat32("scale", float(attn.scaling))],
                       name=prefix, num_outputs=3, version=1)
        for value, suffix in zip(node.outputs, ("attention", "present_key", "present_value")):
            value.name = f"{prefix}/{suffix}"
        node.outputs[1].type, node.outputs[1].shape = past_key.type, past_key.shape
        node.outputs[2].type, node.outputs[2].shape = past_value.type, past_value.shape
        graph.append(node)
        return node.outputs[0], node.outputs[1], node.outputs[2]

    def compose(self, spec: GraphSpec) -> ir.Model:
        """The ``onnx_ir`` model of segment ``spec`` (I/O named and shaped as the spec declares)."""
        start, end = spec.layers
        final = spec.attrs["final"]
        inputs = {t.name: _value(t) for t in spec.inputs}
        opsets = dict(self._piece("qkv").opset_imports)
        if self.kv_write in ("tensorscatter", "attention"):
            opsets[""] = max(opsets.get("", self.opset), TENSORSCATTER_OPSET, ATTENTION_OPSET)
        if self.kv_write == "gqa":
            opsets["com.microsoft"] = 1
        graph = ir.Graph(list(inputs.values()), [], nodes=[], opset_imports=opsets, name=spec.name)
        rope = _stamp(graph, self._piece("prelude").graph, "prelude/", {
            name: inputs[name] for name in ("hidden_states", "position_ids", "attention_mask", "cache_position")})
        shared = self._gqa_inputs(graph, rope, inputs) if self.kv_write == "gqa" else \
            self._attention_inputs(graph, rope, inputs) if self.kv_write == "attention" else {}
        hidden = inputs["hidden_states"]
        outputs: dict[str, ir.Value] = {}
        query = None
        for layer in range(start, end):
            new = _stamp(graph, self._piece("qkv").graph, f"layers.{layer}/qkv/",
                         {"hidden_states": hidden, "cos": rope["cos"], "sin": rope["sin"],
                          **self._weights(graph, layer, "qkv")})
            query = new["query"]
            past_key, past_value = past_names(layer)
            if self.kv_write == "gqa":
                attention, present_key, present_value = self._gqa(graph, layer, new, inputs[past_key],
                                                                  inputs[past_value], shared)
                hidden = _stamp(graph, self._piece("output").graph, f"layers.{layer}/output/",
                                {"hidden_states": hidden, "attention": attention,
                                 **self._weights(graph, layer, "output")})["hidden_out"]
                outputs[present_names(layer)[0]] = present_key
                outputs[present_names(layer)[1]] = present_value
                hidden = _deepstack(graph, hidden, inputs, layer)
                continue
            present_key = self._write(graph, inputs[past_key], new["key"], rope, inputs["cache_position"],
                                      f"layers.{layer}/write_key")
            present_value = self._write(graph, inputs[past_value], new["value"], rope, inputs["cache_position"],
                                        f"layers.{layer}/write_value")
            if self.kv_write == "attention":
                attention = self._attention(graph, layer, query, present_key, present_value, shared)
                hidden = _stamp(graph, self._piece("output").graph, f"layers.{layer}/output/",
                                {"hidden_states": hidden, "attention": attention,
                                 **self._weights(graph, layer, "output")})["hidden_out"]
                outputs[present_names(layer)[0]] = present_key
                outputs[present_names(layer)[1]] = present_value
                hidden = _deepstack(graph, hidden, inputs, layer)
                continue
            hidden = _stamp(graph, self._piece("attention").graph, f"layers.{layer}/attention/",
                            {"hidden_states": hidden, "query": query, "key": present_key, "value": present_value,
                             "bias": rope["bias"], **self._weights(graph, layer, "attention")})["hidden_out"]
            outputs[present_names(layer)[0]] = present_key
            outputs[present_names(layer)[1]] = present_value
            hidden = _deepstack(graph, hidden, inputs, layer)
        if final:
            outputs["logits"] = _stamp(graph, self._piece("head").graph, "head/", {"hidden_states": hidden})["logits"]
        else:
            outputs["last_hidden_state"] = hidden
            outputs[query_name(end - 1)] = query
        for tensor in spec.outputs:
            value = outputs[tensor.name]
            value.name = tensor.name
            graph.outputs.append(value)
        ir_version = self._piece("qkv").ir_version
        if self.kv_write in ("tensorscatter", "attention"):
            ir_version = max(ir_version, 11)     # opset 24 needs IR version 11
        return ir.Model(graph, ir_version=ir_version, producer_name="himap-trt")

    def export(self, spec: GraphSpec, path: Path) -> Path:
        """Compose segment ``spec`` (quantized with ``quantization``), save it to ``path`` and check it
        (see :func:`save_model`)."""
        start, end = spec.layers
        lm = self.llava.model.language_model
        weight_bytes = sum(p.numel() * p.element_size() for layer in lm.layers[start:end] for p in layer.parameters())
        if spec.attrs["final"]:
            weight_bytes += sum(p.numel() * p.element_size() for p in SegmentHead(self.llava).parameters())
        model = self.compose(spec)
        if self.quantization is not None:
            model = quantize_model(model, self.quantization)
        return save_model(model, spec, path, weight_bytes)

def _graph_builders(graph: ir.Graph, prefix: str):
    """``(node, const)`` appending to ``graph``: ``node(op, args, name, **int_attrs)`` adds one node named
    ``{prefix}/{name}`` (output ``{prefix}/{name}/out``) and returns its output; ``const(name, array)``
    registers an initializer ``{prefix}/{name}``. Shared by the gqa and attention preludes."""
    def node(op: str, args: list, name: str, **attrs) -> ir.Value:
        attributes = [ir.AttrInt64s(k, v) if isinstance(v, list) else ir.AttrInt64(k, v) for k, v in attrs.items()]
        n = ir.Node("", op, args, attributes=attributes, name=f"{prefix}/{name}")
        n.outputs[0].name = f"{prefix}/{name}/out"
        graph.append(n)
        return n.outputs[0]

    def const(name: str, array) -> ir.Value:
        value = ir.Value(name=f"{prefix}/{name}", const_value=ir.tensor(array, name=f"{prefix}/{name}"))
        graph.register_initializer(value)
        return value

    return node, const


def _deepstack(graph: ir.Graph, hidden: ir.Value, inputs: dict[str, ir.Value], layer: int) -> ir.Value:
    """``hidden + deepstack.{layer}`` where the segment takes that input (Qwen3-VL's DeepStack,
    :class:`~himap_trt.graphs.modules.DecoderSegment`), else ``hidden``."""
    feature = inputs.get(deepstack_name(layer))
    if feature is None:
        return hidden
    node = ir.Node("", "Add", [hidden, feature], name=f"layers.{layer}/deepstack")
    node.outputs[0].name = f"layers.{layer}/deepstack/out"
    node.outputs[0].type = feature.type
    graph.append(node)
    return node.outputs[0]


def _value(tensor: TensorSpec) -> ir.Value:
    shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in tensor.shape])
    return ir.Value(name=tensor.name, type=ir.TensorType(_TENSOR_TYPES[tensor.dtype]), shape=shape)


def _stamp(target: ir.Graph, template: ir.Graph, prefix: str, bindings: dict[str, ir.Value]) -> dict[str, ir.Value]:
    """Copy ``template``'s nodes into ``target``, its inputs bound to ``bindings`` (by input name).

    Node outputs and constant initializers get ``prefix`` on their names (unique per copy); the
    template's symbolic intermediate shapes are dropped (their dim names are the exporter's and
    would clash between copies). Returns the copies of the template's outputs by name.
    """
    clone = template.clone()
    for value in clone.inputs:
        ir.convenience.replace_all_uses_with(value, bindings[value.name])
    results = {value.name: value for value in clone.outputs}
    clone.outputs.clear()
    used: set[str] = set()

    def unique(name: str) -> str:
        # The exporter may give two values one name before it serialises (e.g. a Cos output and
        # the Cast of it that is the graph output "cos"); ONNX needs SSA names.
        candidate, n = prefix + name, 0
        while candidate in used:
            n += 1
            candidate = f"{prefix}{name}.{n}"
        used.add(candidate)
        return candidate

    for name in list(clone.initializers):
        value = clone.initializers.pop(name)
        value.name = unique(name)
        target.register_initializer(value)
    for node in list(clone):
        clone.remove(node, safe=False)
        node.name = prefix + (node.name or node.op_type)
        for value in node.outputs:
            value.name = unique(value.name or "out")
            value.shape = None
        target.append(node)
    return results
