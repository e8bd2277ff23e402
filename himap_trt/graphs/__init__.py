"""The graphs of the chain: their declarations (:mod:`.spec`) and PyTorch implementations
(:mod:`.modules`)."""

from himap_trt.graphs.spec import GraphSpec, TensorSpec, eval_dim, graph_specs

__all__ = ["GraphSpec", "TensorSpec", "eval_dim", "graph_specs"]
