"""``himap-trt analyze``: the papers' diagnostics on the PyTorch model, and a recommended plan.

- :mod:`~himap_trt.analysis.analyze.probe`: an eager attention function that exposes and edits every
  decoder layer's probabilities;
- :mod:`~himap_trt.analysis.analyze.measure`: one request's diagnostics (attention mass, Eq. 1 saliency,
  S_vv / S_vt, disruptions, VisiPruner's reference triggers);
- :mod:`~himap_trt.analysis.analyze.report`: averages, D_l, recommended plans, ``analysis.json``, plots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from himap_trt.analysis.analyze.measure import RequestAnalysis, RequestInputs, analyze_request
from himap_trt.graphs.modules import TokenEmbedding, VisionEncoder
from himap_trt.prompt import prepare_batch


@dataclass(frozen=True)
class Request:
    """One analysis request: an image (PIL), a question, optionally the expected answer text."""

    image: Any
    question: str
    answer: str | None = None


def prepare_inputs(loaded: Any, request: Request, modules: tuple[Any, Any] | None = None) -> RequestInputs:
    """Embed one prompt (image features merged) for the language model, batch 1, no padding.

    Args:
        loaded: a :class:`himap_trt.models.LoadedModel`.
        request: the request.
        modules: (VisionEncoder, TokenEmbedding) to reuse; built from ``loaded`` if None.

    Raises:
        HimapError: empty question or an unexpected image-token count.
    """
    model = loaded.model
    dims = loaded.dims
    vision, embed = modules or (VisionEncoder(model).eval(), TokenEmbedding(model).eval())
    batch = prepare_batch(loaded.processor, [request.image], [request.question], dims.image_token_id,
                          dims.num_image_tokens)
    device = model.device
    ids = batch.input_ids.to(device)
    with torch.no_grad():
        features = vision(batch.pixel_values.to(device, model.dtype))[0]
        embeds = embed(ids)[0]
        embeds = embeds.masked_scatter((ids == dims.image_token_id)[..., None], features.to(embeds.dtype))
    inputs = RequestInputs(embeds=embeds, position_ids=batch.position_ids.to(device), types=batch.token_type_ids[0].to(device))
    if request.answer:
        ids = loaded.processor.tokenizer(request.answer, add_special_tokens=False)["input_ids"]
        if ids:
            inputs.target, inputs.target_source = int(ids[0]), "answer"
    return inputs


def analyze_model(loaded: Any, requests: list[Request], *, tau: float = 0.2,
                  on_request: Callable[[int, RequestAnalysis], None] | None = None,
                  chunk: int = 8) -> list[RequestAnalysis]:
    """Run :func:`~himap_trt.analysis.analyze.measure.analyze_request` on every request, in order.

    Args:
        loaded: the model (any dtype/device; eager attention is used inside the analysis).
        requests: the requests.
        tau: VisiPruner's score threshold (the reference's critical set and the static kept counts).
        on_request: called after each request with its index and result (progress).
        chunk: prompt copies per batched disruption forward.
    """
    modules = (VisionEncoder(loaded.model).eval(), TokenEmbedding(loaded.model).eval())
    results = []
    for i, request in enumerate(requests):
        inputs = prepare_inputs(loaded, request, modules)
        results.append(analyze_request(loaded.model, inputs, tau=tau, chunk=chunk))
        if on_request is not None:
            on_request(i, results[-1])
    return results


__all__ = ["Request", "RequestAnalysis", "analyze_model", "prepare_inputs"]
