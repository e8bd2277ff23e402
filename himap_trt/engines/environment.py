"""The GPU of this machine: whether torch sees one, and the identity (name, compute capability)
engines are tied to. The TensorRT modules themselves (``tensorrt`` / ``tensorrt_rtx``) are imported
in one place only, lazily: :meth:`himap_trt.engines.flavour.Flavour.module`."""

from __future__ import annotations

import torch

from himap_trt.errors import HimapError


def gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability ``major.minor``) of the current CUDA device.

    Raises:
        HimapError: if no CUDA GPU is visible.
    """
    if not torch.cuda.is_available():
        raise HimapError("no CUDA GPU is visible (torch.cuda.is_available() is False); TensorRT engines run on an "
                         "NVIDIA GPU (TensorRT-RTX builds without one: `build --tensorrt rtx`)")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def has_gpu() -> bool:
    """Whether torch sees a CUDA GPU."""
    return torch.cuda.is_available()
