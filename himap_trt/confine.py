"""Untrusted directories: paths confined to their directory, file sizes and sha256 digests, no custom code.

Export directories, engine directories and model directories are shared the way checkpoints are, so
everything read from them is untrusted input:

- every path a manifest names must be relative, free of ``..``, and resolve (after following
  symlinks) to a regular file or directory *inside* the manifest's directory
  (:func:`confined_path`);
- every file a manifest names is recorded with its size and sha256 and checked before use
  (:func:`verify_files`), so a file copied in from another export, truncated or edited is refused
  by name before ONNX Runtime or TensorRT sees it; ONNX external-data references are confined and
  must be recorded files too (:func:`check_onnx_external_data`);
- a directory that declares custom Python code (``auto_map`` in a ``*config*.json``) is refused
  before transformers reads it (:func:`refuse_custom_code`); every transformers loader is also
  called with ``trust_remote_code=False``.

Digests are cached (:class:`HashCache`) per file identity, so multi-GB external data is hashed once,
not on every ``run``: the cache key is the file's device, inode, size, mtime and **ctime** (which no
unprivileged process can set back), and a digest is only cached for a file whose ctime is at least
:data:`RACY_SECONDS` older than the moment hashing started (a write in the same timestamp tick
could otherwise go unnoticed, as git's "racy" index entries). See ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from himap_trt.errors import HimapError
from himap_trt.fsutil import cache_root

#: Files whose ctime is younger than this when hashing starts are hashed but not cached (seconds).
RACY_SECONDS = 2.0
#: Most entries the digest cache keeps (least recently written dropped first).
CACHE_ENTRIES = 4096
_CHUNK = 8 * 1024 * 1024


def _where(source: str | Path | None, field: str) -> str:
    return f"{field} in {str(source)!r}" if source is not None else field


def confined_path(root: str | Path, name: Any, *, field: str, source: str | Path | None = None,
                  kind: str = "file") -> Path:
    """Resolve ``name`` (a path read from a manifest) inside ``root``, refusing anything that leaves it.

    Args:
        root: the directory the manifest lives in.
        name: the path as written in the manifest (must be a relative path string).
        field: the manifest field it came from, for messages (e.g. ``graphs[2].file``).
        source: the manifest file, for messages.
        kind: ``file`` (must be a regular file) or ``dir`` (must be a directory).

    Returns:
        The resolved absolute path (symlinks followed), inside ``root``.

    Raises:
        HimapError: naming the field and the manifest: not a non-empty string, absolute, holding ``..``,
            resolving outside ``root`` (e.g. through a symlink), missing, or not a regular file/directory.
    """
    where = _where(source, field)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise HimapError(f"{where} must be a non-empty relative path, got {name!r}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        raise HimapError(f"{where} is the absolute path {name!r}; paths in a manifest must be relative to its directory")
    if ".." in pure.parts or "\\" in name:
        raise HimapError(f"{where} is {name!r}, which climbs out of the directory ('..' or '\\' is not allowed)")
    root_resolved = Path(root).resolve()
    resolved = (root_resolved / pure).resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise HimapError(f"{where} is {name!r}, which leads outside {str(root)!r} (through a symbolic link)")
    try:
        info = resolved.stat()
    except FileNotFoundError:
        raise HimapError(f"{where} names {name!r}, which is missing") from None
    except OSError as exc:
        raise HimapError(f"{where} names {name!r}, which cannot be read: {exc.strerror}") from None
    if kind == "file" and not stat.S_ISREG(info.st_mode):
        raise HimapError(f"{where} names {name!r}, which is not a regular file")
    if kind == "dir" and not stat.S_ISDIR(info.st_mode):
        raise HimapError(f"{where} names {name!r}, which is not a directory")
    return resolved


# -- digests ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileDigest:
    """Size (bytes) and sha256 (hex) of a file's content."""

    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha256}


def _identity(info: os.stat_result) -> dict[str, int]:
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}


