"""Accuracy of {fp32, int8, int4, int8-dynamic} x {methods} from one ``himap-trt eval --json`` run, as grouped bars.

    himap-trt eval --data shapes:1000 --export-dir ex/none-none --export-dir ex/none-int8 ... --json > eval.json
    python benchmarks/plot_quantized_eval.py eval.json docs/images/eval-shapes-quantization.png

Each export's weights are read from its manifest (``quantization.scheme``; none: fp32); bars per
method, one per scheme, the overall accuracy and per question template.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from himap_trt.arch import get_architecture  # noqa: E402
from himap_trt.manifest import load_manifest  # noqa: E402


def main(result_path: str, out: str) -> None:
    result = json.loads(Path(result_path).read_text())
    rows = {}
    for row in result["methods"]:
        scheme = load_manifest(row["source"], verify=False, families=get_architecture).quantize
        rows[(row["method"], "fp32" if scheme == "none" else scheme)] = row
    methods = list(dict.fromkeys(method for method, _ in rows))
    schemes = [s for s in ("fp32", "int8", "int4", "int8-dynamic") if any(key[1] == s for key in rows)]
    panels = ["overall", *result["groups"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), sharey=True)
    width = 0.8 / len(schemes)
    for axis, panel in zip(axes, panels):
        for i, scheme in enumerate(schemes):
            values = [rows[(m, scheme)]["accuracy"] if panel == "overall" else rows[(m, scheme)]["accuracy_by_group"][panel]
                      for m in methods if (m, scheme) in rows]
            axis.bar([x + (i - (len(schemes) - 1) / 2) * width for x in range(len(values))], values, width, label=scheme)
        axis.set_xticks(range(len(methods)))
        axis.set_xticklabels(methods)
        axis.set_title(panel.replace("_", " "), fontsize=9)
        axis.set_ylim(0, 1.02)
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{result['data']}: {' / '.join(schemes)} under pruning", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
