"""The PyTorch reference against transformers, independently of the project's graph code.

- ``--method none``: greedy tokens equal ``model.generate``.
- HiMAP / FastV: kept indices of every stage equal a computation from transformers' eager
  attention probabilities (``output_attentions=True``), with the criterion applied by hand.
"""

import copy

import pytest
import torch
from transformers import LlamaModel

from conftest import REFERENCE_PLANS, entering_hidden_states, plan_id, tiny
from himap_trt.plan import build_plan
from himap_trt.runtime import GenerationConfig, reference_pipeline

NEW_TOKENS = 16


def _plan(loaded, method, **kw):
    d = loaded.dims
    return build_plan(method, num_layers=d.num_layers, num_image_tokens=d.num_image_tokens, **kw)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_no_pruning_equals_generate(tiny_model, requests_3, batch_size):
    images, questions = requests_3
    pipe = reference_pipeline(tiny_model, _plan(tiny_model, "none"))
    batch = pipe.prepare(images[:batch_size], questions[:batch_size])
    if batch_size > 1:
        assert (batch.attention_mask == 0).any(), "the batch should be padded"
    ours = pipe.generate(batch, GenerationConfig(max_new_tokens=NEW_TOKENS))
    hf = tiny_model.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   pixel_values=batch.pixel_values, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = hf[:, batch.input_ids.shape[1]:]
    assert expected.shape[1] == NEW_TOKENS
    assert torch.equal(ours.sequences, expected)


# ---- independent kept-index computation ---------------------------------------------------------
def _select(scores, image_positions, keep, length):
    """METHODS.md's rule written plainly: all non-image positions plus the `keep` best image ones
    (higher score, then lower index), ascending."""
    best = sorted(image_positions, key=lambda v: (-scores[v], v))[:keep]
    return sorted(set(range(length)) - set(image_positions) | set(best))


def _criterion_scores(mean_attention, rows):
    """score(v) = sum over the criterion's rows i of Ā[i, v]."""
    return mean_attention[rows].sum(0).tolist()


def hf_kept_indices(loaded, batch, plan):
    """Per stage, per row, the kept indices computed from transformers' eager attentions."""
    model = loaded.model
    lm = model.model.language_model
    image_id = model.config.image_token_id
    ids, mask = batch.input_ids, batch.attention_mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with entering_hidden_states(lm.layers, [s.layer for s in plan.stages]) as entering, torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=batch.pixel_values,
                    position_ids=positions, output_attentions=True)

    B = ids.shape[0]
    is_image = [[i for i in range(ids.shape[1]) if ids[b, i] == image_id and mask[b, i]] for b in range(B)]
    stages = []
    attn = out.attentions[plan.stages[0].layer - 1]
    index = [list(range(ids.shape[1])) for _ in range(B)]
    for j, stage in enumerate(plan.stages):
        if j > 0:  # run layers [K_{j-1}, K_j) of transformers' own Llama on the kept tokens
            prev = plan.stages[j - 1].layer
            cfg = copy.deepcopy(lm.config)
            cfg.num_hidden_layers = stage.layer - prev
            cfg._attn_implementation = "eager"
            sub = LlamaModel(cfg).eval()
            for i in range(cfg.num_hidden_layers):
                sub.layers[i].load_state_dict(lm.layers[prev + i].state_dict())
            gather = torch.tensor(index)
            hidden = torch.gather(entering[prev], 1, gather[..., None].expand(-1, -1, entering[prev].shape[-1]))
            with torch.no_grad():
                attn = sub(inputs_embeds=hidden, attention_mask=torch.gather(mask, 1, gather),
                           position_ids=torch.gather(positions, 1, gather), output_attentions=True).attentions[-1]
        mean = attn.double().mean(1)                                  # Ā: [B, S_j, S_j]
        kept = []
        for b in range(B):
            original = index[b]
            image = [i for i, p in enumerate(original) if p in is_image[b]]
            if stage.criterion == "img2txt":
                rows = [i for i, p in enumerate(original) if p > max(is_image[b])]
            elif stage.criterion == "img2img":
                rows = image
            else:
                rows = [len(original) - 1]
            kept.append(_select(_criterion_scores(mean[b], rows), image, stage.keep, len(original)))
        stages.append(kept)
        index = [[index[b][i] for i in kept[b]] for b in range(B)]
    return stages


