"""The continuous-batching scheduler (runtime/engine.py) against a small fake model with slots.

The fake implements the slot API (allocate / prefill into slots / decode_step / release) with a
next token that depends only on the request's own prompt and step, and checks what the engine
feeds it (the previous token, its RoPE position, occupied slots only). The same behaviour on the
real pipeline is tested through the server in tests/integration/test_serve.py.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from himap_trt.errors import HimapError
from himap_trt.prompt import PromptBatch
from himap_trt.runtime.engine import Completion, Delta, Engine, NotAccepting, QueueFull, SamplingParams

VOCAB, EOS = 40, 1


class FakeTokenizer:
    """Token t >= 2 -> one letter; 0 and EOS are special (skipped)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + (t - 2) % 26) for t in ids if t >= 2)


class FakeCache:
    def __init__(self, max_batch):
        self.max_batch = max_batch
        self.slots = [None] * max_batch      # per slot: [prompt key, prompt length, tokens fed]

    def free_slots(self):
        return [i for i, s in enumerate(self.slots) if s is None]

    def nbytes(self):
        return 0


def expected_token(key: int, step: int, eos_at: int | None) -> int:
    """The fake's answer: token number ``step`` of a prompt with ``key``."""
    if eos_at is not None and step == eos_at:
        return EOS
    return 2 + (key * 7 + step * 3) % (VOCAB - 2)


class FakePipeline:
    """A model whose token k for a prompt is :func:`expected_token` (EOS at step ``key % 5 + 3`` when
    ``eos`` is on); records the batches it saw."""

    def __init__(self, eos=True, max_seq_len=64, step_delay=0.0):
        self.processor = SimpleNamespace(tokenizer=FakeTokenizer())
        self.eos_token_ids = [EOS]
        self.pad_token_id = 0
        self.max_seq_len = max_seq_len
        self.device = torch.device("cpu")
        self.plan = SimpleNamespace(image_tokens_per_segment=[4, 2])
        self.eos = eos
        self.step_delay = step_delay
        self.prefill_batches: list[int] = []
        self.decode_batches: list[int] = []

    def eos_at(self, key):
        return key % 5 + 3 if self.eos else None

    def allocate(self, max_batch, *, max_seq_len=None):
        self.allocated_len = max_seq_len
        return FakeCache(max_batch)

    def capacity(self, batch):
        return self.max_seq_len

    def prepare(self, images, questions, processor=None):
        (question,) = questions
        ids = torch.tensor([[5] + [ord(c) % 50 + 2 for c in question]], dtype=torch.int64)
        ones = torch.ones_like(ids)
        return PromptBatch(ids, ones, torch.zeros(1, 3, 2, 2), ones, torch.arange(ids.shape[1])[None], [question])

    @staticmethod
    def key(row):
        return int(row.sum())

    def prefill(self, batch, timings=None, *, cache=None, slots=None):
        assert len(set(batch.prompt_lengths)) == 1, "the engine batches equal-length prompts only"
        self.prefill_batches.append(batch.batch_size)
        logits = torch.zeros(batch.batch_size, VOCAB)
        for row, slot in enumerate(slots):
            if cache.slots[slot] is not None:
                raise HimapError(f"slot {slot} is not free")
            key = self.key(batch.input_ids[row])
            cache.slots[slot] = [key, batch.input_ids.shape[1], 0]
            logits[row, expected_token(key, 0, self.eos_at(key))] = 1.0
        stages = [SimpleNamespace(kept_image_positions=[[1, 2]] * batch.batch_size)]
        return SimpleNamespace(logits=logits, next_positions=torch.full((batch.batch_size,), batch.input_ids.shape[1]),
                               stages=stages, cache=cache, image_tokens=None)

    def decode_step(self, cache, tokens, positions, slots):
        time.sleep(self.step_delay)
        self.decode_batches.append(len(slots))
        logits = torch.zeros(len(slots), VOCAB)
        for row, slot in enumerate(slots):
            state = cache.slots[slot]
            assert state is not None, f"decode of free slot {slot}"
            key, length, fed = state
            assert int(positions[row]) == length + fed, "wrong RoPE position"
            assert int(tokens[row]) == expected_token(key, fed, self.eos_at(key)), "fed a token it did not generate"
            if length + fed + 1 > self.max_seq_len:
                raise HimapError("slot full")
            state[2] += 1
            logits[row, expected_token(key, fed + 1, self.eos_at(key))] = 1.0
        return logits

    def release(self, cache, slots):
        for slot in slots:
            cache.slots[slot] = None


