"""The ``himap-trt`` command line: a thin layer over the library, one module per command group.

``app.py`` holds the Typer app, the consoles and the user-error wrapper; every other module
registers its commands on that app when imported (``@app.command()``). The imports below are what
puts the commands on the app, in the order ``himap-trt --help`` lists them; no command module
imports another.
"""

from __future__ import annotations

from himap_trt.cli.app import app

# Registration, in --help order (one statement per line so that sorting imports cannot reorder them).
from himap_trt.cli import flops  # noqa: E402,F401,I001
from himap_trt.cli import export  # noqa: E402,F401
from himap_trt.cli import run  # noqa: E402,F401
from himap_trt.cli import build  # noqa: E402,F401
from himap_trt.cli import check  # noqa: E402,F401
from himap_trt.cli import bench  # noqa: E402,F401
from himap_trt.cli import analyze  # noqa: E402,F401
from himap_trt.cli import serve  # noqa: E402,F401
from himap_trt.cli import triton  # noqa: E402,F401
from himap_trt.cli import eval  # noqa: E402,F401,A004


def main() -> None:  # pragma: no cover - the console-script entry point
    app()


__all__ = ["app", "main"]
