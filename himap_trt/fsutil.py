"""Atomic output directories: an export or build is written beside its target and swapped in only
when complete, so a failed or killed run never damages an existing good one.

Layout beside ``--out DIR`` (all removed by the next run that writes ``DIR``):

- ``.DIR.lock``: the lock file (``flock``); a second writer of ``DIR`` fails fast while it is held.
- ``.DIR.partial-<pid>-<token>``: the directory being written; after the swap, the old ``DIR``.

The swap is one ``renameat2(RENAME_EXCHANGE)`` of the partial directory and ``DIR`` (Linux >= 3.15
on ext4, xfs, btrfs, tmpfs, overlayfs), so ``DIR`` always holds the old or the new export, whatever
moment the process is killed at. Where the kernel or file system cannot exchange, two renames are
used (``DIR`` -> ``.DIR.previous-*``, partial -> ``DIR``) and the next run restores a
``.DIR.previous-*`` it finds without ``DIR``.

Before the swap every file and directory of the new tree is ``fsync``-ed, and the parent after it,
so after a power loss ``DIR`` names the old or the complete new tree, never files the kernel had
not yet written. :func:`write_point` marks each step of a write sequence for crash tests
(:data:`KILL_ENV`, test-only).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from himap_trt.errors import HimapError

_HELD: dict[str, int] = {}   # lock files held by this process: target -> fd


#: **Test-only** environment variable: ``N`` (a positive integer) makes the process SIGKILL itself at
#: the N-th :func:`write_point` it passes (after the N-th file, or group of files, an export, build or
#: repository writes; and at the steps of the swap), so crash-consistency tests can kill a writer at
#: every step of its write sequence. With any value every point passed is announced on stderr as
#: ``write point <n>: <name>``. Never set it outside tests: the process dies on purpose.
KILL_ENV = "HIMAP_TRT_TEST_KILL_AFTER"
#: **Test-only**: when set to ``1``, the process stops itself (``SIGSTOP``) at every :func:`write_point`
#: after announcing it, so a test can inspect the target directory at each step and resume it
#: (``SIGCONT``) or kill it there: the disk at a stop is exactly what a kill at that moment leaves.
STOP_ENV = "HIMAP_TRT_TEST_STOP_AT_POINTS"

_POINTS = 0   # write points passed by this process


def write_point(name: str) -> None:
    """Mark a step of a write sequence: a test hook (:data:`KILL_ENV`, :data:`STOP_ENV`); a no-op otherwise.

    Raises:
        HimapError: if :data:`KILL_ENV` is set but not a positive integer.
    """
    global _POINTS
    kill_at = kill_after()
    stop = stop_at_points()
    if kill_at is None and not stop:
        return
    _POINTS += 1
    print(f"write point {_POINTS}: {name}", file=sys.stderr, flush=True)
    if _POINTS == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if stop:
        os.kill(os.getpid(), signal.SIGSTOP)


def stop_at_points() -> bool:
    """Whether :data:`STOP_ENV` is ``1``.

    Raises:
        HimapError: if it is set to anything but ``0`` or ``1``.
    """
    value = os.environ.get(STOP_ENV)
    if value not in (None, "0", "1"):
        raise HimapError(f"{STOP_ENV} (a test-only hook) must be 0 or 1, got {value!r}")
    return value == "1"


def kill_after() -> int | None:
    """The value of :data:`KILL_ENV` (None when unset).

    Raises:
        HimapError: if it is set but not a positive integer (checked before anything is written).
    """
    value = os.environ.get(KILL_ENV)
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise HimapError(f"{KILL_ENV} (a test-only hook) must be a positive integer, got {value!r}")
    return int(value)


def fsync_directory(path: Path) -> None:
    """``fsync`` a directory, so the names created or renamed in it are durable (best effort where the
    file system cannot sync directories)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """``fsync`` every regular file below ``root``, then every directory (deepest first), then ``root``:
    what :func:`atomic_directory` does before the rename that publishes a directory, so a power loss
    after the rename cannot leave the new name pointing at empty or partly written files."""
    directories = []
    for dirpath, _, filenames in os.walk(root):
        directories.append(Path(dirpath))
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for directory in reversed(directories):
        fsync_directory(directory)


