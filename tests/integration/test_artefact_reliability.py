"""Artefacts under failure and attack (issue 24): chat templates that raise, manifest fields checked
against the model and the graphs, tampering refused by run / serve / build / the Triton model,
model-signing signatures, and crash consistency of `export`, `build` and `triton repo` killed (SIGKILL)
at the steps of their write sequences (the test-only hooks of himap_trt.fsutil).

CI runs a few kill points per command. The longer sweep (a real SIGKILL at every write point of
`export` and `triton repo`, plus random-time kills) is::

    HIMAP_TRT_CRASH_SWEEP=full .venv/bin/python -m pytest tests/integration/test_artefact_reliability.py -k sweep -s
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import exported
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from test_hostile_inputs import (
    HIMAP,
    PYTHON_ENV,
    assert_refused_everywhere,
    invoke,
    leftovers,
    one_line_error,
    rehash,
    rewrite_manifest,
    runnable_method,
    tree_digest,
)

FULL_SWEEP = os.environ.get("HIMAP_TRT_CRASH_SWEEP") == "full"


@pytest.fixture(scope="module")
def good_export(tmp_path_factory):
    out, _, _ = exported(tmp_path_factory, "tiny", "himap", k1=2, r1=0.5, k2=8, r2=0.75)
    return out


@pytest.fixture(scope="module")
def other_export(tmp_path_factory):
    out, _, _ = exported(tmp_path_factory, "tiny", "fastv", k=2, r=0.5)
    return out


@pytest.fixture
def export_copy(good_export, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(good_export, copy)
    return copy


def serve_load(export: Path, **kw):
    """What `serve` does once its port is open: load in a ServerState; returns (status, error)."""
    from himap_trt.serve.app import ServeConfig, ServerState

    state = ServerState(ServeConfig(export_dir=export, backend="onnxruntime", device="cpu", max_batch=1, **kw))
    state.load()
    state.close()
    return state.status, state.error


def triton_open(repository: Path):
    """What the Triton `himap` model's initialize does after parsing its config (no tritonserver)."""
    from himap_trt.triton.model import HimapModel

    model = HimapModel()
    args = {"model_repository": str(repository / "himap"), "model_version": "1", "model_instance_kind": "CPU",
            "model_instance_name": "himap_0"}
    model._open(args, {"max_batch": "1", "max_queue": "1", "export_dir": "export", "engines_dir": "engines"})
    model.finalize()


def write_repo(export: Path, out: Path):
    from himap_trt.triton.repository import RepositoryOptions, write_repository

    return write_repository(export, out, RepositoryOptions(max_batch=1))


# ---- 1. chat templates that raise ------------------------------------------------------------------------
TEMPLATES = {
    "sandbox escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "raise_exception": "{{ raise_exception('no questions today') }}",
    "syntax error": "{% for m in messages %}{{ m['role'] }",
    "drops the question": "USER: <image>\nWhat is this? ASSISTANT:",
}


def test_chat_template_that_raises_fails_the_load(export_copy, photo_path):
    for case, template in TEMPLATES.items():
        (export_copy / "processor" / "chat_template.jinja").write_text(template)
        rehash(export_copy)
        line = one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", export_copy, "--max-new-tokens", 1),
                              "chat_template.jinja")
        assert ("drops the question" in line) == (case == "drops the question"), (case, line)
        if case == "sandbox escape":
            assert "SecurityError" in line and "unsafe" in line, line
        status, error = serve_load(export_copy)      # serve: the load fails, the server never reports ready
        assert status == "failed" and "chat_template.jinja" in error and "\n" not in error, (case, error)


def test_chat_template_failing_on_one_question_is_one_line(export_copy, photo_path):
    template = (export_copy / "processor" / "chat_template.jinja").read_text()
    (export_copy / "processor" / "chat_template.jinja").write_text(
        "{% if 'forbidden' in messages[0]['content'][1]['text'] %}{{ raise_exception('refused') }}{% endif %}"
        + template)
    rehash(export_copy)
    one_line_error(invoke("run", photo_path, "Is this forbidden?", "--export-dir", export_copy),
                   "chat template failed", "refused")
    result = invoke("run", photo_path, "Is this fine?", "--export-dir", export_copy, "--max-new-tokens", 1, "--json")
    assert result.exit_code == 0, result.stderr


