"""The OpenAI-compatible HTTP API (FastAPI) in front of the continuous-batching engine.

Routes: ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``,
``GET /health`` (200 once every graph is loaded), ``GET /metrics`` (Prometheus).

Errors are OpenAI-shaped JSON (``{"error": {"message", "type", "param", "code"}}``): 400 for a
malformed request, 404 for an unknown route, 413 for a body over ``--max-body-bytes``, 429 when the
queue is full, 503 while loading or draining, 500 for a failure of the server itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

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
from himap_trt.serve.metrics import ServerMetrics
from himap_trt.serve.protocol import (
    ChatCompletionRequest,
    ImagePart,
    MAX_STOP,
    UNSUPPORTED,
    completion_id,
    error_body,
    now,
)

log = logging.getLogger("himap_trt.serve")

#: Seconds between checks that a client waiting for a non-streamed answer is still connected.
DISCONNECT_POLL_S = 0.25


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
        max_seq_len: most tokens (prompt + generated) per request (None: the export's).
        max_body_bytes: largest request body accepted (bytes); larger ones get 413.
        drain_timeout_s: on SIGTERM, most seconds to wait for requests in flight (seconds).
        require_signature: EC public key (PEM) whose model-signing signature the export (and engines)
            must carry, verified again when the pipeline loads (see :mod:`himap_trt.signing`).
    """

    export_dir: Path
    backend: str = "auto"
    device: str | None = None
    engines_dir: Path | None = None
    max_batch: int = 8
    max_queue: int = 64
    model_name: str = "himap-trt"
    images: ImagePolicy = field(default_factory=ImagePolicy)
    max_seq_len: int | None = None
    max_body_bytes: int = 32 * 2**20
    drain_timeout_s: float = 600.0
    require_signature: Path | None = None


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

    def load(self) -> None:
        """Open the pipeline, allocate the slots and start the engine (runs in a thread)."""
        config = self.config
        try:
            started = time.perf_counter()
            opened = open_pipeline(export_dir=config.export_dir, backend=config.backend, engines_dir=config.engines_dir,
                                   device=config.device, require_signature=config.require_signature)
            self.pipeline = opened.pipeline
            engine = Engine(opened.pipeline, max_batch=config.max_batch, max_queue=config.max_queue,
                            max_seq_len=config.max_seq_len, on_finish=self.metrics.finished, on_step=self.metrics.step)
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

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, type_=self.TYPES.get(self.status, "invalid_request_error"),
                                       param=self.param, code=self.code), status_code=self.status)


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
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_request(body: bytes) -> ChatCompletionRequest:
    """Body bytes -> a validated request.

    Raises:
        ApiError: 400 naming the field (invalid JSON, missing or mistyped fields, unsupported options).
    """
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _field(first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
    if request.n not in (None, 1):
        raise ApiError(400, f"n: this server returns one choice per request (n=1), got n={request.n}", param="n")
    extra = request.model_extra or {}
    for name, off in UNSUPPORTED.items():
        if name in extra and extra[name] not in off:
            raise ApiError(400, f"{name}: not supported by this server", param=name)
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOP} non-empty strings", param="stop")
    return request


def image_and_question(request: ChatCompletionRequest) -> tuple[str, str, str]:
    """(image URL, its field name, question text) of a one-user-message request.

    Raises:
        ApiError: 400 unless the conversation is one user message with one image and some text.
    """
    if len(request.messages) != 1 or request.messages[0].role != "user":
        roles = ", ".join(m.role for m in request.messages)
        raise ApiError(400, f"messages: expected one user message with one image_url part and text (LLaVA-1.5 "
                            f"prompts hold one image and one question), got roles [{roles}]", param="messages")
    content = request.messages[0].content
    parts = [] if content is None else content if isinstance(content, list) else []
    images = [(i, p) for i, p in enumerate(parts) if isinstance(p, ImagePart)]
    if not images:
        raise ApiError(400, "messages[0].content: no image; add a part {\"type\": \"image_url\", \"image_url\": "
                            "{\"url\": \"data:image/png;base64,...\"}}", param="messages[0].content")
    if len(images) > 1:
        raise ApiError(400, f"messages[0].content: {len(images)} images; the model takes one image per prompt",
                       param="messages[0].content")
    texts = [content] if isinstance(content, str) else [p.text for p in parts if not isinstance(p, ImagePart)]
    question = "\n".join(t for t in texts if t and t.strip())
    if not question.strip():
        raise ApiError(400, "messages[0].content: no text; add a part {\"type\": \"text\", \"text\": \"...\"}",
                       param="messages[0].content")
    index, part = images[0]
    return part.image_url.url, f"messages[0].content[{index}].image_url.url", question


