"""Averages over requests, the recommended plans, ``analysis.json`` and the plots.

Recommendation rules (heuristics stated with their evidence; the papers tune by accuracy sweeps):

- HiMAP K1: the first layer by which half of the visual→instruction saliency flow (Σ_l S_vt,l)
  has happened, i.e. the smallest K >= 1 with ``Σ_{l<K} S_vt,l >= 0.5 Σ_l S_vt,l`` (Sec. 3.1: the
  injection happens in the shallow layers; the img→txt stage prunes after it).
- HiMAP K2: the first layer after K1 where intra-visual flow dominates, ``D_l > 0`` (Eq. 7,
  Sec. 3.3); if no layer has D_l > 0, the first where ``S_vv,l > S_vt,l``; else 8·L/32.
- HiMAP ratios stay the paper's R1 = 0.5, R2 = 0.75 (not derived from these diagnostics).
- VisiPruner K_M, K_E: the 90th percentile (nearest rank) of the reference's per-request middle
  layer m + 1 and deep layer (METHODS.md: the static form prunes every request at fixed layers, so
  take layers by which most requests have fused); K_E > K_M is enforced; no trigger: L/2, 3L/4.

Eq. 10 figures are means over requests, each with its own |V| (Qwen2.5-VL / Qwen3-VL: the
request's image or video tokens, with the plan's per-request counts; LLaVA: always |V|), against
the mean unpruned count.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from himap_trt.analysis.analyze.measure import MASS_KEYS, MASS_ROWS, RequestAnalysis
from himap_trt.flops import image_token_flops, omega, plan_for_request
from himap_trt.plan import DEFAULT_R1, DEFAULT_R2, build_plan

QUANTILE = 0.9


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _quantile(values: list[int], q: float) -> int:
    """Nearest-rank quantile of integers (``q`` in (0, 1])."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def aggregate(requests: list[RequestAnalysis], num_layers: int) -> dict[str, Any]:
    """Per-layer means over requests of every diagnostic, and D_l (Eq. 7).

    ``E_vt,l`` and ``E_vv,l`` (the paper's "prediction bias", not defined further there) are the mean
    KL divergence (nats) of the next-token distribution after each disruption; ``D_l = log(E_vv,l /
    E_vt,l)``, None where either is 0.
    """
    layers = range(num_layers)
    mass = [{row: {key: _mean([r.attention_mass[l][row][key] for r in requests]) for key in MASS_KEYS}
             for row in MASS_ROWS} for l in layers]
    disruption = {kind: {metric: [_mean([r.disruption[kind][metric][l] for r in requests]) for l in layers]
                         for metric in ("label", "score", "kl")} for kind in ("vt", "vv")}
    bias = []
    for l in layers:
        e_vv, e_vt = disruption["vv"]["kl"][l], disruption["vt"]["kl"][l]
        bias.append(math.log(e_vv / e_vt) if e_vv and e_vt else None)
    return {
        "attention_mass": mass,
        "image_to_instruction": [m["instruction"]["image"] for m in mass],
        "image_to_image": [m["image"]["image"] for m in mass],
        "to_system": [_mean([m["instruction"]["system"], m["image"]["system"]]) for m in mass],
        "s_vv": [_mean([r.s_vv[l] for r in requests]) for l in layers],
        "s_vt": [_mean([r.s_vt[l] for r in requests]) for l in layers],
        "contribution": [{key: _mean([r.contribution[l][key] for r in requests]) for key in MASS_KEYS} for l in layers],
        "disruption": disruption,
        "bias_ratio": bias,
        "value_scores_above_mean": [_mean([r.value_scores_above[l] for r in requests]) for l in layers],
    }


