"""The stage selection against a plain-Python computation of METHODS.md's rules."""

import torch

from himap_trt.graphs.modules import kept_indices, stage_scores
from himap_trt.prompt import TOKEN_IMAGE, TOKEN_INSTRUCTION, TOKEN_PAD, TOKEN_SYSTEM


def _expected(scores, types, keep):
    """Keep every non-image position and the `keep` best image positions (higher score first,
    then lower index), in original order."""
    image = [i for i, t in enumerate(types) if t == TOKEN_IMAGE]
    best = sorted(image, key=lambda i: (-scores[i], i))[:keep]
    return sorted([i for i, t in enumerate(types) if t != TOKEN_IMAGE] + best)


def _types(pad, system, image, instruction):
    return [TOKEN_PAD] * pad + [TOKEN_SYSTEM] * system + [TOKEN_IMAGE] * image + [TOKEN_INSTRUCTION] * instruction


def test_kept_indices_random_scores_and_ties():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        rows = [_types(p, 3, 20, 5 + (3 - p)) for p in (0, 1, 3)]
        types = torch.tensor(rows)
        # coarse values force many ties at the cut-off
        scores = torch.randint(0, 4 if trial % 2 else 1000, types.shape, generator=gen).float() / 7
        keep = 1 + trial % 20
        got = kept_indices(scores, types, keep, 20 - keep)
        for row in range(3):
            assert got[row].tolist() == _expected(scores[row].tolist(), rows[row], keep)


def test_stage_scores_match_per_head_softmax_by_hand():
    gen = torch.Generator().manual_seed(1)
    B, H, Hkv, S, Dh = 2, 4, 2, 9, 8
    q = torch.randn(B, H, S, Dh, generator=gen)
    k = torch.randn(B, Hkv, S, Dh, generator=gen)
    rows = [_types(0, 2, 4, 3), _types(2, 1, 4, 2)]
    types = torch.tensor(rows)
    mask = (types != TOKEN_PAD).long()
    scale = Dh ** -0.5
    for criterion in ("img2txt", "img2img", "last_row"):
        got = stage_scores(q, k, mask, types, criterion, scale, 4)
        for b in range(B):
            mean = torch.zeros(S, S, dtype=torch.float64)
            for h in range(H):
                kh = k[b, h // (H // Hkv)].double()
                logits = (q[b, h].double() @ kh.T) * scale
                for i in range(S):
                    for j in range(S):
                        if j > i or not mask[b, j]:
                            logits[i, j] = float("-inf")
                valid = torch.isfinite(logits).any(-1)
                probs = torch.zeros_like(logits)
                probs[valid] = torch.softmax(logits[valid], -1)
                mean += probs / H
            if criterion == "last_row":
                want = mean[S - 1]
            else:
                kind = TOKEN_INSTRUCTION if criterion == "img2txt" else TOKEN_IMAGE
                want = sum(mean[i] for i in range(S) if rows[b][i] == kind)
            image = [v for v in range(S) if rows[b][v] == TOKEN_IMAGE]
            assert torch.allclose(got[b, image].double(), want[image], atol=1e-6), criterion


def _all_rows_scores(query, key, attention_mask, token_type_ids, criterion, scaling):
    """The scoring graph before it gathered rows: attention for every query row, then the criterion's
    rows summed (kept here to show the leaner graph selects the same tokens)."""
    from transformers.models.llama.modeling_llama import repeat_kv

    from himap_trt.graphs.modules import attention_bias

    batch, heads, seq, _ = query.shape
    scores = torch.matmul(query.float(), repeat_kv(key.float(), heads // key.shape[1]).transpose(2, 3)) * scaling
    bias = attention_bias(attention_mask, torch.arange(seq)[None].expand(batch, seq))
    mean = torch.softmax(scores + bias, dim=-1).mean(1)                       # [B,S,S]
    if criterion == "last_row":
        return mean[:, -1]
    rows = (token_type_ids == (TOKEN_INSTRUCTION if criterion == "img2txt" else TOKEN_IMAGE)).float()
    return torch.matmul(rows[:, None, :], mean)[:, 0]


def test_gathered_rows_keep_the_same_tokens_as_all_rows():
    """The scoring graphs compute attention only for the rows their criterion reads; kept indices
    must be identical to computing every row (random inputs, padded rows, GQA, each criterion)."""
    gen = torch.Generator().manual_seed(2)
    B, H, Hkv, Dh, n_img = 3, 4, 2, 8, 24
    rows = [_types(0, 3, n_img, 9), _types(4, 2, n_img, 6), _types(1, 5, n_img, 6)]
    types = torch.tensor(rows)
    S = types.shape[1]
    mask = (types != TOKEN_PAD).long()
    differences = 0.0
    for trial in range(20):
        q = torch.randn(B, H, S, Dh, generator=gen) * 2
        k = torch.randn(B, Hkv, S, Dh, generator=gen) * 2
        for criterion in ("img2txt", "img2img", "last_row"):
            lean = stage_scores(q, k, mask, types, criterion, Dh ** -0.5, n_img)
            full = _all_rows_scores(q, k, mask, types, criterion, Dh ** -0.5)
            image = types == TOKEN_IMAGE
            differences = max(differences, float((lean - full)[image].abs().max()))
            keep = 1 + trial % (n_img - 1)
            assert torch.equal(kept_indices(lean, types, keep, n_img - keep),
                               kept_indices(full, types, keep, n_img - keep)), (trial, criterion)
    assert differences < 1e-6
