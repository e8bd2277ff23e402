"""Continuous batching over slot KV caches: one scheduler thread owns the pipeline.

Each running request owns one slot of a :class:`~himap_trt.runtime.kv_cache.SlotKVCache` (per
segment, its own length). One iteration of the scheduler::

    drop cancelled requests ─► release their slots
    admit waiting requests  ─► prefill them into free slots (one batch of equal-length prompts)
                               first token of each (TTFT)
    one decode step         ─► every running request, whatever its length, one token each
    finished requests       ─► release their slots

so a request joins the running batch between decode steps and leaves it within one step of
finishing, stopping, or being cancelled (a client that disconnected). Prompts are batched at
prefill only when they have the same length: no padding enters a slot, and a request's tokens do
not depend on the requests next to it (fp32 ONNX Runtime: the same tokens as the request alone,
the slot API's contract).

No HTTP here: ``himap_trt.serve`` puts the OpenAI API in front of it. Usable on its own::

    engine = Engine(pipeline, max_batch=8)
    engine.start()
    completion = engine.generate(image, "What is shown?", SamplingParams(max_tokens=32, temperature=0))
    engine.stop()

Length (~570 lines, over the ~500 of the house style): the :class:`Engine` class is one scheduler
loop whose admission, prefill, decode and release steps share its lock, slots and queues; split
across modules, a reader would have to follow one iteration through several files.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from himap_trt.errors import HimapError
from himap_trt.prompt import PromptBatch
from himap_trt.runtime.sampling import GenerationConfig, TokenChooser

log = logging.getLogger(__name__)

#: max_tokens of a request that gave none, on a pipeline without max_seq_len (tokens).
UNLIMITED = 2**31
#: Test-only fault injection (see :class:`FaultPlan`); never set in production.
FAULT_ENV = "HIMAP_TRT_TEST_FAULT"


class QueueFull(HimapError):
    """The waiting queue holds ``max_queue`` requests already (HTTP 429)."""


class NotAccepting(HimapError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


class FaultPlan:
    """Test-only faults injected into the engine's backend calls, read from ``HIMAP_TRT_TEST_FAULT``.

    The variable holds comma-separated ``PHASE:N[:ACTION]`` items: before the N-th (1-based) call of
    ``PHASE`` (``prefill`` or ``decode``), ``error`` (the default) raises a RuntimeError as a crashing
    backend would, and ``hang=S`` sleeps S seconds (a wedged backend). Example:
    ``HIMAP_TRT_TEST_FAULT=decode:5,prefill:9:hang=3``. Used by the reliability tests and
    benchmarks/serve_faults.py; unset (the default) it costs one dictionary lookup per call.

    Raises:
        HimapError: a malformed value (naming the variable and the item).
    """

    def __init__(self, text: str | None):
        self.faults: dict[tuple[str, int], tuple[str, float]] = {}
        self.calls = {"prefill": 0, "decode": 0}
        for item in (text or "").split(","):
            if not item.strip():
                continue
            fields = item.strip().split(":")
            try:
                phase, number = fields[0], int(fields[1])
                action = fields[2] if len(fields) > 2 else "error"
                seconds = float(action.split("=", 1)[1]) if action.startswith("hang=") else 0.0
                valid = (phase in self.calls and number >= 1 and len(fields) <= 3
                         and (action == "error" or action.startswith("hang=") and seconds >= 0))
            except (IndexError, ValueError):
                valid = False
            if not valid:
                raise HimapError(f"{FAULT_ENV}: {item.strip()!r} is not PHASE:N[:error|hang=SECONDS] with PHASE "
                                 "prefill or decode and N >= 1 (a test-only hook; unset it)")
            self.faults[(phase, number)] = ("hang" if action.startswith("hang=") else "error", seconds)

    def before(self, phase: str) -> None:
        """Called before each backend call of ``phase``: raise or sleep where the plan says."""
        self.calls[phase] += 1
        fault = self.faults.get((phase, self.calls[phase]))
        if fault is None:
            return
        kind, seconds = fault
        log.warning("%s: injecting %s into %s call %d", FAULT_ENV, kind, phase, self.calls[phase])
        if kind == "hang":
            time.sleep(seconds)
            return
        raise RuntimeError(f"injected fault ({FAULT_ENV}) in {phase} call {self.calls[phase]}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    Attributes:
        max_tokens: most tokens to generate (tokens); None: up to the export's ``max_seq_len``.
        temperature: 0 for greedy decoding, > 0 to sample.
        top_p: nucleus threshold in (0, 1] (1: off).
        seed: seed of this request's own sampling generator (None: nondeterministic).
        stop: strings that end the answer; the answer is cut before the first one found.
        ignore_eos: keep generating after EOS (for benchmarks that need a fixed answer length).
    """

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise HimapError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise HimapError("stop strings must not be empty")
        GenerationConfig(max_new_tokens=1, temperature=self.temperature, top_p=self.top_p, seed=self.seed)


