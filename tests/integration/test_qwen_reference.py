"""Qwen2.5-VL's PyTorch reference against transformers, independently of the project's graph code.

- ``--method none``: greedy tokens equal ``Qwen2_5_VLForConditionalGeneration.generate`` for one
  request and for a padded batch of three image sizes (three image-token counts).
- HiMAP / FastV: kept indices of every stage equal a computation from transformers' eager attention
  probabilities (``output_attentions=True``, M-RoPE positions from transformers' ``get_rope_index``),
  the criterion applied by hand, per-request keep counts by METHODS.md's rounding.
"""

import copy

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

from conftest import REFERENCE_PLANS, entering_hidden_states, plan_id, tiny
from himap_trt.plan import build_plan, keep_count
from himap_trt.runtime import GenerationConfig, reference_pipeline

MODEL = "tiny-qwen2.5-vl"
NEW_TOKENS = 12


def _plan(loaded, method, **kw):
    d = loaded.dims
    return build_plan(method, num_layers=d.num_layers, num_image_tokens=d.num_image_tokens, **kw)


def _hf_inputs(loaded, images, prompts):
    return loaded.processor(images=images, text=prompts, padding=True, return_tensors="pt")


@pytest.mark.parametrize("batch_size", [1, 3])
def test_no_pruning_equals_generate(qwen_requests, batch_size):
    loaded = tiny(MODEL)
    images, questions = qwen_requests
    pipe = reference_pipeline(loaded, _plan(loaded, "none"))
    batch = pipe.prepare(images[:batch_size], questions[:batch_size])
    if batch_size > 1:
        assert len(set(batch.image_tokens)) == 3, batch.image_tokens   # three image-token counts
        assert (batch.attention_mask == 0).any()
    with torch.inference_mode():
        ours = pipe.generate(batch, GenerationConfig(max_new_tokens=NEW_TOKENS))
        enc = _hf_inputs(loaded, images[:batch_size], batch.prompts)
        hf = loaded.model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = hf[:, enc["input_ids"].shape[1]:]
    assert expected.shape[1] >= 4
    assert torch.equal(ours.sequences, expected)


def test_rows_do_not_depend_on_the_batch(qwen_requests):
    """Each row of the mixed batch (padding, masked image slots, smaller keep counts than the batch's
    largest) gives the tokens and kept positions it gives alone."""
    loaded = tiny(MODEL)
    plan = _plan(loaded, "himap")
    pipe = reference_pipeline(loaded, plan)
    images, questions = qwen_requests
    with torch.inference_mode():
        batch = pipe.prepare(images, questions)
        together = pipe.generate(batch, GenerationConfig(max_new_tokens=6))
        for row in range(3):
            alone = pipe.generate(pipe.prepare(images[row:row + 1], questions[row:row + 1]),
                                  GenerationConfig(max_new_tokens=6))
            assert alone.sequences[0].tolist() == together.sequences[row].tolist()
            assert together.image_tokens_per_row[row] == alone.image_tokens_per_row[0]
            shift = batch.input_ids.shape[1] - int(batch.attention_mask[row].sum())   # padding + masked slots
            for ours, theirs in zip(together.stages, alone.stages):
                assert [p - shift for p in ours.kept_image_positions[row]] == theirs.kept_image_positions[0]
    assert len({tuple(c) for c in together.image_tokens_per_row}) == 3


# ---- independent kept-index computation ---------------------------------------------------------
def _select(scores, image_positions, keep, length):
    best = sorted(image_positions, key=lambda v: (-scores[v], v))[:keep]
    return sorted(set(range(length)) - set(image_positions) | set(best))


def hf_kept_indices(loaded, image, prompt, plan):
    """Per stage, the kept indices (into the sequence entering the stage) of one request, from
    transformers' eager attention probabilities and its own decoder layers."""
    model = loaded.model
    lm = model.model.language_model
    enc = _hf_inputs(loaded, [image], [prompt])
    ids = enc["input_ids"]
    positions, _ = model.model.get_rope_index(ids, enc["mm_token_type_ids"], enc["image_grid_thw"],
                                               attention_mask=enc["attention_mask"])
    with entering_hidden_states(lm.layers, [s.layer for s in plan.stages]) as entering, torch.no_grad():
        out = model(**enc, position_ids=positions, output_attentions=True)
    image_pos = [i for i in range(ids.shape[1]) if ids[0, i] == model.config.image_token_id]
    counts = [len(image_pos)]
    for s in plan.stages:
        counts.append(keep_count(s.ratio, counts[-1]))              # METHODS.md, per request
    attn = out.attentions[plan.stages[0].layer - 1]
    index = list(range(ids.shape[1]))
    stages = []
    for j, stage in enumerate(plan.stages):
        if j > 0:  # transformers' own Qwen2.5-VL decoder layers [K_{j-1}, K_j) on the kept tokens
            prev = plan.stages[j - 1].layer
            cfg = copy.deepcopy(lm.config)
            cfg.num_hidden_layers = stage.layer - prev
            cfg.layer_types = cfg.layer_types[:cfg.num_hidden_layers]
            cfg._attn_implementation = "eager"
            sub = Qwen2_5_VLTextModel(cfg).eval()
            for i in range(cfg.num_hidden_layers):
                sub.layers[i].load_state_dict(lm.layers[prev + i].state_dict())
            gather = torch.tensor(index)
            with torch.no_grad():
                attn = sub(inputs_embeds=entering[prev][:, gather], attention_mask=torch.ones(1, len(index)),
                           position_ids=positions[:, :, gather], output_attentions=True).attentions[-1]
        mean = attn.double().mean(1)[0]                              # Ā: [S_j, S_j]
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


@pytest.mark.parametrize("method,kw", REFERENCE_PLANS, ids=plan_id)
def test_kept_indices_equal_transformers_eager_attention(method, kw, qwen_requests):
    loaded = tiny(MODEL)
    plan = _plan(loaded, method, **kw)
    pipe = reference_pipeline(loaded, plan)
    images, questions = qwen_requests
    for row in (0, 1):                                               # two image sizes: 56 and 16 tokens
        batch = pipe.prepare(images[row:row + 1], questions[row:row + 1])
        with torch.inference_mode():
            state = pipe.prefill(batch)
        expected = hf_kept_indices(loaded, images[row], batch.prompts[0], plan)
        assert len(state.stages) == len(plan.stages) == len(expected)
        for stage, (ours, theirs) in enumerate(zip(state.stages, expected)):
            assert ours.kept_indices[0].tolist() == theirs, f"row {row} stage {stage}"
            assert len(ours.kept_image_positions[0]) == plan.image_tokens_for(batch.image_tokens[0])[stage + 1]
