#!/bin/bash
# Export tiny (fp32) and tiny-gqa (fp16, converted from the fp32 checkpoint) with the code of REF
# (default: main) and of HEAD, and compare .onnx/.onnx.data bytes, the manifest's validation figures
# and the model hash. Both trees are extracted in turn at the same path: the exporter records source
# file paths in node metadata (stack traces), so two checkouts at different paths never give equal bytes.
# Run from the repository root after `make install`:   bash benchmarks/compare_with_main.sh [REF]
set -e
ref=${1:-main}
work=$(mktemp -d /tmp/himap-cmp-XXXX)
root=$(pwd)
export_with() {   # $1 git ref, $2 label
  local label=$2
  rm -rf "$work/src" && mkdir "$work/src" && git archive "$1" | tar -x -C "$work/src"
  for args in "tiny fp32" "tiny-gqa fp16"; do
    set -- $args "$label"
    (cd /tmp && PYTHONPATH="$work/src" nice -n 10 "$root/.venv/bin/python" -c "import himap_trt, sys
assert himap_trt.__file__.startswith('$work/src')
from himap_trt.cli import app
sys.argv = ['himap-trt', 'export', '--model', '$1', '--dtype', '$2', '--out', '$work/$3-$1-$2']
app()" > /dev/null 2>&1)
  done
}
export_with "$ref" ref
export_with HEAD head
for tag in tiny-fp32 tiny-gqa-fp16; do
  .venv/bin/python - "$work/ref-$tag" "$work/head-$tag" <<'PY'
import filecmp, json, sys
from pathlib import Path
a, b = Path(sys.argv[1]), Path(sys.argv[2])
ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
files = sorted(f for f in ma["files"] if f.endswith((".onnx", ".onnx.data")))
same = [filecmp.cmp(a / f, b / f, shallow=False) for f in files]
print(b.name, "graph files byte-identical:", all(same), f"({sum(same)}/{len(same)})",
      "| validation figures identical:", ma["validation"] == mb["validation"], f"({len(ma['validation'])} outputs)",
      "| model_hash identical:", ma["model_hash"] == mb["model_hash"])
PY
done
rm -rf "$work"