def answer(pipe: FakePipeline, question: str, max_tokens: int) -> list[int]:
    """The fake's answer for ``question`` computed directly (EOS included, at most max_tokens)."""
    key = FakePipeline.key(pipe.prepare(None, [question]).input_ids[0])
    out = []
    for step in range(max_tokens):
        out.append(expected_token(key, step, pipe.eos_at(key)))
        if out[-1] == EOS:
            break
    return out


@pytest.fixture
def engine_factory():
    engines = []

    def make(pipe=None, **kw):
        engine = Engine(pipe or FakePipeline(), **kw).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop(timeout=5)


def test_concurrent_requests_get_their_own_answers(engine_factory):
    pipe = FakePipeline(step_delay=0.002)
    engine = engine_factory(pipe, max_batch=4, max_queue=32)
    questions = [f"q{i}" + "x" * (i % 3) for i in range(12)]
    params = SamplingParams(max_tokens=9, temperature=0)
    handles = [engine.submit(engine.prepare(None, q), params) for q in questions]
    results = [h.result(timeout=10) for h in handles]
    for question, result in zip(questions, results):
        assert result.token_ids == answer(pipe, question, 9)
        assert result.finish_reason == ("stop" if result.token_ids[-1] == EOS else "length")
        assert result.text == FakeTokenizer().decode(result.token_ids)
    assert max(pipe.decode_batches) > 1, "decode steps never served several requests"
    assert max(pipe.decode_batches) <= 4
    assert max(pipe.prefill_batches) > 1, "waiting requests were never prefilled together"
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.free_slots) == (0, 0, 4)


def test_requests_join_between_steps_and_leave_within_one(engine_factory):
    pipe = FakePipeline(eos=False, step_delay=0.003)
    engine = engine_factory(pipe, max_batch=2)
    long = engine.submit(engine.prepare(None, "long question"), SamplingParams(max_tokens=40, temperature=0))
    time.sleep(0.03)
    short = engine.submit(engine.prepare(None, "short"), SamplingParams(max_tokens=3, temperature=0))
    assert short.result(timeout=10).finish_reason == "length"
    assert not long.done.is_set(), "the short request waited for the long one"
    assert long.result(timeout=10).token_ids == answer(pipe, "long question", 40)
    # the short one ran beside the long one: some steps had 2 slots, then back to 1
    assert 2 in pipe.decode_batches and pipe.decode_batches[-1] == 1


def test_streamed_deltas_add_up_and_stop_strings_cut(engine_factory):
    pipe = FakePipeline(eos=False)
    engine = engine_factory(pipe, max_batch=2)
    full = engine.generate(None, "abc", SamplingParams(max_tokens=12, temperature=0))
    assert len(full.text) == 12
    stop = full.text[5:7]
    handle = engine.submit(engine.prepare(None, "abc"), SamplingParams(max_tokens=12, temperature=0, stop=(stop,)))
    events = list(handle)
    deltas = [e.text for e in events if isinstance(e, Delta)]
    done = events[-1]
    assert isinstance(done, Completion) and done.finish_reason == "stop"
    cut = full.text.find(stop)
    assert done.text == full.text[:cut] == "".join(deltas)
    assert len(deltas) == len(done.token_ids)               # one Delta per token, some of them empty
    assert "" in deltas                                     # the stop string's first letter was held back


def test_cancel_frees_the_slot_within_a_step(engine_factory):
    pipe = FakePipeline(eos=False, max_seq_len=10_000, step_delay=0.002)
    engine = engine_factory(pipe, max_batch=1)
    handle = engine.submit(engine.prepare(None, "abc"), SamplingParams(max_tokens=5000, temperature=0))
    for event in handle:
        if isinstance(event, Delta) and len(pipe.decode_batches) > 3:
            break
    handle.cancel()
    assert handle.result(timeout=5).finish_reason == "cancelled"
    assert engine.stats().free_slots == 1
    # the slot is usable again
    assert engine.generate(None, "xyz", SamplingParams(max_tokens=4, temperature=0)).token_ids == answer(pipe, "xyz", 4)


