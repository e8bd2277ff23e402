"""``himap-trt build``: one engine per exported graph, with TensorRT or TensorRT-RTX.

Each network is parsed *strongly typed* from the exported ONNX graph (precision comes from the
graph, exported in fp32/fp16/bf16; TensorRT-RTX has no other mode), gets the optimization profiles
of :mod:`himap_trt.engines.profiles`, and is built by the builder API of the chosen flavour
(:mod:`himap_trt.engines.flavour`): the same calls for both modules. TensorRT builds for the GPU
it runs on, with a tactic timing cache reused across builds; TensorRT-RTX builds ahead of time for
chosen compute capabilities, also on a machine without a GPU (no timing cache there: it queries a
GPU). Engines are written into a temporary directory swapped into place when all are built
(:func:`himap_trt.fsutil.atomic_directory`): a failure leaves nothing half-written.

TensorRT is imported lazily (through :mod:`himap_trt.engines.flavour`): everything else in the
package works without it.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from himap_trt import __version__
from himap_trt.confine import load_onnx_proto, record_files
# gpu_identity and has_gpu live in engines/environment.py (engines/manifest.py needs them too); imported
# here for build_engines and for callers that import them from this module.
from himap_trt.engines.environment import gpu_identity, has_gpu  # noqa: F401
from himap_trt.engines.compat import missing_operators
from himap_trt.engines.flavour import CURRENT, TENSORRT, Flavour, has_fp32_gemms, parse_capabilities, select_flavour
from himap_trt.engines.chunks import layers_per_chunk, segment_chunks
from himap_trt.engines.manifest import (
    ENGINES_FORMAT_VERSION,
    ENGINES_MANIFEST,
    EngineEntry,
    EnginePart,
    EnginesManifest,
    export_fingerprint,
    is_engines_manifest,
)
# the ONNX parser (engines/parser.py, no torch: engines/compat.py uses it too); parse_file and
# parser_errors re-exported for callers that import them from this module.
from himap_trt.engines.parser import parse_file, parse_network, parser_errors  # noqa: F401
from himap_trt.engines.profiles import Profile, engine_profiles, resolve_profile_form
from himap_trt.errors import HimapError
from himap_trt.fsutil import atomic_directory, cache_root, write_point
from himap_trt.manifest import NOT_TENSORRT, NOT_TENSORRT_QUANTIZE, TENSORRT_ATTENTION_DTYPES, TENSORRT_KV_WRITES
from himap_trt.signing import check_private_key, sign_directory


def default_timing_cache(tensorrt_version: str | None = None, capability: str | None = None,
                         flavour: str = "tensorrt") -> Path:
    """``$HIMAP_TRT_CACHE/timing-trt<version>-sm<major><minor>.cache`` (``timing-rtx...`` for
    TensorRT-RTX; under ``~/.cache/himap-trt`` by default): outside the engines directory, so
    rebuilds reuse it, and keyed by flavour, version and GPU compute capability, since a timing
    cache is only valid for the build and GPU architecture that measured it. Without a version and
    capability: ``timing.cache`` (the name a user passing ``--timing-cache`` chooses for themselves)."""
    if tensorrt_version and capability:
        prefix = "trt" if flavour == "tensorrt" else "rtx"
        return cache_root() / f"timing-{prefix}{tensorrt_version}-sm{capability.replace('.', '')}.cache"
    return cache_root() / "timing.cache"


#: ``build``'s default: a decoder segment with more weights than this (bytes) is built in layer chunks
#: of at most this much (2.5 GB: six 7B fp16 layers, three 13B; the builder peaks near 2.7x an
#: engine's weights plus ~0.5 GiB, docs/PERFORMANCE.md "TensorRT-RTX engine size and build memory").
DEFAULT_CHUNK_WEIGHT_BYTES = 2_500_000_000


def part_profile(profile: Profile, part) -> Profile:
    """A segment profile restricted to one chunk's inputs; the boundary input (the previous chunk's
    hidden states) takes the range of the segment's ``hidden_states``."""
    hidden = profile.shapes["hidden_states"]
    return Profile(profile.name, {t.name: profile.shapes.get(t.name, hidden) for t in part.inputs})