# ---- 2. manifest fields checked against the model and the graphs -----------------------------------------
def test_manifest_fields_are_checked_against_model_and_graphs(export_copy, good_export, photo_path):
    import onnx

    positions = json.loads((export_copy / "manifest.json").read_text())["dims"]["max_position_embeddings"]
    pristine = (export_copy / "manifest.json").read_text()

    def hidden(data, size):
        data["dims"]["hidden_size"] = size

    def consistent_lie(data):  # dims and every graph entry edited together: only the files disagree
        old = data["dims"]["hidden_size"]
        data["dims"]["hidden_size"] = old * 2
        for graph in data["graphs"]:
            for tensor in graph["inputs"] + graph["outputs"]:
                tensor["shape"] = [old * 2 if d == old else d for d in tensor["shape"]]

    cases = [
        (lambda d: d.__setitem__("max_seq_len", positions + 1), ["field 'max_seq_len'", str(positions + 1),
                                                                 "max_position_embeddings"]),
        (lambda d: d.__setitem__("max_seq_len", 10), ["field 'max_seq_len'"]),
        (lambda d: hidden(d, 48), ["field 'graphs[", "'dims' and 'plan' make"]),
        (lambda d: d["dims"].__setitem__("num_layers", 6), ["fields 'plan' and 'dims' disagree"]),
        (lambda d: d["graphs"][3]["attrs"].__setitem__("keep", 100), ["field 'graphs[3].attrs'"]),
        (lambda d: d["graphs"].pop(), ["field 'graphs' lists"]),
        (consistent_lie, ["the file and the manifest disagree"]),
    ]
    for change, fragments in cases:
        (export_copy / "manifest.json").write_text(pristine)
        rewrite_manifest(export_copy, change)
        line = one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", export_copy), *fragments)
        assert "manifest.json" in line or ".onnx" in line, line
    # the last case names the graph file whose inputs disagree
    assert ".onnx" in line and "hidden" not in line
    (export_copy / "manifest.json").write_text(pristine)
    assert tree_digest(export_copy) == tree_digest(good_export)
    assert onnx.load(str(export_copy / "embed.onnx"), load_external_data=False).graph.output[0].name == "inputs_embeds"