@dataclass
class Completion:
    """A finished request.

    Attributes:
        request_id: the engine's id of the request.
        text: the answer (special tokens skipped, cut before a stop string).
        token_ids: generated ids (EOS included when it ended the answer).
        finish_reason: ``stop`` (EOS or a stop string), ``length`` (max_tokens or max_seq_len),
            ``cancelled`` (the caller cancelled, e.g. a client disconnected) or ``error``.
        prompt_tokens: prompt tokens (tokens, image tokens included).
        image_tokens_per_segment: image tokens each decoder segment kept for this request (tokens).
        kept_image_positions: per pruning stage, the prompt positions of the image tokens kept.
        ttft_s: seconds from arrival to the first token.
        e2e_s: seconds from arrival to the end.
        token_times: ``time.perf_counter()`` when each token was produced (seconds).
        error: the message when ``finish_reason == 'error'``.
    """

    request_id: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    image_tokens_per_segment: list[int] = field(default_factory=list)
    kept_image_positions: list[list[int]] = field(default_factory=list)
    ttft_s: float | None = None
    e2e_s: float | None = None
    token_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Mean seconds per output token after the first (None with fewer than two tokens)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


@dataclass(frozen=True)
class Delta:
    """One generated token of a running request (streaming) and the answer text it makes ready (may be
    empty: text that could still become a stop string, or an incomplete UTF-8 character, waits)."""

    text: str
    token_ids: list[int]


class RequestHandle:
    """The caller's side of a submitted request: a stream of :class:`Delta` then one :class:`Completion`.

    Iterate it (``for event in handle``) from a thread, or ``async for event in handle`` when it was
    submitted with an event loop. :meth:`cancel` frees the request's slot within one decode step.
    """

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop | None):
        self.request_id = request_id
        self._loop = loop
        self._sync: queue.SimpleQueue | None = None if loop else queue.SimpleQueue()
        self._async: asyncio.Queue | None = asyncio.Queue() if loop else None
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.completion: Completion | None = None

    def cancel(self) -> None:
        """Ask the engine to stop this request (no-op once it has finished)."""
        self.cancelled.set()

    def _put(self, event: Delta | Completion) -> None:
        if isinstance(event, Completion):
            self.completion = event
            self.done.set()
        if self._loop is None:
            self._sync.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._async.put_nowait, event)
        except RuntimeError:   # the loop is closed: nobody is listening any more
            self.cancel()

    def __iter__(self):
        if self._sync is None:
            raise TypeError("this request was submitted with an event loop; use `async for`")
        while True:
            event = self._sync.get()
            yield event
            if isinstance(event, Completion):
                return

    async def __aiter__(self):
        if self._async is None:
            raise TypeError("this request was submitted without an event loop; iterate it from a thread")
        while True:
            event = await self._async.get()
            yield event
            if isinstance(event, Completion):
                return

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request finished (thread callers); consumes the stream.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds (None: wait for ever).
        """
        if self._sync is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    event = self._sync.get(timeout=remaining)
                except queue.Empty:
                    raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s") from None
                if isinstance(event, Completion):
                    return event
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self.completion


class _Request:
    """Scheduler-side state of one request (owned by the scheduler thread once admitted)."""

    def __init__(self, request_id: int, prompt: PromptBatch, params: SamplingParams, handle: RequestHandle,
                 arrived: float, device: torch.device):
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.handle = handle
        self.arrived = arrived
        self.length = int(prompt.input_ids.shape[1])
        # prefilled together only with prompts of the same length and image-token count (no padding, no masked slots)
        self.group_key = (self.length, tuple(prompt.image_tokens or ()))
        self.chooser = TokenChooser(GenerationConfig(max_new_tokens=1, temperature=params.temperature,
                                                     top_p=params.top_p, seed=params.seed), device)
        self.slot: int | None = None
        self.next_position = 0          # RoPE position of the token fed at the next decode step
        self.limit = 0                  # most tokens this request may generate
        self.sent = 0                   # characters of the answer already streamed
        self.completion = Completion(request_id, prompt_tokens=int(prompt.attention_mask.sum()))


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the scheduler (for /metrics and tests)."""

    waiting: int
    running: int
    free_slots: int
    max_batch: int
    steps: int


