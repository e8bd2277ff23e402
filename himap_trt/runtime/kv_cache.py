"""Per-segment KV caches.

Each decoder segment keeps its own cache: segment j's layers hold only the tokens segment j saw
(all prompt tokens for segment 0, the kept ones after each stage), plus every decoded token, so the
caches of one request have different lengths (METHODS.md, "Decoding with a KV cache").

Layout, per layer l of the segment: ``past_key_values.{l}.key`` / ``.value``
[batch, kv_heads, cache_length, head_dim] in the model dtype, and one padding mask
[batch, cache_length] int64 per segment (1 real token, 0 padding), which is the segment's
``attention_mask`` input minus the tokens being fed. A step replaces the tensors by the graph's
``present.{l}.*`` outputs (the graphs concatenate past and new keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from himap_trt.graphs.spec import GraphSpec, past_names, present_names

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int64": torch.int64}


def torch_dtype(name: str) -> torch.dtype:
    """Spec dtype name -> torch dtype."""
    return _TORCH_DTYPES[name]


@dataclass
class SegmentCache:
    """The KV cache of one decoder segment for one batch.

    Attributes:
        spec: the segment's graph declaration.
        tensors: ``past_key_values.{l}.key/value`` -> [batch, kv_heads, length, head_dim].
        attention_mask: [batch, length] int64.
    """

    spec: GraphSpec
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    attention_mask: torch.Tensor | None = None

    @classmethod
    def empty(cls, spec: GraphSpec, batch: int, device: torch.device) -> SegmentCache:
        """A cache of length 0 (what prefill feeds)."""
        tensors = {}
        for layer in range(*spec.layers):
            for name in past_names(layer):
                tensor_spec = spec.input(name)
                _, heads, _, head_dim = tensor_spec.shape
                tensors[name] = torch.empty((batch, heads, 0, head_dim), dtype=torch_dtype(tensor_spec.dtype),
                                            device=device)
        return cls(spec, tensors, torch.zeros((batch, 0), dtype=torch.int64, device=device))

    @property
    def length(self) -> int:
        """Tokens in the cache (padding included)."""
        return int(self.attention_mask.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held by the key/value tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def feeds(self, new_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The segment's cache inputs for a step feeding tokens whose padding mask is ``new_mask``
        [batch, sequence]: the past tensors and ``attention_mask`` = [cache mask, new_mask]."""
        return {**self.tensors, "attention_mask": torch.cat([self.attention_mask, new_mask], dim=1)}

    def update(self, outputs: dict[str, torch.Tensor], attention_mask: torch.Tensor) -> None:
        """Take the step's presents as the new cache; ``attention_mask`` is the mask that was fed."""
        for layer in range(*self.spec.layers):
            for past, present in zip(past_names(layer), present_names(layer)):
                self.tensors[past] = outputs[present]
        self.attention_mask = attention_mask
