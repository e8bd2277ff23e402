"""Continuous batching over slot KV caches: one scheduler thread owns the pipeline.

Each running request owns one slot of a :class:`~himap_trt.runtime.kv_cache.SlotKVCache` (per
segment, its own length; a request with ``n`` choices owns n). One iteration of the scheduler::

    drop cancelled requests ─► release their slots
    admit waiting requests  ─► prefill them into free slots (one batch: equal-length prompts, or with
                               mixed_prefill any lengths, left-padded and masked); n choices: the
                               prompt's slot copied into n - 1 more; first token of each (TTFT)
    one decode step         ─► every running request, whatever its length, one token each
    finished requests       ─► release their slots

so a request joins the running batch between decode steps and leaves it within one step of
finishing, stopping, or being cancelled (a client that disconnected). No padding enters a slot,
and (equal-length batching, the default) a request's tokens do not depend on the requests next to
it (fp32 ONNX Runtime: the same tokens as the request alone, the slot API's contract).

No HTTP here: ``himap_trt.serve`` puts the OpenAI API in front of it. Usable on its own::

    engine = Engine(pipeline, max_batch=8)
    engine.start()
    completion = engine.generate(image, "What is shown?", SamplingParams(max_tokens=32, temperature=0))
    engine.stop()

The modules around it (issue 30's split): :mod:`~himap_trt.runtime.requests` (sampling settings,
handles, per-choice state, text rules), :mod:`~himap_trt.runtime.batching` (request preparation in
the caller's thread, prompt merging), :mod:`~himap_trt.runtime.logits` (penalties, logprobs),
:mod:`~himap_trt.runtime.faults` (the test-only fault hook).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import torch

from himap_trt.errors import HimapError
from himap_trt.prompt import PromptBatch
from himap_trt.runtime.batching import RequestPreparer, merge_prompts
from himap_trt.runtime.faults import FAULT_ENV, FaultPlan
from himap_trt.runtime.logits import penalise, token_logprobs
from himap_trt.runtime.requests import (
    UNLIMITED,
    Completion,
    Delta,
    NotAccepting,
    QueueFull,
    RequestHandle,
    SamplingParams,
    _find_stop,
    _Request,
    _safe_length,
    question_byte_limit,
)

log = logging.getLogger(__name__)

__all__ = ["FAULT_ENV", "Completion", "Delta", "Engine", "EngineStats", "FaultPlan", "NotAccepting", "QueueFull",
           "RequestHandle", "SamplingParams", "UNLIMITED", "question_byte_limit"]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the scheduler (for /metrics and tests)."""

    waiting: int
    running: int
    free_slots: int
    max_batch: int
    steps: int


