"""The TensorRT backend: one deserialised engine per graph, one execution context per profile.

Inputs and outputs are CUDA ``torch.Tensor`` objects bound by address (``set_tensor_address``), so
KV caches stay on the GPU between steps. Every TensorRT call's return value is checked, and the
calls that raise (``set_optimization_profile_async``, ``infer_shapes``) become :class:`HimapError`
naming the graph.

- **One dedicated CUDA stream** for the whole pipeline (``execute_async_v3`` on the legacy default
  stream costs an extra device synchronisation per call, per TensorRT's documentation); it is
  ordered with torch's current stream by events (``wait_stream``), never by host synchronisation.
- **One scratch buffer** for every context of every engine: contexts are created with
  ``ExecutionContextAllocationStrategy.USER_MANAGED`` and share one device buffer sized by the
  largest ``get_device_memory_size_for_profile_v2`` (graphs run one at a time on one stream).
- **KV caches in place**: a ``present`` output given as its ``past`` buffer is bound to that
  address when the engine aliases the pair (``ICudaEngine.get_aliased_input_tensor``: TensorRT
  10.15+/11's ``IKVCacheUpdateLayer``, built from ``--kv-write tensorscatter`` exports); engines
  built from ScatterND graphs do not alias, so their output goes to its own buffer and is copied
  into the cache (one device copy per step, correct but not in place).
- Tensor addresses must be 256-byte aligned: a misaligned view is staged through an aligned copy.
- **TensorRT-RTX runs as its documentation says** (skipped on TensorRT proper, whose contexts are
  created with the allocation strategy alone): every execution context comes from an
  ``IRuntimeConfig`` (``ICudaEngine.create_runtime_config``) carrying the USER_MANAGED strategy, a
  dynamic-shapes kernel specialisation strategy (:data:`KERNEL_SPECIALIZATIONS`: ``lazy``, TensorRT-RTX's
  default and :data:`DEFAULT_KERNEL_SPECIALIZATION`, runs a fallback kernel until the shape-specialised
  one is compiled in the background; ``eager`` compiles it before the first run of a new shape, so
  every run after a warm-up uses it: ``bench`` and ``scripts/gpu_check.sh`` use it; ``none`` always
  runs the fallback) and one :class:`RuntimeCache` shared by every engine of the engines directory
  (``<engines>/runtime.rtxcache``, TensorRT-Edge-LLM's layout): loaded at start, saved atomically when
  the pipeline closes or the process exits, so a second process does not pay the JIT compilation again.
  A cache made on another GPU or by another TensorRT-RTX / CUDA version is ignored with one warning line.
- At load, every spec tensor's I/O mode and dtype are compared with the engine's.

Written against the TensorRT 10.x / 11.x name-based Python API, which TensorRT-RTX 1.7 shares for
every call used here (the module is the engines' flavour, :mod:`himap_trt.engines.flavour`; for
TensorRT-RTX ``Runtime.get_engine_validity`` is asked first, so an engine built for other GPUs fails
in one line rather than inside ``deserialize_cuda_engine``). It has not run on a GPU yet: see README,
"What was verified where"; ``scripts/gpu_check.sh`` runs it where a GPU is lent.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch

from himap_trt.engines.flavour import RTX, flavour_of
from himap_trt.engines.profiles import Profile
from himap_trt.errors import HimapError
from himap_trt.graphs.spec import GraphSpec
from himap_trt.runtime.backend import BackendBase, ChunkedBackend
from himap_trt.runtime.kv_cache import torch_dtype

#: TensorRT requires I/O tensor addresses aligned to this many bytes.
ALIGNMENT = 256
#: ``--kernel-specialization`` values, TensorRT-RTX's ``DynamicShapesKernelSpecializationStrategy`` members.
KERNEL_SPECIALIZATIONS = ("lazy", "eager", "none")
#: ``run`` / ``serve``: TensorRT-RTX's own default (no stall while a new shape's kernel compiles);
#: ``bench`` and the GPU check pass ``eager`` so that timed runs use the specialised kernels.
DEFAULT_KERNEL_SPECIALIZATION = "lazy"
#: The runtime cache's file name inside an engines directory.
RUNTIME_CACHE_FILE = "runtime.rtxcache"
#: A runtime cache file larger than this is not read (the engines directory is untrusted).
RUNTIME_CACHE_MAX_BYTES = 1 << 30

log = logging.getLogger(__name__)


def check_kernel_specialization(value: str) -> str:
    """``value`` if it is one of :data:`KERNEL_SPECIALIZATIONS`.

    Raises:
        HimapError: otherwise, naming the flag.
    """
    if value not in KERNEL_SPECIALIZATIONS:
        raise HimapError(f"--kernel-specialization must be one of {', '.join(KERNEL_SPECIALIZATIONS)}, got {value!r}")
    return value


class RuntimeCache:
    """One TensorRT-RTX runtime cache (JIT-compiled kernels) shared by every engine of an engines
    directory, backed by a file.

    The cache object is created from the first engine's ``IRuntimeConfig`` (``create_runtime_cache``)
    and set on every config after it (``set_runtime_cache``). The file is read once, at that first
    attach: ``IRuntimeCache.deserialize`` checks the blob against this process's environment (GPU,
    TensorRT-RTX, CUDA driver, ...) and refuses a foreign one, which is then ignored with one warning
    line (and overwritten at :meth:`save`). :meth:`save` writes ``serialize()``'s bytes to a temporary
    file beside it and renames it over the file (atomic: a reader sees the old or the new cache).

    Args:
        path: the cache file (``<engines>/runtime.rtxcache``), or None to keep the cache in memory.

    Attributes:
        loaded: whether a cache file was read and accepted.
        saved_bytes: bytes written by the last :meth:`save` (0 before).
    """

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self.cache = None
        self.configs: list = []
        self.loaded = False
        self.saved_bytes = 0

    def attach(self, config) -> None:
        """Set the shared cache on ``config`` (an ``IRuntimeConfig``), creating it (and reading the
        file) on the first call.

        Raises:
            HimapError: if TensorRT-RTX cannot create the cache or refuses to set it.
        """
        if self.cache is None:
            cache = config.create_runtime_cache()
            if cache is None:
                raise HimapError("TensorRT-RTX could not create a runtime cache (IRuntimeConfig.create_runtime_cache)")
            self.cache = cache
            self._load()
        if config.set_runtime_cache(self.cache) is False:
            raise HimapError("TensorRT-RTX refused the runtime cache (IRuntimeConfig.set_runtime_cache)")
        self.configs.append(config)     # kept alive as long as the cache and the contexts made from them

    def _load(self) -> None:
        path = self.path
        if path is None or not path.is_file():
            return
        try:
            if path.stat().st_size > RUNTIME_CACHE_MAX_BYTES:
                log.warning("runtime cache %s is over %d bytes; ignored", path, RUNTIME_CACHE_MAX_BYTES)
                return
            blob = path.read_bytes()
        except OSError as exc:
            log.warning("runtime cache %s cannot be read (%s); ignored", path, exc.strerror or exc)
            return
        if self.cache.deserialize(blob):
            self.loaded = True
        else:
            log.warning("runtime cache %s was made on another GPU or by another TensorRT-RTX/CUDA version "
                        "(or is damaged); ignored, and rewritten on exit", path)

    def save(self) -> int:
        """Write the cache to its file atomically; the bytes written (0 if there is nothing to write
        or the directory is not writable, which logs one warning line)."""
        if self.cache is None or self.path is None:
            return 0
        data = bytes(memoryview(self.cache.serialize()))
        if not data:
            return 0
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_bytes(data)
            os.replace(temporary, self.path)
        except OSError as exc:
            log.warning("runtime cache %s cannot be written (%s); the next process compiles its kernels again",
                        self.path, exc.strerror or exc)
            temporary.unlink(missing_ok=True)
            return 0
        self.saved_bytes = len(data)
        return len(data)


def execution_context(engine, trt, *, rtx: bool, kernel_specialization: str, cache: RuntimeCache | None):
    """A USER_MANAGED execution context of ``engine``: for TensorRT-RTX (``rtx``) made from an
    ``IRuntimeConfig`` with the kernel specialisation strategy and the shared runtime cache; for
    TensorRT proper with the allocation strategy alone.

    Returns:
        The ``IExecutionContext``, or None where TensorRT could not create one (out of GPU memory).

    Raises:
        HimapError: a bad ``kernel_specialization`` or a config TensorRT-RTX refuses.
    """
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    if not rtx:
        return engine.create_execution_context(strategy)
    config = engine.create_runtime_config()
    if config is None:
        raise HimapError("TensorRT-RTX could not create a runtime config (ICudaEngine.create_runtime_config)")
    config.set_execution_context_allocation_strategy(strategy)
    member = check_kernel_specialization(kernel_specialization).upper()
    config.dynamic_shapes_kernel_specialization_strategy = getattr(trt.DynamicShapesKernelSpecializationStrategy, member)
    if cache is not None:
        cache.attach(config)
    return engine.create_execution_context(config)


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def _trt_dtypes(trt) -> dict[str, object]:
    return {"float32": trt.float32, "float16": trt.float16, "bfloat16": trt.bfloat16, "int64": trt.int64}


class SharedResources:
    """What every engine of one pipeline shares: the runtime, one CUDA stream, one scratch buffer,
    and for TensorRT-RTX the kernel specialisation strategy and one :class:`RuntimeCache`.

    Args:
        trt: the ``tensorrt`` or ``tensorrt_rtx`` module.
        flavour: its :class:`~himap_trt.engines.flavour.Flavour` (engine validity checks; TensorRT-RTX
            gets runtime configs).
        kernel_specialization: one of :data:`KERNEL_SPECIALIZATIONS` (TensorRT-RTX only).
        runtime_cache: the cache file (``<engines>/runtime.rtxcache``), or None for none kept on disk
            (TensorRT-RTX only); saved by :meth:`close` and, failing that, at interpreter exit.
    """

    def __init__(self, trt, flavour=None, *, kernel_specialization: str = DEFAULT_KERNEL_SPECIALIZATION,
                 runtime_cache: Path | None = None):
        self.trt = trt
        self.flavour = flavour
        self.rtx = flavour is not None and flavour.key == RTX.key
        self.kernel_specialization = check_kernel_specialization(kernel_specialization)
        self.cache = RuntimeCache(runtime_cache) if self.rtx else None
        self.logger = _logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.stream = torch.cuda.Stream()
        self.scratch = torch.empty(0, dtype=torch.uint8, device="cuda")
        self._users = 0
        if self.cache is not None and runtime_cache is not None:
            atexit.register(_save_at_exit, weakref.ref(self))   # a weak reference: closed pipelines are freed

    def context(self, engine):
        """A new execution context of ``engine`` (:func:`execution_context` with these settings)."""
        return execution_context(engine, self.trt, rtx=self.rtx, kernel_specialization=self.kernel_specialization,
                                 cache=self.cache)

    def acquire(self) -> None:
        """Count one more engine using these resources (released by :meth:`release`)."""
        self._users += 1

    def release(self) -> None:
        """One engine fewer; the last one saves the runtime cache."""
        self._users -= 1
        if self._users <= 0:
            self.save_runtime_cache()

    def save_runtime_cache(self) -> int:
        """Save the runtime cache now (see :meth:`RuntimeCache.save`); bytes written."""
        return self.cache.save() if self.cache is not None else 0

    def scratch_for(self, size: int) -> torch.Tensor:
        """The shared scratch buffer, grown to at least ``size`` bytes (contexts are re-pointed by
        :class:`TensorRTBackend` whenever it grows)."""
        if self.scratch.numel() < size:
            torch.cuda.current_stream().synchronize()
            self.scratch = torch.empty(size, dtype=torch.uint8, device="cuda")
        return self.scratch


def _save_at_exit(reference) -> None:
    """At interpreter exit: save the runtime cache of resources still alive and never closed."""
    shared = reference()
    if shared is not None and shared._users > 0:
        shared.save_runtime_cache()


class TensorRTBackend(BackendBase):
    """Runs one engine.

    Args:
        spec: the graph's declaration.
        path: its ``.engine`` file.
        profiles: the engine's optimization profiles, in build order (from the engines manifest).
        shared: the pipeline's :class:`SharedResources`.

    Raises:
        HimapError: if the engine cannot be deserialised, lacks a tensor of the spec or declares it
            with another mode or dtype, or a context cannot be created / bound to its profile.
    """

    label = "tensorrt"

    def __init__(self, spec: GraphSpec, path: Path, profiles: tuple[Profile, ...], shared: SharedResources):
        trt = shared.trt
        self.spec = spec
        self.profiles = profiles
        self.shared = shared
        blob = Path(path).read_bytes()
        flavour = shared.flavour
        invalid = flavour.engine_validity(shared.runtime, blob) if flavour is not None else None
        if invalid:
            raise HimapError(f"{flavour.display} says engine {str(path)!r} cannot run on this GPU ({invalid}); "
                             "rebuild with `himap-trt build --compute-capability current` on it")
        self.engine = shared.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise HimapError(f"{trt.__name__} could not deserialise {str(path)!r} (built for another TensorRT or GPU?)")
        self._check_io(trt, path)
        if self.engine.num_optimization_profiles != len(profiles):
            raise HimapError(f"engine {str(path)!r} has {self.engine.num_optimization_profiles} profiles, "
                             f"the manifest lists {len(profiles)}")
        self.aliases = self._aliases()
        stream = shared.stream.cuda_stream
        self.contexts = []
        needed = 0
        shared.acquire()
        for index in range(len(profiles)):
            context = shared.context(self.engine)
            if context is None:
                raise HimapError(f"TensorRT could not create an execution context for {spec.name!r} (out of GPU memory?)")
            try:
                ok = context.set_optimization_profile_async(index, stream)
            except RuntimeError as exc:   # the Python binding raises where the C++ API returns false
                raise HimapError(f"TensorRT refused optimization profile {index} of {spec.name!r}: {exc}") from None
            if ok is False:
                raise HimapError(f"TensorRT refused optimization profile {index} of {spec.name!r}")
            needed = max(needed, int(self.engine.get_device_memory_size_for_profile_v2(index)))
            self.contexts.append(context)
        self._scratch_size = needed
        self._bound_scratch = None
        shared.stream.synchronize()
        self._placeholder = torch.empty(ALIGNMENT, dtype=torch.uint8, device="cuda")  # address for zero-size tensors

    def _check_io(self, trt, path: Path) -> None:
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        dtypes = _trt_dtypes(trt)
        problems = []
        for tensor, mode in [*((t, trt.TensorIOMode.INPUT) for t in self.spec.inputs),
                             *((t, trt.TensorIOMode.OUTPUT) for t in self.spec.outputs)]:
            if tensor.name not in names:
                problems.append(f"{tensor.name} missing")
                continue
            if self.engine.get_tensor_mode(tensor.name) != mode:
                problems.append(f"{tensor.name} is not an {mode.name.lower()}")
            if self.engine.get_tensor_dtype(tensor.name) != dtypes[tensor.dtype]:
                problems.append(f"{tensor.name} is {self.engine.get_tensor_dtype(tensor.name)}, the spec says {tensor.dtype}")
        if problems:
            raise HimapError(f"engine {str(path)!r} does not match graph {self.spec.name!r}: {'; '.join(problems)}")

    def _aliases(self) -> dict[str, str]:
        """output name -> the input it shares memory with (TensorRT 10.15+; empty before)."""
        getter = getattr(self.engine, "get_aliased_input_tensor", None)
        if getter is None:
            return {}
        aliases = {}
        for tensor in self.spec.outputs:
            name = getter(tensor.name)
            if name:
                aliases[tensor.name] = name
        return aliases

    def _select(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for index, profile in enumerate(self.profiles):
            if profile.covers(shapes):
                return index
        raise HimapError(f"graph {self.spec.name!r}: no optimization profile covers input shapes {shapes}; "
                         "rebuild the engines with a larger --max-batch / --max-seq-len")

    def _bind_scratch(self) -> None:
        scratch = self.shared.scratch_for(self._scratch_size)
        if self._bound_scratch is not None and self._bound_scratch == (scratch.data_ptr(), scratch.numel()):
            return
        for context in self.contexts:
            context.set_device_memory(scratch.data_ptr(), scratch.numel())
        self._bound_scratch = (scratch.data_ptr(), scratch.numel())

    def _address(self, value: torch.Tensor) -> int:
        return value.data_ptr() if value.numel() else self._placeholder.data_ptr()

    def run(self, feeds: Mapping[str, torch.Tensor],
            outputs: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        outputs = outputs or {}
        shapes = {t.name: tuple(feeds[t.name].shape) for t in self.spec.inputs}
        context = self.contexts[self._select(shapes)]
        self._bind_scratch()
        bound: dict[str, torch.Tensor] = {}
        for tensor in self.spec.inputs:
            value = feeds[tensor.name]
            if value.device.type != "cuda" or value.dtype != torch_dtype(tensor.dtype):
                raise HimapError(f"graph {self.spec.name!r}: input {tensor.name} must be a CUDA {tensor.dtype} tensor, "
                                 f"got {value.device} {value.dtype}")
            if not value.is_contiguous() or value.data_ptr() % ALIGNMENT:
                value = value.contiguous() if value.data_ptr() % ALIGNMENT == 0 and not value.is_contiguous() \
                    else value.clone(memory_format=torch.contiguous_format)
            bound[tensor.name] = value
            if not context.set_input_shape(tensor.name, tuple(value.shape)):
                raise HimapError(f"graph {self.spec.name!r}: TensorRT rejected shape {tuple(value.shape)} for {tensor.name}")
            if not context.set_tensor_address(tensor.name, self._address(value)):
                raise HimapError(f"graph {self.spec.name!r}: TensorRT rejected the address of {tensor.name}")
        try:
            unresolved = context.infer_shapes()
        except RuntimeError as exc:
            raise HimapError(f"graph {self.spec.name!r}: TensorRT cannot infer the output shapes: {exc}") from None
        if unresolved:
            raise HimapError(f"graph {self.spec.name!r}: TensorRT cannot infer the shapes of {list(unresolved)}")
        results: dict[str, torch.Tensor] = {}
        copy_back: list[tuple[torch.Tensor, torch.Tensor]] = []
        for tensor in self.spec.outputs:
            shape = tuple(context.get_tensor_shape(tensor.name))
            if any(d < 0 for d in shape):
                raise HimapError(f"graph {self.spec.name!r}: output {tensor.name} has unresolved shape {shape}")
            alias = self.aliases.get(tensor.name)
            target = outputs.get(tensor.name)
            if alias is not None:
                value = bound[alias]                 # TensorRT writes the aliased input in place
            elif target is not None and target.is_contiguous() and target.data_ptr() % ALIGNMENT == 0 \
                    and all(target.data_ptr() != v.data_ptr() for v in bound.values()):
                value = target
            else:
                value = torch.empty(shape, dtype=torch_dtype(tensor.dtype), device="cuda")
            if target is not None and value.data_ptr() != target.data_ptr():
                copy_back.append((value, target))
            results[tensor.name] = value
            if not context.set_tensor_address(tensor.name, self._address(value)):
                raise HimapError(f"graph {self.spec.name!r}: TensorRT rejected the address of {tensor.name}")
        stream = self.shared.stream
        stream.wait_stream(torch.cuda.current_stream())
        if not context.execute_async_v3(stream.cuda_stream):
            raise HimapError(f"graph {self.spec.name!r}: TensorRT execution failed (execute_async_v3 returned False)")
        torch.cuda.current_stream().wait_stream(stream)
        for value, target in copy_back:
            target.copy_(value)
        for name, value in feeds.items():            # a staged (aligned) copy of an aliased input goes back
            if bound[name] is not value and name in self.aliases.values():
                value.copy_(bound[name])
        return {name: outputs.get(name, value) for name, value in results.items()}

    def close(self) -> None:
        if self.engine is not None:
            self.contexts = []
            self.engine = None
            self.shared.release()


def tensorrt_backends(engines_dir: Path, engines, export, *,
                      kernel_specialization: str = DEFAULT_KERNEL_SPECIALIZATION,
                      keep_runtime_cache: bool = True) -> dict[str, TensorRTBackend]:
    """One :class:`TensorRTBackend` per graph of the export, keyed by graph name, sharing one
    runtime, stream and scratch buffer (:class:`SharedResources`), with the TensorRT flavour the
    engines were built with (``tensorrt`` or ``tensorrt_rtx``: the same runtime API); for
    TensorRT-RTX also the kernel specialisation strategy and the runtime cache
    ``<engines_dir>/runtime.rtxcache`` (:data:`RUNTIME_CACHE_FILE`).

    Args:
        engines_dir: the engines directory.
        engines: its checked :class:`~himap_trt.engines.manifest.EnginesManifest`.
        export: the export's :class:`~himap_trt.manifest.Manifest` (graph declarations).
        kernel_specialization: one of :data:`KERNEL_SPECIALIZATIONS` (ignored by TensorRT proper).
        keep_runtime_cache: read and write ``runtime.rtxcache``; False keeps the cache in memory only
            (``--require-signature``: the cache holds compiled kernels and is not covered by the
            engines' signature, so a signed deployment does not load one).

    Raises:
        HimapError: see :class:`TensorRTBackend`; for TensorRT-RTX also an engine that
            ``get_engine_validity`` declares invalid on this GPU (naming the diagnostics).
    """
    flavour = flavour_of(engines.tensorrt_flavour)
    shared = SharedResources(flavour.module(), flavour, kernel_specialization=kernel_specialization,
                             runtime_cache=Path(engines_dir) / RUNTIME_CACHE_FILE if keep_runtime_cache else None)
    backends = {}
    for spec in export.graphs:
        entry = engines.entry(spec.name)
        backends[spec.name] = _engine_backend(spec, entry, Path(engines_dir), shared)
    return backends


def _engine_backend(spec: GraphSpec, entry, engines_dir: Path, shared: SharedResources):
    """The backend of one engines-manifest entry: one :class:`TensorRTBackend`, or for a segment
    built in layer chunks (issue 34, :mod:`himap_trt.engines.chunks`) a
    :class:`~himap_trt.runtime.backend.ChunkedBackend` over one TensorRTBackend per chunk engine."""
    if not entry.parts:
        return TensorRTBackend(spec, engines_dir / entry.file, entry.profiles, shared)
    return ChunkedBackend(spec, [TensorRTBackend(part.spec, engines_dir / part.file, part.profiles, shared)
                                 for part in entry.parts])
