"""The architecture interface: one model_type lookup, known configs, per-request keep counts, the
Qwen2.5-VL graph declarations and the options that only apply to it."""

import pytest
from typer.testing import CliRunner

from himap_trt.arch import ARCHITECTURES, architecture_for, get_architecture, known_models
from himap_trt.cli import app
from himap_trt.errors import HimapError
from himap_trt.graphs.spec import graph_specs
from himap_trt.models import resolve_dims
from himap_trt.plan import build_plan, keep_count


def test_one_lookup_from_model_type():
    for name in ("llava-1.5-7b", "qwen2.5-vl-7b", "qwen2.5-vl-3b"):
        config = known_models()[name][1]()
        assert architecture_for(config) is ARCHITECTURES[config.model_type]
    with pytest.raises(HimapError, match="unsupported model 'x'.*supported: LLaVA-1.5.*Qwen2.5-VL"):
        architecture_for(type("C", (), {"model_type": "mllama"})(), "x")
    with pytest.raises(HimapError, match="unknown architecture"):
        get_architecture("internvl")


def test_known_qwen_dims():
    config = known_models()["qwen2.5-vl-7b"][1]()
    dims = resolve_dims("qwen2.5-vl-7b", config, 1280)
    assert (dims.hidden_size, dims.intermediate_size, dims.num_layers, dims.num_heads, dims.num_kv_heads,
            dims.head_dim) == (3584, 18944, 28, 28, 4, 128)
    assert (dims.num_image_tokens, dims.vision_tokens, dims.architecture) == (1280, 5120, "qwen2_5_vl")
    assert resolve_dims("qwen2.5-vl-7b", config).num_image_tokens == 16384     # 12845056 px / 28²
    with pytest.raises(HimapError, match="--max-image-tokens is for models with per-request"):
        resolve_dims("llava-1.5-7b", known_models()["llava-1.5-7b"][1](), 100)


@pytest.mark.parametrize("tokens", [4, 5, 16, 25, 56, 63, 64])
def test_per_request_keep_counts_follow_methods_rounding(tokens):
    plan = build_plan("himap", num_layers=12, num_image_tokens=64, k1=2, r1=0.5, k2=8, r2=0.75)
    n1 = int((0.5 * tokens) + 0.5)
    assert plan.image_tokens_for(tokens) == [tokens, n1, max(1, int(0.25 * n1 + 0.5))]
    assert plan.image_tokens_for(64) == plan.image_tokens_per_segment
    fastv = build_plan("fastv", num_layers=12, num_image_tokens=64, k=2, r=0.75)
    assert fastv.image_tokens_for(tokens) == [tokens, max(1, keep_count(0.75, tokens))]


def test_qwen_graph_declarations():
    dims = resolve_dims("qwen2.5-vl-3b", known_models()["qwen2.5-vl-3b"][1](), 256)
    plan = build_plan("himap", num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens)
    specs = {s.name: s for s in graph_specs(dims, plan, "float16", arch=get_architecture(dims.architecture))}
    assert specs["segment_0"].input("position_ids").shape == (3, "batch", "sequence")
    scoring = specs["scoring_0"]
    assert [t.name for t in scoring.inputs][-3:] == ["keep_counts", "image_slots", "kept_slots"]
    assert scoring.output("kept_hidden_states").shape == ("batch", "sequence - image_slots + kept_slots", 2048)
    assert scoring.output("kept_position_ids").shape == (3, "batch", "sequence - image_slots + kept_slots")
    assert (scoring.attrs["entering"], scoring.attrs["keep"]) == (256, 128)
    assert specs["vision"].input("pixel_values").shape == ("num_patches", 1176)
    # VisiPruner (issue 31): the middle stage takes the image-slot inputs and the values, the deep one only E
    visi = build_plan("visipruner", num_layers=dims.num_layers, num_image_tokens=256, max_keep=64)
    specs = {s.name: s for s in graph_specs(dims, visi, "float16", arch=get_architecture(dims.architecture))}
    middle, deep = specs["scoring_0"], specs["scoring_1"]
    assert middle.input_names[:3] == ["query.17", "present.17.key", "present.17.value"]
    assert middle.input_names[-3:] == ["keep_counts", "image_slots", "kept_slots"]
    assert middle.output("kept_position_ids").shape == (3, "batch", "sequence - image_slots + kept_slots")
    assert deep.input_names == ["attention_mask", "token_type_ids", "hidden_states", "position_ids", "image_slots"]
    assert deep.output("kept_hidden_states").shape == ("batch", "sequence - image_slots", 2048)
    assert (deep.attrs["entering"], deep.attrs["keep"], deep.attrs["variable"]) == (64, 0, True)
    assert visi.image_tokens_for(300) == [300, 64, 0] and visi.image_tokens_for(20) == [20, 20, 0]


def test_llava_graph_declarations_unchanged():
    dims = resolve_dims("llava-1.5-7b", known_models()["llava-1.5-7b"][1]())
    plan = build_plan("himap", num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens)
    specs = {s.name: s for s in graph_specs(dims, plan, "float16", arch=get_architecture(dims.architecture))}
    assert specs["vision"].input("pixel_values").shape == ("batch", 3, 336, 336)
    assert specs["segment_1"].input("position_ids").shape == ("batch", "sequence")
    assert specs["scoring_0"].output("kept_position_ids").shape == ("batch", "sequence - 288")
    assert "keep_counts" not in specs["scoring_0"].input_names and "variable" not in specs["scoring_0"].attrs


def test_cli_refuses_max_image_tokens_for_llava_and_image_tokens_below_one():
    runner = CliRunner()
    result = runner.invoke(app, ["flops", "--model", "llava-1.5-7b", "--max-image-tokens", "100"])
    assert result.exit_code != 0 and "--max-image-tokens is for models" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["flops", "--model", "qwen2.5-vl-7b", "--image-tokens", "0"])
    assert result.exit_code != 0 and "--image-tokens must be at least 1" in result.output


def test_qwen3_graph_declarations_carry_deepstack():
    """qwen3-vl-8b: DeepStack into decoder layers 0-2; HiMAP's K1 = 2 puts layer 2's input in segment 1."""
    config = known_models()["qwen3-vl-8b"][1]()
    assert architecture_for(config).name == "qwen3_vl"
    dims = resolve_dims("qwen3-vl-8b", config, 1024)
    assert (dims.hidden_size, dims.num_layers, dims.deepstack_layers, dims.patch_size) == (4096, 36, 3, 16)
    plan = build_plan("himap", num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens)
    specs = {s.name: s for s in graph_specs(dims, plan, "float16", arch=get_architecture(dims.architecture))}
    deep = {name: [t.name for t in s.inputs if t.name.startswith("deepstack.")] for name, s in specs.items()
            if s.kind == "segment"}
    assert deep == {"segment_0": ["deepstack.0", "deepstack.1"], "segment_1": ["deepstack.2"], "segment_2": []}
    assert specs["segment_1"].input("deepstack.2").shape == ("batch", "sequence", 4096)
    vision = specs["vision"]
    assert vision.input("pixel_values").shape == ("num_patches", 1536)
    assert vision.output("deepstack_embeds").shape == (3, "num_image_tokens", 4096)
    bad = known_models()["qwen3-vl-8b"][1]()
    bad.text_config.rope_parameters["mrope_section"] = [24, 20, 10]
    with pytest.raises(HimapError, match="mrope_section"):
        architecture_for(bad).check_supported(bad, "bad")
