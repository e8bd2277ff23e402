"""VisiPruner's two scoring graphs (METHODS.md, "The project's static form").

Middle stage at K_M (``value_norm``)::

    query.{K_M-1} [B,H,S,Dh] ──► last row ──► softmax(q K^T * scale + padding bias), float32 ──► A [B,H,S]
    present.{K_M-1}.key/value [B,Hkv,S,Dh] ──┘                                                  │
    s(v) = sqrt(Σ_h A_h[v]² · ||V_h[v]||²)  [B,S]  ◄────────────────────────────────────────────┘
    rank image tokens (score desc, then lower index); keep the best C as slots, ascending;
    slot is real iff s(v) > tau (else attention_mask 0: a masked slot)

Deep stage at K_E (``drop_all``): every image slot (real or masked) is dropped.

Both output the same five tensors as :class:`himap_trt.graphs.modules.StageScorer`, with a
constant number of dropped positions (|V| - C, then C), so the output length is a shape
expression of the input length. A masked slot's key is never attended (attention mask 0), so it
changes no real token's output; its own hidden state is computed and ignored.

Per-request image-token counts (Qwen2.5-VL, Qwen3-VL; the batch layout of
:mod:`himap_trt.graphs.variable`): :class:`VariableValueNormScorer` and
:class:`VariableDropImageTokens` take the shape inputs ``image_slots`` [E] and ``kept_slots`` [C']
of the ratio stages' variable graph. E image slots enter (row b's first ``E - |V|_b`` masked); the
middle stage keeps C' = max_b min(C, |V|_b) slots per row (ranked by score, real tokens first), of
which row b uses those of rank < ``keep_counts[b]`` = min(C, |V|_b) whose score exceeds tau and
that are not masked slots (a masked slot never passes the threshold test); the deep stage drops
every image slot of every row (``sequence - image_slots``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv

from himap_trt.graphs.modules import kept_indices
from himap_trt.graphs.variable import variable_kept
from himap_trt.prompt import TOKEN_IMAGE

_MASKED = torch.finfo(torch.float32).min


def value_norm_scores(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """VisiPruner's score of every position: the L2 norm of its value contribution to the last
    prompt token's attention output, heads concatenated, before W_o (METHODS.md ``s_l(v)``).

    ``s(v) = || concat_h A_h[last, v] · V_h[v] || = sqrt(Σ_h A_h[last, v]² · ||V_h[v]||²)``, with
    ``A_h[last] = softmax(q_h[last] K_h^T · scaling + padding bias)`` over all keys. float32
    whatever the input dtype. The last position is the last real prompt token (left padding).

    Args:
        query: [B,H,S,Dh] query states of layer K_M-1 after RoPE.
        key, value: [B,Hkv,S,Dh] that layer's keys (after RoPE) and values.
        attention_mask: [B,S] int64 padding mask.
        scaling: 1/sqrt(Dh).

    Returns:
        [B,S] float32 scores (>= 0).
    """
    groups = query.shape[1] // key.shape[1]
    last = query[:, :, -1:].float()                                              # [B,H,1,Dh]
    scores = torch.matmul(last, repeat_kv(key.float(), groups).transpose(2, 3)) * scaling   # [B,H,1,S]
    bias = torch.where(attention_mask.bool(), 0.0, _MASKED)[:, None, None, :]   # the last row sees every key
    probs = torch.softmax(scores + bias, dim=-1)[:, :, 0]                        # [B,H,S]
    values = repeat_kv(value.float(), groups)                                   # [B,H,S,Dh]
    return torch.sqrt(((probs * probs) * (values * values).sum(-1)).sum(1))    # [B,S]


def _gather_outputs(index, real, attention_mask, token_type_ids, hidden_states, position_ids):
    gathered = torch.gather(hidden_states, 1, index[:, :, None].expand(-1, -1, hidden_states.shape[-1]))
    return (
        index,
        gathered,
        torch.gather(position_ids, 1, index),
        torch.gather(attention_mask * real, 1, index),
        torch.gather(token_type_ids, 1, index),
    )


class ValueNormScorer(nn.Module):
    """The middle-stage scoring graph (see the module diagram).

    Inputs (spec order): ``query.{K-1}`` [B,H,S,Dh], ``present.{K-1}.key`` and ``.value``
    [B,Hkv,S,Dh], attention_mask [B,S], token_type_ids [B,S], hidden_states [B,S,D], position_ids [B,S].
    Outputs: kept_indices [B,S'] (C image slots plus every other position, ascending), the kept
    hidden states, position ids (original), attention mask (0 at masked slots), token types;
    S' = S - (entering - C).
    """

    def __init__(self, keep: int, entering: int, threshold: float, scaling: float):
        super().__init__()
        self.keep, self.drop, self.threshold, self.scaling = keep, entering - keep, threshold, scaling

    def forward(self, query, key, value, attention_mask, token_type_ids, hidden_states, position_ids):
        scores = value_norm_scores(query, key, value, attention_mask, self.scaling)
        index = kept_indices(scores, token_type_ids, self.keep, self.drop)
        real = ((token_type_ids != TOKEN_IMAGE) | (scores > self.threshold)).to(attention_mask.dtype)
        return _gather_outputs(index, real, attention_mask, token_type_ids, hidden_states, position_ids)


class DropImageTokens(nn.Module):
    """The deep-stage graph: drops the ``entering`` image slots of every row.

    Inputs: attention_mask [B,S], token_type_ids [B,S], hidden_states [B,S,D], position_ids [B,S].
    Outputs: as :class:`ValueNormScorer`, S' = S - entering.
    """

    def __init__(self, entering: int):
        super().__init__()
        self.entering = entering

    def forward(self, attention_mask, token_type_ids, hidden_states, position_ids):
        zeros = torch.zeros(token_type_ids.shape, dtype=torch.float32, device=token_type_ids.device)
        index = kept_indices(zeros, token_type_ids, 0, self.entering)
        real = torch.ones_like(attention_mask)
        return _gather_outputs(index, real, attention_mask, token_type_ids, hidden_states, position_ids)


def _gather_positions(position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``position_ids`` [B,S] or [3,B,S] (M-RoPE) at ``index`` [B,S'] (every axis)."""
    if position_ids.dim() == 3:
        return torch.gather(position_ids, 2, index[None].expand(position_ids.shape[0], -1, -1))
    return torch.gather(position_ids, 1, index)


def _gather_variable(index, mask, token_type_ids, hidden_states, position_ids):
    gathered = torch.gather(hidden_states, 1, index[:, :, None].expand(-1, -1, hidden_states.shape[-1]))
    return index, gathered, _gather_positions(position_ids, index), mask, torch.gather(token_type_ids, 1, index)


class VariableValueNormScorer(nn.Module):
    """The middle-stage scoring graph with per-request image-token counts (module docstring).

    Inputs (spec order): ``query.{K-1}`` [B,H,S,Dh], ``present.{K-1}.key`` and ``.value``
    [B,Hkv,S,Dh], attention_mask [B,S] int64, token_type_ids [B,S] int64, hidden_states [B,S,D],
    position_ids [3,B,S] (or [B,S]) int64, keep_counts [B] int64 (min(C, |V|_b)), image_slots [E]
    and kept_slots [C'] int64 (only their lengths are read). Outputs: kept_indices [B,S'] (C'
    image slots plus every other position, ascending), the kept hidden states, position ids
    (original, every axis), attention mask (0 at unused and masked slots) and token types;
    S' = S - E + C'.
    """

    def __init__(self, threshold: float, scaling: float):
        super().__init__()
        self.threshold, self.scaling = threshold, scaling

    def forward(self, query, key, value, attention_mask, token_type_ids, hidden_states, position_ids, keep_counts,
                image_slots, kept_slots):
        entering, kept = image_slots.shape[0], kept_slots.shape[0]
        scores = value_norm_scores(query, key, value, attention_mask, self.scaling)          # 0 at masked slots
        index, mask = variable_kept(scores, token_type_ids, attention_mask, keep_counts, kept, entering - kept)
        # the threshold test: real image tokens only (a masked slot never passes it)
        passes = (token_type_ids != TOKEN_IMAGE) | ((scores > self.threshold) & attention_mask.bool())
        mask = mask * torch.gather(passes.to(mask.dtype), 1, index)
        return _gather_variable(index, mask, token_type_ids, hidden_states, position_ids)


class VariableDropImageTokens(nn.Module):
    """The deep-stage graph with per-request counts: drops the E image slots (real or masked) of every row.

    Inputs: attention_mask [B,S], token_type_ids [B,S], hidden_states [B,S,D], position_ids
    [3,B,S] (or [B,S]), image_slots [E] (its length is read). Outputs: as
    :class:`VariableValueNormScorer`, S' = S - E.
    """

    def forward(self, attention_mask, token_type_ids, hidden_states, position_ids, image_slots):
        entering = image_slots.shape[0]
        zeros = torch.zeros(token_type_ids.shape, dtype=torch.float32, device=token_type_ids.device)
        none = torch.zeros(token_type_ids.shape[:1], dtype=torch.int64, device=token_type_ids.device)
        index, mask = variable_kept(zeros, token_type_ids, attention_mask, none, 0, entering)
        return _gather_variable(index, mask, token_type_ids, hidden_states, position_ids)
