"""Decode-step time against the number of cached tokens, several exports interleaved step by step.

    python benchmarks/bench_decode_length.py --export-dir bx/medium-himap --export-dir bx/medium-himap-gqa \
        --new-tokens 32,1024 --rounds 60

What ``himap-trt bench`` measures as whole answers (mean TPOT of a 32- and a 1,024-token answer),
measured here one decode step at a time so that a shared machine's load hits every contender alike:
each round runs ONE decode step of every (export, probe) in turn, where a probe is a slot cache
sized as ``generate`` sizes it for an answer of N new tokens (prompt + N positions per slot) and
holding the prompt plus k generated tokens. After each step the slot's length is set back, so a
probe stays at its k. Medians over the rounds per probe:

- ``short``: N = the first --new-tokens value, k = N/2 - 1 (the mean step of that answer: its decode
  steps see k = 0 .. N-2 generated tokens);
- ``long@k``: N = the second value, k in 0, N/4, N/2, 3N/4, N-1: their trapezoid mean estimates the
  mean TPOT of the long answer (the step cost is linear in k at most);
- ``at@1024``: the long cache with segment 0 holding 1,024 tokens (the issue's "TPOT at 1,024 cached
  tokens").

The generated tokens' keys/values are zeros (timing does not depend on them). Prints a table, or
JSON with --json; the ratio ``long mean / short`` is the flat-decode figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from himap_trt.analysis.bench import sample_batch
from himap_trt.runtime.loader import open_pipeline


class Probe:
    """One slot cache holding the prompt plus ``k`` (zero) generated tokens, in a buffer sized for
    ``new_tokens``."""

    def __init__(self, pipe, batch, new_tokens: int, k: int, label: str):
        self.pipe, self.label = pipe, label
        prompt = batch.input_ids.shape[1]
        self.cache = pipe.allocate(1, max_seq_len=prompt + new_tokens)
        with torch.inference_mode():
            state = pipe.prefill(batch, cache=self.cache)
        for lengths, mask in zip(self.cache.lengths, self.cache.masks):
            mask[0, int(lengths[0]):int(lengths[0]) + k] = 1
            lengths[0] += k
        self.token = state.logits.argmax(-1)
        self.position = state.next_positions + k
        self.times: list[float] = []

    def step(self) -> None:
        start = time.perf_counter()
        with torch.inference_mode():
            self.pipe.decode_step(self.cache, self.token, self.position, [0])
        self.times.append(time.perf_counter() - start)
        for lengths, mask in zip(self.cache.lengths, self.cache.masks):   # back to k tokens
            lengths[0] -= 1
            mask[0, int(lengths[0])] = 0

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export-dir", action="append", required=True, type=Path, help="an export (repeat)")
    parser.add_argument("--new-tokens", default="32,1024", help="short,long answer lengths (default 32,1024)")
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds (default 60)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    short, long = (int(v) for v in args.new_tokens.split(","))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    contenders = []
    for directory in args.export_dir:
        opened = open_pipeline(export_dir=directory, backend="onnxruntime", device="cpu")
        pipe = opened.pipeline
        batch = sample_batch(pipe, 1)
        prompt = int(batch.attention_mask.sum())
        ks = [0, long // 4, long // 2, 3 * long // 4, long - 2]     # decode steps see k = 0 .. long-2
        probes = [Probe(pipe, batch, short, short // 2 - 1, "short")]
        probes += [Probe(pipe, batch, long, k, f"long@{k}") for k in ks]
        if 0 <= 1024 - prompt < long:
            probes.append(Probe(pipe, batch, long, 1024 - prompt, "at@1024"))
        contenders.append((str(directory), probes, ks))
    for _ in range(3):                                   # warm-up
        for _, probes, _ in contenders:
            for probe in probes:
                probe.step()
    for probe in (p for _, probes, _ in contenders for p in probes):
        probe.times.clear()
    for _ in range(args.rounds):
        for _, probes, _ in contenders:
            for probe in probes:
                probe.step()
    results = []
    for name, probes, ks in contenders:
        by = {p.label: p.median_ms for p in probes}
        longs = [by[f"long@{k}"] for k in ks]
        # trapezoid over k in [0, long-1] with the 5 probes (equal spacing except the last)
        xs = ks
        area = sum((xs[i + 1] - xs[i]) * (longs[i] + longs[i + 1]) / 2 for i in range(len(xs) - 1))
        long_mean = area / (xs[-1] - xs[0])
        results.append({"export": name, "short_ms": by["short"], "long_ms": dict(zip(map(str, ks), longs)),
                        "long_mean_ms": long_mean, "ratio": long_mean / by["short"],
                        "at_1024_ms": by.get("at@1024")})
    if args.json:
        print(json.dumps({"rounds": args.rounds, "new_tokens": [short, long], "results": results}, indent=1))
        return
    for r in results:
        steps = " ".join(f"{k}:{v:.2f}" for k, v in r["long_ms"].items())
        at = f"{r['at_1024_ms']:.2f}" if r["at_1024_ms"] is not None else "-"
        print(f"{r['export']}: short {r['short_ms']:.2f} ms | long by k {steps} | long mean {r['long_mean_ms']:.2f} ms"
              f" | ratio {r['ratio']:.3f} | at 1,024 cached {at} ms")


if __name__ == "__main__":
    main()
