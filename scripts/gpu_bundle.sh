#!/usr/bin/env bash
# The offline bundle scripts/gpu_check.sh installs on a GPU machine without network: TensorRT-RTX
# (tensorrt-rtx-cu13 1.7.1.116) as wheels for that machine's Python, in two transfers that each fit
# the 64 MiB a command carries there together with the tracked tree.
#
# Usage (from anywhere; a machine with PyPI access):
#     bash scripts/gpu_bundle.sh [--python-version X.Y] [OUT_DIR]
#         --python-version   the GPU machine's Python (default 3.12: the GPU image's); the bindings
#                            wheel is per Python version (cpXY), the libs wheel is py3-none.
#         OUT_DIR            default: gpu-bundle/ in the repository root (git-ignored).
#     bash scripts/gpu_bundle.sh --help
#
# OUT_DIR afterwards (docs/GPU.md gives the two commands that carry it):
#     1/  tensorrt_rtx_cu13_libs-...whl.part-aa     the libs wheel's first 48 MiB, and
#         SHA256SUMS.part1                          its checksum (checked when it is stashed)
#     2/  tensorrt_rtx_cu13_libs-...whl.part-ab...  the rest of the libs wheel,
#         tensorrt_rtx_cu13_bindings-...-cpXY-...whl, tensorrt_rtx_cu13-...-py3-none-any.whl
#         (the metapackage, which PyPI has only as an sdist: built here into a wheel, so that the
#         offline install needs no setuptools), and SHA256SUMS of the three whole wheels.
# It prints each transfer's size: the tracked tree (plus untracked files that are not ignored,
# which travel too) and that transfer's files; it fails if one is over 60 MiB.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
PYVER=3.12
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --python-version) [ $# -ge 2 ] || { echo "gpu_bundle.sh: --python-version needs a value like 3.12" >&2; exit 2; }
            PYVER="$2"; shift 2 ;;
        --python-version=*) PYVER="${1#*=}"; shift ;;
        -*) echo "gpu_bundle.sh: unknown option $1 (expected --python-version X.Y, --help or OUT_DIR)" >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "gpu_bundle.sh: one OUT_DIR expected, got $OUT and $1" >&2; exit 2; }
            OUT="$1"; shift ;;
    esac
done
case "$PYVER" in 3.[0-9]|3.[0-9][0-9]) ;; *) echo "gpu_bundle.sh: --python-version must look like 3.12, got $PYVER" >&2; exit 2 ;; esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu-bundle}"
PY="${PYTHON:-python3}"
VERSION=1.7.1.116
PART_BYTES=$((48 * 1024 * 1024))
LIMIT_BYTES=$((60 * 1024 * 1024))

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$work" \
    "tensorrt-rtx-cu13-libs==$VERSION" "tensorrt-rtx-cu13-bindings==$VERSION"
"$PY" -m pip wheel --quiet --no-deps -w "$work" "tensorrt-rtx-cu13==$VERSION"

libs="$(cd "$work" && ls tensorrt_rtx_cu13_libs-"$VERSION"-*.whl)"
bindings="$(cd "$work" && ls tensorrt_rtx_cu13_bindings-"$VERSION"-cp"${PYVER/./}"-*.whl)"
meta="$(cd "$work" && ls tensorrt_rtx_cu13-"$VERSION"-py3-none-any.whl)"

rm -rf "$OUT/1" "$OUT/2"
mkdir -p "$OUT/1" "$OUT/2"
(cd "$work" && sha256sum "$libs" "$bindings" "$meta") > "$OUT/2/SHA256SUMS"
split -b "$PART_BYTES" -a 2 "$work/$libs" "$work/$libs.part-"
mv "$work/$libs.part-aa" "$OUT/1/"
mv "$work/$libs".part-* "$work/$bindings" "$work/$meta" "$OUT/2/"
(cd "$OUT/1" && sha256sum "$libs.part-aa") > "$OUT/1/SHA256SUMS.part1"

# What travels with each transfer besides the bundle: tracked files and untracked ones not ignored.
tree_bytes="$(cd "$ROOT" && { git ls-files -z; git ls-files -z -o --exclude-standard; } | xargs -0 -r stat -L -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')"
status=0
for n in 1 2; do
    own="$(stat -c %s "$OUT/$n"/* | awk '{s += $1} END {print s + 0}')"
    total=$((own + tree_bytes))
    verdict="ok"
    [ "$total" -le "$LIMIT_BYTES" ] || { verdict="OVER the 60 MiB limit"; status=1; }
    awk -v n="$n" -v o="$own" -v t="$tree_bytes" -v a="$total" -v v="$verdict" -v d="$OUT/$n" 'BEGIN {
        printf "transfer %s: %.1f MiB (%s: %.1f MiB + tree: %.1f MiB) %s\n", n, a / 1048576, d, o / 1048576, t / 1048576, v }'
done
echo "bundle for Python $PYVER in $OUT (tensorrt-rtx-cu13 $VERSION; sums in $OUT/2/SHA256SUMS)"
exit $status
