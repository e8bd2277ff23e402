"""The Triton Python-backend models (``model.py`` of the repository imports these classes).

``HimapModel`` (the ``himap`` model, decoupled): each instance is a stub process that opens the
export's pipeline once (ONNX Runtime on CPU for ``KIND_CPU`` instances; TensorRT engines or ONNX
Runtime CUDA on its GPU for ``KIND_GPU``) and runs a scheduler over it. ``execute`` validates each
request, decodes its image and hands it to the scheduler, then returns at once, so Triton can pass
the instance more requests while earlier ones decode. Each decode step's new text is sent as one
response; the final response carries the token ids, the image tokens kept per segment and the
finish reason (:mod:`himap_trt.triton.protocol`). Bad input is answered with a ``TritonError``
naming the input; a cancelled request (client gone) stops within one step.

``HimapUnaryModel`` (``himap_unary``): for clients that want one response (HTTP ``/infer``, which
Triton refuses for decoupled models): a BLS model that streams from ``himap`` and joins the pieces.

The instance exports its queue, running batch and tokens as custom metrics on Triton's ``/metrics``
(``himap_queue_length``, ``himap_running_requests``, ``himap_generation_tokens_total``...), for
autoscaling (docs/DEPLOY.md).

Nothing here imports ``triton_python_backend_utils`` at module level: it exists only inside a stub.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from himap_trt.errors import HimapError
from himap_trt.runtime.engine import Completion, Engine, SamplingParams
from himap_trt.runtime.loader import open_pipeline
from himap_trt.triton import protocol

log = logging.getLogger("himap_trt.triton")


def _pb():
    import triton_python_backend_utils as pb_utils  # provided by the stub

    return pb_utils


def _parameters(model_config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def inside(base: Path, relative: str, what: str) -> Path:
    """``base / relative``, refusing paths that leave ``base`` (repositories are relocatable).

    Raises:
        HimapError: absolute paths or ``..`` escaping ``base``.
    """
    path = (base / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(base.resolve()):
        raise HimapError(f"parameter {what}={relative!r} must be a path inside the version directory {base}")
    return path


def triton_error(message: str, code: str = "INVALID_ARG"):
    """A ``TritonError`` with a status code where the stub supports codes (HTTP 400 / 503 / 500)."""
    pb = _pb()
    value = getattr(pb.TritonError, code, None)
    return pb.TritonError(message) if value is None else pb.TritonError(message, value)


def _error_code(exc: Exception) -> str:
    return "UNAVAILABLE" if type(exc).__name__ in ("QueueFull", "NotAccepting") else "INVALID_ARG"


def error_code(message: str) -> str:
    """The status of a ``himap`` error seen through BLS, from its message: Triton 2.51 delivers the
    errors of decoupled BLS responses as INTERNAL whatever their code, and ``himap`` answers only
    user errors (HimapError), a full queue or a draining engine, and bugs ("internal error: ...")."""
    if message.startswith("internal error"):
        return "INTERNAL"
    if "queue is full" in message or "shutting down" in message:
        return "UNAVAILABLE"
    return "INVALID_ARG"


# -- events between a scheduler and a response stream ---------------------------------------------
@dataclass
class Done:
    """A finished request (``error`` set when it failed)."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    image_tokens_per_segment: list[int] = field(default_factory=list)
    kept_image_positions: list[list[int]] = field(default_factory=list)
    error: str | None = None


