"""TensorRT on a GPU: build the tiny model's engines and check them against ONNX Runtime.

These need CUDA and TensorRT or TensorRT-RTX (``--tensorrt auto``: TensorRT if installed, else
TensorRT-RTX, built for the current GPU); the `gpu` marker makes pytest skip them (with the reason)
anywhere either is missing. They have not run on a GPU yet: see the README, "What was verified
where"; scripts/gpu_check.sh runs them where a GPU is lent.
"""

import pytest
import torch

from conftest import exported
from himap_trt.runtime import GenerationConfig
from himap_trt.runtime.loader import open_pipeline

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_tensorrt_pipeline_matches_onnxruntime(tmp_path_factory, tmp_path, dtype, requests_3):
    from himap_trt.arch import get_architecture
    from himap_trt.engines.build import build_engines, resolve_target
    from himap_trt.manifest import load_manifest

    out, manifest, _ = exported(tmp_path_factory, "tiny-gqa", "himap", dtype=dtype, k1=2, r1=0.5, k2=8, r2=0.75)
    engines = tmp_path / "engines"
    build_engines(out, engines, load_manifest(out, families=get_architecture), max_batch=3, max_seq_len=512,
                  target=resolve_target("auto", "current"))
    trt = open_pipeline(export_dir=out, backend="tensorrt", engines_dir=engines).pipeline
    ort = open_pipeline(export_dir=out, backend="onnxruntime", device="cpu").pipeline
    images, questions = requests_3
    batch = ort.prepare(images, questions)
    got = trt.generate(batch, GenerationConfig(max_new_tokens=16))
    want = ort.generate(batch, GenerationConfig(max_new_tokens=16))
    if dtype == "fp32":
        for a, b in zip(got.stages, want.stages):
            assert torch.equal(a.kept_indices.cpu(), b.kept_indices.cpu())
        assert torch.equal(got.sequences, want.sequences)
    # Each scoring graph on identical inputs (ONNX Runtime's prefill feeds): end to end in fp16,
    # rounding along the chain may flip near-ties, on the same inputs the selection must agree.
    feeds = {}
    for spec in (s for s in ort.specs.values() if s.kind == "scoring"):
        backend = ort.backends[spec.name]

        def capture(f, outputs=None, _run=backend.run, _name=spec.name):
            feeds[_name] = {k: v.clone() for k, v in f.items()}
            return _run(f)
        backend.run = capture
    ort.prefill(batch)
    for name, inputs in feeds.items():
        expected = ort.backends[name].__class__.run(ort.backends[name], inputs)["kept_indices"]
        result = trt.backends[name].run({k: v.cuda() for k, v in inputs.items()})["kept_indices"]
        assert torch.equal(result.cpu(), expected), name
