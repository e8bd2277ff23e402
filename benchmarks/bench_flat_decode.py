"""Flat decode as whole answers, paired: the mean TPOT of a long answer over that of short answers
run just before and after it.

    python benchmarks/bench_flat_decode.py --export-dir bx/medium-himap-gqa --pairs 10

Issue 8's figure is "mean TPOT over a 1,024-token answer / mean TPOT of a 32-token answer". On a
VM whose speed drifts by 10-15% from minute to minute, medians taken per answer length (as
``himap-trt bench`` reports them) move with the drift; here every long answer is compared with the
mean of its two neighbouring short answers, so each ratio is taken within ~30 s, and the median of
the ratios is reported. Greedy, ``ignore_eos``: every answer has exactly its length. Prints one
line per export, or JSON with --json. Complements ``bench_decode_length.py``, which interleaves
single decode steps at fixed cache lengths.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from himap_trt.analysis.bench import sample_batch
from himap_trt.runtime import GenerationConfig
from himap_trt.runtime.loader import open_pipeline


def mean_tpot(pipe, batch, new_tokens: int) -> float:
    """Mean inter-token latency (seconds) of one greedy answer of exactly ``new_tokens`` tokens."""
    with torch.inference_mode():
        result = pipe.generate(batch, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True))
    return statistics.mean(result.itl_s)


def paired_ratios(pipe, short: int, long: int, pairs: int) -> dict:
    """short, long, short, long, ..., short: ``pairs`` long answers, each between two short ones."""
    batch = sample_batch(pipe, 1)
    mean_tpot(pipe, batch, 4)                                   # warm-up
    shorts, longs = [mean_tpot(pipe, batch, short)], []
    for _ in range(pairs):
        longs.append(mean_tpot(pipe, batch, long))
        shorts.append(mean_tpot(pipe, batch, short))
    ratios = [x / ((a + b) / 2) for x, a, b in zip(longs, shorts, shorts[1:])]
    return {"short_tokens": short, "long_tokens": long, "short_tpot_s": shorts, "long_tpot_s": longs,
            "ratios": ratios, "median_ratio": statistics.median(ratios)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, action="append", required=True, help="export(s) to measure")
    parser.add_argument("--short", type=int, default=32, help="short answer, tokens (default 32)")
    parser.add_argument("--long", type=int, default=1024, help="long answer, tokens (default 1024)")
    parser.add_argument("--pairs", type=int, default=10, help="long answers measured (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.short < 2 or args.long < 2:
        parser.error("--pairs must be >= 1 and --short/--long >= 2 tokens")
    results = {}
    for export in args.export_dir:
        pipe = open_pipeline(export_dir=export, backend="onnxruntime", device="cpu").pipeline
        results[str(export)] = paired_ratios(pipe, args.short, args.long, args.pairs)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for export, r in results.items():
        print(f"{export}: {r['long_tokens']} / {r['short_tokens']} tokens, mean TPOT ms short "
              f"{[round(x * 1e3, 2) for x in r['short_tpot_s']]} long {[round(x * 1e3, 2) for x in r['long_tpot_s']]}; "
              f"paired ratios {[round(x, 3) for x in r['ratios']]}; median {r['median_ratio']:.3f}")


if __name__ == "__main__":
    main()