# ---- 3. tampering at load time: run, serve, build, triton repo and the Triton model ---------------------
def external_weights_export(export: Path) -> None:
    """Move segment_1.onnx's weights into a recorded external-data file ``segment_1.weights``."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.load(str(export / "segment_1.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="segment_1.weights",
                                   size_threshold=4096)   # weights out, small shape constants in
    onnx.save_model(model, str(export / "segment_1.onnx"))
    rehash(export)


def flip_byte(path: Path, at: int = -7) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def test_tampered_graph_weights_and_manifest_refused_everywhere(export_copy, tmp_path, photo_path):
    from himap_trt.errors import HimapError

    external_weights_export(export_copy)
    assert runnable_method(export_copy, photo_path) == "himap"
    repo = tmp_path / "repo"
    write_repo(export_copy, repo)
    triton_open(repo)   # the untouched repository loads
    pristine = {p: p.read_bytes() for p in export_copy.rglob("*") if p.is_file()}

    def point_elsewhere(export):   # manifest edited so scoring_1's entry names another recorded graph
        rewrite_manifest(export, lambda d: d["graphs"][5].__setitem__("file", "scoring_0.onnx"))

    cases = [
        ("graph byte", lambda e: flip_byte(e / "segment_2.onnx"), ["'segment_2.onnx'", "sha256"]),
        ("weights byte", lambda e: flip_byte(e / "segment_1.weights", 100), ["'segment_1.weights'", "sha256"]),
        ("manifest points elsewhere", point_elsewhere, ["'scoring_0.onnx'", "the file and the manifest disagree"]),
    ]
    for name, tamper, fragments in cases:
        for path, data in pristine.items():
            path.write_bytes(data)
        tamper(export_copy)
        assert_refused_everywhere(export_copy, photo_path, *fragments)         # run, check, build --dry-run, build
        status, error = serve_load(export_copy)
        assert status == "failed" and all(f in error for f in fragments), (name, error)
        one_line_error(invoke("triton", "repo", "--export-dir", export_copy, "--out", tmp_path / "repo2"), *fragments)
        # the same tampering inside a written repository (a copy: the repository hard-links the export)
        shutil.rmtree(tmp_path / "repo-copy", ignore_errors=True)
        shutil.copytree(repo, tmp_path / "repo-copy")
        shutil.rmtree(tmp_path / "repo-copy" / "himap" / "1" / "export")
        shutil.copytree(export_copy, tmp_path / "repo-copy" / "himap" / "1" / "export")
        with pytest.raises(HimapError) as info:
            triton_open(tmp_path / "repo-copy")
        assert all(f in str(info.value) for f in fragments) and "\n" not in str(info.value), (name, info.value)


# ---- 4. signatures (OpenSSF model-signing) ---------------------------------------------------------------
def write_key(path: Path, key, private: bool = True, password: bytes | None = None) -> Path:
    if private:
        encryption = (serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    else:
        data = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    pytest.importorskip("model_signing", reason="model-signing is not installed (make install installs "
                                                "the 'sign' extra)")
    folder = tmp_path_factory.mktemp("keys")
    ours, theirs = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    return {
        "private": write_key(folder / "key.pem", ours), "public": write_key(folder / "pub.pem", ours, private=False),
        "other_public": write_key(folder / "other.pub.pem", theirs, private=False),
        "encrypted": write_key(folder / "encrypted.pem", ours, password=b"secret"),
        "rsa": write_key(folder / "rsa.pem", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "garbage": folder / "garbage.pem",
    }


def test_signed_export_verifies_and_a_rehashed_manifest_is_refused(export_copy, keys, tmp_path, photo_path):
    from himap_trt.signing import SIGNATURE_NAME, sign_directory

    sign_directory(export_copy, keys["private"])
    assert (export_copy / SIGNATURE_NAME).is_file()
    ok = invoke("run", photo_path, "Hi?", "--export-dir", export_copy, "--max-new-tokens", 1, "--json",
                "--require-signature", keys["public"])
    assert ok.exit_code == 0, ok.stderr
    one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", export_copy, "--require-signature",
                          keys["other_public"]), "fails --require-signature", "Key mismatch")
    assert serve_load(export_copy, require_signature=keys["other_public"])[0] == "failed"
    # an attacker edits a processor file and records its new digest in the manifest: the hash checks pass
    tokenizer = export_copy / "processor" / "tokenizer_config.json"
    tokenizer.write_text(tokenizer.read_text().replace('"model_max_length"', '"model_max_length_"'))
    rehash(export_copy)
    assert invoke("run", photo_path, "Hi?", "--export-dir", export_copy, "--max-new-tokens", 1).exit_code == 0
    for command in (["run", photo_path, "Hi?", "--export-dir", export_copy],
                    ["serve", "--export-dir", export_copy, "--port", 1]):
        one_line_error(invoke(*command, "--require-signature", keys["public"]), str(export_copy),
                       "'manifest.json'", "'processor/tokenizer_config.json'", "changed since it was signed")
    status, error = serve_load(export_copy, require_signature=keys["public"])
    assert status == "failed" and "changed since it was signed" in error
    # an added file, and a removed signature
    (export_copy / "model.sig").rename(tmp_path / "model.sig")
    one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", export_copy, "--require-signature",
                          keys["public"]), "is not signed", "model.sig")
    # a signed engines directory, tampered: refused before TensorRT is looked for
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "manifest.json").write_text("{}")
    (engines / "vision.engine").write_bytes(b"engine bytes")
    sign_directory(engines, keys["private"])
    rehash(export_copy)                       # the manifest as signed again below (no model.sig recorded)
    sign_directory(export_copy, keys["private"])
    (engines / "vision.engine").write_bytes(b"engine byteZ")
    one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", export_copy, "--backend", "tensorrt",
                          "--engines", engines, "--require-signature", keys["public"]),
                   "--engines", "'vision.engine' changed since it was signed")


def test_signing_flags_refuse_bad_keys_before_any_work(keys, good_export, tmp_path, photo_path):
    keys["garbage"].write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    out = tmp_path / "never"
    cases = [(keys["garbage"], "is not a private key in PEM"), (keys["public"], "is not a private key in PEM"),
             (keys["encrypted"], "encrypted private key"), (keys["rsa"], "elliptic-curve"),
             (tmp_path / "missing.pem", "does not exist"), (tmp_path, "is a directory")]
    for key, fragment in cases:
        line = one_line_error(invoke("export", "--model", "tiny", "--no-validate", "--out", out, "--sign", key),
                              "--sign", fragment)
        assert "loading" not in line
        one_line_error(invoke("build", "--export-dir", good_export, "--engines", out, "--sign", key), "--sign", fragment)
    assert not out.exists()
    public_cases = [(keys["private"], "is not a public key in PEM"), (keys["garbage"], "is not a public key"),
                    (tmp_path / "missing.pem", "does not exist")]
    for key, fragment in public_cases:
        for command in (["run", photo_path, "Hi?", "--export-dir", good_export],
                        ["serve", "--export-dir", good_export, "--port", 1]):
            one_line_error(invoke(*command, "--require-signature", key), "--require-signature", fragment)
    one_line_error(invoke("run", photo_path, "Hi?", "--backend", "torch", "--model", "tiny", "--require-signature",
                          keys["public"]), "does not apply to --model")
    one_line_error(invoke("run", photo_path, "Hi?", "--export-dir", good_export, "--require-signature",
                          keys["public"]), "is not signed")


# ---- 5. crash consistency: SIGKILL at the steps of each write sequence -----------------------------------
def test_test_hooks_refuse_bad_values(tmp_path, monkeypatch, good_export):
    from himap_trt.fsutil import KILL_ENV, STOP_ENV

    for name, value in ((KILL_ENV, "0"), (KILL_ENV, "-1"), (KILL_ENV, "x"), (KILL_ENV, ""), (STOP_ENV, "yes")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            one_line_error(invoke("triton", "repo", "--export-dir", good_export, "--out", tmp_path / "repo"), name,
                           "test-only")
    assert not (tmp_path / "repo").exists()


def test_every_file_and_directory_is_fsynced_before_the_swap(tmp_path, monkeypatch):
    """fsync of each file and directory of the new tree precedes the rename that publishes it, and the
    parent directory is fsynced after it (a power loss cannot publish unwritten files)."""
    from himap_trt import fsutil

    events = []
    real_fsync, real_rename, real_exchange = os.fsync, Path.rename, fsutil.exchange

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(self, target):
        events.append(("rename", str(target)))
        return real_rename(self, target)

    def exchange(a, b):
        events.append(("rename", str(b)))
        return real_exchange(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(fsutil, "exchange", exchange)
    target = tmp_path / "out"
    for round_ in range(2):   # a new target (rename), then a replaced one (exchange)
        events.clear()
        with fsutil.atomic_directory(target, marker="manifest.json", flag="--out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "manifest.json").write_text("{}")
            (tmp / "sub" / "graph.onnx").write_bytes(b"x" * 100)
            partial = str(tmp)
        swap = events.index(("rename", str(target)))
        synced_before = {path for kind, path in events[:swap] if kind == "fsync"}
        assert {partial, f"{partial}/sub", f"{partial}/manifest.json", f"{partial}/sub/graph.onnx"} <= synced_before
        assert ("fsync", str(tmp_path)) in events[swap:], (round_, events)


class Writer:
    """A writing subprocess with the test hooks: stops (SIGSTOP) at every write point, or dies at one."""

    def __init__(self, args, *, stop: bool = False, kill_after: int | None = None):
        env = dict(PYTHON_ENV)
        if stop:
            env["HIMAP_TRT_TEST_STOP_AT_POINTS"] = "1"
        if kill_after is not None:
            env["HIMAP_TRT_TEST_KILL_AFTER"] = str(kill_after)
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.stop = stop
        self.points: list[str] = []
        self.tail = b""

    def next_point(self, timeout: float = 300) -> str | None:
        """Wait for the next write point (the process is then stopped); None once the process ended."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                self.proc.wait()
                return None
            self.tail = (self.tail + line)[-4000:]
            if line.startswith(b"write point "):
                name = line.decode().split(": ", 1)[1].strip()
                self.points.append(name)
                if self.stop:
                    self._wait_stopped()
                return name
        pytest.fail(f"no write point within {timeout} s: {self.tail.decode(errors='replace')}")

    def _wait_stopped(self) -> None:
        for _ in range(2000):
            try:
                state = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                return
            if state in ("T", "t", "Z", "X"):
                return
            time.sleep(0.005)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 300) -> int:
        try:
            self.proc.stderr.read()
        finally:
            code = self.proc.wait(timeout)
            self.proc.stderr.close()
        return code


