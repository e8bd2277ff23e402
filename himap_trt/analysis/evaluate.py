"""Accuracy of pruning methods on a question set, side by side (``himap-trt eval``).

Every method (an export directory, or a plan run by the PyTorch reference) answers every item,
one item at a time (batch 1, greedy), the methods interleaved item by item (their order rotates)
so that load on the machine falls on all of them alike. Per method it reports:

- **accuracy**: the mean item score, where an item's score is
  - multiple choice (``choices`` given): 1 if the chosen letter is the right one, else 0;
  - one answer: 1 if the normalised prediction equals the normalised answer (exact match);
  - several answers: the VQA score ``min(#answers equal to the prediction / 3, 1)``;
- **agreement**: the fraction of items where the normalised prediction equals that of the
  unpruned (``none``) method, when one is among the methods;
- the image tokens kept by each stage (mean over items), prefill FLOPs (HiMAP Eq. 10 image-token
  count and the whole-prompt count, :mod:`himap_trt.flops`) and their ratio to no pruning, and TTFT.

Normalisation (a subset of the VQA evaluation's): lower case, punctuation dropped, the articles
a / an / the dropped, number words zero-ten written as digits, whitespace collapsed.

Data: ``--data questions.jsonl`` (one ``{"image": path, "question": text, "answers": [..],
"choices": [..]?}`` per line, or ``{"video": path, "fps": n?, "max_frames": n?, ...}`` for a
question about a clip (decoded and sampled as ``himap-trt run --video`` does: :mod:`himap_trt.video`,
default ``--video-fps`` and ``--max-frames``); paths relative to the file; an optional ``template``
or ``category`` string groups the accuracy), or ``--data NAME:N``: N freshly generated held-out
questions of a built-in set (split ``eval``, ``--seed``): ``shapes`` (:mod:`himap_trt.data.shapes`,
images) or ``motion`` (:mod:`himap_trt.data.motion`, clips and still images). Video items are scored
and reported like image items; ``media`` in the JSON says which each prediction was.
"""

from __future__ import annotations

import json
import re
import statistics
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from himap_trt.data import motion as motion_data
from himap_trt.data import shapes as shapes_data
from himap_trt.errors import HimapError
from himap_trt.flops import image_token_flops, prompt_flops, request_flops
from himap_trt.plan import PruningPlan
from himap_trt.prompt import load_image
from himap_trt.runtime.sampling import GenerationConfig
from himap_trt.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, FRAME_LIMIT, Video, frames_video, load_video

#: LLaVA-1.5's multiple-choice prompt (its ScienceQA / MMBench evaluation format).
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase

_NUMBERS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[^\w\s]")


@dataclass(frozen=True)
class EvalItem:
    """One question.

    Attributes:
        question: the question text (without the multiple-choice options).
        answers: the accepted answers (one or several; for multiple choice, the right letter or
            the right choice's text).
        choices: the options of a multiple-choice question, or None.
        image_path: the image file (JSONL items).
        image: the image itself, or a :class:`himap_trt.video.Video` (generated items).
        group: ``template`` / ``category`` of the item, for the per-group accuracy (or None).
        video_path: the video file (JSONL ``video`` items), decoded with ``fps`` (frames per
            second sampled) and ``max_frames``.
    """

    question: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] | None = None
    image_path: Path | None = None
    image: Any = None
    group: str | None = None
    video_path: Path | None = None
    fps: float = DEFAULT_FPS
    max_frames: int = DEFAULT_MAX_FRAMES

    @property
    def media(self) -> str:
        """``video`` or ``image``."""
        return "video" if self.video_path is not None or isinstance(self.image, Video) else "image"

    def load_image(self):
        """The visual input: the PIL image or :class:`himap_trt.video.Video` in memory, else the
        image opened from ``image_path`` or the clip decoded from ``video_path``.

        Raises:
            HimapError: an unreadable image or video (one line naming the file).
        """
        if self.image is not None:
            return self.image
        if self.video_path is not None:
            return load_video(self.video_path, fps=self.fps, max_frames=self.max_frames, name=str(self.video_path))
        return load_image(self.image_path)

    @property
    def prompt_question(self) -> str:
        """The question as asked: with lettered options and LLaVA-1.5's instruction for multiple choice."""
        if not self.choices:
            return self.question
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
        return f"{self.question}\n{options}\n{CHOICE_INSTRUCTION}"


def normalize(text: str) -> str:
    """Normalise an answer for exact match (see the module docstring): ``"The Two."`` -> ``"2"``."""
    words = _PUNCTUATION.sub("", text.lower().replace("-", " ")).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def chosen_letter(prediction: str, num_choices: int, choices: tuple[str, ...] = ()) -> str | None:
    """The option a multiple-choice answer picks: a leading letter (``B``, ``B.``, ``(B)``, ``B) ...``)
    within the options, else the option whose text the answer equals after normalisation; None if neither."""
    match = re.match(r"\s*\(?([A-Za-z])(?:$|[\s.):,])", prediction)
    if match and LETTERS.index(match.group(1).upper()) < num_choices:
        return match.group(1).upper()
    said = normalize(prediction)
    for i, choice in enumerate(choices):
        if said and said == normalize(choice):
            return LETTERS[i]
    return None