@pytest.mark.parametrize("method,kw", REFERENCE_PLANS, ids=plan_id)
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_kept_indices_equal_transformers_eager_attention(name, method, kw, requests_3):
    loaded = tiny(name)
    plan = _plan(loaded, method, **kw)
    pipe = reference_pipeline(loaded, plan)
    batch = pipe.prepare(*requests_3)
    state = pipe.prefill(batch)
    expected = hf_kept_indices(loaded, batch, plan)
    assert len(state.stages) == len(plan.stages) == len(expected)
    for stage, (ours, theirs) in enumerate(zip(state.stages, expected)):
        assert ours.kept_indices.tolist() == theirs, f"stage {stage}"
        counts = {len(p) for p in ours.kept_image_positions}
        assert counts == {plan.stages[stage].keep}


def test_pruning_changes_the_output(requests_3):
    """Guards the tests above against a model so flat that pruning could not matter."""
    loaded = tiny("tiny")
    images, questions = requests_3
    results = []
    for method in ("none", "himap"):
        pipe = reference_pipeline(loaded, _plan(loaded, method))
        results.append(pipe.generate(pipe.prepare(images[:1], questions[:1]), GenerationConfig(max_new_tokens=8)))
    assert results[0].tokens != results[1].tokens


def test_sampling_is_seeded_and_respects_top_k(requests_3):
    loaded = tiny("tiny")
    images, questions = requests_3
    pipe = reference_pipeline(loaded, _plan(loaded, "himap"))
    batch = pipe.prepare(images[:1], questions[:1])
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.5, top_k=3, seed=7)
    a, b = pipe.generate(batch, cfg), pipe.generate(batch, cfg)
    assert a.tokens == b.tokens
    greedy = pipe.generate(batch, GenerationConfig(max_new_tokens=12))
    assert a.tokens != greedy.tokens
    # top_k=1, or a top_p below the best token's probability, samples the greedy token whatever the temperature
    assert pipe.generate(batch, GenerationConfig(max_new_tokens=12, temperature=2.0, top_k=1, seed=3)).tokens == greedy.tokens
    assert pipe.generate(batch, GenerationConfig(max_new_tokens=12, temperature=2.0, top_p=1e-6, seed=3)).tokens == greedy.tokens
    other_seed = pipe.generate(batch, GenerationConfig(max_new_tokens=12, temperature=1.5, top_k=3, seed=8))
    assert other_seed.tokens != a.tokens


def test_eos_stops_and_pads_like_generate(requests_3):
    """Make the 3rd greedy token an EOS by declaring it one; rows then pad as transformers does."""
    loaded = tiny("tiny")
    images, questions = requests_3
    plan = _plan(loaded, "none")
    pipe = reference_pipeline(loaded, plan)
    batch = pipe.prepare(images, questions)
    free = pipe.generate(batch, GenerationConfig(max_new_tokens=6))
    eos = free.sequences[0, 2].item()
    pipe.eos_token_ids = [eos]
    ours = pipe.generate(batch, GenerationConfig(max_new_tokens=6))
    hf = loaded.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               pixel_values=batch.pixel_values, max_new_tokens=6, do_sample=False,
                               eos_token_id=eos, pad_token_id=pipe.pad_token_id)
    assert torch.equal(ours.sequences, hf[:, batch.input_ids.shape[1]:])
    assert ours.finish_reasons[0] == "eos" and ours.tokens[0][-1] == eos