def swapped(points: list[str]) -> bool:
    """Whether the new directory has been swapped in at the last point passed."""
    return any(p in ("swap:exchanged", "swap:done") for p in points)


def stop_at_every_point(args, target: Path, before: str, check_new, *, kill_at: str | None = None,
                        busy_command=None) -> list[str]:
    """Run a writer stopped at each write point: there the target must be byte-identical to ``before``
    (until the swap) or a complete new artefact (``check_new``, after it). Resumes it, or SIGKILLs it at
    the first point named ``kill_at``. Returns the points passed."""
    writer = Writer(args, stop=True)
    try:
        while (point := writer.next_point()) is not None:
            if not swapped(writer.points):
                assert target.exists() and tree_digest(target) == before, (point, writer.points)
            else:
                check_new(target)
            if busy_command is not None and len(writer.points) == 1:
                one_line_error(invoke(*busy_command), "being written by another", f"pid {writer.proc.pid}")
            if point == kill_at:
                writer.kill()
                return writer.points
            writer.resume()
        assert writer.proc.returncode == 0, writer.tail.decode(errors="replace")
    finally:
        if writer.proc.poll() is None:
            writer.kill()
    return writer.points


def kill_at(args, n: int, *, expect_kill: bool = True) -> list[str]:
    """Run a writer that SIGKILLs itself at its n-th write point; returns the points it announced."""
    writer = Writer(args, kill_after=n)
    while writer.next_point() is not None:
        pass
    writer.proc.stderr.close()
    expected = -signal.SIGKILL if expect_kill else 0
    assert writer.proc.returncode == expected, (n, writer.proc.returncode, writer.tail.decode(errors="replace"))
    return writer.points


