import pytest

from himap_trt.errors import HimapError
from himap_trt.plan import PruningPlan, Stage, build_plan, keep_count, validate_plan


def test_himap_defaults_keep_288_then_72_of_576():
    plan = build_plan("himap", num_layers=32, num_image_tokens=576)
    assert [(s.layer, s.criterion, s.keep) for s in plan.stages] == [(2, "img2txt", 288), (8, "img2img", 72)]
    assert plan.segments == [(0, 2), (2, 8), (8, 32)]
    assert plan.image_tokens_per_segment == [576, 288, 72]


def test_fastv_and_none():
    fastv = build_plan("fastv", num_layers=40, num_image_tokens=576, k=3, r=0.5)
    assert fastv.segments == [(0, 3), (3, 40)]
    assert fastv.stages == (Stage(3, "last_row", 288, 0.5),)
    none = build_plan("none", num_layers=12, num_image_tokens=144)
    assert none.segments == [(0, 12)] and none.stages == ()


@pytest.mark.parametrize("ratio,tokens", [(0.5, 576), (0.75, 288), (0.5, 144), (0.75, 72), (0.3, 10), (0.25, 7)])
def test_keep_count_is_round_half_up_of_remaining_fraction(ratio, tokens):
    exact = (1 - ratio) * tokens
    expected = int(exact) + (1 if exact - int(exact) >= 0.5 - 1e-9 else 0)
    assert keep_count(ratio, tokens) == expected


@pytest.mark.parametrize("kwargs,flag", [
    (dict(method="himap", k1=8, k2=2), "--k2"),
    (dict(method="himap", k1=3, k2=3), "--k2"),
    (dict(method="himap", k1=0), "--k1"),
    (dict(method="himap", k2=12), "--k2"),
    (dict(method="himap", r1=1.0), "--r1"),
    (dict(method="himap", r2=-0.1), "--r2"),
    (dict(method="himap", r2=0.999), "--r2"),          # keeps round(0.001 * 72) = 0
    (dict(method="fastv", k=12), "--k"),
    (dict(method="fastv", r=1.5), "--r"),
    (dict(method="bogus"), "--method"),
])
def test_invalid_plans_name_the_flag(kwargs, flag):
    method = kwargs.pop("method")
    with pytest.raises(HimapError) as info:
        build_plan(method, num_layers=12, num_image_tokens=144, **kwargs)
    assert str(info.value).startswith(flag + " ") or f" {flag} " in str(info.value)


def test_plan_json_round_trip_and_validation():
    plan = build_plan("himap", num_layers=12, num_image_tokens=144, k1=3, k2=6)
    assert PruningPlan.from_dict(plan.to_dict()) == plan
    broken = plan.to_dict()
    broken["stages"][1]["keep"] = 500
    with pytest.raises(HimapError):
        PruningPlan.from_dict(broken)
    with pytest.raises(HimapError):
        validate_plan(PruningPlan("himap", 12, 144, (Stage(5, "img2txt", 10, 0.5), Stage(3, "img2img", 5, 0.5))))


def test_visipruner_defaults_and_round_trip():
    plan = build_plan("visipruner", num_layers=32, num_image_tokens=576)
    assert plan.stages == (Stage(16, "value_norm", 64, 1 - 64 / 576, 0.2), Stage(24, "drop_all", 0, 1.0))
    assert plan.segments == [(0, 16), (16, 24), (24, 32)]
    assert plan.image_tokens_per_segment == [576, 64, 0]
    assert PruningPlan.from_dict(plan.to_dict()) == plan
    tiny = build_plan("visipruner", num_layers=12, num_image_tokens=144, mid_layer=3, deep_layer=5, threshold=0.5,
                      max_keep=144)
    assert [(s.layer, s.keep, s.threshold) for s in tiny.stages] == [(3, 144, 0.5), (5, 0, None)]


@pytest.mark.parametrize("kwargs,flag", [
    (dict(mid_layer=6, deep_layer=6), "--deep-layer"),
    (dict(mid_layer=0), "--mid-layer"),
    (dict(deep_layer=12), "--deep-layer"),
    (dict(max_keep=0), "--max-keep"),
    (dict(max_keep=145), "--max-keep"),
    (dict(threshold=-0.1), "--threshold"),
    (dict(threshold=float("nan")), "--threshold"),
])
def test_invalid_visipruner_plans_name_the_flag(kwargs, flag):
    with pytest.raises(HimapError) as info:
        build_plan("visipruner", num_layers=12, num_image_tokens=144, **kwargs)
    assert str(info.value).startswith(flag + " ")


def test_drop_all_and_value_norm_stages_are_validated():
    with pytest.raises(HimapError):
        validate_plan(PruningPlan("visipruner", 12, 144, (Stage(3, "value_norm", 10, 0.9), Stage(5, "drop_all", 0, 1.0))))
    with pytest.raises(HimapError):
        validate_plan(PruningPlan("visipruner", 12, 144, (Stage(3, "value_norm", 10, 0.9, 0.2), Stage(5, "drop_all", 3, 1.0))))