class Engine:
    """Continuous batching over one pipeline's slot caches.

    Args:
        pipeline: a :class:`~himap_trt.runtime.pipeline.Pipeline` (any backend) with the slot API
            (``allocate``, ``prefill(..., cache=, slots=)``, ``decode_step``, ``release``).
        max_batch: slots, i.e. most requests decoded together (requests).
        max_queue: most requests waiting for a slot; :meth:`submit` raises :class:`QueueFull` beyond.
        max_prefill_batch: most prompts prefilled in one call (default: ``max_batch``).
        max_seq_len: most tokens (prompt + generated) per request (tokens); default and upper bound:
            the pipeline's. Slot buffers are this long, and every decode step attends over them.
            Questions longer than ``max_question_bytes`` (derived from it) are refused before tokenizing.
        on_finish: called in the scheduler thread with each :class:`Completion` (metrics).
        on_step: called in the scheduler thread after each model call as ``on_step(phase, requests,
            seconds)``, phase ``prefill`` or ``decode`` (metrics).
    """

    def __init__(self, pipeline: Any, *, max_batch: int = 8, max_queue: int = 64, max_prefill_batch: int | None = None,
                 max_seq_len: int | None = None, on_finish=None, on_step=None):
        if max_batch < 1:
            raise HimapError(f"--max-batch must be at least 1, got {max_batch}")
        if max_queue < 0:
            raise HimapError(f"--max-queue must be >= 0, got {max_queue}")
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_batch = max_prefill_batch or max_batch
        self.on_finish = on_finish
        self.on_step = on_step
        self.tokenizer = pipeline.processor.tokenizer
        self.eos_token_ids = set(pipeline.eos_token_ids)
        limit = pipeline.max_seq_len
        if max_seq_len is not None and limit is not None and max_seq_len > limit:
            raise HimapError(f"--max-seq-len {max_seq_len} exceeds the export's max_seq_len {limit}")
        self.max_seq_len = max_seq_len or limit
        self.cache = pipeline.allocate(max_batch, max_seq_len=self.max_seq_len)
        self.max_question_bytes = question_byte_limit(self.tokenizer, self.max_seq_len)
        # The processor's fast tokenizer is not safe to use from several threads at once (prepare sets
        # its padding): the scheduler thread alone decodes with the pipeline's; each thread that
        # prepares prompts has its own copy, so no lock is shared and a long prompt stalls nobody.
        self._local = threading.local()
        self._faults = FaultPlan(os.environ.get(FAULT_ENV))
        self._iteration_started: float | None = None
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._prefilling: list[_Request] = []   # admitted (slots assigned), prefill not finished
        self._accepting = True
        self._stop = False
        self._ids = itertools.count(1)
        self._steps = 0
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the scheduler thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="himap-trt-scheduler", daemon=True)
            self._thread.start()
        return self

    def drain(self) -> None:
        """Stop accepting requests; waiting and running ones still complete."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()

    @property
    def idle(self) -> bool:
        """No request waiting or running."""
        with self._cond:
            return not self._waiting and not self._running

    def stop(self, timeout: float | None = None) -> None:
        """Drain, wait up to ``timeout`` seconds for every request to finish, then cancel the rest
        and join the scheduler thread."""
        self.drain()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (self._waiting or self._running) and (deadline is None or time.monotonic() < deadline):
                self._cond.wait(0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic())))
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def stalled_s(self) -> float:
        """Seconds the scheduler has spent in its current iteration (0 when idle or between iterations;
        infinite when its thread died). A healthy iteration takes one model call (milliseconds to seconds)."""
        if self._thread is not None and not self._thread.is_alive() and not self._stop:
            return float("inf")
        started = self._iteration_started
        return 0.0 if started is None else time.monotonic() - started

    def room(self) -> int:
        """Requests :meth:`submit` would take now: free slots plus ``max_queue`` places, less those waiting."""
        with self._cond:
            return self.max_queue + len(self.cache.free_slots()) - len(self._waiting)

    def stats(self) -> EngineStats:
        """Queue length, running batch, free slots, decode steps so far."""
        with self._cond:
            return EngineStats(len(self._waiting), len(self._running), len(self.cache.free_slots()), self.max_batch,
                               self._steps)

    # -- requests -------------------------------------------------------------------------------
    def check_question(self, question: str) -> None:
        """Refuse a question that cannot fit ``max_seq_len`` by its UTF-8 length alone (no tokenizing).

        Raises:
            HimapError: more than ``max_question_bytes`` bytes.
        """
        if self.max_question_bytes is not None and len(question) * 4 > self.max_question_bytes:
            size = len(question.encode("utf-8", "surrogatepass"))
            if size > self.max_question_bytes:
                raise HimapError(f"the question has {size} bytes; no question over {self.max_question_bytes} bytes "
                                 f"fits the server's --max-seq-len of {self.max_seq_len} tokens")

    def prepare(self, image: Any, question: str) -> PromptBatch:
        """The model inputs of one (PIL image, question) pair (thread-safe, no shared lock: each calling
        thread tokenizes with its own copy of the processor).

        Raises:
            HimapError: empty question, a question over ``max_question_bytes`` (refused before
                tokenizing), or a prompt that does not fit ``max_seq_len``.
        """
        self.check_question(question)
        processor = getattr(self._local, "processor", None)
        if processor is None:
            processor = self._local.processor = copy.deepcopy(self.pipeline.processor)
        prompt = self.pipeline.prepare([image], [question], processor=processor)
        length = int(prompt.input_ids.shape[1])
        if self.max_seq_len is not None and length >= self.max_seq_len:
            raise HimapError(f"the prompt has {length} tokens but the server's --max-seq-len is {self.max_seq_len} "
                             "(prompt plus at least one generated token must fit)")
        return prompt

    def submit(self, prompt: PromptBatch, params: SamplingParams, *, loop: asyncio.AbstractEventLoop | None = None,
               arrived: float | None = None) -> RequestHandle:
        """Queue a prepared one-prompt batch (see :meth:`prepare`).

        Args:
            prompt: a :class:`PromptBatch` of one prompt.
            params: how to decode it.
            loop: the asyncio loop the caller iterates the handle in (None: iterate from a thread).
            arrived: ``time.perf_counter()`` when the request arrived (default: now); TTFT and
                end-to-end latency count from it.

        Raises:
            QueueFull: ``max_queue`` requests are waiting for a slot already (beyond those that free
                slots will take).
            NotAccepting: the engine is draining or stopped.
        """
        if prompt.batch_size != 1:
            raise HimapError(f"submit takes one prompt at a time, got a batch of {prompt.batch_size}")
        with self._cond:
            if not self._accepting or self._stop:
                raise NotAccepting("the server is shutting down and accepts no new requests")
            # a request that a free slot will take at the next iteration does not wait for one
            if len(self._waiting) >= self.max_queue + len(self.cache.free_slots()):
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            request_id = next(self._ids)
            handle = RequestHandle(request_id, loop)
            request = _Request(request_id, prompt, params, handle, time.perf_counter() if arrived is None else arrived,
                               self.pipeline.device)
            self._waiting.append(request)
            self._cond.notify_all()
        return handle

    def generate(self, image: Any, question: str, params: SamplingParams) -> Completion:
        """Prepare, submit and wait for one request (from a thread other than the scheduler)."""
        return self.submit(self.prepare(image, question), params).result()

    # -- the scheduler --------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stop and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._stop:
                        break
                self._iteration_started = time.monotonic()
                try:
                    self._iteration()
                except Exception as exc:   # a bug: fail every request rather than hang them
                    log.exception("scheduler iteration failed")
                    # the group being prefilled holds admitted slots but is not running yet
                    self._fail(list(self._running) + self._prefilling, f"internal error: {exc}")
                finally:
                    self._prefilling = []
                    self._iteration_started = None
                with self._cond:
                    self._cond.notify_all()
            with self._cond:
                leftover = list(self._waiting) + list(self._running)
                self._waiting.clear()
            for request in leftover:
                self._finish(request, "cancelled")

    def _iteration(self) -> None:
        for request in [r for r in self._running if r.handle.cancelled.is_set()]:
            self._finish(request, "cancelled")
        with self._cond:
            for request in [r for r in self._waiting if r.handle.cancelled.is_set()]:
                self._waiting.remove(request)
                self._finish(request, "cancelled")
            group = self._admit()
        if group:
            self._prefill(group)
        if self._running:
            self._decode()

    def _admit(self) -> list[_Request]:
        """Take the oldest waiting request and the later ones with the same prompt length, up to the
        free slots (called with the lock held)."""
        free = self.cache.free_slots()
        if not self._waiting or not free:
            return []
        key = self._waiting[0].group_key
        group = [r for r in self._waiting if r.group_key == key][:min(len(free), self.max_prefill_batch)]
        for request, slot in zip(group, free):
            self._waiting.remove(request)
            request.slot = slot
        return group

    def _prefill(self, group: list[_Request]) -> None:
        prompts = [r.prompt for r in group]
        batch = PromptBatch(
            input_ids=torch.cat([p.input_ids for p in prompts]),
            attention_mask=torch.cat([p.attention_mask for p in prompts]),
            pixel_values=torch.cat([p.pixel_values for p in prompts]),
            token_type_ids=torch.cat([p.token_type_ids for p in prompts]),
            position_ids=torch.cat([p.position_ids for p in prompts], dim=-2),   # [B,S] or [3,B,S]
            prompts=[q for p in prompts for q in p.prompts],
            image_grid_thw=None if prompts[0].image_grid_thw is None else torch.cat([p.image_grid_thw for p in prompts]),
            image_tokens=None if prompts[0].image_tokens is None else [n for p in prompts for n in p.image_tokens],
            media=None if any(p.media is None for p in prompts) else [m for p in prompts for m in p.media],
            evs_rates=None if all(p.evs_rates is None for p in prompts) else   # a request's own EVS rate
            [r for p in prompts for r in (p.evs_rates or [None] * p.batch_size)],
        )
        slots = [r.slot for r in group]
        started = time.perf_counter()
        self._prefilling = group
        try:
            self._faults.before("prefill")
            state = self.pipeline.prefill(batch, cache=self.cache, slots=slots)
        except Exception as exc:   # the backend failed: this group's requests fail, the engine goes on
            self._backend_failed("prefill", group, exc)
            return
        self._stepped("prefill", len(group), time.perf_counter() - started)
        image_tokens = list(self.pipeline.plan.image_tokens_per_segment)
        next_positions = state.next_positions.tolist()
        for row, request in enumerate(group):
            request.next_position = int(next_positions[row])
            limit = request.params.max_tokens or UNLIMITED
            if self.max_seq_len is not None:
                limit = min(limit, self.max_seq_len - request.length)
            request.limit = limit
            request.completion.image_tokens_per_segment = state.image_tokens[row] if state.image_tokens else image_tokens
            request.completion.kept_image_positions = [stage.kept_image_positions[row] for stage in state.stages]
            self._running.append(request)
        self._prefilling = []
        self._accept_tokens(group, state.logits)

    def _decode(self) -> None:
        running = list(self._running)
        tokens = torch.tensor([r.completion.token_ids[-1] for r in running], dtype=torch.int64)
        positions = torch.tensor([r.next_position for r in running], dtype=torch.int64)
        device = self.pipeline.device
        started = time.perf_counter()
        try:
            self._faults.before("decode")
            logits = self.pipeline.decode_step(self.cache, tokens.to(device), positions.to(device),
                                               [r.slot for r in running])
        except Exception as exc:   # the backend failed: the running batch fails, waiting requests go on
            self._backend_failed("decode", running, exc)
            return
        self._stepped("decode", len(running), time.perf_counter() - started)
        self._steps += 1
        for request in running:
            request.next_position += 1
        self._accept_tokens(running, logits)

    def _backend_failed(self, phase: str, requests: list[_Request], exc: Exception) -> None:
        ids = ", ".join(str(r.id) for r in requests)
        if isinstance(exc, HimapError):
            log.error("%s failed for requests [%s]: %s", phase, ids, exc)
            message = str(exc)
        else:
            log.exception("%s failed for requests [%s]", phase, ids)
            message = f"internal error in {phase}: {type(exc).__name__}: {exc}"
        self._fail(requests, message)

    def _stepped(self, phase: str, requests: int, seconds: float) -> None:
        if self.on_step is not None:
            try:
                self.on_step(phase, requests, seconds)
            except Exception:   # metrics must not break serving
                log.exception("on_step callback failed")

    def _accept_tokens(self, requests: list[_Request], logits: torch.Tensor) -> None:
        """Choose each request's next token from its logits row [vocab], stream it, finish it if done."""
        now = time.perf_counter()
        greedy = [i for i, r in enumerate(requests) if r.params.temperature == 0]
        chosen: dict[int, int] = {}
        if greedy:
            picks = logits[greedy].float().argmax(dim=-1).tolist()
            chosen.update(zip(greedy, picks))
        for i, request in enumerate(requests):
            if i not in chosen:
                history = torch.tensor([request.completion.token_ids], dtype=torch.int64, device=logits.device)
                chosen[i] = int(request.chooser(logits[i:i + 1], history)[0])
        for i, request in enumerate(requests):
            completion = request.completion
            token = chosen[i]
            completion.token_ids.append(token)
            completion.token_times.append(now)
            if completion.ttft_s is None:
                completion.ttft_s = now - request.arrived
            text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            reason = None
            cut = _find_stop(text, request.params.stop, request.sent)
            if cut is not None:
                text, reason = text[:cut], "stop"
            elif token in self.eos_token_ids and not request.params.ignore_eos:
                reason = "stop"
            elif len(completion.token_ids) >= request.limit:
                reason = "length"
            # Hold back what could still become a stop string, and an incomplete UTF-8 character; one
            # Delta per token all the same (its text may be empty), so streams show every token's time.
            ready = max(request.sent, len(text) if reason else _safe_length(text, request.params.stop))
            request.handle._put(Delta(text[request.sent:ready], [token]))
            request.sent = ready
            completion.text = text
            if reason:
                self._finish(request, reason)

    def _finish(self, request: _Request, reason: str, error: str | None = None) -> None:
        if request in self._running:
            self._running.remove(request)
        completion = request.completion
        if request.slot is not None and request.slot in self.cache.free_slots():
            request.slot = None         # admitted, but its prefill failed before occupying the slot
        if request.slot is not None:
            slot, request.slot = request.slot, None
            try:
                self.pipeline.release(self.cache, [slot])
            except Exception as exc:   # a bug; still answer the caller
                log.exception("could not release slot %d", slot)
                reason, error = "error", f"internal error: {exc}"
        completion.finish_reason = reason
        completion.error = error
        completion.e2e_s = time.perf_counter() - request.arrived
        if self.on_finish is not None:
            try:
                self.on_finish(completion)
            except Exception:   # metrics must not break serving
                log.exception("on_finish callback failed")
        request.handle._put(completion)

    def _fail(self, requests: list[_Request], message: str) -> None:
        for request in requests:
            self._finish(request, "error", message)