def test_max_seq_len_ends_with_length(engine_factory):
    pipe = FakePipeline(eos=False, max_seq_len=12)
    engine = engine_factory(pipe, max_batch=1)
    prompt = engine.prepare(None, "abcd")          # 5 tokens: room for 7
    result = engine.submit(prompt, SamplingParams(temperature=0)).result(timeout=5)
    assert result.finish_reason == "length" and len(result.token_ids) == 12 - 5


def test_server_max_seq_len_limits_prompts_and_answers(engine_factory):
    pipe = FakePipeline(eos=False, max_seq_len=64)
    with pytest.raises(HimapError, match="exceeds the export's max_seq_len 64"):
        Engine(pipe, max_seq_len=65)
    engine = engine_factory(pipe, max_batch=1, max_seq_len=10)
    assert pipe.allocated_len == 10
    with pytest.raises(HimapError, match="--max-seq-len is 10"):
        engine.prepare(None, "a much longer question")
    result = engine.generate(None, "abcd", SamplingParams(temperature=0))      # 5 prompt tokens: room for 5
    assert result.finish_reason == "length" and len(result.token_ids) == 5


def test_queue_full_and_drain(engine_factory):
    pipe = FakePipeline(eos=False, step_delay=0.01)
    engine = engine_factory(pipe, max_batch=1, max_queue=1)
    params = SamplingParams(max_tokens=20, temperature=0)
    first = engine.submit(engine.prepare(None, "a"), params)
    deadline = time.monotonic() + 5
    while engine.stats().running == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    second = engine.submit(engine.prepare(None, "b"), params)
    with pytest.raises(QueueFull):
        engine.submit(engine.prepare(None, "c"), params)
    engine.drain()
    with pytest.raises(NotAccepting):
        engine.submit(engine.prepare(None, "d"), params)
    assert first.result(timeout=10).finish_reason == "length"
    assert second.result(timeout=10).finish_reason == "length"     # queued requests still complete
    assert engine.idle


def test_seeded_sampling_is_reproducible(engine_factory):
    pipe = FakePipeline(eos=False)

    def noisy(cache, tokens, positions, slots, _step=pipe.decode_step):
        return _step(cache, tokens, positions, slots) + torch.linspace(0, 0.5, VOCAB)

    pipe.decode_step = noisy
    engine = engine_factory(pipe, max_batch=3)
    params = SamplingParams(max_tokens=1, temperature=1.5, seed=7)
    handles = [engine.submit(engine.prepare(None, "abc"), params) for _ in range(3)]
    firsts = {tuple(h.result(timeout=5).token_ids) for h in handles}
    assert len(firsts) == 1


def test_prefill_error_fails_only_that_request(engine_factory):
    pipe = FakePipeline(eos=False)
    real = pipe.prefill

    def picky(batch, timings=None, *, cache=None, slots=None):
        if batch.prompts[0] == "bad":
            raise HimapError("the prompt does not fit")
        return real(batch, timings, cache=cache, slots=slots)

    pipe.prefill = picky
    engine = engine_factory(pipe, max_batch=2)
    bad = engine.submit(engine.prepare(None, "bad"), SamplingParams(max_tokens=3, temperature=0)).result(timeout=5)
    assert bad.finish_reason == "error" and "does not fit" in bad.error
    good = engine.generate(None, "goo", SamplingParams(max_tokens=3, temperature=0))
    assert good.token_ids == answer(pipe, "goo", 3)
    assert engine.stats().free_slots == 2


def test_internal_prefill_bug_fails_that_group_and_frees_its_slots(engine_factory):
    """A non-HimapError raised by prefill (a bug) answers the admitted requests with an internal error
    instead of leaving them, and their slots, stranded (the scheduler then served nothing, forever)."""
    pipe = FakePipeline(eos=False)
    real = pipe.prefill

    def buggy(batch, timings=None, *, cache=None, slots=None):
        if batch.prompts[0] == "bug":
            raise KeyError("a bug")
        return real(batch, timings, cache=cache, slots=slots)

    pipe.prefill = buggy
    engine = engine_factory(pipe, max_batch=2)
    handles = [engine.submit(engine.prepare(None, "bug"), SamplingParams(max_tokens=3, temperature=0))
               for _ in range(2)]
    for handle in handles:
        failed = handle.result(timeout=5)
        assert failed.finish_reason == "error" and "internal error" in failed.error
    good = engine.generate(None, "goo", SamplingParams(max_tokens=3, temperature=0))
    assert good.token_ids == answer(pipe, "goo", 3)
    assert engine.stats().free_slots == 2


