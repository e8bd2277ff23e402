"""`himap-trt serve` on the tiny export, driven by the real `openai` client over loopback.

Two server processes (module scope, free ports on 127.0.0.1, stopped by the fixtures): a wide one
(16 slots) for answers, streaming, errors and disconnects, and a narrow one (2 slots, queue of 1) for
429 and the graceful shutdown. Expected answers come from the pipeline run in this process, one
request at a time (`Pipeline.generate`, greedy).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from conftest import exported
from himap_trt.serve.metrics import ServerMetrics

STARTUP_S = 120          # bound on a server start (imports + loading on a busy 2-core machine)
LONG = 1700              # max_tokens of requests meant to still be running when the test acts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: The metric families the server declares (labelled ones appear on /metrics once a label is used).
DECLARED_METRICS = {family.name for family in ServerMetrics().registry.collect()}


class ServerProcess:
    """`himap-trt serve` in a subprocess on a free loopback port."""

    def __init__(self, export_dir: Path, log: Path, *args: str, env: dict | None = None, api_key: str = "unused"):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.api_key = api_key
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "himap_trt.cli", "serve", "--export-dir", str(export_dir), "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning", *args],
            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env={**os.environ, **(env or {})})
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}): {log.read_text()}"
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            self.stop()
            pytest.fail(f"the server did not become ready within {STARTUP_S} s: {log.read_text()}")
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0, timeout=60)

    def aclient(self) -> openai.AsyncOpenAI:
        """An async client (one per event loop: make it inside ``asyncio.run``)."""
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=self.api_key, max_retries=0, timeout=60)

    def metric(self, name: str, **labels) -> float:
        """A sample's value on /metrics. A labelled sample not observed yet reads 0.0 (prometheus_client
        publishes a labelled family only once a label value is used), but only for a family the
        server declares (:class:`ServerMetrics`); an unlabelled sample must be there. A metric the
        server does not publish (renamed, removed) fails the test instead of reading 0."""
        text = httpx.get(f"{self.base}/metrics", timeout=10, headers={"Authorization": f"Bearer {self.api_key}"}).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$"
        found = re.search(pattern, text, re.MULTILINE)
        if found:
            return float(found.group(1))
        family = re.sub(r"_(total|count|sum|bucket|created)$", "", name)
        assert labels and family in DECLARED_METRICS, f"metric {name}{labels or ''} is not on /metrics"
        return 0.0

    def wait_metric(self, name: str, value: float, timeout: float = 10.0, **labels) -> None:
        deadline = time.monotonic() + timeout
        while self.metric(name, **labels) != value:
            assert time.monotonic() < deadline, f"{name}{labels} != {value} after {timeout} s"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def encode(image: Image.Image, fmt: str) -> tuple[str, Image.Image]:
    """(data URL, the image as the server will decode it)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    data = buffer.getvalue()
    url = f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode()
    return url, Image.open(io.BytesIO(data))