def complete_run(args) -> tuple[list[str], float]:
    """Run a writer to its end (announcing its points); returns them and the seconds from its first
    point to its last (the window random-time kills are drawn from; the interpreter's exit after it
    writes nothing)."""
    writer = Writer(args, kill_after=10**6)
    assert writer.next_point() is not None, writer.tail.decode(errors="replace")
    started = last = time.perf_counter()
    while writer.next_point() is not None:
        last = time.perf_counter()
    writer.proc.stderr.close()
    assert writer.proc.returncode == 0, writer.tail.decode(errors="replace")
    return writer.points, last - started


def kill_at_random_time(args, rng: random.Random, window_s: float) -> tuple[float, list[str]]:
    """SIGKILL a writer a random time (uniform in [0, window_s]) after its first write point; returns
    the delay and the write points it had announced by then (the last one tells whether the kill
    landed inside the write sequence: before ``swap:done``)."""
    writer = Writer(args, stop=False, kill_after=10**6)   # announces points, never kills itself
    first = writer.next_point()
    assert first is not None, writer.tail.decode(errors="replace")
    delay = rng.uniform(0, window_s)
    time.sleep(delay)
    writer.kill()
    rest = writer.proc.stderr.read()
    writer.proc.stderr.close()
    writer.points += [line.split(": ", 1)[1].strip() for line in rest.decode(errors="replace").splitlines()
                      if line.startswith("write point ")]
    return delay, writer.points


def export_args(target: Path, key: Path) -> list[str]:
    return [*HIMAP, "export", "--model", "tiny", "--method", "none", "--no-validate", "--sign", str(key),
            "--out", str(target)]


