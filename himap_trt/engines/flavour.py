"""Which TensorRT: NVIDIA TensorRT (module ``tensorrt``) or TensorRT-RTX (module ``tensorrt_rtx``).

Both have the same name-based Python API for what this project uses (``Builder``, ``OnnxParser``,
``Runtime``, optimization profiles, ``execute_async_v3``). What differs, and is answered here:

=====================  =====================================  =========================================
                       TensorRT (``tensorrt``)                 TensorRT-RTX (``tensorrt_rtx``)
=====================  =====================================  =========================================
builds for             the GPU it runs on (needs one)          chosen compute capabilities, ahead of time
                                                               on a machine without a GPU (SM75..SM121;
                                                               no SM90/SM100), or ``current`` on a GPU
precision              strongly typed networks (this project   strongly typed only: no FP16/INT8 builder
                       parses every graph strongly typed)      flags; precision comes from the graph
timing cache           yes                                     only with a GPU (it queries one)
engine validity        version + GPU compared by ``run``       ``Runtime.get_engine_validity`` as well
=====================  =====================================  =========================================

Nothing here imports a TensorRT module at import time: :meth:`Flavour.module` does, on first use,
and nothing else in the package imports ``tensorrt``/``tensorrt_rtx`` itself. The engines are built
with the builder API directly (:mod:`himap_trt.engines.build`), not through Polygraphy: Polygraphy
binds one module per process when it is imported (``POLYGRAPHY_USE_TENSORRT_RTX``), and this
project picks the flavour per build (``--tensorrt``) and per engines directory (``run``).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache

from himap_trt.errors import HimapError

#: ``--tensorrt`` choices.
TENSORRT_CHOICES = ("auto", "tensorrt", "rtx")
#: ``--compute-capability`` value meaning "the GPU this runs on".
CURRENT = "current"
#: The engine header (first 64 bytes) of a TensorRT-RTX 1.7 engine: bytes 24..27 hold the version
#: (major, minor, patch, build), byte 32 a bitmask of the compute capabilities it was built for.
RTX_HEADER_CAPABILITY_BITS = {"7.5": 0x01, "8.0": 0x02, "8.6": 0x04, "8.9": 0x08, "12.0": 0x10, "12.1": 0x20}


@dataclass(frozen=True)
class Flavour:
    """One TensorRT flavour.

    Attributes:
        key: ``tensorrt`` or ``rtx`` (the ``--tensorrt`` value, recorded in engines manifests).
        module_name: the Python module (``tensorrt`` / ``tensorrt_rtx``).
        display: the product name for messages.
        install: the pip requirement that installs it.
        ahead_of_time: builds for chosen compute capabilities without a GPU.
        strongly_typed_only: the builder has no precision flags (FP16/BF16/INT8).
    """

    key: str
    module_name: str
    display: str
    install: str
    ahead_of_time: bool
    strongly_typed_only: bool

    def installed(self) -> bool:
        """Whether the module can be imported (without importing it)."""
        return _find_spec(self.module_name) is not None

    def module(self):
        """The imported module.

        Raises:
            HimapError: if it is not installed, naming what to install.
        """
        return _import(self.module_name, self.display, self.install)

    @property
    def version(self) -> str:
        """``module.__version__`` (imports the module)."""
        return str(self.module().__version__)

    def timing_cache_allowed(self, has_gpu: bool) -> bool:
        """Whether a tactic timing cache may be used: TensorRT-RTX's builder queries a GPU for one
        (on a CPU-only build it logs a CUDA error and writes an empty cache)."""
        return has_gpu or not self.ahead_of_time

    def capabilities(self) -> tuple[str, ...]:
        """Compute capabilities (``major.minor``) this flavour can target ahead of time, in enum
        order; empty for TensorRT, which builds for the GPU it runs on."""
        if not self.ahead_of_time:
            return ()
        enum = self.module().ComputeCapability
        return tuple(_sm_to_capability(name) for name in enum.__members__ if name.startswith("SM"))

    def capability_member(self, capability: str):
        """The ``ComputeCapability`` enum member for ``major.minor`` or :data:`CURRENT`."""
        enum = self.module().ComputeCapability
        name = "CURRENT" if capability == CURRENT else "SM" + capability.replace(".", "")
        return getattr(enum, name)

    def engine_validity(self, runtime, engine_bytes: bytes) -> str | None:
        """Why this machine cannot run the engine, or None if it can (TensorRT-RTX's
        ``IRuntime.get_engine_validity``: version, compute capability, driver, memory); TensorRT
        has no such call (``run`` compares version and capability from the manifest instead).

        ``SUBOPTIMAL`` (e.g. an engine built for an older architecture of a compatible family) is
        accepted."""
        getter = getattr(runtime, "get_engine_validity", None)
        if getter is None:
            return None
        trt = self.module()
        result = getter(engine_bytes)
        validity, diagnostics = result if isinstance(result, tuple) else (result, 0)
        if validity != trt.EngineValidity.INVALID:
            return None
        names = [name for name, member in getattr(trt, "EngineInvalidityDiagnostics", {}).__members__.items()
                 if int(diagnostics) & int(member)] if hasattr(trt, "EngineInvalidityDiagnostics") else []
        return ", ".join(names) or f"diagnostics 0x{int(diagnostics):x}"


TENSORRT = Flavour("tensorrt", "tensorrt", "TensorRT", "pip install 'himap-trt[tensorrt]' (TensorRT 10.x/11.x, "
                   "wheels from pypi.nvidia.com)", ahead_of_time=False, strongly_typed_only=False)
RTX = Flavour("rtx", "tensorrt_rtx", "TensorRT-RTX", "pip install 'himap-trt[tensorrt-rtx]' "
              "(tensorrt-rtx-cu13==1.7.1.116; `make install` does)", ahead_of_time=True, strongly_typed_only=True)
FLAVOURS = {TENSORRT.key: TENSORRT, RTX.key: RTX}


_find_spec = importlib.util.find_spec     # one seam, for tests that hide a flavour


@lru_cache(maxsize=None)
def _import(module_name: str, display: str, install: str):
    if _find_spec(module_name) is None:
        raise HimapError(f"{display} is not installed (no module {module_name!r}); {install}")
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise HimapError(f"{display} is not installed (no module {module_name!r}: {exc}); {install}") from None


def _sm_to_capability(name: str) -> str:
    digits = name[2:]
    return f"{digits[:-1]}.{digits[-1]}"


def select_flavour(choice: str = "auto") -> Flavour:
    """The flavour for ``--tensorrt`` ``choice``: ``auto`` is TensorRT if importable, else TensorRT-RTX.

    Raises:
        HimapError: unknown choice, or the chosen flavour (with ``auto``: neither) is not installed.
    """
    if choice not in TENSORRT_CHOICES:
        raise HimapError(f"--tensorrt must be one of {', '.join(TENSORRT_CHOICES)}, got {choice!r}")
    if choice == "auto":
        for flavour in (TENSORRT, RTX):
            if flavour.installed():
                return flavour
        raise HimapError(f"--tensorrt auto: neither TensorRT (module 'tensorrt') nor TensorRT-RTX (module "
                         f"'tensorrt_rtx') is installed; {RTX.install}, or {TENSORRT.install}")
    flavour = FLAVOURS[choice]
    if not flavour.installed():
        raise HimapError(f"--tensorrt {choice}: {flavour.display} is not installed (no module "
                         f"{flavour.module_name!r}); {flavour.install}")
    return flavour


def installed_flavour() -> Flavour | None:
    """TensorRT if installed, else TensorRT-RTX if installed, else None (``auto``'s order)."""
    return next((f for f in (TENSORRT, RTX) if f.installed()), None)


def flavour_of(key: str) -> Flavour:
    """The flavour recorded in an engines manifest (``tensorrt`` / ``rtx``).

    Raises:
        HimapError: for another value.
    """
    if key not in FLAVOURS:
        raise HimapError(f"unknown TensorRT flavour {key!r} (expected {' or '.join(FLAVOURS)})")
    return FLAVOURS[key]


def has_fp32_gemms(dtype: str, plan) -> bool:
    """Whether an export's graphs hold float32 matrix products, which TensorRT-RTX 1.7 cannot compile
    for Turing (SM75, "FP32 GEMM is not supported"): every fp32 export, and every export with a
    pruning stage (its scoring graph recomputes attention scores in float32, whatever the dtype).

    Args:
        dtype: the export's dtype (``float32``, ``fp32``, ``float16`` ...); plan: its ``PruningPlan``.
    """
    return dtype in ("float32", "fp32") or bool(plan.stages)


def parse_capabilities(text: str | None, flavour: Flavour, *, fp32_gemms: bool = True) -> tuple[str, ...]:
    """The ``--compute-capability`` value as a tuple of ``major.minor`` strings, or ``("current",)``.

    Args:
        text: comma-separated ``major.minor`` values (``8.6,8.9,12.0``), ``current``, or None for the
            default: every capability TensorRT-RTX targets ahead of time (without 7.5 where the graphs
            hold fp32 GEMMs, :func:`has_fp32_gemms`), ``current`` for TensorRT.
        flavour: the build's flavour.
        fp32_gemms: the export's graphs hold fp32 matrix products (:func:`has_fp32_gemms`), for the default.

    Raises:
        HimapError: a value that is not a capability the flavour can target, a list for TensorRT
            (it builds for the GPU it runs on), or duplicates.
    """
    if text is None:
        if not flavour.ahead_of_time:
            return (CURRENT,)
        every = flavour.capabilities()
        return tuple(c for c in every if not (fp32_gemms and c == "7.5")) or every
    values = [v.strip() for v in text.split(",")]
    if values == [CURRENT]:
        return (CURRENT,)
    if not flavour.ahead_of_time:
        raise HimapError(f"--compute-capability {text!r}: {flavour.display} builds for the GPU it runs on; "
                         "pass current, or --tensorrt rtx for ahead-of-time builds")
    known = flavour.capabilities()
    for value in values:
        if value not in known:
            raise HimapError(f"--compute-capability {text!r}: {value!r} is not a compute capability "
                             f"{flavour.display} {flavour.version} targets (expected a comma-separated list of "
                             f"{', '.join(known)}, or current)")
    if len(set(values)) != len(values):
        raise HimapError(f"--compute-capability {text!r} names a capability twice")
    return tuple(values)


def rtx_header_capabilities(engine_bytes: bytes) -> tuple[str, ...]:
    """The compute capabilities a TensorRT-RTX 1.7 engine's header says it was built for (byte 32's
    bitmask; :data:`RTX_HEADER_CAPABILITY_BITS`). An independent reading of what the builder did,
    used by the tests; not a format NVIDIA documents."""
    if len(engine_bytes) < 33:
        return ()
    mask = engine_bytes[32]
    return tuple(c for c, bit in RTX_HEADER_CAPABILITY_BITS.items() if mask & bit)