class HashCache:
    """sha256 digests of files by identity, in ``$HIMAP_TRT_CACHE/file-digests.json`` (outside any export).

    An entry is used only if the file's device, inode, size, mtime and ctime are all unchanged.
    Unreadable or corrupt cache files are ignored; writes are atomic (temporary file + rename) and
    best effort (a read-only cache directory only costs re-hashing).
    """

    def __init__(self, path: Path | None = None):
        if path is None:
            path = cache_root() / "file-digests.json"
        self.path = Path(path)
        self._entries: dict[str, dict[str, Any]] | None = None
        self._dirty = False

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            try:
                data = json.loads(self.path.read_text())
                self._entries = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    @staticmethod
    def _key(info: os.stat_result) -> str:
        return f"{info.st_dev}:{info.st_ino}"

    def get(self, info: os.stat_result) -> str | None:
        """The cached sha256 of the file with this ``os.stat`` result, or None."""
        entry = self._load().get(self._key(info))
        if isinstance(entry, dict) and all(entry.get(k) == v for k, v in _identity(info).items()):
            digest = entry.get("sha256")
            return digest if isinstance(digest, str) else None
        return None

    def put(self, info: os.stat_result, sha256: str) -> None:
        """Remember ``sha256`` for the file with this ``os.stat`` result (written by :meth:`save`)."""
        entries = self._load()
        entries.pop(self._key(info), None)
        entries[self._key(info)] = {**_identity(info), "sha256": sha256}
        while len(entries) > CACHE_ENTRIES:
            entries.pop(next(iter(entries)))
        self._dirty = True

    def save(self) -> None:
        """Write the cache if it changed (errors ignored: the cache is an optimisation)."""
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._entries))
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:
            pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | Path, cache: HashCache | None = None, *, trusted: bool = False) -> FileDigest:
    """Size and sha256 of ``path``, from ``cache`` when the file is unchanged since it was hashed.

    Args:
        path: a regular file.
        cache: digest cache (None: always hash).
        trusted: the caller wrote the file itself and nobody else can have touched it (a fresh export):
            cache the digest even if the file is younger than :data:`RACY_SECONDS`.

    Raises:
        OSError: if the file cannot be read.
    """
    path = Path(path)
    before = path.stat()
    if cache is not None:
        cached = cache.get(before)
        if cached is not None:
            return FileDigest(before.st_size, cached)
    started = time.time_ns()
    sha = _sha256(path)
    after = path.stat()
    if cache is not None and _identity(after) == _identity(before) and (
            trusted or after.st_ctime_ns <= started - int(RACY_SECONDS * 1e9)):
        cache.put(after, sha)
    return FileDigest(after.st_size, sha)


