"""Qwen3-VL (``tiny-qwen3-vl``): the PyTorch reference against transformers, independently of the
project's graph code, and the exported graphs against the reference.

- vision graph module = transformers' ``Qwen3VLVisionModel`` (``pooler_output`` and every DeepStack
  feature) on a two-image call;
- ``--method none``: greedy tokens equal ``Qwen3VLForConditionalGeneration.generate`` for one
  request and a padded batch of three image sizes; DeepStack changes the logits (so the equality
  would catch a pipeline that dropped it);
- HiMAP / FastV: kept indices of every stage equal a computation from transformers' eager attention
  probabilities, with transformers' own decoder layers (and its own DeepStack additions, for the kept
  image tokens) between the stages, for stages inside (K1 = 1, 2) and after (K = 5) the DeepStack
  layers 0..2 (docs/QWEN3VL.md);


"""

import copy

import pytest
import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

from conftest import exported, tiny
from himap_trt.graphs.qwen3_vision import Qwen3VisionEncoder, qwen3_vision_attrs, qwen3_vision_feeds
from himap_trt.plan import build_plan, keep_count
from himap_trt.runtime import GenerationConfig, reference_pipeline
from himap_trt.runtime.loader import open_pipeline

MODEL = "tiny-qwen3-vl"
NEW_TOKENS = 12


def _plan(loaded, method, **kw):
    d = loaded.dims
    return build_plan(method, num_layers=d.num_layers, num_image_tokens=d.num_image_tokens, **kw)


def _hf_inputs(loaded, images, prompts):
    return loaded.processor(images=images, text=prompts, padding=True, return_tensors="pt")


@pytest.mark.parametrize("grid", [None, [[1, 8, 8]], [[8, 4, 4]], [[8, 6, 10]]],
                         ids=["two-images", "2-frames", "16-frames", "16-frames-6x10"])
