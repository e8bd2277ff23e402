"""himap-trt: LLaVA-style multimodal LLMs with in-decoder image-token pruning, as a chain of
ONNX graphs / TensorRT engines driven by a KV-cache runtime.

See ``docs/ARCHITECTURE.md`` for the graph I/O contract and the pruning semantics this package
implements, and ``README.md`` for the terms (TTFT, TPOT, K1/R1, keep count, Eq. 10).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("himap-trt")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
