"""A loaded checkpoint: the model, its processor and where they came from (a module of its own so
that ``loading`` and the built-in models, which both return one, import it without each other)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from himap_trt.arch import architecture_for
from himap_trt.dims import ModelDims


@dataclass
class LoadedModel:
    """A loaded checkpoint.

    Attributes:
        model: the ``LlavaForConditionalGeneration``, in eval mode, on ``device`` in ``dtype``.
        processor: its ``LlavaProcessor`` (tokenizer + image processor + chat template).
        source: the ``--model`` value it was loaded from (hub id, directory or built-in name).
        path: the directory or hub id actually loaded.
        weights: None when every weight is in ``model``; a
            :class:`himap_trt.models.streaming.StreamedWeights` when the decoder layers stay in the
            checkpoint files (``load_streamed``: the bounded-memory export).
    """

    model: Any
    processor: Any
    source: str
    path: str
    weights: Any = None

    @property
    def dims(self) -> ModelDims:
        """The model's :class:`ModelDims` (|V|'s bound from the processor where |V| varies)."""
        arch = architecture_for(self.model.config)
        dims = arch.dims(self.model.config)
        bound = arch.max_image_tokens(self.processor)
        return arch.with_max_image_tokens(dims, bound) if bound else dims
