"""The HTTP layer's states that need no model: 503 while loading and after a failed load, request
parsing. Everything else is tested against the real server in tests/integration/test_serve.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from himap_trt.serve.app import ApiError, ServeConfig, ServerState, conversation, create_app, parse_request, sampling_params


def call(app, method: str, path: str, body=None):
    async def main():
        transport = httpx.ASGITransport(app=app)      # no lifespan: the model is never loaded
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, json=body)

    return asyncio.run(main())


@pytest.mark.parametrize("status,code", [("loading", "loading"), ("failed", "load_failed"), ("draining", "draining")])
def test_503_unless_ready(status, code):
    state = ServerState(ServeConfig(export_dir=Path("export"), model_name="tiny"))
    state.status, state.error = status, ("no graphs" if status == "failed" else None)
    app = create_app(state)
    health = call(app, "GET", "/health")
    assert health.status_code == 503 and health.json()["status"] == status
    response = call(app, "POST", "/v1/chat/completions", {"model": "tiny", "messages": []})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == code and response.json()["error"]["type"] == "service_unavailable"
    assert call(app, "GET", "/v1/models").json()["data"][0]["id"] == "tiny"
    assert "himap_ready 0.0" in call(app, "GET", "/metrics").text


def _body(**kw):
    content = kw.pop("content", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                 {"type": "text", "text": "What?"}])
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}).encode()


@pytest.mark.parametrize("body,fragment", [
    (b"[1, 2]", "JSON object"),
    (_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    (_body(stop=""), "stop"),
    (_body(top_logprobs=21), "top_logprobs"),
    (_body(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (_body(response_format={"type": "json_object"}), "response_format"),
    (_body(logit_bias={"1": 5}), "logit_bias"),
    (_body(audio={"voice": "alloy"}), "audio"),
    (_body(presence_penalty=2.5), "presence_penalty"),
    (_body(n=0), "n"),
    (_body(top_p=0), "top_p"),
    (_body(messages=None), "messages"),
    (_body(content=[{"type": "audio", "data": "x"}]), "messages[0].content"),
])
def test_parse_errors_name_the_field(body, fragment):
    with pytest.raises(ApiError) as info:
        parse_request(body)
    assert info.value.status == 400 and fragment in info.value.message


def _messages(*messages):
    return parse_request(json.dumps({"model": "tiny", "messages": list(messages)}).encode())


IMAGE = {"type": "image_url", "image_url": {"url": "data:x"}}


def test_conversations_are_parsed_in_order():
    request = _messages({"role": "developer", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "Look:"}, IMAGE]},
                        {"role": "assistant", "content": "A cat."},
                        {"role": "user", "content": [IMAGE, {"type": "text", "text": "and this?"}]})
    chat = conversation(request, 2)
    assert [m.role for m in chat.messages] == ["developer", "user", "assistant", "user"]
    assert [p.where for p in chat.visual_parts] == ["messages[1].content[1].image_url.url",
                                                    "messages[3].content[0].image_url.url"]
    assert chat.template_messages()[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert conversation(_messages({"role": "user", "content": "hi"}), 1).visual_parts == []      # text-only


@pytest.mark.parametrize("messages,fragment", [
    ([{"role": "user", "content": [IMAGE, IMAGE]}], "messages[0].content[1].image_url.url: 2 visual inputs"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages[1].role: the last message is"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role: two user messages"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "messages[0].role: an assistant message before"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}],
     "messages[1].role: a system message after a user message"),
    ([{"role": "user", "content": "  "}], "messages[0].content is empty"),
    ([{"role": "user", "content": []}], "messages[0].content: empty"),
    ([{"role": "user", "content": None}], "messages[0].content: empty"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": [IMAGE]},
      {"role": "user", "content": "b"}], "messages[2].content[0].image_url.url: an image in an assistant message"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}], "messages[1].role: expected one of"),
])
def test_bad_conversations_name_the_message(messages, fragment):
    with pytest.raises(ApiError) as info:
        conversation(_messages(*messages), 1)
    assert info.value.status == 400 and fragment in info.value.message, info.value.message


def test_sampling_fields():
    params = sampling_params(parse_request(_body(max_completion_tokens=7, max_tokens=3, logprobs=True, top_logprobs=5,
                                                 presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.3,
                                                 min_tokens=2, n=3, seed=1)))
    assert (params.max_tokens, params.logprobs, params.top_logprobs, params.presence_penalty, params.frequency_penalty,
            params.repetition_penalty, params.min_tokens, params.n) == (7, True, 5, 0.5, -0.5, 1.3, 2, 3)
    with pytest.raises(Exception, match="top_logprobs: needs logprobs"):
        sampling_params(parse_request(_body(top_logprobs=2)))


@pytest.mark.parametrize("extra,fragment", [
    ({"max_tokens": "5"}, "max_tokens: Input should be a valid integer"),
    ({"stream": "true"}, "stream: Input should be a valid boolean"),
    ({"top_p": "1"}, "top_p: Input should be a valid number"),
    ({"seed": 2**64}, "seed: Input should be less than or equal to 9223372036854775807"),
    ({"stop": ["a"] * 5}, "stop: List should have at most 4 items"),
])
def test_strict_types_and_ranges(extra, fragment):
    with pytest.raises(ApiError) as info:
        parse_request(_body(**extra))
    assert info.value.status == 400 and fragment in info.value.message
    assert parse_request(_body(temperature=1, seed=-(2**63), stop="x")).temperature == 1.0   # an integer is a number


def test_deep_nesting_is_invalid_json_not_a_recursion_error():
    for body in (b"[" * 100_000, b'{"model": "m", "messages": [], "x": ' + b"[" * 1000 + b"]" * 1000 + b"}"):
        with pytest.raises(ApiError, match="not valid JSON.*recursion limit"):
            parse_request(body)


def test_bearer_comparison():
    from himap_trt.serve.app import bearer_matches

    assert bearer_matches(b"Bearer k\xc3\xa9y", "k\u00e9y") and bearer_matches(b"bearer  key ", "key")
    for header in (None, b"", b"key", b"Basic key", b"Bearer ke", b"Bearer keyy", b"Bearer"):
        assert not bearer_matches(header, "key"), header


def test_api_key_405_and_openapi_without_a_model():
    state = ServerState(ServeConfig(export_dir=Path("export"), model_name="tiny", api_key="s3cret", metrics_auth=True))
    app = create_app(state)

    def get(path, **headers):
        async def main():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.get(path, headers=headers)

        return asyncio.run(main())

    for path in ("/v1/models", "/metrics"):
        refused = get(path)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert get("/v1/models", Authorization="Bearer s3cret").status_code == 200
    assert get("/health").status_code == 503                        # open (and loading)
    schema = get("/openapi.json").json()
    assert schema["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert schema["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/health"]["get"]
    response = call(app, "PUT", "/health")
    assert response.status_code == 405 and response.headers["allow"] == "GET"


def test_bench_serve_conversations_file(tmp_path):
    from himap_trt.errors import HimapError
    from himap_trt.serve.bench import read_conversations

    path = tmp_path / "c.jsonl"
    path.write_text('[{"role": "user", "content": "a"}]\n\n{"messages": [{"role": "user", "content": "b"}]}\n')
    assert read_conversations(path) == [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    for text, fragment in [("{", "c.jsonl:1: not JSON"), ('{"x": 1}', "c.jsonl:1: expected a non-empty array"),
                           ("\n", "holds no conversations")]:
        path.write_text(text)
        with pytest.raises(HimapError, match=fragment):
            read_conversations(path)
