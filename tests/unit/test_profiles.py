"""Optimization profiles: the arithmetic against the plan, and coverage of what the runtime feeds."""

import pytest

from himap_trt.arch import get_architecture
from himap_trt.engines.profiles import Profile, ShapeRange, graph_profiles, kv_cache_bytes
from himap_trt.errors import HimapError
from himap_trt.graphs.spec import graph_specs
from himap_trt.models import load_config, model_dims
from himap_trt.plan import build_plan


def _specs(model, method="himap", dtype="float16", **kw):
    dims = model_dims(load_config(model))
    plan = build_plan(method, num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens, **kw)
    return dims, plan, {s.name: s for s in graph_specs(dims, plan, dtype, arch=get_architecture(dims.architecture))}


def test_default_himap_profiles_of_llava_7b():
    dims, plan, specs = _specs("llava-1.5-7b")
    L, B = 2048, 4
    # image tokens removed before each segment: 0, 576-288, 576-72
    for name, dropped, first_layer in (("segment_0", 0, 0), ("segment_1", 288, 2), ("segment_2", 504, 8)):
        prefill, decode = graph_profiles(specs[name], plan, max_batch=B, max_seq_len=L)
        assert (prefill.name, decode.name) == ("prefill", "decode")
        longest = L - 1 - dropped          # prompt and cache maxima of this segment
        assert prefill.shapes["hidden_states"] == ShapeRange((1, 2, 4096), (1, 640 - dropped, 4096), (B, longest, 4096))
        assert prefill.shapes["attention_mask"].max == (B, longest)
        past = prefill.shapes[f"past_key_values.{first_layer}.key"]
        # prefill writes the prompt into a buffer of exactly its length
        assert (past.min, past.max) == ((1, 32, 2, 128), (B, 32, longest, 128))
        # a decode call is covered by the decode profile only (the first covering profile is selected)
        call = {name: shape.max for name, shape in decode.shapes.items()}
        assert decode.covers(call) and not prefill.covers(call)
        assert prefill.shapes["cache_position"].max == (B,)
        assert decode.shapes["hidden_states"].max == (B, 1, 4096)
        assert decode.shapes[f"past_key_values.{first_layer}.value"].min == (1, 32, 2, 128)
        # decode runs on the slot cache's buffers: max_len_j = L - dropped positions (the last a scratch column)
        assert decode.shapes[f"past_key_values.{first_layer}.value"].max == (B, 32, longest + 1, 128)
        assert decode.shapes["attention_mask"].max == (B, longest + 1)
    (score0,) = graph_profiles(specs["scoring_0"], plan, max_batch=B, max_seq_len=L)
    assert score0.shapes["hidden_states"].min == (1, 577, 4096) and score0.shapes["hidden_states"].max == (B, 2047, 4096)
    (score1,) = graph_profiles(specs["scoring_1"], plan, max_batch=B, max_seq_len=L)
    assert score1.shapes["query.7"].min == (1, 32, 289, 128) and score1.shapes["query.7"].max == (B, 32, 1759, 128)
    (vision,) = graph_profiles(specs["vision"], plan, max_batch=B, max_seq_len=L)
    assert vision.shapes["pixel_values"] == ShapeRange((1, 3, 336, 336), (1, 3, 336, 336), (B, 3, 336, 336))


def test_kv_cache_bytes_at_maxima():
    dims, plan, specs = _specs("llava-1.5-7b")
    tokens = [2047, 1759, 1543]
    expected = sum(2 * layers * 32 * n * 128 * 2 for layers, n in zip((2, 6, 24), tokens))   # fp16, K and V
    assert kv_cache_bytes(list(specs.values()), 1, tokens) == expected


def test_profile_limits_are_validated():
    dims, plan, specs = _specs("tiny")
    with pytest.raises(HimapError, match="--max-seq-len"):
        graph_profiles(specs["segment_0"], plan, max_batch=1, max_seq_len=100)
    with pytest.raises(HimapError, match="--max-batch"):
        graph_profiles(specs["segment_0"], plan, max_batch=0, max_seq_len=1024)


def test_profile_covers():
    profile = Profile("p", {"x": ShapeRange((1, 1), (1, 8), (2, 16))})
    assert profile.covers({"x": (2, 16)}) and profile.covers({"x": (1, 1)})
    assert not profile.covers({"x": (3, 4)}) and not profile.covers({"x": (1, 17)}) and not profile.covers({"y": (1, 1)})
    assert Profile.from_dict(profile.to_dict()) == profile


def _record_calls(pipe):
    """Make every backend of ``pipe`` record its calls' input shapes; returns the record."""
    seen: dict[str, list[dict]] = {}
    for name, backend in pipe.backends.items():
        def wrap(run, name=name):
            def recording(feeds, outputs=None):
                seen.setdefault(name, []).append({k: tuple(v.shape) for k, v in feeds.items()})
                return run(feeds, outputs)
            return recording
        backend.run = wrap(backend.run)
    return seen


@pytest.mark.parametrize("method,kw", [("himap", {}), ("fastv", {}), ("none", {}), ("himap", dict(k1=3, k2=6))])
def test_profiles_cover_every_call_and_are_tight(method, kw, requests_3):
    """Run the reference pipeline to max_seq_len and check that every graph call's input shapes lie in
    one of that graph's profiles, and that the limiting calls reach the maxima exactly: prefill
    maxima with a prompt of max_seq_len - 1 tokens, decode maxima at the last step of a longer run."""
    from conftest import tiny
    from himap_trt.runtime import GenerationConfig, reference_pipeline

    loaded = tiny("tiny")
    dims = loaded.dims
    plan = build_plan(method, num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens, **kw)
    images, questions = requests_3
    prompt = None
    for extra, phase in ((1, "prefill"), (6, "decode")):
        pipe = reference_pipeline(loaded, plan)
        batch = pipe.prepare(images, questions)
        prompt = batch.input_ids.shape[1]
        max_seq_len = prompt + extra
        pipe.max_seq_len = max_seq_len
        seen = _record_calls(pipe)
        out = pipe.generate(batch, GenerationConfig(max_new_tokens=50))
        assert out.finish_reasons == ["max_seq_len"] * 3 and out.sequences.shape[1] == extra
        for spec in pipe.specs.values():
            profiles = graph_profiles(spec, plan, max_batch=3, max_seq_len=max_seq_len)
            for call in seen[spec.name]:
                assert any(p.covers(call) for p in profiles), (spec.name, call)
                if len(profiles) > 1:    # the runtime selects the first covering profile: it must be the call's own
                    one_token = call.get("hidden_states", call.get("input_ids"))[1] == 1
                    first = next(p for p in profiles if p.covers(call))
                    assert first.name == ("decode" if one_token else "prefill"), (spec.name, call)
            for profile in profiles:
                if profile.name != phase:
                    continue
                for name, shape in profile.shapes.items():
                    reached = max(call[name] for call in seen[spec.name] if profile.covers(call))
                    assert reached == shape.max, (spec.name, profile.name, name, reached, shape.max)
