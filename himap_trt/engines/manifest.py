"""``engines/manifest.json``: which engines were built from which export, with what.

(Filled in by ``himap-trt build``; see :mod:`himap_trt.engines.build`.)
"""

from __future__ import annotations

from pathlib import Path

ENGINES_MANIFEST = "manifest.json"


def engines_present(directory: Path) -> bool:
    """Whether ``directory`` holds an engines manifest."""
    return (Path(directory) / ENGINES_MANIFEST).is_file()