def weight_bytes(path: Path) -> int:
    """Bytes of the weights of one ONNX graph: every initializer and ``Constant`` tensor, element
    count x element size (inline or in external data; external data is not read), as its engine
    will hold them. What the engine-size ratio (``build``, the engines manifest) divides by.

    Raises:
        HimapError: if the file cannot be parsed as ONNX.
    """
    import onnx

    model = load_onnx_proto(path)

    def size(tensor) -> int:
        count = 1
        for dim in tensor.dims:
            count *= dim
        if tensor.data_type == onnx.TensorProto.STRING:
            return sum(len(v) for v in tensor.string_data)
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize

    def graph_bytes(graph) -> int:
        total = sum(size(t) for t in graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    total += size(attr.t)
                total += sum(graph_bytes(g) for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs))
        return total

    return graph_bytes(model.graph)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``getrusage`` ``ru_maxrss``, KiB on Linux), in bytes."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def check_buildable(manifest, export_dir: Path) -> None:
    """Refuse an export whose graphs TensorRT's ONNX parser cannot take (before TensorRT is imported).

    Raises:
        HimapError: for a ``kv_write`` that is not TensorRT-parsable (``gqa``: ONNX Runtime's contrib
            GroupQueryAttention; ``tensorscatter``: rejected by the parser, see
            :data:`himap_trt.manifest.NOT_TENSORRT`), or a ``--quantize`` scheme TensorRT cannot take
            (``int8-dynamic``: :data:`himap_trt.manifest.NOT_TENSORRT_QUANTIZE`).
    """
    if manifest.quantize in NOT_TENSORRT_QUANTIZE:
        raise HimapError(f"{str(export_dir)!r} was exported with --quantize {manifest.quantize} "
                         f"({NOT_TENSORRT_QUANTIZE[manifest.quantize]}); run it with --backend onnxruntime, or "
                         f"re-export with --quantize int8 or int4 (weight-only) for TensorRT")
    if manifest.kv_write not in TENSORRT_KV_WRITES:
        raise HimapError(f"{str(export_dir)!r} was exported with --kv-write {manifest.kv_write} "
                         f"({NOT_TENSORRT.get(manifest.kv_write, 'not TensorRT-parsable')}); re-export with "
                         f"--kv-write {' or '.join(TENSORRT_KV_WRITES)} for TensorRT")
    if manifest.kv_write == "attention" and manifest.dtype not in TENSORRT_ATTENTION_DTYPES:
        raise HimapError(f"{str(export_dir)!r} is a {manifest.dtype} export with --kv-write attention, which "
                         "TensorRT-RTX 1.7.1 cannot build (its Attention layer has no fp32 kernel); re-export with "
                         "--dtype fp16 (or bf16), or with --kv-write scatternd for fp32")


#: The operators (and the opset they are used at) a TensorRT-parsable ``kv_write`` form adds to the segment graphs
#: beyond the explicit form's, which a flavour's ONNX parser must take (:func:`check_flavour_parses`).
FORM_OPERATORS = {"attention": {"Attention": 24, "TensorScatter": 24}}


def check_flavour_parses(manifest, flavour_key: str, table: dict | None = None) -> None:
    """Refuse, before anything is parsed or written, an export whose ``kv_write`` form needs operators the
    flavour's ONNX parser does not take. TensorRT proper (``flavour_key`` ``tensorrt``): the operators of
    :data:`FORM_OPERATORS` checked against its support table (``engines/tensorrt_onnx_support.json``, or
    ``table``), which lists ``TensorScatter`` (opset 24, TensorRT 10.15) but not ``Attention``. TensorRT-RTX
    (``rtx``): its 1.7.1 parser takes the ``attention`` form (built in CI), so nothing is checked.

    Raises:
        HimapError: one line naming the missing operators and the export that TensorRT builds.
    """
    if flavour_key != TENSORRT.key or manifest.kv_write not in FORM_OPERATORS:
        return
    missing = missing_operators(FORM_OPERATORS[manifest.kv_write], table)
    if missing:
        raise HimapError(f"--tensorrt tensorrt: this --kv-write {manifest.kv_write} export's segment graphs use "
                         f"{', '.join(missing)}, which TensorRT's ONNX parser does not take according to its support "
                         "table (himap_trt/engines/tensorrt_onnx_support.json); re-export with `himap-trt export "
                         "--kv-write scatternd`, or build with --tensorrt rtx")


def attention_note(manifest) -> str | None:
    """One line for ``build`` when an export would run its attention badly on TensorRT, or None: an fp16/bf16
    export in the explicit ``scatternd`` form (MatMul-Softmax-MatMul over the whole preallocated cache at
    every decode step) instead of the fused ``attention`` form (docs/ARCHITECTURE.md "The attention form")."""
    if manifest.kv_write == "scatternd" and manifest.dtype in TENSORRT_ATTENTION_DTYPES:
        return ("note: this export spells attention out as MatMul-Softmax-MatMul over the whole cache; for "
                "TensorRT's fused attention and KV-cache-update layers re-export with `himap-trt export --target "
                "tensorrt` (--kv-write attention)")
    return None