def record_files(root: str | Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": n, "sha256": hex}}`` for files this process just wrote under ``root``
    (their digests are cached, so the first ``run`` need not hash them again)."""
    cache = HashCache()
    records = {name: file_digest(Path(root) / name, cache, trusted=True).to_dict() for name in sorted(names)}
    cache.save()
    return records


def parse_file_records(records: Any, *, field: str, source: str | Path | None) -> dict[str, FileDigest]:
    """Check the shape of a manifest's ``files`` mapping.

    Raises:
        HimapError: naming the field if it is not ``{path: {"bytes": int >= 0, "sha256": 64 hex}}``.
    """
    if not isinstance(records, dict):
        raise HimapError(f"{_where(source, field)} must be an object mapping file paths to {{\"bytes\", \"sha256\"}}, "
                         f"got {type(records).__name__}")
    parsed = {}
    for name, record in records.items():
        entry = f"{field}[{name!r}]"
        if not isinstance(record, dict):
            raise HimapError(f"{_where(source, entry)} must be an object with \"bytes\" and \"sha256\"")
        size, sha = record.get("bytes"), record.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise HimapError(f"{_where(source, entry + '.bytes')} must be a non-negative integer, got {size!r}")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise HimapError(f"{_where(source, entry + '.sha256')} must be 64 lowercase hex digits, got {sha!r}")
        parsed[name] = FileDigest(size, sha)
    return parsed


def verify_files(root: str | Path, records: dict[str, FileDigest], *, field: str = "files",
                 source: str | Path | None = None) -> dict[str, Path]:
    """Confine every recorded file to ``root`` and check its size, then its sha256.

    Sizes of all files are checked before any hashing (cheap, catches most swaps); digests come
    from :class:`HashCache` when a file is unchanged since it was last hashed.

    Returns:
        ``{name: resolved path}``.

    Raises:
        HimapError: naming the file and the manifest for a path that leaves ``root``, a missing file,
            or a size or sha256 different from the recorded one.
    """
    paths = {name: confined_path(root, name, field=f"{field}[{name!r}]", source=source) for name in records}
    for name, path in paths.items():
        size = path.stat().st_size
        if size != records[name].bytes:
            raise HimapError(f"{name!r} in {str(root)!r} has {size} bytes, {str(source or root)!r} records "
                             f"{records[name].bytes}: the file was changed or comes from another export")
    cache = HashCache()
    try:
        for name, path in paths.items():
            try:
                digest = file_digest(path, cache)
            except OSError as exc:
                raise HimapError(f"cannot read {name!r} in {str(root)!r}: {exc.strerror}") from None
            if digest.sha256 != records[name].sha256:
                raise HimapError(f"{name!r} in {str(root)!r} does not match the sha256 recorded in "
                                 f"{str(source or root)!r}: the file was changed or comes from another export")
    finally:
        cache.save()
    return paths


def files_under(directory: str | Path) -> list[str]:
    """Every file below ``directory`` (relative POSIX paths, sorted; symlinks listed, not followed)."""
    directory = Path(directory)
    names = []
    for dirpath, dirnames, filenames in os.walk(directory):
        base = Path(dirpath)
        for entry in [*filenames, *(d for d in dirnames if (base / d).is_symlink())]:
            names.append((base / entry).relative_to(directory).as_posix())
    return sorted(names)


# -- ONNX external data ----------------------------------------------------------------------------
def _tensors(graph):
    """Every TensorProto of a graph: initializers, sparse initializers, Constant/attribute tensors,
    and those of subgraphs (If/Loop/Scan bodies)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def load_onnx_proto(path: str | Path):
    """An ONNX file's ``ModelProto`` without its external data.

    Raises:
        HimapError: if the file cannot be parsed as ONNX.
    """
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have several types
        raise HimapError(f"cannot read {str(path)!r} as ONNX: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None


def external_data_files(path: str | Path, model=None) -> list[str]:
    """The ``location`` of every external-data reference in an ONNX file (weights are not loaded).

    Args:
        model: the file's parsed ``ModelProto``, if the caller has it.

    Raises:
        HimapError: if the file cannot be parsed as ONNX.
    """
    import onnx

    if model is None:
        model = load_onnx_proto(path)
    locations = set()
    functions = [f for f in model.functions]
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.add(next((e.value for e in tensor.external_data if e.key == "location"), ""))
    for function in functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t") and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                    locations.add(next((e.value for e in attr.t.external_data if e.key == "location"), ""))
    return sorted(locations)


def check_onnx_external_data(root: str | Path, graph_file: str, recorded: dict[str, Any], *,
                             source: str | Path | None = None) -> None:
    """Refuse an ONNX file whose external data lies outside ``root`` or is not a recorded file.

    Locations are relative to the graph file's directory, as ONNX Runtime and TensorRT resolve them.

    Returns:
        The graph's ``ModelProto`` (without external data), for further checks.

    Raises:
        HimapError: naming the graph and the offending location.
    """
    graph_path = Path(root) / graph_file
    folder = PurePosixPath(graph_file).parent
    model = load_onnx_proto(graph_path)
    for location in external_data_files(graph_path, model):
        name = (folder / location).as_posix() if location else location
        confined_path(root, name, field=f"external data of {graph_file!r}", source=source)
        if name not in recorded:
            raise HimapError(f"{graph_file!r} in {str(root)!r} reads external data {location!r}, which "
                             f"{str(source or root)!r} does not record")
    return model


# -- custom code -----------------------------------------------------------------------------------
def refuse_custom_code(directory: str | Path, what: str) -> None:
    """Refuse a model or processor directory that asks transformers to run its own Python code.

    A ``*config*.json`` holding ``auto_map`` (what makes transformers import ``.py`` files from the
    directory, after a "Do you wish to run the custom code? [y/N]" prompt on a terminal) is refused
    before transformers reads anything. himap-trt only uses transformers' built-in LLaVA classes.

    Raises:
        HimapError: naming the directory and the file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*config*.json")):
        try:
            if path.stat().st_size > 64 * 1024 * 1024:
                continue
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue  # the loader reports unreadable files itself
        if isinstance(data, dict) and "auto_map" in data:
            raise HimapError(f"{what} directory {str(directory)!r} asks to run its own Python code (\"auto_map\" in "
                             f"{path.name}); himap-trt never runs code from model, processor or export directories")
