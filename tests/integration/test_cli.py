"""The command line: figures, the quick start, and every bad input giving one line and exit 1."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import exported
from himap_trt.cli import app

runner = CliRunner()
HIMAP = [sys.executable, "-m", "himap_trt.cli"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments, after_progress=False):
    """Exit status 1, no traceback, and the error on one line: the whole of stderr, or (for a failure
    late in an export) its last line after the progress display."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    if after_progress:
        assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---- flops (paper Table 1) ------------------------------------------------------------------------
@pytest.mark.parametrize("args,base,pruned", [
    (["--model", "llava-1.5-7b", "--k1", 2, "--r1", 0.5, "--k2", 8, "--r2", 0.75], "2.98", "0.73"),
    (["--model", "llava-1.5-7b", "--method", "fastv", "--k", 2, "--r", 0.5], "2.98", "1.56"),
    (["--model", "llava-1.5-13b", "--method", "fastv", "--k", 3, "--r", 0.5], "5.81", "3.09"),
    (["--model", "llava-1.5-13b", "--k1", 3, "--k2", 8], "5.81", "1.36"),
])
def test_flops_table(args, base, pruned):
    result = invoke("flops", *args)
    assert result.exit_code == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "Eq. 10" in line)
    assert [base, pruned] == [cell.strip() for cell in row.split("│")[2:4]]


def test_flops_json_ratio():
    result = invoke("flops", "--model", "llava-1.5-7b", "--json")
    data = json.loads(result.stdout)
    assert 0.24 <= data["image_tokens_ratio"] <= 0.25
    assert data["image_tokens_baseline"] == 2986076012544
    assert data["prompt_plan"]["total"] < data["prompt_baseline"]["total"]


# ---- bad input, foundation --------------------------------------------------------------------------
def test_unknown_model(photo_path):
    assert_one_line_error(invoke("flops", "--model", "no-such-org/no-such-model"), "--model", "--model tiny")
    result = invoke("run", photo_path, "q", "--backend", "torch", "--model", "no-such-org/no-such-model")
    assert_one_line_error(result, "hub cannot be reached")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert_one_line_error(invoke("flops", "--model", tmp_path), "unsupported model", "LlavaForConditionalGeneration")


@pytest.mark.parametrize("args,flag", [
    (["--k1", 8, "--k2", 2], "--k2"), (["--r1", 1.2], "--r1"), (["--method", "fastv", "--k", 40], "--k"),
    (["--method", "magic"], "--method"),
])
def test_invalid_plan(args, flag):
    assert_one_line_error(invoke("flops", "--model", "tiny", *args), flag)
    assert_one_line_error(invoke("export", "--model", "tiny", "--out", "never-written", *args), flag)
    assert not Path("never-written").exists()


def test_run_bad_image_and_question(tmp_path, photo_path):
    torch_args = ["--backend", "torch", "--model", "tiny"]
    assert_one_line_error(invoke("run", tmp_path / "missing.jpg", "What?", *torch_args), "does not exist")
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    assert_one_line_error(invoke("run", text, "What?", *torch_args), "not an image")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(photo_path.read_bytes()[:4000])
    assert_one_line_error(invoke("run", truncated, "What?", *torch_args), "truncated or corrupt")
    assert_one_line_error(invoke("run", photo_path, "   ", *torch_args), "question is empty")


# ---- the exported pipeline --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    out, manifest, _ = exported(tmp_path_factory, "tiny", "himap", k1=2, r1=0.5, k2=8, r2=0.75)
    return out


@pytest.mark.parametrize("mode,size", [("RGBA", (64, 48)), ("L", (80, 80)), ("RGB", (2, 3)), ("RGB", (4000, 2500)),
                                       ("LA", (30, 30))])
def test_image_kinds_accepted(default_export, tmp_path, mode, size):
    path = tmp_path / f"image-{mode}.png"
    Image.new(mode, size, color=200 if mode in ("L", "LA") else None).save(path)
    result = invoke("run", path, "What is this?", "--export-dir", default_export, "--max-new-tokens", 2, "--json")
    assert result.exit_code == 0, result.stderr
    request = json.loads(result.stdout)["requests"][0]
    assert request["new_tokens"] == 2 and request["image_tokens_per_segment"] == [144, 72, 18]