def test_sampling_params_are_validated():
    with pytest.raises(HimapError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(HimapError, match="top-p"):
        SamplingParams(top_p=0)
    with pytest.raises(HimapError, match="stop"):
        SamplingParams(stop=("",))


def test_async_iteration():
    import asyncio

    pipe = FakePipeline(eos=False)
    engine = Engine(pipe, max_batch=2).start()
    try:
        async def main():
            handle = engine.submit(engine.prepare(None, "abc"), SamplingParams(max_tokens=6, temperature=0),
                                   loop=asyncio.get_running_loop())
            return [event async for event in handle]

        events = asyncio.run(main())
        assert isinstance(events[-1], Completion) and events[-1].token_ids == answer(pipe, "abc", 6)
        assert "".join(e.text for e in events[:-1]) == events[-1].text
    finally:
        engine.stop(timeout=5)


def test_stop_cancels_what_is_left():
    pipe = FakePipeline(eos=False, max_seq_len=100_000, step_delay=0.002)
    engine = Engine(pipe, max_batch=1).start()
    handle = engine.submit(engine.prepare(None, "abc"), SamplingParams(max_tokens=50_000, temperature=0))
    waiting = engine.submit(engine.prepare(None, "def"), SamplingParams(max_tokens=5, temperature=0))
    stopper = threading.Thread(target=engine.stop, kwargs={"timeout": 0.1})
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive()
    assert handle.result(timeout=1).finish_reason == "cancelled"
    assert waiting.result(timeout=1).finish_reason in ("cancelled", "length")


# ---- reliability: bounded work, no shared lock, injected faults, a wedged loop --------------------------------
def test_question_over_the_byte_limit_is_refused_before_tokenizing(engine_factory, monkeypatch):
    from himap_trt.runtime.engine import question_byte_limit

    pipe = FakePipeline(max_seq_len=64)
    pipe.processor.tokenizer.get_vocab = lambda: {"a": 0, "abcd": 1, "\u00e9t\u00e9": 2}   # longest: 5 bytes
    engine = engine_factory(pipe)
    assert engine.max_question_bytes == question_byte_limit(pipe.processor.tokenizer, 64) == 64 * 5 * 4
    calls = []
    real = pipe.prepare
    monkeypatch.setattr(pipe, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(HimapError, match="has 1281 bytes; no question over 1280 bytes"):
        engine.prepare(None, "x" * 1281)
    with pytest.raises(HimapError, match="has 1282 bytes"):
        engine.prepare(None, "\u00e9" * 641)        # counted in UTF-8 bytes, not characters
    assert calls == []                              # never tokenized
    with pytest.raises(HimapError, match="--max-seq-len"):
        engine.prepare(None, "x" * 1280)            # within the byte bound: tokenized, then too long
    assert calls == [1]


def test_prepare_shares_no_lock_between_threads(engine_factory):
    """A prompt being tokenized (here: blocked) does not hold up another thread's prompt; each thread
    tokenizes with its own copy of the processor."""
    pipe = FakePipeline()
    entered, release = threading.Event(), threading.Event()
    real = pipe.prepare
    seen = []

    def prepare(images, questions, processor=None):
        seen.append(processor)
        if questions[0] == "slow":
            entered.set()
            assert release.wait(10)
        return real(images, questions, processor)

    pipe.prepare = prepare
    engine = engine_factory(pipe)
    slow = threading.Thread(target=engine.prepare, args=(None, "slow"))
    slow.start()
    assert entered.wait(5)
    started = time.perf_counter()
    engine.prepare(None, "fast")                  # returns while "slow" is still inside prepare
    assert time.perf_counter() - started < 1
    release.set()
    slow.join(5)
    assert seen[0] is not seen[1] and pipe.processor not in seen


@pytest.mark.parametrize("value", ["decode", "decode:0", "decode:x", "step:3", "decode:2:explode", "decode:2:hang=-1",
                                   "decode:2:hang=x", "prefill:1:error:extra"])
def test_fault_hook_bad_values_name_the_variable(value):
    from himap_trt.runtime.engine import FaultPlan

    with pytest.raises(HimapError, match=rf"HIMAP_TRT_TEST_FAULT: '{value}' is not PHASE:N"):
        FaultPlan(value)


def test_decode_fault_fails_only_the_running_batch(engine_factory, monkeypatch, caplog):
    """Decode call 3 raises: the two requests in that batch end with an error naming it, a request
    still waiting (no free slot) is served afterwards, and the slots are all free."""
    monkeypatch.setenv("HIMAP_TRT_TEST_FAULT", "decode:3")
    pipe = FakePipeline(eos=False, step_delay=0.01)
    engine = engine_factory(pipe, max_batch=2)
    params = SamplingParams(max_tokens=8, temperature=0)
    first = [engine.submit(engine.prepare(None, q), params) for q in ("ab", "cd")]
    waiting = engine.submit(engine.prepare(None, "efg"), params)
    with caplog.at_level("ERROR", logger="himap_trt.runtime.engine"):
        failed = [h.result(timeout=5) for h in first]
    assert [c.finish_reason for c in failed] == ["error", "error"]
    assert all("injected fault" in c.error and "decode call 3" in c.error for c in failed)
    served = waiting.result(timeout=5)
    assert served.finish_reason == "length" and served.token_ids == answer(pipe, "efg", 8)
    assert "decode failed for requests [1, 2]" in caplog.text
    assert engine.stats().free_slots == 2


def test_prefill_fault_fails_only_that_group(engine_factory, monkeypatch):
    """Prefill call 2 raises (not a HimapError): the running request from prefill 1 is not failed with it."""
    monkeypatch.setenv("HIMAP_TRT_TEST_FAULT", "prefill:2")
    pipe = FakePipeline(eos=False, step_delay=0.01)
    engine = engine_factory(pipe, max_batch=2)
    running = engine.submit(engine.prepare(None, "ab"), SamplingParams(max_tokens=20, temperature=0))
    while engine.stats().steps < 2:
        time.sleep(0.005)
    joined = engine.submit(engine.prepare(None, "xyz"), SamplingParams(max_tokens=3, temperature=0)).result(timeout=5)
    assert joined.finish_reason == "error" and "prefill call 2" in joined.error
    assert running.result(timeout=5).token_ids == answer(pipe, "ab", 20)


def test_stalled_seconds_show_a_hung_iteration(engine_factory, monkeypatch):
    monkeypatch.setenv("HIMAP_TRT_TEST_FAULT", "decode:2:hang=0.6")
    engine = engine_factory(FakePipeline(eos=False), max_batch=1)
    assert engine.stalled_s() == 0.0
    handle = engine.submit(engine.prepare(None, "ab"), SamplingParams(max_tokens=5, temperature=0))
    deadline = time.monotonic() + 5
    while engine.stalled_s() < 0.3:
        assert time.monotonic() < deadline, "the hang was never seen"
        time.sleep(0.01)
    assert handle.result(timeout=5).finish_reason == "length"
    assert engine.stalled_s() < 0.3


def test_room_counts_free_slots_and_queue(engine_factory):
    engine = engine_factory(FakePipeline(eos=False), max_batch=2, max_queue=0)
    assert engine.room() == 2
    handle = engine.submit(engine.prepare(None, "ab"), SamplingParams(max_tokens=3, temperature=0))   # max_queue 0
    assert handle.result(timeout=5).finish_reason == "length"


def test_vanishing_temperature_samples_the_most_likely_token():
    """Temperatures below float32's range made NaN probabilities (HTTP 500 found by the API fuzzer)."""
    from himap_trt.runtime.sampling import GenerationConfig, TokenChooser

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for temperature in (5e-324, 1e-300, 1e-45):
        chooser = TokenChooser(GenerationConfig(temperature=temperature, seed=1), torch.device("cpu"))
        assert chooser(logits).tolist() == logits.argmax(dim=-1).tolist()
    with pytest.raises(HimapError, match="--seed must be a signed 64-bit integer"):
        GenerationConfig(seed=2**64)
