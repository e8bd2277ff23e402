"""Shared fixtures: built-in tiny models in a per-session cache, the sample photo, the gpu marker."""

from __future__ import annotations

import contextlib

import os
import tempfile
from pathlib import Path

import pytest

# Built-in models are written under HIMAP_TRT_CACHE; give the test session its own, so tests
# exercise the build-on-first-use path and never depend on a user's cache. CLI subprocesses inherit it.
os.environ.setdefault("HIMAP_TRT_CACHE", tempfile.mkdtemp(prefix="himap-trt-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _gpu_skip_reason() -> str | None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU; none is visible to torch on this machine"
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None and importlib.util.find_spec("tensorrt_rtx") is None:
        return ("needs TensorRT or TensorRT-RTX; neither module 'tensorrt' nor 'tensorrt_rtx' is installed "
                "(`make install` installs TensorRT-RTX unless TRT_RTX=0)")
    return None


def pytest_collection_modifyitems(config, items):
    reason = _gpu_skip_reason()
    if reason is None:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def photo_path() -> Path:
    """A real photo shipped with matplotlib (Grace Hopper, 512x600 JPEG)."""
    from matplotlib import cbook

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@pytest.fixture(scope="session")
def photo(photo_path):
    from himap_trt.prompt import load_image

    return load_image(photo_path)


#: The plans the reference tests (test_reference.py: LLaVA; test_qwen_reference.py: Qwen2.5-VL) check
#: against transformers' eager attention: two HiMAP and two FastV settings.
REFERENCE_PLANS = [
    ("himap", dict(k1=2, r1=0.5, k2=8, r2=0.75)),
    ("himap", dict(k1=3, r1=0.6, k2=6, r2=0.5)),
    ("fastv", dict(k=2, r=0.5)),
    ("fastv", dict(k=5, r=0.75)),
]


def plan_id(value) -> str:
    """pytest id of a (method, options) parameter: the method, or its options as k1...-r1..."""
    return value if isinstance(value, str) else "-".join(f"{k}{x}" for k, x in value.items())


@contextlib.contextmanager
def entering_hidden_states(layers, indices):
    """While inside: record the hidden states entering decoder layers ``indices`` of ``layers`` (a
    transformers ``ModuleList``), by forward pre-hooks; yields ``{layer index: [B,S,D] tensor}``."""
    entering = {}

    def grab(layer):
        def hook(module, args, kwargs):
            entering[layer] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    handles = [layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in indices]
    try:
        yield entering
    finally:
        for h in handles:
            h.remove()


_MODELS: dict[str, object] = {}


def tiny(name: str):
    """A loaded built-in model (cached for the session), eager attention for attention read-outs."""
    if name not in _MODELS:
        from himap_trt.models import load_model

        _MODELS[name] = load_model(name)
    return _MODELS[name]


@pytest.fixture(scope="session", params=["tiny", "tiny-gqa"])
def tiny_model(request):
    """Each built-in tiny configuration: multi-head and grouped-query attention."""
    return tiny(request.param)


@pytest.fixture(scope="session")
def requests_3(photo):
    """Three (image, question) pairs with different question lengths (a padded batch)."""
    return (
        [photo, photo.rotate(90), photo.convert("L")],
        ["What is shown?", "Describe the person in this photo in detail, please.", "Who?"],
    )


_EXPORTS: dict[tuple, tuple] = {}


def exported(tmp_path_factory, name: str, method: str, dtype: str = "fp32", validate: bool = True,
             kv_write: str = "scatternd", quantize: str = "none", max_seq_len: int | None = None, **plan_kw):
    """Export a built-in model under a plan once per session (Python API, the CLI's code path).

    Returns:
        (export_dir, manifest, validation checks).
    """
    key = (name, method, dtype, validate, kv_write, quantize, tuple(sorted(plan_kw.items())),
           *((max_seq_len,) if max_seq_len else ()))
    if key not in _EXPORTS:
        from himap_trt.export import ExportOptions, export_model
        from himap_trt.models.loading import DTYPES
        from himap_trt.plan import build_plan

        loaded = tiny(name) if dtype == "fp32" else __import__("himap_trt.models", fromlist=["load_model"]).load_model(
            name, dtype=DTYPES[dtype])
        dims = loaded.dims
        plan = build_plan(method, num_layers=dims.num_layers, num_image_tokens=dims.num_image_tokens, **plan_kw)
        label = "-".join([name, method, dtype, kv_write, quantize, *(f"{k}{v}" for k, v in sorted(plan_kw.items())),
                          *((f"m{max_seq_len}",) if max_seq_len else ())])
        out = tmp_path_factory.mktemp("exports") / label
        manifest, checks = export_model(loaded, plan, ExportOptions(out=out, dtype=dtype, validate=validate,
                                                                    kv_write=kv_write, quantize=quantize,
                                                                    max_seq_len=max_seq_len))
        _EXPORTS[key] = (out, manifest, checks)
    return _EXPORTS[key]


@pytest.fixture(scope="session")
def qwen_requests(photo):
    """Three (image, question) pairs for tiny-qwen2.5-vl: three image sizes (56, 16 and 20 image
    tokens under its 4..64-token processor) and three question lengths."""
    rgb = photo.convert("RGB")
    return (
        [rgb, rgb.resize((100, 120)), rgb.convert("L").resize((150, 90))],
        ["What is shown?", "Describe the person in this photo in detail, please.", "Who?"],
    )
