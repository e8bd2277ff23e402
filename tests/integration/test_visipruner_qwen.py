"""VisiPruner on the families with per-request visual-token counts (Qwen2.5-VL, Qwen3-VL; issue 31).

- Kept image tokens of the middle stage (K_M) = VisiPruner's criterion (METHODS.md: tokens whose
  value contribution ``s(v) = ||concat_h A_h[last, v] V_h[v]||`` to the last prompt token exceeds tau,
  at most C, best first) applied by hand to transformers' eager attention probabilities
  (``output_attentions=True``) and the layer's own value projection, on transformers' own padded batch
  of three image sizes, and on one short clip (video). Rows keep different counts, one capped at C, the
  others fewer (masked slots); at K_E no image token is left. K_M = 2 so that on Qwen3-VL the DeepStack
  addition after layer 2 comes after the middle stage (gathered with its kept indices). A 2-image
  conversation (Qwen2.5-VL): both images' tokens ranked together, as transformers' encoding gives.
- Qwen3-VL's DeepStack after the stage: the prefill's logits = transformers' decoder run piecewise on
  the kept tokens with the kept image tokens' DeepStack features (a wrong gather changes them).
- EVS + VisiPruner (Qwen2.5-VL): the kept tokens = the criterion on transformers' decoder given EVS's
  output, at the unpruned positions.
- ONNX Runtime = the PyTorch reference, token for token and kept index for kept index.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers.models.llama.modeling_llama import repeat_kv
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

from conftest import entering_hidden_states, exported, tiny
from himap_trt.plan import build_plan, with_evs
from himap_trt.runtime import GenerationConfig, reference_pipeline
from himap_trt.video import load_video, moving_shapes_clip

MODELS = ["tiny-qwen2.5-vl", "tiny-qwen3-vl"]
MID, DEEP = 2, 5
QUESTION = "What moves?"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return moving_shapes_clip(tmp_path_factory.mktemp("visipruner") / "shapes.mp4", frames=16, fps=8)


def _plan(loaded, **kw):
    d = loaded.dims
    return build_plan("visipruner", num_layers=d.num_layers, num_image_tokens=d.num_image_tokens, mid_layer=MID,
                      deep_layer=DEEP, **kw)


def hand_scores(loaded, inputs, forward=None):
    """[B,S] float64 s(v) of layer K_M-1 from transformers' forward on ``inputs`` (its own padding,
    positions and DeepStack; ``forward``: the module to call, default the whole model), eager
    attention probabilities and the layer's v_proj."""
    model = loaded.model
    layer = model.model.language_model.layers[MID - 1]
    with entering_hidden_states(model.model.language_model.layers, [MID - 1]) as entering, torch.no_grad():
        out = (forward or model)(**inputs, output_attentions=True)
        attn = layer.self_attn
        x = layer.input_layernorm(entering[MID - 1])
        b, s, _ = x.shape
        values = attn.v_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)                   # [B,Hkv,S,Dh]
    values = repeat_kv(values, attn.num_key_value_groups).double()                            # [B,H,S,Dh]
    last = out.attentions[MID - 1][:, :, -1].double()                                         # [B,H,S]
    return (last ** 2 * (values ** 2).sum(-1)).sum(1).sqrt()


def hand_kept(scores, visual, mask, tau, cap):
    """Per row, the kept visual tokens as ordinals among the row's real tokens (padding-free)."""
    kept = []
    for row in range(scores.shape[0]):
        ordinal = (mask[row].cumsum(0) - 1).tolist()
        image = [i for i in range(scores.shape[1]) if visual[row, i] and mask[row, i]]
        best = sorted([v for v in image if scores[row, v] > tau], key=lambda v: (-float(scores[row, v]), v))[:cap]
        kept.append(sorted(ordinal[v] for v in best))
    return kept


def ours_kept(state, batch):
    """Per row, the middle stage's kept image positions as ordinals among the row's real tokens."""
    mask = batch.attention_mask
    return [[int(mask[row, :p].sum()) for p in positions] for row, positions in
            enumerate(state.stages[0].kept_image_positions)]


def _thresholds(scores, visual, mask):
    """tau halfway between row 0's 5th and 6th best scores, C one below the largest count above tau."""
    row0 = scores[0][visual[0] & mask[0].bool()].sort(descending=True).values
    tau = float(row0[4] + row0[5]) / 2
    uncapped = [len(k) for k in hand_kept(scores, visual, mask, tau, 10 ** 6)]
    return tau, max(uncapped) - 1