def _os_error(flag: str, target: Path, exc: OSError) -> HimapError:
    reason = exc.strerror or type(exc).__name__
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = f"permission denied ({reason})"
    where = f" ({exc.filename!r})" if exc.filename and str(exc.filename) != str(target) else ""
    return HimapError(f"{flag} {str(target)!r} cannot be written: {reason}{where}")


def _check_parent(target: Path, flag: str) -> None:
    """Refuse a target whose nearest existing ancestor is not a writable directory."""
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():  # dangling link
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise HimapError(f"{flag} {str(target)!r} cannot be created: {str(ancestor)!r} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise HimapError(f"{flag} {str(target)!r} cannot be created: permission denied in {str(ancestor)!r}")


def check_target(target: Path, *, marker: str, flag: str,
                 recognise: Callable[[object], bool] | None = None) -> Path:
    """Refuse a ``target`` that :func:`atomic_directory` must not replace; returns it absolute.

    Args:
        target: the output directory.
        marker: the file that identifies a directory this tool wrote (e.g. ``manifest.json``).
        flag: the CLI flag, for messages.
        recognise: ``(parsed marker JSON) -> bool``; when given, ``marker`` must also parse as ours.

    Raises:
        HimapError: if ``target`` is a file, a non-empty directory without a ``marker`` of ours, lies
            inside another artefact directory (:func:`check_outside_artefacts`), or cannot be created
            (its parent is a file, or not writable).
    """
    target = Path(target).absolute()
    check_outside_artefacts(target, flag)
    if target.exists():
        if not target.is_dir():
            raise HimapError(f"{flag} {str(target)!r} exists and is not a directory")
        try:
            empty = not any(target.iterdir())
        except OSError as exc:
            raise _os_error(flag, target, exc) from None
        if not empty:
            foreign = HimapError(
                f"{flag} {str(target)!r} is a non-empty directory that himap-trt did not write (no {marker} of "
                "ours); choose another path or empty it")
            if not (target / marker).is_file():
                raise foreign
            if recognise is not None:
                try:
                    data = json.loads((target / marker).read_bytes())
                except (OSError, ValueError):
                    raise foreign from None
                if not recognise(data):
                    raise foreign
    else:
        _check_parent(target, flag)
    return target


#: The marker files of the directories himap-trt writes: an export's or an engines directory's
#: ``manifest.json`` (told apart by their fields), a Triton repository's ``himap-repository.json``
#: (the names of :mod:`himap_trt.manifest`, :mod:`himap_trt.engines.manifest` and
#: :mod:`himap_trt.triton.repository`, which sit above this module; a test checks they agree).
ARTEFACT_MARKERS = ("manifest.json", "himap-repository.json")
_MARKER_READ_LIMIT = 64 * 2**20


def artefact_kind(directory: Path) -> str | None:
    """What himap-trt artefact ``directory`` is, from its marker file: ``"an export"``, ``"an engines
    directory"``, ``"a Triton model repository"``, or None (none of ours, or unreadable). Reads at
    most 64 MiB of a marker."""
    for marker in ARTEFACT_MARKERS:
        path = Path(directory) / marker
        try:
            if not path.is_file():
                continue
            with open(path, "rb") as handle:
                data = json.loads(handle.read(_MARKER_READ_LIMIT + 1)[:_MARKER_READ_LIMIT])
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("format_version"), int):
            continue
        if marker == "himap-repository.json":
            return "a Triton model repository"
        if isinstance(data.get("engines"), list):
            return "an engines directory"
        if isinstance(data.get("graphs"), list):
            return "an export"
    return None


