#!/usr/bin/env bash
# GPU check of the TensorRT path, made to pass on its first meeting with a GPU machine that has no
# network and no TensorRT (docs/GPU.md: the image, the bundle, the two commands to copy).
#
# Usage (from the repository root):
#   bash scripts/gpu_check.sh --stash [--bundle DIR] [--stash-dir DIR]
#       first command on the GPU machine: copies the bundle's part 1 (DIR/1, default gpu-bundle/1)
#       out of the work tree into the stash (default /tmp/himap-trt-bundle), checks its sum, and
#       prints nvidia-smi -L and the Python and setuptools versions.
#   bash scripts/gpu_check.sh [--bundle DIR] [--stash-dir DIR] [--deadline S] [--steps LIST] [--summary FILE] [OUT_DIR]
#       second command: joins the libs wheel from the stashed part 1 and DIR/2, checks SHA256SUMS,
#       installs TensorRT-RTX with `pip install --no-index --no-deps --target OUT_DIR/site`, puts the
#       venv's nvidia-cuda-nvrtc libraries on LD_LIBRARY_PATH, then runs the steps (default
#       OUT_DIR gpu-check/).
#   bash scripts/gpu_check.sh --rehearse [--deadline S] [--steps LIST] [--summary FILE] [OUT_DIR]
#       the same procedure on a machine without a GPU (CI: tests/integration/test_gpu_check_rehearsal.py):
#       the bundle for the host's Python (scripts/gpu_bundle.sh --python-version of the host: the
#       cp312 bindings do not load on another Python; the libs wheel is the same) kept in
#       ~/.cache/himap-trt-gpu-check/gpu-bundle-pyX.Y (HIMAP_GPU_CHECK_CACHE), part 1 stashed,
#       joined, sum-checked and installed offline into a fresh --target directory for a venv holding
#       only the GPU image's packages (scripts/gpu_check.requirements.txt; made once in that cache,
#       reused, checked to hold neither TensorRT nor the project), the project imported from the
#       tree (no install); every step that needs a GPU prints one SKIP line.
#   bash scripts/gpu_check.sh --help
#
# Options: --deadline S  seconds for all steps together (default 500; each step also has its own
#          budget, cut to what is left); --steps LIST  comma-separated subset of
#          shapes,jit,medium,decode,7b (default all, run in that order: the order of value);
#          --summary FILE  where the summary goes (default OUT_DIR/summary.txt; e.g. $OUT/summary.txt
#          on the GPU machine, so that it comes back even when the command is cut off).
#
# Steps, each logged to OUT_DIR/<step>.log; every figure is printed as a ROW line the moment it is
# measured and appended to OUT_DIR/summary.txt, so a cut-off keeps every finished row:
#   shapes  export the trained `shapes` model (fp32, HiMAP, the export's default --kv-write), build
#           its engines for `current` (plan B where that fails, e.g. SM90/SM100 missing from
#           TensorRT-RTX 1.7.1's targets: build for SM80+SM86 and record get_engine_validity and
#           a run), answer the demo questions: TensorRT tokens = torch CUDA tokens = ONNX Runtime CPU
#           tokens (fp32, TF32 off), then TTFT/TPOT on the three.
#   jit     two processes, each loading the shapes engines and timing one TTFT: the first without
#           engines/runtime.rtxcache (JIT compilation), the second with the cache the first saved.
#   medium  the `medium` benchmark model (576 image tokens): export, build, TTFT/TPOT on the three.
#   decode  medium: decode TPOT around the 32nd and 1,024th generated token, TensorRT vs torch CUDA.
#   7b      a random-weight checkpoint of LLaVA-1.5-7B dimensions with 8 decoder layers, fp16
#           exports of HiMAP and none, their engines, TTFT/TPOT on TensorRT and torch CUDA.
# TensorRT runs use EAGER kernel specialisation (timed runs on the shape-specialised kernels).
set -u

usage() { sed -n '2,/^set -u$/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }

MODE=gpu
OUT=""
BUNDLE=""
STASH_DIR="${HIMAP_TRT_STASH:-/tmp/himap-trt-bundle}"
DEADLINE=500
STEPS="shapes,jit,medium,decode,7b"
SUMMARY=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --stash) MODE=stash; shift ;;
        --rehearse) MODE=rehearse; shift ;;
        --bundle|--stash-dir|--deadline|--steps|--summary)
            [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"
            case "$1" in --bundle) BUNDLE="$2" ;; --stash-dir) STASH_DIR="$2" ;; --deadline) DEADLINE="$2" ;;
                         --steps) STEPS="$2" ;; --summary) SUMMARY="$2" ;; esac
            shift 2 ;;
        -*) die "unknown option $1 (expected --stash, --rehearse, --bundle, --stash-dir, --deadline, --steps, --summary, --help)" ;;
        *) [ -z "$OUT" ] || die "one OUT_DIR expected, got $OUT and $1"; OUT="$1"; shift ;;
    esac
