"""FLOPs of a plan: the paper's image-token count (HiMAP Sec. 4.2, Eq. 10) and an honest
whole-prompt count.

Eq. 10 counts image tokens only, per layer ``Ω(n) = 4·n·d² + 2·n²·d + 2·n·d·m`` (d hidden size,
m FFN size), summed over the segments of the plan. It reproduces the paper's Table 1 (2.98 /
1.56 / 0.73 TFLOPs for LLaVA-1.5-7B), whose figures are Eq. 10 **truncated** to two decimals
(7B baseline 2.986 -> "2.98", FastV 1.566 -> "1.56"); :func:`format_tflops` does the same.

The whole-prompt count is what a prefill actually computes, at 2 FLOPs per multiply-accumulate:
every prompt token (system, image, instruction), Llama's three FFN matrices, grouped-query K/V
projections, the full masked attention square the graphs compute, the scoring graphs, the vision
tower up to its feature layer, the projector, and lm_head on the last position. It is the number
to compare with measured time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from himap_trt.errors import HimapError
from himap_trt.dims import ModelDims
from himap_trt.plan import PruningPlan


def omega(n: int, d: int, m: int) -> int:
    """Eq. 10's per-layer cost of ``n`` image tokens (FLOPs as the paper counts them)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def image_token_flops(plan: PruningPlan, d: int, m: int, kept: float | None = None) -> float:
    """Eq. 10 for a plan: ``Σ_segments layers · Ω(image tokens of the segment)``.

    With no stages this is the baseline ``L · Ω(|V|)``. For VisiPruner (HiMAP Eq. 10 applied to its
    segments: ``K_M·Ω(|V|) + (K_E-K_M)·Ω(n) + (L-K_E)·Ω(0)``), ``kept`` is n, the image tokens a
    request keeps at K_M (a measured mean may be fractional); None counts the C slots the static
    form computes (kept tokens plus masked padding slots).
    """
    counts = list(plan.image_tokens_per_segment)
    if kept is not None:
        counts = [kept if j > 0 and plan.stages[j - 1].criterion == "value_norm" else n for j, n in enumerate(counts)]
    return sum((end - start) * omega(n, d, m) for (start, end), n in zip(plan.segments, counts))


def format_tflops(flops: float) -> str:
    """TFLOPs truncated to two decimals, as the paper's Table 1 prints them."""
    return f"{math.floor(flops / 1e10) / 100:.2f}"


def _decoder_layer(n: int, dims: ModelDims) -> int:
    """Real FLOPs (2 per MAC) of one decoder layer over ``n`` tokens at prefill."""
    d, m, h, kv, hd = dims.hidden_size, dims.intermediate_size, dims.num_heads, dims.num_kv_heads, dims.head_dim
    projections = 2 * n * d * hd * (2 * h + 2 * kv)   # q, o: H heads; k, v: Hkv heads
    attention = 2 * 2 * n * n * h * hd                  # Q K^T and A V over the full masked square
    ffn = 2 * 3 * n * d * m                             # gate, up, down
    return projections + attention + ffn


