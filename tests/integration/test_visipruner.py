"""VisiPruner's static form against an independent computation and across backends.

- Kept image tokens of the middle stage = METHODS.md's criterion applied by hand to transformers'
  eager attention probabilities (``output_attentions=True``) and the layer's value projections, on
  a padded batch whose rows keep different counts (one below the cap, one capped).
- ONNX Runtime = the PyTorch reference, token for token and kept index for kept index.
"""

import pytest
import torch
from transformers.models.llama.modeling_llama import repeat_kv

from conftest import exported, tiny
from himap_trt.plan import build_plan
from himap_trt.runtime import GenerationConfig, reference_pipeline

MID, DEEP = 4, 8


def hand_scores(loaded, batch, mid):
    """s(v) = sqrt(sum_h A_h[last, v]^2 ||V_h[v]||^2) of layer mid-1, from transformers' eager attention."""
    model = loaded.model
    lm = model.model.language_model
    layer = lm.layers[mid - 1]
    grabbed = {}

    def hook(module, args, kwargs):
        grabbed["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    mask = batch.attention_mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    try:
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=mask, pixel_values=batch.pixel_values,
                        position_ids=positions, output_attentions=True)
    finally:
        handle.remove()
    attn = layer.self_attn
    with torch.no_grad():
        x = layer.input_layernorm(grabbed["hidden"])
        b, s, _ = x.shape
        values = attn.v_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)           # [B,Hkv,S,Dh]
    values = repeat_kv(values, attn.num_key_value_groups).double()                    # [B,H,S,Dh]
    last = out.attentions[mid - 1][:, :, -1].double()                                 # [B,H,S]
    return (last ** 2 * (values ** 2).sum(-1)).sum(1).sqrt()                          # [B,S]


def hand_kept(scores, batch, image_token_id, tau, cap):
    kept = []
    for row in range(scores.shape[0]):
        image = [i for i in range(scores.shape[1]) if batch.input_ids[row, i] == image_token_id]
        candidates = [v for v in image if scores[row, v] > tau]
        kept.append(sorted(sorted(candidates, key=lambda v: (-float(scores[row, v]), v))[:cap]))
    return kept


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_kept_tokens_equal_hand_computation_on_transformers_eager_attention(name, requests_3):
    loaded = tiny(name)
    d = loaded.dims
    probe = reference_pipeline(loaded, build_plan("visipruner", num_layers=d.num_layers,
                                                  num_image_tokens=d.num_image_tokens, mid_layer=MID, deep_layer=DEEP))
    batch = probe.prepare(*requests_3)
    assert (batch.attention_mask == 0).any(), "the batch should be padded"
    scores = hand_scores(loaded, batch, MID)
    # tau halfway between row 0's 5th and 6th best image scores; cap C one below the largest count above tau
    image0 = scores[0][batch.input_ids[0] == d.image_token_id].sort(descending=True).values
    tau = float(image0[4] + image0[5]) / 2
    uncapped = [len(k) for k in hand_kept(scores, batch, d.image_token_id, tau, d.num_image_tokens)]
    cap = max(uncapped) - 1
    expected = hand_kept(scores, batch, d.image_token_id, tau, cap)
    counts = [len(k) for k in expected]
    assert min(counts) < cap and cap in counts, (uncapped, counts)        # different counts, one row capped
    plan = build_plan("visipruner", num_layers=d.num_layers, num_image_tokens=d.num_image_tokens, mid_layer=MID,
                      deep_layer=DEEP, threshold=tau, max_keep=cap)
    pipe = reference_pipeline(loaded, plan)
    state = pipe.prefill(batch)
    middle, deep = state.stages
    assert middle.kept_image_positions == expected
    assert middle.kept_indices.shape[1] == batch.input_ids.shape[1] - (d.num_image_tokens - cap)
    assert deep.kept_image_positions == [[], [], []]
    assert deep.kept_indices.shape[1] == batch.input_ids.shape[1] - d.num_image_tokens


def test_masked_slots_do_not_change_real_tokens(requests_3):
    """A row's result must not depend on its masked padding slots: row 0 alone and in the batch agree."""
    loaded = tiny("tiny")
    d = loaded.dims
    plan = build_plan("visipruner", num_layers=d.num_layers, num_image_tokens=d.num_image_tokens, mid_layer=MID,
                      deep_layer=DEEP, threshold=0.2, max_keep=40)
    pipe = reference_pipeline(loaded, plan)
    images, questions = requests_3
    batch = pipe.prepare(images, questions)
    together = pipe.generate(batch, GenerationConfig(max_new_tokens=6))
    for row in range(3):
        single = pipe.prepare(images[row:row + 1], questions[row:row + 1])
        alone = pipe.generate(single, GenerationConfig(max_new_tokens=6))
        pad = batch.input_ids.shape[1] - single.input_ids.shape[1]                     # left padding in the batch
        kept = alone.stages[0].kept_image_positions[0]
        assert [p + pad for p in kept] == together.stages[0].kept_image_positions[row]
        assert len(kept) < 40                                                          # padded with masked slots
        assert alone.tokens[0] == together.tokens[row]


def test_onnxruntime_equals_torch_token_for_token(tmp_path_factory, requests_3):
    from himap_trt.runtime.loader import open_pipeline

    out, manifest, _ = exported(tmp_path_factory, "tiny", "visipruner", mid_layer=MID, deep_layer=DEEP,
                                threshold=0.2, max_keep=20)
    results = {}
    for backend in ("onnxruntime", "torch"):
        opened = open_pipeline(export_dir=out, backend=backend, model=None, requested_plan=None, engines_dir=None,
                               device=None, dtype="fp32")
        try:
            pipe = opened.pipeline
            results[backend] = pipe.generate(pipe.prepare(*requests_3), GenerationConfig(max_new_tokens=12))
        finally:
            opened.pipeline.close()
    ort, ref = results["onnxruntime"], results["torch"]
    assert ort.tokens == ref.tokens
    counts = [len(p) for p in ref.stages[0].kept_image_positions]
    assert len(set(counts)) > 1 and min(counts) < 20, counts   # rows keep different counts, with masked slots
    for a, b in zip(ort.stages, ref.stages):
        assert torch.equal(a.kept_indices.cpu(), b.kept_indices.cpu())
        assert a.kept_image_positions == b.kept_image_positions
