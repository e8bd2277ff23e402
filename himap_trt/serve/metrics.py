"""Prometheus metrics of the server (``GET /metrics``), in their own registry per server.

Latencies are histograms in seconds, as Prometheus names them (``_seconds``), counted from the
moment the HTTP request arrived: TTFT, TPOT (mean time per output token after the first) and
end-to-end. Queue length, running batch and free slots are read from the engine at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from himap_trt.runtime.engine import Completion

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServerMetrics:
    """The server's metrics; :meth:`finished` and :meth:`step` are the engine's callbacks."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("himap_time_to_first_token_seconds", "Time to first token (seconds).",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("himap_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request (seconds).",
                              buckets=_STEP, registry=r)
        self.e2e = Histogram("himap_e2e_request_latency_seconds", "End-to-end request latency (seconds).",
                             buckets=_LATENCY, registry=r)
        self.queue = Gauge("himap_queue_length", "Requests waiting for a slot.", registry=r)
        self.running = Gauge("himap_running_requests", "Requests in the running batch (slots held).", registry=r)
        self.free_slots = Gauge("himap_free_slots", "KV-cache slots holding no request.", registry=r)
        self.prompt_tokens = Counter("himap_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("himap_generation_tokens", "Tokens generated.", registry=r)
        self.kept_image_tokens = Counter("himap_kept_image_tokens", "Image tokens kept, per decoder segment.",
                                         ["segment"], registry=r)
        self.requests = Counter("himap_requests", "Finished requests by finish reason.", ["finish_reason"],
                                registry=r)
        self.errors = Counter("himap_request_errors", "Refused or failed requests by HTTP status.", ["status"],
                              registry=r)
        self.batch_size = Histogram("himap_batch_size", "Requests per model call, by phase (prefill, decode).",
                                    ["phase"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.step_seconds = Histogram("himap_step_seconds", "Duration of one model call, by phase (seconds).",
                                      ["phase"], buckets=_STEP + (2.5, 5.0, 10.0), registry=r)
        self.ready = Gauge("himap_ready", "1 once every graph is loaded and the server accepts requests.", registry=r)

    def bind(self, engine) -> None:
        """Read the queue, the running batch and free slots from ``engine`` at scrape time."""
        self.queue.set_function(lambda: engine.stats().waiting)
        self.running.set_function(lambda: engine.stats().running)
        self.free_slots.set_function(lambda: engine.stats().free_slots)

    def step(self, phase: str, requests: int, seconds: float) -> None:
        """Record one prefill or decode call of the engine."""
        self.batch_size.labels(phase).observe(requests)
        self.step_seconds.labels(phase).observe(seconds)

    def finished(self, completion: Completion) -> None:
        """Record one finished request."""
        self.requests.labels(completion.finish_reason).inc()
        self.prompt_tokens.inc(completion.prompt_tokens)
        self.generation_tokens.inc(len(completion.token_ids))
        if completion.ttft_s is not None:
            self.ttft.observe(completion.ttft_s)
        if completion.tpot_s is not None:
            self.tpot.observe(completion.tpot_s)
        if completion.e2e_s is not None and completion.finish_reason in ("stop", "length"):
            self.e2e.observe(completion.e2e_s)
        for segment, kept in enumerate(completion.image_tokens_per_segment):
            self.kept_image_tokens.labels(str(segment)).inc(kept)
