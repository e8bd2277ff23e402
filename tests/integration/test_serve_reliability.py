"""`himap-trt serve` under hostile and heavy use, over loopback: bounded work before admission, strict
types, OpenAPI fuzzing (schemathesis), the API key, read timeouts (slowloris), overload, injected
backend faults and a wedged engine.

Three server processes on the tiny export (module scope): `guarded` (an API key, 2 slots and a queue
of 2, a 2 s read timeout), `faulty` (the test-only hook HIMAP_TRT_TEST_FAULT: decode call 3 fails)
and `wedging` (its first decode call hangs 3 s, --wedged-after 1), so no test depends on another's calls.
The longer runs of the same drivers are benchmarks/serve_overload.py and benchmarks/serve_soak.py,
with their figures in docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import schemathesis
from conftest import exported
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from test_serve import ServerProcess, messages
from typer.testing import CliRunner

KEY = "test-key-0123456789"
#: Cases per operation and mode of the fuzzing test; the longer run in docs/RELIABILITY.md sets more.
FUZZ_EXAMPLES = int(os.environ.get("HIMAP_TRT_FUZZ_EXAMPLES", "25"))
AUTH = {"Authorization": f"Bearer {KEY}"}
READ_TIMEOUT_S = 2
MAX_BATCH, MAX_QUEUE = 2, 2


def small_png_url(size=(48, 40)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


URL = small_png_url()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out, _, _ = exported(tmp_path_factory, "tiny", "himap", k1=2, r1=0.5, k2=8, r2=0.75)
    return out


@pytest.fixture(scope="module")
def guarded(export_dir, tmp_path_factory):
    proc = ServerProcess(export_dir, tmp_path_factory.mktemp("logs") / "guarded.log", "--max-batch", str(MAX_BATCH),
                         "--max-queue", str(MAX_QUEUE), "--read-timeout", str(READ_TIMEOUT_S),
                         "--keep-alive-timeout", "1", "--max-body-bytes", "8000000", env={"HIMAP_TRT_API_KEY": KEY},
                         api_key=KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def faulty(export_dir, tmp_path_factory):
    proc = ServerProcess(export_dir, tmp_path_factory.mktemp("logs") / "faulty.log", "--max-batch", "2",
                         "--wedged-after", "1", env={"HIMAP_TRT_TEST_FAULT": "decode:3"})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def wedging(export_dir, tmp_path_factory):
    """A server whose first decode call hangs 3 s: independent of what other tests sent elsewhere."""
    proc = ServerProcess(export_dir, tmp_path_factory.mktemp("logs") / "wedging.log", "--max-batch", "2",
                         "--wedged-after", "1", env={"HIMAP_TRT_TEST_FAULT": "decode:1:hang=3"})
    yield proc
    proc.stop()


def post(server, body=None, *, content=None, headers=AUTH, timeout=60):
    return httpx.post(f"{server.base}/v1/chat/completions", json=body, content=content, headers=headers,
                      timeout=timeout)


def openai_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])
    return error


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):      # peak resident set size
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


# ---- bounded work and strict types ------------------------------------------------------------------------
@pytest.mark.parametrize("extra,field", [
    ({"max_tokens": "5"}, "max_tokens"), ({"stream": "true"}, "stream"), ({"temperature": "0.5"}, "temperature"),
    ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"ignore_eos": 1}, "ignore_eos"),
])
def test_wrong_types_and_ranges_get_400(guarded, extra, field):
    error = openai_error(post(guarded, {"model": "tiny", "messages": messages(URL, "Hi?"), **extra}), 400, field)
    assert error["param"] == field


def test_extreme_seed_and_nesting(guarded):
    response = post(guarded, {"model": "tiny", "messages": messages(URL, "Hi?"), "seed": 2**63 - 1,
                              "temperature": 1, "max_tokens": 2})
    assert response.status_code == 200, response.text
    openai_error(post(guarded, content=b"[" * 100_000), 400, "not valid JSON", "recursion limit")
    nested = b'{"model": "tiny", "messages": [], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    openai_error(post(guarded, content=nested), 400, "not valid JSON")


def test_long_question_refused_by_bytes_without_stalling_others(guarded):
    """A 5 MB question is refused from its length before tokenizing, and another request meanwhile
    gets its answer (before the fix: tokenized in full under a lock every request shared, 9-14 s)."""
    results = {}

    def ordinary():
        started = time.perf_counter()
        response = post(guarded, {"model": "tiny", "messages": messages(URL, "What?"), "max_tokens": 2})
        results["ordinary"] = (response.status_code, time.perf_counter() - started)

    thread = threading.Thread(target=ordinary)
    started = time.perf_counter()
    thread.start()
    response = post(guarded, {"model": "tiny", "messages": messages(URL, "why " * 1_250_000)})
    refused_after = time.perf_counter() - started
    thread.join(60)
    openai_error(response, 400, "5000000 bytes", "--max-seq-len")
    assert refused_after < 5, refused_after            # the body alone is 5 MB of JSON to send and parse
    assert results["ordinary"][0] == 200 and results["ordinary"][1] < 10, results


def test_image_bomb_refused_from_its_header(guarded):
    """A 7000x7000 PNG of ~160 KB: refused before decoding; the server's peak RSS does not grow by the
    650 MB decoding it took before the fix."""
    buffer = io.BytesIO()
    Image.new("RGB", (7000, 7000), (1, 2, 3)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 200_000
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    peak = rss_bytes(guarded.proc.pid)
    for _ in range(2):
        error = openai_error(post(guarded, {"model": "tiny", "messages": messages(url, "Hi?")}), 400,
                             "7000x7000", "--max-image-memory")
        assert error["param"] == "messages[0].content[0].image_url.url"
    assert rss_bytes(guarded.proc.pid) - peak < 64 * 2**20


# ---- headers: Retry-After, Allow, OpenAPI ----------------------------------------------------------------
def test_405_has_allow_and_openapi_is_published(guarded):
    response = httpx.delete(f"{guarded.base}/v1/models", headers=AUTH)
    assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    schema = httpx.get(f"{guarded.base}/openapi.json").json()
    post_op = schema["paths"]["/v1/chat/completions"]["post"]
    request = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert request["properties"]["max_tokens"]["anyOf"][0] == {"minimum": 1, "type": "integer"}
    assert post_op["security"] == [{"bearer": []}] and "headers" in post_op["responses"]["429"]
    assert post_op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


# ---- property-based fuzzing from /openapi.json --------------------------------------------------------------
# (schemathesis' pytest plugin, `schemathesis.pytest.from_fixture`, fails on pytest 9.2: it sets
# `node._nodeid`; the operations' hypothesis strategies are used directly instead)
FUZZ_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
               response_schema_conformance, negative_data_rejection, unsupported_method, ignored_auth]


def usable(case, positive: bool) -> None:
    """Make generated bodies reach the model where they are valid.

    Every case: a string ``model`` becomes the served one, an integer ``max_tokens`` at most 3, a string
    image URL a real PNG (type-preserving, so a negative case keeps its violation). Positive cases
    keep their generated conversation, made servable by :func:`conversation_of`, ``n`` at most 2
    and no unsupported options, so that the other fields' random values are really served.
    """
    body = case.body if isinstance(case.body, dict) else None
    if body is None:
        return
    if isinstance(body.get("model"), str):
        body["model"] = "tiny"
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int) and not isinstance(body.get(name), bool) and body[name] > 3:
            body[name] = 3
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 3
    messages_ = body.get("messages") if isinstance(body.get("messages"), list) else []
    for message in messages_:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            image = part.get("image_url") if isinstance(part, dict) else None
            if isinstance(image, dict) and isinstance(image.get("url"), str):
                image["url"] = URL
    if positive:
        from himap_trt.serve.protocol import UNSUPPORTED

        body["messages"] = conversation_of(messages_)
        if isinstance(body.get("n"), int):
            body["n"] = min(max(body["n"], 1), 2)
        if body.get("top_logprobs"):
            body["logprobs"] = True
        if isinstance(body.get("min_tokens"), int):
            body["min_tokens"] = min(body["min_tokens"], 3)
        for name in UNSUPPORTED:
            body.pop(name, None)


def conversation_of(generated: list) -> list[dict]:
    """A generated ``messages`` array made into a conversation this LLaVA export serves, its shape kept
    where it can be (bounded: the last 5 messages): a leading system / developer message stays, the
    others alternate so that the last is a user message, images only in user messages and at most
    one, blank content becomes text. So generated conversations (several turns, string or parts
    content, text-only) reach the model."""
    kept = [m for m in generated if isinstance(m, dict)][-5:]
    out, image_used = [], False
    for i, message in enumerate(kept):
        role = message.get("role")
        if not (i == 0 and role in ("system", "developer")):
            role = "user" if (len(kept) - 1 - i) % 2 == 0 else "assistant"
        content = message.get("content")
        parts = []
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "text" and isinstance(part.get("text"), str) and part["text"].strip():
                parts.append({"type": "text", "text": part["text"]})
            elif part.get("type") == "image_url" and role == "user" and not image_used:
                parts.append({"type": "image_url", "image_url": {"url": URL}})
                image_used = True
        if isinstance(content, str) and content.strip():
            parts = content
        elif not parts or (role != "user" and not any(p["type"] == "text" for p in parts)):
            parts = (parts if isinstance(parts, list) else []) + [{"type": "text", "text": "What?"}]
        out.append({"role": role, "content": parts})
    if not out or out[-1]["role"] != "user":
        out.append({"role": "user", "content": "What?"})
    return out


@pytest.fixture(scope="module")
def api_schema(guarded):
    return schemathesis.openapi.from_url(f"{guarded.base}/openapi.json")


@pytest.mark.parametrize("label,mode", [
    ("POST /v1/chat/completions", "positive"), ("POST /v1/chat/completions", "negative"),
    ("GET /v1/models", "positive"), ("GET /v1/models", "negative"), ("GET /health", "positive"),
    ("GET /metrics", "positive"),
])
def test_openapi_fuzz(api_schema, label, mode):
    """Zero 5xx, zero responses outside the schema, no schema-invalid request accepted (25 cases per
    operation and mode unless HIMAP_TRT_FUZZ_EXAMPLES says otherwise; derandomized: the same cases
    every run)."""
    (operation,) = [r.ok() for r in api_schema.get_all_operations() if r.ok().label == label]
    statuses = []

    @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def run(case):
        usable(case, positive=mode == "positive")
        statuses.append(case.call_and_validate(headers=AUTH, timeout=60, checks=FUZZ_CHECKS).status_code)

    run()
    assert statuses and all(s < 500 for s in statuses)
    if label.startswith("POST") and mode == "positive":
        assert statuses.count(200) >= 5, statuses     # valid requests are served, not just refused


# ---- the API key -------------------------------------------------------------------------------------------
def test_api_key_required_on_v1_only(guarded):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for response in (httpx.get(f"{guarded.base}/v1/models", headers=headers),
                         post(guarded, {"model": "tiny", "messages": messages(URL, "Hi?")}, headers=headers)):
            error = openai_error(response, 401, "API key")
            assert error["code"] == "invalid_api_key" and response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{guarded.base}/health").status_code == 200
    assert httpx.get(f"{guarded.base}/metrics").status_code == 200       # open unless --metrics-auth
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.base}/v1", api_key="nope", max_retries=0).models.list()
    assert [m.id for m in guarded.client.models.list().data] == ["tiny"]


def test_bench_serve_sends_the_key(guarded):
    from himap_trt.cli import app

    result = CliRunner().invoke(app, ["bench-serve", "--url", guarded.base, "--concurrency", "1", "--requests", "1",
                                      "--max-tokens", "2", "--warmup", "0", "--json", "--api-key", KEY])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["levels"][0]["completed"] == 1


@pytest.mark.parametrize("args,env,fragment", [
    (["--host", "0.0.0.0"], {}, "--api-key"),
    (["--host", "192.168.1.5"], {}, "--insecure-no-auth"),
    (["--host", "myhost.example"], {}, "without authentication"),
    (["--api-key", " "], {}, "is empty"),
    (["--read-timeout", "0"], {}, "--read-timeout"),
    (["--keep-alive-timeout", "-1"], {}, "--keep-alive-timeout"),
    (["--wedged-after", "nan"], {}, "--wedged-after"),
    (["--max-image-memory", "0"], {}, "--max-image-memory"),
    (["--metrics-auth"], {}, "--metrics-auth needs --api-key"),
    # past the exposure check: the error is about the (missing) export
    (["--host", "0.0.0.0", "--insecure-no-auth"], {}, "nope"),
    (["--host", "0.0.0.0"], {"HIMAP_TRT_API_KEY": KEY}, "nope"),
    (["--host", "::1"], {}, "nope"),
    (["--host", "0.0.0.0"], {"HIMAP_TRT_API_KEY": ""}, "--api-key"),     # an empty variable is no key (click)
])
def test_serve_flags_bad_input_is_one_line(args, env, fragment, tmp_path):
    from himap_trt.cli import app

    result = CliRunner().invoke(app, ["serve", "--export-dir", str(tmp_path / "nope"), *args], env=env)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


# ---- connections: slowloris and idle -------------------------------------------------------------------------
def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (None: still open after ``seconds``)."""
    sock.settimeout(seconds)
    started = time.perf_counter()
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.perf_counter() - started