@dataclass(frozen=True)
class BuildTarget:
    """What a build is for: the flavour, and the GPU or the compute capabilities.

    Attributes:
        flavour: the TensorRT flavour.
        capabilities: ``major.minor`` targets, or ``("current",)`` for the GPU this runs on.
        gpu_name / gpu_capability: the GPU built on (``current``), else None.
    """

    flavour: Flavour
    capabilities: tuple[str, ...]
    gpu_name: str | None = None
    gpu_capability: str | None = None

    @property
    def recorded_capabilities(self) -> tuple[str, ...]:
        """The capabilities the engines run on (the GPU's for a ``current`` build)."""
        return (self.gpu_capability,) if self.capabilities == (CURRENT,) else self.capabilities


def resolve_target(tensorrt: str = "auto", compute_capability: str | None = None, *,
                   fp32_gemms: bool = True) -> BuildTarget:
    """Check ``--tensorrt`` / ``--compute-capability`` (before any file is written).

    Raises:
        HimapError: unknown flavour or capability, a flavour that is not installed, ``current`` (or
            TensorRT) without a GPU.
    """
    flavour = select_flavour(tensorrt)
    capabilities = parse_capabilities(compute_capability, flavour, fp32_gemms=fp32_gemms)
    if capabilities == (CURRENT,):
        # Not refused for a GPU outside TensorRT-RTX's ahead-of-time list (Hopper SM90, Blackwell
        # SM100): NVIDIA's samples built with CURRENT on a B200; the builder answers for this GPU.
        name, capability = gpu_identity()
        return BuildTarget(flavour, capabilities, name, capability)
    return BuildTarget(flavour, capabilities)


def _builder_config(trt, builder, target: BuildTarget, path: Path, profiles: list[Profile], *, workspace: int,
                    optimization_level: int | None):
    """The builder configuration of one graph: TF32 off, the workspace limit, the profiles, the targets."""
    config = builder.create_builder_config()
    # TF32 off: an fp32 export is the exact path, compared with PyTorch token for token (TensorRT-RTX
    # turns it on by default); export fp16/bf16 for speed.
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if optimization_level is not None:
        config.builder_optimization_level = optimization_level
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name, shape in profile.shapes.items():
            optimization.set_shape(name, shape.min, shape.opt, shape.max)
        if config.add_optimization_profile(optimization) < 0:
            raise HimapError(f"{path.name}: {trt.__name__} rejected optimization profile {profile.name!r}")
    if target.flavour.ahead_of_time:
        config.num_compute_capabilities = len(target.capabilities)
        for i, capability in enumerate(target.capabilities):
            if not config.set_compute_capability(target.flavour.capability_member(capability), i):
                raise HimapError(f"{path.name}: {target.flavour.display} refused compute capability {capability}")
    return config


def _no_engine(target: BuildTarget, path: Path) -> HimapError:
    return HimapError(f"{target.flavour.display} could not build {path.name} (the builder returned no engine; "
                      "run with a larger --workspace or see the log above)")


def _save_timing_cache(config, timing_cache: Path) -> None:
    data = config.get_timing_cache().serialize()
    tmp = timing_cache.with_name(timing_cache.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, timing_cache)


def build_engine_bytes(target: BuildTarget, path: Path, profiles: list[Profile], *, workspace: int = 0,
                       timing_cache: Path | None = None, optimization_level: int | None = None) -> bytes:
    """Parse and build one graph, in memory (:func:`build_engine_file` writes it out instead).

    Args:
        target: flavour and capabilities (:func:`resolve_target`).
        path: the ONNX file.
        profiles: its optimization profiles, in order.
        workspace: builder workspace limit in bytes (0: the flavour's default).
        timing_cache: tactic timing cache file, read if present and rewritten after the build (None:
            no cache).
        optimization_level: ``IBuilderConfig.builder_optimization_level`` (0..5; None: the
            flavour's default, 3). Lower builds faster with fewer kernels tried (no command or test
            passes it: CI builds at the default).

    Returns:
        The serialized engine.

    Raises:
        HimapError: parse or build failure, naming the file.
    """
    trt = target.flavour.module()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network, parser = parse_network(trt, builder, logger, path)
    config = _builder_config(trt, builder, target, path, profiles, workspace=workspace,
                             optimization_level=optimization_level)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise _no_engine(target, path)
    if cache is not None:
        _save_timing_cache(config, timing_cache)
    del parser
    return bytes(serialized)