def right_letter(answers: tuple[str, ...], choices: tuple[str, ...]) -> str | None:
    """The right option of a multiple-choice item: its answer as a letter, or the option it names."""
    first = answers[0].strip()
    if len(first) == 1 and first.upper() in LETTERS[:len(choices)]:
        return first.upper()
    for i, choice in enumerate(choices):
        if normalize(first) == normalize(choice):
            return LETTERS[i]
    return None


def score(prediction: str, item: EvalItem) -> float:
    """The item's score of a prediction, in [0, 1] (see the module docstring)."""
    if item.choices:
        return float(chosen_letter(prediction, len(item.choices), item.choices)
                     == right_letter(item.answers, item.choices))
    said = normalize(prediction)
    matches = sum(normalize(a) == said for a in item.answers)
    if len(item.answers) == 1:
        return float(matches == 1)
    return min(matches / 3.0, 1.0)


# -- data --------------------------------------------------------------------------------------------
def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def read_jsonl(path: Path) -> list[EvalItem]:
    """Read and check a question file (see the module docstring).

    Raises:
        HimapError: naming ``file:line`` and the field, for a missing file, a line that is not a JSON
            object, a missing or mistyped field, a missing image, or a multiple-choice answer that
            names no option.
    """
    if not path.is_file():
        raise HimapError(f"--data file {str(path)!r} does not exist (expected a JSONL file, "
                         f"{' or '.join(f'{name}:N' for name in GENERATED)})")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HimapError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise HimapError(f"{where}: expected a JSON object with \"image\" (or \"video\"), \"question\" and "
                             "\"answers\"")
        question, answers = data.get("question"), data.get("answers")
        if ("image" in data) == ("video" in data):
            raise HimapError(f"{where}: give exactly one of \"image\" and \"video\" (a path)")
        kind = "video" if "video" in data else "image"
        image = data[kind]
        if not isinstance(image, str) or not image:
            raise HimapError(f"{where}: \"{kind}\" must be a path (a string)")
        sampling = _sampling(data, where, kind)
        if not isinstance(question, str) or not question.strip():
            raise HimapError(f"{where}: \"question\" must be a non-empty string")
        if not _strings(answers):
            raise HimapError(f"{where}: \"answers\" must be a non-empty list of strings, got {answers!r}")
        choices = data.get("choices")
        if choices is not None and (not _strings(choices) or not 2 <= len(choices) <= len(LETTERS)):
            raise HimapError(f"{where}: \"choices\" must be a list of 2 to 26 strings, got {choices!r}")
        if choices and right_letter(tuple(answers), tuple(choices)) is None:
            raise HimapError(f"{where}: \"answers\" must give the right option's letter (A-{LETTERS[len(choices) - 1]}) "
                             f"or its text, got {answers[0]!r}")
        group = data.get("template", data.get("category"))
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        if not image_path.is_file():
            raise HimapError(f"{where}: {kind} file {str(image_path)!r} does not exist")
        files = {"video_path": image_path, **sampling} if kind == "video" else {"image_path": image_path}
        items.append(EvalItem(question, tuple(answers), tuple(choices) if choices else None,
                              group=str(group) if group is not None else None, **files))
    if not items:
        raise HimapError(f"--data file {str(path)!r} holds no questions")
    return items


def _sampling(data: dict, where: str, kind: str) -> dict:
    """The ``fps`` / ``max_frames`` of a JSONL line (only with ``video``), checked."""
    given = {k: data[k] for k in ("fps", "max_frames") if k in data}
    if given and kind != "video":
        raise HimapError(f"{where}: \"{next(iter(given))}\" is for a \"video\" item, not an image")
    fps = given.get("fps", DEFAULT_FPS)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < float("inf"):
        raise HimapError(f"{where}: \"fps\" must be a positive number of frames per second, got {fps!r}")
    frames = given.get("max_frames", DEFAULT_MAX_FRAMES)
    if isinstance(frames, bool) or not isinstance(frames, int) or not 2 <= frames <= FRAME_LIMIT:
        raise HimapError(f"{where}: \"max_frames\" must be an integer in [2, {FRAME_LIMIT}], got {frames!r}")
    return {"fps": float(fps), "max_frames": frames} if kind == "video" else {}


def _shapes_items(n: int, seed: int) -> list[EvalItem]:
    return [EvalItem(it.question, (it.answer,), image=it.image, group=it.template)
            for it in shapes_data.generate(n, seed=seed, split="eval")]