def question_byte_limit(tokenizer: Any, max_seq_len: int | None) -> int | None:
    """Most UTF-8 bytes a question can have and still fit ``max_seq_len`` tokens (bytes), or None.

    Every token covers a non-empty piece of the text; a piece is at most as many characters as the
    longest vocabulary entry has bytes, and a character at most 4 bytes, so a question over
    ``max_seq_len * longest * 4`` bytes holds more than ``max_seq_len`` tokens whatever it says
    (a generous bound: it only spares tokenizing what cannot fit).
    """
    if max_seq_len is None:
        return None
    try:
        longest = max(len(token.encode("utf-8")) for token in tokenizer.get_vocab())
    except Exception:   # a tokenizer without a vocabulary listing: a wide bound
        longest = 64
    return max_seq_len * max(longest, 1) * 4


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Index of the earliest stop string in ``text`` that ends after the already-sent prefix."""
    best = None
    for stop in stops:
        index = text.find(stop, max(0, start - len(stop) + 1))
        if index >= 0 and (best is None or index < best):
            best = index
    return best


def _safe_length(text: str, stops: tuple[str, ...]) -> int:
    """Characters of ``text`` that can be streamed now: not a trailing replacement character (an
    incomplete UTF-8 sequence), and not a suffix that is the beginning of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[end - k:end] == stop[:k]:
                hold = max(hold, k)
                break
    return end - hold
