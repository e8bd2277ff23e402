"""The papers' diagnostics for one request (batch 1, PyTorch, eager attention).

Per decoder layer l (METHODS.md "The paper's diagnostics" and "VisiPruner"):

- attention mass (head mean Ā_l, rows summing to 1 over all keys) that image rows, instruction
  rows and the last prompt row pay to system, image and instruction keys;
- saliency ``I_l = |Σ_h A_{h,l} ⊙ ∂L/∂A_{h,l}| / H`` (HiMAP Eq. 1), L the cross-entropy of the
  answer token at the last prompt position; from it ``S_vv`` (Eq. 5, mean over the causal image ×
  image pairs j <= i), ``S_vt`` (Eq. 6, mean over instruction rows × image columns) and the
  modality contributions to the prediction (mean of ``I_l[last, j]`` over j in S, V, I; Sec. 2.2);
- disruption (Sec. 3.2, 3.3): layer l's probabilities with ``A(i, j) = 0`` for i in I, j in V
  (``vt``: visual→textual flow) or i, j in V (``vv``: intra-visual flow), no renormalisation, that
  layer only; label consistency (same top-1 token), score consistency (Jaccard of the top-5
  token ids) and the prediction bias ``KL(p || p_disrupted)`` of the next-token distribution;
- VisiPruner's value-contribution score ``s_l(v)`` of every image token for the last prompt
  token, and how many exceed τ (what the static form would keep at K_M = l + 1);
- VisiPruner's reference triggers (:class:`ReferenceTriggers`): the per-input middle layer m + 1
  and deep layer of the reference code's semantics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from himap_trt.analysis.analyze.probe import Probe, probing
from himap_trt.prompt import TOKEN_IMAGE, TOKEN_INSTRUCTION, TOKEN_SYSTEM

#: Rows and keys of the attention-mass table.
MASS_ROWS = ("image", "instruction", "last")
MASS_KEYS = ("system", "image", "instruction")

#: VisiPruner reference constants (METHODS.md, from its code): cosine thresholds of the middle and
#: deep tests, how many passing layers end the deep stage, and its layers for a 32-layer decoder.
MIDDLE_COSINE, DEEP_COSINE, DEEP_PASSES = 0.995, 0.999, 2
REFERENCE_SHALLOW_END, REFERENCE_FIRST_CANDIDATE, REFERENCE_LAYERS = 6, 7, 32

TOP_K = 5


@dataclass
class RequestInputs:
    """One prompt, ready for the language model.

    Attributes:
        embeds: [1, S, D] input embeddings (image features merged at the image positions).
        position_ids: [1, S] int64.
        types: [S] int64 token types (``himap_trt.prompt.TOKEN_*``).
        target: the answer token id whose cross-entropy the saliency differentiates.
        target_source: ``answer`` (first token of the given answer) or ``greedy`` (the model's top-1).
    """

    embeds: torch.Tensor
    position_ids: torch.Tensor
    types: torch.Tensor
    target: int = -1
    target_source: str = "greedy"

    @property
    def spans(self) -> dict[str, torch.Tensor]:
        """Index tensors of the system, image and instruction positions."""
        return {name: torch.nonzero(self.types == t)[:, 0]
                for name, t in (("system", TOKEN_SYSTEM), ("image", TOKEN_IMAGE), ("instruction", TOKEN_INSTRUCTION))}


@dataclass
class RequestAnalysis:
    """Everything measured on one request; per-layer lists have L entries."""

    prompt_tokens: int
    image_tokens: int
    target: int
    target_source: str
    attention_mass: list[dict[str, dict[str, float]]] = field(default_factory=list)
    s_vv: list[float] = field(default_factory=list)
    s_vt: list[float] = field(default_factory=list)
    contribution: list[dict[str, float]] = field(default_factory=list)
    disruption: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    value_scores_above: list[int] = field(default_factory=list)
    value_score_max: list[float] = field(default_factory=list)
    reference: dict[str, Any] = field(default_factory=dict)


def _language_model(model: Any):
    return model.model.language_model


def last_logits(model: Any, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, V] float32 of a batch of unpadded prompts."""
    hidden = _language_model(model)(inputs_embeds=embeds, position_ids=position_ids,
                                    attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                              device=embeds.device)).last_hidden_state
    return model.lm_head(hidden[:, -1]).float()