def test_export_sweep_killed_at_write_points(good_export, keys, tmp_path, photo_path):
    """The previous export (HiMAP), then `export --method none --sign` killed at its first graph, then one
    stopped at every write point (checked there) and killed right after the swap; the target is always
    the previous export byte for byte or the complete, signed new one."""
    from himap_trt.arch import get_architecture
    from himap_trt.manifest import load_manifest
    from himap_trt.signing import verify_directory

    target = tmp_path / "export"
    shutil.copytree(good_export, target)
    before = tree_digest(target)
    args = export_args(target, keys["private"])

    def check_new(directory):
        assert load_manifest(directory, families=get_architecture).plan.method == "none"          # hash-checked
        verify_directory(directory, keys["public"], what="--out")       # every file, signed

    # a real SIGKILL after the first graph: the old export stays, a partial directory is left behind
    assert kill_at(args, 1) == ["export:graph"]
    assert tree_digest(target) == before and [p for p in leftovers(tmp_path) if ".partial-" in p]
    # the next run cleans up, and at every step the target is the old export; killed after the exchange
    points = stop_at_every_point(args, target, before, check_new, kill_at="swap:exchanged",
                                 busy_command=["export", "--model", "tiny", "--out", target])
    assert points[0] == "export:graph" and points[-2:] == ["swap:before", "swap:exchanged"]
    assert {"export:processor", "export:manifest", "export:signature"} <= set(points)
    check_new(target)
    assert runnable_method(target, photo_path) == "none"
    ok = invoke("run", photo_path, "Hi?", "--export-dir", target, "--max-new-tokens", 1, "--require-signature",
                keys["public"])
    assert ok.exit_code == 0, ok.stderr
    new = tree_digest(target)
    if FULL_SWEEP:   # a real SIGKILL at every point, each run after a kill; then random-time kills
        rng = random.Random(24)
        shutil.rmtree(target)
        shutil.copytree(good_export, target)
        points, window = complete_run(args)
        print(f"export: {len(points)} write points, {window:.2f} s from the first to the exit: {points}")
        for n in [*range(1, len(points) + 1), None, None, None, None]:
            shutil.rmtree(target)
            shutil.copytree(good_export, target)
            if n is None:
                delay, passed = kill_at_random_time(args, rng, window)
                what = f"{delay:.2f} s after its first write point ({passed[-1]})"
            else:
                passed = kill_at(args, n)
                what = f"at point {n} ({passed[-1]})"
                assert (tree_digest(target) == before) != swapped(passed), (n, passed)
            if tree_digest(target) != before:   # the new export (its ECDSA signature differs run to run)
                check_new(target)
            print(f"export killed {what}{f' (of {window:.2f} s)' if n is None else ''}: target "
                  f"{'new' if tree_digest(target) != before else 'previous'}, intact")
        # the next run after the last kill succeeds
        assert complete_run(args)[0] == points and runnable_method(target, photo_path) == "none"
        new = tree_digest(target)
    # the next writer removes what the kill left
    from himap_trt.fsutil import atomic_directory

    with pytest.raises(RuntimeError), atomic_directory(target, marker="manifest.json", flag="--out"):
        raise RuntimeError("stop")
    assert leftovers(tmp_path) == [] and tree_digest(target) == new


def test_triton_repo_sweep_killed_at_write_points(good_export, other_export, tmp_path):
    from himap_trt.arch import get_architecture
    from himap_trt.manifest import load_manifest
    from himap_trt.triton.repository import REPOSITORY_MARKER

    target = tmp_path / "repo"
    write_repo(good_export, target)
    before = tree_digest(target)
    args = [*HIMAP, "triton", "repo", "--export-dir", str(other_export), "--out", str(target), "--max-batch", "1"]

    def check_new(directory):
        info = json.loads((directory / REPOSITORY_MARKER).read_text())
        assert info["plan"].startswith("FastV") or "fastv" in info["plan"].lower(), info["plan"]
        assert load_manifest(directory / "himap" / "1" / "export", families=get_architecture).plan.method == "fastv"

    rng = random.Random(24)
    points = stop_at_every_point(args, target, before, check_new, busy_command=[
        "triton", "repo", "--export-dir", other_export, "--out", target])
    files = points.count("triton:file")
    assert files == sum(1 for p in other_export.rglob("*") if p.is_file()) and points[-3:] == [
        "swap:before", "swap:exchanged", "swap:done"]
    new = tree_digest(target)
    triton_open(target)      # loads (ONNX Runtime sessions), hash-checked, in the Triton model's code path
    write_repo(good_export, target)
    assert tree_digest(target) == before
    # CI: one real SIGKILL at a random file (the export's swap points are killed in the export test)
    chosen = list(range(1, len(points) + 1)) if FULL_SWEEP else [rng.randrange(1, files + 1)]
    for n in chosen:   # real SIGKILLs; the previous repository (or, after the exchange, the new one) remains
        passed = kill_at(args, n)
        assert tree_digest(target) == (new if swapped(passed) else before), (n, passed)
        if swapped(passed):
            write_repo(good_export, target)    # the next run succeeds and cleans up
        print(f"triton repo killed at point {n} ({passed[-1]}): target "
              f"{'new' if swapped(passed) else 'previous'}, intact")
    # random-time kills within the write window (first to last write point of a complete run, measured
    # here): CI needs one that lands inside it (before swap:done), drawing again (at most 6 times) when
    # one lands after the process finished writing
    window = complete_run(args)[1]
    inside = 0
    for attempt in range(12 if FULL_SWEEP else 6):
        write_repo(good_export, target)
        delay, passed = kill_at_random_time(args, rng, window)
        state = {before: "previous", new: "new"}.get(tree_digest(target))
        assert state, delay
        assert state == "new" or not swapped(passed), (delay, passed)   # an announced exchange happened
        inside += passed[-1] != "swap:done"
        print(f"triton repo killed {delay:.2f} s after its first write point (of {window:.2f} s), after "
              f"{len(passed)} points ({passed[-1]}): target {state}, intact")
        if inside >= (4 if FULL_SWEEP else 1):
            break
    assert inside >= 1, "no random-time kill landed inside the write window"
    write_repo(good_export, target)
    assert tree_digest(target) == before and leftovers(tmp_path) == []


