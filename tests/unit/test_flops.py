"""FLOPs: the paper's Table 1 through Eq. 10, and the whole-prompt count against a direct sum."""

import pytest

from himap_trt.flops import flops_report, format_tflops, image_token_flops, prompt_flops, request_flops
from himap_trt.models import load_config, model_dims
from himap_trt.plan import build_plan


def _eq10(d, m, L, stages, n=576):
    """Eq. 10 written out independently: per-layer cost summed over every layer."""
    def omega(k):
        return 4 * k * d * d + 2 * k * k * d + 2 * k * d * m
    total, tokens = 0, n
    for layer in range(L):
        for k_layer, keep in stages:
            if layer == k_layer:
                tokens = keep
        total += omega(tokens)
    return total


@pytest.mark.parametrize("name,method,kw,stages,expected", [
    ("llava-1.5-7b", "none", {}, [], "2.98"),
    ("llava-1.5-7b", "fastv", dict(k=2, r=0.5), [(2, 288)], "1.56"),
    ("llava-1.5-7b", "himap", dict(k1=2, r1=0.5, k2=8, r2=0.75), [(2, 288), (8, 72)], "0.73"),
    ("llava-1.5-13b", "none", {}, [], "5.81"),
    ("llava-1.5-13b", "fastv", dict(k=3, r=0.5), [(3, 288)], "3.09"),
    ("llava-1.5-13b", "himap", dict(k1=3, r1=0.5, k2=8, r2=0.75), [(3, 288), (8, 72)], "1.36"),
])
def test_paper_table1(name, method, kw, stages, expected):
    dims = model_dims(load_config(name))
    plan = build_plan(method, num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens, **kw)
    flops = image_token_flops(plan, dims.hidden_size, dims.intermediate_size)
    assert flops == _eq10(dims.hidden_size, dims.intermediate_size, dims.num_layers, stages)
    assert format_tflops(flops) == expected


def test_himap_ratio_7b_is_about_a_quarter():
    dims = model_dims(load_config("llava-1.5-7b"))
    plan = build_plan("himap", num_layers=32, num_image_tokens=576)
    report = flops_report("llava-1.5-7b", plan, dims, 640)
    assert 0.24 <= report.image_tokens_ratio <= 0.25


def test_whole_prompt_count_matches_a_direct_sum():
    dims = model_dims(load_config("llava-1.5-7b"))
    plan = build_plan("himap", num_layers=32, num_image_tokens=576)
    text = 64
    d, m, h, dh, V = 4096, 11008, 32, 128, 32064
    decoder = 0
    for layer in range(32):
        n = text + (576 if layer < 2 else 288 if layer < 8 else 72)
        decoder += 2 * (4 * n * d * d) + 2 * 2 * n * n * d + 2 * 3 * n * d * m   # MHA: H*dh == d
    flops = prompt_flops(plan, dims, 576 + text)
    assert flops.decoder == decoder
    assert flops.lm_head == 2 * d * V
    # CLIP ViT-L/14-336 to layer 23 of 24: 577 tokens, hidden 1024, FFN 4096, plus patch embedding
    n, dv, mv = 577, 1024, 4096
    vision = 23 * (8 * n * dv * dv + 4 * n * n * dv + 4 * n * dv * mv) + 2 * 576 * 3 * 14 * 14 * dv
    vision += 2 * 576 * (dv * d + d * d)
    assert flops.vision == vision
    # the scoring graphs: img2txt and img2img rows over the full square at layers 1 and 7
    assert flops.scoring == 2 * (640 * 640 + 352 * 352) * h * dh


@pytest.mark.parametrize("kept", [0, 32, 64, None])
def test_visipruner_eq10_for_n_kept(kept):
    """VisiPruner on LLaVA-1.5-7B, K_M=16, K_E=24: 576 image tokens in layers 0-15, n in 16-23, none after."""
    dims = model_dims(load_config("llava-1.5-7b"))
    plan = build_plan("visipruner", num_layers=32, num_image_tokens=576, mid_layer=16, deep_layer=24)
    n = 64 if kept is None else kept                      # None: the 64 slots the static graphs compute
    expected = _eq10(dims.hidden_size, dims.intermediate_size, 32, [(16, n), (24, 0)])
    assert image_token_flops(plan, dims.hidden_size, dims.intermediate_size, kept) == expected
    report = flops_report("llava-1.5-7b", plan, dims, 640, kept=kept)
    assert report.image_tokens_ratio == pytest.approx(expected / _eq10(dims.hidden_size, dims.intermediate_size, 32, []))
    assert report.prompt_plan.total < report.prompt_baseline.total


def test_video_vision_attention_is_counted_per_temporal_patch():
    """A Qwen2.5-VL-7B video of 8 temporal patches x 16x16 merged tokens: the vision tower's attention
    is a square per temporal patch (8 squares of 1,024 patches), not one of 8,192."""
    dims = model_dims(load_config("qwen2.5-vl-7b"))
    plan = build_plan("none", num_layers=dims.num_layers, num_image_tokens=2048)
    tokens, t = 8 * 256, 8
    _, dense = request_flops(plan, dims, tokens, tokens + 20)
    _, blocked = request_flops(plan, dims, tokens, tokens + 20, vision_blocks=t)
    patches, dv = tokens * 4, dims.vision_hidden_size
    square = 4 * dv * dims.vision_layers_used          # 2 FLOPs x (q.k and p.v) per pair and channel, per layer
    assert dense.vision - blocked.vision == square * (patches * patches - t * (patches // t) ** 2)
    assert blocked.decoder == dense.decoder
