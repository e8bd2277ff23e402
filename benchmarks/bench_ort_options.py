"""ONNX Runtime session options for the segment graphs: intra-op threads, spinning, memory arena.

For each export, every combination of ``--threads`` x spinning (``session.intra_op.allow_spinning``
0/1) x the CPU memory arena (``enable_cpu_mem_arena`` on/off) gets its own sessions of every decoder
segment, made otherwise as the runtime makes them (:class:`himap_trt.runtime.onnxrt.OnnxRuntimeBackend`:
all graph optimisations, the quantized exports' session config). One round runs, for every
combination in turn (interleaved), the plan's whole prefill (each segment on the prompt's length
less the image tokens pruned before it, back to back, as in a request) and then ``--decode-steps``
decode steps of every segment (one token into a buffer of prompt + 32 positions). Medians over
``--rounds`` rounds after one warm-up round (ms).

    python benchmarks/bench_ort_options.py --export-dir bx/medium-himap-int8-dynamic --tokens 653 \
        --rounds 7 --threads 1,2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import onnxruntime as ort
import torch

from himap_trt.arch import get_architecture
from himap_trt.export.onnx_export import example_inputs
from himap_trt.graphs.spec import past_names
from himap_trt.manifest import load_manifest
from himap_trt.runtime.onnxrt import session_config


def session(path: Path, spec, threads: int, spinning: bool, arena: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    for key, value in session_config(spec.attrs.get("quantization")).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(spec, vocab: int, sequence: int, cache: int) -> dict:
    values = example_inputs(spec, {"batch": 1, "sequence": sequence, "cache_sequence": cache}, vocab)
    for layer in range(*spec.layers):
        for name in past_names(layer):
            values[name] = torch.zeros_like(values[name])
    return {k: v.numpy() for k, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", action="append", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=653, help="prompt tokens (prefill)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    variants = list(itertools.product([int(t) for t in args.threads.split(",")], (False, True), (True, False)))
    cases = []       # (export, variant, [(session, prefill feeds, decode feeds)])
    for export in args.export_dir:
        manifest = load_manifest(export, families=get_architecture)
        segments = [spec for spec in manifest.graphs if spec.kind == "segment"]
        inputs = []
        for spec in segments:
            n = args.tokens - (manifest.plan.num_image_tokens - spec.attrs["image_tokens"])   # pruned segments are shorter
            inputs.append((feeds(spec, manifest.dims.vocab_size, n, n), feeds(spec, manifest.dims.vocab_size, 1, n + 32)))
        for variant in variants:
            sessions = [session(export / spec.file, spec, *variant) for spec in segments]
            cases.append((export, variant, [(s, p, d) for s, (p, d) in zip(sessions, inputs, strict=True)]))
    times = {(str(e), v): {"prefill": [], "decode_step": []} for e, v, _ in cases}
    for round_ in range(args.rounds + 1):                  # round 0 is a warm-up
        for export, variant, runs in cases:
            start = time.perf_counter()
            for sess, prefill, _ in runs:
                sess.run(None, prefill)
            middle = time.perf_counter()
            for _ in range(args.decode_steps):
                for sess, _, decode in runs:
                    sess.run(None, decode)
            end = time.perf_counter()
            if round_:
                times[(str(export), variant)]["prefill"].append((middle - start) * 1e3)
                times[(str(export), variant)]["decode_step"].append((end - middle) * 1e3 / args.decode_steps)
    report = []
    for (export, (threads, spinning, arena)), t in times.items():
        report.append({"export": export, "threads": threads, "spinning": spinning, "arena": arena,
                       "prefill_ms": statistics.median(t["prefill"]), "decode_step_ms": statistics.median(t["decode_step"]),
                       "prefill_runs_ms": [round(x, 1) for x in t["prefill"]]})
    load = os.getloadavg()
    if args.json:
        print(json.dumps({"loadavg": load, "rounds": args.rounds, "tokens": args.tokens, "rows": report}, indent=2))
        return
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.rounds} rounds, {args.tokens} tokens")
    for row in report:
        print(f"{Path(row['export']).name:28s} threads {row['threads']} spinning {int(row['spinning'])} "
              f"arena {int(row['arena'])}  prefill {row['prefill_ms']:8.1f} ms  decode step {row['decode_step_ms']:7.2f} ms")


if __name__ == "__main__":
    main()