def messages(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out, _, _ = exported(tmp_path_factory, "tiny", "himap", k1=2, r1=0.5, k2=8, r2=0.75)
    return out


@pytest.fixture(scope="module")
def image_root(tmp_path_factory, photo):
    root = tmp_path_factory.mktemp("images")
    photo.convert("RGB").resize((120, 100)).save(root / "photo.png")
    return root


@pytest.fixture(scope="module")
def server(export_dir, image_root, tmp_path_factory):
    proc = ServerProcess(export_dir, tmp_path_factory.mktemp("logs") / "wide.log", "--max-batch", "16",
                         "--max-queue", "64", "--image-root", str(image_root), "--max-body-bytes", "3000000",
                         "--allow-remote-images", "--max-image-bytes", "200000", "--image-timeout", "1")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def narrow(export_dir, tmp_path_factory):
    proc = ServerProcess(export_dir, tmp_path_factory.mktemp("logs") / "narrow.log", "--max-batch", "2",
                         "--max-queue", "1")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def cases(photo):
    """Four (data URL, decoded image, question) requests: JPEG, PNG, WebP; questions of different lengths."""
    small = photo.convert("RGB").resize((160, 192))
    images = [encode(small, "JPEG"), encode(small.rotate(90), "PNG"), encode(small.convert("L"), "PNG"),
              encode(small.transpose(Image.FLIP_LEFT_RIGHT), "WEBP")]
    questions = ["What is shown?", "Describe the person in this photo in detail, please.", "Who?",
                 "What colour is the background?"]
    return [(url, image, q) for (url, image), q in zip(images, questions)]


@pytest.fixture(scope="module")
def solo(export_dir):
    """Greedy answers of the pipeline in this process, one request at a time: (image, question, n) -> ids."""
    from himap_trt.runtime import GenerationConfig
    from himap_trt.runtime.loader import open_pipeline

    pipeline = open_pipeline(export_dir=export_dir, backend="onnxruntime", device="cpu").pipeline

    def run(image, question, max_new_tokens):
        batch = pipeline.prepare([image], [question])
        return pipeline.generate(batch, GenerationConfig(max_new_tokens=max_new_tokens)).tokens[0]

    yield run
    pipeline.close()


# ---- conversations and real clients (the openai SDK, LangChain's ChatOpenAI) ----------------------------
@pytest.fixture(scope="module")
def converse(export_dir):
    """Greedy answers of the pipeline in this process for a conversation: (messages, images, n) -> (ids, text)."""
    from himap_trt.chat import parse_messages
    from himap_trt.runtime import GenerationConfig
    from himap_trt.runtime.loader import open_pipeline

    pipeline = open_pipeline(export_dir=export_dir, backend="onnxruntime", device="cpu").pipeline

    def run(conversation, images, max_new_tokens):
        batch = pipeline.prepare_conversation(parse_messages(conversation), images)
        out = pipeline.generate(batch, GenerationConfig(max_new_tokens=max_new_tokens))
        return out.tokens[0], out.texts[0]

    yield run
    pipeline.close()


def _history(url):
    """A system prompt, an image turn, the assistant's answer, a text-only follow-up."""
    return [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": [{"type": "text", "text": "What is in the picture?"},
                                         {"type": "image_url", "image_url": {"url": url}}]},
            {"role": "assistant", "content": "A person."},
            {"role": "user", "content": "What are they wearing?"}]


def test_openai_sdk_conversation_streamed_and_not(server, cases, converse):
    url, image, _ = cases[0]
    expected_ids, expected_text = converse(_history(url), [image], 10)
    whole = server.client.chat.completions.create(model="tiny", messages=_history(url), max_tokens=10, temperature=0,
                                                  extra_body={"return_token_ids": True})
    assert whole.model_extra["himap"]["token_ids"] == expected_ids
    assert whole.choices[0].message.content == expected_text
    assert whole.model_extra["himap"]["image_tokens_per_segment"] == [144, 72, 18]
    stream = server.client.chat.completions.create(model="tiny", messages=_history(url), max_tokens=10, temperature=0,
                                                   stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected_text
    # text-only: no vision graph, no stage
    text_only = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    expected_ids, _ = converse(text_only, [], 6)
    answer = server.client.chat.completions.create(model="tiny", messages=text_only, max_tokens=6, temperature=0,
                                                   extra_body={"return_token_ids": True})
    assert answer.model_extra["himap"]["token_ids"] == expected_ids
    assert answer.model_extra["himap"]["image_tokens_per_segment"] == [0, 0, 0]


def test_openai_sdk_logprobs_and_n(server, cases):
    url, _, question = cases[1]
    response = server.client.chat.completions.create(model="tiny", messages=messages(url, question), max_tokens=5,
                                                     temperature=0, logprobs=True, top_logprobs=3, n=2)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].message.content == response.choices[1].message.content     # greedy: the same
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens // 2
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob == entry.top_logprobs[0].logprob   # greedy = best
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    stream = server.client.chat.completions.create(model="tiny", messages=messages(url, question), max_tokens=5,
                                                   temperature=0, logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])


