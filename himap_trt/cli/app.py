"""The ``himap-trt`` Typer app and what every command shares: the consoles, the user-error wrapper,
the progress display.

Commands live one module per command group beside this one (``cli/flops.py``, ``cli/export.py``,
...); each imports :data:`app` from here and registers itself with ``@app.command()``;
``cli/__init__.py`` imports them in the order ``--help`` lists them. No command module imports
another.

User errors (:class:`~himap_trt.errors.HimapError`) print one line on stderr and exit with
status 1, without a traceback. Heavy imports happen inside the commands so ``--help`` is quick.
"""

from __future__ import annotations

import functools
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from himap_trt.errors import HimapError
from himap_trt import __version__

app = typer.Typer(
    name="himap-trt",
    help="Deploy LLaVA-style multimodal LLMs with in-decoder image-token pruning (HiMAP, FastV): "
         "export the model as a chain of ONNX graphs, build TensorRT engines, run with per-segment KV caches.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: rich markup would swallow "[default: ...]" and keep docstrings' line breaks.
    rich_markup_mode=None,
    add_completion=False,
)
err = Console(stderr=True)
out = Console(highlight=False)


def plain(line: str) -> None:
    """Print a line as is (no rich markup: '[I]' and user text stay literal)."""
    out.print(escape(line), soft_wrap=True, highlight=False)


def user_errors(func):
    """Turn a :class:`HimapError` into a one-line message on stderr and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except HimapError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"himap-trt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Deploy LLaVA-style multimodal LLMs with in-decoder image-token pruning (HiMAP, FastV)."""


def progress_bar():
    """A rich progress display on stderr (spinner, description, bar, done/total, elapsed)."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err, transient=False)
