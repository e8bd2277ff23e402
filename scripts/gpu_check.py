"""The measuring half of scripts/gpu_check.sh (run by it, one subcommand per step; see its header).

Usage: python scripts/gpu_check.py SUBCOMMAND ARGS...

  env                                 Python, torch (CUDA, GPU), the TensorRT flavour and where it was imported from
  tokens EXPORT QUESTIONS   greedy answers on ONNX Runtime (CPU), torch (CUDA) and TensorRT: equal-token
                            counts; exit 1 if an fp32 export's TensorRT tokens differ from another backend's
                            (torch's TF32 off: convolutions and matmuls in full fp32)
  jit EXPORT RUN            one process's TensorRT load + TTFT (EAGER kernels) with the runtime cache
                            engines/runtime.rtxcache as found (run 1: the caller removed it; run 2: kept)
  time EXPORT...            TTFT / TPOT (batch 1, 32 new tokens, medians of 3 after a warm-up) per export on
                            TensorRT, torch CUDA and ONNX Runtime CPU
  time-gpu EXPORT...        the same on TensorRT and torch CUDA only (7B dimensions)
  decode EXPORT             decode TPOT around the 32nd and 1,024th generated token (TensorRT, torch CUDA)
  validity ENGINES          each engine's targets (header) and what get_engine_validity says on this machine
TensorRT engines are the ones in engines/ beside each export (`himap-trt build`'s default).

Every figure is printed as one ``ROW ...`` line the moment it is measured (flushed) and appended to the
summary file named by HIMAP_GPU_CHECK_SUMMARY, so a cut-off keeps every finished row. A backend that
cannot open or run prints ``ERROR <backend>: <message>`` and the others go on. With
HIMAP_GPU_CHECK_REHEARSE=1 (``gpu_check.sh --rehearse``, a machine without a GPU) every TensorRT run
prints one ``SKIP`` line and torch runs on the CPU in place of CUDA.

Imports the project from this tree when it is not installed (no editable install needed).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REHEARSE = os.environ.get("HIMAP_GPU_CHECK_REHEARSE") == "1"
SUMMARY = os.environ.get("HIMAP_GPU_CHECK_SUMMARY")
TORCH_DEVICE = "cpu" if REHEARSE else "cuda"
WHY_SKIPPED = "skipped, needs a GPU (rehearsal on CPU)"


def row(text: str) -> None:
    """Print one result line now and append it to the summary file."""
    print(text, flush=True)
    if SUMMARY:
        with open(SUMMARY, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")


def skipped(what: str) -> None:
    row(f"SKIP {what}: {WHY_SKIPPED}")


def error(what: str, exc: BaseException) -> None:
    text = " ".join(str(exc).split()) or type(exc).__name__
    row(f"ERROR {what}: {type(exc).__name__}: {text[:400]}")
    traceback.print_exc(file=sys.stderr)


def tf32_off() -> None:
    """fp32 token equality needs fp32 arithmetic: torch runs cuDNN convolutions (the vision patch
    embedding) and, where enabled, matmuls in TF32 on Ampere and later."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def open_backend(export_dir: Path, backend: str):
    """The pipeline of ``backend``: onnxruntime on the CPU, torch on CUDA (CPU when rehearsing),
    tensorrt with EAGER kernel specialisation."""
    if backend == "tensorrt":
        return open_pipeline(export_dir=export_dir, backend="tensorrt", kernel_specialization="eager").pipeline
    device = {"torch": TORCH_DEVICE, "onnxruntime": "cpu"}[backend]
    return open_pipeline(export_dir=export_dir, backend=backend, device=device).pipeline


def label(backend: str) -> str:
    return {"torch": f"torch-{TORCH_DEVICE}", "onnxruntime": "onnxruntime-cpu"}.get(backend, backend)


def env() -> int:
    cuda = torch.cuda.is_available()
    gpu = f"{torch.cuda.get_device_name()} sm{''.join(map(str, torch.cuda.get_device_capability()))}" if cuda else "none"
    flavour = installed_flavour()
    where = "none installed"
    if flavour is not None:
        module = flavour.module()
        where = f"{flavour.display} {module.__version__} from {Path(module.__file__).parent}"
    row(f"ENV python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}, GPU {gpu}); "
        f"{where}; LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')}")
    return 0


