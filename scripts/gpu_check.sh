#!/usr/bin/env bash
# GPU check of the TensorRT path, in one go, on a GPU machine without network (< 8 minutes on one
# H200-class GPU with 16 cores; every step has its own time limit and the script goes on after a
# failure, so a partial run still reports what it measured).
#
# Usage (from the repository root):   bash scripts/gpu_check.sh [OUT_DIR]      (default gpu-check/)
#
# What it does:
#   1. Installs the wheels copied beside it (scripts/wheels/*.whl, joined first from parts, see
#      below) with `pip install --no-index --find-links scripts/wheels`: tensorrt-rtx-cu13 1.7.1.116
#      (and tensorrt, if its wheels are there), then this project without dependencies. torch with
#      CUDA, transformers, onnx, onnxruntime... must already be installed (or be wheels there too).
#   2. Shapes demo: exports the trained built-in `shapes` model (fp32, HiMAP), builds its engines
#      with `himap-trt build --compute-capability current` (TensorRT if installed, else
#      TensorRT-RTX), answers the demo questions on the TensorRT backend, the torch CUDA backend and
#      the CPU path (ONNX Runtime), and checks the tokens: fp32 must be identical.
#   3. 7B dimensions, random weights: benchmarks/make_big_checkpoint.py --size 7b --layers 8 (LLaVA-1.5
#      7B's hidden 4096 / 32 heads / FFN 11008 and CLIP-L/336's 576 image tokens; 8 decoder layers to
#      fit the time: see docs/PERFORMANCE.md "7B/13B exports"), fp16 exports of HiMAP (K1=2, K2=6)
#      and none (no validation: the torch CUDA backend is the comparison), engines with `current`,
#      then TTFT/TPOT per method and backend with `himap-trt bench`'s metric names (ttft_s, tpot_s).
#   Every step's output goes to OUT_DIR/<step>.log; the summary (tokens, figures, and the exact
#   error where TensorRT-RTX engines do not run, e.g. on a Hopper GPU, which its support matrix does
#   not list) is printed at the end and written to OUT_DIR/summary.txt.
#
# Bringing the wheels where one transfer is limited to 64 MiB: the tensorrt-rtx-cu13-libs wheel is
# ~95 MB (xz -9e still leaves 62.5 MiB, plus the rest). On a machine with network:
#     pip download --no-deps -d scripts/wheels tensorrt-rtx-cu13==1.7.1.116 \
#         tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116
#     cd scripts/wheels && split -b 40M tensorrt_rtx_cu13_libs-*.whl tensorrt_rtx_cu13_libs.whl.part- \
#         && rm tensorrt_rtx_cu13_libs-*.whl && sha256sum * > SHA256SUMS
# and send the parts in separate transfers (each < 64 MiB). This script joins every
# `<name>.whl.part-*` set back into `<name>-<version>-....whl` (the wheel's own file name is kept in
# `<name>.whl.name` if you write it there; otherwise the joined file is named after the first part's
# wheel metadata) and checks SHA256SUMS when present, before installing.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-gpu-check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WHEELS="scripts/wheels"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
DEADLINE="${DEADLINE:-470}"   # seconds for the whole script: each step's limit is cut to what is left
step() {   # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, never abort the script
    local name="$1" limit="$2"; shift 2
    local started=$SECONDS left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 5 ]; then say "step $name: not run (the ${DEADLINE} s deadline is reached)"; return 124; fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    say "step $name: exit $rc in $((SECONDS - started)) s (log $OUT/$name.log)"
    if [ $rc -ne 0 ]; then grep -E "^(error|ERROR)|Error" "$OUT/$name.log" | tail -3 | sed 's/^/    /' | tee -a "$SUMMARY"; fi
    return $rc
}

say "gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$SUMMARY"