def value_contributions(probs: torch.Tensor, value: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VisiPruner's per-token quantities for the last query row (METHODS.md "VisiPruner", Words).

    Args:
        probs: [H, S, S] attention probabilities of one layer (one request).
        value: [H, S, Dh] value vectors after GQA repetition.
        image: [n] indices of the image tokens to score.

    Returns:
        (s, rho), both [n] float32: ``s(v) = ||concat_h A_h[last, v] V_h[v]||`` and
        ``rho(v) = cos(o - c(v), o)`` with o the last token's attention output before W_o.
    """
    last = probs[:, -1].float()                                         # [H,S]
    value = value.float()
    contribution = last[:, image, None] * value[:, image]               # [H,n,Dh]
    c = contribution.transpose(0, 1).reshape(len(image), -1)            # [n,H*Dh]
    o = torch.einsum("hs,hsd->hd", last, value).reshape(-1)             # [H*Dh]
    rho = F.cosine_similarity(o[None] - c, o[None], dim=-1)
    return c.norm(dim=-1), rho


class _Record(Probe):
    def __init__(self):
        self.probs: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def edit_probs(self, layer, probs, value):
        self.probs[layer], self.values[layer] = probs, value
        return probs


def saliency_maps(model: Any, inputs: RequestInputs) -> tuple[list[torch.Tensor], _Record, torch.Tensor]:
    """Eq. 1 for every layer.

    Returns:
        (I: per layer [S, S] float32 saliency, the recorded probabilities and values, clean logits [V]).
    """
    record = _Record()
    with torch.enable_grad(), probing(model, record):
        logits = last_logits(model, inputs.embeds, inputs.position_ids)
        loss = F.cross_entropy(logits, torch.tensor([inputs.target], device=logits.device))
        layers = sorted(record.probs)
        grads = torch.autograd.grad(loss, [record.probs[layer] for layer in layers])
    maps = []
    for layer, grad in zip(layers, grads):
        probs = record.probs[layer][0].detach().float()                 # [H,S,S]
        maps.append((probs * grad[0].float()).sum(0).abs() / probs.shape[0])
    record.probs = {k: v.detach() for k, v in record.probs.items()}
    record.values = {k: v.detach() for k, v in record.values.items()}
    return maps, record, logits[0].detach()


class _Disrupt(Probe):
    """Zero a layer's visual→textual or intra-visual entries, one (layer, kind) per batch row."""

    def __init__(self, rows: list[tuple[int, str]], masks: dict[str, torch.Tensor]):
        self.rows, self.masks = rows, masks

    def edit_probs(self, layer, probs, value):
        hit = [r for r, (lay, _) in enumerate(self.rows) if lay == layer]
        if not hit:
            return probs
        keep = torch.ones(probs.shape[0], 1, *probs.shape[2:], dtype=probs.dtype, device=probs.device)
        for r in hit:
            keep[r, 0] = (~self.masks[self.rows[r][1]]).to(probs.dtype)
        return probs * keep


def disruption_masks(inputs: RequestInputs) -> dict[str, torch.Tensor]:
    """[S, S] bool entries each disruption zeroes: ``vt`` (instruction rows, image keys), ``vv``
    (image rows, image keys)."""
    image = inputs.types == TOKEN_IMAGE
    instruction = inputs.types == TOKEN_INSTRUCTION
    return {"vt": instruction[:, None] & image[None, :], "vv": image[:, None] & image[None, :]}


def consistency(clean: torch.Tensor, disrupted: torch.Tensor) -> tuple[float, float, float]:
    """(label consistency 0/1, score consistency = Jaccard of the top-5 ids, KL(p || p_disrupted) in nats)."""
    same = float(clean.argmax() == disrupted.argmax())
    a, b = set(clean.topk(TOP_K).indices.tolist()), set(disrupted.topk(TOP_K).indices.tolist())
    log_p, log_q = clean.log_softmax(-1), disrupted.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum().clamp_min(0.0))
    return same, len(a & b) / len(a | b), kl