def test_vision_graph_module_equals_transformers(qwen_requests, grid):
    """Two images through the processor, and videos (2 frames = one temporal patch, 16 frames = 8)
    of random patches: attention per frame block equals transformers' per-frame ``cu_seqlens``
    (``pooler_output`` and every DeepStack feature)."""
    loaded = tiny(MODEL)
    visual = loaded.model.model.visual
    if grid is None:
        vision = loaded.processor.image_processor(qwen_requests[0][:2], return_tensors="pt")
        pixels, grid = vision["pixel_values"], vision["image_grid_thw"]
    else:
        grid = torch.tensor(grid)
        pixels = torch.randn(int(grid.prod()), 1536, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = visual(pixels, grid_thw=grid)
        feeds = qwen3_vision_feeds(pixels, grid, qwen3_vision_attrs(visual.config))
        embeds, deep = Qwen3VisionEncoder(visual)(*feeds.values())
    assert deep.shape[0] == len(theirs.deepstack_features) == 3
    torch.testing.assert_close(embeds, theirs.pooler_output, rtol=1e-4, atol=1e-4)
    for ours, expected in zip(deep, theirs.deepstack_features):
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_no_pruning_equals_generate(qwen_requests, batch_size):
    loaded = tiny(MODEL)
    images, questions = qwen_requests
    pipe = reference_pipeline(loaded, _plan(loaded, "none"))
    batch = pipe.prepare(images[:batch_size], questions[:batch_size])
    if batch_size > 1:
        assert len(set(batch.image_tokens)) == 3, batch.image_tokens
        assert (batch.attention_mask == 0).any()
    with torch.inference_mode():
        ours = pipe.generate(batch, GenerationConfig(max_new_tokens=NEW_TOKENS))
        enc = _hf_inputs(loaded, images[:batch_size], batch.prompts)
        hf = loaded.model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = hf[:, enc["input_ids"].shape[1]:]
    assert expected.shape[1] >= 4
    assert torch.equal(ours.sequences, expected)


def test_deepstack_changes_the_logits(qwen_requests, monkeypatch):
    """Without DeepStack's additions transformers' own logits change by far more than rounding."""
    loaded = tiny(MODEL)
    images, questions = qwen_requests
    enc = _hf_inputs(loaded, images[:1], [_plan_prompt(loaded, images[0], questions[0])])
    with torch.no_grad():
        full = loaded.model(**enc).logits[0, -1]
        monkeypatch.setattr(Qwen3VLTextModel, "_deepstack_process", lambda self, hidden, mask, embeds: hidden)
        without = loaded.model(**enc).logits[0, -1]
    assert (full - without).abs().max() > 1e-2


def _plan_prompt(loaded, image, question):
    pipe = reference_pipeline(loaded, _plan(loaded, "none"))
    return pipe.prepare([image], [question]).prompts[0]


# ---- independent kept-index computation ---------------------------------------------------------
def _select(scores, image_positions, keep, length):
    best = sorted(image_positions, key=lambda v: (-scores[v], v))[:keep]
    return sorted(set(range(length)) - set(image_positions) | set(best))


def hf_kept_indices(loaded, image, prompt, plan):
    """Per stage, the kept indices (into the sequence entering the stage) of one request, from
    transformers' eager attention probabilities, its decoder layers and its DeepStack additions."""
    model = loaded.model
    lm = model.model.language_model
    enc = _hf_inputs(loaded, [image], [prompt])
    ids = enc["input_ids"]
    positions, _ = model.model.get_rope_index(ids, enc["mm_token_type_ids"], enc["image_grid_thw"],
                                               attention_mask=enc["attention_mask"])
    with torch.no_grad():
        deep = [torch.cat(f) for f in model.model.get_image_features(enc["pixel_values"],
                                                                     enc["image_grid_thw"]).deepstack_features]
    entering = {}

    def grab(layer):
        def hook(module, args, kwargs):
            entering[layer] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    handles = [lm.layers[s.layer].register_forward_pre_hook(grab(s.layer), with_kwargs=True) for s in plan.stages]
    try:
        with torch.no_grad():
            out = model(**enc, position_ids=positions, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    image_pos = [i for i in range(ids.shape[1]) if ids[0, i] == model.config.image_token_id]
    counts = [len(image_pos)]
    for s in plan.stages:
        counts.append(keep_count(s.ratio, counts[-1]))
    attn = out.attentions[plan.stages[0].layer - 1]
    index = list(range(ids.shape[1]))
    stages = []
    for j, stage in enumerate(plan.stages):
        if j > 0:  # transformers' own decoder layers [K_{j-1}, K_j) on the kept tokens, DeepStack included
            prev = plan.stages[j - 1].layer
            cfg = copy.deepcopy(lm.config)
            cfg.num_hidden_layers = stage.layer - prev
            cfg._attn_implementation = "eager"
            sub = Qwen3VLTextModel(cfg).eval()
            for i in range(cfg.num_hidden_layers):
                sub.layers[i].load_state_dict(lm.layers[prev + i].state_dict())
            gather = torch.tensor(index)
            kept_image = [image_pos.index(p) for p in index if p in image_pos]     # ordinals of kept image tokens
            mask = torch.tensor([[p in image_pos for p in index]])
            extra = [d[kept_image] for d in deep[prev:]]                            # sub layer 0 = layer prev
            with torch.no_grad():
                attn = sub(inputs_embeds=entering[prev][:, gather], attention_mask=torch.ones(1, len(index)),
                           position_ids=positions[:, :, gather], output_attentions=True, visual_pos_masks=mask,
                           deepstack_visual_embeds=extra or None).attentions[-1]
        mean = attn.double().mean(1)[0]
        image = [i for i, p in enumerate(index) if p in image_pos]
        if stage.criterion == "img2txt":
            rows = [i for i, p in enumerate(index) if p > max(image_pos)]
        elif stage.criterion == "img2img":
            rows = image
        else:
            rows = [len(index) - 1]
        kept = _select(mean[rows].sum(0).tolist(), image, counts[j + 1], len(index))
        stages.append(kept)
        index = [index[i] for i in kept]
    return stages


PLANS = [
    ("himap", dict(k1=2, r1=0.5, k2=8, r2=0.75)),     # K1 inside DeepStack (layer 2's addition after it)
    ("himap", dict(k1=1, r1=0.6, k2=3, r2=0.5)),      # both stages inside
    ("fastv", dict(k=5, r=0.75)),                     # after the DeepStack layers
]


@pytest.mark.parametrize("method,kw", PLANS, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}{x}" for k, x in v.items()))
def test_kept_indices_equal_transformers_eager_attention(method, kw, qwen_requests):
    loaded = tiny(MODEL)
    plan = _plan(loaded, method, **kw)
    pipe = reference_pipeline(loaded, plan)
    images, questions = qwen_requests
    for row in (0, 1):
        batch = pipe.prepare(images[row:row + 1], questions[row:row + 1])
        with torch.inference_mode():
            state = pipe.prefill(batch)
        expected = hf_kept_indices(loaded, images[row], batch.prompts[0], plan)
        assert len(state.stages) == len(plan.stages) == len(expected)
        for stage, (ours, theirs) in enumerate(zip(state.stages, expected)):
            assert ours.kept_indices[0].tolist() == theirs, f"row {row} stage {stage}"


# ---- exported graphs ----------------------------------------------------------------------------
# One export (HiMAP, validated graph by graph): its scoring graphs are the Qwen2.5-VL ones
# (tests/integration/test_qwen_onnx.py covers FastV's); what is new here is the vision graph and the
# DeepStack inputs of segments 0 and 1. One export keeps the added CI time small.
@pytest.mark.slow
def test_onnxruntime_equals_reference(tmp_path_factory, qwen_requests):
    out, manifest, checks = exported(tmp_path_factory, MODEL, "himap")
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert {c.graph for c in checks} == {g.name for g in manifest.graphs}
    deep_inputs = {g.name: [t.name for t in g.inputs if t.name.startswith("deepstack.")]
                   for g in manifest.graphs if g.kind == "segment"}
    # K1 = 2 falls inside the DeepStack layers 0..2: layer 2's addition is segment 1's
    assert deep_inputs == {"segment_0": ["deepstack.0", "deepstack.1"], "segment_1": ["deepstack.2"],
                           "segment_2": []}
    images, questions = qwen_requests
    onnx_pipe = open_pipeline(export_dir=out, backend="onnxruntime").pipeline
    ref_pipe = reference_pipeline(tiny(MODEL), manifest.plan)
    for rows in ([1], [0, 1, 2]):
        batch = ref_pipe.prepare([images[r] for r in rows], [questions[r] for r in rows])
        with torch.inference_mode():
            ours = onnx_pipe.generate(batch, GenerationConfig(max_new_tokens=8))
            ref = ref_pipe.generate(batch, GenerationConfig(max_new_tokens=8))
        assert torch.equal(ours.sequences, ref.sequences)
        assert ours.image_tokens_per_row == ref.image_tokens_per_row
        for mine, theirs in zip(ours.stages, ref.stages):
            assert torch.equal(mine.kept_indices, theirs.kept_indices)


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", MODEL])
def test_analyze_inputs_equal_transformers(model, qwen_requests):
    """`analyze` runs the Qwen families: its prompt embedding, M-RoPE positions and (Qwen3-VL)
    DeepStack features give transformers' own next-token logits."""
    from himap_trt.analysis.analyze import Request, prepare_inputs
    from himap_trt.analysis.analyze.measure import last_logits

    loaded = tiny(model)
    images, questions = qwen_requests
    inputs = prepare_inputs(loaded, Request(images[1], questions[1]))
    assert (inputs.deepstack is not None) == (model == MODEL)
    prompt = _plan_prompt(loaded, images[1], questions[1])
    with torch.no_grad():
        ours = last_logits(loaded.model, inputs.embeds, inputs.position_ids, inputs.deepstack)[0]
        theirs = loaded.model(**_hf_inputs(loaded, images[1:2], [prompt])).logits[0, -1].float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
