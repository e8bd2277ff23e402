"""EVS (Efficient Video Sampling): pruning a video's visual tokens before the LLM.

The stage between the vision graph and the first decoder segment (``../shared/METHODS.md``,
"Video, and pruning before the LLM (EVS)"; arXiv 2510.14624; vLLM's ``vllm/multimodal/evs.py``):

- on the merged vision features of one video X [T, H', W', D] (T temporal patches of H' x W' merged
  tokens, in (t, h, w) order), ``score(t, h, w) = 1 - cos(X[t, h, w], X[t-1, h, w])`` for t >= 1 and
  :data:`FIRST_PATCH_SCORE` (above every possible value, 1 - cos <= 2) for t = 0;
- ``keep = max(H'·W', int(T·H'·W'·(1 - q)))`` (:func:`evs_keep_count`) tokens with the highest
  scores, by a stable descending sort over the flattened (t, h, w) order, in their original order
  (:func:`evs_kept_indices`). An image (T = 1) keeps every token, at any rate.
- :func:`apply_evs` removes the other tokens from a prompt batch: their positions in ``input_ids``,
  the mask, the token types and the M-RoPE position ids go; kept tokens and the text after the video
  keep their unpruned positions; the vision features and Qwen3-VL's DeepStack features are gathered
  with the same indices; each row keeps its own count (rates per request), and the batch is re-laid
  out as :meth:`himap_trt.arch.qwen2_5_vl.Qwen2_5_VL.prepare_batch` lays it out (left padding, then
  the masked image slots of rows with fewer visual tokens than the batch's largest).

A pruning method inside the decoder then sees only the tokens EVS kept; its keep counts come from
their number (the pipeline's per-request counts are the batch's ``image_tokens``, which this stage
replaces).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from himap_trt.errors import HimapError
from himap_trt.prompt import TOKEN_IMAGE, PromptBatch

#: The score of every token of the first temporal patch: above any 1 - cosine (at most 2).
FIRST_PATCH_SCORE = 3.0


def check_evs_rate(rate: float, name: str = "--evs-rate") -> float:
    """``rate`` as a float in [0, 1).

    Raises:
        HimapError: naming ``name``, if it is not a number in [0, 1).
    """
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise HimapError(f"{name} must be a number in [0, 1), got {rate!r}") from None
    if not 0.0 <= value < 1.0:
        raise HimapError(f"{name} must be in [0, 1) (the fraction of a video's visual tokens EVS drops), got {rate!r}")
    return value


def evs_keep_count(t: int, h: int, w: int, rate: float) -> int:
    """Tokens EVS keeps of a T x H' x W' video at rate q: ``max(H'·W', int(T·H'·W'·(1 - q)))``."""
    return max(h * w, int(t * h * w * (1.0 - rate)))


def evs_scores(features: torch.Tensor) -> torch.Tensor:
    """EVS scores of one video's merged features.

    Args:
        features: [T, H', W', D] any float dtype.

    Returns:
        [T·H'·W'] float32 in (t, h, w) order: 1 - cosine similarity with the same (h, w) token of the
        previous temporal patch (exactly 0 for an identical token), :data:`FIRST_PATCH_SCORE` for t = 0.
    """
    x = features.float()
    first = torch.full(x.shape[1:3], FIRST_PATCH_SCORE)
    rest = 1.0 - torch.nn.functional.cosine_similarity(x[1:], x[:-1], dim=-1)          # [T-1, H', W']
    # a token identical to its predecessor scores exactly 0 (mathematically 1 - cos = 0; rounding would
    # otherwise order identical static tokens by noise instead of by the stable (t, h, w) order)
    rest = torch.where((x[1:] == x[:-1]).all(-1), 0.0, rest)
    return torch.cat([first[None], rest]).reshape(-1)


def evs_kept_indices(features: torch.Tensor, grid: tuple[int, int, int], rate: float) -> torch.Tensor:
    """The visual tokens EVS keeps of one video.

    Args:
        features: [T·H'·W', D] the video's merged features in (t, h, w) order.
        grid: (T, H', W') merged tokens.
        rate: q in [0, 1).

    Returns:
        [keep] int64 ascending indices into the video's tokens (:func:`evs_keep_count` of them).

    Raises:
        HimapError: if ``features`` does not hold T·H'·W' tokens.
    """
    t, h, w = (int(v) for v in grid)
    if features.ndim != 2 or features.shape[0] != t * h * w:
        raise HimapError(f"EVS: a {t}x{h}x{w} video needs [{t * h * w}, D] features, got {tuple(features.shape)}")
    keep = evs_keep_count(t, h, w, rate)
    if keep >= t * h * w:
        return torch.arange(t * h * w)
    order = torch.sort(evs_scores(features.reshape(t, h, w, -1)), descending=True, stable=True).indices
    return torch.sort(order[:keep]).values


def apply_evs(batch: PromptBatch, features: torch.Tensor, deepstack: torch.Tensor | None, rates: list[float],
              merge: int, image_token_id: int, pad_token_id: int):
    """Drop the visual tokens EVS prunes from a Qwen-family prompt batch.

    Args:
        batch: the prepared batch (``image_grid_thw`` one row per visual input, rows' inputs in row
            order; ``image_tokens`` per row: the sum of its inputs' tokens; a conversation's row may hold
            several images and videos, each pruned on its own).
        features: [sum of image_tokens, D] the vision graph's merged features, rows in order.
        deepstack: [n_deep, sum of image_tokens, D] (Qwen3-VL) or None.
        rates: q per visual input (``image_grid_thw`` row; 0: that input is unchanged).
        merge: the vision tower's ``spatial_merge_size``.
        image_token_id, pad_token_id: the image placeholder and padding ids.

    Returns:
        ``(batch, features, deepstack, kept)``: the shortened batch (same fields, new ``image_tokens``;
        ``pixel_values`` unchanged), the kept features [sum of kept, D], the kept DeepStack features
        [n_deep, sum of kept, D] or None, and per row the kept indices into that row's visual tokens
        (all its inputs' tokens in order; [keep] int64).

    Raises:
        HimapError: if the batch's grids, counts or features disagree.
    """
    grids = batch.image_grid_thw
    counts = list(batch.image_tokens or [])
    size = batch.batch_size
    if grids is None or len(counts) != size or len(rates) != grids.shape[0] or features.shape[0] != sum(counts):
        raise HimapError("EVS needs the visual inputs' grids, a rate per visual input and the rows' token counts "
                         "(Qwen families)")
    rows, kept_all, offset, item = [], [], 0, 0
    for b in range(size):
        n, kept, first = counts[b], [], 0         # the row's visual inputs: grids in order until n tokens
        while first < n:
            if item >= grids.shape[0]:
                raise HimapError(f"EVS: row {b} has {n} visual tokens, more than its grids make")
            t, h, w = (int(v) for v in grids[item])
            grid = (t, h // merge, w // merge)
            size_i = grid[0] * grid[1] * grid[2]
            own = features[offset + first:offset + first + size_i]
            kept.append(first + (evs_kept_indices(own, grid, rates[item]) if rates[item] > 0
                                 else torch.arange(size_i)))
            first += size_i
            item += 1
        if first != n:
            raise HimapError(f"EVS: row {b} has {n} visual tokens, its grids make {first}")
        kept = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.int64)
        kept_all.append(kept)
        real = batch.attention_mask[b] == 1
        visual = torch.nonzero(real & (batch.input_ids[b] == image_token_id)).reshape(-1)
        if visual.numel() != n:
            raise HimapError(f"EVS: row {b} holds {visual.numel()} image tokens, expected {n}")
        keep_pos = real.clone()
        drop = torch.ones(n, dtype=torch.bool)
        drop[kept] = False
        keep_pos[visual[drop]] = False
        rows.append(torch.nonzero(keep_pos).reshape(-1))
        offset += n
    if item != grids.shape[0]:
        raise HimapError(f"EVS: the rows' {sum(counts)} visual tokens use {item} of the batch's {grids.shape[0]} grids")
    new_counts = [int(k.numel()) for k in kept_all]
    slots = max(new_counts)
    width = max(len(r) - n for r, n in zip(rows, new_counts)) + slots
    input_ids = torch.full((size, width), pad_token_id, dtype=batch.input_ids.dtype)
    mask = torch.zeros((size, width), dtype=batch.attention_mask.dtype)
    types = torch.zeros((size, width), dtype=batch.token_type_ids.dtype)
    mrope = batch.position_ids.ndim == 3
    positions = torch.zeros(((3,) if mrope else ()) + (size, width), dtype=batch.position_ids.dtype)
    for b, (index, n) in enumerate(zip(rows, new_counts)):
        start = width - len(index)
        input_ids[b, start:] = batch.input_ids[b, index]
        mask[b, start:] = 1
        types[b, start:] = batch.token_type_ids[b, index]
        types[b, start - (slots - n):start] = TOKEN_IMAGE                # masked image slots
        if mrope:
            positions[:, b, start:] = batch.position_ids[:, b, index]
        else:
            positions[b, start:] = batch.position_ids[b, index]
    starts = torch.tensor([0, *counts[:-1]]).cumsum(0)
    flat = torch.cat([k + int(s) for k, s in zip(kept_all, starts)]).to(features.device)
    out = replace(batch, input_ids=input_ids, attention_mask=mask, token_type_ids=types, position_ids=positions,
                  image_tokens=new_counts)
    return out, features[flat], (deepstack[:, flat] if deepstack is not None else None), kept_all
