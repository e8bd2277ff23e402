"""Scoring graphs for models whose image-token count varies per request (Qwen2.5-VL).

The batch layout (:mod:`himap_trt.arch.qwen2_5_vl`): every row holds the same number E of image
*slots*; row b's first ``E - |V|_b`` slots are masked (attention mask 0). A stage keeps C slots per
row (C = the batch's largest keep count) of which row b uses its own ``keep_counts[b]`` =
``n_b`` (METHODS.md rounding, computed by the pipeline from |V|_b) and masks the rest, as
VisiPruner's slots (docs/ARCHITECTURE.md). E and C are the lengths of the shape inputs
``image_slots`` and ``kept_slots`` (their values are the ordinals 0..E-1 / 0..C-1), so the output
length ``sequence - image_slots + kept_slots`` is a shape expression, not data-dependent.

Per row, the criteria are those of :func:`himap_trt.graphs.modules.stage_scores` over the row's
*real* tokens: masked slots get no attention (their keys are masked), contribute no rows to
``img2img`` (weight = their mask, 0) and are ranked below every real image token, so a row's kept
tokens and its real outputs do not depend on the padding (tested: a row alone and in a batch).
"""

from __future__ import annotations

import torch
from torch import nn

from himap_trt.graphs.modules import random_score_table, stage_scores
from himap_trt.prompt import TOKEN_IMAGE


def variable_kept(scores: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor,
                  keep_counts: torch.Tensor, kept, dropped) -> tuple[torch.Tensor, torch.Tensor]:
    """Survivors of a stage with per-row keep counts.

    Every non-image position survives, plus the ``kept`` (C) best image slots: real image tokens by
    score (ties: lower index first), then masked slots. A survivor is real iff it is not an image
    slot, or it is a real image token of rank < ``keep_counts[b]``.

    Args:
        scores: [B,S] float32, >= 0 at real image positions.
        token_type_ids, attention_mask: [B,S] int64.
        keep_counts: [B] int64, n_b <= C and <= the row's real image tokens.
        kept: C; dropped: E - C (ints or traced sizes).

    Returns:
        ``(index, mask)``: [B, S - dropped] int64 ascending indices and the survivors' attention mask.
    """
    seq = scores.shape[1]
    image = token_type_ids == TOKEN_IMAGE
    real = attention_mask.bool()
    score = torch.where(image & real, scores, torch.where(image, -0.5, -1.0))
    index = torch.arange(seq, device=scores.device)
    beats = score[:, None, :] > score[:, :, None]
    ties = (score[:, None, :] == score[:, :, None]) & (index[None, :] < index[:, None])[None]
    rank = (beats | ties).sum(-1)                                      # [B,S]
    survives = ~image | (rank < kept)
    cumulative = survives.float().cumsum(-1)
    slots = torch.arange(seq - dropped, device=scores.device).float()
    out = (cumulative[:, None, :] <= slots[None, :, None]).sum(-1)     # [B,S']
    used = (~image | (rank < keep_counts[:, None])) & real
    return out, torch.gather(used.long(), 1, out)


class VariableStageScorer(nn.Module):
    """A scoring graph with per-request keep counts (see the module docstring).

    Inputs (spec order): ``query.{K-1}`` [B,H,S,Dh], ``present.{K-1}.key`` [B,Hkv,S,Dh],
    attention_mask [B,S], token_type_ids [B,S], hidden_states [B,S,D], position_ids [3,B,S] (or
    [B,S]), keep_counts [B], image_slots [E], kept_slots [C]. Outputs: kept_indices [B,S'], the kept
    hidden states, position ids (original, all three axes), attention mask (0 for unused slots) and
    token types; S' = S - E + C.
    """

    def __init__(self, criterion: str, scaling: float, *, entering: int, seed: int | None = None, stage: int = 0):
        super().__init__()
        self.criterion, self.scaling = criterion, scaling
        if criterion == "random":
            self.register_buffer("random_table", random_score_table(seed, stage, entering), persistent=False)

    def forward(self, query, key, attention_mask, token_type_ids, hidden_states, position_ids, keep_counts,
                image_slots, kept_slots):
        entering, kept = image_slots.shape[0], kept_slots.shape[0]
        if self.criterion == "random":
            image = ((token_type_ids == TOKEN_IMAGE) & attention_mask.bool()).float()
            ordinal = (image.cumsum(-1) - 1.0).clamp(min=0.0).long()       # t at the row's t-th real image token
            scores = self.random_table[ordinal]
        else:
            scores = stage_scores(query, key, attention_mask, token_type_ids, self.criterion, self.scaling,
                                  entering, masked_image_slots=True)
        index, mask = variable_kept(scores, token_type_ids, attention_mask, keep_counts, kept, entering - kept)
        gathered = torch.gather(hidden_states, 1, index[:, :, None].expand(-1, -1, hidden_states.shape[-1]))
        if position_ids.dim() == 3:
            positions = torch.gather(position_ids, 2, index[None].expand(position_ids.shape[0], -1, -1))
        else:
            positions = torch.gather(position_ids, 1, index)
        return index, gathered, positions, mask, torch.gather(token_type_ids, 1, index)
