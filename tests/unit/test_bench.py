"""himap_trt.analysis.bench: the interleaving order of a run and the figures computed from its samples."""

import statistics
from types import SimpleNamespace

import pytest
import torch

from himap_trt.analysis.bench import Contender, _Sample, run_bench
from himap_trt.errors import HimapError


class Scripted(Contender):
    """Returns scripted samples and records the order it was called in (shared log)."""

    def __init__(self, name, log, ttft_by_tokens, itl):
        self.name, self.log, self.ttft_by_tokens, self.itl, self.calls = name, log, ttft_by_tokens, itl, 0

    def run(self, batch, new_tokens):
        self.log.append((self.name, new_tokens))
        self.calls += 1
        itl = [self.itl * self.calls] * (new_tokens - 1)     # the n-th call's steps take n * itl
        return _Sample(self.ttft_by_tokens[new_tokens] * self.calls, itl, new_tokens * batch.batch_size,
                       1000, 10 * self.calls, None, {"segment_0": 0.5 * self.calls})


def _batch(size):
    return SimpleNamespace(batch_size=size, input_ids=torch.zeros((size, 7), dtype=torch.int64))


def test_every_round_runs_every_length_of_every_contender_and_medians_are_per_setting():
    log = []
    a = Scripted("a", log, {2: 0.1, 5: 0.2}, 0.01)
    b = Scripted("b", log, {2: 0.3, 5: 0.4}, 0.02)
    figures = run_bench([a, b], _batch, batch_sizes=[1], new_tokens=[2, 5], repeats=3)
    # one warm-up each, then rounds of (2 tokens: a, b), (5 tokens: a, b)
    assert log[:2] == [("a", 2), ("b", 2)]
    assert log[2:] == [("a", 2), ("b", 2), ("a", 5), ("b", 5)] * 3
    by_key = {(f.contender, f.new_tokens): f for f in figures}
    assert [(f.contender, f.new_tokens) for f in figures] == [("a", 2), ("b", 2), ("a", 5), ("b", 5)]
    # contender a ran its 2-token answer on calls 2, 4, 6 and its 5-token one on calls 3, 5, 7
    fa2, fa5 = by_key["a", 2], by_key["a", 5]
    assert fa2.ttft_s == pytest.approx(statistics.median([0.1 * c for c in (2, 4, 6)]))
    assert fa5.ttft_s == pytest.approx(statistics.median([0.2 * c for c in (3, 5, 7)]))
    assert fa5.tpot_s == pytest.approx(statistics.median([0.01 * c for c in (3, 5, 7)]))
    assert fa5.itl_by_step_s == pytest.approx([0.05] * 4) and fa5.repeats == 3
    assert fa5.tokens_per_s == pytest.approx(statistics.median([5 / (0.2 * c + 4 * 0.01 * c) for c in (3, 5, 7)]))
    assert fa5.prefill_graph_s == {"segment_0": pytest.approx(2.5)}
    assert fa5.peak_rss_delta_bytes == 50 and fa5.prompt_tokens == 7 and fa5.kv_cache_bytes == 1000


def test_bench_refuses_no_contenders_and_no_repeats():
    with pytest.raises(HimapError, match="at least one contender"):
        run_bench([], _batch, batch_sizes=[1], new_tokens=[2], repeats=1)
    with pytest.raises(HimapError, match="--repeats"):
        run_bench([Scripted("a", [], {2: 0.1}, 0.01)], _batch, batch_sizes=[1], new_tokens=[2], repeats=0)
