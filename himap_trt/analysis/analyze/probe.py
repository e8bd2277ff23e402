"""An attention function that lets the analysis read and edit every decoder layer's attention.

It is transformers' eager attention (``softmax(Q K^T * scale + mask)`` in float32, then ``A V``),
registered under :data:`IMPLEMENTATION` in transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` (the public extension points for attention implementations), with two
calls into the :class:`Probe` active in the current context:

- ``edit_scores(layer, scores)``: the pre-softmax scores [B,H,S,S] float32 (mask added), e.g. to
  mask keys of tokens a method has pruned;
- ``edit_probs(layer, probs, value)``: the probabilities [B,H,S,S] (after softmax, cast to the
  model dtype) and the value vectors after GQA repetition [B,H,S,Dh]; returns the probabilities
  actually multiplied with the values (edited, or the same tensor, which the probe may keep for
  gradients: ``torch.autograd.grad(loss, probs)`` is Eq. 1's ``∂L/∂A``).

Without an active probe it computes exactly transformers' eager attention. Only the language
model switches to this implementation, and only inside :func:`probing`.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any

import torch
from transformers.models.llama.modeling_llama import repeat_kv

IMPLEMENTATION = "himap_trt_probe"


class Probe:
    """Base probe: leaves attention unchanged. Subclasses override what they need."""

    def edit_scores(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        """Pre-softmax scores of ``layer``: [B,H,S,S] float32, causal/padding mask added."""
        return scores

    def edit_probs(self, layer: int, probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Probabilities of ``layer`` [B,H,S,S] and values after GQA repetition [B,H,S,Dh]."""
        return probs


_ACTIVE: ContextVar[Probe | None] = ContextVar("himap_trt_probe", default=None)


def probed_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' eager attention with the active probe's edits (see the module docstring).

    Args:
        module: the attention module (its ``layer_idx`` and ``num_key_value_groups`` are used).
        query: [B,H,S,Dh]. key, value: [B,Hkv,S,Dh]. attention_mask: [B,1,S,S] additive or None.

    Returns:
        (attention output [B,S,H,Dh], probabilities [B,H,S,S]).
    """
    probe = _ACTIVE.get()
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    layer = getattr(module, "layer_idx", None)
    if probe is not None and layer is not None:
        scores = probe.edit_scores(layer, scores.float())
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if probe is not None and layer is not None:
        probs = probe.edit_probs(layer, probs, value_states)
    output = torch.matmul(probs, value_states).transpose(1, 2).contiguous()
    return output, probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(IMPLEMENTATION, probed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


@contextlib.contextmanager
def probing(model: Any, probe: Probe | None):
    """Run the language model of a ``LlavaForConditionalGeneration`` with ``probe`` active.

    The language model's attention implementation is switched to :data:`IMPLEMENTATION` for the
    duration and restored afterwards (the vision tower is left alone).
    """
    _register()
    config = model.model.language_model.config
    previous = config._attn_implementation
    config._attn_implementation = IMPLEMENTATION
    token = _ACTIVE.set(probe)
    try:
        yield probe
    finally:
        _ACTIVE.reset(token)
        config._attn_implementation = previous
