"""The token and timing half of scripts/gpu_check.sh (run by it; see its docstring).

``tokens EXPORT_DIR QUESTIONS_JSONL``: greedy answers of every request on the TensorRT backend
(the engines beside the export), the torch CUDA backend and the CPU path (ONNX Runtime on the
CPU); prints per backend how many tokens equal the CPU path's, and exits 1 if an fp32 export's
TensorRT or torch CUDA tokens differ (fp16 graphs are reported, not required: rounding).

``kv-write DTYPE``: the ``--kv-write`` form TensorRT exports of DTYPE get by default (``export --target
tensorrt``; ``attention`` for fp16/bf16): what scripts/gpu_check.sh exports for TensorRT.

``time EXPORT_DIR...``: TTFT / TPOT per export (method) and backend, with ``himap-trt bench``'s
metric names (``ttft_s``, ``tpot_s``: medians over interleaved repeats, batch 1, 32 new tokens),
and the same token comparison of TensorRT against torch CUDA on the bench request.

Every backend that cannot open or run prints ``ERROR <backend>: <exact message>`` and the others go
on (e.g. TensorRT-RTX engines on a GPU its support matrix does not list).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


def _open(export_dir: Path, backend: str):
    from himap_trt.runtime.loader import open_pipeline

    device = {"tensorrt": None, "torch": "cuda", "onnxruntime": "cpu"}[backend]
    return open_pipeline(export_dir=export_dir, backend=backend, device=device).pipeline


def _error(backend: str, exc: BaseException) -> None:
    text = " ".join(str(exc).split()) or type(exc).__name__
    print(f"ERROR {backend}: {type(exc).__name__}: {text}", flush=True)
    traceback.print_exc(file=sys.stderr)


def tokens(export_dir: Path, questions: Path) -> int:
    import torch
    from PIL import Image

    from himap_trt.inputs import read_batch_file
    from himap_trt.arch import get_architecture
    from himap_trt.manifest import load_manifest
    from himap_trt.runtime import GenerationConfig

    manifest = load_manifest(export_dir, families=get_architecture)
    requests = read_batch_file(questions)
    images = [Image.open(r.image).convert("RGB") for r in requests]
    texts = [r.question for r in requests]
    config = GenerationConfig(max_new_tokens=16)
    results = {}
    for backend in ("onnxruntime", "torch", "tensorrt"):
        try:
            pipeline = _open(export_dir, backend)
            started = time.perf_counter()
            with torch.inference_mode():
                result = pipeline.generate(pipeline.prepare(images, texts), config)
            results[backend] = result.sequences.cpu()
            print(f"{backend}: {len(requests)} requests in {time.perf_counter() - started:.2f} s; first answer "
                  f"{json.dumps(result.texts[0])}", flush=True)
            pipeline.close()
        except Exception as exc:  # noqa: BLE001 - report and go on with the other backends
            _error(backend, exc)
    reference = results.get("onnxruntime")
    status = 0
    for backend in ("torch", "tensorrt"):
        if backend not in results or reference is None:
            continue
        got = results[backend]
        equal = int((got == reference).sum()) if got.shape == reference.shape else 0
        print(f"TOKENS {backend} vs cpu ({manifest.dtype}): {equal}/{reference.numel()} equal", flush=True)
        if manifest.dtype == "float32" and equal != reference.numel():
            status = 1
    if "tensorrt" not in results:
        status = status or 2
    return status


def timing(export_dirs: list[Path]) -> int:
    import torch

    from himap_trt.analysis.bench import PipelineContender, run_bench, sample_batch
    from himap_trt.arch import get_architecture
    from himap_trt.manifest import load_manifest
    from himap_trt.runtime import GenerationConfig

    rows = []
    answers: dict[str, dict[str, object]] = {}     # backend -> method -> greedy tokens
    for backend in ("tensorrt", "torch"):
        contenders = []
        for directory in export_dirs:
            try:
                contenders.append(PipelineContender(load_manifest(directory, families=get_architecture).plan.method, _open(directory, backend), True))
            except Exception as exc:  # noqa: BLE001
                _error(f"{backend} {directory}", exc)
        if not contenders:
            continue
        pipe = contenders[0].pipeline
        try:
            figures = run_bench(contenders, lambda size: sample_batch(pipe, size), batch_sizes=[1], new_tokens=[32],
                                repeats=3)
            rows += [(f.contender, backend, f.ttft_s, f.tpot_s) for f in figures]
            for contender in contenders:
                with torch.inference_mode():
                    result = contender.pipeline.generate(sample_batch(contender.pipeline, 1),
                                                         GenerationConfig(max_new_tokens=16))
                answers.setdefault(backend, {})[contender.name] = result.sequences.cpu()
        except Exception as exc:  # noqa: BLE001
            _error(f"{backend} bench", exc)
        for contender in contenders:
            contender.pipeline.close()
    for method, theirs in answers.get("torch", {}).items():
        mine = answers.get("tensorrt", {}).get(method)
        if mine is not None:
            equal = int((mine == theirs).sum()) if mine.shape == theirs.shape else 0
            print(f"TOKENS {method} tensorrt vs torch cuda: {equal}/{theirs.numel()} equal (fp16: reported)", flush=True)
    print(f"{'method':<12} {'backend':<10} {'ttft_s':>10} {'tpot_s':>10}")
    for method, backend, ttft, tpot in rows:
        print(f"{method:<12} {backend:<10} {ttft:>10.4f} {tpot:>10.5f}")
    return 0 if rows else 2


def kv_write_form(dtype: str) -> str:
    """The ``--kv-write`` a TensorRT export of ``dtype`` gets by default (``export --target tensorrt``): read from
    the one constant :data:`himap_trt.manifest.TARGET_KV_WRITES` (via :func:`himap_trt.manifest.target_kv_write`),
    so the GPU check runs the default TensorRT form whatever it is."""
    from himap_trt.graphs.spec import DTYPE_NAMES
    from himap_trt.manifest import target_kv_write

    return target_kv_write("tensorrt", DTYPE_NAMES[dtype])


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "kv-write":
        print(kv_write_form(argv[1]))
        return 0
    if len(argv) >= 3 and argv[0] == "tokens":
        return tokens(Path(argv[1]), Path(argv[2]))
    if len(argv) >= 2 and argv[0] == "time":
        return timing([Path(a) for a in argv[1:]])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
