"""`himap-trt triton`: the repository for a tiny export in the real tritonserver (the nvidia-pytriton
wheel's), on loopback ports, through tritonclient over gRPC (streaming) and HTTP.

Answers are compared with `himap-trt run --json` and with the pipeline run in this process (the
code path `run` takes), token for token. One server serves the module; it is always stopped.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import exported
from himap_trt.cli import app
from himap_trt.errors import HimapError
from himap_trt.triton import environment
from himap_trt.triton.protocol import Answer, make_inputs, parse_request
from himap_trt.triton.repository import REPOSITORY_MARKER, RepositoryOptions, write_repository

runner = CliRunner()
QUESTIONS = ["What is the woman wearing?", "Describe the photo.", "Who?", "What colour is the background, and why?"]


def _triton_missing() -> str | None:
    try:
        environment.find_triton()
    except HimapError as exc:
        return str(exc)
    try:
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except ImportError as exc:
        return f"tritonclient[http,grpc] is not installed: {exc}"
    return None


MISSING = _triton_missing()
needs_triton = pytest.mark.skipif(MISSING is not None, reason=f"needs the bundled tritonserver: {MISSING}")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    # the same key as the other integration tests: one export per session
    return exported(tmp_path_factory, "tiny", "himap", k1=2, r1=0.5, k2=8, r2=0.75)[0]


@pytest.fixture(scope="module")
def repository(tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "model_repository"
    write_repository(tiny_export, out, RepositoryOptions(max_batch=8, default_max_tokens=8))
    return out


@contextlib.contextmanager
def serving(repository, tmp_path_factory):
    """A tritonserver on loopback ports serving ``repository`` (KIND_CPU), stopped on leaving; it must stop
    cleanly, no stub crashed."""
    from himap_trt.triton.server import TritonServer, free_port

    log_path = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    with open(log_path, "w") as log:
        server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                              model_config_name="cpu", log=log)
        server.start()
        try:
            server.wait_ready(240)
        except HimapError:
            log.flush()
            server.stop()
            pytest.fail(f"tritonserver did not become ready:\n{log_path.read_text()[-4000:]}")
        try:
            yield server
        finally:
            code = server.stop()
    assert code == 0, log_path.read_text()[-4000:]
    assert "terminate called" not in log_path.read_text(), "a stub crashed"


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    with serving(repository, tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="module")
def image_bytes(photo_path) -> bytes:
    return Path(photo_path).read_bytes()


@pytest.fixture(scope="module")
def local_pipeline(tiny_export):
    """The pipeline `himap-trt run` opens, in this process (for solo reference answers)."""
    from himap_trt.runtime.loader import open_pipeline

    opened = open_pipeline(export_dir=tiny_export, backend="onnxruntime", device="cpu")
    yield opened.pipeline
    opened.pipeline.close()


def solo(pipeline, photo, question: str, max_tokens: int):
    from himap_trt.runtime.sampling import GenerationConfig

    result = pipeline.generate(pipeline.prepare([photo], [question]), GenerationConfig(max_new_tokens=max_tokens))
    return result.texts[0], result.tokens[0], [s.kept_image_positions[0] for s in result.stages]


def stream(url: str, requests: list[dict], model: str = "himap") -> tuple[dict[str, Answer], list]:
    """Send every request on one gRPC stream at once; collect each one's responses until its final one."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    answers: dict[str, Answer] = {}
    errors = []
    try:
        for i, kwargs in enumerate(requests):
            client.async_stream_infer(model, make_inputs(grpcclient, **kwargs), request_id=str(i),
                                      enable_empty_final_response=True)
        finished = 0
        while finished < len(requests):     # each request ends with a final response or an error
            result, error = events.get(timeout=120)
            if error is not None:
                errors.append(error)
                finished += 1
                continue
            response = result.get_response()
            answers.setdefault(response.id, Answer()).add(result.as_numpy)
            finished += response.parameters["triton_final_response"].bool_param
    finally:
        client.stop_stream()
        client.close()
    return answers, errors


