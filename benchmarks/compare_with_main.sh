#!/bin/bash
# Export tiny (fp32) and tiny-gqa (fp16, converted from the fp32 checkpoint) with the code of REF
# (default: main) and with this checkout, and compare: .onnx (and .onnx.data) bytes, the manifest's
# validation figures and the model hash. Run from the repository root after `make install`.
#   bash benchmarks/compare_with_main.sh [REF]
set -e
ref=${1:-main}
work=$(mktemp -d /tmp/himap-cmp-XXXX)
git archive "$ref" | tar -x -C "$work/" --one-top-level=ref
root=$(pwd)
for args in "tiny fp32" "tiny-gqa fp16"; do
  set -- $args
  (cd /tmp && PYTHONPATH="$work/ref" nice -n 10 "$root/.venv/bin/python" -c "import himap_trt, sys
assert himap_trt.__file__.startswith('$work/ref')
from himap_trt.cli import app
sys.argv = ['himap-trt', 'export', '--model', '$1', '--dtype', '$2', '--out', '$work/ref-$1-$2']
app()" > /dev/null 2>&1)
  nice -n 10 .venv/bin/himap-trt export --model "$1" --dtype "$2" --out "$work/this-$1-$2" > /dev/null 2>&1
  .venv/bin/python - "$work/ref-$1-$2" "$work/this-$1-$2" <<'PY'
import filecmp, json, sys
from pathlib import Path
a, b = Path(sys.argv[1]), Path(sys.argv[2])
ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
files = sorted(f for f in ma["files"] if f.endswith((".onnx", ".onnx.data")))
same = [filecmp.cmp(a / f, b / f, shallow=False) for f in files]
print(a.name, "graph files byte-identical:", all(same), f"({sum(same)}/{len(same)})",
      "| validation figures identical:", ma["validation"] == mb["validation"], f"({len(ma['validation'])} outputs)",
      "| model_hash identical:", ma["model_hash"] == mb["model_hash"])
PY
done
rm -rf "$work"
