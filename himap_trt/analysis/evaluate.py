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
"choices": [..]?}`` per line; image paths relative to the file; an optional ``template`` or
``category`` string groups the accuracy), or ``--data shapes:N``: N freshly generated held-out
questions (:mod:`himap_trt.data.shapes`, split ``eval``, ``--seed``).
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

from himap_trt.data.shapes import generate
from himap_trt.errors import HimapError
from himap_trt.flops import image_token_flops, prompt_flops
from himap_trt.plan import PruningPlan
from himap_trt.prompt import load_image
from himap_trt.runtime.sampling import GenerationConfig

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
        image: the image itself (generated items).
        group: ``template`` / ``category`` of the item, for the per-group accuracy (or None).
    """

    question: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] | None = None
    image_path: Path | None = None
    image: Any = None
    group: str | None = None

    def load_image(self):
        """The PIL image (opened from ``image_path`` if the item has none in memory)."""
        if self.image is not None:
            return self.image

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
        raise HimapError(f"--data file {str(path)!r} does not exist (expected a JSONL file or shapes:N)")
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
            raise HimapError(f"{where}: expected a JSON object with \"image\", \"question\" and \"answers\"")
        image, question, answers = data.get("image"), data.get("question"), data.get("answers")
        if not isinstance(image, str) or not image:
            raise HimapError(f"{where}: \"image\" must be a path (a string)")
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
            raise HimapError(f"{where}: image file {str(image_path)!r} does not exist")
        items.append(EvalItem(question, tuple(answers), tuple(choices) if choices else None, image_path=image_path,
                              group=str(group) if group is not None else None))
    if not items:
        raise HimapError(f"--data file {str(path)!r} holds no questions")
    return items


def load_items(data: str, *, limit: int | None = None, seed: int = 0) -> list[EvalItem]:
    """The items of ``--data``: a JSONL file, or ``shapes:N`` (N generated held-out questions, split
    ``eval``, seed ``seed``). ``limit`` keeps the first items.

    Raises:
        HimapError: a bad ``--data`` value or file, or ``--limit`` < 1.
    """
    if limit is not None and limit < 1:
        raise HimapError(f"--limit must be at least 1, got {limit}")
    if data.startswith("shapes:"):
        count = data.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise HimapError(f"--data {data!r}: expected shapes:N with N a positive number of questions")

        n = min(int(count), limit) if limit else int(count)
        return [EvalItem(it.question, (it.answer,), image=it.image, group=it.template)
                for it in generate(n, seed=seed, split="eval")]
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
        image = item.load_image()
        order = methods[i % len(methods):] + methods[:i % len(methods)]
        for method in order:
            pipeline = method.opened.pipeline
            started = time.perf_counter()
            batch = pipeline.prepare([image], [item.prompt_question])
            result = pipeline.generate(batch, config, preprocess_s=time.perf_counter() - started)
            method.predictions.append(result.texts[0])
            method.scores.append(score(result.texts[0], item))
            method.kept.append([len(stage.kept_image_positions[0]) for stage in result.stages])
            method.prompt_tokens.append(result.prompt_tokens[0])
            method.ttft_s.append(result.ttft_s)
            if on_step is not None:
                on_step()


def report(items: list[EvalItem], methods: list[Method], data: str) -> dict:
    """The per-method figures as a JSON-ready dict (FLOPs in FLOPs, times in seconds)."""
    reference = next((m for m in methods if m.plan.method == "none"), None)
    groups = sorted({it.group for it in items if it.group is not None})
    rows = []
    for m in methods:
        plan, dims = m.plan, m.dims
        baseline = PruningPlan("none", plan.num_layers, plan.num_image_tokens, ())
        d, f = dims.hidden_size, dims.intermediate_size
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
            "flops_eq10": eq10, "flops_eq10_ratio": eq10 / eq10_base,
            "flops_prompt_mean": whole, "flops_prompt_ratio": whole / whole_base,
            "ttft_median_s": statistics.median(m.ttft_s), "ttft_mean_s": statistics.fmean(m.ttft_s),
        })
    return {
        "data": data, "items": len(items), "groups": groups, "methods": rows,
        "predictions": [{"question": it.prompt_question, "answers": list(it.answers), "group": it.group,
                         **{m.label: {"answer": m.predictions[i], "score": m.scores[i]} for m in methods}}
                        for i, it in enumerate(items)],
    }


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
