"""How much host memory ``himap-trt run`` needs for an export on ONNX Runtime's CPU provider, checked
before anything is loaded.

ONNX Runtime's CPU provider has no fp16/bf16 kernels for most of a decoder's ops: when it opens an
fp16 graph it inserts casts and constant-folds the weights to float32, so an open fp16 session holds
about 2x its weight bytes (the fp32 copies plus what the fp16 originals leave behind) and about 3.1x
while it opens (measured on 7B-dims segments: docs/PERFORMANCE.md, "Memory of ONNX Runtime
sessions"). fp32 graphs are held once. ``run`` opens every graph of the chain, one after the
other, so::

    estimate = factor x (weights of every graph) + (opening - factor) x (weights of the largest graph)
               + KV caches (batch x max_seq_len, every layer) + base

The estimate is printed before loading; above the memory the kernel reports available
(``MemAvailable``) ``run`` refuses in one line unless ``--force``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from himap_trt.errors import HimapError
from himap_trt.runtime.kv_cache import torch_dtype

GiB = 1024**3
#: Resident bytes per weight byte of an open ONNX Runtime CPU session, and while it opens, by graph dtype.
OPEN_FACTOR = {"float32": 1.05, "float16": 2.0, "bfloat16": 2.0}
OPENING_FACTOR = {"float32": 1.1, "float16": 3.1, "bfloat16": 3.1}
#: Python, torch, transformers, ONNX Runtime and the processor (bytes).
BASE_BYTES = int(0.7 * GiB)


@dataclass(frozen=True)
class MemoryEstimate:
    """Host memory ``run`` needs for an export on ONNX Runtime (CPU), in bytes."""

    weights: int          # weight bytes on disk (every graph file and its external data)
    sessions: int         # resident once every session is open
    opening_extra: int    # the largest graph's extra while it opens
    kv_cache: int         # KV caches of ``batch`` sequences of max_seq_len tokens
    base: int

    @property
    def total(self) -> int:
        return self.sessions + self.opening_extra + self.kv_cache + self.base

    def describe(self) -> str:
        return (f"about {self.total / GiB:.1f} GiB (ONNX Runtime CPU sessions {self.sessions / GiB:.1f} GiB for "
                f"{self.weights / GiB:.1f} GiB of weights, +{self.opening_extra / GiB:.1f} GiB while the largest "
                f"opens, KV caches {self.kv_cache / GiB:.2f} GiB, base {self.base / GiB:.1f} GiB)")


def estimate_run_memory(export_dir: str | Path, manifest, batch: int = 1) -> MemoryEstimate:
    """Estimate ``run``'s peak host memory for ``manifest``'s export on ONNX Runtime's CPU provider.

    Args:
        export_dir: the export directory (graph and external-data file sizes are read from it).
        manifest: its :class:`~himap_trt.manifest.Manifest`.
        batch: requests run together (KV caches are sized to ``max_seq_len`` tokens each: an upper bound).
    """
    import torch

    export_dir = Path(export_dir)
    per_graph = []
    for spec in manifest.graphs:
        size = 0
        for name, record in manifest.files.items():
            if name == spec.file or name.startswith(f"{spec.file}.data") or name == f"{spec.file}_data":
                size += int(record.get("bytes", 0))
        per_graph.append(size)
    weights = sum(per_graph)
    open_factor = OPEN_FACTOR.get(manifest.dtype, 2.0)
    opening = OPENING_FACTOR.get(manifest.dtype, 3.1)
    dims = manifest.dims
    itemsize = torch.empty((), dtype=torch_dtype(manifest.dtype)).element_size()
    kv = 2 * dims.num_layers * batch * dims.num_kv_heads * manifest.max_seq_len * dims.head_dim * itemsize
    return MemoryEstimate(weights=weights, sessions=int(open_factor * weights),
                          opening_extra=int((opening - open_factor) * max(per_graph, default=0)),
                          kv_cache=kv, base=BASE_BYTES)


def available_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` (bytes), or None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_run_memory(export_dir: str | Path, manifest, *, batch: int = 1, force: bool = False,
                     available: int | None = None) -> MemoryEstimate:
    """Estimate (:func:`estimate_run_memory`) and refuse an export that does not fit.

    Raises:
        HimapError: one line naming the export directory, the estimate and the available memory, when
            the estimate exceeds ``available`` (default: :func:`available_bytes`) and not ``force``.
    """
    estimate = estimate_run_memory(export_dir, manifest, batch=batch)
    available = available_bytes() if available is None else available
    if available is not None and estimate.total > available and not force:
        raise HimapError(f"running the export in {str(export_dir)!r} on ONNX Runtime (CPU) needs "
                         f"{estimate.describe()}, but only {available / GiB:.1f} GiB is available; "
                         "free memory, use a GPU (--backend tensorrt or onnxruntime-gpu), or pass --force to try anyway")
    return estimate