def _vision(dims: ModelDims, blocks: int = 1) -> int:
    """Real FLOPs of the vision tower up to the feature layer, and of the projector.

    ``blocks``: equal groups the vision tokens attend within (1: one image, all tokens together; a
    Qwen video's temporal patches, whose attention is per temporal patch: transformers' ``cu_seqlens``,
    the project's per-frame vision graphs). Qwen2.5-VL's windowed layers attend within smaller windows;
    they are counted per temporal patch too, so for them this is an upper bound.
    """
    n, dv, mv = dims.vision_tokens, dims.vision_hidden_size, dims.vision_intermediate_size
    patches = n - 1
    patch_embed = 2 * patches * 3 * dims.patch_size ** 2 * dv
    layer = 2 * 4 * n * dv * dv + 2 * 2 * (n * n // max(1, blocks)) * dv + 2 * 2 * n * dv * mv
    projector = 2 * dims.num_image_tokens * (dv * dims.hidden_size + dims.hidden_size * dims.hidden_size)
    return patch_embed + dims.vision_layers_used * layer + projector


@dataclass(frozen=True)
class PromptFlops:
    """Whole-prompt prefill FLOPs (2 per multiply-accumulate) of one prompt, by part."""

    prompt_tokens: int
    vision: int
    decoder: int
    scoring: int
    lm_head: int

    @property
    def total(self) -> int:
        """All parts together (FLOPs)."""
        return self.vision + self.decoder + self.scoring + self.lm_head


def prompt_flops(plan: PruningPlan, dims: ModelDims, prompt_tokens: int, *,
                 vision_blocks: int = 1) -> PromptFlops:
    """Prefill FLOPs of one prompt of ``prompt_tokens`` tokens (image tokens included) under ``plan``;
    ``vision_blocks``: the groups the vision tower attends within (a video's temporal patches; see
    :func:`_vision`).

    Raises:
        HimapError: if the prompt cannot hold the image tokens and at least one text token.
    """
    if prompt_tokens <= dims.num_image_tokens:
        raise HimapError(
            f"--prompt-len {prompt_tokens} must exceed the {dims.num_image_tokens} image tokens of the model"
        )
    text = prompt_tokens - dims.num_image_tokens
    decoder = scoring = 0
    for j, ((start, end), n_img) in enumerate(zip(plan.segments, plan.image_tokens_per_segment)):
        decoder += (end - start) * _decoder_layer(text + n_img, dims)
        if j < len(plan.stages):
            criterion = plan.stages[j].criterion
            rows = {"last_row": 1, "value_norm": 2, "drop_all": 0, "random": 0}.get(criterion, text + n_img)
            scoring += 2 * rows * (text + n_img) * dims.num_heads * dims.head_dim
    return PromptFlops(
        prompt_tokens=prompt_tokens,
        vision=_vision(dims, vision_blocks),
        decoder=decoder,
        scoring=scoring,
        lm_head=2 * dims.hidden_size * dims.vocab_size,
    )


@dataclass(frozen=True)
class FlopsReport:
    """Everything ``himap-trt flops`` prints (FLOPs, not TFLOPs)."""

    model: str
    plan: str
    image_tokens_baseline: float
    image_tokens_plan: float
    image_tokens_ratio: float
    prompt_baseline: PromptFlops
    prompt_plan: PromptFlops
    prompt_ratio: float

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("prompt_baseline", "prompt_plan"):
            data[key]["total"] = getattr(self, key).total
        return data


def flops_report(model: str, plan: PruningPlan, dims: ModelDims, prompt_tokens: int,
                 kept: float | None = None) -> FlopsReport:
    """Eq. 10 and whole-prompt FLOPs of ``plan`` against no pruning on the same model.

    ``kept``: VisiPruner's image tokens kept at K_M for Eq. 10 (see :func:`image_token_flops`); the
    whole-prompt count always uses the C slots the graphs compute.
    """
    baseline_plan = PruningPlan("none", plan.num_layers, plan.num_image_tokens, ())
    d, m = dims.hidden_size, dims.intermediate_size
    base, pruned = image_token_flops(baseline_plan, d, m), image_token_flops(plan, d, m, kept)
    prompt_base = prompt_flops(baseline_plan, dims, prompt_tokens)
    prompt_plan = prompt_flops(plan, dims, prompt_tokens)
    return FlopsReport(
        model=model, plan=plan.describe(),
        image_tokens_baseline=base, image_tokens_plan=pruned, image_tokens_ratio=pruned / base,
        prompt_baseline=prompt_base, prompt_plan=prompt_plan, prompt_ratio=prompt_plan.total / prompt_base.total,
    )


def plan_for_request(plan: PruningPlan, image_tokens: int) -> PruningPlan:
    """``plan`` as one request with its own |V| (``image_tokens``) runs it: |V| replaced and every
    stage's keep count the request's own (:meth:`PruningPlan.image_tokens_for`; VisiPruner's middle
    stage: its ``min(C, |V|)`` slots). Not re-validated (a count may be below a ratio stage's 1)."""
    from dataclasses import replace

    counts = plan.image_tokens_for(image_tokens)
    return replace(plan, num_image_tokens=image_tokens,
                   stages=tuple(replace(s, keep=k) for s, k in zip(plan.stages, counts[1:])))


def request_flops(plan: PruningPlan, dims: ModelDims, image_tokens: int, prompt_tokens: int, *,
                  vision_blocks: int = 1) -> tuple[float, PromptFlops]:
    """Eq. 10 and whole-prompt prefill FLOPs of one request with its own |V| (``image_tokens``, e.g. a
    video's visual tokens) under a plan with per-request keep counts (METHODS.md's rounding,
    :meth:`PruningPlan.image_tokens_for`).

    Args:
        plan: any plan; VisiPruner's middle stage counts its ``min(C, |V|)`` slots (what the graphs
            compute, masked slots included).
        dims: the model's dimensions (its |V| bound is replaced by ``image_tokens``).
        image_tokens: |V| of the request (tokens); prompt_tokens: its real prompt length (tokens).
        vision_blocks: groups the vision tower attends within (a video: its temporal patches).

    Returns:
        (Eq. 10 FLOPs, :class:`PromptFlops`).

    Raises:
        HimapError: a prompt no longer than its image tokens.
    """
    from dataclasses import replace

    own = plan_for_request(plan, image_tokens)
    merge = max(1, dims.spatial_merge_size)
    own_dims = replace(dims, num_image_tokens=image_tokens, vision_tokens=image_tokens * merge * merge)
    eq10 = image_token_flops(own, dims.hidden_size, dims.intermediate_size)
    return eq10, prompt_flops(own, own_dims, prompt_tokens, vision_blocks=vision_blocks)
