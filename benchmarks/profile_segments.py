"""Where a segment graph's time goes in ONNX Runtime: per-operator totals from its profiler.

Every decoder segment of each export runs a prefill (the prompt's length, cache buffer of that
length) and a decode step (one token into a buffer of prompt + 32 positions) with ONNX Runtime's
profiler on, the exports interleaved run by run; per operator type the summed node time of each run,
median over the runs (ms). The session is made as the runtime makes it
(:class:`himap_trt.runtime.onnxrt.OnnxRuntimeBackend`: all graph optimisations, spinning off, the
quantized exports' MatMulNBits accuracy level).

    python benchmarks/profile_segments.py --export-dir bx/medium-none-none --export-dir bx/medium-none-int4 \
        --tokens 653 --runs 5 --threads 2
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

from himap_trt.arch import get_architecture
from himap_trt.manifest import load_manifest
from himap_trt.export.onnx_export import example_inputs
from himap_trt.graphs.spec import past_names
from himap_trt.runtime.onnxrt import session_config


def session(path: Path, spec, threads: int, profile_dir: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in session_config(spec.attrs.get("quantization")).items():
        options.add_session_config_entry(key, value)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(profile_dir) / path.stem)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(spec, vocab: int, sequence: int, cache: int) -> dict:
    values = example_inputs(spec, {"batch": 1, "sequence": sequence, "cache_sequence": cache}, vocab)
    for layer in range(*spec.layers):
        for name in past_names(layer):
            values[name] = torch.zeros_like(values[name])
    return {k: v.numpy() for k, v in values.items()}


def per_op(profile: Path) -> list[dict[str, float]]:
    """Per run (events between two model_run events): op type -> summed node time (ms)."""
    events = json.loads(profile.read_text())
    runs, current = [], collections.Counter()
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            runs.append(current)
            current = collections.Counter()
        elif event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            current[event["args"]["op_name"]] += event["dur"] / 1000
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", action="append", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=653, help="prompt tokens (prefill)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        for export in args.export_dir:
            manifest = load_manifest(export, families=get_architecture)
            for spec in manifest.graphs:
                if spec.kind != "segment":
                    continue
                tokens = args.tokens if spec.layers[0] == 0 else None
                for phase in ("prefill", "decode"):
                    cases.append((export, manifest, spec, phase, session(export / spec.file, spec, args.threads, tmp)))
        inputs = {}
        for export, manifest, spec, phase, sess in cases:
            n = args.tokens - (manifest.plan.num_image_tokens - spec.attrs["image_tokens"])   # pruned segments are shorter
            inputs[id(sess)] = feeds(spec, manifest.dims.vocab_size, n if phase == "prefill" else 1,
                                     n if phase == "prefill" else n + 32)
        for _ in range(args.runs + 1):                     # the first run is a warm-up
            for export, manifest, spec, phase, sess in cases:
                sess.run(None, inputs[id(sess)])
        report = []
        for export, manifest, spec, phase, sess in cases:
            runs = per_op(Path(sess.end_profiling()))[1:]
            ops = sorted({op for run in runs for op in run})
            medians = {op: statistics.median(run.get(op, 0.0) for run in runs) for op in ops}
            total = statistics.median(sum(run.values()) for run in runs)
            report.append({"export": str(export), "graph": spec.name, "phase": phase, "total_ms": total,
                           "ops_ms": dict(sorted(medians.items(), key=lambda kv: -kv[1]))})
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for row in report:
        top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(row["ops_ms"].items())[:8])
        print(f"{Path(row['export']).name:24s} {row['graph']:10s} {row['phase']:8s} {row['total_ms']:8.1f} ms  {top}")


if __name__ == "__main__":
    main()
