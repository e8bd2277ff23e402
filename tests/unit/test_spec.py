import pytest

from himap_trt.arch import get_architecture
from himap_trt.errors import HimapError
from himap_trt.graphs.spec import eval_dim, graph_specs
from himap_trt.models import load_config, model_dims
from himap_trt.plan import build_plan


def test_eval_dim():
    sizes = {"batch": 2, "sequence": 7, "past_sequence": 5}
    assert eval_dim(64, sizes) == 64
    assert eval_dim("past_sequence + sequence", sizes) == 12
    assert eval_dim("sequence - 3", sizes) == 4
    assert eval_dim("batch", sizes) == 2
    with pytest.raises(HimapError):
        eval_dim("tokens", sizes)
    with pytest.raises(HimapError):
        eval_dim("sequence sequence", sizes)


def test_specs_follow_the_plan_for_7b_dimensions():
    dims = model_dims(load_config("llava-1.5-7b"))
    plan = build_plan("himap", num_layers=32, num_image_tokens=576)
    specs = graph_specs(dims, plan, "float16", arch=get_architecture(dims.architecture))
    assert [s.name for s in specs] == ["vision", "embed", "segment_0", "scoring_0", "segment_1", "scoring_1",
                                       "segment_2"]
    seg1 = specs[4]
    assert seg1.layers == (2, 8)
    assert seg1.input_names[:4] == ["hidden_states", "position_ids", "attention_mask", "cache_position"]
    assert seg1.input_names[4:6] == ["past_key_values.2.key", "past_key_values.2.value"]
    assert seg1.output_names[-1] == "query.7"
    # the preallocated buffer goes in and comes out with the same shape (written in place)
    assert seg1.input("past_key_values.7.value").shape == ("batch", 32, "cache_sequence", 128)
    assert seg1.output("present.7.value").shape == ("batch", 32, "cache_sequence", 128)
    assert seg1.input("attention_mask").shape == ("batch", "cache_sequence")
    assert seg1.input("cache_position").shape == ("batch",)
    assert specs[-1].output_names[0] == "logits" and specs[-1].output("logits").shape == ("batch", 32064)
    scoring = specs[5]
    assert scoring.attrs == {"criterion": "img2img", "keep": 72, "entering": 288}
    assert scoring.input_names[:2] == ["query.7", "present.7.key"]
    assert scoring.output("kept_hidden_states").shape == ("batch", "sequence - 216", 4096)