def build_engine_file(target: BuildTarget, path: Path, profiles: list[Profile], out: Path, *, workspace: int = 0,
                      timing_cache: Path | None = None, optimization_level: int | None = None,
                      model: bytes | None = None) -> int:
    """Parse and build one graph into the file ``out``, in bounded host memory: the builder streams
    the serialized engine to the file (``IBuilder.build_serialized_network_to_stream``) instead of
    returning it in one host buffer, so the engine is never held in memory beside the parsed
    weights, and the file is fsync'ed. Same engine bytes as :func:`build_engine_bytes` (checked by
    tests/integration/test_engine_size.py).

    Args:
        out: the engine file to write (created or truncated).
        model: the ONNX model bytes to build instead of ``path``'s (a layer chunk of it,
            :mod:`himap_trt.engines.chunks`); external data is still read relative to ``path``.
        target, path, profiles, workspace, timing_cache, optimization_level: as
            :func:`build_engine_bytes`.

    Returns:
        Bytes written.

    Raises:
        HimapError: parse or build failure, or a write the builder reported short, naming the file.
    """
    trt = target.flavour.module()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network, parser = parse_network(trt, builder, logger, path, model)
    config = _builder_config(trt, builder, target, path, profiles, workspace=workspace,
                             optimization_level=optimization_level)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    with open(out, "wb") as handle:
        writer = _FileWriter(trt, handle)
        ok = builder.build_serialized_network_to_stream(network, config, writer)
        if writer.error is not None:
            raise HimapError(f"writing {str(out)!r}: {writer.error}")
        if not ok:
            raise _no_engine(target, path)
        handle.flush()
        os.fsync(handle.fileno())
    if cache is not None:
        _save_timing_cache(config, timing_cache)
    del parser, network
    return writer.written


class _FileWriter:
    """``IStreamWriter`` writing the builder's chunks to an open file (made a subclass of the
    module's ``IStreamWriter`` on first use: the TensorRT module is imported lazily)."""

    def __new__(cls, trt, handle):
        base = trt.IStreamWriter

        class Writer(base):
            def __init__(self):
                base.__init__(self)
                self.written = 0
                self.error: str | None = None

            def write(self, data) -> int:
                try:
                    view = memoryview(data).cast("B")
                    handle.write(view)
                except (OSError, TypeError, ValueError) as exc:
                    self.error = str(exc)
                    return 0
                self.written += view.nbytes
                return view.nbytes

        return Writer()


def check_timing_cache(flavour: Flavour, timing_cache: Path | None) -> None:
    """Refuse ``--timing-cache`` where the flavour cannot use one (TensorRT-RTX without a GPU).

    Raises:
        HimapError: naming the flag.
    """
    if timing_cache is not None and not flavour.timing_cache_allowed(has_gpu()):
        raise HimapError(f"--timing-cache {str(timing_cache)!r}: {flavour.display} measures tactics on a GPU for a "
                         "timing cache and none is visible; drop --timing-cache for an ahead-of-time build")