def _check(loaded, batch, scores, visual, hf_mask):
    tau, cap = _thresholds(scores, visual, hf_mask)
    expected = hand_kept(scores, visual, hf_mask, tau, cap)
    counts = [len(k) for k in expected]
    pipe = reference_pipeline(loaded, _plan(loaded, threshold=tau, max_keep=cap))
    with torch.inference_mode():
        state = pipe.prefill(batch)
    assert ours_kept(state, batch) == expected
    slots = max(min(cap, n) for n in batch.image_tokens)
    middle, deep = state.stages
    assert middle.kept_indices.shape[1] == batch.input_ids.shape[1] - max(batch.image_tokens) + slots
    assert deep.kept_image_positions == [[] for _ in counts]
    assert deep.kept_indices.shape[1] == batch.input_ids.shape[1] - max(batch.image_tokens)
    assert [c[1] for c in state.image_tokens] == counts and all(c[2] == 0 for c in state.image_tokens)
    return counts, cap


@pytest.mark.parametrize("model", MODELS)
def test_three_image_sizes_in_one_padded_batch_equal_transformers_eager_attention(model, qwen_requests):
    loaded = tiny(model)
    images, questions = qwen_requests
    batch = reference_pipeline(loaded, _plan(loaded)).prepare(images, questions)
    assert len(set(batch.image_tokens)) == 3 and (batch.attention_mask == 0).any()
    enc = loaded.processor(images=images, text=batch.prompts, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    visual = enc["input_ids"] == loaded.model.config.image_token_id
    counts, cap = _check(loaded, batch, hand_scores(loaded, enc), visual, enc["attention_mask"])
    assert min(counts) < cap and cap in counts and len(set(counts)) > 1, counts     # one capped, masked slots


@pytest.mark.parametrize("model", MODELS)
def test_one_clip_equals_transformers_eager_attention(model, clip):
    loaded = tiny(model)
    config = loaded.model.config
    video = load_video(clip, fps=2, max_frames=4)
    batch = reference_pipeline(loaded, _plan(loaded)).prepare([video], [QUESTION])
    assert batch.media == ["video"]
    ids = torch.where(batch.input_ids == config.image_token_id, config.video_token_id, batch.input_ids)
    extra = {"second_per_grid_ts": torch.tensor([2 / video.fps])} if model == "tiny-qwen2.5-vl" else {}
    inputs = dict(input_ids=ids, attention_mask=batch.attention_mask,
                  mm_token_type_ids=(ids == config.video_token_id).long() * 2,
                  pixel_values_videos=batch.pixel_values, video_grid_thw=batch.image_grid_thw, **extra)
    counts, cap = _check(loaded, batch, hand_scores(loaded, inputs), ids == config.video_token_id,
                         batch.attention_mask)
    assert 0 < counts[0] == cap < batch.image_tokens[0]


def test_evs_then_visipruner_equals_transformers_eager_attention(clip):
    """Qwen2.5-VL, one video at q = 0.5 then VisiPruner: given EVS's kept tokens (features of
    transformers' own tower, gathered), transformers' decoder with eager attention at the kept tokens'
    unpruned M-RoPE positions (its ``get_rope_index`` of the full prompt, gathered) gives the middle
    stage's kept tokens by the criterion; the pipeline's equal them."""
    loaded = tiny("tiny-qwen2.5-vl")
    model, d = loaded.model, loaded.dims
    config = model.config
    video = load_video(clip, fps=4, max_frames=8)
    probe = reference_pipeline(loaded, with_evs(_plan(loaded), "evs", 0.5))
    batch = probe.prepare([video], [QUESTION])
    with torch.inference_mode():
        kept = probe.prefill(batch).evs_kept[0].tolist()
    ids, grid = batch.input_ids, batch.image_grid_thw
    hf_ids = torch.where(ids == d.image_token_id, config.video_token_id, ids)
    positions, _ = model.model.get_rope_index(hf_ids, mm_token_type_ids=(hf_ids == config.video_token_id).long() * 2,
                                              video_grid_thw=grid, second_per_grid_ts=torch.tensor([2 / video.fps]),
                                              attention_mask=batch.attention_mask)
    visual = torch.nonzero(ids[0] == d.image_token_id).reshape(-1)
    dropped = set(visual.tolist()) - {int(visual[k]) for k in kept}
    index = torch.tensor([i for i in range(ids.shape[1]) if i not in dropped])
    lm = model.model.language_model
    with torch.no_grad():
        features = model.model.visual(batch.pixel_values, grid_thw=grid).pooler_output
        embeds = lm.embed_tokens(ids[:, index])
        embeds[0, ids[0, index] == d.image_token_id] = features[kept].to(embeds.dtype)
    inputs = dict(inputs_embeds=embeds, position_ids=positions[:, :, index], attention_mask=torch.ones(1, len(index)))
    scores = hand_scores(loaded, inputs, forward=lm)
    short = ids[:, index] == d.image_token_id
    tau, cap = _thresholds(scores, short, inputs["attention_mask"].long())
    expected = hand_kept(scores, short, inputs["attention_mask"].long(), tau, cap)
    pipe = reference_pipeline(loaded, with_evs(_plan(loaded, threshold=tau, max_keep=cap), "evs", 0.5))
    with torch.inference_mode():
        state = pipe.prefill(batch)
    assert state.evs_kept[0].tolist() == kept and len(kept) < len(visual)
    assert state.stages[0].kept_image_positions == expected and len(expected[0]) == cap
    assert state.stages[1].kept_image_positions == [[]]


#: the ORT exports' tau and C (the Qwen3-VL one is also built by test_tensorrt_rtx_build.py): rows keep
#: different counts. CI exports Qwen3-VL only (~30 s an export; it has DeepStack and the same scoring
#: graphs as Qwen2.5-VL); ``HIMAP_TRT_QWEN25_VISIPRUNER_ONNX=1`` adds Qwen2.5-VL's.
EXPORT_PLANS = {"tiny-qwen2.5-vl": dict(threshold=0.05, max_keep=10),
                "tiny-qwen3-vl": dict(threshold=0.1, max_keep=10)}
ONNX_MODELS = ["tiny-qwen3-vl", pytest.param("tiny-qwen2.5-vl", marks=pytest.mark.skipif(
    os.environ.get("HIMAP_TRT_QWEN25_VISIPRUNER_ONNX") != "1",
    reason="CI time: set HIMAP_TRT_QWEN25_VISIPRUNER_ONNX=1 to export Qwen2.5-VL's VisiPruner too"))]


@pytest.mark.parametrize("model", ONNX_MODELS)
def test_onnxruntime_equals_torch_on_a_clip_and_two_images(tmp_path_factory, model, clip, photo):
    from himap_trt.runtime.loader import open_pipeline

    out, manifest, _ = exported(tmp_path_factory, model, "visipruner", mid_layer=MID, deep_layer=DEEP,
                                **EXPORT_PLANS[model])
    ref = reference_pipeline(tiny(model), manifest.plan)
    rgb = photo.convert("RGB")
    batch = ref.prepare([load_video(clip, fps=2, max_frames=4), rgb.resize((100, 120)), rgb],
                        [QUESTION, "What is shown?", "Who?"])
    opened = open_pipeline(export_dir=out, backend="onnxruntime")
    try:
        with torch.inference_mode():
            ours = opened.pipeline.generate(batch, GenerationConfig(max_new_tokens=6))
            theirs = ref.generate(batch, GenerationConfig(max_new_tokens=6))
    finally:
        opened.pipeline.close()
    assert torch.equal(ours.sequences, theirs.sequences)
    for mine, expected in zip(ours.stages, theirs.stages):
        assert torch.equal(mine.kept_indices.cpu(), expected.kept_indices.cpu())
        assert mine.kept_image_positions == expected.kept_image_positions
    kept = [c[1] for c in theirs.image_tokens_per_row]
    assert ours.image_tokens_per_row == theirs.image_tokens_per_row
    assert len(set(kept)) > 1 and min(kept) < 10, kept        # rows keep different counts, with masked slots


def test_two_image_conversation_pools_both_images(photo):
    """Qwen2.5-VL, a 2-turn conversation with two images of different sizes: VisiPruner ranks both
    images' tokens together (one |V|, one cap C), as transformers' eager attention on the processor's
    own encoding of the rendered conversation gives."""
    from himap_trt.chat import parse_messages

    loaded = tiny("tiny-qwen2.5-vl")
    rgb = photo.convert("RGB")
    images = [rgb.resize((100, 120)), rgb.convert("L").resize((150, 90)).convert("RGB")]
    conversation = parse_messages([
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a"}},
                                     {"type": "text", "text": "What is in this picture?"}]},
        {"role": "assistant", "content": "A person."},
        {"role": "user", "content": [{"type": "text", "text": "And here?"},
                                     {"type": "image_url", "image_url": {"url": "b"}}]},
    ])
    batch = reference_pipeline(loaded, _plan(loaded)).prepare_conversation(conversation, images)
    enc = loaded.processor(images=images, text=batch.prompts, return_tensors="pt")
    assert batch.input_ids.tolist() == enc["input_ids"].tolist() and len(enc["image_grid_thw"]) == 2
    visual = enc["input_ids"] == loaded.model.config.image_token_id
    scores = hand_scores(loaded, enc)
    row = scores[0][visual[0]].sort(descending=True).values
    tau, cap = float(row[7] + row[8]) / 2, 6                                     # 8 above tau, capped at 6
    expected = hand_kept(scores, visual, enc["attention_mask"], tau, cap)
    pipe = reference_pipeline(loaded, _plan(loaded, threshold=tau, max_keep=cap))
    with torch.inference_mode():
        state = pipe.prefill(batch)
    assert state.stages[0].kept_image_positions == expected and len(expected[0]) == cap
    first, second = (int(g.prod()) // 4 for g in enc["image_grid_thw"])
    image = torch.nonzero(visual[0]).reshape(-1).tolist()
    assert batch.image_tokens == [first + second]
    assert {p in image[:first] for p in expected[0]} == {True, False}, "the kept tokens should span both images"


def _sub_model(lm, start, end, *, final):
    """transformers' own Qwen3-VL decoder layers [start, end) (eager), its final norm only if ``final``."""
    cfg = copy.deepcopy(lm.config)
    cfg.num_hidden_layers = end - start
    cfg._attn_implementation = "eager"
    sub = Qwen3VLTextModel(cfg).eval()
    for i in range(cfg.num_hidden_layers):
        sub.layers[i].load_state_dict(lm.layers[start + i].state_dict())
    if final:
        sub.norm.load_state_dict(lm.norm.state_dict())
    else:
        sub.norm = torch.nn.Identity()
    return sub


def test_qwen3_deepstack_gathered_with_the_kept_tokens_logits_equal_transformers(qwen_requests):
    """Qwen3-VL, one image, K_M = 2 (DeepStack adds layer 2's features after the stage), K_E = 5: the
    prefill's next-token logits = transformers' decoder run in three pieces: layers [0, K_M) on the
    whole prompt, [K_M, K_E) on the kept tokens with layer 2's DeepStack features of the *kept* image
    tokens, [K_E, L) on the text tokens; positions of transformers' ``get_rope_index``, gathered."""
    loaded = tiny("tiny-qwen3-vl")
    model = loaded.model
    lm = model.model.language_model
    images, questions = qwen_requests
    batch = reference_pipeline(loaded, _plan(loaded)).prepare(images[:1], questions[:1])
    enc = loaded.processor(images=images[:1], text=batch.prompts, return_tensors="pt")
    visual = enc["input_ids"] == model.config.image_token_id
    scores = hand_scores(loaded, enc)
    row = scores[0][visual[0]].sort(descending=True).values
    tau = float(row[11] + row[12]) / 2
    kept = hand_kept(scores, visual, enc["attention_mask"], tau, 8)[0]          # 12 above tau, capped at 8
    pipe = reference_pipeline(loaded, _plan(loaded, threshold=tau, max_keep=8))
    with torch.inference_mode():
        state = pipe.prefill(batch)
    assert state.stages[0].kept_image_positions == [kept]
    ids = enc["input_ids"][0]
    positions, _ = model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"],
                                               attention_mask=enc["attention_mask"])
    image_pos = torch.nonzero(visual[0]).reshape(-1).tolist()
    with torch.no_grad():
        deep = torch.cat(model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).deepstack_features[2])
        with entering_hidden_states(lm.layers, [MID]) as entering:
            model(**enc, position_ids=positions)
        middle = torch.tensor(sorted(set(range(len(ids))) - set(image_pos) | set(kept)))
        is_image = torch.tensor([[int(p) in image_pos for p in middle]])
        hidden = _sub_model(lm, MID, DEEP, final=False)(
            inputs_embeds=entering[MID][:, middle], position_ids=positions[:, :, middle],
            attention_mask=torch.ones(1, len(middle)), visual_pos_masks=is_image,
            deepstack_visual_embeds=[deep[[image_pos.index(p) for p in kept]]]).last_hidden_state
        text = (~is_image[0]).nonzero().reshape(-1)
        out = _sub_model(lm, DEEP, lm.config.num_hidden_layers, final=True)(
            inputs_embeds=hidden[:, text], position_ids=positions[:, :, middle[text]],
            attention_mask=torch.ones(1, len(text))).last_hidden_state
        expected = model.lm_head(out[:, -1])
    torch.testing.assert_close(state.logits, expected, rtol=1e-4, atol=1e-4)
    # without layer 2's DeepStack addition the logits differ: the comparison can see a wrong gather
    with torch.no_grad():
        plain = _sub_model(lm, MID, DEEP, final=False)(
            inputs_embeds=entering[MID][:, middle], position_ids=positions[:, :, middle],
            attention_mask=torch.ones(1, len(middle))).last_hidden_state
        other = model.lm_head(_sub_model(lm, DEEP, lm.config.num_hidden_layers, final=True)(
            inputs_embeds=plain[:, text], position_ids=positions[:, :, middle[text]],
            attention_mask=torch.ones(1, len(text))).last_hidden_state[:, -1])
    assert (other - expected).abs().max() > 1e-2
