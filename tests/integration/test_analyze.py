"""`himap-trt analyze` against independent computations on transformers' own eager attention.

- Saliency (Eq. 1) of a layer = autograd through transformers' stock eager attention
  (``output_attentions=True``, ``torch.autograd.grad`` w.r.t. the returned probabilities).
- Disruptions = a forward hook on the layer's attention module that recomputes attention by hand
  with the entries zeroed and replaces its output.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
from typer.testing import CliRunner

from conftest import tiny
from himap_trt.analysis.analyze import Request, prepare_inputs
from himap_trt.analysis.analyze.measure import disruption, saliency_maps, saliency_metrics
from himap_trt.cli import app
from himap_trt.prompt import TOKEN_IMAGE, TOKEN_INSTRUCTION, prepare_batch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models' matrices are too small to split across threads; one thread is several times
    faster on the shared CI machine (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hf_inputs(loaded, image, question):
    d = loaded.dims
    batch = prepare_batch(loaded.processor, [image], [question], d.image_token_id, d.num_image_tokens)
    return batch


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_saliency_equals_autograd_through_transformers_eager_attention(name, requests_3):
    loaded = tiny(name)
    image, question = requests_3[0][1], requests_3[1][1]
    batch = _hf_inputs(loaded, image, question)
    model = loaded.model
    with torch.enable_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                    output_attentions=True)
        logits = out.logits[:, -1].float()
        target = int(logits.argmax())
        loss = F.cross_entropy(logits, torch.tensor([target]))
        layers = [1, 5]
        grads = torch.autograd.grad(loss, [out.attentions[layer] for layer in layers])
    inputs = prepare_inputs(loaded, Request(image, question))
    inputs.target = target
    maps, _, _ = saliency_maps(model, inputs)
    types = batch.token_type_ids[0]
    image_idx = torch.nonzero(types == TOKEN_IMAGE)[:, 0]
    instr_idx = torch.nonzero(types == TOKEN_INSTRUCTION)[:, 0]
    result, _ = saliency_metrics(model, inputs, tau=0.2)
    for layer, grad in zip(layers, grads):
        attn = out.attentions[layer][0].detach().double()
        expected = (attn * grad[0].double()).sum(0).abs() / attn.shape[0]        # Eq. 1, head mean
        assert expected.abs().max() > 0
        torch.testing.assert_close(maps[layer].double(), expected, rtol=1e-3, atol=1e-4 * float(expected.max()))
        n = len(image_idx)
        s_vv = float(expected[image_idx][:, image_idx].sum()) / (n * (n + 1) / 2)
        s_vt = float(expected[instr_idx][:, image_idx].mean())
        assert result.s_vv[layer] == pytest.approx(s_vv, rel=1e-3)
        assert result.s_vt[layer] == pytest.approx(s_vt, rel=1e-3)


def _blocking_hook(kind, types):
    """Replace the attention module's output by attention recomputed by hand with the entries zeroed."""
    image = types == TOKEN_IMAGE
    rows = (types == TOKEN_INSTRUCTION) if kind == "vt" else image
    blocked = rows[:, None] & image[None, :]

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        b, s, _ = hidden.shape
        shape = (b, s, -1, module.head_dim)
        q = module.q_proj(hidden).view(shape).transpose(1, 2)
        k = module.k_proj(hidden).view(shape).transpose(1, 2)
        v = module.v_proj(hidden).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = repeat_kv(k, module.num_key_value_groups), repeat_kv(v, module.num_key_value_groups)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        scores = (q @ k.transpose(2, 3)) * module.scaling
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        probs = probs.masked_fill(blocked, 0.0)
        attn = (probs @ v).transpose(1, 2).reshape(b, s, -1)
        return module.o_proj(attn), probs

    return hook


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_disruption_equals_zeroing_by_hand(name, requests_3):
    loaded = tiny(name)
    model = loaded.model
    lm = model.model.language_model
    for image, question in list(zip(*requests_3))[:2]:
        batch = _hf_inputs(loaded, image, question)
        types = batch.token_type_ids[0]
        with torch.no_grad():
            clean = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          pixel_values=batch.pixel_values).logits[0, -1].float()
        inputs = prepare_inputs(loaded, Request(image, question))
        ours = disruption(model, inputs, clean, chunk=5)
        changed = 0
        for layer in (0, 2, 7):
            for kind in ("vt", "vv"):
                handle = lm.layers[layer].self_attn.register_forward_hook(_blocking_hook(kind, types), with_kwargs=True)
                try:
                    with torch.no_grad():
                        hit = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    pixel_values=batch.pixel_values).logits[0, -1].float()
                finally:
                    handle.remove()
                label = float(hit.argmax() == clean.argmax())
                a, b = set(clean.topk(5).indices.tolist()), set(hit.topk(5).indices.tolist())
                kl = float((clean.softmax(-1) * (clean.log_softmax(-1) - hit.log_softmax(-1))).sum())
                assert ours[kind]["label"][layer] == label, (layer, kind)
                assert ours[kind]["score"][layer] == pytest.approx(len(a & b) / len(a | b)), (layer, kind)
                assert ours[kind]["kl"][layer] == pytest.approx(kl, rel=1e-3, abs=1e-6), (layer, kind)
                changed += label == 0.0 or len(a & b) < 5
        assert changed, "no disruption changed the prediction: the comparison would be vacuous"