def recommend(requests: list[RequestAnalysis], means: dict[str, Any], dims: Any, *, tau: float,
              max_keep: int) -> dict[str, Any]:
    """The recommended HiMAP and VisiPruner plans with rule, evidence and Eq. 10 FLOPs."""
    L, V, d, m = dims.num_layers, dims.num_image_tokens, dims.hidden_size, dims.intermediate_size
    own = [r.image_tokens for r in requests]               # each request's |V| (LLaVA: V)
    baseline = _mean([L * omega(n, d, m) for n in own])

    # HiMAP K1: half of the visual->instruction saliency flow has happened before K1.
    s_vt = [v or 0.0 for v in means["s_vt"]]
    total = sum(s_vt)
    k1, share = 1, 0.0
    for k in range(1, L - 1):
        share = sum(s_vt[:k]) / total if total else 0.0
        k1 = k
        if share >= 0.5:
            break
    # HiMAP K2: first layer after K1 where intra-visual flow dominates.
    bias, s_vv = means["bias_ratio"], [v or 0.0 for v in means["s_vv"]]
    after = range(k1 + 1, L)
    k2 = next((l for l in after if bias[l] is not None and bias[l] > 0), None)
    if k2 is not None:
        k2_rule = f"first layer after K1 with D_l > 0 (D_{k2} = {bias[k2]:+.2f})"
    else:
        k2 = next((l for l in after if s_vv[l] > s_vt[l]), None)
        if k2 is not None:
            k2_rule = f"no layer after K1 has D_l > 0; first with S_vv > S_vt (S_vv {s_vv[k2]:.2e} > S_vt {s_vt[k2]:.2e})"
        else:
            k2 = min(L - 1, max(k1 + 1, round(8 * L / 32)))
            k2_rule = "no layer after K1 has D_l > 0 or S_vv > S_vt; the paper's K2 = 8 scaled to L layers"
    himap = build_plan("himap", num_layers=L, num_image_tokens=V, k1=k1, r1=DEFAULT_R1, k2=k2, r2=DEFAULT_R2)
    himap_flops = _mean([image_token_flops(plan_for_request(himap, n), d, m) for n in own])

    # VisiPruner K_M, K_E: high quantiles of the reference's per-request trigger layers.
    middles = [r.reference["middle_layer"] for r in requests if r.reference["middle_layer"] is not None]
    deeps = [r.reference["deep_layer"] for r in requests if r.reference["deep_layer"] is not None]
    if middles:
        k_m = min(L - 2, max(1, _quantile(middles, QUANTILE)))
        k_m_rule = (f"{QUANTILE:.0%} quantile of the reference's middle layer m+1 over {len(middles)}/{len(requests)} "
                    f"triggered requests (range {min(middles)}-{max(middles)})")
    else:
        k_m, k_m_rule = L // 2, "the reference's middle test fired on no request; default L/2"
    if deeps:
        k_e = min(L - 1, max(k_m + 1, _quantile(deeps, QUANTILE)))
        k_e_rule = (f"{QUANTILE:.0%} quantile of the reference's deep layer over {len(deeps)}/{len(requests)} requests "
                    f"(range {min(deeps)}-{max(deeps)}), at least K_M+1, at most L-1")
    else:
        k_e, k_e_rule = max(k_m + 1, 3 * L // 4), "the reference's deep test fired on no request; default 3L/4"
    kept = [min(r.value_scores_above[k_m - 1], max_keep) for r in requests]
    visi = build_plan("visipruner", num_layers=L, num_image_tokens=V, mid_layer=k_m, deep_layer=k_e,
                      threshold=tau, max_keep=max_keep)
    visi_flops = _mean([image_token_flops(plan_for_request(visi, n), d, m, kept=k) for n, k in zip(own, kept)])
    padded_flops = _mean([image_token_flops(plan_for_request(visi, n), d, m) for n in own])
    return {
        "himap": {
            "k1": k1, "r1": DEFAULT_R1, "k2": k2, "r2": DEFAULT_R2, "plan": himap.describe(),
            "k1_rule": f"smallest K with >= 50% of the visual->instruction flow S_vt in layers < K "
                       f"({share:.0%} in layers 0-{k1 - 1})",
            "k2_rule": k2_rule, "ratios_rule": "the paper's defaults (not derived from these diagnostics)",
            "eq10_flops": himap_flops, "eq10_ratio": himap_flops / baseline,
        },
        "visipruner": {
            "mid_layer": k_m, "deep_layer": k_e, "threshold": tau, "max_keep": max_keep, "plan": visi.describe(),
            "mid_rule": k_m_rule, "deep_rule": k_e_rule,
            "kept_mean": _mean(kept), "kept_rule": f"per request: image tokens with s_{k_m - 1}(v) > {tau}, at most {max_keep}",
            "eq10_flops": visi_flops, "eq10_ratio": visi_flops / baseline,
            "eq10_flops_padded": padded_flops, "eq10_ratio_padded": padded_flops / baseline,
        },
        "baseline_eq10_flops": baseline,
    }


def analysis_document(model: str, dims: Any, requests: list[RequestAnalysis], means: dict[str, Any],
                      plans: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """What ``analysis.json`` holds (all numbers per layer l = 0..L-1 unless named otherwise)."""
    triggers = {
        "middle_layer": [r.reference["middle_layer"] for r in requests],
        "deep_layer": [r.reference["deep_layer"] for r in requests],
        "critical_tokens": [r.reference["critical_tokens"] for r in requests],
    }
    return {
        "model": model, "num_layers": dims.num_layers, "num_image_tokens": dims.num_image_tokens,
        "requests": len(requests), "settings": settings,
        "definitions": {
            "attention_mass": "head-mean attention probabilities summed over the key span, averaged over rows",
            "image_to_instruction": "attention mass instruction rows pay to image keys",
            "image_to_image": "attention mass image rows pay to image keys",
            "to_system": "mean of the mass instruction rows and image rows pay to system keys",
            "saliency": "I_l = |sum_h A_h * dL/dA_h| / H, L = cross-entropy of the answer token (Eq. 1)",
            "s_vv": "mean I_l(i, j) over image rows i and image keys j <= i (Eq. 5)",
            "s_vt": "mean I_l(i, j) over instruction rows i and image keys j (Eq. 6)",
            "contribution": "mean I_l(last, j) over j in the system / image / instruction span (Sec. 2.2)",
            "disruption": "vt: A_l(i,j)=0 for i instruction, j image; vv: i, j image; layer l only, no "
                          "renormalisation; label = top-1 unchanged, score = Jaccard of top-5 ids, kl = "
                          "KL(p || p_disrupted) of the next token (nats)",
            "bias_ratio": "D_l = log(E_vv,l / E_vt,l), E = mean kl of each disruption (Eq. 7)",
            "triggers": "VisiPruner reference, per request: middle_layer = m+1, deep_layer = d+1",
        },
        "per_layer": means,
        "triggers": triggers,
        "recommended": plans,
        "per_request": [asdict(r) for r in requests],
    }


def write_plots(document: dict[str, Any], out: Path) -> list[Path]:
    """flows.png, disruption.png, triggers.png, attention_mass.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means, L = document["per_layer"], document["num_layers"]
    layers = list(range(L))
    title = f"{document['model']}, {document['requests']} request(s)"
    paths = []

    def nan(values):
        return [float("nan") if v is None else v for v in values]

    def positive(values):
        return [v if v is not None and v > 0 else float("nan") for v in values]

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    a.plot(layers, positive(means["s_vt"]), "o-", label="S_vt: image -> instruction (Eq. 6)")
    a.plot(layers, positive(means["s_vv"]), "s-", label="S_vv: image -> image (Eq. 5)")
    a.set(yscale="log", xlabel="layer", ylabel="mean saliency", title="Saliency flows per layer")
    a.legend()
    for key, marker in zip(MASS_KEYS, "o^s"):
        b.plot(layers, positive([c[key] for c in means["contribution"]]), marker + "-", label=key)
    b.set(yscale="log", xlabel="layer", ylabel="mean saliency I_l(last, j)",
          title="Contribution to the prediction, by modality")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(out / "flows.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    d = means["disruption"]
    a.plot(layers, nan(d["vt"]["label"]), "o-", label="label, vt blocked")
    a.plot(layers, nan(d["vv"]["label"]), "s-", label="label, vv blocked")
    a.plot(layers, nan(d["vt"]["score"]), "o--", label="top-5 Jaccard, vt blocked")
    a.plot(layers, nan(d["vv"]["score"]), "s--", label="top-5 Jaccard, vv blocked")
    a.set(ylim=(-0.05, 1.05), xlabel="layer (disrupted)", ylabel="consistency",
          title="Consistency after blocking a flow in one layer")
    a.legend(fontsize=8)
    bias = nan(means["bias_ratio"])
    b.bar(layers, [0 if math.isnan(v) else v for v in bias],
          color=["tab:red" if not math.isnan(v) and v > 0 else "tab:blue" for v in bias])
    b.axhline(0, color="black", linewidth=0.8)
    b.set(xlabel="layer", ylabel="D_l = log(E_vv / E_vt)",
          title="Bias ratio D_l (Eq. 7): > 0 intra-visual flow dominates")
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(out / "disruption.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    rec = document["recommended"]["visipruner"]
    for ax, key, chosen, label in ((axes[0], "middle_layer", rec["mid_layer"], "K_M"),
                                   (axes[1], "deep_layer", rec["deep_layer"], "K_E")):
        values = [v for v in document["triggers"][key] if v is not None]
        missing = len(document["triggers"][key]) - len(values)
        ax.hist(values, bins=[x - 0.5 for x in range(L + 2)], rwidth=0.85)
        ax.axvline(chosen, color="tab:red", linestyle="--", label=f"recommended {label} = {chosen}")
        if not values:
            ax.set_ylim(0, 1)
            ax.text(0.5, 0.5, "the test fired on no request", transform=ax.transAxes, ha="center")
        what = "middle layer m+1" if key == "middle_layer" else "deep layer d+1"
        ax.set(xlim=(-0.5, L + 0.5), xlabel="layer", ylabel="requests",
               title=f"VisiPruner reference {what}" + (f" ({missing} never)" if missing else ""))
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(out / "triggers.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(layers, nan(means["image_to_instruction"]), "o-", label="image -> instruction (instruction rows)")
    ax.plot(layers, nan(means["image_to_image"]), "s-", label="image -> image (image rows)")
    ax.plot(layers, nan(means["to_system"]), "^-", label="to system tokens")
    ax.set(ylim=(-0.02, 1.02), xlabel="layer", ylabel="head-mean attention mass",
           title="Attention mass per layer")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(out / "attention_mass.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
