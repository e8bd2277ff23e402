"""One optimization profile per engine (``build --profiles shared``, issue 34): the merged profile
covers every shape either phase profile covers, and nothing beyond their bounding box."""

import itertools
import json

import pytest

from himap_trt.arch import get_architecture
from himap_trt.engines.profiles import (PROFILE_FORMS, Profile, ShapeRange, engine_profiles, graph_profiles,
                                        resolve_profile_form, shared_profile)
from himap_trt.errors import HimapError
from himap_trt.graphs.spec import graph_specs
from himap_trt.models import load_config, model_dims
from himap_trt.plan import build_plan


def _specs(model, method="himap", **kw):
    dims = model_dims(load_config(model))
    plan = build_plan(method, num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens, **kw)
    return plan, graph_specs(dims, plan, "float16", arch=get_architecture(dims.architecture))


def _corners(profile: Profile):
    """Every input at its min, opt and max, and mixed: input i at min, the others at max (and back)."""
    names = list(profile.shapes)
    yield {n: profile.shapes[n].min for n in names}
    yield {n: profile.shapes[n].opt for n in names}
    yield {n: profile.shapes[n].max for n in names}
    for low in names:
        yield {n: profile.shapes[n].min if n == low else profile.shapes[n].max for n in names}
        yield {n: profile.shapes[n].max if n == low else profile.shapes[n].min for n in names}


@pytest.mark.parametrize("model,method,kw", [("llava-1.5-7b", "himap", {}), ("tiny", "fastv", dict(k=2, r=0.5)),
                                             ("tiny-qwen2.5-vl", "himap", {})])
def test_shared_profile_covers_both_phases_and_no_more(model, method, kw):
    plan, specs = _specs(model, method, **kw)
    length = plan.num_image_tokens + 512
    for spec in specs:
        phases = graph_profiles(spec, plan, max_batch=3, max_seq_len=length)
        (shared,) = engine_profiles(spec, plan, max_batch=3, max_seq_len=length, form="shared")
        assert engine_profiles(spec, plan, max_batch=3, max_seq_len=length, form="phase") == phases
        for phase in phases:
            for call in _corners(phase):
                assert shared.covers(call), (spec.name, phase.name, call)
        for name, shape in shared.shapes.items():
            # the bounding box of the phases, computed here independently, and opt inside it
            for i in range(len(shape.min)):
                assert shape.min[i] == min(p.shapes[name].min[i] for p in phases), (spec.name, name)
                assert shape.max[i] == max(p.shapes[name].max[i] for p in phases), (spec.name, name)
                assert shape.min[i] <= shape.opt[i] <= shape.max[i]
        if len(phases) == 1:
            assert shared == phases[0]
        else:
            assert shared.name == "shared" and shared.shapes.keys() == phases[0].shapes.keys()
            # the prefill profile's opt is kept: a typical prompt is what the builder tunes for
            assert all(shared.shapes[n].opt == phases[0].shapes[n].opt for n in shared.shapes)


def test_segment_shared_profile_spans_decode_and_prefill():
    plan, specs = _specs("llava-1.5-7b")
    spec = next(s for s in specs if s.name == "segment_0")
    (shared,) = engine_profiles(spec, plan, max_batch=2, max_seq_len=2048, form="shared")
    assert shared.shapes["hidden_states"].min == (1, 1, 4096)           # a decode step
    assert shared.shapes["hidden_states"].max == (2, 2047, 4096)        # the longest prompt
    assert shared.shapes["past_key_values.0.key"].max == (2, 32, 2048, 128)   # the slot cache's buffer


def test_profile_form_resolution_and_refusals():
    assert PROFILE_FORMS == ("auto", "shared", "phase")
    assert resolve_profile_form("auto", "rtx") == "shared" and resolve_profile_form("auto", "tensorrt") == "phase"
    for form, key in itertools.product(("shared", "phase"), ("rtx", "tensorrt")):
        assert resolve_profile_form(form, key) == form
    with pytest.raises(HimapError, match="--profiles must be one of auto, shared, phase"):
        resolve_profile_form("one", "rtx")
    a = Profile("a", {"x": ShapeRange((1, 2), (1, 4), (2, 8))})
    with pytest.raises(HimapError, match="input 'x' with rank 2"):
        shared_profile([a, Profile("b", {"x": ShapeRange((1,), (1,), (2,))})])


def test_engines_manifests_before_issue_34_read_as_phase_without_figures():
    """New engines-manifest fields are optional: a format-3 manifest without them still reads."""
    from himap_trt.engines.manifest import EngineEntry, EnginesManifest

    plan, specs = _specs("tiny")
    data = {"format_version": 3, "package_version": "x", "export_fingerprint": "sha256:aa", "plan": plan.to_dict(),
            "dtype": "float32", "tensorrt_flavour": "rtx", "tensorrt_version": "1.7.1.116", "gpu_name": None,
            "compute_capabilities": ["8.6"], "kv_write": "scatternd", "max_batch": 1, "max_seq_len": 512,
            "workspace_bytes": 0, "engines": [{"graph": "vision", "file": "vision.engine", "profiles": []}],
            "files": {}}
    old = EnginesManifest.from_dict(data)
    assert old.profile_form == "phase" and old.build_peak_rss_bytes is None and old.size_totals() is None
    assert old.engines[0] == EngineEntry("vision", "vision.engine", ()) and old.engines[0].files == ["vision.engine"]
    new = EnginesManifest.from_dict({**data, "profile_form": "shared", "build_peak_rss_bytes": 7,
                                     "engines": [{"graph": "segment_0", "file": "s.engine", "profiles": [],
                                                  "engine_bytes": 110, "weight_bytes": 100, "build_seconds": 1.5}]})
    assert new.profile_form == "shared" and new.size_totals("segment") == (110, 100)
    assert new.engines[0].ratio == 1.1
    assert EnginesManifest.from_dict(json.loads(json.dumps(new.to_dict()))) == new