def test_analyze_cli_writes_json_and_plots(tmp_path, photo_path):
    data = tmp_path / "requests.jsonl"
    data.write_text("\n".join(json.dumps({"image": str(photo_path), "question": q})
                              for q in ("What is shown?", "Who is it?")) + "\n")
    out = tmp_path / "analysis"
    result = CliRunner().invoke(app, ["analyze", "--model", "tiny", "--data", str(data), "--out", str(out), "--json",
                                      "--threads", "1"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "analysis.json").read_text())
    L = doc["num_layers"]
    assert doc["requests"] == 2 and len(doc["per_request"]) == 2
    for key in ("s_vv", "s_vt", "bias_ratio", "image_to_instruction", "image_to_image", "to_system"):
        assert len(doc["per_layer"][key]) == L
    rec = doc["recommended"]
    assert 1 <= rec["himap"]["k1"] < rec["himap"]["k2"] <= L - 1
    assert 1 <= rec["visipruner"]["mid_layer"] < rec["visipruner"]["deep_layer"] <= L - 1
    assert 0 < rec["himap"]["eq10_ratio"] < 1 and 0 < rec["visipruner"]["eq10_ratio"] < 1
    for png in ("flows.png", "disruption.png", "triggers.png", "attention_mass.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,fragment", [
    (["--data", "missing.jsonl"], "--data file"),
    (["--model", "tiny"], "pass an IMAGE and a QUESTION"),
    (["--threshold", "-1", "x.jpg", "q"], "--threshold"),
])
def test_analyze_bad_input_one_line(args, fragment):
    result = CliRunner().invoke(app, ["analyze", *args])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_analyze_recommends_visipruner_for_qwen_and_its_counts_are_the_pipelines(tmp_path, photo):
    """Qwen2.5-VL (issue 31): two images of different sizes (own |V|). The recommended K_M / K_E are
    the rule's quantile of the per-request triggers; Eq. 10 counts each request's own |V| (the
    processor's, as the pipeline prepares it); and the recommended plan runs: the pipeline's middle
    stage keeps, per request, min(C, the analysis' count of image tokens with s_{K_M-1}(v) > tau)."""
    from himap_trt.flops import omega
    from himap_trt.plan import build_plan
    from himap_trt.runtime import reference_pipeline

    rgb = photo.convert("RGB")
    images = [rgb.resize((100, 120)), rgb.resize((150, 90))]
    questions = ["What is shown?", "Who is it?"]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"image{i}.png")
        image.save(paths[-1])
    data = tmp_path / "requests.jsonl"
    data.write_text("".join(json.dumps({"image": str(p), "question": q}) + "\n" for p, q in zip(paths, questions)))
    out, cap, tau = tmp_path / "analysis", 8, 0.1
    result = CliRunner().invoke(app, ["analyze", "--model", "tiny-qwen2.5-vl", "--data", str(data), "--out", str(out),
                                      "--json", "--threads", "1", "--max-keep", str(cap), "--threshold", str(tau)])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    L, rec = doc["num_layers"], doc["recommended"]["visipruner"]
    loaded = tiny("tiny-qwen2.5-vl")
    d = loaded.dims
    pipe = reference_pipeline(loaded, build_plan("visipruner", num_layers=L, num_image_tokens=d.num_image_tokens,
                                                 mid_layer=rec["mid_layer"], deep_layer=rec["deep_layer"],
                                                 threshold=tau, max_keep=cap))
    own = [pipe.prepare([image], [q]).image_tokens[0] for image, q in zip(images, questions)]
    assert [r["image_tokens"] for r in doc["per_request"]] == own
    assert len(set(own)) == 2 and max(own) < d.num_image_tokens
    middles = [m for m in doc["triggers"]["middle_layer"] if m is not None]
    if middles:                                  # two requests: the 90% nearest-rank quantile is the larger
        assert rec["mid_layer"] == min(L - 2, max(1, max(middles)))
    assert 1 <= rec["mid_layer"] < rec["deep_layer"] <= L - 1
    baseline = sum(L * omega(n, d.hidden_size, d.intermediate_size) for n in own) / 2
    assert doc["recommended"]["baseline_eq10_flops"] == pytest.approx(baseline)
    expected = [min(cap, r["value_scores_above"][rec["mid_layer"] - 1]) for r in doc["per_request"]]
    assert rec["kept_mean"] == pytest.approx(sum(expected) / 2)
    with torch.inference_mode():
        kept = [len(pipe.prefill(pipe.prepare([image], [q])).stages[0].kept_image_positions[0])
                for image, q in zip(images, questions)]
    assert kept == expected and 0 < min(kept) < cap in kept, (kept, own)      # one capped, one not
