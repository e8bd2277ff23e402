"""Artefacts, second reliability probe (issue 33, cases 3-6): engines written inside an export (or
any artefact directory), a signing key model-signing cannot use, an unbounded ``model.sig``, and
the messages a new user meets (an engines directory given as the export, a request without an
image on a video model)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from test_artefact_reliability import good_export, keys, write_key  # noqa: F401 - fixtures
from test_hostile_inputs import invoke, one_line_error, tree_digest

from himap_trt.engines.manifest import ENGINES_MANIFEST
from himap_trt.errors import HimapError
from himap_trt.fsutil import ARTEFACT_MARKERS, check_outside_artefacts, check_target
from himap_trt.manifest import MANIFEST_NAME
from himap_trt.triton.repository import REPOSITORY_MARKER


@pytest.fixture
def signed_export(good_export, keys, tmp_path):  # noqa: F811 - the fixture imported above
    from himap_trt.signing import sign_directory

    copy = tmp_path / "export"
    shutil.copytree(good_export, copy)
    sign_directory(copy, keys["private"])
    return copy


def fake_engines(directory):
    directory.mkdir()
    (directory / ENGINES_MANIFEST).write_text(json.dumps({"format_version": 3, "engines": [],
                                                          "export_fingerprint": "0" * 64}))
    return directory


def test_marker_names_agree_with_the_writers():
    assert set(ARTEFACT_MARKERS) == {MANIFEST_NAME, ENGINES_MANIFEST, REPOSITORY_MARKER}


def test_engines_inside_an_export_are_refused_before_any_build(signed_export, keys, tmp_path, photo_path):
    before = tree_digest(signed_export)
    for engines in (signed_export / "engines", signed_export / "processor" / "engines"):
        line = one_line_error(invoke("build", "--export-dir", signed_export, "--engines", engines, "--tensorrt", "rtx"),
                              f"--engines {str(engines)!r} lies inside {str(signed_export)!r}", "an export")
        assert "built" not in line
    link = tmp_path / "link"                       # through a symlink to the export: resolved, refused too
    link.symlink_to(signed_export)
    one_line_error(invoke("build", "--export-dir", signed_export, "--engines", link / "engines"), "lies inside",
                   "an export")
    assert tree_digest(signed_export) == before
    ok = invoke("run", photo_path, "Hi?", "--export-dir", signed_export, "--max-new-tokens", 1,
                "--require-signature", keys["public"])
    assert ok.exit_code == 0, ok.stderr          # still verifies: nothing was added


def test_no_writer_puts_an_artefact_inside_another(good_export, tmp_path):  # noqa: F811
    engines = fake_engines(tmp_path / "engines")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / REPOSITORY_MARKER).write_text(json.dumps({"format_version": 1}))
    for parent, kind in ((good_export, "an export"), (engines, "an engines directory"),
                         (repo, "a Triton model repository")):
        with pytest.raises(HimapError, match=f"--out .* lies inside '{parent}', which is {kind}"):
            check_target(parent / "a" / "b", marker=MANIFEST_NAME, flag="--out")
    check_outside_artefacts(tmp_path / "beside", "--out")            # beside them: fine
    # through the commands: export and triton repo
    one_line_error(invoke("export", "--model", "tiny", "--method", "none", "--no-validate", "--out",
                          engines / "export"), "--out", "lies inside", "an engines directory")
    one_line_error(invoke("triton", "repo", "--export-dir", good_export, "--out", good_export / "repo"),
                   "--out", "lies inside", "an export")
    assert not (good_export / "repo").exists() and not (engines / "export").exists()


def test_an_engines_directory_given_as_the_export_says_so(tmp_path, photo_path):
    engines = fake_engines(tmp_path / "engines")
    for command in (["build", "--export-dir", engines, "--engines", tmp_path / "e2"],
                    ["run", photo_path, "Hi?", "--export-dir", engines]):
        line = one_line_error(invoke(*command), f"--export-dir {str(engines)!r} is an engines directory, not an export")
        assert "re-export" not in line and "format version" not in line
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / REPOSITORY_MARKER).write_text(json.dumps({"format_version": 1}))
    one_line_error(invoke("check", "--export-dir", repo, "--tensorrt-compat"),
                   f"--export-dir {str(repo)!r} is a Triton model repository, not an export")


def test_a_curve_model_signing_cannot_use_is_refused_before_loading(good_export, tmp_path, photo_path):  # noqa: F811
    pytest.importorskip("model_signing")
    k1 = ec.generate_private_key(ec.SECP256K1())
    private, public = write_key(tmp_path / "k1.pem", k1), write_key(tmp_path / "k1.pub.pem", k1, private=False)
    out = tmp_path / "never"
    line = one_line_error(invoke("export", "--model", "tiny", "--no-validate", "--out", out, "--sign", private),
                          f"--sign {str(private)!r} is a key model-signing cannot use", "secp256k1", "P-256")
    assert "loading" not in line and not out.exists()
    one_line_error(invoke("build", "--export-dir", good_export, "--engines", out, "--sign", private),
                   "--sign", "model-signing cannot use", "secp256k1")
    for command in (["run", photo_path, "Hi?", "--export-dir", good_export],
                    ["serve", "--export-dir", good_export, "--port", 1]):
        one_line_error(invoke(*command, "--require-signature", public), "--require-signature",
                       "model-signing cannot use", "secp256k1")
    assert not out.exists()


def test_model_sig_is_read_with_a_bound(signed_export, keys, tmp_path, photo_path):
    from himap_trt import signing

    signature = signed_export / signing.SIGNATURE_NAME
    assert signature.stat().st_size < 16 * 2**20 // 1000                  # the real one: far below the bound
    signature.unlink()
    with open(signature, "wb") as handle:                                  # 300 MB, sparse: no disk used
        handle.truncate(300 * 2**20)
    one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", signed_export, "--require-signature",
                          keys["public"]), "model.sig is larger than 16 MiB")
    signature.unlink()
    os.mkfifo(signature)                                                   # would block a plain read forever
    one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", signed_export, "--require-signature",
                          keys["public"]), "model.sig is not a regular file")
    assert signing.MAX_SIGNATURE_BYTES == 16 * 2**20


def test_requests_without_an_image_are_conversations_and_refusals_speak_of_images_and_videos():
    """Issue 33 case 6, after issue 30: a request without an image is a text-only conversation (no
    refusal to word), and the visual-input refusal names images and videos, not LLaVA-1.5 prompts."""
    from himap_trt.serve.app import ApiError, ChatCompletionRequest, conversation

    def parse(body, max_visuals=1):
        return conversation(ChatCompletionRequest.model_validate(body), max_visuals)

    assert parse({"model": "m", "messages": [{"role": "user", "content": "no image here"}]}).visual_parts == []
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    with pytest.raises(ApiError) as info:
        parse({"model": "m", "messages": [{"role": "system", "content": "x"},
                                          {"role": "user", "content": [image, video, {"type": "text", "text": "y"}]}]})
    text = info.value.message if hasattr(info.value, "message") else str(info.value)
    assert "LLaVA" not in text and "images and videos" in text and "at most 1" in text, text


def test_a_test_hook_set_prints_a_warning_line_and_the_pause_hook_is_gone(monkeypatch, good_export, tmp_path):  # noqa: F811
    import subprocess

    from test_hostile_inputs import HIMAP, PYTHON_ENV

    from himap_trt import fsutil
    from himap_trt.cli.app import TEST_HOOKS
    from himap_trt.runtime.engine import FAULT_ENV

    assert set(TEST_HOOKS) == {fsutil.KILL_ENV, fsutil.STOP_ENV, FAULT_ENV}
    monkeypatch.setenv(FAULT_ENV, "decode:3")
    monkeypatch.setenv("HIMAP_TRT_TEST_PAUSE_AT", "swap:before")
    result = invoke("flops", "--model", "tiny")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [
        "warning: HIMAP_TRT_TEST_FAULT='decode:3' is set: a test-only hook (faults are injected into the engine's "
        "backend calls); unset it outside tests",
        "warning: HIMAP_TRT_TEST_PAUSE_AT is set, but it is not one of himap-trt's test hooks "
        f"({', '.join(TEST_HOOKS)}); ignored"]
    monkeypatch.setenv(FAULT_ENV, "decode:0")         # malformed: no warning, the command's one-line error instead
    monkeypatch.delenv("HIMAP_TRT_TEST_PAUSE_AT")
    assert invoke("flops", "--model", "tiny").stderr == ""
    # the old unvalidated pause hook stopped a writer forever at the point it named; it does nothing now
    done = subprocess.run([*HIMAP, "triton", "repo", "--export-dir", str(good_export), "--out", str(tmp_path / "repo")],
                          env={**PYTHON_ENV, "HIMAP_TRT_PAUSE_AT": "swap:before"}, capture_output=True, timeout=300)
    assert done.returncode == 0 and b"paused" not in done.stderr, done.stderr[-2000:]
