"""`scripts/gpu_check.sh --rehearse`: the GPU check's whole procedure on this CPU machine, as a new
user on the GPU machine would meet it (docs/GPU.md).

The bundle for this Python (scripts/gpu_bundle.sh, kept in ~/.cache/himap-trt-gpu-check between runs) is
stashed, joined, sum-checked and installed with `pip install --no-index --target` into a venv holding
only the GPU image's packages (scripts/gpu_check.requirements.txt, made once and reused); the project
is imported from the tree, not installed. Every step runs up to the ones that need a GPU: the
`shapes` export with the CLI's default KV-cache write, its ahead-of-time TensorRT-RTX builds for SM80
and SM86, ONNX Runtime and torch-CPU tokens and timings, the 7B checkpoint writer's import; the
GPU steps print one SKIP line each. `medium` and `decode` are left out here (two more minutes of
export and CPU timing on 2 cores; the same code paths as `shapes`, run by hand: docs/GPU.md).

First run on a machine: downloads ~97 MB of wheels and builds the venv (~3 minutes); then ~2 minutes.
"""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from himap_trt.cli.export import export as export_command

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("vision", "embed", "segment_0", "scoring_0", "segment_1", "scoring_1", "segment_2")


@pytest.mark.slow
def test_rehearsal_runs_every_step_up_to_the_gpu(tmp_path):
    out = tmp_path / "gpu-check"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", str(tmp_path)),
           "PYTHON": sys.executable}          # no PYTHONPATH: the project must come from the tree by itself
    for name in ("HIMAP_GPU_CHECK_CACHE", "TMPDIR", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        if name in os.environ:
            env[name] = os.environ[name]
    result = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--rehearse", "--deadline", "1200",
                             "--steps", "shapes,jit,7b", str(out)], capture_output=True, text=True, env=env,
                            timeout=1500)
    summary = (out / "summary.txt").read_text()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert "stash: part 1 in" in summary and "checksum ok" in summary
    assert "install: joined tensorrt_rtx_cu13_libs-1.7.1.116-py3-none-manylinux_2_28_x86_64.whl" in summary
    assert f"tensorrt_rtx_cu13_bindings-1.7.1.116-{tag}-none-manylinux_2_28_x86_64.whl" in summary
    assert "venv: holds neither tensorrt_rtx nor himap_trt" in summary
    assert f"TensorRT-RTX 1.7.1.116 from {out}/site/tensorrt_rtx" in summary   # from the bundle's target dir
    assert not re.search(r"^ERROR ", summary, re.M), summary
    assert not re.search(r"^step \S+: exit [1-9]", summary, re.M), summary
    # the export uses the CLI's own default KV-cache write; tokens agree between the CPU backends
    default_kv_write = inspect.signature(export_command).parameters["kv_write"].default
    tokens = re.search(r"^ROW tokens shapes himap float32 kv_write=(\S+): torch-cpu vs onnxruntime-cpu (\d+)/(\d+) equal",
                       summary, re.M)
    assert tokens and tokens[1] == default_kv_write and tokens[2] == tokens[3] and int(tokens[3]) > 0, summary
    for engine in ENGINES:       # the ahead-of-time builds' header bitmask: SM80 and SM86
        assert f"ROW validity {engine}.engine: targets 8.0,8.6;" in summary
    assert re.search(r"^ROW time shapes/himap/float32/onnxruntime-cpu: ttft_s=\d", summary, re.M)
    assert re.search(r"^ROW time shapes/himap/float32/torch-cpu: ttft_s=\d", summary, re.M)
    assert "step 7b-checkpoint-help: exit 0" in summary
    for gpu_step in ("nvidia-smi -L", "shapes-build-current", "tokens tensorrt", "time shapes/himap/float32/tensorrt",
                     "jit runs 1 and 2", "7b checkpoint, exports, builds and timing"):
        assert f"SKIP {gpu_step}" in summary, gpu_step
    assert summary.rstrip().splitlines()[-1].startswith("done in ")
