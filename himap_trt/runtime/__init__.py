"""The runtime: backends (one per graph), per-segment KV caches, sampling and the pipeline."""

from __future__ import annotations

from typing import Any

from himap_trt.arch import get_architecture, plan_dims
from himap_trt.graphs.spec import graph_specs
from himap_trt.runtime.backend import Backend, TorchBackend, torch_backends
from himap_trt.runtime.pipeline import GenerationOutput, Pipeline, PrefillResult, StageOutput
from himap_trt.runtime.sampling import GenerationConfig

__all__ = [
    "Backend",
    "GenerationConfig",
    "GenerationOutput",
    "Pipeline",
    "PrefillResult",
    "StageOutput",
    "TorchBackend",
    "generation_token_ids",
    "reference_pipeline",
    "torch_backends",
]

_DTYPE_NAMES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def generation_token_ids(generation_config: Any, tokenizer: Any) -> tuple[list[int], int]:
    """(EOS ids, pad id) from a model's generation config, falling back to its tokenizer."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    pad = getattr(generation_config, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    return eos_ids, int(pad)


def reference_pipeline(loaded: Any, plan: Any, *, max_seq_len: int | None = None) -> Pipeline:
    """The PyTorch reference: the pipeline driving the graphs' torch modules on the model's device
    and dtype (the ``torch`` backend).

    Args:
        loaded: a :class:`himap_trt.models.LoadedModel`.
        plan: a :class:`himap_trt.plan.PruningPlan` for that model.
        max_seq_len: optional limit on prompt + generated tokens.
    """
    dims = plan_dims(loaded.dims, plan)
    specs = graph_specs(dims, plan, _DTYPE_NAMES[str(loaded.model.dtype)], arch=get_architecture(dims.architecture))
    eos, pad = generation_token_ids(loaded.model.generation_config, loaded.processor.tokenizer)
    return Pipeline(specs, torch_backends(loaded.model, specs), loaded.processor, plan,
                    image_token_id=dims.image_token_id, device=loaded.model.device, eos_token_ids=eos,
                    pad_token_id=pad, max_seq_len=max_seq_len, architecture=dims.architecture)
