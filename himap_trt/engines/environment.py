"""TensorRT and the GPU of this machine: the one place that imports ``tensorrt`` (lazily, so that
everything else imports without it) and reads the GPU's identity engines are tied to."""

from __future__ import annotations

import torch

from himap_trt.errors import HimapError

INSTALL_HINT = ("install TensorRT 10.x or 11.x for Python (`pip install 'himap-trt[tensorrt]'`, wheels from "
                "pypi.nvidia.com) on a machine with an NVIDIA GPU and driver")


def import_tensorrt():
    """The ``tensorrt`` module.

    Raises:
        HimapError: if it is not installed, saying what to install.
    """
    try:
        import tensorrt
    except ImportError:
        raise HimapError(f"TensorRT is not installed: {INSTALL_HINT}") from None
    return tensorrt


def gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability ``major.minor``) of the current CUDA device.

    Raises:
        HimapError: if no CUDA GPU is visible.
    """
    if not torch.cuda.is_available():
        raise HimapError(f"no CUDA GPU is visible (torch.cuda.is_available() is False); TensorRT engines are built "
                         f"and run on an NVIDIA GPU: {INSTALL_HINT}")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"