# 1. install ------------------------------------------------------------------------------------
if [ -d "$WHEELS" ]; then
    for first in "$WHEELS"/*.whl.part-aa; do
        [ -e "$first" ] || continue
        base="${first%.part-aa}"
        name="$(cat "$base.name" 2>/dev/null || true)"
        cat "$base".part-* > "$base.joined"
        if [ -z "$name" ]; then   # the wheel's dist-info names it: <dist>-<version>.dist-info/WHEEL
            name="$("$PY" -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); d = next(n.split("/")[0] for n in z.namelist() if n.endswith(".dist-info/WHEEL")); t = [l.split(": ")[1] for l in z.read(d + "/WHEEL").decode().splitlines() if l.startswith("Tag: ")][0]; print(d[:-len(".dist-info")] + "-" + t + ".whl")' "$base.joined")"
        fi
        mv "$base.joined" "$WHEELS/$name" && say "joined $(ls "$base".part-* | wc -l) parts into $name"
    done
    if [ -f "$WHEELS/SHA256SUMS" ]; then (cd "$WHEELS" && sha256sum --ignore-missing -c SHA256SUMS) >> "$SUMMARY" 2>&1; fi
    step install 300 "$PY" -m pip install --no-index --find-links "$WHEELS" "tensorrt-rtx-cu13==1.7.1.116"
    ls "$WHEELS"/tensorrt-1* "$WHEELS"/tensorrt_cu1* > /dev/null 2>&1 && step install-tensorrt 300 "$PY" -m pip install --no-index --find-links "$WHEELS" tensorrt
fi
step install-project 120 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch
from himap_trt.engines.flavour import installed_flavour
f = installed_flavour()
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()} "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else ''}; flavour: "
      f"{f.display + ' ' + f.version if f else 'none installed'}")
EOF
HT="$PY -m himap_trt.cli"

# 2. shapes demo: tokens on TensorRT, torch CUDA and the CPU path ---------------------------------
step shapes-export 120 $HT export --model shapes --out "$OUT/shapes/export"
step shapes-build 120 $HT build --export-dir "$OUT/shapes/export" --compute-capability current --max-batch 4 --json
step shapes-scenes 30 "$PY" -m himap_trt.data.shapes --out "$OUT/shapes/scenes" --n 4 --seed 1
step shapes-tokens 120 "$PY" scripts/gpu_check.py tokens "$OUT/shapes/export" "$OUT/shapes/scenes/questions.jsonl"
grep -E "^(TOKENS|ERROR)" "$OUT/shapes-tokens.log" | tee -a "$SUMMARY"

# 3. 7B dimensions, fp16, HiMAP and none: TTFT / TPOT on TensorRT and torch CUDA -------------------
CK="$OUT/7b/checkpoint"
step 7b-checkpoint 150 "$PY" benchmarks/make_big_checkpoint.py --size 7b --layers 8 --out "$CK"
# the default TensorRT form (himap_trt.manifest.TARGET_KV_WRITES, read through gpu_check.py kv-write)
KVW=$("$PY" scripts/gpu_check.py kv-write fp16)
step 7b-export-himap 150 $HT export --model "$CK" --dtype fp16 --kv-write "$KVW" --k1 2 --k2 6 --no-validate --max-seq-len 1024 --out "$OUT/7b/himap/export"
step 7b-export-none 120 $HT export --model "$CK" --dtype fp16 --kv-write "$KVW" --method none --no-validate --max-seq-len 1024 --out "$OUT/7b/none/export"
for method in himap none; do
    step "7b-build-$method" 150 $HT build --export-dir "$OUT/7b/$method/export" --compute-capability current --max-batch 1 --max-seq-len 1024 --json
done
step 7b-time 200 "$PY" scripts/gpu_check.py time "$OUT/7b/himap/export" "$OUT/7b/none/export"
grep -E "^(TOKENS|ERROR)|ttft_s|^(himap|none) " "$OUT/7b-time.log" | tee -a "$SUMMARY"
say "done in $SECONDS s; summary in $SUMMARY"