def _motion_items(n: int, seed: int) -> list[EvalItem]:
    """Clips as a :class:`himap_trt.video.Video` of every frame at the clip's rate (what decoding the
    MP4 that ``python -m himap_trt.data.motion`` writes gives, to within RGB<->YUV rounding)."""
    items = []
    for it in motion_data.generate(n, seed=seed, split="eval"):
        frames = it.frames
        visual = frames[0] if it.clip.still else frames_video(frames, fps=motion_data.FPS,
                                                              max_frames=motion_data.FRAMES, source="the clip")
        items.append(EvalItem(it.question, (it.answer,), image=visual, group=it.template))
    return items


#: ``--data NAME:N``: the built-in generated question sets (held-out split ``eval``).
GENERATED: dict[str, Callable[[int, int], list[EvalItem]]] = {"shapes": _shapes_items, "motion": _motion_items}


def load_items(data: str, *, limit: int | None = None, seed: int = 0) -> list[EvalItem]:
    """The items of ``--data``: a JSONL file, or ``NAME:N`` for a name of :data:`GENERATED` (N
    generated held-out questions, split ``eval``, seed ``seed``). ``limit`` keeps the first items.

    Raises:
        HimapError: a bad ``--data`` value or file, or ``--limit`` < 1.
    """
    if limit is not None and limit < 1:
        raise HimapError(f"--limit must be at least 1, got {limit}")
    name, _, count = data.partition(":")
    if name in GENERATED and not Path(data).is_file():
        if not count.isdigit() or int(count) < 1:
            raise HimapError(f"--data {data!r}: expected {name}:N with N a positive number of questions")
        n = min(int(count), limit) if limit else int(count)
        return GENERATED[name](n, seed)
    items = read_jsonl(Path(data))
    return items[:limit] if limit else items


# -- running -----------------------------------------------------------------------------------------
@dataclass
class Method:
    """One method under evaluation: a pipeline and what it was opened from.

    Attributes:
        label: the name reported (the plan's method, made unique).
        opened: the :class:`himap_trt.runtime.loader.OpenedPipeline`.
        dims: the model's :class:`himap_trt.models.ModelDims` (for FLOPs).
        source: the export directory or model it runs.
    """

    label: str
    opened: Any
    dims: Any
    source: str
    predictions: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    kept: list[list[int]] = field(default_factory=list)        # per item: image tokens after each stage
    prompt_tokens: list[int] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    # per item, models with per-request counts (Qwen): (|V| of the request, |V| the decoder's first
    # segment saw (after EVS), prompt tokens before EVS)
    requests: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def plan(self):
        """The method's :class:`himap_trt.plan.PruningPlan`."""
        return self.opened.pipeline.plan


def run_items(items: list[EvalItem], methods: list[Method], *, max_new_tokens: int = 16,
              on_step: Callable[[], None] | None = None) -> None:
    """Answer every item with every method (greedy, batch 1), interleaved; fills the methods' lists.

    The methods' order rotates from item to item. ``on_step`` is called after each answer.
    """
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    for i, item in enumerate(items):
        visual = item.load_image()
        order = methods[i % len(methods):] + methods[:i % len(methods)]
        for method in order:
            pipeline = method.opened.pipeline
            started = time.perf_counter()
            batch = pipeline.prepare([visual], [item.prompt_question])
            result = pipeline.generate(batch, config, preprocess_s=time.perf_counter() - started)
            method.predictions.append(result.texts[0])
            method.scores.append(score(result.texts[0], item))
            method.kept.append([len(stage.kept_image_positions[0]) for stage in result.stages])
            method.prompt_tokens.append(result.prompt_tokens[0])
            method.ttft_s.append(result.ttft_s)
            if batch.image_tokens is not None and result.image_tokens_per_row is not None:
                method.requests.append((batch.image_tokens[0], result.image_tokens_per_row[0][0],
                                        batch.prompt_lengths[0]))
            if on_step is not None:
                on_step()


def _request_flops(m: Method) -> tuple[float, float, float, float]:
    """Mean (Eq. 10, whole prompt) prefill FLOPs of a method's requests with their own |V| (models
    with per-request counts), and of the same requests unpruned: EVS's drop shortens the decoder's
    prompt, the vision tower still encodes every frame (as ``himap-trt bench --video``)."""
    from dataclasses import replace

    plan, dims = m.plan, m.dims
    baseline = PruningPlan("none", plan.num_layers, plan.num_image_tokens, ())
    eq10, whole, eq10_base, whole_base = [], [], [], []
    for n, seen, length in m.requests:
        base_eq10, base_prompt = request_flops(baseline, dims, n, length)
        own_eq10, own_prompt = request_flops(plan, dims, seen, length - (n - seen))
        eq10.append(own_eq10)
        whole.append(replace(own_prompt, vision=base_prompt.vision).total)
        eq10_base.append(base_eq10)
        whole_base.append(base_prompt.total)
    return tuple(statistics.fmean(v) for v in (eq10, whole, eq10_base, whole_base))