def disruption(model: Any, inputs: RequestInputs, clean: torch.Tensor, chunk: int = 8) -> dict[str, dict[str, list[float]]]:
    """Both disruptions in every layer: ``{kind: {"label": [L], "score": [L], "kl": [L]}}``.

    The 2L disrupted forwards run as batches of ``chunk`` copies of the prompt (rows are independent).
    """
    num_layers = len(_language_model(model).layers)
    rows = [(layer, kind) for layer in range(num_layers) for kind in ("vt", "vv")]
    masks = disruption_masks(inputs)
    result = {kind: {"label": [0.0] * num_layers, "score": [0.0] * num_layers, "kl": [0.0] * num_layers}
              for kind in ("vt", "vv")}
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        n = len(part)
        with torch.no_grad(), probing(model, _Disrupt(part, masks)):
            logits = last_logits(model, inputs.embeds.expand(n, -1, -1), inputs.position_ids.expand(n, -1))
        for row, (layer, kind) in enumerate(part):
            label, score, kl = consistency(clean, logits[row])
            result[kind]["label"][layer], result[kind]["score"][layer], result[kind]["kl"][layer] = label, score, kl
    return result


def reference_layers(num_layers: int) -> tuple[int, int]:
    """(end of the shallow stage, first middle candidate) of VisiPruner's reference for L layers:
    6 and 7 for 32 layers (its code), scaled by L/32 (rounded) for other depths (our choice)."""
    if num_layers == REFERENCE_LAYERS:
        return REFERENCE_SHALLOW_END, REFERENCE_FIRST_CANDIDATE
    scale = num_layers / REFERENCE_LAYERS
    return max(1, round(REFERENCE_SHALLOW_END * scale)), max(2, round(REFERENCE_FIRST_CANDIDATE * scale))


class ReferenceTriggers(Probe):
    """VisiPruner's reference semantics for one prompt (METHODS.md "The reference's semantics").

    - Shallow stage, layers [0, shallow_end): instruction→image probabilities zeroed (no
      renormalisation); layer 0 also image→image, each instruction row's removed mass moved onto
      the first image column.
    - Middle: m = the first layer >= first_candidate where some image token has
      ``rho_m(v) < 0.995``; the critical set ``{v : s_m(v) > tau}``; from layer m + 1 on the other
      image tokens are gone (masked as keys, which for every remaining token equals removing them:
      positions are not renumbered).
    - Deep: d = the second layer after m where every critical token has ``rho_l(v) >= 0.999``; from
      d + 1 on no image token is left. With an empty critical set that is already m + 1.

    Attributes set by a forward: ``middle_layer`` (m + 1, the first layer on the shortened
    sequence, comparable to K_M) or None, ``deep_layer`` (d + 1, comparable to K_E) or None,
    ``critical`` (kept image positions).
    """

    def __init__(self, types: torch.Tensor, num_layers: int, tau: float):
        self.types, self.tau = types, tau
        self.image = torch.nonzero(types == TOKEN_IMAGE)[:, 0]
        self.instruction = types == TOKEN_INSTRUCTION
        self.shallow_end, self.first_candidate = reference_layers(num_layers)
        self.masked_keys: torch.Tensor | None = None
        self.middle: int | None = None
        self.deep: int | None = None
        self.passes = 0
        self.critical: list[int] = []

    @property
    def middle_layer(self) -> int | None:
        return None if self.middle is None else self.middle + 1

    @property
    def deep_layer(self) -> int | None:
        return None if self.deep is None else self.deep + 1

    def edit_scores(self, layer, scores):
        if self.masked_keys is None:
            return scores
        return scores.masked_fill(self.masked_keys, torch.finfo(torch.float32).min)

    def edit_probs(self, layer, probs, value):
        image_mask = self.types == TOKEN_IMAGE
        if layer < self.shallow_end:
            rows = self.instruction[:, None] & image_mask[None, :]
            if layer == 0:
                removed = (probs * rows).sum(-1)                                  # [B,H,S]
                probs = probs.masked_fill(rows | (image_mask[:, None] & image_mask[None, :]), 0.0)
                first = int(self.image[0])
                probs[..., first] = probs[..., first] + removed * self.instruction
                return probs
            return probs.masked_fill(rows, 0.0)
        if layer < self.first_candidate or self.deep is not None:
            return probs
        if self.middle is None:
            s, rho = value_contributions(probs[0], value[0], self.image)
            if bool((rho < MIDDLE_COSINE).any()):
                self.middle = layer
                self.critical = self.image[s > self.tau].tolist()
                dropped = image_mask.clone()
                dropped[self.critical] = False
                self.masked_keys = dropped
                if not self.critical:
                    self.deep = layer
            return probs
        critical = torch.tensor(self.critical, device=probs.device)
        _, rho = value_contributions(probs[0], value[0], critical)
        if bool((rho >= DEEP_COSINE).all()):
            self.passes += 1
            if self.passes == DEEP_PASSES:
                self.deep = layer
                self.masked_keys = image_mask
        return probs


