"""The OpenAI-compatible HTTP API (FastAPI) in front of the continuous-batching engine.

Routes: ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``,
``GET /health`` (200 once every graph is loaded and while the engine makes progress),
``GET /metrics`` (Prometheus), ``GET /openapi.json`` (the OpenAPI schema of all of them).

Errors are OpenAI-shaped JSON (``{"error": {"message", "type", "param", "code"}}``): 400 for a
malformed request, 401 without the API key (``--api-key``), 404 for an unknown route, 405 (with
``Allow``) for a wrong method, 413 for a body over ``--max-body-bytes``, 429 (with ``Retry-After``)
when the queue is full, 503 while loading or draining, 500 for a failure of the server itself.

Work per request is bounded before it is admitted: the question's UTF-8 length is checked before
tokenizing (:meth:`Engine.check_question`), the image's pixels and memory from its header before
decoding (:func:`~himap_trt.serve.images.check_budget`); requests being prepared count against the
queue, and at most ``image_workers`` images are decoded and preprocessed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from himap_trt.chat import Conversation, Part, parse_messages
from himap_trt.chat import video_options as chat_video_options
from himap_trt.errors import HimapError
from himap_trt.runtime.engine import (
    Completion,
    Delta,
    Engine,
    NotAccepting,
    QueueFull,
    RequestHandle,
    SamplingParams,
)
from himap_trt.runtime.loader import open_pipeline
from himap_trt.serve.images import ImageError, ImagePolicy, open_image_url
from himap_trt.serve.videos import VideoPolicy, open_video_url
from himap_trt.serve.metrics import ServerMetrics
from himap_trt.serve.protocol import (
    UNSUPPORTED,
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    Health,
    ModelList,
    completion_id,
    error_body,
    now,
)

log = logging.getLogger("himap_trt.serve")

#: Seconds between checks that a client waiting for a non-streamed answer is still connected.
DISCONNECT_POLL_S = 0.25
#: Seconds a client refused with 429 is told to wait (``Retry-After``): about one decode step's worth
#: of slots turning over on a busy server.
RETRY_AFTER_S = 1
#: One server-sent event of a streamed answer (OpenAPI 3.1: the schema of each event).
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "a chat.completion.chunk or an error body as JSON, or [DONE] at the end"}}}


@dataclass(frozen=True)
class ServeConfig:
    """What ``himap-trt serve`` was asked for.

    Attributes:
        export_dir: the export directory.
        backend: ``auto``, ``onnxruntime``, ``tensorrt`` or ``torch``.
        device: ``cpu`` / ``cuda`` (None: the loader's default).
        engines_dir: TensorRT engines (None: beside the export).
        max_batch: cache slots = most requests decoded together (requests).
        max_queue: most requests waiting for a slot (requests); more are refused with 429.
        model_name: the name clients must send as ``model``.
        images: where images may come from, and their limits.
        videos: how ``video_url`` parts are sampled, and their limits (Qwen exports).
        max_seq_len: most tokens (prompt + generated) per request (None: the export's).
        max_body_bytes: largest request body accepted (bytes); larger ones get 413.
        drain_timeout_s: on SIGTERM, most seconds to wait for requests in flight (seconds).
        require_signature: EC public key (PEM) whose model-signing signature the export (and engines)
            must carry, verified again when the pipeline loads (see :mod:`himap_trt.signing`).
        api_key: the key clients must send as ``Authorization: Bearer KEY`` on ``/v1/*`` (None: none).
        metrics_auth: ``/metrics`` wants the key too (``/health`` never does).
        wedged_after_s: ``/health`` answers 503 ``wedged`` once one engine iteration has run longer
            than this (seconds).
        image_workers: most images decoded and preprocessed at once (images); peak image memory is at
            most this many times ``images.max_memory``.
        read_timeout_s: most seconds a client may take to send a whole request (request line,
            headers, body); slower connections are closed (seconds).
        keep_alive_s: an idle kept-alive connection is closed after this (seconds).
        mixed_prefill: prefill waiting prompts of different lengths together (padded, masked).
    """

    export_dir: Path
    backend: str = "auto"
    device: str | None = None
    engines_dir: Path | None = None
    max_batch: int = 8
    max_queue: int = 64
    model_name: str = "himap-trt"
    images: ImagePolicy = field(default_factory=ImagePolicy)
    videos: VideoPolicy = field(default_factory=VideoPolicy)
    max_seq_len: int | None = None
    max_body_bytes: int = 32 * 2**20
    drain_timeout_s: float = 600.0
    require_signature: Path | None = None
    api_key: str | None = None
    metrics_auth: bool = False
    wedged_after_s: float = 60.0
    image_workers: int = 2
    read_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    mixed_prefill: bool = False


class ServerState:
    """What the routes share: the status, the engine once loaded, the metrics."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.status = "loading"          # loading -> ready -> draining; or failed
        self.error: str | None = None
        self.engine = None
        self.pipeline = None
        self.metrics = ServerMetrics()
        self.on_failure = None           # called when loading fails (the server exits)
        self.preparing = 0               # requests admitted and being prepared (image, tokens), not queued yet

    def load(self) -> None:
        """Open the pipeline, allocate the slots and start the engine (runs in a thread)."""
        config = self.config
        try:
            started = time.perf_counter()
            opened = open_pipeline(export_dir=config.export_dir, backend=config.backend, engines_dir=config.engines_dir,
                                   device=config.device, require_signature=config.require_signature)
            self.pipeline = opened.pipeline
            engine = Engine(opened.pipeline, max_batch=config.max_batch, max_queue=config.max_queue,
                            max_seq_len=config.max_seq_len, on_finish=self.metrics.finished, on_step=self.metrics.step,
                            mixed_prefill=config.mixed_prefill)
            engine.start()
            self.metrics.bind(engine)
            self.engine = engine
            if self.status == "loading":
                self.status = "ready"
            self.metrics.ready.set(1)
            log.warning("ready: %s on %s, %d slots (%.1f MB of KV cache), loaded in %.1f s", opened.backend,
                        opened.device, config.max_batch, engine.cache.nbytes() / 1e6, time.perf_counter() - started)
        except Exception as exc:   # HimapError: the user's; others: a bug, logged with its traceback
            if not isinstance(exc, HimapError):
                log.exception("loading failed")
            self.status, self.error = "failed", str(exc)
            if self.on_failure is not None:
                self.on_failure()

    def close(self) -> None:
        """Finish what runs (up to the drain timeout), stop the engine, close the backends."""
        if self.engine is not None:
            self.engine.stop(self.config.drain_timeout_s)
        if self.pipeline is not None:
            self.pipeline.close()


class ApiError(Exception):
    """Answered as OpenAI-shaped JSON with ``status``."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})
        if status == 429:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_S))

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, type_=self.TYPES.get(self.status, "invalid_request_error"),
                                       param=self.param, code=self.code), status_code=self.status,
                            headers=self.headers)


def bearer_matches(header: bytes | None, key: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <key>`` (constant-time in the key's bytes)."""
    scheme, _, token = (header or b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode("utf-8"))


class ApiKeyAuth:
    """ASGI middleware: ``/v1/*`` (and ``/metrics`` when ``metrics_auth``) want ``Authorization: Bearer KEY``,
    401 in OpenAI's error shape otherwise (as vLLM's ``--api-key``); ``/health`` and ``/openapi.json``
    stay open."""

    def __init__(self, app, key: str, metrics_auth: bool, metrics: ServerMetrics):
        self.app, self.key, self.metrics_auth, self.metrics = app, key, metrics_auth, metrics

    def protected(self, path: str) -> bool:
        return path == "/v1" or path.startswith("/v1/") or (self.metrics_auth and path == "/metrics")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.protected(scope["path"]):
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope.get("headers") or [] if k == b"authorization"), None)
        if bearer_matches(header, self.key):
            return await self.app(scope, receive, send)
        self.metrics.errors.labels("401").inc()
        error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                              "server's --api-key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await error.response()(scope, receive, send)


class BodyLimit:
    """ASGI middleware: read a request body up to ``limit`` bytes, answer 413 beyond."""

    def __init__(self, app, limit: int, metrics: ServerMetrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size = [], 0
        while not too_large:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            too_large = size > self.limit
            chunks.append(body)
            if not message.get("more_body", False):
                break
        if too_large:
            self.metrics.errors.labels("413").inc()
            error = ApiError(413, f"the request body exceeds the server's limit of {self.limit} bytes "
                                  "(--max-body-bytes)", code="request_too_large")
            return await error.response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _field(loc) -> str:
    """pydantic's error location -> ``messages[0].content[1].image_url.url`` (union member tags such as
    ``list[constrained-str]`` left out)."""
    out = ""
    for part in loc:
        if isinstance(part, str) and (not part.isidentifier() or part in ("str", "int", "float", "bool", "list")):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _most_telling(errors: list[dict]) -> dict:
    """Of a union's errors, one from the member of the right type (a constraint broken) if there is one, else the deepest."""
    return min(errors, key=lambda e: (e["type"].endswith("_type") or e["type"] == "union_tag_invalid", -len(e["loc"])))


def parse_request(body: bytes) -> ChatCompletionRequest:
    """Body bytes -> a validated request (pydantic's JSON parser, strict types: no string for a number
    or a boolean; nesting beyond its recursion limit is invalid JSON, not a RecursionError).

    Raises:
        ApiError: 400 naming the field (invalid JSON, missing or mistyped fields, unsupported options).
    """
    try:
        request = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        first = _most_telling(exc.errors(include_url=False))
        where = _field(first["loc"]) or "body"
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {first['msg']}") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise ApiError(400, "the request body must be a JSON object") from None
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
    extra = request.model_extra or {}
    for name, off in UNSUPPORTED.items():
        if name in extra and extra[name] not in off:
            raise ApiError(400, f"{name}: not supported by this server", param=name)
    return request


#: Most visual inputs (images and videos) in one conversation on a family with per-request visual-token
#: counts (Qwen): each is decoded and held until the prompt is prepared, each within --max-image-memory.
MAX_VISUAL_INPUTS = 8


def conversation(request: ChatCompletionRequest, max_visuals: int) -> Conversation:
    """The request's ``messages`` as a checked :class:`~himap_trt.chat.Conversation`.

    Raises:
        ApiError: 400 naming the message and what was expected (roles out of order, an assistant
            message last, empty content, an image in an assistant message, a tool message, more
            visual inputs than ``max_visuals``).
    """
    try:
        parsed = parse_messages([m.model_dump(exclude_none=True) for m in request.messages])
    except HimapError as exc:
        raise ApiError(400, str(exc), param=str(exc).split(":", 1)[0].split(".")[0] or "messages") from None
    visuals = parsed.visual_parts
    if len(visuals) > max_visuals:
        raise ApiError(400, f"{visuals[max_visuals].where}: {len(visuals)} visual inputs (images and videos) in the "
                            f"conversation; this server takes at most {max_visuals}", param="messages")
    return parsed


def video_options(part: Part, policy: VideoPolicy) -> VideoPolicy:
    """The sampling policy of a conversation's ``video_url`` part: its own ``fps`` / ``max_frames``
    (issue 29; checked by the conversation parser, ``max_frames`` bounded here by the server's
    ``--max-frames``). Its ``evs_rate`` goes with the part to ``Pipeline.prepare_conversation``.

    Raises:
        ApiError: 400 naming the field (``messages[2].content[0].video_url.max_frames``).
    """
    try:
        own = chat_video_options(part, policy.max_frames)
    except HimapError as exc:
        raise ApiError(400, str(exc).replace("(the most frames this server samples)", "(the server's --max-frames)"),
                       param=str(exc).split(" ", 1)[0]) from None
    return replace(policy, fps=policy.fps if own.fps is None else own.fps,
                   max_frames=policy.max_frames if own.max_frames is None else own.max_frames)


def sampling_params(request: ChatCompletionRequest) -> SamplingParams:
    """OpenAI's fields -> engine settings (defaults as OpenAI's: temperature 1, top_p 1)."""
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    max_tokens = request.max_completion_tokens or request.max_tokens
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if request.temperature is None else request.temperature,
                          top_p=1.0 if request.top_p is None else request.top_p, seed=request.seed, stop=tuple(stops),
                          ignore_eos=request.ignore_eos, presence_penalty=request.presence_penalty or 0.0,
                          frequency_penalty=request.frequency_penalty or 0.0,
                          repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
                          min_tokens=request.min_tokens or 0, logprobs=bool(request.logprobs),
                          top_logprobs=request.top_logprobs or 0, n=request.n or 1)


def logprobs_content(entries, tokenizer) -> list[dict]:
    """Engine log-probability entries -> OpenAI's ``logprobs.content`` items (token text, its UTF-8
    bytes, log-probability, ``top_logprobs``)."""
    def item(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**item(token, logprob), "top_logprobs": [item(t, lp) for t, lp in top]}
            for token, logprob, top in entries]


def _extension(completion: Completion, with_ids: bool) -> dict:
    out = {"image_tokens_per_segment": completion.image_tokens_per_segment}
    if with_ids:
        out["token_ids"] = completion.token_ids
    return out


def _failed(completion: Completion) -> ApiError:
    if completion.finish_reason == "cancelled":
        return ApiError(503, "the request was cancelled: the server is shutting down", code="shutting_down")
    return ApiError(500, f"generation failed: {completion.error}")


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application over ``state``: its start-up loads the model in a thread (``/health``
    answers 503 meanwhile), its shutdown finishes what runs and closes the backends."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        threading.Thread(target=state.load, name="himap-trt-loader", daemon=True).start()
        yield
        await to_thread.run_sync(state.close)

    app = FastAPI(title="himap-trt", version=_version(), docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  lifespan=lifespan)
    metrics = state.metrics
    config = state.config
    image_slots = asyncio.Semaphore(config.image_workers)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes, metrics=metrics)
    if config.api_key is not None:      # outermost: refused before the body is read
        app.add_middleware(ApiKeyAuth, key=config.api_key, metrics_auth=config.metrics_auth, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        metrics.errors.labels(str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        metrics.errors.labels(str(exc.status_code)).inc()
        return JSONResponse(error_body(str(exc.detail), type_=ApiError.TYPES.get(exc.status_code, "invalid_request_error")),
                            status_code=exc.status_code, headers=exc.headers)   # 405: Allow

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception):
        log.exception("unhandled error")
        metrics.errors.labels("500").inc()
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}", type_="server_error"),
                            status_code=500)

    def _available():
        if state.status == "ready" and state.engine is not None:
            return state.engine
        if state.status == "loading":
            raise ApiError(503, "the model is loading; retry when GET /health answers 200", code="loading")
        if state.status == "draining":
            raise ApiError(503, "the server is shutting down and accepts no new requests", code="draining")
        raise ApiError(503, f"the model failed to load: {state.error}", code="load_failed")

    @app.get("/health", response_model=Health, response_model_exclude_none=True, responses={503: {"model": Health}})
    async def health():
        if state.status == "ready":
            stalled = state.engine.stalled_s() if state.engine is not None else 0.0
            if stalled > config.wedged_after_s:
                return JSONResponse({"status": "wedged", "error": f"the engine has made no progress for "
                                     f"{stalled:.0f} s (over --wedged-after {config.wedged_after_s:g} s)"},
                                    status_code=503)
            return {"status": "ok"}
        return JSONResponse({"status": state.status, **({"error": state.error} if state.error else {})},
                            status_code=503)

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401))
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "himap-trt"}]}

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
        **(_errors(401) if config.metrics_auth and config.api_key else {})})
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={
        200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
              "description": "The answer: JSON, or server-sent events with \"stream\": true"},
        **_errors(400, 401, 413, 429, 500, 503)})
    async def chat_completions(http: Request):
        arrived = time.perf_counter()
        engine = _available()
        request = parse_request(await http.body())
        if request.model != config.model_name:
            raise ApiError(400, f"model: unknown model {request.model!r}; this server serves {config.model_name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        variable = engine.pipeline.arch.variable_image_tokens
        chat = conversation(request, MAX_VISUAL_INPUTS if variable else 1)
        try:
            params = sampling_params(request)
        except HimapError as exc:
            raise ApiError(400, str(exc), param=str(exc).split(":", 1)[0] if ":" in str(exc) else None) from None
        if params.n > engine.max_batch:
            raise ApiError(400, f"n: {params.n} choices need {params.n} slots; this server has {engine.max_batch} "
                                "(--max-batch)", param="n")
        for i, message in enumerate(chat.messages):     # every message's text, by bytes, before tokenizing
            for part in message.parts:
                if part.kind == "text":
                    try:
                        engine.check_question(part.text)
                    except HimapError as exc:
                        raise ApiError(400, f"messages[{i}].content: {exc}", param="messages") from None
        # admission, before decoding the image: requests being prepared count against the queue
        if state.preparing >= engine.room():
            raise ApiError(429, f"the queue is full ({engine.max_queue} requests waiting); retry later",
                           code="queue_full")
        state.preparing += 1
        try:
            async with image_slots:                 # at most image_workers conversations' images in memory at once
                visuals = []
                try:
                    for part in chat.visual_parts:      # each within the byte, pixel and memory bounds
                        visuals.append(await (open_video_url(part.source, part.where, replace(
                            video_options(part, config.videos), image_root=config.images.image_root))
                            if part.kind == "video" else open_image_url(part.source, part.where, config.images)))
                except ImageError as exc:
                    raise ApiError(400, str(exc), param=exc.param) from None
                try:
                    prompt = await to_thread.run_sync(engine.prepare_conversation, chat, visuals)
                except HimapError as exc:
                    message = str(exc)
                    raise ApiError(400, message if message.startswith("messages") else f"messages: {message}",
                                   param="messages") from None
                finally:
                    del visuals
        finally:
            state.preparing -= 1
        try:
            handle = engine.submit(prompt, params, loop=asyncio.get_running_loop(), arrived=arrived)
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="queue_full") from None
        except NotAccepting as exc:
            raise ApiError(503, str(exc), code="draining") from None
        ident, created = completion_id(), now()
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(_sse(handle, ident, created, config.model_name, include_usage,
                                          request.return_token_ids),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        completions, gone = await _wait(handle, http)
        if gone:                      # nobody to answer; counted as nginx's 499 "client closed request"
            metrics.errors.labels("499").inc()
            return Response(status_code=499)
        for completion in completions:
            if completion.finish_reason not in ("stop", "length"):
                raise _failed(completion)
        first = completions[0]
        generated = sum(len(c.token_ids) for c in completions)
        return {
            "id": ident, "object": "chat.completion", "created": created, "model": config.model_name,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": None if c.logprobs is None else
                         {"content": logprobs_content(c.logprobs, engine.tokenizer)},
                         "finish_reason": c.finish_reason} for c in completions],
            "usage": {"prompt_tokens": first.prompt_tokens, "completion_tokens": generated,
                      "total_tokens": first.prompt_tokens + generated},
            "himap": _extension(first, request.return_token_ids),
        }

    async def _wait(handle: RequestHandle, http: Request) -> tuple[list[Completion], bool]:
        """(every choice's completion, whether the client went away); cancels the request if it did."""
        async def consume():
            async for event in handle:
                pass
            return handle.results()

        task = asyncio.ensure_future(consume())
        gone = False
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result(), gone
                if not gone and await http.is_disconnected():
                    gone = True
                    handle.cancel()
        finally:
            handle.cancel()       # no-op once finished; frees the slot if this coroutine is cancelled

    async def _sse(handle: RequestHandle, ident: str, created: int, model: str, include_usage: bool, with_ids: bool):
        def chunk(index: int, delta: dict, finish_reason=None, logprobs=None, **extra) -> str:
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
                    **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        complete = False
        tokenizer = state.engine.tokenizer
        try:
            for index in range(handle.n):
                yield chunk(index, {"role": "assistant", "content": ""})
            async for event in handle:
                if isinstance(event, Delta):
                    yield chunk(event.index, {"content": event.text}, logprobs=None if event.logprobs is None else
                                {"content": logprobs_content(event.logprobs, tokenizer)})
                    continue
                if event.finish_reason in ("stop", "length"):
                    yield chunk(event.index, {}, event.finish_reason, himap=_extension(event, with_ids))
                else:
                    error = _failed(event)
                    metrics.errors.labels(str(error.status)).inc()
                    yield f"data: {json.dumps(error_body(error.message, type_=ApiError.TYPES[error.status]))}\n\n"
            if include_usage:
                done = handle.results()
                generated = sum(len(c.token_ids) for c in done)
                body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": {"prompt_tokens": done[0].prompt_tokens, "completion_tokens": generated,
                                                 "total_tokens": done[0].prompt_tokens + generated}}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
            complete = True
        finally:
            handle.cancel()       # the client disconnected (or we are done): free the slot
            if not complete:
                metrics.errors.labels("499").inc()

    def openapi() -> dict:
        """FastAPI's schema of the routes, with the request body the handler parses itself."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="OpenAI-compatible chat completions with in-decoder image-token pruning.")
            request = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(request.pop("$defs", {}))
            components["ChatCompletionRequest"] = request
            post = schema["paths"]["/v1/chat/completions"]["post"]
            post["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}
            post["responses"]["429"]["headers"] = {"Retry-After": {
                "description": "seconds to wait before retrying", "schema": {"type": "integer"}, "required": True}}
            if config.api_key is not None:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, operations in schema["paths"].items():
                    if path.startswith("/v1/") or (config.metrics_auth and path == "/metrics"):
                        for operation in operations.values():
                            operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _errors(*statuses: int) -> dict:
    """FastAPI ``responses`` entries: OpenAI's error body for each status."""
    text = {400: "Malformed request", 401: "Missing or wrong API key", 413: "Request body too large",
            429: "Queue full", 500: "Server failure", 503: "Loading, draining, or failed to load"}
    return {status: {"model": ErrorResponse, "description": text[status]} for status in statuses}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("himap-trt")
    except PackageNotFoundError:
        return "0"
