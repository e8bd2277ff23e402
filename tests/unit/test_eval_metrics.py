"""himap_trt.analysis.evaluate: normalisation, the three scoring rules, and question-file checks."""

import json

import pytest

from himap_trt.errors import HimapError
from himap_trt.analysis.evaluate import EvalItem, chosen_letter, load_items, normalize, read_jsonl, score


def test_normalize():
    assert normalize("  The Two. ") == "2"
    assert normalize("A red-ish Circle!") == "red ish circle"
    assert normalize("yes") == "yes" and normalize("Yes.") == "yes"


def test_exact_match_vqa_score_and_multiple_choice_by_hand():
    single = EvalItem("q", ("two",))
    assert score("2", single) == 1.0 and score("Two.", single) == 1.0 and score("three", single) == 0.0
    vqa = EvalItem("q", ("red", "red", "Red", "blue", "red", "green"))
    assert score("red", vqa) == 1.0                   # 4 matches -> min(4/3, 1)
    assert score("blue", vqa) == pytest.approx(1 / 3)  # 1 match
    assert score("purple", vqa) == 0.0
    assert score("green.", EvalItem("q", ("green", "green", "blue"))) == pytest.approx(2 / 3)
    mc = EvalItem("q", ("B",), choices=("cat", "dog", "bird"))
    assert [score(p, mc) for p in ("B", "b.", "(B) dog", "dog", "The dog", "C", "D", "cow")] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert score("bird", EvalItem("q", ("bird",), choices=("cat", "dog", "bird"))) == 1.0
    assert chosen_letter("E", 3) is None and chosen_letter("c) bird", 3) == "C"
    assert mc.prompt_question == "q\nA. cat\nB. dog\nC. bird\nAnswer with the option's letter from the given choices directly."


def test_question_file_errors_name_the_line_and_field(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "q.jsonl"
    good = {"image": "a.png", "question": "What?", "answers": ["x"]}
    cases = [
        ("{not json", "q.jsonl:2: not valid JSON"),
        (json.dumps([1]), "q.jsonl:2: expected a JSON object"),
        (json.dumps({**good, "answers": "x"}), '"answers" must be a non-empty list of strings'),
        (json.dumps({**good, "question": " "}), '"question" must be a non-empty string'),
        (json.dumps({**good, "image": "b.png"}), "q.jsonl:2: image file"),
        (json.dumps({**good, "choices": ["only"]}), '"choices" must be a list of 2 to 26 strings'),
        (json.dumps({**good, "choices": ["p", "q"], "answers": ["C"]}), "right option's letter (A-B)"),
    ]
    for line, message in cases:
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(HimapError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_jsonl(path)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "template": "t"}) + "\n")
    items = read_jsonl(path)
    assert [i.group for i in items] == [None, "t"] and items[0].image_path == tmp_path / "a.png"
    with pytest.raises(HimapError, match="does not exist"):
        load_items(str(tmp_path / "missing.jsonl"))
    with pytest.raises(HimapError, match="shapes:N"):
        load_items("shapes:x")
    with pytest.raises(HimapError, match="--limit"):
        load_items("shapes:3", limit=0)
    generated = load_items("shapes:8", limit=3, seed=2)
    assert len(generated) == 3 and generated[0].group == "color_of_shape" and generated[0].image.size == (96, 96)
