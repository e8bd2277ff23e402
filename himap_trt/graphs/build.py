"""The torch module of a graph declaration: :func:`build_module` picks the building block of
``graphs/modules.py``, ``graphs/visipruner.py`` or ``graphs/variable.py`` that implements a
:class:`~himap_trt.graphs.spec.GraphSpec` (the export traces it, the torch backend runs it)."""

from __future__ import annotations

from typing import Any

from torch import nn

from himap_trt.graphs.modules import DecoderSegment, StageScorer, TokenEmbedding, deepstack_layers
from himap_trt.graphs.spec import GraphSpec
from himap_trt.graphs.variable import VariableStageScorer
from himap_trt.graphs.visipruner import (DropImageTokens, ValueNormScorer, VariableDropImageTokens,
                                         VariableValueNormScorer)


def build_module(llava: nn.Module, spec: GraphSpec, arch: Any) -> nn.Module:
    """The torch module implementing ``spec`` on the parameters of ``llava`` (in eval mode).

    ``arch`` is the model's family (a :class:`himap_trt.arch.base.Architecture`): it builds the
    ``vision`` graph's module.

    Raises:
        ValueError: for an unknown graph kind.
    """
    if spec.kind == "vision":
        module = arch.vision_module(llava)
    elif spec.kind == "embed":
        module = TokenEmbedding(llava)
    elif spec.kind == "segment":
        start, end = spec.layers
        module = DecoderSegment(llava, start, end, final=spec.attrs["final"],
                                emit_query=not spec.attrs["final"], deepstack_layers=deepstack_layers(spec))
    elif spec.kind == "scoring" and spec.attrs["criterion"] in ("value_norm", "drop_all"):
        scaling = llava.model.language_model.layers[spec.layers[0]].self_attn.scaling
        if spec.attrs.get("variable"):     # per-request counts (Qwen families): shape inputs E, C'
            module = (VariableDropImageTokens() if spec.attrs["criterion"] == "drop_all" else
                      VariableValueNormScorer(spec.attrs["threshold"], scaling))
        else:
            module = (DropImageTokens(spec.attrs["entering"]) if spec.attrs["criterion"] == "drop_all" else
                      ValueNormScorer(spec.attrs["keep"], spec.attrs["entering"], spec.attrs["threshold"], scaling))
    elif spec.kind == "scoring" and spec.attrs.get("variable"):
        scaling = llava.model.language_model.layers[spec.layers[0]].self_attn.scaling
        module = VariableStageScorer(spec.attrs["criterion"], scaling, entering=spec.attrs["entering"],
                                     seed=spec.attrs.get("seed"), stage=spec.stage)
    elif spec.kind == "scoring":
        scaling = llava.model.language_model.layers[spec.layers[0]].self_attn.scaling
        module = StageScorer(spec.attrs["criterion"], spec.attrs["keep"], spec.attrs["entering"], scaling,
                             seed=spec.attrs.get("seed"), stage=spec.stage)
    else:
        raise ValueError(f"unknown graph kind {spec.kind!r}")
    return module.eval()