def test_langchain_chat_openai_multi_turn_with_an_image(server, cases, converse):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    url, image, _ = cases[2]
    chat = ChatOpenAI(model="tiny", base_url=f"{server.base}/v1", api_key="unused", temperature=0, max_tokens=8,
                      max_retries=0, timeout=60)
    history = [SystemMessage("You are a terse assistant."),
               HumanMessage(content=[{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What is in the picture?"}])]
    first = chat.invoke(history)
    turns = [{"role": "system", "content": "You are a terse assistant."},
             {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": "What is in the picture?"}]}]
    assert first.content == converse(turns, [image], 8)[1]
    history += [AIMessage(first.content or "Nothing."), HumanMessage("Describe the colours.")]
    second = chat.invoke(history)
    turns += [{"role": "assistant", "content": first.content or "Nothing."},
              {"role": "user", "content": "Describe the colours."}]
    assert second.content == converse(turns, [image], 8)[1]
    streamed = "".join(chunk.content for chunk in chat.stream(history))
    assert streamed == second.content


# ---- answers ----------------------------------------------------------------------------------------
def test_16_concurrent_requests_equal_solo_runs(server, cases, solo):
    async def ask(client, url, question, max_tokens):
        response = await client.chat.completions.create(
            model="tiny", messages=messages(url, question), max_tokens=max_tokens, temperature=0,
            extra_body={"return_token_ids": True})
        return response

    async def main():
        jobs = [(cases[i % 4], 6 + 3 * (i % 5)) for i in range(16)]
        client = server.aclient()
        responses = await asyncio.gather(*(ask(client, url, q, n) for (url, _, q), n in jobs))
        return jobs, responses

    running_before = server.metric("himap_generation_tokens_total")
    steps = server.metric("himap_batch_size_count", phase="decode")
    batched = server.metric("himap_batch_size_sum", phase="decode")
    jobs, responses = asyncio.run(main())
    for ((_, image, question), n), response in zip(jobs, responses):
        expected = solo(image, question, n)
        assert response.model_extra["himap"]["token_ids"] == expected, question
        assert response.usage.completion_tokens == len(expected)
        assert response.choices[0].finish_reason == ("stop" if len(expected) < n else "length")
        assert response.model_extra["himap"]["image_tokens_per_segment"] == [144, 72, 18]
    assert server.metric("himap_generation_tokens_total") - running_before == sum(
        r.usage.completion_tokens for r in responses)
    assert server.metric("himap_free_slots") == 16
    # decode steps served several requests at once (mean requests per step > 4)
    mean = (server.metric("himap_batch_size_sum", phase="decode") - batched) / (
        server.metric("himap_batch_size_count", phase="decode") - steps)
    assert mean > 4, mean


def test_seeded_sampling_matches_a_solo_run(server, cases):
    url, _, question = cases[0]
    kwargs = dict(model="tiny", messages=messages(url, question), max_tokens=10, temperature=0.9, top_p=0.9, seed=3,
                  extra_body={"return_token_ids": True})
    alone = server.client.chat.completions.create(**kwargs).model_extra["himap"]["token_ids"]

    async def main():
        client = server.aclient()
        return await asyncio.gather(*(client.chat.completions.create(**kwargs) for _ in range(4)))

    together = [r.model_extra["himap"]["token_ids"] for r in asyncio.run(main())]
    assert together == [alone] * 4


def test_streaming_chunks_add_up_to_the_answer(server, cases):
    url, _, question = cases[1]
    whole = server.client.chat.completions.create(model="tiny", messages=messages(url, question), max_tokens=20,
                                                  temperature=0)
    stream = server.client.chat.completions.create(model="tiny", messages=messages(url, question), max_tokens=20,
                                                   temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
    # the raw stream ends with data: [DONE]
    body = {"model": "tiny", "messages": messages(url, question), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_stop_string_cuts_the_answer(server, cases, solo, tokenizer_decode):
    url, image, question = cases[2]
    full = tokenizer_decode(solo(image, question, 16))
    stop = next((full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2]),
                None)
    if stop is None:
        pytest.skip(f"no usable stop string in the answer {full!r}")
    response = server.client.chat.completions.create(model="tiny", messages=messages(url, question), max_tokens=16,
                                                     temperature=0, stop=[stop])
    assert response.choices[0].message.content == full[:full.find(stop)]
    assert response.choices[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def tokenizer_decode(export_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(export_dir / "processor"))
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def test_file_urls_under_the_image_root(server, image_root, cases, tmp_path):
    question = "What is shown?"
    by_file = server.client.chat.completions.create(
        model="tiny", messages=messages((image_root / "photo.png").as_uri(), question), max_tokens=8, temperature=0)
    by_data = server.client.chat.completions.create(
        model="tiny", messages=messages("data:image/png;base64," + base64.b64encode(
            (image_root / "photo.png").read_bytes()).decode(), question), max_tokens=8, temperature=0)
    assert by_file.choices[0].message.content == by_data.choices[0].message.content
    outside = tmp_path / "outside.png"
    outside.write_bytes((image_root / "photo.png").read_bytes())
    link = image_root / "escape.png"
    link.symlink_to(outside)
    for url in (outside.as_uri(), link.as_uri(), (image_root / ".." / outside.name).as_uri()):
        with pytest.raises(openai.BadRequestError, match="outside the --image-root"):
            server.client.chat.completions.create(model="tiny", messages=messages(url, question), max_tokens=2)


def test_models_health_metrics(server):
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server.base}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server.base}/metrics").text
    for name in ("himap_time_to_first_token_seconds_bucket", "himap_time_per_output_token_seconds_bucket",
                 "himap_e2e_request_latency_seconds_bucket", "himap_queue_length", "himap_running_requests",
                 "himap_generation_tokens_total", 'himap_kept_image_tokens_total{segment="2"}', "himap_ready 1.0"):
        assert name in text, name


# ---- errors -----------------------------------------------------------------------------------------
def _error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])


def test_bad_requests_get_400(server, cases):
    url, _, question = cases[0]
    before = server.metric("himap_request_errors_total", status="400")
    post = lambda body, **kw: httpx.post(f"{server.base}/v1/chat/completions", timeout=30, **kw,  # noqa: E731
                                         **({"json": body} if body is not None else {}))
    _error(post(None, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"}),
           400, "not valid JSON")
    _error(post({"model": "tiny"}), 400, "messages")
    _error(post({"model": "tiny", "messages": messages(url, question) + [{"role": "assistant", "content": "x"}]}), 400,
           "messages[1].role: the last message is")
    _error(post({"model": "tiny", "messages": messages("data:image/png;base64," + base64.b64encode(b"just text").decode(),
                                                         question)}), 400, "not a PNG image")
    _error(post({"model": "tiny", "messages": messages("data:text/plain;base64,aGk=", question)}), 400, "text/plain")
    _error(post({"model": "tiny", "messages": messages(url, "why? " * 500)}), 400, "max-seq-len")
    _error(post({"model": "tiny", "messages": messages(url, question), "max_tokens": 0}), 400, "max_tokens")
    _error(post({"model": "tiny", "messages": messages(url, question), "temperature": -1}), 400, "temperature")
    # conversations: visual inputs beyond the graphs, an image in an assistant message, empty content, too long
    _error(post({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {"url": url}}]}]}), 400, "messages[0].content[2].image_url.url: 2 visual inputs")
    _error(post({"model": "tiny", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}, {"role": "user", "content": "b"}]}), 400,
        "messages[1].content[0].image_url.url: an image in an assistant message")
    _error(post({"model": "tiny", "messages": [{"role": "system", "content": ""}, {"role": "user", "content": "b"}]}),
           400, "messages[0].content is empty")
    _error(post({"model": "tiny", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                               {"role": "user", "content": "why? " * 500}]}), 400,
           "messages: the conversation has", "prompt tokens")
    _error(post({"model": "tiny", "messages": messages(url, question), "logprobs": True, "top_logprobs": 21}), 400,
           "top_logprobs")
    # the bounds hold for every message: text by its bytes before tokenizing, each image before decoding
    later = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    _error(post({"model": "tiny", "messages": later + [{"role": "user", "content": "why " * 100_000}]}), 400,
           "messages[2].content: the question has 400000 bytes")
    _error(post({"model": "tiny", "messages": later + messages("data:image/png;base64," + base64.b64encode(
        b"just text").decode(), question)}), 400, "messages[2].content[0].image_url.url", "not a PNG image")
    # through the openai client: n beyond --max-batch and an unknown model
    with pytest.raises(openai.BadRequestError, match=r"n: 17 choices need 17 slots"):
        server.client.chat.completions.create(model="tiny", messages=messages(url, question), n=17)
    with pytest.raises(openai.BadRequestError, match="unknown model 'gpt-4o'"):
        server.client.chat.completions.create(model="gpt-4o", messages=messages(url, question))
    assert server.metric("himap_request_errors_total", status="400") - before == 17