class Engine(RequestPreparer):
    """Continuous batching over one pipeline's slot caches.

    Args:
        pipeline: a :class:`~himap_trt.runtime.pipeline.Pipeline` (any backend) with the slot API
            (``allocate``, ``prefill(..., cache=, slots=)``, ``decode_step``, ``release``).
        max_batch: slots, i.e. most requests decoded together (requests).
        max_queue: most requests waiting for a slot; :meth:`submit` raises :class:`QueueFull` beyond.
        max_prefill_batch: most prompts prefilled in one call (default: ``max_batch``).
        mixed_prefill: prefill waiting prompts of different lengths (and visual-token counts) together,
            left-padded and masked (:func:`~himap_trt.runtime.batching.merge_prompts`); False: only
            prompts of equal length and count share a prefill (docs/PERFORMANCE.md has the measurement).
        max_seq_len: most tokens (prompt + generated) per request (tokens); default and upper bound:
            the pipeline's. Slot buffers are this long, and every decode step attends over them.
            Questions longer than ``max_question_bytes`` (derived from it) are refused before tokenizing.
        on_finish: called in the scheduler thread with each :class:`Completion` (metrics).
        on_step: called in the scheduler thread after each model call as ``on_step(phase, requests,
            seconds)``, phase ``prefill`` or ``decode`` (metrics).
    """

    def __init__(self, pipeline: Any, *, max_batch: int = 8, max_queue: int = 64, max_prefill_batch: int | None = None,
                 max_seq_len: int | None = None, on_finish=None, on_step=None, mixed_prefill: bool = False):
        if max_batch < 1:
            raise HimapError(f"--max-batch must be at least 1, got {max_batch}")
        if max_queue < 0:
            raise HimapError(f"--max-queue must be >= 0, got {max_queue}")
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_batch = max_prefill_batch or max_batch
        self.mixed_prefill = mixed_prefill
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
        # the scheduler thread alone decodes with the pipeline's tokenizer; preparing threads use their own
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
        if params.n > self.max_batch:
            raise HimapError(f"n: {params.n} choices need {params.n} slots; this server has {self.max_batch} "
                             "(--max-batch)")
        with self._cond:
            if not self._accepting or self._stop:
                raise NotAccepting("the server is shutting down and accepts no new requests")
            # a request that a free slot will take at the next iteration does not wait for one
            if len(self._waiting) >= self.max_queue + len(self.cache.free_slots()):
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            request_id = next(self._ids)
            handle = RequestHandle(request_id, loop, params.n)
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
        """Take the oldest waiting request and the later ones it can be prefilled with (the same prompt
        length and visual-token count, or with ``mixed_prefill`` any that also have / lack visual
        tokens), up to the free slots (a request with n choices takes n; called with the lock held)."""
        free = self.cache.free_slots()
        if not self._waiting or not free:
            return []
        index = -1 if self.mixed_prefill else slice(None)
        key = self._waiting[0].group_key[index]
        group = []
        for request in self._waiting:
            if request.group_key[index] != key:
                continue
            if request.params.n > len(free) or len(group) >= self.max_prefill_batch:
                break
            request.slots, free = free[:request.params.n], free[request.params.n:]
            request.slot = request.slots[0]
            group.append(request)
        for request in group:
            self._waiting.remove(request)
        return group

    def _prefill(self, group: list[_Request]) -> None:
        batch = merge_prompts([r.prompt for r in group], self.pipeline.pad_token_id)
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
        choices, rows = [], []
        for row, request in enumerate(group):
            request.next_position = int(next_positions[row])
            limit = request.params.max_tokens or UNLIMITED
            if self.max_seq_len is not None:
                limit = min(limit, self.capacity(request.prompt) - request.length)
            request.limit = limit
            request.completion.image_tokens_per_segment = state.image_tokens[row] if state.image_tokens else image_tokens
            shift = int(batch.input_ids.shape[1]) - request.length            # left padding of a mixed prefill
            request.completion.kept_image_positions = [[p - shift for p in stage.kept_image_positions[row]]
                                                       for stage in state.stages]
            forks = []
            for index, slot in enumerate(request.slots[1:], start=1):     # n choices: one prefill, n slots
                self.cache.copy_slot(request.slot, slot)
                forks.append(request.fork(index, slot))
            request.slots = []
            for choice in [request, *forks]:
                self._running.append(choice)
                choices.append(choice)
                rows.append(row)
        self._prefilling = []
        logits = state.logits if len(rows) == len(group) else state.logits[torch.tensor(rows, device=state.logits.device)]
        self._accept_tokens(choices, logits)

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
        processed = {i: self._penalised(r, logits[i]) for i, r in enumerate(requests) if r.params.penalised}
        greedy = [i for i, r in enumerate(requests) if r.params.temperature == 0 and i not in processed]
        chosen: dict[int, int] = {}
        if greedy:
            picks = logits[greedy].float().argmax(dim=-1).tolist()
            chosen.update(zip(greedy, picks))
        for i, request in enumerate(requests):
            if i not in chosen:
                row = processed[i][None] if i in processed else logits[i:i + 1]
                if request.params.temperature == 0:
                    chosen[i] = int(row.argmax(dim=-1)[0])
                    continue
                history = torch.tensor([request.completion.token_ids], dtype=torch.int64, device=logits.device)
                chosen[i] = int(request.chooser(row, history)[0])
        for i, request in enumerate(requests):
            completion = request.completion
            token = chosen[i]
            entry = None
            if request.params.logprobs:
                entry = [token_logprobs(logits[i], token, request.params.top_logprobs)]
                completion.logprobs.extend(entry)
            completion.token_ids.append(token)
            completion.token_times.append(now)
            if completion.ttft_s is None:
                completion.ttft_s = now - request.arrived
            text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            reason = None
            early = len(completion.token_ids) < request.params.min_tokens     # vLLM: no stop before min_tokens
            cut = None if early else _find_stop(text, request.params.stop, request.sent)
            if cut is not None:
                text, reason = text[:cut], "stop"
            elif token in self.eos_token_ids and not request.params.ignore_eos and not early:
                reason = "stop"
            elif len(completion.token_ids) >= request.limit:
                reason = "length"
            # Hold back what could still become a stop string, and an incomplete UTF-8 character; one
            # Delta per token all the same (its text may be empty), so streams show every token's time.
            ready = max(request.sent, len(text) if reason else _safe_length(text, request.params.stop))
            request.handle._put(Delta(text[request.sent:ready], [token], request.index, entry))
            request.sent = ready
            completion.text = text
            if reason:
                self._finish(request, reason)

    def _penalised(self, request: _Request, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [vocab] after the request's penalties and min_tokens (:func:`penalise`)."""
        params = request.params
        output = request.completion.token_ids
        block = self.eos_token_ids if len(output) < params.min_tokens and not params.ignore_eos else ()
        return penalise(logits, request.prompt.input_ids[0][request.prompt.attention_mask[0].bool()], output,
                        presence=params.presence_penalty, frequency=params.frequency_penalty,
                        repetition=params.repetition_penalty, block=block)

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
        # choices never forked (the request failed or was cancelled before its prefill) end with it
        pending, request.slots = request.slots[1:] if request.slots else [], []
        if request.index == 0 and request.params.n > 1 and (pending or not request.completion.token_ids):
            for index in range(1, request.params.n):
                if index not in request.handle.completions:
                    request.handle._put(replace(completion, index=index, token_ids=[], text=""))

    def _fail(self, requests: list[_Request], message: str) -> None:
        for request in requests:
            self._finish(request, "error", message)
