"""Memory of one ONNX Runtime CPU session on an exported graph, under different session options.

Each configuration runs in a fresh subprocess (so peaks do not mix): open the session, then one
prefill-shaped call (batch 1, 16 tokens). Printed per configuration (GiB): the RSS once open, the peak
while opening (VmHWM), the peak after the call, open and call times. The graph's weight bytes (its
file and external data) are printed first for the ratios.

Usage::

    python benchmarks/ort_session_memory.py /tmp/big/ex-7b-32 segment_0
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "default (run's options)": {},
    "arena off": {"arena": False},
    "prepacking off": {"entries": {"session.disable_prepacking": "1"}},
    "arena + prepacking off": {"arena": False, "entries": {"session.disable_prepacking": "1"}},
    "use_ort_model_bytes_directly": {"entries": {"session.use_ort_model_bytes_directly": "1"}, "from_bytes": True},
    "optimizations off (fp16 weights kept)": {"level": "ORT_DISABLE_ALL"},
    "basic optimizations": {"level": "ORT_ENABLE_BASIC"},
}


def _gib(key: str) -> float:
    for line in open("/proc/self/status"):
        name, _, value = line.partition(":")
        if name == key:
            return round(int(value.split()[0]) / 1024**2, 2)
    return float("nan")


def child(export_dir: str, graph: str, config_name: str) -> None:
    import numpy as np
    import onnxruntime as ort

    from himap_trt.arch import get_architecture
    from himap_trt.manifest import load_manifest
    from himap_trt.export.onnx_export import example_inputs

    config = CONFIGS[config_name]
    manifest = load_manifest(export_dir, verify=False, families=get_architecture)
    spec = manifest.graph(graph)
    path = Path(export_dir) / spec.file
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, config.get("level", "ORT_ENABLE_ALL"))
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = config.get("arena", True)
    for key, value in config.get("entries", {}).items():
        options.add_session_config_entry(key, value)
    before = _gib("VmRSS")
    start = time.perf_counter()
    if config.get("from_bytes"):
        import onnx

        model = onnx.load(str(path))            # external data inlined: the bytes are the model
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        del model
    else:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    open_s = time.perf_counter() - start
    opened, open_peak = _gib("VmRSS"), _gib("VmHWM")
    sizes = {"batch": 1, "sequence": 16, "cache_sequence": 16}
    feeds = {k: v.numpy() for k, v in example_inputs(spec, sizes, manifest.dims.vocab_size).items()}
    feeds = {k: (v.astype(np.float16) if v.dtype == np.float32 and manifest.dtype == "float16" else v)
             for k, v in feeds.items()}
    start = time.perf_counter()
    session.run(None, feeds)
    run_s = time.perf_counter() - start
    print(json.dumps({"config": config_name, "rss_before_gib": before, "rss_open_gib": opened,
                      "peak_open_gib": open_peak, "peak_after_call_gib": _gib("VmHWM"),
                      "open_s": round(open_s, 1), "call_s": round(run_s, 2)}))


def main() -> int:
    if len(sys.argv) == 4:
        child(*sys.argv[1:])
        return 0
    export_dir, graph = sys.argv[1], sys.argv[2]
    files = [p for p in Path(export_dir).iterdir() if p.name.startswith(f"{graph}.onnx")]
    print(json.dumps({"graph": graph, "weight_bytes_gib": round(sum(p.stat().st_size for p in files) / 1024**3, 2)}))
    for name in CONFIGS:
        result = subprocess.run([sys.executable, __file__, export_dir, graph, name], capture_output=True, text=True)
        print(result.stdout.strip() or json.dumps({"config": name, "error": result.stderr.strip().splitlines()[-1:]}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