def test_oversized_body_gets_413(server, cases):
    url, _, question = cases[0]
    big = "data:image/png;base64," + "A" * 3_200_000
    response = httpx.post(f"{server.base}/v1/chat/completions", json={"model": "tiny", "messages": messages(big, question)},
                          timeout=30)
    _error(response, 413, "--max-body-bytes")


def test_disconnected_stream_frees_its_slot(server, cases):
    url, _, question = cases[3]
    cancelled = server.metric("himap_requests_total", finish_reason="cancelled")
    stream = server.client.chat.completions.create(model="tiny", messages=messages(url, question), max_tokens=LONG,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True})
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    assert server.metric("himap_running_requests") == 1
    stream.close()
    server.wait_metric("himap_requests_total", cancelled + 1, finish_reason="cancelled")
    server.wait_metric("himap_running_requests", 0)
    assert server.metric("himap_free_slots") == 16
    # a client waiting for a whole (non-streamed) answer that gives up
    closed = server.metric("himap_request_errors_total", status="499")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base}/v1/chat/completions", timeout=httpx.Timeout(30, read=1.0),
                   json={"model": "tiny", "messages": messages(url, question), "max_tokens": LONG, "ignore_eos": True})
    server.wait_metric("himap_requests_total", cancelled + 2, finish_reason="cancelled")
    server.wait_metric("himap_running_requests", 0)
    assert server.metric("himap_request_errors_total", status="499") == closed + 1