def tokens(export_dir: Path, questions: Path) -> int:
    from PIL import Image

    tf32_off()
    manifest = load_manifest(export_dir, families=get_architecture)
    requests = read_batch_file(questions)
    images = [Image.open(r.image).convert("RGB") for r in requests]
    texts = [r.question for r in requests]
    results = {}
    for backend in ("onnxruntime", "torch", "tensorrt"):
        if backend == "tensorrt" and REHEARSE:
            skipped("tokens tensorrt")
            continue
        try:
            pipeline = open_backend(export_dir, backend)
            started = time.perf_counter()
            with torch.inference_mode():
                result = pipeline.generate(pipeline.prepare(images, texts), GenerationConfig(max_new_tokens=16))
            results[backend] = result.sequences.cpu()
            print(f"{label(backend)}: {len(requests)} requests in {time.perf_counter() - started:.2f} s; first answer "
                  f"{json.dumps(result.texts[0])}", flush=True)
            pipeline.close()
        except Exception as exc:  # noqa: BLE001 - report and go on with the other backends
            error(f"tokens {label(backend)}", exc)
    status = 0
    for mine, theirs in (("torch", "onnxruntime"), ("tensorrt", "torch"), ("tensorrt", "onnxruntime")):
        if mine not in results or theirs not in results:
            continue
        a, b = results[mine], results[theirs]
        equal = int((a == b).sum()) if a.shape == b.shape else 0
        row(f"ROW tokens {manifest.source_model} {manifest.plan.method} {manifest.dtype} kv_write={manifest.kv_write}: "
            f"{label(mine)} vs {label(theirs)} {equal}/{b.numel()} equal")
        if manifest.dtype == "float32" and mine == "tensorrt" and equal != b.numel():
            status = 1
    if not REHEARSE and "tensorrt" not in results:
        status = status or 2
    return status


def jit(export_dir: Path, run: int) -> int:
    if REHEARSE:
        skipped(f"jit run {run} (TensorRT-RTX load + TTFT with/without the runtime cache)")
        return 0
    try:
        started = time.perf_counter()
        pipeline = open_backend(export_dir, "tensorrt")
        torch.cuda.synchronize()
        load = time.perf_counter() - started
        shared = next(iter(pipeline.backends.values())).shared
        with torch.inference_mode():
            result = pipeline.generate(sample_batch(pipeline, 1), GenerationConfig(max_new_tokens=4, ignore_eos=True))
        cache = shared.cache
        loaded = cache.loaded if cache is not None else None
        pipeline.close()
        saved = cache.saved_bytes if cache is not None else 0
        row(f"ROW jit run={run} load_s={load:.3f} ttft_s={result.ttft_s:.4f} tpot_s={result.tpot_s:.5f} "
            f"runtime_cache_loaded={loaded} runtime_cache_saved_bytes={saved}")
    except Exception as exc:  # noqa: BLE001
        error(f"jit run {run}", exc)
        return 1
    return 0


def _bench_one(name: str, pipeline) -> None:
    """TTFT / TPOT of one pipeline: batch 1, 32 new tokens, medians of 3 after a warm-up (rehearsing:
    8 tokens, 1 run: the code path, not a figure)."""
    new_tokens, repeats = (8, 1) if REHEARSE else (32, 3)
    figures = run_bench([PipelineContender(name, pipeline, True)], lambda size: sample_batch(pipeline, size),
                        batch_sizes=[1], new_tokens=[new_tokens], repeats=repeats)
    for f in figures:
        row(f"ROW time {name}: ttft_s={f.ttft_s:.4f} tpot_s={f.tpot_s:.5f} prompt_tokens={f.prompt_tokens} "
            f"new_tokens={f.new_tokens} repeats={f.repeats}")


def timing(export_dirs: list[Path], backends: tuple[str, ...]) -> int:
    measured = 0
    for directory in export_dirs:
        manifest = load_manifest(directory, families=get_architecture)
        model = Path(manifest.source_model).name or manifest.source_model
        for backend in backends:
            name = f"{model}/{manifest.plan.method}/{manifest.dtype}/{label(backend)}"
            if backend == "tensorrt" and REHEARSE:
                skipped(f"time {name}")
                continue
            try:
                pipeline = open_backend(directory, backend)
                _bench_one(name, pipeline)
                pipeline.close()
                measured += 1
            except Exception as exc:  # noqa: BLE001
                error(f"time {name}", exc)
    return 0 if measured else 2


