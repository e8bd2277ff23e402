"""``engines/manifest.json``: which engines were built from which export, with what.

``run`` refuses engines built for another export (a hash of the export's ``manifest.json``),
another plan, another TensorRT version or another GPU architecture, since a TensorRT engine is only
valid for the exact version and compute capability it was built with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from himap_trt.confine import confined_path, parse_file_records, verify_files
from himap_trt.engines.environment import gpu_identity, import_tensorrt
from himap_trt.engines.profiles import Profile
from himap_trt.errors import HimapError
from himap_trt.manifest import MANIFEST_NAME, read_versioned_json
from himap_trt.plan import PruningPlan

ENGINES_MANIFEST = "manifest.json"
#: Version 2 records every engine file's size and sha256 (``files``).
ENGINES_FORMAT_VERSION = 2


def engines_present(directory: Path) -> bool:
    """Whether ``directory`` holds an engines manifest."""
    return (Path(directory) / ENGINES_MANIFEST).is_file()


def export_fingerprint(export_dir: Path) -> str:
    """``sha256:<hex>`` of the export's ``manifest.json`` (which hashes the model and lists every graph)."""
    return "sha256:" + hashlib.sha256((Path(export_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


@dataclass(frozen=True)
class EngineEntry:
    """One engine: the graph it was built from, its file, and its optimization profiles (in order)."""

    graph: str
    file: str
    profiles: tuple[Profile, ...]


@dataclass(frozen=True)
class EnginesManifest:
    """An engines directory's description.

    Attributes:
        format_version: :data:`ENGINES_FORMAT_VERSION`.
        package_version: himap-trt version that built it.
        export_fingerprint: :func:`export_fingerprint` of the export built from.
        plan: the export's plan.
        dtype: the export's dtype (the networks are strongly typed from it).
        tensorrt_version: ``tensorrt.__version__`` at build time.
        gpu_name / compute_capability: the GPU built on (e.g. ``NVIDIA H200``, ``9.0``).
        max_batch / max_seq_len: the profile limits (prompts, tokens).
        workspace_bytes: builder workspace limit (0: TensorRT's default).
        engines: one entry per graph, in chain order.
        files: every engine file, relative path -> ``{"bytes": size, "sha256": hex}``; an engine
            deserialises plugins, so it is treated like code: checked before TensorRT reads it.
    """

    format_version: int
    package_version: str
    export_fingerprint: str
    plan: PruningPlan
    dtype: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    max_batch: int
    max_seq_len: int
    workspace_bytes: int
    engines: tuple[EngineEntry, ...]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def entry(self, graph: str) -> EngineEntry:
        """The engine built from ``graph``; raises :class:`HimapError` if there is none."""
        for entry in self.engines:
            if entry.graph == graph:
                return entry
        raise HimapError(f"the engines manifest has no engine for graph {graph!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path | None = None) -> EnginesManifest:
        """Parse and validate.

        Raises:
            HimapError: naming ``source`` and the missing or malformed field.
        """
        where = f"engines manifest {str(source)!r}" if source is not None else "engines manifest"
        for key in ("export_fingerprint", "plan", "tensorrt_version", "engines", "files"):
            if key not in data:
                raise HimapError(f"{where}: field {key!r} is missing")
        if not isinstance(data["engines"], list) or not all(
                isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("graph"), str)
                for e in data["engines"]):
            raise HimapError(f"{where}: field 'engines' must be an array of objects with string 'graph' and 'file'")
        try:
            return cls(
                format_version=int(data["format_version"]), package_version=str(data["package_version"]),
                export_fingerprint=str(data["export_fingerprint"]), plan=PruningPlan.from_dict(data["plan"]),
                dtype=str(data["dtype"]), tensorrt_version=str(data["tensorrt_version"]),
                gpu_name=str(data["gpu_name"]), compute_capability=str(data["compute_capability"]),
                max_batch=int(data["max_batch"]), max_seq_len=int(data["max_seq_len"]),
                workspace_bytes=int(data.get("workspace_bytes", 0)),
                engines=tuple(EngineEntry(e["graph"], e["file"], tuple(Profile.from_dict(p) for p in e["profiles"]))
                              for e in data["engines"]),
                files=dict(data["files"]),
            )
        except HimapError as exc:
            raise HimapError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HimapError(f"{where} is malformed ({type(exc).__name__}: {exc})") from None

    def save(self, directory: Path) -> Path:
        path = Path(directory) / ENGINES_MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


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
        confined_path(directory, entry.file, field=f"engines[{i}].file", source=source)
        if entry.file not in records:
            raise HimapError(f"engine file {entry.file!r} is not recorded in 'files' of {str(source)!r}")
    verify_files(directory, records, source=source)


def check_compatible(engines: EnginesManifest, *, fingerprint: str, plan: PruningPlan, tensorrt_version: str,
                     compute_capability: str, where: str) -> None:
    """Refuse engines that do not belong to this export, plan, TensorRT version or GPU architecture.

    Raises:
        HimapError: naming what differs and how to fix it.
    """
    if engines.export_fingerprint != fingerprint:
        raise HimapError(f"the engines in {where} were built from another export (its manifest changed since); "
                         "rebuild with `himap-trt build`")
    if engines.plan != plan:
        raise HimapError(f"the engines in {where} implement '{engines.plan.describe()}', the export "
                         f"'{plan.describe()}'; rebuild with `himap-trt build`")
    if engines.tensorrt_version != tensorrt_version:
        raise HimapError(f"the engines in {where} were built with TensorRT {engines.tensorrt_version}, this machine "
                         f"has TensorRT {tensorrt_version}; rebuild with `himap-trt build`")
    if engines.compute_capability != compute_capability:
        raise HimapError(f"the engines in {where} were built for compute capability {engines.compute_capability} "
                         f"({engines.gpu_name}), this GPU is {compute_capability}; rebuild on this machine")


def load_engines_manifest(directory: Path, *, export, export_dir: Path) -> EnginesManifest:
    """Read the engines manifest and check it against the export and this machine's TensorRT and GPU.

    Raises:
        HimapError: see :func:`read_engines_manifest` and :func:`check_compatible`.
    """
    engines = read_engines_manifest(directory)
    verify_engine_files(directory, engines)  # before TensorRT reads anything
    trt = import_tensorrt()
    _, capability = gpu_identity()
    check_compatible(engines, fingerprint=export_fingerprint(export_dir), plan=export.plan,
                     tensorrt_version=trt.__version__, compute_capability=capability, where=repr(str(directory)))
    return engines
