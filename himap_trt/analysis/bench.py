"""``himap-trt bench``: several exports (methods) side by side in one interleaved run.

For every contender (an export on a backend, or transformers' ``generate`` on the same checkpoint)
and every batch size and answer length, each repeat runs every contender once in turn (interleaved,
so drift of a shared machine hits all alike) and records:

- TTFT (prefill + first token, seconds), TPOT (mean time per later token), inter-token latencies
  (ITL: mean, p50, p99) and tokens/s of the batch;
- peak resident memory over the run minus the resident memory before it (RSS, sampled every
  2 ms from ``/proc/self/statm``), and peak CUDA memory on GPUs;
- KV-cache bytes (allocated buffers);
- the per-graph time of a separate prefill (median over repeats), whose sum is the prefill time.

Preprocessing (chat template, image resize) is done once, outside the timings, for all contenders.
Answers are greedy and, with ``ignore_eos`` (the default here), exactly ``new_tokens`` long.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from himap_trt.errors import HimapError
from himap_trt.runtime import GenerationConfig


@dataclass
class RunFigures:
    """Figures of one contender at one (batch size, answer length), over the repeats (medians of
    per-run means unless stated; seconds, bytes)."""

    contender: str
    batch_size: int
    new_tokens: int
    prompt_tokens: int
    ttft_s: float
    tpot_s: float
    itl_mean_s: float
    itl_p50_s: float
    itl_p99_s: float
    tokens_per_s: float
    peak_rss_delta_bytes: int
    peak_cuda_bytes: int | None
    kv_cache_bytes: int | None
    prefill_graph_s: dict[str, float] = field(default_factory=dict)
    itl_by_step_s: list[float] = field(default_factory=list)    # median over repeats, per decode step
    repeats: int = 0


class _PeakRss:
    """Samples this process's resident set size in a background thread (Linux ``/proc``)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * self.page
        except OSError:  # not Linux: no RSS figure
            return 0

    def __enter__(self):
        self.start = self.rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class _Sample:
    ttft_s: float
    itl_s: list[float]
    tokens: int
    kv_cache_bytes: int | None
    rss_delta: int
    cuda_peak: int | None
    graph_s: dict[str, float]


class Contender:
    """Something that answers a prepared batch: a himap-trt pipeline or transformers' generate."""

    name: str

    def run(self, batch, new_tokens: int) -> _Sample:  # pragma: no cover - interface
        raise NotImplementedError


class PipelineContender(Contender):
    """A himap-trt pipeline (any backend)."""

    def __init__(self, name: str, pipeline, ignore_eos: bool = True):
        self.name = name
        self.pipeline = pipeline
        self.ignore_eos = ignore_eos

    def run(self, batch, new_tokens: int) -> _Sample:
        config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=self.ignore_eos)
        cuda = self.pipeline.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with _PeakRss() as rss, torch.inference_mode():
            result = self.pipeline.generate(batch, config)
        cuda_peak = torch.cuda.max_memory_allocated() if cuda else None
        graph_s = self._prefill_breakdown(batch)
        tokens = sum(len(t) for t in result.tokens)
        return _Sample(result.ttft_s, result.itl_s, tokens, result.kv_cache_bytes, rss.delta, cuda_peak, graph_s)

    def _prefill_breakdown(self, batch) -> dict[str, float]:
        """Seconds per graph of one prefill (each backend's ``run`` timed, synchronised on CUDA)."""
        pipe = self.pipeline
        times: dict[str, float] = {}
        originals = {}
        for name, backend in pipe.backends.items():
            originals[name] = backend.run

            def timed(feeds, outputs=None, _run=backend.run, _name=name):
                start = time.perf_counter()
                result = _run(feeds, outputs) if outputs else _run(feeds)
                pipe._sync()
                times[_name] = times.get(_name, 0.0) + time.perf_counter() - start
                return result
            backend.run = timed
        cache = pipe.allocate(batch.batch_size, max_seq_len=batch.input_ids.shape[1] + 1)
        try:
            with torch.inference_mode():
                pipe.prefill(batch, cache=cache)
        finally:
            for name, backend in pipe.backends.items():
                backend.__dict__.pop("run", None)
        return times


class TransformersContender(Contender):
    """transformers' ``generate`` (greedy, ``min_new_tokens`` = ``max_new_tokens``) on the checkpoint.

    TTFT is a 1-token ``generate``; the inter-token latencies come from a streamer's timestamps.
    """

    def __init__(self, name: str, model):
        self.name = name
        self.model = model

    def run(self, batch, new_tokens: int) -> _Sample:
        device = self.model.device
        inputs = dict(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                      pixel_values=batch.pixel_values.to(device, self.model.dtype))
        stamps: list[float] = []

        class Stamps:
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        with torch.inference_mode():
            start = time.perf_counter()
            self.model.generate(**inputs, max_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - start
            with _PeakRss() as rss:
                start = time.perf_counter()
                self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    streamer=Stamps() if batch.batch_size == 1 else None)
                total = time.perf_counter() - start
        if stamps:   # the streamer is called with the prompt first, then once per new token
            token_stamps = stamps[1:]
            itl = [b - a for a, b in zip(token_stamps, token_stamps[1:])]
        else:        # streamers take batch 1 only: spread the decode time evenly
            itl = [(total - ttft) / (new_tokens - 1)] * (new_tokens - 1) if new_tokens > 1 else []
        return _Sample(ttft, itl, new_tokens * batch.batch_size, None, rss.delta, None, {})