def test_slow_and_partial_requests_are_closed(guarded):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    partial = [b"", b"POST /v1/chat/completions HTTP/1.1\r\n", head[:40], head + b'{"model": "ti']
    sockets = []
    for i in range(20):                       # 20 slowloris connections of 4 kinds
        sock = socket.create_connection(("127.0.0.1", guarded.port))
        sock.sendall(partial[i % 4])
        sockets.append(sock)
    time.sleep(0.5)
    assert post(guarded, {"model": "tiny", "messages": messages(URL, "Hi?"), "max_tokens": 2}).status_code == 200
    closed = [closed_within(sock, READ_TIMEOUT_S + 3) for sock in sockets]
    for sock in sockets:
        sock.close()
    assert all(c is not None for c in closed), closed
    # dribbling a byte a second does not extend the deadline
    sock = socket.create_connection(("127.0.0.1", guarded.port))
    started = time.perf_counter()
    try:
        for byte in head:
            sock.sendall(bytes([byte]))
            time.sleep(0.5)
            if time.perf_counter() - started > READ_TIMEOUT_S + 3:
                pytest.fail("a dribbling client was not cut off")
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    # an idle kept-alive connection is closed after --keep-alive-timeout (1 s)
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert closed_within(sock, 4) is not None


# ---- overload --------------------------------------------------------------------------------------------------
def test_overload_ends_in_200_429_or_503(guarded):
    """4 x (slots + queue) concurrent requests: each ends in 200, or 429 with Retry-After, within 60 s;
    the server then answers normally with every slot free."""
    n = 4 * (MAX_BATCH + MAX_QUEUE)
    body = {"model": "tiny", "messages": messages(URL, "What?"), "max_tokens": 6, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
            return await asyncio.gather(*(client.post(f"{guarded.base}/v1/chat/completions", json=body)
                                          for _ in range(n)))

    responses = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses.count(200) >= MAX_BATCH and statuses.count(429) >= 1, statuses
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "queue_full"
    assert post(guarded, body).status_code == 200
    guarded.wait_metric("himap_free_slots", MAX_BATCH)
    assert guarded.metric("himap_queue_length") == 0


# ---- faults -------------------------------------------------------------------------------------------------------
def test_injected_decode_fault_fails_that_batch_and_the_engine_goes_on(faulty):
    """decode call 3 raises: the request decoding then gets 500 naming the fault, the log has one line
    saying which requests failed, and the next request is answered."""
    body = {"model": "tiny", "messages": messages(URL, "What?"), "max_tokens": 8, "ignore_eos": True}
    response = post(faulty, body, headers={})
    error = openai_error(response, 500, "injected fault", "decode call 3")
    assert error["type"] == "server_error"
    assert "decode failed for requests [1]" in faulty.log.read_text()
    again = post(faulty, body, headers={})
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 8
    assert httpx.get(f"{faulty.base}/health").json() == {"status": "ok"}


def test_health_reports_a_wedged_engine(wedging):
    """decode call 1 hangs 3 s (its own server): /health answers 503 'wedged' while it hangs
    (--wedged-after 1), then 200; the request that hung completes."""
    faulty = wedging
    assert httpx.get(f"{faulty.base}/health").status_code == 200
    body = {"model": "tiny", "messages": messages(URL, "What?"), "max_tokens": 8, "ignore_eos": True}
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=post(faulty, body, headers={})))
    thread.start()
    states = []
    deadline = time.monotonic() + 20
    while thread.is_alive() and time.monotonic() < deadline:
        response = httpx.get(f"{faulty.base}/health", timeout=10)
        states.append((response.status_code, response.json()["status"]))
        time.sleep(0.2)
    thread.join(30)
    assert (503, "wedged") in states, states
    assert out["r"].status_code == 200
    assert httpx.get(f"{faulty.base}/health").status_code == 200


def test_malformed_fault_hook_stops_serve_in_one_line(export_dir):
    """The test-only hook is read when the engine starts: a bad value is a failed load, one line, exit 1."""
    from himap_trt.cli import app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = CliRunner().invoke(app, ["serve", "--export-dir", str(export_dir), "--port", str(port), "--log-level",
                                      "warning"], env={"HIMAP_TRT_TEST_FAULT": "decode:0"})
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [
        "error: HIMAP_TRT_TEST_FAULT: 'decode:0' is not PHASE:N[:error|hang=SECONDS] with PHASE prefill or decode and "
        "N >= 1 (a test-only hook; unset it)"], result.stderr
