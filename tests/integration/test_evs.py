"""EVS before the LLM (issue 29, METHODS.md "Video, and pruning before the LLM (EVS)").

- the kept set equals a reference written here from the definition (plain Python loops over
  (t, h, w), cosine by hand, Python's stable sort), on random features with exact ties, and on the
  tiny Qwen models' own video features (transformers' vision tower, not the pipeline's graph);
- rate 0 is no EVS, token for token (the batch transform is the identity; generated tokens equal);
- an image (one temporal patch) is unaffected at any rate;
- EVS + HiMAP: the kept indices of both stages equal a computation from transformers' eager
  attention (Qwen2.5-VL's own decoder layers) given EVS's output, with the kept tokens at their
  unpruned M-RoPE positions (transformers' ``get_rope_index`` of the full video prompt);
- Qwen3-VL: DeepStack features are gathered with EVS's indices; a bad rate is one line.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

from conftest import tiny
from himap_trt.errors import HimapError
from himap_trt.plan import build_plan, keep_count, with_evs
from himap_trt.runtime import GenerationConfig, reference_pipeline
from himap_trt.runtime.evs import apply_evs, evs_kept_indices
from himap_trt.video import load_video, moving_shapes_clip

QUESTION = "What moves?"


def reference_evs(features: np.ndarray, rate: float) -> list[int]:
    """The definition, literally: features [T, H, W, D]; first temporal patch above every score."""
    t, h, w, _ = features.shape
    scores = []
    for ti in range(t):
        for hi in range(h):
            for wi in range(w):
                if ti == 0:
                    scores.append(math.inf)
                else:
                    a, b = features[ti, hi, wi].astype(np.float64), features[ti - 1, hi, wi].astype(np.float64)
                    same = bool((a == b).all())             # 1 - cos = 0 exactly (a tie, not rounding noise)
                    scores.append(0.0 if same else 1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    keep = max(h * w, int(t * h * w * (1 - rate)))
    order = sorted(range(len(scores)), key=lambda i: -scores[i])          # Python's sort is stable
    return sorted(order[:keep])


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 5), h=st.integers(1, 4), w=st.integers(1, 4), rate=st.sampled_from([0.0, 0.3, 0.5, 0.75, 0.9]),
       seed=st.integers(0, 2**16), static=st.floats(0, 1))
def test_kept_set_equals_the_definition(t, h, w, rate, seed, static):
    """Random features where a fraction of tokens repeat the previous temporal patch exactly (score
    0: ties, broken by (t, h, w) order)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, h, w, 8)).astype(np.float32)
    for ti in range(1, t):
        same = rng.random((h, w)) < static
        x[ti][same] = x[ti - 1][same]
    ours = evs_kept_indices(torch.from_numpy(x.reshape(-1, 8)), (t, h, w), rate)
    assert ours.tolist() == reference_evs(x, rate)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return moving_shapes_clip(tmp_path_factory.mktemp("evs") / "shapes.mp4", frames=16, fps=8)


