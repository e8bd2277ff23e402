"""``himap-trt eval`` end to end on the trained shapes model: metrics of a hand-made question file
recomputed by hand from the reported predictions, FLOPs from Eq. 10 by hand, the plot, errors."""

import json
import subprocess
import sys

import pytest

from conftest import exported
from himap_trt.data.shapes import write_jsonl

pytestmark = pytest.mark.slow


def _eval(*args):
    return subprocess.run([sys.executable, "-m", "himap_trt.cli", "eval", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def _word(text: str) -> str:
    return text.strip().lower().rstrip(".")


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    """Four generated scenes, their questions asked four ways: one answer, ten VQA-style answers
    (three right), three answers (one right), and multiple choice."""
    root = tmp_path_factory.mktemp("eval-data")
    lines = [json.loads(line) for line in write_jsonl(root, 4, seed=7).read_text().splitlines()]
    right = [line["answers"][0] for line in lines]
    lines[1]["answers"] = [right[1]] * 3 + ["zzz"] * 7
    lines[2]["answers"] = [right[2], "zzz", "qqq"]
    options = ["one", "two", "three", "four"] if lines[3]["template"] == "count" else sorted({right[3], "zzz", "qqq"})
    lines[3]["choices"] = options
    lines[3]["answers"] = ["ABCD"[options.index(right[3])]]
    path = root / "hand.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path, right, options


def test_eval_metrics_equal_values_computed_by_hand(tmp_path_factory, tmp_path, questions):
    path, right, options = questions
    none_dir = exported(tmp_path_factory, "shapes", "none")[0]
    himap_dir = exported(tmp_path_factory, "shapes", "himap")[0]
    png = tmp_path / "acc.png"
    proc = _eval("--data", path, "--export-dir", none_dir, "--export-dir", himap_dir, "--json", "--plot", png)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result["items"] == 4
    rows = {row["label"]: row for row in result["methods"]}
    assert set(rows) == {"none", "himap"}
    predictions = {label: [p[label]["answer"] for p in result["predictions"]] for label in rows}
    for label, said in predictions.items():
        words = [_word(s) for s in said]
        by_hand = [
            float(words[0] == right[0]),                            # exact match
            1.0 if words[1] == right[1] else 0.0,                  # 3 of 10 answers right: min(3/3, 1)
            1 / 3 if words[2] == right[2] else 0.0,                # 1 of 3 right: min(1/3, 1)
            float(words[3] == right[3] or words[3] == "abcd"[options.index(right[3])]),  # option text or letter
        ]
        assert [p[label]["score"] for p in result["predictions"]] == pytest.approx(by_hand)
        assert rows[label]["accuracy"] == pytest.approx(sum(by_hand) / 4)
    same = [a.strip() == b.strip() for a, b in zip(predictions["none"], predictions["himap"])]
    assert rows["himap"]["agreement_with_none"] == pytest.approx(sum(same) / 4)
    assert rows["none"]["agreement_with_none"] == 1.0
    # shapes: 64 image tokens; HiMAP keeps 32 after layer 2 and 8 after layer 8 of 10
    assert rows["none"]["mean_image_tokens_kept_per_stage"] == []
    assert rows["himap"]["mean_image_tokens_kept_per_stage"] == [32, 8]
    d, m = 64, 176

    def omega(n):  # HiMAP Eq. 10, per layer
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m

    assert rows["none"]["flops_eq10"] == 10 * omega(64)
    assert rows["himap"]["flops_eq10"] == 2 * omega(64) + 6 * omega(32) + 2 * omega(8)
    assert rows["himap"]["flops_eq10_ratio"] == pytest.approx((2 * omega(64) + 6 * omega(32) + 2 * omega(8)) / (10 * omega(64)))
    assert 0 < rows["himap"]["flops_prompt_ratio"] < 1 and rows["none"]["flops_prompt_ratio"] == 1
    assert all(row["ttft_median_s"] > 0 for row in rows.values())


def test_eval_with_the_torch_reference_and_the_random_control(tmp_path):
    proc = _eval("--data", "shapes:3", "--model", "shapes", "--backend", "torch", "--method", "himap",
                 "--method", "random", "--plan-seed", "4", "--json", "--plot", tmp_path / "p.png")
    assert proc.returncode == 0, proc.stderr
    rows = {row["label"]: row for row in json.loads(proc.stdout)["methods"]}
    assert rows["random"]["mean_image_tokens_kept_per_stage"] == rows["himap"]["mean_image_tokens_kept_per_stage"] == [32, 8]
    assert "seed 4" in rows["random"]["plan"] and rows["random"]["agreement_with_none"] is None
    assert rows["random"]["flops_eq10"] == rows["himap"]["flops_eq10"]


def test_eval_user_errors_are_one_line(tmp_path):
    proc = _eval("--data", tmp_path / "missing.jsonl", "--export-dir", tmp_path)
    assert proc.returncode == 1 and "missing.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    proc = _eval("--data", "shapes:2")
    assert proc.returncode == 1 and "--export-dir" in proc.stderr
    proc = _eval("--data", "shapes:2", "--model", "shapes", "--method", "bogus")
    assert proc.returncode == 1 and "--method" in proc.stderr and "Traceback" not in proc.stderr