@pytest.fixture
def image_site(image_root):
    """A loopback HTTP server with /photo.png, /big.png (over the server's 200000-byte limit) and /slow.png
    (answers after 3 s, over the server's 1 s timeout)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    photo = (image_root / "photo.png").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.png":
                time.sleep(3)
            body = {"/photo.png": photo, "/slow.png": photo, "/big.png": photo * 200}.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                self.wfile.write(body or b"")
            except OSError:
                pass

        def log_message(self, *args):
            pass

    site = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    site.daemon_threads = True
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()
    site.server_close()


def test_remote_images_with_limits(server, image_site, image_root):
    question = "What is shown?"
    remote = server.client.chat.completions.create(
        model="tiny", messages=messages(f"{image_site}/photo.png", question), max_tokens=8, temperature=0)
    local = server.client.chat.completions.create(
        model="tiny", messages=messages((image_root / "photo.png").as_uri(), question), max_tokens=8, temperature=0)
    assert remote.choices[0].message.content == local.choices[0].message.content
    for path, fragment in (("big.png", "larger than the limit of 200000 bytes"), ("slow.png", "longer than 1 s"),
                           ("missing.png", "HTTP 404")):
        with pytest.raises(openai.BadRequestError, match=fragment):
            server.client.chat.completions.create(model="tiny", messages=messages(f"{image_site}/{path}", question),
                                                  max_tokens=2)


def test_remote_images_refused_by_default(narrow, cases):
    with pytest.raises(openai.BadRequestError, match="--allow-remote-images"):
        narrow.client.chat.completions.create(model="tiny", messages=messages("https://example.com/cat.png", "Hi?"),
                                              max_tokens=2)


# ---- overload and shutdown (2 slots, a queue of 1) ---------------------------------------------------------
def _hold(proc: ServerProcess, url: str, question: str, max_tokens: int, seen: threading.Event, out: dict):
    """Stream a request in a thread; set `seen` at its first chunk; out['text'], out['finish']."""
    def run():
        try:
            stream = proc.client.chat.completions.create(model="tiny", messages=messages(url, question),
                                                         max_tokens=max_tokens, temperature=0, stream=True,
                                                         extra_body={"ignore_eos": True})
            text = ""
            for chunk in stream:
                seen.set()
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    out["finish"] = chunk.choices[0].finish_reason or out.get("finish")
                if out.get("close"):
                    stream.close()
                    break
            out["text"] = text
        except Exception as exc:   # reported by the test
            out["error"] = repr(exc)
        finally:
            seen.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_overload_gets_429(narrow, cases):
    url, _, question = cases[0]
    holders = []
    for _ in range(2):
        seen, out = threading.Event(), {}
        holders.append((_hold(narrow, url, question, LONG, seen, out), seen, out))
        assert seen.wait(30)
    narrow.wait_metric("himap_running_requests", 2)
    queued: dict = {}
    waiter = threading.Thread(target=lambda: queued.update(r=narrow.client.chat.completions.create(
        model="tiny", messages=messages(url, question), max_tokens=4, temperature=0)), daemon=True)
    waiter.start()
    narrow.wait_metric("himap_queue_length", 1)
    with pytest.raises(openai.RateLimitError, match="queue is full"):
        narrow.client.chat.completions.create(model="tiny", messages=messages(url, question), max_tokens=4)
    for _, _, out in holders:
        out["close"] = True            # the holders disconnect: their slots go to the queued request
    waiter.join(30)
    assert queued["r"].choices[0].finish_reason in ("stop", "length")
    for thread, _, out in holders:
        thread.join(30)
        assert "error" not in out, out
    narrow.wait_metric("himap_running_requests", 0)


def test_sigterm_drains_requests_in_flight(narrow, cases):
    url, _, question = cases[1]
    holders = []
    for _ in range(2):
        seen, out = threading.Event(), {}
        holders.append((_hold(narrow, url, question, 300, seen, out), seen, out))
        assert seen.wait(30)
    narrow.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:          # new requests are refused while draining
        response = httpx.post(f"{narrow.base}/v1/chat/completions", timeout=10,
                              json={"model": "tiny", "messages": messages(url, question), "max_tokens": 2})
        if response.status_code == 503:
            break
        time.sleep(0.01)
    _error(response, 503, "shutting down")
    assert httpx.get(f"{narrow.base}/health").status_code == 503
    for thread, _, out in holders:
        thread.join(60)
        assert "error" not in out, out
        assert out["finish"] == "length"
    assert narrow.proc.wait(30) == 0, narrow.log.read_text()


def test_bench_serve_against_the_server(server, tmp_path):
    from typer.testing import CliRunner

    from himap_trt.cli import app

    plot = tmp_path / "bench.png"
    result = CliRunner().invoke(app, ["bench-serve", "--url", server.base, "--concurrency", "1,3", "--requests", "3",
                                      "--max-tokens", "6", "--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [level["concurrency"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["completed"] == 3 and level["failed"] == 0
        assert level["output_tokens"] == 18                     # ignore_eos: every answer has max_tokens tokens
        assert 0 < level["ttft_ms"]["p50"] <= level["e2e_ms"]["p50"]
        assert level["itl_ms"]["p50"] is not None and level["tpot_ms"]["p50"] > 0
    assert plot.stat().st_size > 10_000


def test_bench_serve_prints_a_table_without_json(server):
    """Without --json, bench-serve prints its table, not JSON (the flag, not a module's function, decides)."""
    from typer.testing import CliRunner

    from himap_trt.cli import app

    result = CliRunner().invoke(app, ["bench-serve", "--url", server.base, "--concurrency", "1", "--requests", "1",
                                      "--max-tokens", "2", "--warmup", "0"])
    assert result.exit_code == 0, result.output
    assert "TTFT ms" in result.stdout and "1/1" in result.stdout
    assert not result.stdout.lstrip().startswith("{")


@pytest.mark.parametrize("args,fragment", [
    (["serve", "--export-dir", "{tmp}/nope"], "nope"),
    (["serve", "--export-dir", "{export}", "--port", "0"], "--port"),
    (["serve", "--export-dir", "{export}", "--image-root", "{tmp}/none"], "--image-root"),
    (["bench-serve", "--concurrency", "1,x"], "--concurrency"),
    (["bench-serve", "--url", "http://127.0.0.1:9", "--requests", "1"], "cannot list models"),
])
def test_command_errors_are_one_line(args, fragment, export_dir, tmp_path):
    from typer.testing import CliRunner

    from himap_trt.cli import app

    result = CliRunner().invoke(app, [a.format(tmp=tmp_path, export=export_dir) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
