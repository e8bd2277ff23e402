"""Untrusted inputs through the CLI: every case gives one error line, a non-zero exit, no traceback,
and leaves the export exactly as it was (hashed before and after); `<image>` text is answered.

Classes: manifest paths leaving the export (absolute, `..`, symlinks) for run / check / build;
files from another export (sha256); custom code in model and processor directories (with a
terminal answering `y`); malformed manifests; `--out` safety, locking and atomic swaps killed at
several points; images, questions, `--batch` lines and options; `--help`; property-based fuzzing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from conftest import exported
from himap_trt.cli import app

runner = CliRunner()
HIMAP = [sys.executable, "-m", "himap_trt.cli"]
PYTHON_ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def tree_digest(directory: Path) -> str:
    """sha256 over every entry below ``directory`` (names, link targets, file bytes)."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        digest.update(str(path.relative_to(directory)).encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def one_line_error(result, *fragments, last_line=False):
    """Exit 1, no traceback, and the error on one line (the whole of stderr, or its last line when
    progress lines come first); each fragment is in it. Returns the line."""
    stderr, stdout = result.stderr, result.stdout
    assert result.exit_code == 1, (result.exit_code, stdout[-500:], stderr[-2000:])
    assert "Traceback" not in stderr + stdout, stderr
    lines = stderr.strip().splitlines()
    if last_line:
        assert [line for line in lines if line.startswith("error: ")] == lines[-1:], stderr
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def rewrite_manifest(directory: Path, change) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rehash(directory: Path) -> None:
    """Record the export's current files in its manifest, as an attacker crafting a directory would."""
    from himap_trt.confine import files_under, record_files

    names = [n for n in files_under(directory) if n != "manifest.json"]
    rewrite_manifest(directory, lambda data: data.__setitem__("files", record_files(directory, names)))


@pytest.fixture(scope="module")
def good_export(tmp_path_factory):
    out, _, _ = exported(tmp_path_factory, "tiny", "himap", k1=2, r1=0.5, k2=8, r2=0.75)
    return out


@pytest.fixture(scope="module")
def other_export(tmp_path_factory):
    """An export with scoring graphs of the same inputs and outputs (FastV at K=2 keeps 72 of 144 too)."""
    out, _, _ = exported(tmp_path_factory, "tiny", "fastv", k=2, r=0.5)
    return out


