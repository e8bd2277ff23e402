"""``himap-trt build``: one TensorRT engine per exported graph, through Polygraphy's loaders.

Each network is parsed *strongly typed* from the exported ONNX graph (TensorRT 11 removed weak
typing: precision comes from the graph, exported in fp32/fp16/bf16), gets the optimization
profiles of :mod:`himap_trt.engines.profiles`, and is built with a timing cache that is reused
across builds. Engines are written into a temporary directory swapped into place when all are
built (:func:`himap_trt.fsutil.atomic_directory`).

TensorRT is imported lazily: everything else in the package works without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from himap_trt.engines.manifest import (
    ENGINES_FORMAT_VERSION,
    ENGINES_MANIFEST,
    EngineEntry,
    EnginesManifest,
    export_fingerprint,
    is_engines_manifest,
)
from himap_trt import __version__
from himap_trt.confine import record_files
# import_tensorrt, gpu_identity and INSTALL_HINT live in engines/environment.py (engines/manifest.py needs
# them too); imported here for build_engines and for callers that import them from this module.
from himap_trt.engines.environment import INSTALL_HINT, gpu_identity, import_tensorrt  # noqa: F401
from himap_trt.engines.profiles import graph_profiles
from himap_trt.errors import HimapError
from himap_trt.fsutil import atomic_directory, cache_root, write_point
from himap_trt.manifest import TENSORRT_KV_WRITES
from himap_trt.signing import check_private_key, sign_directory

def default_timing_cache(tensorrt_version: str | None = None, capability: str | None = None) -> Path:
    """``$HIMAP_TRT_CACHE/timing-trt<version>-sm<major><minor>.cache`` (or under
    ``~/.cache/himap-trt``): outside the engines directory, so rebuilds reuse it, and keyed by
    TensorRT version and GPU compute capability, since a timing cache is only valid for the
    TensorRT build and GPU architecture that measured it. Without a version and capability:
    ``timing.cache`` (the name a user passing ``--timing-cache`` chooses for themselves)."""
    if tensorrt_version and capability:
        return cache_root() / f"timing-trt{tensorrt_version}-sm{capability.replace('.', '')}.cache"
    return cache_root() / "timing.cache"


def check_buildable(manifest, export_dir: Path) -> None:
    """Refuse an export whose graphs TensorRT's ONNX parser cannot take (before TensorRT is imported).

    Raises:
        HimapError: for a ``kv_write='gqa'`` export (ONNX Runtime's contrib GroupQueryAttention).
    """
    if manifest.kv_write not in TENSORRT_KV_WRITES:
        raise HimapError(f"{str(export_dir)!r} was exported with --kv-write {manifest.kv_write} (ONNX Runtime's "
                         f"com.microsoft.GroupQueryAttention, which TensorRT cannot parse); re-export with "
                         f"--kv-write {' or '.join(TENSORRT_KV_WRITES)} for TensorRT")


def build_engines(export_dir: Path, engines_dir: Path, manifest, *, max_batch: int, max_seq_len: int,
                  workspace: int = 0, timing_cache: Path | None = None,
                  progress: Callable[[str, int, int], None] | None = None,
                  sign_key: Path | None = None) -> EnginesManifest:
    """Build one engine per graph of the export.

    Args:
        export_dir: the export directory; ``manifest`` is its loaded manifest.
        engines_dir: where to write the engines (replaced atomically on success).
        max_batch: most prompts per batch (profile maximum).
        max_seq_len: most tokens per sequence (profile maxima, see :mod:`himap_trt.engines.profiles`).
        workspace: builder workspace limit in bytes (0: TensorRT's default, the GPU's memory).
        timing_cache: tactic timing cache file, read and updated (default :func:`default_timing_cache`
            for this TensorRT version and GPU).
        progress: optional ``(description, step, total)`` callback.
        sign_key: EC private key (PEM): sign the engines directory (:mod:`himap_trt.signing`).

    Returns:
        The written :class:`EnginesManifest`.

    Raises:
        HimapError: without TensorRT or a GPU (saying what to install), or if a graph fails to parse
            or build (naming the graph); an existing engines directory is then left untouched.
    """
    check_buildable(manifest, export_dir)
    if sign_key is not None:
        check_private_key(sign_key, "--sign")
    trt = import_tensorrt()
    gpu_name, capability = gpu_identity()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.backend.trt import Profile as PolygraphyProfile
    from polygraphy.exception import PolygraphyException

    timing_cache = Path(timing_cache or default_timing_cache(trt.__version__, capability))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    entries = []
    total = len(manifest.graphs)
    with atomic_directory(engines_dir, marker=ENGINES_MANIFEST, flag="--engines", recognise=is_engines_manifest) as tmp:
        for step, spec in enumerate(manifest.graphs):
            if progress:
                progress(f"building {spec.name}.engine", step, total)
            profiles = graph_profiles(spec, manifest.plan, max_batch=max_batch, max_seq_len=max_seq_len)
            trt_profiles = []
            for profile in profiles:
                pg = PolygraphyProfile()
                for name, shape in profile.shapes.items():
                    pg.add(name, min=shape.min, opt=shape.opt, max=shape.max)
                trt_profiles.append(pg)
            network = NetworkFromOnnxPath(str(Path(export_dir) / spec.file), strongly_typed=True)
            # TF32 stays off (Polygraphy's default, stated here): an fp32 export is the exact path,
            # whose kept indices and tokens are compared with PyTorch; export fp16/bf16 for speed.
            config = CreateConfig(
                tf32=False,
                profiles=trt_profiles,
                memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace} if workspace else None,
                load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
            )
            try:
                engine_bytes = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(timing_cache))()
            except PolygraphyException as exc:
                raise HimapError(f"TensorRT could not build graph {spec.name!r} ({spec.file}): {exc}") from None
            engine_file = f"{spec.name}.engine"
            with open(tmp / engine_file, "wb") as handle:
                handle.write(engine_bytes)
                handle.flush()
                os.fsync(handle.fileno())
            write_point("build:engine")
            entries.append(EngineEntry(spec.name, engine_file, tuple(profiles)))
        engines = EnginesManifest(
            format_version=ENGINES_FORMAT_VERSION, package_version=__version__,
            export_fingerprint=export_fingerprint(export_dir), plan=manifest.plan, dtype=manifest.dtype,
            tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability,
            max_batch=max_batch, max_seq_len=max_seq_len, workspace_bytes=workspace, engines=tuple(entries),
            files=record_files(tmp, [entry.file for entry in entries]),
        )
        engines.save(tmp)
        write_point("build:manifest")
        if sign_key is not None:
            sign_directory(tmp, sign_key, "--sign")
    if progress:
        progress("engines complete", total, total)
    return engines
