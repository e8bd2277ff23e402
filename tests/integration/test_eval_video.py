"""``himap-trt eval`` on clips: a question file of MP4 clips and still images through a Qwen3-VL
export (the session's tiny-qwen3-vl HiMAP export), scores, kept tokens per media and per-request
FLOPs checked by hand."""

import json

import pytest

from conftest import exported
from himap_trt.analysis import evaluate
from himap_trt.data import motion
from himap_trt.runtime.loader import open_pipeline

pytestmark = pytest.mark.slow


def _eval(out, manifest, label, tmp_path):
    """``eval``'s run and report of one export on 7 generated questions (one per template: 5 clips,
    2 images): the question file and the report."""
    path = motion.write_jsonl(tmp_path, 7, seed=4)
    items = evaluate.load_items(str(path))
    opened = open_pipeline(export_dir=out, backend="onnxruntime")
    method = evaluate.Method(label=label, opened=opened, dims=manifest.dims, source=str(out))
    try:
        evaluate.run_items(items, [method], max_new_tokens=4)
    finally:
        opened.pipeline.close()
    return path, evaluate.report(items, [method], str(path))


def test_eval_on_clips_and_images_scores_and_counts_each_request(tmp_path_factory, tmp_path):
    out, manifest, _ = exported(tmp_path_factory, "tiny-qwen3-vl", "himap")
    path, result = _eval(out, manifest, "himap", tmp_path)
    [row] = result["methods"]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [p["media"] for p in result["predictions"]] == ["video" if "video" in x else "image" for x in lines]
    by_hand = [float(p["himap"]["answer"].strip().lower() == x["answers"][0]) for p, x in zip(result["predictions"], lines)]
    assert [p["himap"]["score"] for p in result["predictions"]] == by_hand
    # 96 px frames: 3 x 3 merged tokens per temporal patch; a clip's 8 frames are 4 patches (36
    # tokens), an image 9. HiMAP keeps half after layer 2, a quarter of that after layer 8 (halves rounded up).
    media = row["by_media"]
    assert media["video"]["items"] == 5 and media["image"]["items"] == 2
    assert media["video"]["mean_visual_tokens"] == 36 and media["image"]["mean_visual_tokens"] == 9
    assert media["video"]["mean_image_tokens_kept_per_stage"] == [18, 5]
    assert media["image"]["mean_image_tokens_kept_per_stage"] == [5, 1]
    d, m = manifest.dims.hidden_size, manifest.dims.intermediate_size

    def omega(n):  # HiMAP Eq. 10, per layer
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m

    layers = manifest.dims.num_layers                        # 12: layers 0-1 all, 2-7 half, 8-11 a quarter
    kept = {36: (18, 5), 9: (5, 1)}
    counts = [36 if "video" in x else 9 for x in lines]
    pruned = [2 * omega(n) + 6 * omega(kept[n][0]) + (layers - 8) * omega(kept[n][1]) for n in counts]
    full = [layers * omega(n) for n in counts]
    assert row["flops_eq10"] == pytest.approx(sum(pruned) / 7)
    assert row["flops_eq10_ratio"] == pytest.approx(sum(pruned) / sum(full))
    assert 0 < row["flops_prompt_ratio"] < 1


def test_eval_visipruner_on_clips_counts_each_request_by_its_slots(tmp_path_factory, tmp_path):
    """VisiPruner on a Qwen3-VL export (test_visipruner_qwen.py's, shared): eval's per-request Eq. 10
    counts |V| in layers < K_M, the middle stage's min(C, |V|) slots in K_M..K_E-1 and nothing after."""
    mid, deep, keep = 2, 5, 10
    out, manifest, _ = exported(tmp_path_factory, "tiny-qwen3-vl", "visipruner", mid_layer=mid, deep_layer=deep,
                                threshold=0.1, max_keep=keep)
    path, result = _eval(out, manifest, "visipruner", tmp_path)
    [row] = result["methods"]
    d, m = manifest.dims.hidden_size, manifest.dims.intermediate_size

    def omega(n):
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m

    counts = [36 if "video" in json.loads(line) else 9 for line in path.read_text().splitlines()]
    pruned = [mid * omega(n) + (deep - mid) * omega(min(keep, n)) for n in counts]
    full = [manifest.dims.num_layers * omega(n) for n in counts]
    assert row["flops_eq10"] == pytest.approx(sum(pruned) / len(counts))
    assert row["flops_eq10_ratio"] == pytest.approx(sum(pruned) / sum(full))


def test_eval_text_report_piped_has_full_width_tables_and_a_row_per_media(tmp_path_factory, tmp_path):
    """The tables ``eval`` prints when piped: each once, no cell cut to 80 columns, and the per-media
    table's accuracy and tokens equal the JSON report's (into the decoder -> kept per stage)."""
    import subprocess
    import sys

    out, _, _ = exported(tmp_path_factory, "tiny-qwen3-vl", "himap")
    path = motion.write_jsonl(tmp_path, 7, seed=4)

    def cli(*extra):
        proc = subprocess.run([sys.executable, "-m", "himap_trt.cli", "eval", "--data", str(path), "--export-dir",
                               str(out), "--max-new-tokens", "4", "--plot", str(tmp_path / "p.png"), *extra],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    [row] = json.loads(cli("--json"))["methods"]
    text = cli()
    assert "…" not in text                                  # rich's mark of a cut cell
    assert text.count("onnxruntime on cpu") == 1 and text.count("accuracy per template") == 1
    [line] = [x for x in text.splitlines()[text.splitlines().index(next(
        x for x in text.splitlines() if x.startswith("per media"))):] if x.startswith("│ himap")]
    cells = [c.strip() for c in line.strip("│").split("│")]
    image, video = row["by_media"]["image"], row["by_media"]["video"]
    assert cells == ["himap", f"{image['accuracy']:.3f}", "9 -> 5 -> 1", f"{video['accuracy']:.3f}", "36 -> 18 -> 5"]
