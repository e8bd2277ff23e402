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
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv

from himap_trt.graphs.modules import kept_indices
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
