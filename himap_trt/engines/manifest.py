"""``engines/manifest.json``: which engines were built from which export, with what.

``run`` refuses engines built for another export (a hash of the export's ``manifest.json``),
another plan, another TensorRT flavour or version, or for GPU architectures that do not include
this GPU's, since an engine is only valid for the exact TensorRT (or TensorRT-RTX) version and the
compute capabilities it was built for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from himap_trt.confine import confined_path, parse_file_records, verify_files
from himap_trt.engines.environment import gpu_identity
from himap_trt.engines.flavour import FLAVOURS, flavour_of
from himap_trt.engines.profiles import Profile
from himap_trt.errors import HimapError
from himap_trt.graphs.spec import GraphSpec
from himap_trt.manifest import MANIFEST_NAME, read_versioned_json
from himap_trt.plan import PruningPlan

ENGINES_MANIFEST = "manifest.json"
#: Version 2 records every engine file's size and sha256 (``files``); version 3 the TensorRT flavour
#: (``tensorrt`` / ``rtx``), the target compute capabilities (a list: TensorRT-RTX builds for several,
#: ahead of time) and the export's ``kv_write``; ``gpu_name`` is null for an ahead-of-time build.
ENGINES_FORMAT_VERSION = 3


def engines_present(directory: Path) -> bool:
    """Whether ``directory`` holds an engines manifest."""
    return (Path(directory) / ENGINES_MANIFEST).is_file()


def export_fingerprint(export_dir: Path) -> str:
    """``sha256:<hex>`` of the export's ``manifest.json`` (which hashes the model and lists every graph)."""
    return "sha256:" + hashlib.sha256((Path(export_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


@dataclass(frozen=True)
class EnginePart:
    """One layer chunk of a segment built as several engines (:mod:`himap_trt.engines.chunks`).

    Attributes:
        file: its engine file.
        spec: the chunk's graph declaration (``{segment}.part{k}``: the segment inputs it reads,
            the previous chunk's boundary, the outputs it writes).
        profiles: its optimization profiles (the segment's, restricted to its inputs).
        engine_bytes: the file's size.
    """

    file: str
    spec: GraphSpec
    profiles: tuple[Profile, ...]
    engine_bytes: int | None = None


@dataclass(frozen=True)
class EngineEntry:
    """One engine: the graph it was built from, its file, and its optimization profiles (in order).

    Attributes:
        engine_bytes: the engine file's size (None in manifests written before issue 34).
        weight_bytes: its graph's weights (initializers and constants, bytes;
            :func:`himap_trt.engines.build.weight_bytes`), None before issue 34.
        build_seconds: wall seconds to parse and build it, None before issue 34.
        parts: for a segment built in layer chunks, one :class:`EnginePart` per chunk in order
            (``file`` is then the first part's, ``engine_bytes`` their sum); empty otherwise.
    """

    graph: str
    file: str
    profiles: tuple[Profile, ...]
    engine_bytes: int | None = None
    weight_bytes: int | None = None
    build_seconds: float | None = None
    parts: tuple[EnginePart, ...] = ()

    @property
    def files(self) -> list[str]:
        """Every engine file of this graph (its parts', or its own)."""
        return [part.file for part in self.parts] or [self.file]

    @property
    def ratio(self) -> float | None:
        """``engine_bytes / weight_bytes`` (None where either is unknown or there are no weights)."""
        if not self.engine_bytes or not self.weight_bytes:
            return None
        return self.engine_bytes / self.weight_bytes


@dataclass(frozen=True)
class EnginesManifest:
    """An engines directory's description.

    Attributes:
        format_version: :data:`ENGINES_FORMAT_VERSION`.
        package_version: himap-trt version that built it.
        export_fingerprint: :func:`export_fingerprint` of the export built from.
        plan: the export's plan.
        dtype: the export's dtype (the networks are strongly typed from it).
        tensorrt_flavour: ``tensorrt`` (NVIDIA TensorRT) or ``rtx`` (TensorRT-RTX), see
            :mod:`himap_trt.engines.flavour`.
        tensorrt_version: the flavour module's ``__version__`` at build time.
        gpu_name: the GPU built on (e.g. ``NVIDIA H200``), None for an ahead-of-time build.
        compute_capabilities: the ``major.minor`` capabilities the engines run on (the GPU's for a
            build on a GPU; the chosen targets for TensorRT-RTX ahead of time).
        kv_write: the export's cache write (``scatternd`` / ``tensorscatter``).
        max_batch / max_seq_len: the profile limits (prompts, tokens).
        workspace_bytes: builder workspace limit (0: TensorRT's default).
        engines: one entry per graph, in chain order.
        files: every engine file, relative path -> ``{"bytes": size, "sha256": hex}``; an engine
            deserialises plugins, so it is treated like code: checked before TensorRT reads it.
        profile_form: ``shared`` (one optimization profile per engine covering prefill and decode)
            or ``phase`` (one per phase), :mod:`himap_trt.engines.profiles`; ``phase`` in manifests
            written before issue 34.
        build_peak_rss_bytes: the building process's peak resident set size after the last engine
            (bytes; None before issue 34).
    """

    format_version: int
    package_version: str
    export_fingerprint: str
    plan: PruningPlan
    dtype: str
    tensorrt_flavour: str
    tensorrt_version: str
    gpu_name: str | None
    compute_capabilities: tuple[str, ...]
    kv_write: str
    max_batch: int
    max_seq_len: int
    workspace_bytes: int
    engines: tuple[EngineEntry, ...]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    profile_form: str = "phase"
    build_peak_rss_bytes: int | None = None

    def size_totals(self, kind: str | None = None) -> tuple[int, int] | None:
        """(engine bytes, weight bytes) summed over the engines of graphs named ``kind``* (``segment``:
        every ``segment_j``; None: all), or None if a manifest entry lacks either figure."""
        chosen = [e for e in self.engines if kind is None or e.graph.startswith(kind)]
        if not chosen or any(e.engine_bytes is None or e.weight_bytes is None for e in chosen):
            return None
        return sum(e.engine_bytes for e in chosen), sum(e.weight_bytes for e in chosen)

    def entry(self, graph: str) -> EngineEntry:
        """The engine built from ``graph``; raises :class:`HimapError` if there is none."""
        for entry in self.engines:
            if entry.graph == graph:
                return entry
        raise HimapError(f"the engines manifest has no engine for graph {graph!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.plan.evs_rate:      # engines of exports without EVS (issue 29) are described as before
            data["plan"].pop("evs_rate", None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path | None = None) -> EnginesManifest:
        """Parse and validate.

        Raises:
            HimapError: naming ``source`` and the missing or malformed field.
        """
        where = f"engines manifest {str(source)!r}" if source is not None else "engines manifest"
        for key in ("export_fingerprint", "plan", "tensorrt_flavour", "tensorrt_version", "compute_capabilities",
                    "engines", "files"):
            if key not in data:
                raise HimapError(f"{where}: field {key!r} is missing")
        if not isinstance(data["engines"], list) or not all(
                isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("graph"), str)
                for e in data["engines"]):
            raise HimapError(f"{where}: field 'engines' must be an array of objects with string 'graph' and 'file'")
        capabilities = data["compute_capabilities"]
        if not isinstance(capabilities, list) or not capabilities or not all(isinstance(c, str) for c in capabilities):
            raise HimapError(f"{where}: field 'compute_capabilities' must be a non-empty array of strings such as \"8.6\"")
        if data["tensorrt_flavour"] not in FLAVOURS:
            raise HimapError(f"{where}: field 'tensorrt_flavour' must be one of {', '.join(FLAVOURS)}, "
                             f"got {data['tensorrt_flavour']!r}")
        try:
            return cls(
                format_version=int(data["format_version"]), package_version=str(data["package_version"]),
                export_fingerprint=str(data["export_fingerprint"]), plan=PruningPlan.from_dict(data["plan"]),
                dtype=str(data["dtype"]), tensorrt_flavour=str(data["tensorrt_flavour"]),
                tensorrt_version=str(data["tensorrt_version"]),
                gpu_name=None if data.get("gpu_name") is None else str(data["gpu_name"]),
                compute_capabilities=tuple(capabilities), kv_write=str(data.get("kv_write", "scatternd")),
                max_batch=int(data["max_batch"]), max_seq_len=int(data["max_seq_len"]),
                workspace_bytes=int(data.get("workspace_bytes", 0)),
                engines=tuple(EngineEntry(e["graph"], e["file"], tuple(Profile.from_dict(p) for p in e["profiles"]),
                                          engine_bytes=_optional(e.get("engine_bytes"), int),
                                          weight_bytes=_optional(e.get("weight_bytes"), int),
                                          build_seconds=_optional(e.get("build_seconds"), float),
                                          parts=tuple(EnginePart(p["file"], GraphSpec.from_dict(p["spec"]),
                                                                 tuple(Profile.from_dict(q) for q in p["profiles"]),
                                                                 _optional(p.get("engine_bytes"), int))
                                                      for p in e.get("parts", [])))
                              for e in data["engines"]),
                files=dict(data["files"]), profile_form=str(data.get("profile_form", "phase")),
                build_peak_rss_bytes=_optional(data.get("build_peak_rss_bytes"), int),
            )
        except HimapError as exc:
            raise HimapError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HimapError(f"{where} is malformed ({type(exc).__name__}: {exc})") from None

    def save(self, directory: Path) -> Path:
        path = Path(directory) / ENGINES_MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def _optional(value, kind):
    """``kind(value)``, or None for a missing field."""
    return None if value is None else kind(value)


def read_engines_manifest(directory: Path) -> EnginesManifest:
    """Read an engines manifest without compatibility checks.

    Raises:
        HimapError: missing directory/manifest, unreadable JSON, other format version.
    """
    directory = Path(directory)
    path = directory / ENGINES_MANIFEST
    if not path.is_file():
        raise HimapError(f"--engines {str(directory)!r} holds no {ENGINES_MANIFEST}; build engines with `himap-trt build`")
    data = read_versioned_json(path, ENGINES_FORMAT_VERSION, "engines manifest", "rebuild with `himap-trt build`")
    return EnginesManifest.from_dict(data, source=path)


def is_engines_manifest(data: Any) -> bool:
    """Whether parsed JSON looks like a himap-trt engines manifest (any format version): what
    ``build --engines`` requires before it replaces a directory."""
    return (isinstance(data, dict) and isinstance(data.get("format_version"), int)
            and isinstance(data.get("engines"), list) and isinstance(data.get("export_fingerprint"), str))


def verify_engine_files(directory: Path, engines: EnginesManifest) -> None:
    """Confine every engine file to ``directory`` and check its recorded size and sha256.

    Raises:
        HimapError: naming the engine file and the manifest.
    """
    source = Path(directory) / ENGINES_MANIFEST
    records = parse_file_records(engines.files, field="files", source=source)
    for i, entry in enumerate(engines.engines):
        for name in [entry.file, *entry.files]:
            confined_path(directory, name, field=f"engines[{i}].file", source=source)
            if name not in records:
                raise HimapError(f"engine file {name!r} is not recorded in 'files' of {str(source)!r}")
    verify_files(directory, records, source=source)


def targets(engines: EnginesManifest) -> str:
    """``compute capability 8.6, 8.9 (ahead of time)`` / ``compute capability 9.0 (NVIDIA H200)``."""
    built = engines.gpu_name or "ahead of time"
    return f"compute capability {', '.join(engines.compute_capabilities)} ({built})"


def check_compatible(engines: EnginesManifest, *, fingerprint: str, plan: PruningPlan, flavour: str,
                     tensorrt_version: str, compute_capability: str, where: str) -> None:
    """Refuse engines that do not belong to this export, plan, TensorRT flavour and version, or GPU
    architecture.

    Raises:
        HimapError: naming what differs and how to fix it.
    """
    built = flavour_of(engines.tensorrt_flavour)
    if engines.export_fingerprint != fingerprint:
        raise HimapError(f"the engines in {where} were built from another export (its manifest changed since); "
                         "rebuild with `himap-trt build`")
    if engines.plan != plan:
        raise HimapError(f"the engines in {where} implement '{engines.plan.describe()}', the export "
                         f"'{plan.describe()}'; rebuild with `himap-trt build`")
    if engines.tensorrt_flavour != flavour:
        raise HimapError(f"the engines in {where} were built with {built.display}, this run uses "
                         f"{flavour_of(flavour).display}; rebuild with `himap-trt build --tensorrt {flavour}`")
    if engines.tensorrt_version != tensorrt_version:
        raise HimapError(f"the engines in {where} were built with {built.display} {engines.tensorrt_version}, this "
                         f"machine has {built.display} {tensorrt_version}; rebuild with `himap-trt build`")
    if compute_capability not in engines.compute_capabilities:
        raise HimapError(f"the engines in {where} were built for {targets(engines)}, this GPU is compute capability "
                         f"{compute_capability}; rebuild with `himap-trt build --compute-capability current` on it")


def load_engines_manifest(directory: Path, *, export, export_dir: Path) -> EnginesManifest:
    """Read the engines manifest and check it against the export and this machine's TensorRT flavour
    (the one the engines were built with) and GPU.

    Raises:
        HimapError: see :func:`read_engines_manifest` and :func:`check_compatible`; the engines'
            flavour not installed; no GPU.
    """
    engines = read_engines_manifest(directory)
    verify_engine_files(directory, engines)  # before TensorRT reads anything
    flavour = flavour_of(engines.tensorrt_flavour)
    if not flavour.installed():
        raise HimapError(f"the engines in {str(directory)!r} were built with {flavour.display} "
                         f"{engines.tensorrt_version}, which is not installed here (no module {flavour.module_name!r}); "
                         f"{flavour.install}, or rebuild them with `himap-trt build`")
    version = flavour.version
    _, capability = gpu_identity()
    check_compatible(engines, fingerprint=export_fingerprint(export_dir), plan=export.plan, flavour=flavour.key,
                     tensorrt_version=version, compute_capability=capability, where=repr(str(directory)))
    return engines