@pytest.fixture
def export_copy(good_export, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(good_export, copy)
    return copy


def export_commands(export: Path, photo_path: Path):
    return [
        ["run", photo_path, "What is it?", "--export-dir", export, "--max-new-tokens", 1],
        ["check", "--tensorrt-compat", "--export-dir", export],
        ["check", "--export-dir", export],
        ["build", "--dry-run", "--export-dir", export],
        ["build", "--export-dir", export],
    ]


def assert_refused_everywhere(export: Path, photo_path: Path, *fragments):
    before = tree_digest(export)
    for command in export_commands(export, photo_path):
        one_line_error(invoke(*command), *fragments)
    assert tree_digest(export) == before


# ---- 1. paths in manifest.json stay inside the export --------------------------------------------------
def test_manifest_paths_cannot_leave_the_export(export_copy, tmp_path, photo_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(export_copy / "scoring_0.onnx", outside / "graph.onnx")
    shutil.copytree(export_copy / "processor", outside / "processor")
    pristine = (export_copy / "manifest.json").read_text()

    def graph_file(value):
        def change(data):
            data["graphs"][3]["file"] = value
            data["files"][value] = data["files"]["scoring_0.onnx"]
        return change

    cases = [
        (graph_file(str(outside / "graph.onnx")), ["graphs[3].file", "absolute path"]),
        (graph_file("../elsewhere/graph.onnx"), ["graphs[3].file", "climbs out"]),
        (graph_file("../../../../etc/passwd"), ["graphs[3].file", "climbs out"]),
        (lambda data: data.__setitem__("processor_dir", "../elsewhere/processor"), ["processor_dir", "climbs out"]),
        (lambda data: data.__setitem__("processor_dir", str(outside / "processor")), ["processor_dir", "absolute"]),
        (lambda data: data["files"].__setitem__("/etc/hostname", data["files"]["embed.onnx"]), ["files", "absolute"]),
    ]
    for change, fragments in cases:
        (export_copy / "manifest.json").write_text(pristine)
        rewrite_manifest(export_copy, change)
        assert_refused_everywhere(export_copy, photo_path, *fragments)


def test_symlinks_leading_out_are_refused(export_copy, tmp_path, photo_path):
    # the same bytes (so the recorded sha256 matches), reached through a link out of the directory
    outside = tmp_path / "segment_0.onnx"
    shutil.move(export_copy / "segment_0.onnx", outside)
    (export_copy / "segment_0.onnx").symlink_to(outside)
    assert_refused_everywhere(export_copy, photo_path, "graphs[2].file", "leads outside")
    # a symlinked processor directory
    (export_copy / "segment_0.onnx").unlink()
    shutil.move(outside, export_copy / "segment_0.onnx")
    shutil.move(export_copy / "processor", tmp_path / "processor")
    (export_copy / "processor").symlink_to(tmp_path / "processor")
    assert_refused_everywhere(export_copy, photo_path, "processor_dir", "leads outside")


def test_external_data_outside_or_unrecorded_is_refused(export_copy, tmp_path, photo_path):
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    work = tmp_path / "work"
    work.mkdir()
    model = onnx.load(str(export_copy / "embed.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    onnx.save_model(model, str(work / "embed.onnx"))
    shutil.move(work / "weights.bin", tmp_path / "weights.bin")
    model = onnx.load(str(work / "embed.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"  # export_copy/../weights.bin: outside the export
    onnx.save_model(model, str(export_copy / "embed.onnx"))
    rehash(export_copy)
    assert_refused_everywhere(export_copy, photo_path, "external data of 'embed.onnx'", "climbs out")
    # inside the directory but not recorded in the manifest
    shutil.move(tmp_path / "weights.bin", export_copy / "weights.bin")
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "weights.bin"
    onnx.save_model(model, str(export_copy / "embed.onnx"))
    rehash(export_copy)
    rewrite_manifest(export_copy, lambda data: data["files"].pop("weights.bin"))
    assert_refused_everywhere(export_copy, photo_path, "'embed.onnx'", "does not record")


# ---- 2. files copied in from another export ----------------------------------------------------------
def test_file_from_another_export_is_refused_by_name(export_copy, other_export, photo_path):
    shutil.copy(other_export / "scoring_0.onnx", export_copy / "scoring_0.onnx")
    assert_refused_everywhere(export_copy, photo_path, "'scoring_0.onnx'", "another export")


def test_same_size_edit_with_restored_mtime_is_refused(export_copy, photo_path):
    path = export_copy / "segment_1.onnx"
    info = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))  # mtime back; ctime cannot be set back
    assert_refused_everywhere(export_copy, photo_path, "'segment_1.onnx'", "sha256")


def test_digest_cache_never_trusts_a_changed_file(tmp_path):
    from himap_trt.confine import HashCache, file_digest

    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    cache = HashCache(tmp_path / "cache.json")
    first = file_digest(path, cache, trusted=True)
    assert cache.get(path.stat()) == first.sha256 == hashlib.sha256(b"a" * 1000).hexdigest()
    info = path.stat()
    with open(path, "r+b") as handle:  # same inode, same size, mtime restored
        handle.write(b"b")
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert cache.get(path.stat()) is None
    assert file_digest(path, cache).sha256 == hashlib.sha256(b"b" + b"a" * 999).hexdigest()
    young = tmp_path / "young.bin"
    young.write_bytes(b"x")
    file_digest(young, cache)  # written just now: hashed, not cached (racy)
    assert cache.get(young.stat()) is None


def test_processor_files_are_verified_too(export_copy, photo_path):
    (export_copy / "processor" / "special_tokens_map.json").write_text('{"bos_token": "</s>"}')
    assert_refused_everywhere(export_copy, photo_path, "special_tokens_map.json", "does not record")
    (export_copy / "processor" / "special_tokens_map.json").unlink()
    (export_copy / "processor" / "chat_template.jinja").write_text("{{ 'injected' }}")
    assert_refused_everywhere(export_copy, photo_path, "processor/chat_template.jinja", "another export")


def test_engines_are_confined_and_hashed_before_tensorrt(export_copy, tmp_path, photo_path):
    from himap_trt.engines.manifest import export_fingerprint
    from himap_trt.arch import get_architecture
    from himap_trt.manifest import load_manifest

    plan = load_manifest(export_copy, families=get_architecture).plan
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "vision.engine").write_bytes(b"plugin code")
    entry = {"graph": "vision", "file": "../../outside.engine", "profiles": []}
    data = {"format_version": 3, "package_version": "x", "export_fingerprint": export_fingerprint(export_copy),
            "plan": plan.to_dict(), "dtype": "float32", "tensorrt_flavour": "tensorrt", "tensorrt_version": "10.9",
            "gpu_name": "g", "compute_capabilities": ["9.0"], "kv_write": "scatternd", "max_batch": 1,
            "max_seq_len": 512, "engines": [entry],
            "files": {"../../outside.engine": {"bytes": 11, "sha256": "0" * 64}}}
    (engines / "manifest.json").write_text(json.dumps(data))
    command = ["run", photo_path, "Hi?", "--export-dir", export_copy, "--backend", "tensorrt", "--engines", engines]
    one_line_error(invoke(*command), "engines[0].file", "climbs out")
    entry["file"] = "vision.engine"
    data["files"] = {"vision.engine": {"bytes": 11, "sha256": "0" * 64}}
    (engines / "manifest.json").write_text(json.dumps(data))
    one_line_error(invoke(*command), "'vision.engine'", "sha256")


# ---- 3. malformed and old manifests name the file and the field ----------------------------------------
def test_malformed_manifests_name_file_and_field(export_copy, photo_path):
    pristine = (export_copy / "manifest.json").read_text()
    cases = [
        (lambda d: d.pop("dims"), "field 'dims' is missing"),
        (lambda d: d["dims"].pop("head_dim"), "field 'dims.head_dim' is missing"),
        (lambda d: d.__setitem__("max_seq_len", "many"), "field 'max_seq_len' must be an integer"),
        (lambda d: d["graphs"][0].pop("file"), "field 'graphs[0].file' is missing"),
        (lambda d: d.__setitem__("eos_token_ids", [None]), "eos_token_ids[0]"),
        (lambda d: d["files"].__setitem__("embed.onnx", {"bytes": -1, "sha256": "x"}), "files['embed.onnx'].bytes"),
        (lambda d: d.__setitem__("format_version", 1), "format version 1"),
        (lambda d: d.__setitem__("kv_write", "exec"), "field 'kv_write' must be one of scatternd, tensorscatter"),
    ]
    for change, fragment in cases:
        (export_copy / "manifest.json").write_text(pristine)
        rewrite_manifest(export_copy, change)
        line = one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", export_copy), fragment)
        assert "manifest.json" in line
    (export_copy / "manifest.json").write_text("[1, 2")
    one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", export_copy), "manifest.json")


# ---- 4. no code from model, processor or export directories ---------------------------------------------
EVIL_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
"""


def evil_model_dir(root: Path, marker: Path) -> Path:
    directory = root / "evil-model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (directory / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    return directory


def run_in_terminal(args, timeout=180):
    """Run a command on a pseudo-terminal that answers `y` to any question; (exit status, output)."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execvpe(args[0], args, PYTHON_ENV)
    output = b""
    answered = 0
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
                if output.count(b"[y/N]") > answered:
                    os.write(fd, b"y\n")
                    answered += 1
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_custom_code_never_runs_even_with_a_terminal(tmp_path, export_copy, photo_path):
    marker = tmp_path / "marker"
    model = evil_model_dir(tmp_path, marker)
    status, output = run_in_terminal([*HIMAP, "flops", "--model", str(model)])
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert status == 1 and len(lines) == 1 and "auto_map" in lines[0] and "Traceback" not in output, output
    assert "[y/N]" not in output and not marker.exists()

    # an export whose processor declares custom code, with a manifest that records it consistently
    (export_copy / "processor" / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    config = export_copy / "processor" / "processor_config.json"
    data = json.loads(config.read_text()) if config.exists() else {}
    data["auto_map"] = {"AutoProcessor": "evil.EvilProcessor"}
    config.write_text(json.dumps(data))
    rehash(export_copy)
    status, output = run_in_terminal([*HIMAP, "run", str(photo_path), "Hi?", "--export-dir", str(export_copy)])
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert status == 1 and len(lines) == 1 and "own Python code" in lines[0] and "Traceback" not in output, output
    assert not marker.exists()
    # and without a terminal, for every command that reads a model directory
    for command in (["export", "--model", model, "--out", tmp_path / "never"], ["flops", "--model", model],
                    ["run", photo_path, "Hi?", "--backend", "torch", "--model", model]):
        one_line_error(invoke(*command), "auto_map", str(model))
    assert not marker.exists() and not (tmp_path / "never").exists()


def test_pickled_weights_refused_in_one_line(tmp_path):
    import fractions

    import torch

    from himap_trt.models.tiny import tiny_model_dir

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir("tiny"), model)
    (model / "model.safetensors").unlink()
    torch.save({"weight": fractions.Fraction(1, 3)}, model / "pytorch_model.bin")
    one_line_error(invoke("export", "--model", model, "--out", tmp_path / "never"), "Weights only load failed",
                   last_line=True)
    assert not (tmp_path / "never").exists()


# ---- 5. --out: only our exports are replaced; locked; swapped atomically --------------------------------
def test_out_is_only_replaced_when_it_holds_our_export(tmp_path, monkeypatch):
    web = tmp_path / "webapp"
    web.mkdir()
    (web / "manifest.json").write_text(json.dumps({"name": "my web app", "icons": []}))
    (web / "index.html").write_text("<html></html>")
    before = tree_digest(web)
    one_line_error(invoke("export", "--model", "tiny", "--out", web), "did not write")
    assert tree_digest(web) == before
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(invoke("export", "--model", "tiny", "--out", blocker / "export"), "is not a directory")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == readonly else real_access(path, mode, **kw))
    one_line_error(invoke("export", "--model", "tiny", "--out", readonly / "export"), "permission denied")
    assert not list(readonly.iterdir())


def runnable_method(export: Path, photo_path: Path) -> str:
    result = invoke("run", photo_path, "Hi?", "--export-dir", export, "--max-new-tokens", 1, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["plan"]["method"]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# Kills of real `export`, `build` and `triton repo` runs at every step of their write sequences, and
# the concurrent-writer lock, are tested in test_artefact_reliability.py (issue 24).


def test_two_rename_fallback_restores_after_a_kill(good_export, tmp_path, monkeypatch):
    """Where the file system cannot exchange, a run killed between the two renames is repaired next time."""
    from himap_trt import fsutil

    target = tmp_path / "export"
    shutil.copytree(good_export, target)
    before = tree_digest(target)
    target.rename(tmp_path / ".export.previous-999999-abcd")  # what a kill between the renames leaves
    (tmp_path / ".export.partial-999999-abcd").mkdir()
    monkeypatch.setattr(fsutil, "exchange", lambda a, b: False)
    with pytest.raises(RuntimeError):
        with fsutil.atomic_directory(target, marker="manifest.json", flag="--out"):
            raise RuntimeError("stop")
    assert tree_digest(target) == before and leftovers(tmp_path) == []
    with fsutil.atomic_directory(target, marker="manifest.json", flag="--out") as tmp:
        shutil.copytree(good_export, tmp, dirs_exist_ok=True)
    assert tree_digest(target) == before and leftovers(tmp_path) == []


# ---- 6. images, questions, --batch lines, options ---------------------------------------------------------
def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height pixels (a decompression bomb's shape), with no image data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_bad_images_give_one_line(good_export, tmp_path, photo_path, monkeypatch):
    args = ["What?", "--export-dir", good_export]
    before = tree_digest(good_export)
    one_line_error(invoke("run", tmp_path, *args), "not a regular file", "directory")
    os.mkfifo(tmp_path / "fifo")
    one_line_error(invoke("run", tmp_path / "fifo", *args), "not a regular file", "FIFO")
    for pixels, name in ((10000, "warned.png"), (20000, "bomb.png")):
        png_header_only(tmp_path / name, pixels, pixels)
        one_line_error(invoke("run", tmp_path / name, *args), "decompression-bomb")
    from himap_trt import prompt

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(prompt, "open", denied, raising=False)
    one_line_error(invoke("run", photo_path, *args), "permission denied")
    assert tree_digest(good_export) == before


def test_16bit_image_is_scaled_not_clipped(good_export, tmp_path):
    from himap_trt.prompt import load_image

    values = np.linspace(0, 65535, 96 * 96).reshape(96, 96).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    Image.fromarray(np.rint(values / 257).astype(np.uint8)).save(tmp_path / "flat.png")
    loaded = load_image(tmp_path / "deep.png")
    assert loaded.mode == "L"
    assert np.array_equal(np.asarray(loaded), np.asarray(Image.open(tmp_path / "flat.png")))
    assert abs(float(np.asarray(loaded).mean()) - 127.5) < 1  # PIL's own RGB conversion gives ~254
    answers = []
    for name in ("deep.png", "flat.png"):
        result = invoke("run", tmp_path / name, "What is it?", "--export-dir", good_export, "--max-new-tokens", 3,
                        "--json")
        assert result.exit_code == 0, result.stderr
        request = json.loads(result.stdout)["requests"][0]
        answers.append((request["tokens"], request["kept_image_positions"]))
    assert answers[0] == answers[1]


def test_special_token_text_is_plain_text(good_export, photo_path, tmp_path):
    from himap_trt.models.loading import load_model
    from himap_trt.prompt import prepare_batch

    processor = load_model("tiny").processor
    question = "What is <image> here </s> and <s>?"
    batch = prepare_batch(processor, [Image.open(photo_path)] * 2, [question, "Plain?"], 4, 144)
    assert (batch.input_ids == 4).sum(1).tolist() == [144, 144]
    row = batch.input_ids[0][batch.attention_mask[0].bool()]
    assert question in processor.tokenizer.decode(row[row != 4])
    assert int((row == 2).sum()) == 0 and int((row == 1).sum()) == 1  # </s>, <s> in the text are not tokens

    result = invoke("run", photo_path, question, "--export-dir", good_export, "--max-new-tokens", 2, "--json")
    assert result.exit_code == 0, result.stderr
    single = json.loads(result.stdout)["requests"][0]
    assert single["image_tokens_per_segment"] == [144, 72, 18]
    assert single["prompt_tokens"] == int(batch.attention_mask[0].sum())
    (tmp_path / "r.jsonl").write_text(json.dumps({"image": str(photo_path), "question": question}) + "\n"
                                      + json.dumps({"image": str(photo_path), "question": "<image>"}) + "\n")
    result = invoke("run", "--batch", tmp_path / "r.jsonl", "--export-dir", good_export, "--max-new-tokens", 2, "--json")
    assert result.exit_code == 0, result.stderr
    requests = json.loads(result.stdout)["requests"]
    assert [r["prompt_tokens"] for r in requests][0] == single["prompt_tokens"]
    assert all(r["new_tokens"] == 2 for r in requests)


def test_questions_batch_lines_and_options(good_export, tmp_path, photo_path):
    before = tree_digest(good_export)
    args = ["--export-dir", good_export]
    one_line_error(invoke("run", photo_path, "caf\udce9?", *args), "not UTF-8")
    batch = tmp_path / "b.jsonl"
    cases = [
        (b'{"image": "a.jpg", "question": null}\n', "b.jsonl:1", "\"question\" must be a string, got null"),
        (b'\n{"image": "a.jpg", "question": ["a", "b"]}\n', "b.jsonl:2", "got an array"),
        (b'{"image": 7, "question": "Hi?"}\n', "b.jsonl:1", "\"image\""),
        (b'{"image": "a.jpg", "question": "caf\xe9?"}\n', "b.jsonl:1", "not UTF-8"),
        (b'[1, 2]\n', "b.jsonl:1", "got an array"),
        (b'{"image": "a.jpg"\n', "b.jsonl:1", "not JSON"),
        (b'{"image": "a.jpg", "question": "  "}\n', "b.jsonl:1", "empty"),
    ]
    for content, *fragments in cases:
        batch.write_bytes(content)
        one_line_error(invoke("run", "--batch", batch, *args), *fragments)
    for option, fragment in ((["--device", "tpu"], "--device"), (["--temperature", "nan"], "--temperature"),
                             (["--temperature", "inf"], "--temperature"), (["--backend", "gpu"], "--backend"),
                             (["--top-p", "nan"], "--top-p"), (["--max-new-tokens", 0], "--max-new-tokens")):
        one_line_error(invoke("run", photo_path, "Hi?", *args, *option), fragment)
    one_line_error(invoke("check", *args, "--max-new-tokens", 0), "--max-new-tokens")
    one_line_error(invoke("export", "--model", "tiny", "--max-seq-len", 10, "--out", tmp_path / "x"), "--max-seq-len")
    one_line_error(invoke("build", *args, "--workspace", "lots"), "--workspace")
    # top-k / top-p without sampling: a one-line note, then the greedy answer
    result = invoke("run", photo_path, "Hi?", *args, "--top-k", 5, "--max-new-tokens", 1, "--json")
    assert result.exit_code == 0 and result.stderr.strip().splitlines() == [
        "note: --top-k ignored: sampling is off (--temperature 0), decoding greedily"], result.stderr
    # a prompt the export cannot hold, where the model allows no more positions: no advice to re-export
    line = one_line_error(invoke("run", photo_path, "why " * 600, *args), "shorten the question")
    assert "re-export" not in line
    assert tree_digest(good_export) == before


def test_new_plan_and_export_options_are_checked_before_loading(tmp_path):
    """Options added with slot caches, VisiPruner and --method random: one error line, nothing written."""
    out = tmp_path / "out"
    cases = [
        (("export", "--model", "tiny", "--kv-write", "inplace", "--out", out), "--kv-write must be one of"),
        (("export", "--model", "tiny", "--kv-write", "gqa", "--dtype", "bf16", "--out", out), "--kv-write gqa needs"),
        (("bench", "--model", "tiny", "--kv-write", "gqa,flash", "--work-dir", out), "--kv-write must be"),
        (("flops", "--model", "llava-1.5-7b", "--method", "visipruner", "--assume-kept", "-1"), "--assume-kept"),
        (("flops", "--model", "llava-1.5-7b", "--method", "visipruner", "--assume-kept", "nan"), "--assume-kept"),
        (("flops", "--model", "llava-1.5-7b", "--method", "visipruner", "--max-keep", "0"), "--max-keep"),
        (("flops", "--model", "llava-1.5-7b", "--method", "visipruner", "--threshold", "inf"), "--threshold"),
        (("flops", "--model", "llava-1.5-7b", "--method", "random", "--k1", "9", "--k2", "8"), "--k2"),
    ]
    for args, fragment in cases:
        one_line_error(invoke(*args), fragment)
    assert not out.exists()


def test_help_shows_every_default_and_choice():
    import click
    import typer.main

    command = typer.main.get_command(app)
    from himap_trt.plan import METHODS

    choices = {"--method": f"[{'|'.join(METHODS)}]", "--dtype": "[fp32|fp16|bf16]",
               "--backend": "[auto|onnxruntime|tensorrt|torch]", "--device": "[cpu|cuda|cuda:N]"}
    for name, sub in command.commands.items():
        result = invoke(name, "--help", env={"COLUMNS": "100"})
        assert result.exit_code == 0
        text = " ".join(result.stdout.split())
        for param in sub.params:
            if not isinstance(param, click.Option) or param.is_flag and not param.secondary_opts or param.name == "help":
                continue
            record = " ".join(param.get_help_record(click.Context(sub))[1].split())
            assert "[default:" in record and record in text, (name, param.opts, record)
            flag = param.opts[0]
            if flag in choices:
                assert f"{flag} {choices[flag]}" in text, (name, flag)


# ---- 7. property-based fuzzing ------------------------------------------------------------------------------
FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def assert_answer_or_one_line_error(result):
    assert "Traceback" not in result.stderr + result.stdout
    if result.exit_code == 0:
        json.loads(result.stdout)
    else:
        one_line_error(result)


@FUZZ
@given(question=st.one_of(
    st.text(min_size=0, max_size=40),
    st.lists(st.sampled_from(["<image>", "</s>", "<s>", "<pad>", "<unk>", "\n", "\x00", "\udcff", "ü", " ", "{{ x }}",
                              "USER:", "ASSISTANT:", "[/]", "[bold]"]), max_size=6).map("".join)))
def test_fuzz_question_text(good_export, photo_path, question):
    before = tree_digest(good_export)
    result = invoke("run", "--export-dir", good_export, "--max-new-tokens", 1, "--json", "--", photo_path, question)
    assert_answer_or_one_line_error(result)
    assert tree_digest(good_export) == before


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)


@FUZZ
@given(lines=st.lists(st.one_of(
    st.just(b'{"image": "photo.jpg", "question": "What is it?"}'),
    st.binary(max_size=30),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"image": st.one_of(st.just("photo.jpg"), json_values),
                           "question": st.one_of(st.text(max_size=12), json_values)}).map(lambda v: json.dumps(v).encode()),
), min_size=0, max_size=3))
def test_fuzz_batch_lines(good_export, photo_path, tmp_path_factory, lines):
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copy(photo_path, folder / "photo.jpg")
    (folder / "requests.jsonl").write_bytes(b"\n".join(lines))
    result = invoke("run", "--batch", folder / "requests.jsonl", "--export-dir", good_export, "--max-new-tokens", 1,
                    "--json")
    assert_answer_or_one_line_error(result)