def sampling_params(request: ChatCompletionRequest) -> SamplingParams:
    """OpenAI's fields -> engine settings (defaults as OpenAI's: temperature 1, top_p 1)."""
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    max_tokens = request.max_completion_tokens or request.max_tokens
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if request.temperature is None else request.temperature,
                          top_p=1.0 if request.top_p is None else request.top_p, seed=request.seed, stop=tuple(stops),
                          ignore_eos=request.ignore_eos)


def _usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": len(completion.token_ids),
            "total_tokens": completion.prompt_tokens + len(completion.token_ids)}


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

    app = FastAPI(title="himap-trt", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = state.metrics
    config = state.config
    app.add_middleware(BodyLimit, limit=config.max_body_bytes, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        metrics.errors.labels(str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        metrics.errors.labels(str(exc.status_code)).inc()
        return JSONResponse(error_body(str(exc.detail), type_=ApiError.TYPES.get(exc.status_code, "invalid_request_error")),
                            status_code=exc.status_code)

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

    @app.get("/health")
    async def health():
        if state.status == "ready":
            return {"status": "ok"}
        return JSONResponse({"status": state.status, **({"error": state.error} if state.error else {})},
                            status_code=503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "himap-trt"}]}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        arrived = time.perf_counter()
        engine = _available()
        request = parse_request(await http.body())
        if request.model != config.model_name:
            raise ApiError(400, f"model: unknown model {request.model!r}; this server serves {config.model_name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        url, param, question = image_and_question(request)
        try:
            params = sampling_params(request)
        except HimapError as exc:
            raise ApiError(400, str(exc)) from None
        if engine.stats().waiting >= engine.max_queue:     # refuse before decoding the image
            raise ApiError(429, f"the queue is full ({engine.max_queue} requests waiting); retry later",
                           code="queue_full")
        try:
            image = await open_image_url(url, param, config.images)
        except ImageError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        try:
            prompt = await to_thread.run_sync(engine.prepare, image, question)
        except HimapError as exc:
            raise ApiError(400, f"messages: {exc}", param="messages") from None
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
        completion, gone = await _wait(handle, http)
        if gone:                      # nobody to answer; counted as nginx's 499 "client closed request"
            metrics.errors.labels("499").inc()
            return Response(status_code=499)
        if completion.finish_reason not in ("stop", "length"):
            raise _failed(completion)
        return {
            "id": ident, "object": "chat.completion", "created": created, "model": config.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "logprobs": None, "finish_reason": completion.finish_reason}],
            "usage": _usage(completion),
            "himap": _extension(completion, request.return_token_ids),
        }

    async def _wait(handle: RequestHandle, http: Request) -> tuple[Completion, bool]:
        """(the completion, whether the client went away); cancels the request if it did."""
        async def consume():
            async for event in handle:
                if isinstance(event, Completion):
                    return event

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
        def chunk(delta: dict, finish_reason=None, **extra) -> str:
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        complete = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for event in handle:
                if isinstance(event, Delta):
                    yield chunk({"content": event.text})
                    continue
                if event.finish_reason in ("stop", "length"):
                    yield chunk({}, event.finish_reason, himap=_extension(event, with_ids))
                    if include_usage:
                        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": [], "usage": _usage(event)}
                        yield f"data: {json.dumps(body)}\n\n"
                else:
                    error = _failed(event)
                    metrics.errors.labels(str(error.status)).inc()
                    yield f"data: {json.dumps(error_body(error.message, type_=ApiError.TYPES[error.status]))}\n\n"
            yield "data: [DONE]\n\n"
            complete = True
        finally:
            handle.cancel()       # the client disconnected (or we are done): free the slot
            if not complete:
                metrics.errors.labels("499").inc()

    return app
