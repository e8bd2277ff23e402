"""Export the `medium` benchmark model (random weights; benchmarks/bench_prefill.py's config: 576 image
tokens, Llama decoder hidden 512 x 12 layers) with HiMAP K1=2 R1=0.5 K2=8 R2=0.75, fp32, for the
serving benchmarks (benchmarks/serve_acceptance.py, benchmarks/serve_soak.py).

    python benchmarks/export_medium.py export-medium
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prefill import medium_config  # noqa: E402

from himap_trt.export import ExportOptions, export_model  # noqa: E402
from himap_trt.models.tiny import random_model  # noqa: E402
from himap_trt.plan import build_plan  # noqa: E402


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    loaded = random_model(medium_config())
    dims = loaded.dims
    plan = build_plan("himap", num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens)
    manifest, _ = export_model(loaded, plan, ExportOptions(out=Path(sys.argv[1]), dtype="fp32"))
    print(f"exported {sys.argv[1]}: {plan.describe()}, max_seq_len {manifest.max_seq_len}")


if __name__ == "__main__":
    main()
