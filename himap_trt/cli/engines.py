"""Engine building with a progress display, shared by ``export --build`` and ``build``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from himap_trt.cli.app import out, progress_bar
from himap_trt.cli.lazy import lazy_import
from himap_trt.engines.flavour import flavour_of, has_fp32_gemms
from himap_trt.fsutil import check_target, output_lock

# Library modules, imported when a command first uses them (himap_trt/cli/lazy.py: --help stays fast).
engine_build = lazy_import("himap_trt.engines.build")
engine_manifest = lazy_import("himap_trt.engines.manifest")
loader = lazy_import("himap_trt.runtime.loader")


def require_tensorrt(tensorrt: str = "auto", compute_capability: Optional[str] = None, fp32_gemms: bool = True):
    """The build target (flavour, capabilities), checked before any work (see engines.build.resolve_target)."""
    return engine_build.resolve_target(tensorrt, compute_capability, fp32_gemms=fp32_gemms)


def build_with_progress(export_dir: Path, engines_dir: Optional[Path], manifest, *, max_batch: int, max_seq_len: int,
                   workspace: int, timing_cache: Optional[Path], target=None, sign_key: Optional[Path] = None,
                   profiles: str = "auto", chunk_weight_bytes: Optional[int] = None):
    """Build engines with a progress display (the flavour and its targets are checked first)."""
    target = target or require_tensorrt(fp32_gemms=has_fp32_gemms(manifest.dtype, manifest.plan))
    engines_dir = engines_dir or loader.default_engines_dir(export_dir)
    # a foreign or busy --engines is refused in one line before the progress display starts (the lock
    # is re-entrant: build_engines' atomic_directory takes it again)
    check_target(engines_dir, marker=engine_manifest.ENGINES_MANIFEST, flag="--engines",
                 recognise=engine_manifest.is_engines_manifest)
    with output_lock(engines_dir, flag="--engines"), progress_bar() as progress:
        task = progress.add_task("build", total=len(manifest.graphs))

        def report(text: str, done: int, total: int) -> None:
            progress.update(task, description=text, completed=done, total=total)

        return engine_build.build_engines(export_dir, engines_dir, manifest,
                             max_batch=max_batch, max_seq_len=max_seq_len, workspace=workspace,
                             timing_cache=timing_cache, target=target, progress=report, sign_key=sign_key,
                             profiles=profiles, **({} if chunk_weight_bytes is None else
                                                   {"chunk_weight_bytes": chunk_weight_bytes}))


def _mb(count: int) -> str:
    return f"{count / 1e6:,.1f} MB"


def print_built(built) -> None:
    """The build's summary: targets and limits, then per engine its bytes beside its graph's weight
    bytes, the totals (all engines, segments), and the build's peak RSS."""
    out.print(f"built {len(built.engines)} engines with {flavour_of(built.tensorrt_flavour).display} "
              f"{built.tensorrt_version} for {engine_manifest.targets(built)}, batch <= {built.max_batch}, "
              f"<= {built.max_seq_len} tokens, {built.profile_form} profiles")
    for entry in built.engines:
        if entry.engine_bytes is None or entry.weight_bytes is None:
            continue
        # a scoring graph's few KB of constants: its engine is kernels, a ratio would mean nothing
        ratio = f"{entry.ratio:.3f}x" if entry.ratio is not None and entry.weight_bytes >= 100_000 else "kernels only"
        chunks = f" in {len(entry.parts)} layer chunks" if entry.parts else ""
        name = f"{entry.graph}.part*.engine" if entry.parts else entry.file
        out.print(f"  {name}: {_mb(entry.engine_bytes)} engine{chunks}, {_mb(entry.weight_bytes)} weights ({ratio}), "
                  f"{entry.build_seconds:.1f} s")
    for label, kind in (("segments", "segment"), ("all engines", None)):
        totals = built.size_totals(kind)
        if totals and totals[1]:
            out.print(f"{label}: {_mb(totals[0])} engines for {_mb(totals[1])} of weights ({totals[0] / totals[1]:.3f}x)")
    if built.build_peak_rss_bytes is not None:
        out.print(f"peak RSS of the build: {built.build_peak_rss_bytes / 2**30:.2f} GiB")
