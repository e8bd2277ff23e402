"""Engine building with a progress display, shared by ``export --build`` and ``build``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from himap_trt.cli.app import out, progress_bar
from himap_trt.cli.lazy import lazy_import

# Library modules, imported when a command first uses them (himap_trt/cli/lazy.py: --help stays fast).
engine_build = lazy_import("himap_trt.engines.build")
loader = lazy_import("himap_trt.runtime.loader")


def require_tensorrt() -> None:
    """Fail (HimapError) before any work when TensorRT or a GPU is missing."""
    engine_build.import_tensorrt()
    engine_build.gpu_identity()


def build_with_progress(export_dir: Path, engines_dir: Optional[Path], manifest, *, max_batch: int, max_seq_len: int,
                   workspace: int, timing_cache: Optional[Path], sign_key: Optional[Path] = None):
    """Build engines with a progress display (TensorRT and a GPU are checked first)."""
    require_tensorrt()
    with progress_bar() as progress:
        task = progress.add_task("build", total=len(manifest.graphs))

        def report(text: str, done: int, total: int) -> None:
            progress.update(task, description=text, completed=done, total=total)

        return engine_build.build_engines(export_dir, engines_dir or loader.default_engines_dir(export_dir), manifest,
                             max_batch=max_batch, max_seq_len=max_seq_len, workspace=workspace,
                             timing_cache=timing_cache, progress=report, sign_key=sign_key)


def print_built(built) -> None:
    out.print(f"built {len(built.engines)} engines with TensorRT {built.tensorrt_version} for {built.gpu_name} "
              f"(compute capability {built.compute_capability}), batch <= {built.max_batch}, "
              f"<= {built.max_seq_len} tokens")