def _summarise(name: str, batch, new_tokens: int, samples: list[_Sample]) -> RunFigures:
    itl_all = [x for s in samples for x in s.itl_s]
    per_run_tpot = [statistics.mean(s.itl_s) for s in samples if s.itl_s]
    steps = min((len(s.itl_s) for s in samples), default=0)
    by_step = [statistics.median(s.itl_s[i] for s in samples) for i in range(steps)]
    graph_names = {k for s in samples for k in s.graph_s}
    return RunFigures(
        contender=name, batch_size=batch.batch_size, new_tokens=new_tokens, prompt_tokens=batch.input_ids.shape[1],
        ttft_s=statistics.median(s.ttft_s for s in samples),
        tpot_s=statistics.median(per_run_tpot) if per_run_tpot else 0.0,
        itl_mean_s=statistics.mean(itl_all) if itl_all else 0.0,
        itl_p50_s=_percentile(itl_all, 50), itl_p99_s=_percentile(itl_all, 99),
        tokens_per_s=statistics.median(s.tokens / (s.ttft_s + sum(s.itl_s)) for s in samples),
        peak_rss_delta_bytes=int(statistics.median(s.rss_delta for s in samples)),
        peak_cuda_bytes=samples[0].cuda_peak,
        kv_cache_bytes=samples[0].kv_cache_bytes,
        prefill_graph_s={k: statistics.median(s.graph_s.get(k, 0.0) for s in samples) for k in sorted(graph_names)},
        itl_by_step_s=by_step, repeats=len(samples),
    )


def sample_batch(pipeline, batch_size: int):
    """A deterministic synthetic request (random-noise 640x480 image, one fixed question) x batch_size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    question = "What is happening in this picture? Answer in one sentence."
    return pipeline.prepare([image] * batch_size, [question] * batch_size)


def run_bench(contenders: list[Contender], batch_factory: Callable[[int], Any], *, batch_sizes: Sequence[int],
              new_tokens: Sequence[int], repeats: int, warmup: bool = True,
              progress: Callable[[str], None] | None = None) -> list[RunFigures]:
    """Interleaved runs: for each batch size, ``repeats`` rounds, each running every answer length
    of every contender once, so a ratio between contenders *and* between answer lengths (e.g. the
    flat-decode ratio: mean TPOT of a 1,024-token answer over a 32-token one) is taken under the same
    machine conditions.

    Raises:
        HimapError: with no contenders or a non-positive repeat count.
    """
    if not contenders:
        raise HimapError("bench needs at least one contender (--export-dir or --methods)")
    if repeats < 1:
        raise HimapError(f"--repeats must be at least 1, got {repeats}")
    figures = []
    for size in batch_sizes:
        batch = batch_factory(size)
        if warmup:
            for contender in contenders:
                if progress:
                    progress(f"warm-up {contender.name} batch {size}")
                contender.run(batch, min(min(new_tokens), 4))
        samples: dict[tuple[int, str], list[_Sample]] = {(t, c.name): [] for t in new_tokens for c in contenders}
        for round_ in range(repeats):
            for tokens in new_tokens:
                for contender in contenders:
                    if progress:
                        progress(f"{contender.name} batch {size} x {tokens} tokens, round {round_ + 1}/{repeats}")
                    samples[tokens, contender.name].append(contender.run(batch, tokens))
        figures += [_summarise(c.name, batch, t, samples[t, c.name]) for t in new_tokens for c in contenders]
    return figures


def figures_to_json(figures: list[RunFigures], setup: dict[str, Any]) -> dict[str, Any]:
    return {"setup": setup, "runs": [asdict(f) for f in figures]}


def plot(figures: list[RunFigures], path: Path) -> Path:
    """A PNG: TTFT and TPOT per contender (bars, one group per batch size x answer length), and
    the per-step ITL of the longest answers (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    groups = sorted({(f.batch_size, f.new_tokens) for f in figures})
    names = list(dict.fromkeys(f.contender for f in figures))
    width = 0.8 / max(1, len(names))
    for axis, key, title in ((axes[0], "ttft_s", "TTFT (ms)"), (axes[1], "tpot_s", "TPOT (ms)")):
        for i, name in enumerate(names):
            values = [next((getattr(f, key) * 1e3 for f in figures if f.contender == name
                            and (f.batch_size, f.new_tokens) == g), 0.0) for g in groups]
            axis.bar([x + i * width for x in range(len(groups))], values, width, label=name)
        axis.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(groups))])
        axis.set_xticklabels([f"b{b} x{n}" for b, n in groups])
        axis.set_title(title)
    axes[0].legend(fontsize=8)
    longest = max(f.new_tokens for f in figures)
    for f in figures:
        if f.new_tokens == longest and f.batch_size == groups[0][0] and f.itl_by_step_s:
            axes[2].plot([x * 1e3 for x in f.itl_by_step_s], label=f.contender, linewidth=0.8)
    axes[2].set_title(f"ITL per step (ms), batch {groups[0][0]}, {longest} tokens")
    axes[2].set_xlabel("decode step")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