def decode(export_dir: Path) -> int:
    """Decode TPOT as the KV cache grows: the median inter-token latency over generated tokens
    24..40 and 1,016..1,032 (each a median over repeats of the window's mean); rehearsing: the first
    window only, one repeat, on the CPU."""
    manifest = load_manifest(export_dir, families=get_architecture)
    windows = {32: (24, 40)} if REHEARSE else {32: (24, 40), 1024: (1016, 1032)}
    new_tokens = max(end for _, end in windows.values()) + 1
    repeats = 1 if REHEARSE else 3
    for backend in ("tensorrt", "torch"):
        name = f"{Path(manifest.source_model).name}/{manifest.plan.method}/{manifest.dtype}/{label(backend)}"
        if backend == "tensorrt" and REHEARSE:
            skipped(f"decode {name}")
            continue
        try:
            pipeline = open_backend(export_dir, backend)
            batch = sample_batch(pipeline, 1)
            config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
            with torch.inference_mode():
                pipeline.generate(batch, GenerationConfig(max_new_tokens=4, ignore_eos=True))   # warm-up
                runs = [pipeline.generate(batch, config) for _ in range(repeats)]
            prompt = runs[0].prompt_tokens[0]
            for at, (start, end) in windows.items():
                values = [statistics.mean(r.itl_s[start:end]) for r in runs if len(r.itl_s) >= end]
                if not values:
                    row(f"ERROR decode {name}: fewer than {end} tokens generated (max_seq_len?)")
                    continue
                row(f"ROW decode {name}: tpot_s_at_{at}_generated={statistics.median(values):.5f} "
                    f"(cache ~{prompt + at} tokens before pruning, prompt {prompt}, repeats {len(values)})")
            pipeline.close()
        except Exception as exc:  # noqa: BLE001
            error(f"decode {name}", exc)
    return 0


def validity(engines_dir: Path) -> int:
    """Each engine's ahead-of-time targets (TensorRT-RTX header) and ``get_engine_validity`` here."""
    engines = read_engines_manifest(engines_dir)
    flavour = flavour_of(engines.tensorrt_flavour)
    runtime = None
    if not REHEARSE:
        trt = flavour.module()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for entry in engines.engines:
        blob = (Path(engines_dir) / entry.file).read_bytes()
        targets = ",".join(rtx_header_capabilities(blob)) if flavour.key == RTX.key else "-"
        if runtime is None:
            row(f"ROW validity {entry.file}: targets {targets}; get_engine_validity {WHY_SKIPPED}")
            continue
        invalid = flavour.engine_validity(runtime, blob)
        row(f"ROW validity {entry.file}: targets {targets}; get_engine_validity: {'INVALID ' + invalid if invalid else 'valid'}")
    return 0


def _import_project() -> None:
    """torch and the project, imported after the arguments are checked (usage and bad arguments stay
    instant); the project from this tree when it is not installed (no editable install needed)."""
    global torch, PipelineContender, run_bench, sample_batch, get_architecture, RTX, flavour_of, installed_flavour
    global rtx_header_capabilities, read_engines_manifest, read_batch_file, load_manifest, GenerationConfig
    global open_pipeline
    try:
        import himap_trt  # noqa: F401 - installed, or on PYTHONPATH
    except ImportError:        # run from the tree without an install: import it from here
        sys.path.insert(0, str(ROOT))
    import torch

    from himap_trt.analysis.bench import PipelineContender, run_bench, sample_batch
    from himap_trt.arch import get_architecture
    from himap_trt.engines.flavour import RTX, flavour_of, installed_flavour, rtx_header_capabilities
    from himap_trt.engines.manifest import read_engines_manifest
    from himap_trt.inputs import read_batch_file
    from himap_trt.manifest import load_manifest
    from himap_trt.runtime import GenerationConfig
    from himap_trt.runtime.loader import open_pipeline


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    arity = {"env": (0, 0), "tokens": (2, 2), "jit": (2, 2), "time": (1, 99), "time-gpu": (1, 99), "decode": (1, 1),
             "validity": (1, 1)}
    if command not in arity or not arity[command][0] <= len(args) <= arity[command][1] \
            or (command == "jit" and not args[1].isdigit()):
        print(f"gpu_check.py: bad arguments {' '.join(argv)!r}; usage: python scripts/gpu_check.py --help",
              file=sys.stderr)
        return 2
    _import_project()
    if command == "env":
        return env()
    if command == "tokens":
        return tokens(Path(args[0]), Path(args[1]))
    if command == "jit":
        return jit(Path(args[0]), int(args[1]))
    if command == "time":
        return timing([Path(a) for a in args], ("tensorrt", "torch", "onnxruntime"))
    if command == "time-gpu":
        return timing([Path(a) for a in args], ("tensorrt", "torch"))
    if command == "decode":
        return decode(Path(args[0]))
    return validity(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
