"""The pruning plan: which image tokens survive where in the decoder.

A plan is an ordered list of stages ``(layer K, criterion, keep)`` (METHODS.md, "A pruning
stage"). Stage j's scores come from the head-mean attention of layer ``K_j - 1``; layers
``K_j .. K_{j+1}-1`` then run on the shortened sequence. The stages split the decoder into
``len(stages) + 1`` *segments*, each exported as one graph with its own KV cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from himap_trt.errors import HimapError

Criterion = Literal["img2txt", "img2img", "last_row", "value_norm", "drop_all", "random"]
Method = Literal["himap", "fastv", "visipruner", "random", "none"]

METHODS: tuple[str, ...] = ("himap", "fastv", "visipruner", "random", "none")
CRITERIA: tuple[str, ...] = ("img2txt", "img2img", "last_row", "value_norm", "drop_all", "random")

#: CLI defaults (HiMAP paper Sec. 5.1, short-answer QA; FastV K=2 R=50% for 7B).
DEFAULT_K1, DEFAULT_R1, DEFAULT_K2, DEFAULT_R2 = 2, 0.5, 8, 0.75
DEFAULT_K, DEFAULT_R = 2, 0.5
#: VisiPruner's static form (METHODS.md): K_M = L/2 and K_E = 3L/4 (rounded down) when not given.
DEFAULT_THRESHOLD, DEFAULT_MAX_KEEP = 0.2, 64


@dataclass(frozen=True)
class Stage:
    """One pruning stage.

    Attributes:
        layer: K, the first decoder layer that runs on the shortened sequence (1 <= K <= L-1).
            Scores come from the attention of layer K-1.
        criterion: ``img2txt`` (HiMAP Eq. 8: attention all instruction tokens pay to each image
            token), ``img2img`` (HiMAP Eq. 9: attention the surviving image tokens pay to each
            other), ``last_row`` (FastV: attention the last prompt token pays), ``value_norm``
            (VisiPruner's middle stage: ``s(v) = ||concat_h A_h[last, v] V_h[v]||`` of layer K-1,
            tokens with ``s > threshold``, at most ``keep``), ``drop_all`` (VisiPruner's deep
            stage: every image token entering is dropped, no scores), ``random`` (the control: a
            seeded random permutation of the entering image tokens, the same for every prompt; see
            :func:`himap_trt.graphs.modules.random_score_table`).
        keep: image tokens kept after this stage (tokens). For ``value_norm`` it is the cap C: the
            stage always outputs C image *slots* (models with per-request counts: the batch's largest
            ``min(C, |V|_b)``), of which each request uses its own count ``n <= C`` (0 allowed); the
            others are masked (attention mask 0).
        ratio: the pruning ratio R this stage was built from (fraction of the image tokens entering
            the stage that is dropped), kept for display.
        threshold: ``value_norm`` only: tau, the score a token must exceed.
        seed: the permutation's seed (``random`` stages only; None otherwise).
    """

    layer: int
    criterion: Criterion
    keep: int
    ratio: float
    threshold: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class PruningPlan:
    """A method as an ordered list of stages, for a decoder of ``num_layers`` layers.

    Attributes:
        method: ``himap``, ``fastv``, ``random`` (HiMAP's layers and keep counts, random tokens) or ``none``.
        num_layers: L, decoder layers of the model (tokens of the plan are tied to it).
        num_image_tokens: |V|, image tokens per prompt before pruning (576 for LLaVA-1.5).
        stages: the stages in layer order (empty for ``none``).
        evs_rate: EVS before the LLM (``--prune-before evs --evs-rate q``, METHODS.md "Video, and
            pruning before the LLM"): the fraction q in [0, 1) of a video's visual tokens dropped
            before the first decoder layer; 0: no EVS. The stages' keep counts then apply to the tokens
            EVS kept.
    """

    method: Method
    num_layers: int
    num_image_tokens: int
    stages: tuple[Stage, ...] = ()
    evs_rate: float = 0.0

    @property
    def segments(self) -> list[tuple[int, int]]:
        """Decoder layer ranges ``[start, end)`` of the segments, in order (len(stages) + 1)."""
        bounds = [0, *(s.layer for s in self.stages), self.num_layers]
        return list(zip(bounds[:-1], bounds[1:]))

    @property
    def image_tokens_per_segment(self) -> list[int]:
        """Image tokens each segment sees (tokens): |V|, then each stage's keep count."""
        return [self.num_image_tokens, *(s.keep for s in self.stages)]

    def image_tokens_for(self, image_tokens: int) -> list[int]:
        """Image tokens each segment sees for one request with ``image_tokens`` image tokens (|V| of
        that request): ``[|V|, n1, n2, ...]`` with every ratio stage's keep count computed from the
        tokens entering it (METHODS.md, "Models with a variable number of image tokens":
        ``n1 = round_half_up((1 - R1)·|V|)``, ``n2 = round_half_up((1 - R2)·n1)``), at least 1.
        For ``|V| = num_image_tokens`` this is :attr:`image_tokens_per_segment`.

        VisiPruner: the middle stage's count is its *slots* ``min(C, |V|)``, an upper bound (the
        scoring graph masks the slots whose score is not above tau, so a request uses ``n <= C``);
        the deep stage's is 0.
        """
        counts = [int(image_tokens)]
        for stage in self.stages:
            if stage.criterion == "value_norm":
                counts.append(min(stage.keep, counts[-1]))
            elif stage.criterion == "drop_all":
                counts.append(0)
            else:
                counts.append(max(1, keep_count(stage.ratio, counts[-1])))
        return counts

    def describe(self) -> str:
        """One human-readable line, e.g. ``himap: K1=2 keep 288/576 (img2txt), K2=8 keep 72 (img2img)``."""
        before = f"EVS q={self.evs_rate:g} before the LLM (videos), then " if self.evs_rate else ""
        if not self.stages:
            return (f"{before}{self.method}: no pruning, {self.num_image_tokens} image tokens in all "
                    f"{self.num_layers} layers")
        parts = []
        entering = self.num_image_tokens
        for i, s in enumerate(self.stages, 1):
            name = "K" if len(self.stages) == 1 else f"K{i}"
            if s.criterion == "value_norm":
                parts.append(f"K_M={s.layer} keep s>{s.threshold:g}, <={s.keep}/{entering} ({s.criterion})")
            elif s.criterion == "drop_all":
                parts.append(f"K_E={s.layer} drop all {entering}")
            else:
                how = s.criterion if s.seed is None else f"{s.criterion}, seed {s.seed}"
                parts.append(f"{name}={s.layer} keep {s.keep}/{entering} ({how})")
            entering = s.keep
        return f"{before}{self.method}: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (see :meth:`from_dict`); a stage's ``threshold`` and ``seed`` appear only
        where they are set."""
        data = asdict(self)
        for stage in data["stages"]:
            for optional in ("threshold", "seed"):
                if stage[optional] is None:
                    del stage[optional]
        if not self.evs_rate:          # manifests without EVS are written as before
            del data["evs_rate"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        """Inverse of :meth:`to_dict`.

        Raises:
            HimapError: if ``data`` is not a valid plan (the plan is re-validated).
        """
        try:
            stages = tuple(Stage(**s) for s in data["stages"])
            plan = cls(
                method=data["method"],
                num_layers=int(data["num_layers"]),
                num_image_tokens=int(data["num_image_tokens"]),
                stages=stages,
                evs_rate=float(data.get("evs_rate", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HimapError(f"invalid pruning plan {data!r}: {exc}") from None
        validate_plan(plan)
        return plan


def keep_count(ratio: float, tokens: int) -> int:
    """Image tokens kept when a fraction ``ratio`` of ``tokens`` is dropped.

    ``round((1 - R) * n)`` with halves rounded up (METHODS.md: HiMAP keeps 288 then 72 of 576 with
    R1=0.5, R2=0.75, the absolute counts the reference scripts pass).
    """
    return math.floor((1.0 - ratio) * tokens + 0.5)


def _check_ratio(flag: str, ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise HimapError(f"{flag} must be in [0, 1) (a fraction of image tokens to drop), got {ratio}")


def _check_layer(flag: str, layer: int, num_layers: int) -> None:
    if not 1 <= layer <= num_layers - 1:
        raise HimapError(
            f"{flag} must be between 1 and {num_layers - 1} (the model has {num_layers} decoder layers), got {layer}"
        )


def _stage(flag_k: str, flag_r: str, layer: int, ratio: float, criterion: Criterion, entering: int,
           num_layers: int) -> Stage:
    _check_layer(flag_k, layer, num_layers)
    _check_ratio(flag_r, ratio)
    keep = keep_count(ratio, entering)
    if keep < 1:
        raise HimapError(f"{flag_r} {ratio} keeps {keep} of {entering} image tokens; it must keep at least one")
    if keep > entering:
        raise HimapError(f"{flag_r} {ratio} keeps {keep} image tokens, more than the {entering} there are")
    return Stage(layer=layer, criterion=criterion, keep=keep, ratio=float(ratio))


def build_plan(
    method: str,
    *,
    num_layers: int,
    num_image_tokens: int,
    k1: int = DEFAULT_K1,
    r1: float = DEFAULT_R1,
    k2: int = DEFAULT_K2,
    r2: float = DEFAULT_R2,
    k: int = DEFAULT_K,
    r: float = DEFAULT_R,
    mid_layer: int | None = None,
    deep_layer: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    max_keep: int = DEFAULT_MAX_KEEP,
    seed: int = 0,
) -> PruningPlan:
    """Build and validate a plan from the CLI options.

    Args:
        method: ``himap`` (uses k1, r1, k2, r2), ``fastv`` (uses k, r), ``visipruner`` (uses
            mid_layer, deep_layer, threshold, max_keep; layers default to L/2 and 3L/4), ``random``
            (uses k1, r1, k2, r2 and seed: HiMAP's layers and keep counts, a seeded random subset of
            image tokens) or ``none``.
        num_layers: L, decoder layers of the target model.
        num_image_tokens: |V|, image tokens per prompt of the target model.

    Returns:
        The plan; HiMAP keeps ``n1 = round((1-r1)|V|)`` then ``n2 = round((1-r2) n1)`` (METHODS.md).

    Raises:
        HimapError: naming the flag, for K2 <= K1, K outside [1, L-1], a ratio outside [0, 1),
            or a keep count that rounds to 0.
    """
    if method not in METHODS:
        raise HimapError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if num_image_tokens < 1:
        raise HimapError(f"the model has {num_image_tokens} image tokens per prompt; pruning needs at least one")
    if method == "none":
        return PruningPlan("none", num_layers, num_image_tokens, ())
    if method == "fastv":
        stage = _stage("--k", "--r", k, r, "last_row", num_image_tokens, num_layers)
        return PruningPlan("fastv", num_layers, num_image_tokens, (stage,))
    if method == "visipruner":
        return _visipruner(num_layers, num_image_tokens, mid_layer, deep_layer, threshold, max_keep)
    first = _stage("--k1", "--r1", k1, r1, "img2txt", num_image_tokens, num_layers)
    if k2 <= k1:
        raise HimapError(f"--k2 must be greater than --k1 (got --k1 {k1}, --k2 {k2})")
    second = _stage("--k2", "--r2", k2, r2, "img2img", first.keep, num_layers)
    if method == "random":
        first = Stage(first.layer, "random", first.keep, first.ratio, seed=int(seed))
        second = Stage(second.layer, "random", second.keep, second.ratio, seed=int(seed))
        return PruningPlan("random", num_layers, num_image_tokens, (first, second))
    return PruningPlan("himap", num_layers, num_image_tokens, (first, second))


#: What ``--prune-before`` takes: nothing, or EVS (Efficient Video Sampling) on videos.
PRUNE_BEFORE = ("none", "evs")


def with_evs(plan: PruningPlan, prune_before: str, evs_rate: float) -> PruningPlan:
    """``plan`` with pruning before the LLM (``--prune-before``, ``--evs-rate``; METHODS.md "Video,
    and pruning before the LLM (EVS)").

    Args:
        plan: the method inside the decoder.
        prune_before: ``none`` (``evs_rate`` is then ignored unless not 0) or ``evs``.
        evs_rate: q in [0, 1): the fraction of a video's visual tokens EVS drops.

    Raises:
        HimapError: naming the flag, for an unknown ``--prune-before``, a rate outside [0, 1), or a
            rate without ``--prune-before evs``.
    """
    if prune_before not in PRUNE_BEFORE:
        raise HimapError(f"--prune-before must be one of {', '.join(PRUNE_BEFORE)}, got {prune_before!r}")
    if not (isinstance(evs_rate, (int, float)) and 0.0 <= float(evs_rate) < 1.0):
        raise HimapError(f"--evs-rate must be in [0, 1) (the fraction of a video's visual tokens dropped), got {evs_rate!r}")
    if prune_before == "none":
        if evs_rate:
            raise HimapError("--evs-rate needs --prune-before evs")
        return plan
    return PruningPlan(plan.method, plan.num_layers, plan.num_image_tokens, plan.stages, float(evs_rate))


def _visipruner(num_layers: int, num_image_tokens: int, mid_layer: int | None, deep_layer: int | None,
                threshold: float, max_keep: int) -> PruningPlan:
    """VisiPruner's static form (METHODS.md): a ``value_norm`` stage at K_M keeping at most
    ``max_keep`` tokens with score > ``threshold``, a ``drop_all`` stage at K_E."""
    mid = num_layers // 2 if mid_layer is None else mid_layer
    deep = 3 * num_layers // 4 if deep_layer is None else deep_layer
    _check_layer("--mid-layer", mid, num_layers)
    _check_layer("--deep-layer", deep, num_layers)
    if deep <= mid:
        raise HimapError(f"--deep-layer must be greater than --mid-layer (got --mid-layer {mid}, --deep-layer {deep})")
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise HimapError(f"--threshold must be a finite number >= 0 (a value-contribution norm), got {threshold}")
    if not 1 <= max_keep <= num_image_tokens:
        raise HimapError(f"--max-keep must be between 1 and {num_image_tokens} (the model's image tokens), got {max_keep}")
    middle = Stage(layer=mid, criterion="value_norm", keep=max_keep, ratio=1.0 - max_keep / num_image_tokens,
                   threshold=float(threshold))
    return PruningPlan("visipruner", num_layers, num_image_tokens,
                       (middle, Stage(layer=deep, criterion="drop_all", keep=0, ratio=1.0)))


def validate_plan(plan: PruningPlan) -> None:
    """Check a plan built elsewhere (e.g. read from a manifest).

    Raises:
        HimapError: if the stages are out of order, out of range, or keep counts grow or reach 0.
    """
    if plan.method not in METHODS:
        raise HimapError(f"unknown method {plan.method!r} (expected one of {', '.join(METHODS)})")
    if not 0.0 <= plan.evs_rate < 1.0:
        raise HimapError(f"the plan's evs_rate must be in [0, 1), got {plan.evs_rate!r}")
    entering, previous = plan.num_image_tokens, 0
    for s in plan.stages:
        if s.criterion not in CRITERIA:
            raise HimapError(f"unknown criterion {s.criterion!r} (expected one of {', '.join(CRITERIA)})")
        if (s.criterion == "random") != isinstance(s.seed, int):
            raise HimapError(f"a {s.criterion!r} stage has seed {s.seed!r}; random stages (only) need an integer seed")
        if not previous < s.layer <= plan.num_layers - 1:
            raise HimapError(f"stage layers must increase within [1, {plan.num_layers - 1}], got {s.layer}")
        if s.criterion == "drop_all":
            if s.keep != 0:
                raise HimapError(f"a drop_all stage keeps 0 image tokens, got {s.keep}")
        elif not 1 <= s.keep <= entering:
            raise HimapError(f"a stage keeps {s.keep} image tokens of {entering}; expected 1..{entering}")
        if (s.criterion == "value_norm") != (s.threshold is not None):
            raise HimapError(f"a {s.criterion} stage {'needs' if s.criterion == 'value_norm' else 'takes no'} threshold")
        entering, previous = s.keep, s.layer
