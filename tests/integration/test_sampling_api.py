"""The API's sampling fields in the engine, each against an independent computation on transformers'
own model (``--method none``, so the reference is the unpruned model):

- logprobs / top_logprobs = log_softmax of transformers' logits at each generated position;
- repetition_penalty and min_tokens = transformers' ``generate`` (its own logits processors);
- presence / frequency penalties = a plain loop over transformers' logits applying OpenAI's formula;
- n > 1: one prefill, n slots; choice i = the same request alone with seed + i.
"""

import pytest
import torch

from conftest import tiny
from himap_trt.chat import parse_messages
from himap_trt.plan import build_plan
from himap_trt.runtime import reference_pipeline
from himap_trt.runtime.engine import Engine, SamplingParams

MODEL = "tiny"


@pytest.fixture(scope="module")
def setup(photo):
    loaded = tiny(MODEL)
    d = loaded.dims
    pipe = reference_pipeline(loaded, build_plan("none", num_layers=d.num_layers, num_image_tokens=d.num_image_tokens),
                              max_seq_len=d.num_image_tokens + 100)
    prefills = []
    engine = Engine(pipe, max_batch=4, on_step=lambda phase, n, s: prefills.append(n) if phase == "prefill" else None)
    engine.start()
    conversation = parse_messages([
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "Hi?"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is shown?"}])
    prompt = engine.prepare_conversation(conversation, [photo.convert("RGB")])
    yield loaded, engine, prompt, prefills
    engine.stop(timeout=10)


def _hf_logits(loaded, prompt, tokens):
    """transformers' next-token logits after the prompt and each generated token: [len(tokens), vocab]."""
    ids = torch.cat([prompt.input_ids, torch.tensor([tokens[:-1]], dtype=torch.int64)], dim=1)
    with torch.no_grad():
        out = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt.pixel_values)
    return out.logits[0, prompt.input_ids.shape[1] - 1:].float()


def test_logprobs_equal_log_softmax_of_transformers_logits(setup):
    loaded, engine, prompt, _ = setup
    done = engine.submit(prompt, SamplingParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=5,
                                                ignore_eos=True)).result(timeout=300)
    expected = torch.log_softmax(_hf_logits(loaded, prompt, done.token_ids), dim=-1)
    assert len(done.logprobs) == len(done.token_ids) == 6
    for step, (token, logprob, top) in enumerate(done.logprobs):
        assert token == done.token_ids[step] == int(expected[step].argmax())
        assert logprob == pytest.approx(float(expected[step, token]), abs=1e-4)
        values, ids = torch.topk(expected[step], 5)
        assert [t for t, _ in top] == ids.tolist()
        assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-4)


def _hf_generate(loaded, prompt, eos, **kw):
    with torch.no_grad():
        hf = loaded.model.generate(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                                   pixel_values=prompt.pixel_values, do_sample=False, eos_token_id=eos,
                                   pad_token_id=0, **kw)
    expected = hf[0, prompt.input_ids.shape[1]:].tolist()
    return expected[:next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))]


def test_repetition_penalty_equals_transformers_generate(setup):
    loaded, engine, prompt, _ = setup
    done = engine.submit(prompt, SamplingParams(max_tokens=16, temperature=0, repetition_penalty=8.0)).result(timeout=300)
    assert done.token_ids == _hf_generate(loaded, prompt, list(engine.eos_token_ids), max_new_tokens=16,
                                          repetition_penalty=8.0)
    plain = engine.submit(prompt, SamplingParams(max_tokens=16, temperature=0)).result(timeout=300)
    assert plain.token_ids != done.token_ids           # the penalty changed the answer


def test_min_tokens_equals_transformers_generate(setup):
    loaded, engine, prompt, _ = setup
    plain = engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0)).result(timeout=300)
    saved = engine.eos_token_ids
    engine.eos_token_ids = {plain.token_ids[2]}        # a token the model picks third ends the answer
    try:
        short = engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0)).result(timeout=300)
        held = engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0, min_tokens=5)).result(timeout=300)
    finally:
        engine.eos_token_ids = saved
    assert len(short.token_ids) == 3
    assert held.token_ids == _hf_generate(loaded, prompt, [plain.token_ids[2]], max_new_tokens=8, min_new_tokens=5)
    assert len(held.token_ids) > 5


def test_presence_and_frequency_penalties_follow_openai_formula(setup):
    loaded, engine, prompt, _ = setup
    presence, frequency = -2.0, -1.0      # negative: repeats, which this random model otherwise avoids
    done = engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0, presence_penalty=presence,
                                                frequency_penalty=frequency, ignore_eos=True)).result(timeout=300)
    tokens: list[int] = []
    for _ in range(8):     # OpenAI: logit[t] -= frequency * count[t] + presence * (count[t] > 0)
        logits = _hf_logits(loaded, prompt, tokens + [0])[-1].clone()
        for t in set(tokens):
            logits[t] -= frequency * tokens.count(t) + presence
        tokens.append(int(logits.argmax()))
    assert done.token_ids == tokens
    plain = engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)).result(timeout=300)
    assert plain.token_ids != tokens                   # the penalties changed the answer


def test_n_choices_share_one_prefill_and_match_separate_seeded_requests(setup):
    _, engine, prompt, prefills = setup
    prefills.clear()
    handle = engine.submit(prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=11, n=3, ignore_eos=True))
    choices = [c for c in handle if hasattr(c, "finish_reason")]
    assert prefills == [1]                                    # one prompt prefilled for 3 choices
    assert sorted(c.index for c in choices) == [0, 1, 2]
    for choice in choices:
        alone = engine.submit(prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=11 + choice.index,
                                                     ignore_eos=True)).result(timeout=300)
        assert choice.token_ids == alone.token_ids
    assert len({tuple(c.token_ids) for c in choices}) > 1


def test_n_beyond_the_slots_is_refused(setup):
    _, engine, prompt, _ = setup
    with pytest.raises(Exception, match=r"n: 5 choices need 5 slots; this server has 4"):
        engine.submit(prompt, SamplingParams(n=5))