class ResponseStream:
    """Sends one request's events as Triton responses (thread-safe enough: one writer per request)."""

    def __init__(self, request: Any, metrics: _Metrics | None):
        self.pb = _pb()
        self.request = request
        self.sender = request.get_response_sender()
        self.metrics = metrics
        self.closed = False

    def cancelled(self) -> bool:
        try:
            return bool(self.request.is_cancelled())
        except Exception:   # an older stub without cancellation
            return False

    def _response(self, text: str, done: Done | None):
        pb = self.pb
        done = done or Done()
        positions = [p for stage in done.kept_image_positions for p in stage]
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("text", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb.Tensor("token_ids", np.array(done.token_ids, dtype=np.int64)),
            pb.Tensor("kept_image_tokens", np.array(done.image_tokens_per_segment, dtype=np.int32)),
            pb.Tensor("kept_image_positions", np.array(positions, dtype=np.int32)),
            pb.Tensor("finish_reason", np.array([done.finish_reason.encode()], dtype=np.object_)),
        ])

    def piece(self, text: str) -> None:
        if not self.closed and text:
            self.sender.send(self._response(text, None))

    def done(self, event: Done, last_text: str = "", code: str = "INVALID_ARG") -> None:
        if self.closed:
            return
        self.closed = True
        pb = self.pb
        if event.error is not None:
            self.sender.send(pb.InferenceResponse(error=triton_error(event.error, code)),
                             flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        elif event.finish_reason == "cancelled":
            self.sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        else:
            self.sender.send(self._response(last_text, event), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if self.metrics is not None:
            self.metrics.finished(event)

    def fail(self, message: str, code: str = "INVALID_ARG") -> None:
        """Answer with a Triton error: ``INVALID_ARG`` (HTTP 400) for bad input, ``UNAVAILABLE``
        (503) for a full queue, ``INTERNAL`` (500) for a bug."""
        self.done(Done(error=message, finish_reason="error"), code=code)


# -- schedulers -----------------------------------------------------------------------------------
class EngineScheduler:
    """Continuous batching: :class:`~himap_trt.runtime.engine.Engine` over the pipeline's slot KV caches.

    One asyncio loop thread prepares requests (tokenizer, image processor) and forwards every
    request's engine events to its response stream; the engine's scheduler thread runs the model.
    """

    def __init__(self, pipeline: Any, max_batch: int, max_queue: int, max_seq_len: int | None = None, on_step=None):
        import asyncio

        self.asyncio = asyncio
        self.engine = Engine(pipeline, max_batch=max_batch, max_queue=max_queue, max_seq_len=max_seq_len,
                             on_step=on_step).start()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="himap-triton-streams", daemon=True)
        self.thread.start()

    def submit(self, parsed: protocol.ParsedRequest, stream: ResponseStream) -> None:
        self.asyncio.run_coroutine_threadsafe(self._serve(parsed, stream), self.loop)

    async def _serve(self, parsed: protocol.ParsedRequest, stream: ResponseStream) -> None:
        try:
            if parsed.conversation is not None:      # its video parts carry their own EVS rates
                prompt = await self.loop.run_in_executor(None, self.engine.prepare_conversation, parsed.conversation,
                                                         parsed.visuals)
            else:
                prompt = await self.loop.run_in_executor(None, self.engine.prepare, parsed.image, parsed.question)
                if parsed.evs_rate is not None:
                    prompt.evs_rates = [parsed.evs_rate]       # the request's own EVS rate (runtime/evs.py)
            config = parsed.config
            params = SamplingParams(max_tokens=config.max_new_tokens, temperature=config.temperature,
                                    top_p=config.top_p, seed=config.seed, ignore_eos=parsed.ignore_eos)
            handle = self.engine.submit(prompt, params, loop=self.loop)
        except HimapError as exc:
            stream.fail(str(exc), _error_code(exc))
            return
        try:
            async for event in handle:
                if stream.cancelled():
                    handle.cancel()
                if isinstance(event, Completion) and event.finish_reason == "error":
                    message = event.error or "internal error: the request failed"
                    stream.fail(message, error_code(message))
                elif isinstance(event, Completion):
                    stream.done(Done(event.token_ids, event.finish_reason or "", event.image_tokens_per_segment,
                                     event.kept_image_positions))
                else:
                    stream.piece(event.text)
        except Exception as exc:   # a bug: answer rather than leave the client waiting
            log.exception("streaming a request failed")
            handle.cancel()
            stream.fail(f"internal error: {type(exc).__name__}: {exc}", "INTERNAL")

    def counts(self) -> tuple[int, int]:
        stats = self.engine.stats()
        return stats.waiting, stats.running

    def close(self) -> None:
        self.engine.stop(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# -- metrics --------------------------------------------------------------------------------------
class _Metrics:
    """Custom metrics of one instance on Triton's ``/metrics`` (labels: model, version, instance)."""

    def __init__(self, labels: dict[str, str], counts):
        pb = _pb()
        gauge, counter = pb.MetricFamily.GAUGE, pb.MetricFamily.COUNTER
        self._families = {
            "queue": pb.MetricFamily("himap_queue_length", "Requests waiting for a slot.", gauge),
            "running": pb.MetricFamily("himap_running_requests", "Requests in the running batch.", gauge),
            "tokens": pb.MetricFamily("himap_generation_tokens_total", "Tokens generated.", counter),
            "requests": pb.MetricFamily("himap_requests_total", "Finished requests by finish reason.", counter),
            "kept": pb.MetricFamily("himap_kept_image_tokens_total", "Image tokens kept, per decoder segment.",
                                    counter),
            "steps": pb.MetricFamily("himap_model_steps_total", "Prefill and decode steps of the engine (each "
                                     "serves every running request).", counter),
            "stepped": pb.MetricFamily("himap_model_step_requests_total", "Requests served by those steps (divide "
                                       "by himap_model_steps_total: the mean batch).", counter),
        }
        self.labels = labels
        self.queue = self._families["queue"].Metric(labels=labels)
        self.running = self._families["running"].Metric(labels=labels)
        self.tokens = self._families["tokens"].Metric(labels=labels)
        self._by_label: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self.counts = counts

    def _labelled(self, family: str, key: str, value: str):
        with self._lock:
            if (family, value) not in self._by_label:
                self._by_label[(family, value)] = self._families[family].Metric(labels={**self.labels, key: value})
            return self._by_label[(family, value)]

    def step(self, phase: str, requests: int, seconds: float) -> None:
        """The engine's ``on_step`` callback (its scheduler thread)."""
        self._labelled("steps", "phase", phase).increment(1)
        self._labelled("stepped", "phase", phase).increment(requests)

    def update(self) -> None:
        waiting, running = self.counts()
        self.queue.set(waiting)
        self.running.set(running)

    def finished(self, event: Done) -> None:
        self.tokens.increment(len(event.token_ids))
        self._labelled("requests", "finish_reason", event.finish_reason or "error").increment(1)
        for segment, kept in enumerate(event.image_tokens_per_segment):
            self._labelled("kept", "segment", str(segment)).increment(kept)
        self.update()


# -- the models -----------------------------------------------------------------------------------
class HimapModel:
    """``TritonPythonModel`` of the ``himap`` model (decoupled, streaming)."""

    def initialize(self, args: dict) -> None:
        pb = _pb()
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="himap %(levelname)s %(message)s")
        config = json.loads(args["model_config"])
        if not pb.using_decoupled_model_transaction_policy(config):
            raise pb.TritonModelException(f"model {args['model_name']!r} must be decoupled "
                                          "(model_transaction_policy { decoupled: true })")
        params = _parameters(config)
        try:
            self._open(args, params)
        except HimapError as exc:   # Triton logs the message and marks the model unavailable
            raise pb.TritonModelException(f"{args['model_name']}: {exc}") from None
        labels = {"model": args["model_name"], "version": args["model_version"], "instance": args["model_instance_name"]}
        self.metrics = _Metrics(labels, self.scheduler.counts)
        self.metrics.update()

    def _open(self, args: dict, params: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        export_dir = inside(version_dir, params.get("export_dir", "export"), "export_dir")
        engines_dir = inside(version_dir, params.get("engines_dir", "engines"), "engines_dir")
        try:
            max_batch = int(params.get("max_batch", "8"))
            max_queue = int(params.get("max_queue", "256"))
            max_seq_len = int(params.get("max_seq_len") or 0) or None
            self.default_max_tokens = int(params.get("default_max_tokens", "32"))
        except ValueError as exc:
            raise HimapError("parameters max_batch, max_queue, max_seq_len and default_max_tokens must be integers: "
                             f"{exc}") from None
        backend = params.get("backend", "auto")
        if args["model_instance_kind"] == "GPU":
            import torch

            device_id = int(args["model_instance_device_id"])
            torch.cuda.set_device(device_id)
            device = "cuda"
        else:
            device = "cpu"
            if backend in ("auto", "tensorrt"):
                backend = "onnxruntime"   # a CPU instance runs ONNX Runtime on CPU
        opened = open_pipeline(export_dir=export_dir, backend=backend, engines_dir=engines_dir, device=device)
        self.pipeline = opened.pipeline
        self.metrics = None
        self.scheduler = EngineScheduler(opened.pipeline, max_batch, max_queue, max_seq_len, on_step=self._stepped)
        engine = self.scheduler.engine
        log.warning("%s: %s on %s (%s), continuous batching: %d slots of %d tokens, %.1f MB of KV cache",
                    args["model_instance_name"], opened.backend, opened.device, export_dir, max_batch,
                    engine.max_seq_len, engine.cache.nbytes() / 1e6)

    def _stepped(self, phase: str, requests: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.step(phase, requests, seconds)

    def execute(self, requests: list) -> None:
        pb = _pb()
        for request in requests:
            stream = ResponseStream(request, self.metrics)

            def get(name: str, request=request):
                tensor = pb.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            try:
                parsed = protocol.parse_request(get, self.default_max_tokens)
            except HimapError as exc:
                stream.fail(str(exc))
                continue
            self.scheduler.submit(parsed, stream)
        self.metrics.update()
        return None

    def finalize(self) -> None:
        self.scheduler.close()
        self.pipeline.close()


class HimapUnaryModel:
    """``TritonPythonModel`` of ``himap_unary``: one response per request, joined from ``himap``'s stream.

    Each request is forwarded from a worker thread (BLS ``exec(decoupled=True)``) and answered
    through its response sender, so one instance serves many requests at once.
    """

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = _parameters(config)
        self.stream_model = params.get("stream_model", "himap")
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("max_concurrency", "256")),
                                       thread_name_prefix="himap-unary")

    def execute(self, requests: list) -> None:
        pb = _pb()
        for request in requests:
            sender = request.get_response_sender()
            inputs = []
            for name in protocol.INPUT_NAMES:
                tensor = pb.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs.append(pb.Tensor(name, tensor.as_numpy().copy()))
            self.pool.submit(self._forward, inputs, sender)
        return None

    def _forward(self, inputs: list, sender: Any) -> None:
        pb = _pb()
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            bls = pb.InferenceRequest(model_name=self.stream_model, inputs=inputs,
                                      requested_output_names=list(protocol.OUTPUT_NAMES))
            answer = protocol.Answer()
            for response in bls.exec(decoupled=True):
                if response.has_error():
                    message = response.error().message()
                    sender.send(pb.InferenceResponse(error=triton_error(message, error_code(message))), flags=final)
                    return

                def get(name: str, response=response):
                    tensor = pb.get_output_tensor_by_name(response, name)
                    return None if tensor is None else tensor.as_numpy()

                if response.output_tensors():
                    answer.add(get)
            positions = [p for stage in answer.kept_image_positions for p in stage]
            sender.send(pb.InferenceResponse(output_tensors=[
                pb.Tensor("text", np.array([answer.text.encode("utf-8")], dtype=np.object_)),
                pb.Tensor("token_ids", np.array(answer.token_ids, dtype=np.int64)),
                pb.Tensor("kept_image_tokens", np.array(answer.kept_image_tokens, dtype=np.int32)),
                pb.Tensor("kept_image_positions", np.array(positions, dtype=np.int32)),
                pb.Tensor("finish_reason", np.array([answer.finish_reason.encode()], dtype=np.object_)),
            ]), flags=final)
        except Exception as exc:
            log.exception("forwarding to %s failed", self.stream_model)
            sender.send(pb.InferenceResponse(error=triton_error(f"internal error: {type(exc).__name__}: {exc}",
                                                                "INTERNAL")), flags=final)

    def finalize(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
