"""engines/flavour.py: choosing TensorRT or TensorRT-RTX, and keeping both imports lazy."""

import subprocess
import sys

import pytest

from himap_trt.engines import flavour as fl
from himap_trt.errors import HimapError


@pytest.fixture
def installed(monkeypatch):
    """Pretend exactly the given modules are installed."""
    def set_(*names):
        monkeypatch.setattr(fl, "_find_spec", lambda name: object() if name in names else None)
    return set_


def test_auto_prefers_tensorrt_then_rtx(installed):
    installed("tensorrt", "tensorrt_rtx")
    assert fl.select_flavour("auto") is fl.TENSORRT and fl.installed_flavour() is fl.TENSORRT
    installed("tensorrt_rtx")
    assert fl.select_flavour("auto") is fl.RTX and fl.select_flavour("rtx") is fl.RTX
    with pytest.raises(HimapError, match=r"--tensorrt tensorrt: TensorRT is not installed \(no module 'tensorrt'\)"):
        fl.select_flavour("tensorrt")
    installed()
    assert fl.installed_flavour() is None
    with pytest.raises(HimapError, match="neither TensorRT"):
        fl.select_flavour("auto")
    with pytest.raises(HimapError, match="--tensorrt must be one of auto, tensorrt, rtx, got 'trt'"):
        fl.select_flavour("trt")
    with pytest.raises(HimapError, match="unknown TensorRT flavour 'x'"):
        fl.flavour_of("x")


def test_timing_cache_only_with_a_gpu_for_rtx():
    assert fl.RTX.timing_cache_allowed(has_gpu=True) and not fl.RTX.timing_cache_allowed(has_gpu=False)
    assert fl.TENSORRT.timing_cache_allowed(has_gpu=False)      # it needs a GPU to build at all


def test_rtx_header_capabilities_reads_the_bitmask():
    header = bytearray(64)
    header[32] = 0x04 | 0x10
    assert fl.rtx_header_capabilities(bytes(header)) == ("8.6", "12.0")
    assert fl.rtx_header_capabilities(b"short") == ()


def test_no_tensorrt_module_is_imported_by_the_package():
    code = ("import sys, pkgutil, importlib, himap_trt\n"
            "for m in pkgutil.walk_packages(himap_trt.__path__, 'himap_trt.'):\n"
            "    if not m.name.endswith('.__main__'):   # python -m entry points run the program\n"
            "        importlib.import_module(m.name)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('tensorrt', 'tensorrt_rtx', 'polygraphy')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
