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
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from himap_trt.errors import HimapError
from himap_trt import __version__, fsutil
from himap_trt.cli.lazy import lazy_import

engine = lazy_import("himap_trt.runtime.engine")   # only when HIMAP_TRT_TEST_FAULT is set

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


def print_table(table, console: Console | None = None) -> None:
    """Print a rich ``table`` on ``console`` (default :data:`out`); when the console is not a terminal
    (piped, redirected, a script capturing it) at the table's natural width, so that no cell is
    wrapped or cut to rich's 80-column default."""
    from rich.measure import Measurement

    console = console or out
    if not console.is_terminal:
        console.width = max(console.width, Measurement.get(console, console.options.update_width(10_000), table).maximum)
    console.print(table)


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
    warn_test_hooks()


#: The test-only environment hooks and what each does when set (a warning line names them at start-up).
TEST_HOOKS = {
    "HIMAP_TRT_TEST_KILL_AFTER": "the process SIGKILLs itself at its N-th write point",
    "HIMAP_TRT_TEST_STOP_AT_POINTS": "the process SIGSTOPs itself at every write point",
    "HIMAP_TRT_TEST_FAULT": "faults are injected into the engine's backend calls",
}


def warn_test_hooks() -> None:
    """One ``warning:`` line on stderr for each ``HIMAP_TRT_TEST_*`` variable set: a known test hook
    with a valid value (a malformed one is the command's one-line error instead), or an unknown name
    (ignored). Set in production, a hook kills, stops or fails the process on purpose."""
    checks = {"HIMAP_TRT_TEST_KILL_AFTER": fsutil.kill_after, "HIMAP_TRT_TEST_STOP_AT_POINTS": fsutil.stop_at_points,
              "HIMAP_TRT_TEST_FAULT": lambda: engine.FaultPlan(os.environ["HIMAP_TRT_TEST_FAULT"])}
    for name in sorted(n for n in os.environ if n.startswith("HIMAP_TRT_TEST_")):
        value = os.environ[name]
        if name not in TEST_HOOKS:
            print(f"warning: {name} is set, but it is not one of himap-trt's test hooks "
                  f"({', '.join(TEST_HOOKS)}); ignored", file=sys.stderr, flush=True)
            continue
        try:
            active = checks[name]()
        except HimapError:
            continue                        # the command refuses the malformed value in one line
        if active is False or (name == "HIMAP_TRT_TEST_FAULT" and not active.faults):
            continue
        print(f"warning: {name}={value!r} is set: a test-only hook ({TEST_HOOKS[name]}); unset it outside tests",
              file=sys.stderr, flush=True)


def progress_bar():
    """A rich progress display on stderr (spinner, description, bar, done/total, elapsed)."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err, transient=False)