def check_outside_artefacts(target: Path, flag: str) -> None:
    """Refuse an output directory inside an export, engines directory or Triton repository (any
    ancestor, by its path as given and with symlinks resolved): files added there break that
    artefact's file list and signature (``--require-signature`` refuses it as changed).

    Raises:
        HimapError: naming the flag, the enclosing directory and what it is.
    """
    target = Path(target).absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    resolved = existing.resolve() / target.relative_to(existing)
    for candidate in (target, resolved):
        for ancestor in candidate.parents:
            kind = artefact_kind(ancestor)
            if kind is not None:
                raise HimapError(f"{flag} {str(target)!r} lies inside {str(ancestor)!r}, which is {kind} written by "
                                 "himap-trt; write it beside that directory, not inside it (files added to it break "
                                 "its manifest and signature)")


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextmanager
def output_lock(target: Path, *, flag: str) -> Iterator[None]:
    """Hold the lock of an output directory (re-entrant within a process).

    The lock is an ``flock`` on ``.<name>.lock`` beside ``target``: the kernel releases it when the
    holder dies, and the file is removed when the lock is released.

    Raises:
        HimapError: if another process holds it (naming its pid), or the lock file cannot be created.
    """
    target = Path(target).absolute()
    key = str(target)
    if key in _HELD:
        yield
        return
    path = _lock_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise HimapError(f"{flag} {str(target)!r} is being written by another himap-trt process (pid {holder}); "
                                 f"wait for it to finish or choose another {flag}") from None
            try:  # the file may have been removed by the previous holder between open and flock
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError as exc:
        raise _os_error(flag, target, exc) from None
    _HELD[key] = fd
    try:
        yield
    finally:
        del _HELD[key]
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b`` (``renameat2(RENAME_EXCHANGE)``).

    Returns:
        False if the kernel, C library or file system cannot exchange (nothing was changed).

    Raises:
        OSError: any other failure.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _clean_leftovers(target: Path) -> None:
    """Under the lock: restore a ``.previous-*`` whose swap was cut short, remove partial directories."""
    parent = target.parent
    previous = sorted(parent.glob(f".{target.name}.previous-*"))
    if previous and not os.path.lexists(target):
        previous.pop().rename(target)
    for stale in [*previous, *parent.glob(f".{target.name}.partial-*")]:
        _remove(stale)


@contextmanager
def atomic_directory(target: Path, *, marker: str, flag: str,
                     recognise: Callable[[object], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; on success swap it in for ``target``.

    The target's lock (:func:`output_lock`) is held throughout. On an exception ``target`` is left
    as it was and the temporary directory is removed; after a kill, ``target`` holds the old or the
    new directory and the next run removes what is left (see the module docstring).

    Args:
        target: the directory to write.
        marker: a file name that identifies a directory this tool wrote (e.g. ``manifest.json``);
            an existing non-empty ``target`` without it is never replaced.
        flag: the CLI flag naming ``target``, for error messages.
        recognise: see :func:`check_target`.

    Raises:
        HimapError: if ``target`` must not be replaced (see :func:`check_target`), another process
            writes it, or it cannot be written.
    """
    kill_after()
    stop_at_points()
    target = check_target(target, marker=marker, flag=flag, recognise=recognise)
    with output_lock(target, flag=flag):
        parent = target.parent
        try:
            _clean_leftovers(target)
            tmp = parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
            tmp.mkdir()
        except OSError as exc:
            raise _os_error(flag, target, exc) from None
        try:
            yield tmp
        except BaseException:
            _remove(tmp)
            raise
        try:
            fsync_tree(tmp)  # every byte on disk before the new name can point at it
            write_point("swap:before")
            if not os.path.lexists(target):
                tmp.rename(target)
                fsync_directory(parent)
            elif exchange(tmp, target):
                fsync_directory(parent)
                write_point("swap:exchanged")
                _remove(tmp)  # now the old directory
            else:
                backup = parent / f".{target.name}.previous-{os.getpid()}-{secrets.token_hex(4)}"
                target.rename(backup)
                write_point("swap:renamed-old")
                tmp.rename(target)
                fsync_directory(parent)
                _remove(backup)
            write_point("swap:done")
        except OSError as exc:
            if os.path.lexists(tmp):
                _remove(tmp)
            _clean_leftovers(target)  # puts back a .previous-* if the two-rename swap failed halfway
            raise _os_error(flag, target, exc) from None


def cache_root() -> Path:
    """The project's cache directory (built-in models, timing caches, file digests): ``$HIMAP_TRT_CACHE`` or ``~/.cache/himap-trt``."""
    env = os.environ.get("HIMAP_TRT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "himap-trt"
