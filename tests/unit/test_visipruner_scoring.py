"""VisiPruner's scoring graphs against METHODS.md's rules written out plainly."""

import math

import pytest
import torch

from himap_trt.graphs.visipruner import (DropImageTokens, ValueNormScorer, VariableDropImageTokens,
                                         VariableValueNormScorer, value_norm_scores)
from himap_trt.prompt import TOKEN_IMAGE, TOKEN_INSTRUCTION, TOKEN_PAD, TOKEN_SYSTEM


def _types(pad, system, image, instruction):
    return [TOKEN_PAD] * pad + [TOKEN_SYSTEM] * system + [TOKEN_IMAGE] * image + [TOKEN_INSTRUCTION] * instruction


def _plain_scores(query, key, value, mask, scaling, row):
    """s(v) = norm of concat_h(A_h[last, v] * V_h[v]), A_h = softmax over the real keys."""
    heads, kv = query.shape[1], key.shape[1]
    seq = query.shape[2]
    real = [j for j in range(seq) if mask[row, j]]
    out = []
    for v in range(seq):
        pieces = []
        for h in range(heads):
            g = h // (heads // kv)
            logits = {j: float(query[row, h, -1] @ key[row, g, j]) * scaling for j in real}
            top = max(logits.values())
            total = sum(math.exp(x - top) for x in logits.values())
            a = math.exp(logits[v] - top) / total if v in logits else 0.0
            pieces += [a * float(x) for x in value[row, g, v]]
        out.append(math.sqrt(sum(p * p for p in pieces)))
    return out


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2)])
def test_value_norm_scores_and_kept_slots(heads, kv):
    gen = torch.Generator().manual_seed(heads + kv)
    rows = [_types(p, 3, 12, 4 + (3 - p)) for p in (0, 1, 3)]
    types = torch.tensor(rows)
    mask = (types != TOKEN_PAD).long()
    batch, seq, dh = types.shape[0], types.shape[1], 8
    query = torch.randn(batch, heads, seq, dh, generator=gen)
    key = torch.randn(batch, kv, seq, dh, generator=gen)
    value = torch.randn(batch, kv, seq, dh, generator=gen) * 3
    scaling = dh ** -0.5
    scores = value_norm_scores(query, key, value, mask, scaling)
    plain = [_plain_scores(query, key, value, mask, scaling, row) for row in range(batch)]
    for row in range(batch):
        torch.testing.assert_close(scores[row], torch.tensor(plain[row]), rtol=1e-5, atol=1e-6)
    # tau halfway between row 0's 3rd and 4th best image scores: row 0 keeps 3, the others their own counts
    best = scores[0][types[0] == TOKEN_IMAGE].sort(descending=True).values
    keep, tau = 5, float(best[2] + best[3]) / 2
    hidden = torch.randn(batch, seq, 6, generator=gen)
    positions = torch.arange(seq).expand(batch, seq)
    index, kept_hidden, kept_pos, kept_mask, kept_types = ValueNormScorer(keep, 12, tau, scaling)(
        query, key, value, mask, types, hidden, positions)
    assert index.shape == (batch, seq - (12 - keep))
    counts = set()
    for row in range(batch):
        image = [i for i in range(seq) if rows[row][i] == TOKEN_IMAGE]
        ranked = sorted(image, key=lambda i: (-plain[row][i], i))
        slots = ranked[:keep]
        real = [i for i in slots if plain[row][i] > tau]
        expected = sorted([i for i in range(seq) if rows[row][i] != TOKEN_IMAGE] + slots)
        assert index[row].tolist() == expected
        got_real = [int(i) for i, m, t in zip(index[row], kept_mask[row], kept_types[row]) if t == TOKEN_IMAGE and m]
        assert got_real == sorted(real)
        counts.add(len(real))
        assert torch.equal(kept_hidden[row], hidden[row, index[row]])
        assert torch.equal(kept_pos[row], positions[row, index[row]])
        assert kept_mask[row].tolist() == [int(mask[row, i] and (rows[row][i] != TOKEN_IMAGE or i in real))
                                           for i in expected]
    assert len(counts) > 1, f"rows should keep different counts, got {counts}"


def test_zero_kept_and_drop_all():
    types = torch.tensor([_types(1, 2, 6, 3)])
    mask = (types != TOKEN_PAD).long()
    seq = types.shape[1]
    q, k, v = torch.randn(1, 2, seq, 4), torch.randn(1, 2, seq, 4), torch.randn(1, 2, seq, 4)
    hidden, positions = torch.randn(1, seq, 3), torch.arange(seq)[None]
    index, _, _, kept_mask, kept_types = ValueNormScorer(4, 6, 1e9, 0.5)(q, k, v, mask, types, hidden, positions)
    image_slots = kept_types[0] == TOKEN_IMAGE
    assert int(image_slots.sum()) == 4 and int(kept_mask[0][image_slots].sum()) == 0     # n = 0: all slots masked
    out = DropImageTokens(4)(kept_mask, kept_types, hidden[:, index[0]], positions[:, index[0]])
    assert out[0].shape == (1, seq - 6)
    assert (out[4] != TOKEN_IMAGE).all() and out[3].tolist() == [[0, 1, 1, 1, 1, 1]]


