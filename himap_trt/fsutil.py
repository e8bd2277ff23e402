"""Atomic output directories: an export or build is written beside its target and swapped in only
when complete, so a failed or killed run never damages an existing good one."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from himap_trt.errors import HimapError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(parent: Path, name: str) -> None:
    """Delete partial directories left by runs that were killed (their process is gone)."""
    for stale in parent.glob(f".{name}.partial-*"):
        try:
            pid = int(stale.name.split("-")[-2])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


def check_target(target: Path, *, marker: str, flag: str) -> Path:
    """Refuse a ``target`` that :func:`atomic_directory` must not replace; returns it absolute.

    Raises:
        HimapError: if ``target`` is a file, or a non-empty directory without ``marker``.
    """
    target = Path(target).absolute()
    if target.exists():
        if not target.is_dir():
            raise HimapError(f"{flag} {str(target)!r} exists and is not a directory")
        if any(target.iterdir()) and not (target / marker).is_file():
            raise HimapError(
                f"{flag} {str(target)!r} is a non-empty directory that himap-trt did not write (no {marker}); "
                "choose another path or empty it"
            )
    return target


@contextmanager
def atomic_directory(target: Path, *, marker: str, flag: str) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; on success replace ``target`` by it.

    On an exception (or if the process is killed) ``target`` is left as it was; the temporary
    directory is removed (or, after a kill, by the next run).

    Args:
        target: the directory to write.
        marker: a file name that identifies a directory this tool wrote (e.g. ``manifest.json``);
            an existing non-empty ``target`` without it is never replaced.
        flag: the CLI flag naming ``target``, for error messages.

    Raises:
        HimapError: if ``target`` is a file, or a non-empty directory this tool did not write.
    """
    target = check_target(target, marker=marker, flag=flag)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(parent, target.name)
    tmp = parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        backup = parent / f".{target.name}.previous-{os.getpid()}-{secrets.token_hex(4)}"
        target.rename(backup)
        tmp.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(target)