def build_engines(export_dir: Path, engines_dir: Path, manifest, *, max_batch: int, max_seq_len: int,
                  workspace: int = 0, timing_cache: Path | None = None, target: BuildTarget | None = None,
                  progress: Callable[[str, int, int], None] | None = None,
                  sign_key: Path | None = None, profiles: str = "auto",
                  chunk_weight_bytes: int = DEFAULT_CHUNK_WEIGHT_BYTES) -> EnginesManifest:
    """Build one engine per graph of the export.

    Args:
        export_dir: the export directory; ``manifest`` is its loaded manifest.
        engines_dir: where to write the engines (replaced atomically on success).
        max_batch: most prompts per batch (profile maximum).
        max_seq_len: most tokens per sequence (profile maxima, see :mod:`himap_trt.engines.profiles`).
        workspace: builder workspace limit in bytes (0: the flavour's default).
        timing_cache: tactic timing cache file (default :func:`default_timing_cache` for this flavour,
            version and GPU); none for a TensorRT-RTX build without a GPU (refused if given).
        target: flavour and capabilities (default: :func:`resolve_target` ``("auto")``).
        progress: optional ``(description, step, total)`` callback.
        sign_key: EC private key (PEM): sign the engines directory (:mod:`himap_trt.signing`).
        profiles: ``auto``, ``shared`` (one optimization profile per engine covering prefill and
            decode) or ``phase`` (one per phase); see :mod:`himap_trt.engines.profiles`. ``auto``
            is ``shared`` for TensorRT-RTX, ``phase`` for TensorRT.
        chunk_weight_bytes: a decoder segment with more weights than this is built as consecutive
            engines of as many layers as fit it (:mod:`himap_trt.engines.chunks`; the builder's
            host memory follows an engine's weights, ~2.7x); 0: every segment as one engine.

    Each engine is streamed to its file (:func:`build_engine_file`) and recorded with its bytes, its
    graph's weight bytes (:func:`weight_bytes`) and its build seconds; the manifest records the
    profile form and this process's peak RSS after the last build (:func:`peak_rss_bytes`).

    Returns:
        The written :class:`EnginesManifest`.

    Raises:
        HimapError: without a TensorRT flavour (saying what to install), or if a graph fails to parse
            or build (naming the graph); an existing engines directory is then left untouched.
    """
    check_buildable(manifest, export_dir)
    if sign_key is not None:
        check_private_key(sign_key, "--sign")
    target = target or resolve_target("auto", fp32_gemms=has_fp32_gemms(manifest.dtype, manifest.plan))
    flavour = target.flavour
    check_flavour_parses(manifest, flavour.key)
    form = resolve_profile_form(profiles, flavour.key)
    version = flavour.version

    check_timing_cache(flavour, timing_cache)
    if flavour.timing_cache_allowed(has_gpu()) and target.gpu_capability is not None:
        timing_cache = Path(timing_cache or default_timing_cache(version, target.gpu_capability, flavour.key))
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
    elif flavour.timing_cache_allowed(has_gpu()) and timing_cache is not None:
        timing_cache = Path(timing_cache)
    else:
        timing_cache = None
    entries = []
    total = len(manifest.graphs)
    with atomic_directory(engines_dir, marker=ENGINES_MANIFEST, flag="--engines", recognise=is_engines_manifest) as tmp:
        for step, spec in enumerate(manifest.graphs):
            if progress:
                progress(f"building {spec.name}.engine", step, total)
            graph_profiles = engine_profiles(spec, manifest.plan, max_batch=max_batch, max_seq_len=max_seq_len,
                                             form=form)
            engine_file = f"{spec.name}.engine"
            graph_path = Path(export_dir) / spec.file
            weights = weight_bytes(graph_path)
            per_chunk = layers_per_chunk(weights, spec.layers[1] - spec.layers[0], chunk_weight_bytes) \
                if spec.kind == "segment" and spec.layers is not None else 0
            started = time.perf_counter()
            parts: list[EnginePart] = []
            try:
                if per_chunk:
                    for data, part in segment_chunks(graph_path, spec, per_chunk):
                        part_file = f"{part.name}.engine"
                        part_profiles = tuple(part_profile(p, part) for p in graph_profiles)
                        size = build_engine_file(target, graph_path, list(part_profiles), tmp / part_file,
                                                 workspace=workspace, timing_cache=timing_cache, model=data)
                        parts.append(EnginePart(part_file, part, part_profiles, size))
                    written, engine_file = sum(p.engine_bytes for p in parts), parts[0].file
                else:
                    written = build_engine_file(target, graph_path, graph_profiles, tmp / engine_file,
                                                workspace=workspace, timing_cache=timing_cache)
            except HimapError as exc:
                raise HimapError(f"graph {spec.name!r}: {exc}") from None
            seconds = time.perf_counter() - started
            write_point("build:engine")
            entries.append(EngineEntry(spec.name, engine_file, tuple(graph_profiles), engine_bytes=written,
                                       weight_bytes=weights, build_seconds=round(seconds, 3), parts=tuple(parts)))
        engines = EnginesManifest(
            format_version=ENGINES_FORMAT_VERSION, package_version=__version__,
            export_fingerprint=export_fingerprint(export_dir), plan=manifest.plan, dtype=manifest.dtype,
            tensorrt_flavour=flavour.key, tensorrt_version=version, gpu_name=target.gpu_name,
            compute_capabilities=target.recorded_capabilities, kv_write=manifest.kv_write,
            max_batch=max_batch, max_seq_len=max_seq_len, workspace_bytes=workspace, engines=tuple(entries),
            files=record_files(tmp, [name for entry in entries for name in entry.files]), profile_form=form,
            build_peak_rss_bytes=peak_rss_bytes(),
        )
        engines.save(tmp)
        write_point("build:manifest")
        if sign_key is not None:
            sign_directory(tmp, sign_key, "--sign")
    if progress:
        progress("engines complete", total, total)
    return engines