def report(items: list[EvalItem], methods: list[Method], data: str) -> dict:
    """The per-method figures as a JSON-ready dict (FLOPs in FLOPs, times in seconds).

    FLOPs: for models with one |V| (LLaVA), of the plan at that |V| with each item's prompt length;
    for models with per-request counts (Qwen families), of each request with its own |V| (a clip's
    and an image's differ) and, under EVS, what EVS kept (:func:`_request_flops`); ratios are of the
    means."""
    reference = next((m for m in methods if m.plan.method == "none"), None)
    groups = sorted({it.group for it in items if it.group is not None})
    rows = []
    for m in methods:
        plan, dims = m.plan, m.dims
        baseline = PruningPlan("none", plan.num_layers, plan.num_image_tokens, ())
        d, f = dims.hidden_size, dims.intermediate_size
        if m.requests and len(m.requests) == len(m.scores):     # VisiPruner too: its middle stage's slots
            eq10, whole, eq10_base, whole_base = _request_flops(m)
        else:
            eq10, eq10_base = image_token_flops(plan, d, f), image_token_flops(baseline, d, f)
            whole = statistics.fmean(prompt_flops(plan, dims, n).total for n in m.prompt_tokens)
            whole_base = statistics.fmean(prompt_flops(baseline, dims, n).total for n in m.prompt_tokens)
        by_group = {g: statistics.fmean(s for s, it in zip(m.scores, items) if it.group == g) for g in groups}
        agreement = None
        if reference is not None:
            agreement = statistics.fmean(normalize(a) == normalize(b)
                                         for a, b in zip(m.predictions, reference.predictions))
        stages = len(plan.stages)
        rows.append({
            "label": m.label, "method": plan.method, "plan": plan.describe(), "source": m.source,
            "backend": m.opened.backend, "items": len(m.scores),
            "accuracy": statistics.fmean(m.scores), "accuracy_by_group": by_group, "agreement_with_none": agreement,
            "image_tokens": plan.num_image_tokens,
            "mean_image_tokens_kept_per_stage": [statistics.fmean(k[j] for k in m.kept) for j in range(stages)],
            "by_media": _by_media(items, m, stages),
            "flops_eq10": eq10, "flops_eq10_ratio": eq10 / eq10_base,
            "flops_prompt_mean": whole, "flops_prompt_ratio": whole / whole_base,
            "ttft_median_s": statistics.median(m.ttft_s), "ttft_mean_s": statistics.fmean(m.ttft_s),
        })
    return {
        "data": data, "items": len(items), "groups": groups, "methods": rows,
        "predictions": [{"question": it.prompt_question, "answers": list(it.answers), "group": it.group,
                         "media": it.media,
                         **{m.label: {"answer": m.predictions[i], "score": m.scores[i]} for m in methods}}
                        for i, it in enumerate(items)],
    }


def _by_media(items: list[EvalItem], m: Method, stages: int) -> dict[str, dict]:
    """Per media (``image``, ``video``) present: items, accuracy, mean visual tokens of the request
    (models with per-request counts), after EVS, and kept after each stage."""
    out = {}
    for media in sorted({it.media for it in items}):
        rows = [i for i, it in enumerate(items) if it.media == media]
        entry = {"items": len(rows), "accuracy": statistics.fmean(m.scores[i] for i in rows),
                 "mean_image_tokens_kept_per_stage": [statistics.fmean(m.kept[i][j] for i in rows)
                                                      for j in range(stages)]}
        if len(m.requests) == len(m.scores):
            entry["mean_visual_tokens"] = statistics.fmean(m.requests[i][0] for i in rows)
            entry["mean_visual_tokens_into_decoder"] = statistics.fmean(m.requests[i][1] for i in rows)
        out[media] = entry
    return out


def plot(result: dict, path: Path) -> Path:
    """Accuracy against FLOPs ratio (Eq. 10 filled, whole prompt hollow), one colour per method; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for i, row in enumerate(result["methods"]):
        color = f"C{i}"
        ax.scatter(row["flops_eq10_ratio"], row["accuracy"], color=color, s=60, label=row["plan"])
        ax.scatter(row["flops_prompt_ratio"], row["accuracy"], facecolors="none", edgecolors=color, s=60)
        ax.annotate(row["label"], (row["flops_eq10_ratio"], row["accuracy"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xlabel("prefill FLOPs / no pruning (filled: image tokens, Eq. 10; hollow: whole prompt)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(min(0.0, *(r["accuracy"] for r in result["methods"])), 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{result['data']}: {result['items']} questions", fontsize=10)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
