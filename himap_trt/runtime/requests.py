"""A request's life outside the scheduler: its sampling settings, the handle its caller iterates
(:class:`Delta` events, then one :class:`Completion` per choice), the scheduler-side state
(:class:`RunningRequest`), and the text rules (stop strings held back in streams, incomplete UTF-8).

The scheduler itself (admission, prefill, decode steps, release) is :mod:`himap_trt.runtime.engine`.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from himap_trt.errors import HimapError
from himap_trt.prompt import PromptBatch
from himap_trt.runtime.sampling import GenerationConfig, TokenChooser

#: max_tokens of a request that gave none, on a pipeline without max_seq_len (tokens).
UNLIMITED = 2**31
#: OpenAI's bound on ``top_logprobs``.
MAX_TOP_LOGPROBS = 20


class QueueFull(HimapError):
    """The waiting queue holds ``max_queue`` requests already (HTTP 429)."""


class NotAccepting(HimapError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


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
        presence_penalty: OpenAI's, in [-2, 2]: subtracted from the logit of every token already generated.
        frequency_penalty: OpenAI's, in [-2, 2]: times its count in the answer so far, subtracted.
        repetition_penalty: vLLM's / transformers' (> 0, 1 off): the logit of a token of the prompt
            or the answer is divided by it if positive, multiplied if not.
        min_tokens: vLLM's: EOS cannot be chosen and stop strings do not end the answer before this
            many tokens (tokens).
        logprobs: return each chosen token's log-probability (log_softmax of the model's logits,
            before penalties and temperature, as vLLM's default).
        top_logprobs: also the k most likely tokens' log-probabilities (0..20).
        n: choices; the prompt is prefilled once and its cache copied into n slots (choice i samples
            with seed ``seed + i``).
    """

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise HimapError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise HimapError("stop strings must not be empty")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and -2.0 <= value <= 2.0):
                raise HimapError(f"{name}: expected a number in [-2, 2], got {value}")
        if not (math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 100.0):
            raise HimapError(f"repetition_penalty: expected a number in (0, 100] (1: off), got {self.repetition_penalty}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise HimapError(f"min_tokens: expected 0..max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise HimapError(f"top_logprobs: expected 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise HimapError("top_logprobs: needs logprobs: true")
        if self.n < 1:
            raise HimapError(f"n: expected at least 1, got {self.n}")
        GenerationConfig(max_new_tokens=1, temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    @property
    def penalised(self) -> bool:
        """Whether any penalty or min_tokens changes the logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens)


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
        index: the choice (0..n-1).
        logprobs: per generated token (when asked): ``(token id, log-probability, [(id, log-probability)
            of the top_logprobs most likely, best first])``.
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
    index: int = 0
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None

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
    index: int = 0
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


class RequestHandle:
    """The caller's side of a submitted request: a stream of :class:`Delta` events then one
    :class:`Completion` per choice (``n``; events carry the choice's ``index``).

    Iterate it (``for event in handle``) from a thread, or ``async for event in handle`` when it was
    submitted with an event loop; the stream ends after the n-th completion. :meth:`cancel` frees
    the request's slots within one decode step.
    """

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop | None, n: int = 1):
        self.request_id = request_id
        self.n = n
        self._loop = loop
        self._sync: queue.SimpleQueue | None = None if loop else queue.SimpleQueue()
        self._async: asyncio.Queue | None = asyncio.Queue() if loop else None
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.completions: dict[int, Completion] = {}

    @property
    def completion(self) -> Completion | None:
        """Choice 0's completion once every choice finished (None before)."""
        return self.completions.get(0) if self.done.is_set() else None

    def results(self) -> list[Completion]:
        """Every choice's completion, by index (once :attr:`done`)."""
        return [self.completions[i] for i in sorted(self.completions)]

    def cancel(self) -> None:
        """Ask the engine to stop this request (no-op once it has finished)."""
        self.cancelled.set()

    def _put(self, event: Delta | Completion) -> None:
        if isinstance(event, Completion):
            self.completions[event.index] = event
            if len(self.completions) >= self.n:
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
        finished = 0
        while True:
            event = self._sync.get()
            yield event
            finished += isinstance(event, Completion)
            if finished >= self.n:
                return

    async def __aiter__(self):
        if self._async is None:
            raise TypeError("this request was submitted without an event loop; iterate it from a thread")
        finished = 0
        while True:
            event = await self._async.get()
            yield event
            finished += isinstance(event, Completion)
            if finished >= self.n:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request finished (thread callers); consumes the stream.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds (None: wait for ever).
        """
        if self._sync is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            finished = 0
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    event = self._sync.get(timeout=remaining)
                except queue.Empty:
                    raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s") from None
                finished += isinstance(event, Completion)
                if finished >= self.n:
                    return self.completions[0]
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self.completion


class _Request:
    """Scheduler-side state of one choice of a request (owned by the scheduler thread once admitted).

    A request with ``n`` choices waits as its choice 0, which holds ``slots`` (n of them) once
    admitted; after its prefill the other choices are :meth:`fork` s of it, each in its own slot.
    """

    def __init__(self, request_id: int, prompt: PromptBatch, params: SamplingParams, handle: RequestHandle,
                 arrived: float, device: torch.device, index: int = 0):
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.handle = handle
        self.arrived = arrived
        self.index = index
        self.device = device
        self.length = int(prompt.input_ids.shape[1])
        # prefilled together only with prompts of the same length and image-token count (no padding, no
        # masked slots), and never a prompt with visual tokens with one without (no vision graph, no stage)
        self.group_key = (self.length, tuple(prompt.image_tokens or ()), int(prompt.pixel_values.shape[0]) > 0)
        seed = None if params.seed is None else (params.seed + index + 2**63) % 2**64 - 2**63
        self.chooser = TokenChooser(GenerationConfig(max_new_tokens=1, temperature=params.temperature,
                                                     top_p=params.top_p, seed=seed), device)
        self.slot: int | None = None
        self.slots: list[int] = []      # choice 0 while waiting: the slots of all n choices
        self.next_position = 0          # RoPE position of the token fed at the next decode step
        self.limit = 0                  # most tokens this request may generate
        self.sent = 0                   # characters of the answer already streamed
        self.completion = Completion(request_id, prompt_tokens=int(prompt.attention_mask.sum()), index=index,
                                     logprobs=[] if params.logprobs else None)

    def fork(self, index: int, slot: int) -> _Request:
        """Choice ``index`` of this request in ``slot`` (its cache a copy of this one's), before any token."""
        other = _Request(self.id, self.prompt, self.params, self.handle, self.arrived, self.device, index)
        other.slot = slot
        other.next_position, other.limit = self.next_position, self.limit
        other.completion.image_tokens_per_segment = self.completion.image_tokens_per_segment
        other.completion.kept_image_positions = self.completion.kept_image_positions
        return other


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