def metric(server, name: str, model: str = "himap", label: str = "") -> float:
    """Sum of a metric's samples for ``model`` (and whose labels contain ``label``) on /metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf'{name}\{{([^}}]*)\}} (\S+)$', line)
        if match and f'model="{model}"' in match.group(1) and label in match.group(1):
            total += float(match.group(2))
    return total


# ---- without a server ---------------------------------------------------------------------------
def test_repository_layout_is_relocatable(repository, tiny_export, tmp_path):
    model = repository / "himap"
    assert (model / "config.pbtxt").read_text() == (model / "configs" / "cpu.pbtxt").read_text()
    assert "KIND_GPU" in (model / "configs" / "gpu.pbtxt").read_text()
    assert "decoupled: true" in (model / "config.pbtxt").read_text()
    assert "decoupled" not in (repository / "himap_unary" / "config.pbtxt").read_text()
    copied = model / "1" / "export"
    for path in tiny_export.rglob("*"):
        if path.is_file():
            assert (copied / path.relative_to(tiny_export)).read_bytes() == path.read_bytes()
    info = json.loads((repository / REPOSITORY_MARKER).read_text())
    assert info["models"] == ["himap", "himap_unary"] and info["options"]["max_batch"] == 8
    # nothing in the repository refers to where it was written
    for path in repository.rglob("*"):
        if path.is_file() and path.suffix in (".pbtxt", ".py", ".json"):
            assert str(repository) not in path.read_text() and str(tiny_export) not in path.read_text()


def test_repo_command_errors(tiny_export, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [
        (["--export-dir", tmp_path / "nope", "--out", tmp_path / "r1"], "--export-dir"),
        (["--export-dir", tiny_export, "--out", foreign], "--out"),
        (["--export-dir", tiny_export, "--out", tmp_path / "r2", "--max-batch", 0], "--max-batch"),
        (["--export-dir", tiny_export, "--out", tmp_path / "r3", "--model-config-name", "tpu"], "--model-config-name"),
        (["--export-dir", tiny_export, "--out", tmp_path / "r4", "--engines", tmp_path / "none"], "--engines"),
    ]
    for args, flag in cases:
        result = runner.invoke(app, ["triton", "repo", *map(str, args)])
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], result.stderr
    assert (foreign / "notes.txt").read_text() == "mine"


def test_parse_request_names_the_bad_input(image_bytes, tmp_path):
    def getter(**values):
        return lambda name: None if values.get(name) is None else np.array([values[name]])

    good = parse_request(getter(image=image_bytes, question=b"What?"), 8)
    assert good.config.max_new_tokens == 8 and good.image.size == (512, 600)
    from himap_trt.video import Video, moving_shapes_clip   # a video in the same input (Qwen exports)

    clip = moving_shapes_clip(tmp_path / "clip.mp4", frames=8, fps=4).read_bytes()
    video = parse_request(getter(image=clip, question=b"What moves?"), 8).image
    assert isinstance(video, Video) and len(video.frames) == 4
    cases = [
        (dict(question=b"What?"), "inputs 'image' and 'question' are missing"),
        (dict(messages=b"[{\"role\": \"assistant\", \"content\": \"x\"}]"),
         "input 'messages': messages[0].role: an assistant message before any user message"),
        (dict(messages=b'[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/x"}}]}]'),
         "image_url.url: expected a data: URL"),
        (dict(messages=b"[]", question=b"What?"), "either input 'messages' or inputs 'image' and 'question'"),
        (dict(image=b"not an image", question=b"What?"), "input 'image' is neither an image"),
        (dict(image=image_bytes[:200], question=b"What?"), "input 'image' is truncated"),
        (dict(image=image_bytes, question=b"  "), "input 'question' is empty"),
        (dict(image=image_bytes, question=b"\xff\xfe"), "input 'question' is not valid UTF-8"),
        (dict(image=image_bytes, question=b"What?", max_tokens=0), "input 'max_tokens'"),
        (dict(image=image_bytes, question=b"What?", temperature=-1.0), "input 'temperature'"),
        (dict(image=image_bytes, question=b"What?", top_p=0.0), "input 'top_p'"),
    ]
    for values, fragment in cases:
        with pytest.raises(HimapError, match=re.escape(fragment)):
            parse_request(getter(**values), 8)


def test_serve_names_what_is_missing(monkeypatch, tmp_path):
    import importlib.util

    if MISSING is None:
        with pytest.raises(HimapError, match=r"no Python backend stub for Python 3\.99 \(it ships .*3\.1"):
            environment.find_triton(python_version=(3, 99))
        monkeypatch.setenv(environment.STUB_NUMPY_ENV, str(tmp_path))
        with pytest.raises(HimapError, match="needs numpy<2"):
            environment.find_triton()
        monkeypatch.delenv(environment.STUB_NUMPY_ENV)
    monkeypatch.setattr(environment, "glibc_version", lambda: (2, 31))
    with pytest.raises(HimapError, match=r"needs glibc >= 2\.35; this system's C library is glibc 2\.31"):
        environment.find_triton()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else real(name, *a))
    result = runner.invoke(app, ["triton", "serve", "--repository", str(tmp_path)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nvidia-pytriton wheel is not installed" in lines[0]
    assert "pip install --no-deps nvidia-pytriton==0.7.0" in lines[0]


def _data_url(image_bytes: bytes) -> str:
    import base64

    return "data:image/jpeg;base64," + base64.b64encode(image_bytes).decode()


def _turns(image_bytes: bytes) -> list[dict]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image_bytes)}},
                                         {"type": "text", "text": "What is shown?"}]},
            {"role": "assistant", "content": "A person."}, {"role": "user", "content": "What colour is the uniform?"}]


def test_parse_request_takes_a_conversation(image_bytes):
    parsed = parse_request(lambda name: np.array([json.dumps(_turns(image_bytes)).encode()]) if name == "messages"
                           else None, 8)
    assert [m.role for m in parsed.conversation.messages] == ["system", "user", "assistant", "user"]
    assert len(parsed.visuals) == 1 and parsed.visuals[0].size == (512, 600)


# ---- against the real tritonserver --------------------------------------------------------------
@needs_triton
def test_conversation_equals_the_pipeline(server, local_pipeline, photo, image_bytes):
    """The conversation serve answers (tests/integration/test_serve.py: the same pipeline call)."""
    import tritonclient.http as httpclient

    from himap_trt.chat import parse_messages
    from himap_trt.runtime.sampling import GenerationConfig

    turns = _turns(image_bytes)
    expected = local_pipeline.generate(local_pipeline.prepare_conversation(parse_messages(turns), [photo]),
                                       GenerationConfig(max_new_tokens=8))
    answer = Answer()
    with httpclient.InferenceServerClient(server.http_url) as client:
        answer.add(client.infer("himap_unary", make_inputs(httpclient, None, None, messages=turns, max_tokens=8)).as_numpy)
    assert answer.token_ids == expected.tokens[0] and answer.text == expected.texts[0]
    assert answer.kept_image_positions == [s.kept_image_positions[0] for s in expected.stages]
@needs_triton
def test_grpc_stream_and_http_equal_run(server, tiny_export, photo_path, image_bytes):
    import tritonclient.http as httpclient

    question = QUESTIONS[0]
    result = runner.invoke(app, ["run", str(photo_path), question, "--export-dir", str(tiny_export), "--json",
                                 "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.stderr
    expected = json.loads(result.stdout)["requests"][0]

    answers, errors = stream(server.grpc_url, [dict(image=image_bytes, question=question, max_tokens=12)])
    assert not errors
    streamed = answers["0"]
    unary = Answer()
    with httpclient.InferenceServerClient(server.http_url) as client:
        unary.add(client.infer("himap_unary", make_inputs(httpclient, image_bytes, question, max_tokens=12)).as_numpy)
    for answer in (streamed, unary):
        assert answer.text == expected["answer"]
        assert answer.token_ids == expected["tokens"]
        assert answer.kept_image_tokens == expected["image_tokens_per_segment"] == [144, 72, 18]
        assert answer.kept_image_positions == expected["kept_image_positions"]
        assert answer.finish_reason == {"eos": "stop", "max_new_tokens": "length"}[expected["finish_reason"]]
    assert streamed.responses > 2          # streamed in pieces, not all at the end
    assert unary.responses == 1


@needs_triton
def test_16_concurrent_requests_and_metrics(server, local_pipeline, photo, image_bytes):
    names = ("nv_inference_request_success", "himap_requests_total", "himap_generation_tokens_total",
             "himap_model_steps_total")
    before = {name: metric(server, name, label='phase="decode"' if "steps" in name else "") for name in names}
    requests = [dict(image=image_bytes, question=f"{QUESTIONS[i % 4]} ({i})", max_tokens=4 + i % 5) for i in range(16)]
    answers, errors = stream(server.grpc_url, requests)
    assert not errors and len(answers) == 16
    tokens = 0
    for i, request in enumerate(requests):
        text, ids, kept = solo(local_pipeline, photo, request["question"], request["max_tokens"])
        assert (answers[str(i)].text, answers[str(i)].token_ids, answers[str(i)].kept_image_positions) == (text, ids, kept)
        tokens += len(ids)
    after = {name: metric(server, name, label='phase="decode"' if "steps" in name else "") for name in names}
    assert after["nv_inference_request_success"] - before["nv_inference_request_success"] == 16
    assert after["himap_requests_total"] - before["himap_requests_total"] == 16
    assert after["himap_generation_tokens_total"] - before["himap_generation_tokens_total"] == tokens
    # continuous batching: fewer decode steps than decoded tokens (one at a time would need one each)
    decode_steps = after["himap_model_steps_total"] - before["himap_model_steps_total"]
    assert 0 < decode_steps < tokens - 16
    assert metric(server, "himap_queue_length") == 0 and metric(server, "himap_running_requests") == 0


@needs_triton
def test_malformed_requests_get_triton_errors(server, image_bytes):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    _, errors = stream(server.grpc_url, [dict(image=image_bytes[:300], question="What?")])
    assert len(errors) == 1 and "input 'image' is truncated or corrupt" in str(errors[0])
    _, errors = stream(server.grpc_url, [dict(image=image_bytes, question="What?", temperature=-2.0)])
    assert len(errors) == 1 and "input 'temperature' must be >= 0" in str(errors[0])

    with httpclient.InferenceServerClient(server.http_url) as client:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("himap_unary", make_inputs(httpclient, b"not an image", "What?"))
        assert caught.value.status() == "400" and "input 'image' is neither an image PIL can read" in caught.value.message()
        # Triton's own validation: a missing required input, a wrong datatype
        question = httpclient.InferInput("question", [1], "BYTES")
        question.set_data_from_numpy(np.array([b"What?"], dtype=np.object_))
        with pytest.raises(InferenceServerException, match="image"):
            client.infer("himap_unary", [question])
        wrong = httpclient.InferInput("image", [1], "INT32")
        wrong.set_data_from_numpy(np.array([7], dtype=np.int32))
        with pytest.raises(InferenceServerException, match="(?i)data.?type"):
            client.infer("himap_unary", [wrong, question])
        # the model survived all of it
        assert client.is_model_ready("himap") and client.is_model_ready("himap_unary")
        answer = Answer()
        answer.add(client.infer("himap_unary", make_inputs(httpclient, image_bytes, "Who?", max_tokens=3)).as_numpy)
        assert len(answer.token_ids) >= 1
    with grpcclient.InferenceServerClient(server.grpc_url) as grpc:
        assert grpc.is_server_live() and grpc.is_server_ready()


@needs_triton
def test_attention_form_served_like_run(tmp_path_factory, photo, image_bytes):
    """``--kv-write attention`` (issue 28) in Triton: the model's continuous-batching engine over the export's
    static slot caches (TensorScatter written in place through the pipeline's I/O binding), four requests at
    once on one gRPC stream, each answers as ``run``'s pipeline alone (text, tokens, kept image positions).
    The export is test_attention_form.py's (tiny-gqa: grouped-query heads; same session key)."""
    from himap_trt.runtime.loader import open_pipeline

    export = exported(tmp_path_factory, "tiny-gqa", "himap", kv_write="attention", max_seq_len=320,
                      k1=2, r1=0.5, k2=8, r2=0.75)[0]
    repository = tmp_path_factory.mktemp("triton-attention") / "model_repository"
    write_repository(export, repository, RepositoryOptions(max_batch=4, default_max_tokens=8))
    requests = [dict(image=image_bytes, question=QUESTIONS[i], max_tokens=5 + i) for i in range(4)]
    opened = open_pipeline(export_dir=export, backend="onnxruntime", device="cpu")
    try:
        expected = [solo(opened.pipeline, photo, r["question"], r["max_tokens"]) for r in requests]
    finally:
        opened.pipeline.close()
    with serving(repository, tmp_path_factory) as running:
        answers, errors = stream(running.grpc_url, requests)
    assert not errors and len(answers) == 4
    for i, (text, ids, kept) in enumerate(expected):
        assert (answers[str(i)].text, answers[str(i)].token_ids, answers[str(i)].kept_image_positions) == (text, ids, kept)
