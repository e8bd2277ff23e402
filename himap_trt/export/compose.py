"""Decoder-segment graphs composed from one exported layer template.

Every Llama decoder layer has the same structure, so instead of tracing a segment's N layers
(about 2.4 s of ``torch.export`` + decompositions per layer), the export traces three pieces
once per model and stamps them::

    prelude:  hidden_states, position_ids, attention_mask ──► cos, sin, bias
    layer:    hidden_states, cos, sin, bias, past_key, past_value, <weights...>
                  ──► hidden_out, present_key, present_value, query
    head:     hidden_states ──► logits                          (final segment only)

    segment [a, b) = prelude ─► layer(a, weights of a) ─► ... ─► layer(b-1) ─► head | outputs

The layer template takes its weights as graph *inputs*; each stamped copy binds them to that
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

from himap_trt.graphs.modules import LayerTemplate, SegmentHead, SegmentPrelude
from himap_trt.graphs.spec import GraphSpec, TensorSpec, past_names, present_names, query_name
from himap_trt.export.onnx_export import export_program, save_model

_TENSOR_TYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16,
                 "int64": ir.DataType.INT64}


def _piece_specs(llava: torch.nn.Module, dtype: str, template: LayerTemplate) -> dict[str, GraphSpec]:
    config = llava.config.text_config
    d = config.hidden_size
    heads = config.num_attention_heads
    kv = config.num_key_value_heads or heads
    hd = getattr(config, "head_dim", None) or d // heads
    b, s, p, ps = "batch", "sequence", "past_sequence", "past_sequence + sequence"
    hidden = TensorSpec("hidden_states", dtype, (b, s, d))
    rope = (TensorSpec("cos", dtype, (b, s, hd)), TensorSpec("sin", dtype, (b, s, hd)),
            TensorSpec("bias", "float32", (b, 1, s, ps)))
    weights = tuple(TensorSpec(f"weight.{name}", dtype, tuple(param.shape))
                    for name, param in template.step.layer.named_parameters())
    return {
        "prelude": GraphSpec("prelude", "piece", (hidden, TensorSpec("position_ids", "int64", (b, s)),
                                                  TensorSpec("attention_mask", "int64", (b, ps))), rope),
        "layer": GraphSpec(
            "layer", "piece",
            (hidden, *rope, TensorSpec("past_key", dtype, (b, kv, p, hd)), TensorSpec("past_value", dtype, (b, kv, p, hd)),
             *weights),
            (TensorSpec("hidden_out", dtype, (b, s, d)), TensorSpec("present_key", dtype, (b, kv, ps, hd)),
             TensorSpec("present_value", dtype, (b, kv, ps, hd)), TensorSpec("query", dtype, (b, heads, s, hd))),
        ),
        "head": GraphSpec("head", "piece", (hidden,), (TensorSpec("logits", dtype, (b, config.vocab_size)),)),
    }


class SegmentComposer:
    """Exports the prelude / layer / head templates of a model once, then composes any segment.

    Args:
        llava: the ``LlavaForConditionalGeneration`` (eval mode, export dtype).
        dtype: spec dtype name of the graphs.
        opset: ONNX opset.
    """

    def __init__(self, llava: torch.nn.Module, dtype: str, opset: int):
        self.llava = llava
        self.dtype = dtype
        self.opset = opset
        lm = llava.model.language_model
        self.layer_template = LayerTemplate(lm.layers[0]).eval()
        self.specs = _piece_specs(llava, dtype, self.layer_template)
        self._models: dict[str, ir.Model] = {}

    def _piece(self, name: str) -> ir.Model:
        if name not in self._models:
            lm = self.llava.model.language_model
            module = {"prelude": lambda: SegmentPrelude(lm.rotary_emb), "layer": lambda: self.layer_template,
                      "head": lambda: SegmentHead(self.llava)}[name]()
            self._models[name] = export_program(module, self.specs[name], opset=self.opset,
                                                vocab_size=self.llava.config.text_config.vocab_size)
        return self._models[name]

    def compose(self, spec: GraphSpec) -> ir.Model:
        """The ``onnx_ir`` model of segment ``spec`` (I/O named and shaped as the spec declares)."""
        start, end = spec.layers
        final = spec.attrs["final"]
        inputs = {t.name: _value(t) for t in spec.inputs}
        graph = ir.Graph(list(inputs.values()), [], nodes=[], opset_imports=dict(self._piece("layer").opset_imports),
                         name=spec.name)
        rope = _stamp(graph, self._piece("prelude").graph, "prelude/", {
            "hidden_states": inputs["hidden_states"], "position_ids": inputs["position_ids"],
            "attention_mask": inputs["attention_mask"]})
        lm = self.llava.model.language_model
        hidden = inputs["hidden_states"]
        outputs: dict[str, ir.Value] = {}
        query = None
        for layer in range(start, end):
            bindings = {"hidden_states": hidden, "cos": rope["cos"], "sin": rope["sin"], "bias": rope["bias"],
                        "past_key": inputs[past_names(layer)[0]], "past_value": inputs[past_names(layer)[1]]}
            for name, param in lm.layers[layer].named_parameters():
                value = ir.Value(name=f"model.language_model.layers.{layer}.{name}",
                                 const_value=TorchTensor(param.detach(), name=f"model.language_model.layers.{layer}.{name}"),
                                 type=ir.TensorType(_TENSOR_TYPES[self.dtype]), shape=ir.Shape(tuple(param.shape)))
                graph.register_initializer(value)
                bindings[f"weight.{name}"] = value
            out = _stamp(graph, self._piece("layer").graph, f"layers.{layer}/", bindings)
            hidden, query = out["hidden_out"], out["query"]
            outputs[present_names(layer)[0]] = out["present_key"]
            outputs[present_names(layer)[1]] = out["present_value"]
        if final:
            outputs["logits"] = _stamp(graph, self._piece("head").graph, "head/", {"hidden_states": hidden})["logits"]
        else:
            outputs["last_hidden_state"] = hidden
            outputs[query_name(end - 1)] = query
        for tensor in spec.outputs:
            value = outputs[tensor.name]
            value.name = tensor.name
            graph.outputs.append(value)
        return ir.Model(graph, ir_version=self._piece("layer").ir_version, producer_name="himap-trt")

    def export(self, spec: GraphSpec, path: Path) -> Path:
        """Compose segment ``spec``, save it to ``path`` and check it (see :func:`save_model`)."""
        start, end = spec.layers
        lm = self.llava.model.language_model
        weight_bytes = sum(p.numel() * p.element_size() for layer in lm.layers[start:end] for p in layer.parameters())
        if spec.attrs["final"]:
            weight_bytes += sum(p.numel() * p.element_size() for p in SegmentHead(self.llava).parameters())
        return save_model(self.compose(spec), spec, path, weight_bytes)


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