def _slot_rows(pad, system, slots, real, instruction):
    """A row of the per-request-count layout (graphs/variable.py): ``slots`` image slots of which the
    first ``slots - real`` are masked; returns (types, mask)."""
    types = _types(pad, system, slots, instruction)
    mask = [0] * pad + [1] * system + [0] * (slots - real) + [1] * real + [1] * instruction
    return types, mask


@pytest.mark.parametrize("tau_mode", ["between", "zero"])
def test_variable_value_norm_equals_the_rule_per_request(tau_mode):
    """Per-request counts: E = 10 slots, rows with 10, 6 and 3 real image tokens, C = 5: each row keeps
    min(C, its tokens) slots, uses those above tau, never a masked slot; outputs gathered on every
    M-RoPE axis. tau_mode ``zero``: below every score (every row uses min(C, |V|_b))."""
    gen = torch.Generator().manual_seed(len(tau_mode))
    layout = [_slot_rows(0, 3, 10, 10, 4), _slot_rows(1, 3, 10, 6, 3), _slot_rows(2, 3, 10, 3, 2)]
    types = torch.tensor([t for t, _ in layout])
    mask = torch.tensor([m for _, m in layout])
    batch, seq, heads, kv, dh = 3, types.shape[1], 4, 2, 8
    query, key = torch.randn(batch, heads, seq, dh, generator=gen), torch.randn(batch, kv, seq, dh, generator=gen)
    value = torch.randn(batch, kv, seq, dh, generator=gen) * 3
    scaling = dh ** -0.5
    plain = [_plain_scores(query, key, value, mask, scaling, row) for row in range(batch)]
    real_image = [[i for i in range(seq) if types[row, i] == TOKEN_IMAGE and mask[row, i]] for row in range(batch)]
    ordered = sorted((plain[row][i] for row in range(batch) for i in real_image[row]), reverse=True)
    cap, counts = 5, torch.tensor([min(5, len(r)) for r in real_image])

    def above(tau):
        return [min(cap, sum(plain[row][i] > tau for i in real_image[row])) for row in range(batch)]

    if tau_mode == "zero":
        tau = 0.0
    else:   # the first midpoint between two scores at which rows use different counts, none capped
        tau = next(t for t in ((a + b) / 2 for a, b in zip(ordered, ordered[1:]))
                   if len(set(above(t))) > 1 and max(above(t)) < cap)
    slots_out = int(counts.max())
    hidden = torch.randn(batch, seq, 6, generator=gen)
    positions = torch.stack([torch.arange(seq).expand(batch, seq) * (axis + 1) for axis in range(3)])   # [3,B,S]
    index, kept_hidden, kept_pos, kept_mask, kept_types = VariableValueNormScorer(tau, scaling)(
        query, key, value, mask, types, hidden, positions, counts, torch.arange(10), torch.arange(slots_out))
    assert index.shape == (batch, seq - 10 + slots_out)
    used_counts = []
    for row in range(batch):
        masked = [i for i in range(seq) if types[row, i] == TOKEN_IMAGE and not mask[row, i]]
        ranked = sorted(real_image[row], key=lambda i: (-plain[row][i], i)) + masked        # masked slots last
        slots = ranked[:slots_out]
        used = sorted(i for i in ranked[:min(cap, len(real_image[row]))] if plain[row][i] > tau)
        expected = sorted([i for i in range(seq) if types[row, i] != TOKEN_IMAGE] + slots)
        assert index[row].tolist() == expected
        assert [int(i) for i, m, t in zip(index[row], kept_mask[row], kept_types[row])
                if t == TOKEN_IMAGE and m] == used
        assert kept_mask[row].tolist() == [int(bool(mask[row, i]) and (types[row, i] != TOKEN_IMAGE or i in used))
                                           for i in expected]
        assert torch.equal(kept_hidden[row], hidden[row, index[row]])
        assert torch.equal(kept_pos[:, row], positions[:, row, index[row]])
        used_counts.append(len(used))
    if tau_mode == "zero":
        assert used_counts == [5, 5, 3]
    else:
        assert len(set(used_counts)) > 1 and max(used_counts) < cap, used_counts


def test_variable_drop_all_drops_every_slot():
    layout = [_slot_rows(0, 2, 4, 4, 3), _slot_rows(1, 2, 4, 1, 2)]
    types, mask = torch.tensor([t for t, _ in layout]), torch.tensor([m for _, m in layout])
    seq = types.shape[1]
    hidden, positions = torch.randn(2, seq, 3), torch.arange(seq).expand(3, 2, seq)
    index, kept_hidden, kept_pos, kept_mask, kept_types = VariableDropImageTokens()(
        mask, types, hidden, positions, torch.arange(4))
    for row in range(2):
        expected = [i for i in range(seq) if types[row, i] != TOKEN_IMAGE]
        assert index[row].tolist() == expected and kept_mask[row].tolist() == mask[row, expected].tolist()
        assert torch.equal(kept_pos[:, row], positions[:, row, expected])
    assert (kept_types != TOKEN_IMAGE).all() and index.shape == (2, seq - 4)
