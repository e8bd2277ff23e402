"""Slot KV caches: requests prefilled at different times, decoded together at different lengths,
joining and leaving between steps, give the tokens (and, within fp32 rounding, the logits) of the
same request run alone."""

import pytest
import torch

from conftest import exported, tiny
from himap_trt.errors import HimapError
from himap_trt.runtime import GenerationConfig, reference_pipeline
from himap_trt.runtime.loader import open_pipeline

PLAN = dict(k1=2, r1=0.5, k2=8, r2=0.75)


def _pipelines(tmp_path_factory, kind):
    out, manifest, _ = exported(tmp_path_factory, "tiny", "himap", kv_write="gqa" if kind == "gqa" else "scatternd",
                                **PLAN)
    if kind in ("onnxruntime", "gqa"):
        return open_pipeline(export_dir=out, backend="onnxruntime").pipeline
    return reference_pipeline(tiny("tiny"), manifest.plan)


def _solo(pipe, batch, steps):
    """Greedy tokens and per-step logits of one request run alone (its own cache, batch 1)."""
    cache = pipe.allocate(1, max_seq_len=batch.input_ids.shape[1] + steps)
    state = pipe.prefill(batch, cache=cache)
    logits = [state.logits[0]]
    tokens = [int(state.logits[0].argmax())]
    for step in range(steps - 1):
        out = pipe.decode_step(cache, torch.tensor([tokens[-1]]), state.next_positions + step, [0])
        logits.append(out[0])
        tokens.append(int(out[0].argmax()))
    return tokens, logits


class _Request:
    def __init__(self, pipe, cache, batch, slot):
        self.state = pipe.prefill(batch, cache=cache, slots=[slot])
        self.slot = slot
        self.tokens = [int(self.state.logits[0].argmax())]
        self.logits = [self.state.logits[0]]

    @property
    def position(self):
        return int(self.state.next_positions[0]) + len(self.tokens) - 1


def _step(pipe, cache, requests):
    """One decode step of several requests together (slot order need not be sorted)."""
    out = pipe.decode_step(cache, torch.tensor([r.tokens[-1] for r in requests]),
                           torch.tensor([r.position for r in requests]), [r.slot for r in requests])
    for request, logits in zip(requests, out):
        request.tokens.append(int(logits.argmax()))
        request.logits.append(logits)


@pytest.mark.parametrize("kind", ["onnxruntime", "torch", "gqa"])
def test_slots_joining_and_leaving_equal_solo_runs(tmp_path_factory, kind, requests_3):
    pipe = _pipelines(tmp_path_factory, kind)
    images, questions = requests_3
    batches = [pipe.prepare([images[i]], [questions[i]]) for i in range(3)]
    steps = 7
    solo = [_solo(pipe, b, steps) for b in batches]
    longest = max(b.input_ids.shape[1] for b in batches)
    cache = pipe.allocate(4, max_seq_len=longest + steps)
    # request 0 in slot 1 decodes alone for 3 steps; request 1 joins in slot 3 (slot 2 stays free,
    # slot 0 free too), both decode; request 0 leaves; request 2 joins in slot 1 (reused)
    a = _Request(pipe, cache, batches[0], 1)
    for _ in range(3):
        _step(pipe, cache, [a])
    b = _Request(pipe, cache, batches[1], 3)
    assert cache.free_slots() == [0, 2]
    assert cache.slot_lengths(1)[0] != cache.slot_lengths(3)[0]        # rows at different lengths
    for _ in range(steps - 4):
        _step(pipe, cache, [b, a])
    assert len(a.tokens) == steps
    pipe.release(cache, [1])
    c = _Request(pipe, cache, batches[2], 1)
    while len(b.tokens) < steps:
        _step(pipe, cache, [c, b])
    while len(c.tokens) < steps:
        _step(pipe, cache, [c])
    for request, (tokens, logits) in zip((a, b, c), solo):
        assert request.tokens == tokens
        worst = max(float((x - y).abs().max()) for x, y in zip(request.logits, logits))
        assert worst < 1e-4, worst
    if kind == "gqa":   # GroupQueryAttention (prefix-only attention) gives the reference's tokens too
        reference = _pipelines(tmp_path_factory, "torch")
        assert [r.tokens for r in (a, b, c)] == [_solo(reference, batch, steps)[0] for batch in batches]


def test_batch_prefill_into_chosen_slots_equals_generate(tmp_path_factory, requests_3):
    """A padded batch of 3 prefilled into slots 2, 0, 3 of a 4-slot cache decodes as generate does."""
    pipe = _pipelines(tmp_path_factory, "onnxruntime")
    batch = pipe.prepare(*requests_3)
    steps = 6
    expected = pipe.generate(batch, GenerationConfig(max_new_tokens=steps)).sequences
    cache = pipe.allocate(4, max_seq_len=batch.input_ids.shape[1] + steps)
    slots = [2, 0, 3]
    state = pipe.prefill(batch, cache=cache, slots=slots)
    # dense per-slot storage: each slot holds its prompt's real tokens only
    assert [cache.slot_lengths(s)[0] for s in slots] == batch.attention_mask.sum(1).tolist()
    tokens = state.logits.argmax(-1)
    got = [tokens]
    for step in range(steps - 1):
        tokens = pipe.decode_step(cache, tokens, state.next_positions + step, slots).argmax(-1)
        got.append(tokens)
    assert torch.equal(torch.stack(got, 1), expected)


def test_slot_errors(tmp_path_factory, requests_3):
    pipe = _pipelines(tmp_path_factory, "onnxruntime")
    images, questions = requests_3
    batch = pipe.prepare(images[:1], questions[:1])
    prompt = batch.input_ids.shape[1]
    cache = pipe.allocate(2, max_seq_len=prompt + 2)
    state = pipe.prefill(batch, cache=cache, slots=[1])
    with pytest.raises(HimapError, match="slot 1 is occupied"):
        pipe.prefill(batch, cache=cache, slots=[1])
    with pytest.raises(HimapError, match="slot 0 is free"):
        pipe.decode_step(cache, torch.tensor([5]), state.next_positions, [0])
    with pytest.raises(HimapError, match="out of range"):
        pipe.decode_step(cache, torch.tensor([5]), state.next_positions, [2])
    pipe.decode_step(cache, torch.tensor([5]), state.next_positions, [1])     # the one step that fits
    with pytest.raises(HimapError, match="max_seq_len"):
        pipe.decode_step(cache, torch.tensor([5]), state.next_positions + 1, [1])
    with pytest.raises(HimapError, match="cache holds"):
        pipe.prefill(batch, cache=pipe.allocate(1, max_seq_len=prompt))
    pipe.release(cache, [1])
    assert cache.free_slots() == [0, 1] and cache.slot_lengths(1) == [0, 0, 0]
    pipe.prefill(batch, cache=cache, slots=[1])                                 # reusable