done
case "$DEADLINE" in ''|*[!0-9]*) die "--deadline must be a whole number of seconds, got $DEADLINE" ;; esac
for s in ${STEPS//,/ }; do
    case "$s" in shapes|jit|medium|decode|7b) ;; *) die "--steps takes shapes,jit,medium,decode,7b; got $s" ;; esac
done
wants() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

cd "$(dirname "$0")/.." || exit 2
ROOT="$(pwd)"
PY="${PYTHON:-python3}"
HOST_PY="$PY"

stash() {   # stash BUNDLE_DIR: copy part 1 out of the work tree, check it
    [ -d "$1/1" ] || { echo "stash: $1/1 is missing (carry the bundle's part 1: docs/GPU.md, first command)"; return 1; }
    mkdir -p "$STASH_DIR" && cp "$1"/1/* "$STASH_DIR"/ || return 1
    (cd "$STASH_DIR" && sha256sum -c --quiet SHA256SUMS.part1) || { echo "stash: part 1's checksum is wrong"; return 1; }
    echo "stash: part 1 in $STASH_DIR ($(du -sh "$STASH_DIR" | cut -f1)), checksum ok"
}

if [ "$MODE" = stash ]; then
    stash "${BUNDLE:-gpu-bundle}"; rc=$?
    nvidia-smi -L 2>&1 || true
    "$PY" -c 'import sys; print("python", sys.version.split()[0], sys.executable)'
    "$PY" -c 'import setuptools; print("setuptools", setuptools.__version__)' 2>&1 | tail -1
    exit $rc
fi

OUT="${OUT:-gpu-check}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
SUMMARY="${SUMMARY:-$OUT/summary.txt}"
mkdir -p "$(dirname "$SUMMARY")" && : > "$SUMMARY" || exit 2
SUMMARY="$(cd "$(dirname "$SUMMARY")" && pwd)/$(basename "$SUMMARY")"
export HIMAP_GPU_CHECK_SUMMARY="$SUMMARY" PYTHONUNBUFFERED=1
say() { echo "$*" | tee -a "$SUMMARY"; }
skip() { say "SKIP $*: skipped, needs a GPU (rehearsal on CPU)"; }
step() {   # step NAME SECONDS COMMAND...: own time budget, log in OUT/NAME.log, result lines shown live
    local name="$1" limit="$2"; shift 2
    local started=$SECONDS left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 5 ]; then say "step $name: not run (the ${DEADLINE} s deadline is reached)"; return 124; fi
    [ "$limit" -gt "$left" ] && limit=$left
    # rows are shown as they come (gpu_check.py appends them to the summary itself)
    timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep --line-buffered -E '^(ROW|SKIP|ERROR|ENV) ' \
        | sed -u 's/^/  /'
    local rc=${PIPESTATUS[0]}
    say "step $name: exit $rc in $((SECONDS - started)) s (budget $limit s; log $OUT/$name.log)"
    if [ "$rc" -ne 0 ]; then
        grep -E "^(error|ERROR)|Error|error:" "$OUT/$name.log" | grep -v '^ERROR ' | tail -3 | sed 's/^/    /' | tee -a "$SUMMARY"
    fi
    return "$rc"
}

say "gpu_check $MODE $(date -u +%FT%TZ) on $(hostname); steps $STEPS; deadline $DEADLINE s"

# 0. the bundle and the interpreter ---------------------------------------------------------------
if [ "$MODE" = rehearse ]; then
    HOST_VER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    CACHE="${HIMAP_GPU_CHECK_CACHE:-$HOME/.cache/himap-trt-gpu-check}"
    BUNDLE="${BUNDLE:-$CACHE/gpu-bundle-py$HOST_VER}"
    if [ ! -f "$BUNDLE/2/SHA256SUMS" ] || [ ! -f "$BUNDLE/1/SHA256SUMS.part1" ]; then
        step bundle 300 bash scripts/gpu_bundle.sh --python-version "$HOST_VER" "$BUNDLE" || exit 1
    else
        say "bundle: reusing $BUNDLE (made by scripts/gpu_bundle.sh --python-version $HOST_VER)"
    fi
    STASH_DIR="$OUT/stash"     # stands for the GPU machine's /tmp, outside the work tree
    rm -rf "$STASH_DIR"
    stash "$BUNDLE" | tee -a "$SUMMARY"
    [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
    skip "nvidia-smi -L"
    # The GPU image's packages, nothing else: a venv made once per requirements + torch + Python.
    TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
    key="$( (cat scripts/gpu_check.requirements.txt; echo "$TORCH_SPEC $HOST_VER") | sha256sum | cut -c1-12)"
    VENV="$CACHE/rehearsal-venv-py$HOST_VER-$key"
    if [ ! -f "$VENV/.complete" ]; then
        rm -rf "$VENV"
        step venv 900 bash -c "'$PY' -m venv '$VENV' && '$VENV/bin/python' -m pip install --quiet '$TORCH_SPEC' \
            && '$VENV/bin/python' -m pip install --quiet -r scripts/gpu_check.requirements.txt && touch '$VENV/.complete'" \
            || exit 1
    else
        say "venv: reusing $VENV (scripts/gpu_check.requirements.txt, $TORCH_SPEC)"
    fi
    PY="$VENV/bin/python"
    # The venv must not already hold what the bundle and the tree bring.
    if (cd / && env -u PYTHONPATH "$PY" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ("tensorrt_rtx", "himap_trt", "tensorrt")))'); then
        say "venv: holds neither tensorrt_rtx nor himap_trt (they come from the bundle and the tree)"
    else
        say "venv: $VENV already holds tensorrt_rtx or himap_trt: not a rehearsal of the GPU image"; exit 1
    fi
    export HIMAP_GPU_CHECK_REHEARSE=1
else
    BUNDLE="${BUNDLE:-gpu-bundle}"
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$SUMMARY"
fi

# 1. join, verify, install TensorRT-RTX offline into a target directory -----------------------------
WHEELS="$OUT/wheels"
SITE="$OUT/site"
rm -rf "$WHEELS" "$SITE"
mkdir -p "$WHEELS"
install_bundle() {
    [ -f "$BUNDLE/2/SHA256SUMS" ] || { echo "install: $BUNDLE/2/SHA256SUMS is missing (carry the bundle's part 2)"; return 1; }
    cp "$BUNDLE"/2/* "$WHEELS"/ || return 1
    if [ -d "$BUNDLE/1" ]; then cp "$BUNDLE"/1/* "$WHEELS"/; fi
    cp "$STASH_DIR"/* "$WHEELS"/ 2>/dev/null
    local part base
    for part in "$WHEELS"/*.whl.part-aa; do
        [ -e "$part" ] || { echo "install: part 1 (*.whl.part-aa) is neither in $STASH_DIR nor in $BUNDLE/1: run the first command (--stash) again right before this one (the machine was given back in between?)"; return 1; }
        base="${part%.part-aa}"
        cat "$base".part-* > "$base" && rm -f "$base".part-*
        echo "install: joined $(basename "$base")"
    done
    (cd "$WHEELS" && sha256sum -c SHA256SUMS) || { echo "install: SHA256SUMS do not match"; return 1; }
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || return 1
    echo "install: $(ls "$WHEELS"/*.whl | xargs -n1 basename | tr '\n' ' ')-> $SITE"
}
started=$SECONDS
install_bundle > "$OUT/install.log" 2>&1
rc=$?
sed 's/^/  /' "$OUT/install.log" | grep -E '^  install:' | tee -a "$SUMMARY"
say "step install: exit $rc in $((SECONDS - started)) s (log $OUT/install.log)"
if [ "$rc" -eq 0 ]; then
    export PYTHONPATH="$SITE"
else
    say "install: TensorRT-RTX is not installed; the TensorRT steps will report errors"
    unset PYTHONPATH
fi
# libtensorrt_rtx opens libnvrtc at run time: the venv's nvidia-cuda-nvrtc package holds it.
NVRTC="$("$PY" - <<'EOF'
import glob, os, site, sys
dirs = []
for base in [*site.getsitepackages(), *sys.path]:
    for path in sorted(glob.glob(os.path.join(base, "nvidia", "**", "libnvrtc.so*"), recursive=True)):
        if os.path.dirname(path) not in dirs:
            dirs.append(os.path.dirname(path))
print(":".join(dirs))
EOF
)"
if [ -n "$NVRTC" ]; then
    export LD_LIBRARY_PATH="$NVRTC${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "libnvrtc: $NVRTC (on LD_LIBRARY_PATH)"
elif [ "$MODE" = rehearse ]; then
    skip "libnvrtc lookup (the stand-in venv has no CUDA packages)"
else
    say "libnvrtc: not found in the venv's nvidia packages; TensorRT-RTX will fail to compile kernels"
fi
# The project comes from the tree: `python -m himap_trt.cli` from the repository root, the scripts by
# their own fallback (PYTHONPATH holds only the TensorRT-RTX target directory).
HT=("$PY" -m himap_trt.cli)
CHECK=("$PY" scripts/gpu_check.py)
step env 60 "${CHECK[@]}" env

build() {   # build NAME EXPORT_DIR MAX_BATCH [build options]: current, else plan B (SM80+SM86) with validity
    local name="$1" export_dir="$2" batch="$3"; shift 3
    if [ "$MODE" = rehearse ]; then
        skip "$name-build-current"
    elif [ "${CURRENT_FAILED:-0}" = 0 ]; then
        if step "$name-build-current" 150 "${HT[@]}" build --export-dir "$export_dir" --compute-capability current \
                --max-batch "$batch" "$@" --json; then
            say "targets $name: current"; return 0
        fi
        CURRENT_FAILED=1
        say "targets $name: current failed; plan B: SM80+SM86 ahead of time"
    fi
    step "$name-build-sm80-86" 150 "${HT[@]}" build --export-dir "$export_dir" --compute-capability 8.0,8.6 \
        --max-batch "$batch" "$@" --json || return 1
    say "targets $name: SM80+SM86"
    step "$name-validity" 60 "${CHECK[@]}" validity "$(dirname "$export_dir")/engines"
}

# 2. shapes: tokens on TensorRT, torch CUDA and ONNX Runtime; TTFT/TPOT ----------------------------
S="$OUT/shapes"
if wants shapes; then
    step shapes-export 120 "${HT[@]}" export --model shapes --out "$S/export" \
        && build shapes "$S/export" 4
    step shapes-scenes 30 "$PY" -m himap_trt.data.shapes --out "$S/scenes" --n 4 --seed 1 \
        && step shapes-tokens 120 "${CHECK[@]}" tokens "$S/export" "$S/scenes/questions.jsonl"
    step shapes-time 90 "${CHECK[@]}" time "$S/export"
fi

# 3. JIT cost without and with the runtime cache ----------------------------------------------------
if wants jit; then
    if [ "$MODE" = rehearse ]; then
        skip "jit runs 1 and 2 (TensorRT-RTX load + TTFT without, then with engines/runtime.rtxcache)"
    elif [ -d "$S/engines" ]; then
        rm -f "$S/engines/runtime.rtxcache"
        step jit-1 60 "${CHECK[@]}" jit "$S/export" 1 && step jit-2 60 "${CHECK[@]}" jit "$S/export" 2
    else
        say "step jit: not run (no shapes engines; run the shapes step first)"
    fi
fi

# 4. medium: TTFT/TPOT on the three; 5. decode TPOT as the cache grows --------------------------------
M="$OUT/medium"
if wants medium; then
    step medium-export 150 "${HT[@]}" export --model medium --no-validate --out "$M/export" \
        && build medium "$M/export" 1
    step medium-time 150 "${CHECK[@]}" time "$M/export"
fi
if wants decode; then
    if [ -f "$M/export/manifest.json" ]; then
        step decode 150 "${CHECK[@]}" decode "$M/export"
    else
        say "step decode: not run (needs the medium export: --steps medium,decode)"
    fi
fi

# 6. 7B dimensions, 8 layers, fp16: HiMAP vs none on TensorRT and torch CUDA ------------------------
if wants 7b; then
    if [ "$MODE" = rehearse ]; then
        # the checkpoint writer runs (its import of the project from the tree without an install);
        # 7B-dimension exports and builds are GPU-machine sized (tens of GB of memory and disk).
        step 7b-checkpoint-help 60 "$PY" benchmarks/make_big_checkpoint.py --help
        skip "7b checkpoint, exports, builds and timing (7B dimensions)"
    else
        CK="$OUT/7b/checkpoint"
        step 7b-checkpoint 120 "$PY" benchmarks/make_big_checkpoint.py --size 7b --layers 8 --out "$CK"
        for method in himap none; do
            extra=(); [ "$method" = himap ] && extra=(--k1 2 --k2 6)
            step "7b-export-$method" 150 "${HT[@]}" export --model "$CK" --dtype fp16 --method "$method" "${extra[@]}" \
                --no-validate --max-seq-len 1024 --out "$OUT/7b/$method/export" \
                && build "7b-$method" "$OUT/7b/$method/export" 1 --max-seq-len 1024
        done
        step 7b-time 150 "${CHECK[@]}" time-gpu "$OUT/7b/himap/export" "$OUT/7b/none/export"
    fi
fi
say "done in $SECONDS s; summary in $SUMMARY"