def test_run_json_reports_kept_positions(default_export, photo_path):
    result = invoke("run", photo_path, "What is the woman wearing?", "--export-dir", default_export,
                    "--max-new-tokens", 4, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["backend"] == "onnxruntime"  # auto without engines
    request = report["requests"][0]
    first, second = request["kept_image_positions"]
    assert len(first) == 72 and len(second) == 18 and set(second) <= set(first)
    assert first == sorted(first)
    for key in ("ttft_s", "tpot_s", "tokens_per_s", "kv_cache_bytes"):
        assert report["stats"][key] > 0


def test_run_batch_file(default_export, photo_path, tmp_path):
    shutil.copy(photo_path, tmp_path / "photo.jpg")
    lines = [{"image": "photo.jpg", "question": "Who is this?"},
             {"image": str(photo_path), "question": "Describe the uniform in detail."}]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    result = invoke("run", "--batch", tmp_path / "requests.jsonl", "--export-dir", default_export,
                    "--max-new-tokens", 3, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["stats"]["batch_size"] == 2 and [r["new_tokens"] for r in report["requests"]] == [3, 3]
    (tmp_path / "bad.jsonl").write_text('{"image": "photo.jpg"}\n')
    assert_one_line_error(invoke("run", "--batch", tmp_path / "bad.jsonl", "--export-dir", default_export),
                          "bad.jsonl:1")


def test_run_errors_on_exports(default_export, tmp_path, photo_path):
    assert_one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", tmp_path / "nothing"),
                          "--export-dir", "does not exist")
    assert_one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", default_export, "--method", "fastv"),
                          "fastv", "re-export")
    assert_one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", default_export, "--k2", 6),
                          "K2=6")
    copy = tmp_path / "copy"
    shutil.copytree(default_export, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", copy), "format version 99")
    from himap_trt.manifest import FORMAT_VERSION

    manifest["format_version"] = FORMAT_VERSION
    manifest["max_seq_len"] = 150
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", copy), "--max-seq-len is 150")


def test_matching_plan_options_are_accepted(default_export, photo_path):
    result = invoke("run", photo_path, "Hi?", "--export-dir", default_export, "--method", "himap", "--k1", 2,
                    "--max-new-tokens", 1, "--json")
    assert result.exit_code == 0, result.stderr


# ---- export safety ----------------------------------------------------------------------------------
def _manifest_bytes(directory: Path) -> bytes:
    return (directory / "manifest.json").read_bytes()


def test_failed_export_leaves_previous_export(default_export, tmp_path, photo_path, monkeypatch):
    target = tmp_path / "export"
    shutil.copytree(default_export, target)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}

    # 1) a crash in the middle (after some graphs were written)
    from himap_trt.export import compose

    def explode(self, spec, path):
        raise RuntimeError("simulated crash while composing " + spec.name)

    monkeypatch.setattr(compose.SegmentComposer, "export", explode)
    result = invoke("export", "--model", "tiny", "--method", "fastv", "--out", target)
    assert result.exit_code != 0
    monkeypatch.undo()
    # 2) a validation failure at the very end
    from himap_trt.export import validate

    monkeypatch.setitem(validate.TOLERANCES, "float32", (0.0, 0.0))
    assert_one_line_error(invoke("export", "--model", "tiny", "--method", "fastv", "--out", target),
                          "validation against PyTorch failed", after_progress=True)
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.")]
    result = invoke("run", photo_path, "Hi?", "--export-dir", target, "--max-new-tokens", 2, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["plan"]["method"] == "himap"


def test_export_refuses_to_replace_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    assert_one_line_error(invoke("export", "--model", "tiny", "--out", tmp_path), "did not write")
    assert (tmp_path / "mine.txt").read_text() == "precious"


# (killing an export at several points: tests/integration/test_hostile_inputs.py)


# ---- the README quick start, as a user runs it -------------------------------------------------------
def test_quick_start_subprocess(tmp_path, photo_path):
    env = dict(os.environ)
    export = subprocess.run([*HIMAP, "export", "--model", "tiny", "--out", str(tmp_path / "export")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert export.returncode == 0, export.stderr
    assert "exported 7 graphs" in export.stdout
    run = subprocess.run([*HIMAP, "run", str(photo_path), "What is the woman wearing?", "--export-dir",
                          str(tmp_path / "export"), "--max-new-tokens", "8"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "answer:" in run.stdout
    assert "144 (layers 0-1) -> 72 (layers 2-7) -> 18" in run.stdout
    assert "TTFT" in run.stdout and "TPOT" in run.stdout
    bad = subprocess.run([*HIMAP, "run", str(tmp_path / "nope.jpg"), "Hi?", "--export-dir", str(tmp_path / "export")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


# ---- conversations: run --messages, --batch lines with messages -------------------------------------------------
def test_run_messages_and_batch_conversations(tmp_path, photo_path):
    shutil.copy(photo_path, tmp_path / "photo.jpg")
    turns = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "photo.jpg"}},
                                          {"type": "text", "text": "What is shown?"}]},
             {"role": "assistant", "content": "A person."}, {"role": "user", "content": "Any colours?"}]
    (tmp_path / "conversation.json").write_text(json.dumps({"messages": turns}))
    common = ["--backend", "torch", "--model", "tiny", "--max-new-tokens", 5, "--json"]
    alone = invoke("run", "--messages", tmp_path / "conversation.json", *common)
    assert alone.exit_code == 0, alone.stderr
    alone = json.loads(alone.stdout)["requests"][0]
    single = invoke("run", photo_path, "What is shown?", *common)
    assert single.exit_code == 0, single.stderr
    (tmp_path / "batch.jsonl").write_text("\n".join([
        json.dumps({"messages": turns}), json.dumps({"image": "photo.jpg", "question": "What is shown?"}),
        json.dumps({"messages": [{"role": "user", "content": "Hello?"}]})]))
    batch = invoke("run", "--batch", tmp_path / "batch.jsonl", *common)
    assert batch.exit_code == 0, batch.stderr
    rows = json.loads(batch.stdout)["requests"]
    assert rows[0]["tokens"] == alone["tokens"]                                          # the same conversation
    assert rows[1]["tokens"] == json.loads(single.stdout)["requests"][0]["tokens"]      # IMAGE QUESTION's prompt
    assert rows[2]["image_tokens_per_segment"] == [0, 0, 0] and rows[2]["kept_image_positions"] == [[], []]
    assert alone["kept_image_positions"][0] and alone["image_tokens_per_segment"][0] == 144


@pytest.mark.parametrize("content,fragment", [
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages[1].role: the last message is"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     "messages[0].content[0].image_url.url: 'https://x/y.png' is not a local path"),
    ({"turns": []}, "an object with \"messages\""),
])
def test_run_bad_messages_file(tmp_path, content, fragment):
    (tmp_path / "c.json").write_text(json.dumps(content))
    assert_one_line_error(invoke("run", "--messages", tmp_path / "c.json", "--backend", "torch", "--model", "tiny"),
                          fragment)