def reference_triggers(model: Any, inputs: RequestInputs, tau: float) -> dict[str, Any]:
    """Run VisiPruner's reference semantics on one prompt; see :class:`ReferenceTriggers`."""
    num_layers = len(_language_model(model).layers)
    probe = ReferenceTriggers(inputs.types, num_layers, tau)
    with torch.no_grad(), probing(model, probe):
        last_logits(model, inputs.embeds, inputs.position_ids)
    return {"middle_layer": probe.middle_layer, "deep_layer": probe.deep_layer,
            "critical_tokens": len(probe.critical) if probe.middle is not None else None,
            "shallow_end": probe.shallow_end, "first_candidate": probe.first_candidate}


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else float("nan")


def analyze_request(model: Any, inputs: RequestInputs, *, tau: float, chunk: int = 8) -> RequestAnalysis:
    """All per-request diagnostics (see the module docstring)."""
    result, clean = saliency_metrics(model, inputs, tau=tau)
    result.disruption = disruption(model, inputs, clean, chunk=chunk)
    result.reference = reference_triggers(model, inputs, tau)
    return result


def saliency_metrics(model: Any, inputs: RequestInputs, *, tau: float) -> tuple[RequestAnalysis, torch.Tensor]:
    """The measurements of one clean forward and backward: attention mass, Eq. 1 flows and
    contributions, VisiPruner value scores (disruption and reference triggers left empty).

    Returns:
        (the partial analysis, the clean next-token logits [V] float32).
    """
    spans = inputs.spans
    if inputs.target < 0:
        with torch.no_grad():
            inputs.target = int(last_logits(model, inputs.embeds, inputs.position_ids)[0].argmax())
    maps, record, clean = saliency_maps(model, inputs)
    result = RequestAnalysis(prompt_tokens=int(inputs.types.numel()), image_tokens=len(spans["image"]),
                             target=inputs.target, target_source=inputs.target_source)
    image, instruction = spans["image"], spans["instruction"]
    n_image = len(image)
    causal_pairs = n_image * (n_image + 1) // 2
    for layer, saliency in enumerate(maps):
        mean = record.probs[layer][0].float().mean(0)                    # Ā [S,S]
        rows = {"image": image, "instruction": instruction, "last": torch.tensor([mean.shape[0] - 1])}
        result.attention_mass.append({
            row: {key: _mean(mean[index][:, spans[key]].sum(-1)) for key in MASS_KEYS}
            for row, index in rows.items()})
        result.s_vv.append(float(saliency[image][:, image].sum()) / causal_pairs)
        result.s_vt.append(_mean(saliency[instruction][:, image]))
        result.contribution.append({key: _mean(saliency[-1, spans[key]]) for key in MASS_KEYS})
        s, _ = value_contributions(record.probs[layer][0], record.values[layer][0], image)
        result.value_scores_above.append(int((s > tau).sum()))
        result.value_score_max.append(float(s.max()))
    return result, clean