def _videos(clip):
    return [load_video(clip, fps=8, max_frames=12), load_video(clip, fps=4, max_frames=6)]


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_kept_set_on_the_models_video_features(model, clip, photo):
    """A batch of two videos and an image, per-request rates: each row's kept set = the reference on
    transformers' own vision features of that video; the image keeps all its tokens."""
    loaded = tiny(model)
    plan = with_evs(build_plan("himap", num_layers=loaded.dims.num_layers,
                               num_image_tokens=loaded.dims.num_image_tokens), "evs", 0.5)
    pipe = reference_pipeline(loaded, plan)
    batch = pipe.prepare([*_videos(clip), photo.convert("RGB").resize((100, 120))], [QUESTION, "Why?", "What?"])
    batch.evs_rates = [None, 0.75, 0.9]
    with torch.inference_mode():
        state = pipe.prefill(batch)
        out = loaded.model.model.visual(batch.pixel_values.to(loaded.model.dtype), grid_thw=batch.image_grid_thw)
    features = out.pooler_output.float()
    merge = loaded.model.config.vision_config.spatial_merge_size
    offset = 0
    for row, (rate, (t, h, w)) in enumerate(zip([0.5, 0.75, 0.0], batch.image_grid_thw.tolist())):
        n = t * (h // merge) * (w // merge)
        x = features[offset:offset + n].reshape(t, h // merge, w // merge, -1).numpy()
        expected = reference_evs(x, rate)
        assert state.evs_kept[row].tolist() == expected, row
        offset += n
    assert len(state.evs_kept[2]) == batch.image_tokens[2]                   # the image: every token
    assert len(state.evs_kept[0]) < batch.image_tokens[0] and len(state.evs_kept[1]) < batch.image_tokens[1]
    # the decoder's keep counts come from EVS's kept tokens
    assert [c[0] for c in state.image_tokens] == [len(k) for k in state.evs_kept]
    assert [c[1] for c in state.image_tokens] == [keep_count(plan.stages[0].ratio, len(k)) for k in state.evs_kept]


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_rate_zero_is_no_evs(model, clip, photo):
    """Rate 0 leaves the batch as it is (every field), and the generated tokens equal an export without
    EVS; an image row at rate 0.9 is untouched too."""
    loaded = tiny(model)
    d = loaded.dims
    none = reference_pipeline(loaded, build_plan("himap", num_layers=d.num_layers, num_image_tokens=d.num_image_tokens))
    batch = none.prepare([_videos(clip)[0], photo.convert("RGB").resize((100, 120))], [QUESTION, "What?"])
    with torch.inference_mode():
        seen = loaded.model.model.visual(batch.pixel_values, grid_thw=batch.image_grid_thw)
    features = seen.pooler_output
    deep = getattr(seen, "deepstack_features", None)
    deep = torch.stack(deep) if deep else None
    same, kept_features, kept_deep, kept = apply_evs(batch, features, deep, [0.0, 0.9], 2, d.image_token_id,
                                                     none.pad_token_id)
    for name in ("input_ids", "attention_mask", "token_type_ids", "position_ids"):
        assert torch.equal(getattr(same, name), getattr(batch, name)), name
    assert torch.equal(kept_features, features) and (deep is None or torch.equal(kept_deep, deep))
    zero = reference_pipeline(loaded, with_evs(none.plan, "evs", 0.0))
    batch.evs_rates = [0.0, 0.0]
    with torch.inference_mode():
        a = none.generate(batch, GenerationConfig(max_new_tokens=6))
        b = zero.generate(batch, GenerationConfig(max_new_tokens=6))
    assert torch.equal(a.sequences, b.sequences)


def test_deepstack_gathered_with_the_same_indices(clip):
    """Qwen3-VL: the kept rows of every DeepStack feature are the rows EVS kept of the main features."""
    loaded = tiny("tiny-qwen3-vl")
    pipe = reference_pipeline(loaded, build_plan("none", num_layers=loaded.dims.num_layers,
                                                 num_image_tokens=loaded.dims.num_image_tokens))
    batch = pipe.prepare(_videos(clip), [QUESTION, "Why?"])
    with torch.inference_mode():
        seen = loaded.model.model.visual(batch.pixel_values, grid_thw=batch.image_grid_thw)
    deep = torch.stack(seen.deepstack_features)
    shorter, features, kept_deep, kept = apply_evs(batch, seen.pooler_output, deep, [0.75, 0.5], 2,
                                                   loaded.dims.image_token_id, pipe.pad_token_id)
    flat = torch.cat([kept[0], kept[1] + batch.image_tokens[0]])
    assert torch.equal(features, seen.pooler_output[flat]) and torch.equal(kept_deep, deep[:, flat])
    assert shorter.image_tokens == [len(k) for k in kept]
    assert int((shorter.input_ids == loaded.dims.image_token_id).sum()) == len(flat)


def _select(scores, image_positions, keep, length):
    best = sorted(image_positions, key=lambda v: (-scores[v], v))[:keep]
    return sorted(set(range(length)) - set(image_positions) | set(best))


def test_evs_then_himap_equals_transformers_eager_attention(clip):
    """Qwen2.5-VL, one video at q = 0.5 then HiMAP (K1 = 2, K2 = 5): given EVS's kept tokens (features of
    transformers' own tower, gathered), transformers' decoder with eager attention at the kept tokens'
    unpruned positions (its ``get_rope_index`` of the full prompt, gathered) gives both stages' kept
    indices; the pipeline's equal them."""
    loaded = tiny("tiny-qwen2.5-vl")
    model, d = loaded.model, loaded.dims
    plan = with_evs(build_plan("himap", num_layers=d.num_layers, num_image_tokens=d.num_image_tokens,
                               k1=2, r1=0.5, k2=5, r2=0.5), "evs", 0.5)
    pipe = reference_pipeline(loaded, plan)
    video = _videos(clip)[0]
    batch = pipe.prepare([video], [QUESTION])
    with torch.inference_mode():
        state = pipe.prefill(batch)
    # transformers' side, from the full prompt
    ids = batch.input_ids
    image_id = d.image_token_id
    grid = batch.image_grid_thw
    video_id = loaded.processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    hf_ids = torch.where(ids == image_id, video_id, ids)
    positions, _ = model.model.get_rope_index(hf_ids, mm_token_type_ids=(hf_ids == video_id).long() * 2,
                                              video_grid_thw=grid, second_per_grid_ts=torch.tensor([2 / video.fps]),
                                              attention_mask=batch.attention_mask)
    with torch.no_grad():
        features = model.model.visual(batch.pixel_values, grid_thw=grid).pooler_output
    t, h, w = (int(v) for v in grid[0])
    kept = reference_evs(features.reshape(t, h // 2, w // 2, -1).numpy(), 0.5)
    assert state.evs_kept[0].tolist() == kept
    visual = torch.nonzero(ids[0] == image_id).reshape(-1)
    dropped = set(visual.tolist()) - {int(visual[k]) for k in kept}
    index = torch.tensor([i for i in range(ids.shape[1]) if i not in dropped])
    lm = model.model.language_model
    with torch.no_grad():
        embeds = lm.embed_tokens(ids[:, index])
        embeds[0, ids[0, index] == image_id] = features[kept].to(embeds.dtype)
    pos = positions[:, :, index]
    entering = {}
    k2 = plan.stages[1].layer
    handle = lm.layers[k2].register_forward_pre_hook(
        lambda m, a, kw: entering.__setitem__(k2, (a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True)
    try:
        with torch.no_grad():
            out = lm(inputs_embeds=embeds, position_ids=pos, attention_mask=torch.ones(1, len(index)),
                     output_attentions=True)
    finally:
        handle.remove()
    seq = ids[0, index].tolist()
    image = [i for i, v in enumerate(seq) if v == image_id]
    n1 = keep_count(plan.stages[0].ratio, len(kept))
    n2 = keep_count(plan.stages[1].ratio, n1)
    mean = out.attentions[plan.stages[0].layer - 1].double().mean(1)[0]
    first = _select(mean[[i for i in range(len(seq)) if i > max(image)]].sum(0).tolist(), image, n1, len(seq))
    cfg = copy.deepcopy(lm.config)
    cfg.num_hidden_layers = k2 - plan.stages[0].layer
    cfg._attn_implementation = "eager"
    sub = Qwen2_5_VLTextModel(cfg).eval()
    for i in range(cfg.num_hidden_layers):
        sub.layers[i].load_state_dict(lm.layers[plan.stages[0].layer + i].state_dict())
    # the hidden states entering K1 for the kept tokens: run transformers' layers [0, K1) again via a hook
    entering_k1 = {}
    handle = lm.layers[plan.stages[0].layer].register_forward_pre_hook(
        lambda m, a, kw: entering_k1.__setitem__(0, (a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True)
    try:
        with torch.no_grad():
            lm(inputs_embeds=embeds, position_ids=pos, attention_mask=torch.ones(1, len(index)))
    finally:
        handle.remove()
    g = torch.tensor(first)
    with torch.no_grad():
        attn = sub(inputs_embeds=entering_k1[0][:, g], position_ids=pos[:, :, g], attention_mask=torch.ones(1, len(g)),
                   output_attentions=True).attentions[-1]
    image2 = [i for i, p in enumerate(first) if p in image]
    second = _select(attn.double().mean(1)[0][image2].sum(0).tolist(), image2, n2, len(first))
    assert len(image) == len(kept) and n2 < n1 < len(kept)
    assert state.stages[0].kept_indices[0].tolist() == first
    assert state.stages[1].kept_indices[0].tolist() == second


@pytest.mark.parametrize("rate,fragment", [(1.0, "must be in"), (-0.1, "must be in"), ("x", "must be a number")])
def test_bad_request_rate_is_one_line(rate, fragment, clip):
    loaded = tiny("tiny-qwen2.5-vl")
    pipe = reference_pipeline(loaded, build_plan("none", num_layers=loaded.dims.num_layers,
                                                 num_image_tokens=loaded.dims.num_image_tokens))
    batch = pipe.prepare(_videos(clip)[:1], [QUESTION])
    batch.evs_rates = [rate]
    with pytest.raises(HimapError, match="evs_rate " + fragment):
        pipe.prefill(batch)


def test_plan_flags():
    plan = build_plan("himap", num_layers=12, num_image_tokens=64)
    assert with_evs(plan, "none", 0.0) is plan
    evs = with_evs(plan, "evs", 0.75)
    assert evs.evs_rate == 0.75 and evs.describe().startswith("EVS q=0.75 before the LLM")
    assert type(plan).from_dict(evs.to_dict()) == evs and "evs_rate" not in plan.to_dict()
    for args, fragment in [(("evs", 1.0), "--evs-rate must be in"), (("none", 0.5), "needs --prune-before evs"),
                           (("tome", 0.5), "--prune-before must be one of")]:
        with pytest.raises(HimapError, match=fragment):
            with_evs(plan, *args)
    visi = with_evs(build_plan("visipruner", num_layers=12, num_image_tokens=64), "evs", 0.5)   # composes (issue 31)
    assert visi.evs_rate == 0.5 and visi.method == "visipruner"


@pytest.mark.parametrize("args,fragment", [
    (["--model", "tiny", "--prune-before", "evs", "--evs-rate", "0.5"], "needs a video model"),
    (["--model", "tiny-qwen2.5-vl", "--prune-before", "evs", "--evs-rate", "1"], "--evs-rate must be in [0, 1)"),
    (["--model", "tiny-qwen2.5-vl", "--evs-rate", "0.5"], "--evs-rate needs --prune-before evs"),
])
def test_export_flags_refuse_in_one_line(args, fragment, tmp_path):
    from typer.testing import CliRunner

    from himap_trt.cli import app

    result = CliRunner().invoke(app, ["export", *args, "--out", str(tmp_path / "x"), "--no-validate"])
    assert result.exit_code != 0 and fragment in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_onnxruntime_with_evs_equals_reference(tmp_path_factory, model, clip, photo):
    """The session's HiMAP export (no EVS in its manifest) with per-request EVS rates on a video, a
    second video and an image: ONNX Runtime = the PyTorch reference, EVS's kept sets and the stages'
    kept indices included."""
    from conftest import exported
    from himap_trt.runtime.loader import open_pipeline

    out, manifest, _ = exported(tmp_path_factory, model, "himap")
    onnx_pipe = open_pipeline(export_dir=out, backend="onnxruntime").pipeline
    ref_pipe = reference_pipeline(tiny(model), manifest.plan)
    batch = ref_pipe.prepare([*_videos(clip), photo.convert("RGB").resize((100, 120))], [QUESTION, "Why?", "What?"])
    batch.evs_rates = [0.75, 0.5, 0.75]
    with torch.inference_mode():
        ours = onnx_pipe.prefill(batch)
        ref = ref_pipe.prefill(batch)
        a = onnx_pipe.generate(batch, GenerationConfig(max_new_tokens=6))
        b = ref_pipe.generate(batch, GenerationConfig(max_new_tokens=6))
    assert [k.tolist() for k in ours.evs_kept] == [k.tolist() for k in ref.evs_kept]
    for mine, theirs in zip(ours.stages, ref.stages):
        assert torch.equal(mine.kept_indices, theirs.kept_indices)
    assert torch.equal(a.sequences, b.sequences)


def test_batch_file_video_lines(tmp_path):
    """``run --batch`` lines: ``video`` with its own fps / max_frames / evs_rate; bad fields one line."""
    from himap_trt.inputs import read_batch_file

    good = tmp_path / "ok.jsonl"
    good.write_text('{"video": "c.mp4", "question": "What?", "fps": 4, "max_frames": 6, "evs_rate": 0.5}\n'
                    '{"image": "a.png", "question": "Why?"}\n')
    video, image = read_batch_file(good)
    assert (video.video, video.fps, video.max_frames, video.evs_rate, video.image) == (True, 4, 6, 0.5, tmp_path / "c.mp4")
    assert (image.video, image.evs_rate) == (False, None)
    for line, fragment in [
        ('{"video": "c.mp4", "image": "a.png", "question": "?"}', 'fields "image" and "video" both given'),
        ('{"video": "c.mp4", "question": "?", "evs_rate": 1}', 'field "evs_rate" must be a number in [0, 1)'),
        ('{"video": "c.mp4", "question": "?", "max_frames": 1}', 'field "max_frames" must be an integer >= 2'),
        ('{"video": "c.mp4", "question": "?", "fps": 0}', 'field "fps" must be a positive number'),
        ('{"image": "a.png", "question": "?", "evs_rate": 0.5}', 'applies to a "video" request'),
        ('{"video": 3, "question": "?"}', 'field "video" must be a non-empty path string'),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(HimapError, match=fragment.replace("[", "\\[").replace("(", "\\(").replace(")", "\\)")):
            read_batch_file(bad)


def test_run_batch_with_a_video_line_applies_its_evs_rate(clip, photo, tmp_path):
    """``run --batch`` with a video line (its own sampling and EVS rate) and an image line: the video's
    visual tokens entering the decoder are EVS's keep count of its full count."""
    import json

    from typer.testing import CliRunner

    from himap_trt.cli import app
    from himap_trt.runtime.evs import evs_keep_count

    photo.convert("RGB").resize((100, 120)).save(tmp_path / "a.png")
    (tmp_path / "c.mp4").write_bytes(clip.read_bytes())
    batch = tmp_path / "req.jsonl"
    batch.write_text('{"video": "c.mp4", "question": "What moves?", "fps": 8, "max_frames": 8, "evs_rate": 0.6}\n'
                     '{"image": "a.png", "question": "What is shown?"}\n')
    result = CliRunner().invoke(app, ["run", "--backend", "torch", "--model", "tiny-qwen2.5-vl", "--method", "none",
                                      "--batch", str(batch), "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    video = load_video(clip, fps=8, max_frames=8)
    full = tiny("tiny-qwen2.5-vl")
    pipe = reference_pipeline(full, build_plan("none", num_layers=full.dims.num_layers,
                                               num_image_tokens=full.dims.num_image_tokens))
    t, h, w = pipe.prepare([video], ["What moves?"]).image_grid_thw[0].tolist()
    assert report["requests"][0]["image_tokens_per_segment"] == [evs_keep_count(t, h // 2, w // 2, 0.6)]
    assert report["requests"][0]["image_tokens_per_segment"][0] < t * h * w // 4
    # with a conversation line (issue 30) every line runs as a conversation: the video line's fields ride
    # on its part, and the conversation's video_url part has its own
    with batch.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "c.mp4", "fps": 4, "max_frames": 6, "evs_rate": 0.5}},
            {"type": "text", "text": "And now?"}]}]}) + "\n")
    result = CliRunner().invoke(app, ["run", "--backend", "torch", "--model", "tiny-qwen2.5-vl", "--method", "none",
                                      "--batch", str(batch), "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout[result.stdout.index("{"):])["requests"]
    t2, h2, w2 = pipe.prepare([load_video(clip, fps=4, max_frames=6)], ["And now?"]).image_grid_thw[0].tolist()
    assert [r["image_tokens_per_segment"] for r in rows] == [
        [evs_keep_count(t, h // 2, w // 2, 0.6)], report["requests"][1]["image_tokens_per_segment"],
        [evs_keep_count(t2, h2 // 2, w2 // 2, 0.5)]]


@pytest.mark.slow
def test_server_video_url_fields(tmp_path_factory, clip):
    """``video_url`` with the request's own fps / max_frames / evs_rate: the answer equals the reference
    pipeline's on the same sampling and rate; fields beyond the server's bounds are HTTP 400 naming
    the field, and the server keeps serving."""
    import asyncio
    import base64

    import httpx

    from conftest import exported
    from himap_trt.chat import parse_messages
    from himap_trt.serve.app import ServeConfig, ServerState, create_app
    from himap_trt.serve.videos import VideoPolicy

    def post(state, part, earlier=()):
        async def main():
            transport = httpx.ASGITransport(app=create_app(state))
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
                return await client.post("/v1/chat/completions", json={
                    "model": "m", "max_tokens": 4, "temperature": 0,
                    "messages": [*earlier, {"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]})
        return asyncio.run(main())

    out, manifest, _ = exported(tmp_path_factory, "tiny-qwen2.5-vl", "himap")
    state = ServerState(ServeConfig(export_dir=out, backend="onnxruntime", model_name="m", max_batch=2,
                                    videos=VideoPolicy(fps=2, max_frames=8, max_bytes=1_000_000)))
    state.load()
    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    try:
        assert state.status == "ready", state.error
        answer = post(state, {"type": "video_url", "video_url": {"url": url, "fps": 4, "max_frames": 6, "evs_rate": 0.7}})
        assert answer.status_code == 200, answer.text
        ref = reference_pipeline(tiny("tiny-qwen2.5-vl"), manifest.plan)
        batch = ref.prepare([load_video(clip, fps=4, max_frames=6)], [QUESTION])
        batch.evs_rates = [0.7]
        with torch.inference_mode():
            expected = ref.generate(batch, GenerationConfig(max_new_tokens=4))
        assert answer.json()["choices"][0]["message"]["content"] == expected.texts[0]
        assert expected.image_tokens_per_row[0][0] < batch.image_tokens[0]            # EVS did prune
        for extra, field in [({"evs_rate": 1.0}, "evs_rate"), ({"evs_rate": -0.5}, "evs_rate"),
                             ({"max_frames": 9}, "max_frames"), ({"fps": 0}, "fps")]:
            response = post(state, {"type": "video_url", "video_url": {"url": url, **extra}})
            assert response.status_code == 400, response.text
            assert f"video_url.{field}" in response.json()["error"]["message"]
        assert post(state, {"type": "video_url", "video_url": {"url": url}}).status_code == 200
        # a conversation (issue 30): the video in the last user turn keeps its own fields
        earlier = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"},
                   {"role": "assistant", "content": "Hi."}]
        part = {"type": "video_url", "video_url": {"url": url, "fps": 4, "max_frames": 6, "evs_rate": 0.7}}
        answer = post(state, part, earlier)
        assert answer.status_code == 200, answer.text
        conversation = parse_messages([*earlier, {"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "clip.mp4", "evs_rate": 0.7}}, {"type": "text", "text": QUESTION}]}])
        batch = ref.prepare_conversation(conversation, [load_video(clip, fps=4, max_frames=6)])
        assert batch.evs_rates == [0.7]
        with torch.inference_mode():
            expected = ref.generate(batch, GenerationConfig(max_new_tokens=4))
        assert answer.json()["choices"][0]["message"]["content"] == expected.texts[0]
        assert expected.image_tokens_per_row[0][0] < batch.image_tokens[0]
        response = post(state, {"type": "video_url", "video_url": {"url": url, "max_frames": 9}}, earlier)
        assert response.status_code == 400 and "messages[3].content[0].video_url.max_frames" in response.text
    finally:
        state.close()


def test_triton_video_inputs(clip):
    """Triton's optional inputs ``video_fps``, ``max_frames``, ``evs_rate``: a video sampled at the
    request's own rate and count with its EVS rate; out-of-bound values are one-line errors naming them."""
    from himap_trt.triton.protocol import parse_request

    def request(**extra):
        tensors = {"image": np.array([clip.read_bytes()], dtype=object), "question": np.array([b"What?"], dtype=object),
                   **{k: np.array([v]) for k, v in extra.items()}}
        return parse_request(tensors.get, 8)

    parsed = request(video_fps=np.float32(4), max_frames=np.int32(6), evs_rate=np.float32(0.5))
    assert len(parsed.image.frames) == 6 and parsed.image.fps == 4 and parsed.evs_rate == 0.5
    assert request().evs_rate is None and len(request().image.frames) == 4            # 2 s at 2 fps
    for extra, fragment in [({"evs_rate": np.float32(1)}, "input 'evs_rate' must be in"),
                            ({"max_frames": np.int32(1)}, "input 'max_frames' must be between 2"),
                            ({"video_fps": np.float32(0)}, "input 'video_fps' must be a positive")]:
        with pytest.raises(HimapError, match=fragment):
            request(**extra)


def test_bench_serve_sends_a_video(clip, tmp_path):
    """``bench-serve --video``: the request body holds a video_url data URL of the file with the
    given fields; misuse is one line."""
    import base64

    from typer.testing import CliRunner

    from himap_trt.cli import app
    from himap_trt.serve.bench import chat_body, video_data_url

    url = video_data_url(clip)
    assert url.startswith("data:video/mp4;base64,") and base64.b64decode(url.split(",", 1)[1]) == clip.read_bytes()
    body = chat_body("m", "", "What?", 4, ignore_eos=True, video={"url": url, "evs_rate": 0.5, "max_frames": 8})
    part = body["messages"][0]["content"][0]
    assert part == {"type": "video_url", "video_url": {"url": url, "evs_rate": 0.5, "max_frames": 8}}
    for args, fragment in [(["--evs-rate", "0.5"], "go with --video"),
                           (["--video", str(tmp_path / "x.gif")], "expected a .mp4")]:
        result = CliRunner().invoke(app, ["bench-serve", "--url", "http://127.0.0.1:9", *args])
        assert result.exit_code != 0 and fragment in result.output and "Traceback" not in result.output, result.output


def test_evs_then_himap_equals_transformers_on_qwen3_vl(clip):
    """Qwen3-VL, one video at q = 0.5 then HiMAP (K1 = 2 inside the DeepStack layers 0..2, K2 = 5):
    transformers' decoder with eager attention given EVS's kept tokens (its own tower's features and
    DeepStack features gathered with EVS's indices, its ``get_rope_index`` positions of the full
    prompt gathered, its DeepStack additions for the kept image tokens between the stages) gives both
    stages' kept indices; the pipeline's equal them. Instruction rows = tokens after the full
    prompt's last visual token (timestamps between temporal patches are not instruction)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    loaded = tiny("tiny-qwen3-vl")
    model, d = loaded.model, loaded.dims
    plan = with_evs(build_plan("himap", num_layers=d.num_layers, num_image_tokens=d.num_image_tokens,
                               k1=2, r1=0.5, k2=5, r2=0.5), "evs", 0.5)
    pipe = reference_pipeline(loaded, plan)
    batch = pipe.prepare([_videos(clip)[0]], [QUESTION])
    with torch.inference_mode():
        state = pipe.prefill(batch)
    ids, image_id, grid = batch.input_ids, d.image_token_id, batch.image_grid_thw
    video_id = loaded.processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    hf_ids = torch.where(ids == image_id, video_id, ids)
    positions, _ = model.model.get_rope_index(hf_ids, (hf_ids == video_id).long() * 2, None, grid,
                                              attention_mask=batch.attention_mask)
    with torch.no_grad():
        seen = model.model.visual(batch.pixel_values, grid_thw=grid)
    features, deep = seen.pooler_output, list(seen.deepstack_features)
    t, h, w = (int(v) for v in grid[0])
    kept = reference_evs(features.reshape(t, h // 2, w // 2, -1).numpy(), 0.5)
    assert state.evs_kept[0].tolist() == kept
    visual = torch.nonzero(ids[0] == image_id).reshape(-1)
    last_visual = int(visual.max())
    dropped = set(visual.tolist()) - {int(visual[k]) for k in kept}
    index = [i for i in range(ids.shape[1]) if i not in dropped]
    lm = model.model.language_model
    seq = ids[0, index]
    mask = (seq == image_id)[None]
    with torch.no_grad():
        embeds = lm.embed_tokens(seq[None])
        embeds[mask] = features[kept].to(embeds.dtype)
    pos = positions[:, :, index]
    k1, k2 = plan.stages[0].layer, plan.stages[1].layer
    entering = {}
    handle = lm.layers[k1].register_forward_pre_hook(
        lambda m, a, kw: entering.__setitem__(k1, (a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True)
    try:
        with torch.no_grad():
            out = lm(inputs_embeds=embeds, position_ids=pos, attention_mask=torch.ones(1, len(index)),
                     visual_pos_masks=mask, deepstack_visual_embeds=[x[kept] for x in deep], output_attentions=True)
    finally:
        handle.remove()
    image = [i for i in range(len(index)) if int(seq[i]) == image_id]
    n1 = keep_count(plan.stages[0].ratio, len(kept))
    n2 = keep_count(plan.stages[1].ratio, n1)
    mean = out.attentions[k1 - 1].double().mean(1)[0]
    rows = [i for i, p in enumerate(index) if p > last_visual]
    first = _select(mean[rows].sum(0).tolist(), image, n1, len(index))
    cfg = copy.deepcopy(lm.config)
    cfg.num_hidden_layers = k2 - k1
    cfg._attn_implementation = "eager"
    sub = Qwen3VLTextModel(cfg).eval()
    for i in range(cfg.num_hidden_layers):
        sub.layers[i].load_state_dict(lm.layers[k1 + i].state_dict())
    g = torch.tensor(first)
    kept_image = [image.index(i) for i in first if i in image]        # ordinals among EVS's image tokens
    extra = [x[kept][kept_image] for x in deep[k1:]]
    with torch.no_grad():
        attn = sub(inputs_embeds=entering[k1][:, g], position_ids=pos[:, :, g], attention_mask=torch.ones(1, len(g)),
                   visual_pos_masks=torch.tensor([[i in image for i in first]]), deepstack_visual_embeds=extra or None,
                   output_attentions=True).attentions[-1]
    image2 = [j for j, i in enumerate(first) if i in image]
    second = _select(attn.double().mean(1)[0][image2].sum(0).tolist(), image2, n2, len(first))
    assert n2 < n1 < len(kept) < len(visual)
    assert state.stages[0].kept_indices[0].tolist() == first
    assert state.stages[1].kept_indices[0].tolist() == second


def test_conversation_video_parts_carry_their_own_evs_rates(clip, photo):
    """A conversation (issue 30) with two videos and an image in two user turns, each video with its own
    ``video_url.evs_rate``: the row's EVS kept set = the reference on transformers' own features of
    each video (offset by the visual tokens before it), the image keeps every token, and the decoder's
    keep counts are pooled from the kept total. A bad field in a later message names it."""
    from himap_trt.chat import parse_messages

    loaded = tiny("tiny-qwen2.5-vl")
    d = loaded.dims
    pipe = reference_pipeline(loaded, build_plan("himap", num_layers=d.num_layers, num_image_tokens=d.num_image_tokens))
    messages = [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "a.mp4", "evs_rate": 0.75}},
                                     {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "b.png"}},
                                     {"type": "video_url", "video_url": {"url": "c.mp4", "evs_rate": 0.5}},
                                     {"type": "text", "text": "And now?"}]},
    ]
    conversation = parse_messages(messages)
    visuals = [load_video(clip, fps=8, max_frames=6), photo.convert("RGB").resize((56, 56)),
               load_video(clip, fps=4, max_frames=4)]
    batch = pipe.prepare_conversation(conversation, visuals)
    assert batch.evs_rates == [0.75, None, 0.5] and batch.image_grid_thw.shape[0] == 3
    with torch.inference_mode():
        state = pipe.prefill(batch)
        out = loaded.model.model.visual(batch.pixel_values.to(loaded.model.dtype), grid_thw=batch.image_grid_thw)
    features = out.pooler_output.float()
    merge = loaded.model.config.vision_config.spatial_merge_size
    expected, offset = [], 0
    for rate, (t, h, w) in zip([0.75, 0.0, 0.5], batch.image_grid_thw.tolist()):
        n = t * (h // merge) * (w // merge)
        x = features[offset:offset + n].reshape(t, h // merge, w // merge, -1).numpy()
        expected += [offset + i for i in reference_evs(x, rate)]
        offset += n
    assert state.evs_kept[0].tolist() == expected
    assert len(expected) < batch.image_tokens[0]                               # the videos were pruned
    assert state.image_tokens[0][0] == len(expected)
    assert state.image_tokens[0][1] == keep_count(pipe.plan.stages[0].ratio, len(expected))   # pooled
    bad = copy.deepcopy(messages)
    bad[2]["content"][1]["video_url"]["evs_rate"] = 1.5
    with pytest.raises(HimapError, match=r"messages\[2\]\.content\[1\]\.video_url\.evs_rate must be in \[0, 1\)"):
        parse_messages(bad)
    bad[2]["content"][1]["video_url"] = {"url": "c.mp4", "max_frames": 1}
    with pytest.raises(HimapError, match=r"messages\[2\]\.content\[1\]\.video_url\.max_frames must be an integer"):
        parse_messages(bad)


def test_triton_messages_video_parts_take_their_own_fields(clip):
    """Triton's ``messages`` input: a video_url part's own fps / max_frames / evs_rate win over the
    request's ``video_fps`` / ``max_frames`` / ``evs_rate`` inputs, which are every other video's
    defaults; a part's max_frames over the frame limit is one line naming it."""
    import base64
    import json

    from himap_trt.triton.protocol import parse_request

    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()

    def request(parts, **extra):
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "What?"}]}]
        tensors = {"messages": np.array([json.dumps(messages).encode()], dtype=object),
                   **{k: np.array([v]) for k, v in extra.items()}}
        return parse_request(tensors.get, 8)

    parsed = request([{"type": "video_url", "video_url": {"url": url, "fps": 4, "max_frames": 6, "evs_rate": 0.25}},
                      {"type": "video_url", "video_url": {"url": url}}],
                     video_fps=np.float32(8), max_frames=np.int32(4), evs_rate=np.float32(0.5))
    own, default = parsed.visuals
    assert (len(own.frames), own.fps, len(default.frames), default.fps) == (6, 4, 4, 8)
    assert [p.options.get("evs_rate") for p in parsed.conversation.visual_parts] == [0.25, pytest.approx(0.5)]
    with pytest.raises(HimapError, match=r"messages\[0\]\.content\[0\]\.video_url\.max_frames must be between 2"):
        request([{"type": "video_url", "video_url": {"url": url, "max_frames": 100000}}])