def _build_target_flags() -> list[str]:
    """`himap-trt build` flags for this machine: with a GPU, the installed flavour builds for it (and
    `run --backend tensorrt` can use the engines); without one, TensorRT-RTX (installed by `make
    install`) builds ahead of time for SM86, which needs no GPU."""
    from himap_trt.engines.environment import has_gpu

    if has_gpu():
        return ["--compute-capability", "current"]
    return ["--tensorrt", "rtx", "--compute-capability", "8.6"]


def _build_skip_reason() -> str | None:
    from himap_trt.engines.build import resolve_target
    from himap_trt.errors import HimapError

    flags = _build_target_flags()
    try:
        resolve_target(flags[1] if flags[0] == "--tensorrt" else "auto", flags[-1])
    except HimapError as exc:
        return f"`himap-trt build` cannot build here ({exc}); `make install` installs TensorRT-RTX"
    return None


def test_build_sweep_killed_at_write_points(good_export, tmp_path, photo_path):
    reason = _build_skip_reason()
    if reason:
        pytest.skip(reason)
    from himap_trt.engines.environment import has_gpu
    from himap_trt.engines.flavour import rtx_header_capabilities
    from himap_trt.engines.manifest import read_engines_manifest, verify_engine_files

    export = tmp_path / "export"
    shutil.copytree(good_export, export)
    target = tmp_path / "engines"
    flags = [*_build_target_flags(), "--max-seq-len", "256"]      # small profiles: quick builds
    args = [*HIMAP, "build", "--export-dir", str(export), "--engines", str(target), *flags, "--max-batch", "1"]
    first_build = subprocess.run(args, env=PYTHON_ENV, capture_output=True, check=False)
    assert first_build.returncode == 0, first_build.stderr.decode(errors="replace")
    first = tree_digest(target)

    def check_new(directory):
        verify_engine_files(directory, read_engines_manifest(directory))

    args[-1] = "2"     # a rebuild with another profile: a different engines directory
    points = stop_at_every_point(args, target, first, check_new, kill_at="swap:exchanged",
                                 busy_command=["build", "--export-dir", export, "--engines", target, *flags])
    assert points.count("build:engine") == len(list(export.glob("*.onnx")))
    check_new(target)
    assert read_engines_manifest(target).max_batch == 2
    assert kill_at(args, 1) == ["build:engine"] and read_engines_manifest(target).max_batch == 2
    engines = read_engines_manifest(target)
    if not has_gpu():
        # the engines are real TensorRT-RTX engines for the requested target (their header, read
        # independently of the builder), and no GPU is here to run them
        assert engines.tensorrt_flavour == "rtx" and tuple(engines.compute_capabilities) == ("8.6",)
        for entry in engines.engines:
            assert rtx_header_capabilities((target / entry.file).read_bytes()) == ("8.6",), entry.file
        return
    result = invoke("run", photo_path, "Hi?", "--export-dir", export, "--engines", target, "--backend", "tensorrt",
                    "--max-new-tokens", 1)
    assert result.exit_code == 0, result.stderr
