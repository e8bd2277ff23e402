"""Finding the ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel and setting up its Python backend.

The wheel (tested: 0.7.0, Triton 2.51) ships ``tritonserver/bin/tritonserver``, the Python backend
(``backends/python/libtriton_python.so`` and ``triton_python_backend_utils.py``) and one backend stub
per Python version (``python_backend_stubs/3.X/triton_python_backend_stub``), and the shared libraries
they need in ``nvidia_pytriton.libs``. To run a Python-backend model with *this* interpreter's
packages (torch, onnxruntime, himap_trt):

- a backend directory whose ``python/`` holds the library, the utils module and the stub for this
  Python's version (Triton looks for the stub beside the library);
- ``LD_LIBRARY_PATH`` starting with this interpreter's ``LIBDIR``, else the stub may load another
  ``libpython3.X.so`` of the same minor version (e.g. the system's) and its standard library;
- a ``python3`` first on ``PATH`` whose environment holds this one's packages: the stub runs its
  interpreter isolated (``PYTHONPATH`` is ignored) and takes ``sys.prefix`` from the ``python3`` it
  finds on ``PATH``, else it imports another environment's packages;
- **numpy < 2 in the stub's interpreter**: the 2.51 stub hands tensors to numpy through numpy 1.x's
  C ABI. Under numpy 2 every input array reads its first element repeated (strides of 0) and BYTES
  inputs fail to deserialize, which kills the stub (measured here with numpy 2.4). The project's
  environment keeps numpy 2; :func:`make_stub_environment` writes a small overlay environment whose
  ``site-packages`` puts a numpy 1.x directory (``pip install --no-deps --target
  <venv>/triton-stub-numpy "numpy<2"``, done by ``make install``) before this environment's
  packages. torch, ONNX Runtime and transformers import and run with it (they support numpy 1.x).

The wheel itself pins ``numpy<2`` for its own client code, which himap-trt does not use; it is
installed with ``pip install --no-deps`` (``make install`` does), so only its binaries are taken.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from himap_trt.errors import HimapError

#: The wheel the set-up is tested with (Triton Inference Server 2.51, NGC release 24.10).
PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"
#: The wheel is tagged manylinux_2_35: its binaries need glibc 2.35 or newer.
GLIBC_REQUIRED = (2, 35)
INSTALL_HINT = f"pip install --no-deps {PYTRITON_REQUIREMENT}"
#: Where numpy < 2 for the stub is looked for (default: ``<sys.prefix>/triton-stub-numpy``).
STUB_NUMPY_ENV = "HIMAP_TRITON_STUB_NUMPY"


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel's server, Python backend and stub for this Python are.

    Attributes:
        server: the ``tritonserver`` executable.
        python_backend: directory holding ``libtriton_python.so`` and ``triton_python_backend_utils.py``.
        stub: ``triton_python_backend_stub`` built for this interpreter's ``major.minor``.
        libs: the wheel's bundled shared libraries (``nvidia_pytriton.libs``), if present.
        version: the ``nvidia-pytriton`` version.
        python_libdir: this interpreter's ``LIBDIR`` (holds its ``libpython3.X.so``).
        stub_numpy: a directory holding numpy < 2 for the stub (see the module docstring).
    """

    server: Path
    python_backend: Path
    stub: Path
    libs: Path | None
    version: str
    python_libdir: Path
    stub_numpy: Path


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library, or None if it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def python_libdir() -> Path:
    """This interpreter's ``LIBDIR``, checked to hold its shared ``libpython``.

    Raises:
        HimapError: this Python was built without a shared libpython (the stub embeds one).
    """
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info.major}.{sys.version_info.minor}.so"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not (Path(libdir) / soname).exists():
        raise HimapError(
            f"Triton's Python backend stub embeds a shared libpython, and this Python ({sys.executable}) has none "
            f"({soname} not in LIBDIR {libdir!r}); use a Python built with --enable-shared"
        )
    return Path(libdir)


def stub_numpy_dir() -> Path:
    """The directory with numpy < 2 that the stub imports first (see the module docstring).

    Raises:
        HimapError: it is missing or holds numpy 2.
    """
    import re

    directory = Path(os.environ.get(STUB_NUMPY_ENV) or Path(sys.prefix) / "triton-stub-numpy")
    hint = f'pip install --no-deps --target {directory} "numpy<2"'
    found = sorted(directory.glob("numpy-*.dist-info"))
    if not found or not (directory / "numpy" / "__init__.py").is_file():
        raise HimapError(f"Triton's Python backend stub needs numpy<2 (it uses numpy 1.x's C ABI) and {directory} "
                         f"holds none; run `{hint}` (`make install` does), or point {STUB_NUMPY_ENV} at one")
    match = re.match(r"numpy-(\d+)\.", found[-1].name)
    if match is None or int(match.group(1)) >= 2:
        raise HimapError(f"{directory} holds {found[-1].name[:-len('.dist-info')]}, but Triton's Python backend stub "
                         f"needs numpy<2; run `{hint} --upgrade`")
    return directory


def find_triton(python_version: tuple[int, int] | None = None) -> TritonInstall:
    """Locate the wheel's ``tritonserver`` and the Python backend for this interpreter.

    The package is located without importing it (``pytriton``'s own modules need dependencies
    that ``--no-deps`` leaves out).

    Args:
        python_version: (major, minor) whose stub to find (default: this interpreter's).

    Raises:
        HimapError: one line naming what is missing: the wheel, a new enough glibc, the stub for
            this Python's version, or a shared libpython.
    """
    if not sys.platform.startswith("linux"):
        raise HimapError(f"the tritonserver in {PYTRITON_REQUIREMENT} runs on Linux only, not {sys.platform}")
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise HimapError(f"tritonserver not found: the nvidia-pytriton wheel is not installed for {sys.executable}; "
                         f"install it with `{INSTALL_HINT}` (`make install` does)")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    try:
        version = importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    glibc = glibc_version()
    if glibc is None or glibc < GLIBC_REQUIRED:
        found = "not glibc" if glibc is None else "glibc " + ".".join(map(str, glibc))
        raise HimapError(f"the tritonserver in nvidia-pytriton {version} needs glibc >= "
                         f"{'.'.join(map(str, GLIBC_REQUIRED))}; this system's C library is {found}")
    server = root / "bin" / "tritonserver"
    backend = root / "backends" / "python"
    for path in (server, backend / "libtriton_python.so", backend / "triton_python_backend_utils.py"):
        if not path.is_file():
            raise HimapError(f"the nvidia-pytriton {version} install is incomplete: {path} is missing; "
                             f"reinstall with `{INSTALL_HINT} --force-reinstall`")
    tag = "{}.{}".format(*(python_version or sys.version_info[:2]))
    stub = root / "python_backend_stubs" / tag / "triton_python_backend_stub"
    if not stub.is_file():
        shipped = sorted((p.name for p in (root / "python_backend_stubs").glob("*") if p.is_dir()),
                         key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()))
        raise HimapError(f"nvidia-pytriton {version} has no Python backend stub for Python {tag} (it ships "
                         f"{', '.join(shipped) or 'none'}); run himap-trt with one of those Python versions")
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(server=server, python_backend=backend, stub=stub, libs=libs if libs.is_dir() else None,
                         version=version, python_libdir=python_libdir(), stub_numpy=stub_numpy_dir())


def make_backend_directory(install: TritonInstall, parent: Path) -> Path:
    """Write a Triton backend directory for this Python into ``parent`` and return ``parent``.

    ``parent/python/`` gets symbolic links to the wheel's ``libtriton_python.so`` and
    ``triton_python_backend_utils.py`` and to the stub for this Python (Triton starts the stub found
    beside the backend library). Pass it as ``tritonserver --backend-directory``.
    """
    python = Path(parent) / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in (install.python_backend / "libtriton_python.so",
                   install.python_backend / "triton_python_backend_utils.py", install.stub):
        link = python / source.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return Path(parent)


def make_stub_environment(install: TritonInstall, parent: Path) -> Path:
    """Write the stub's overlay environment into ``parent`` and return its ``bin`` directory.

    A virtual environment of this interpreter (``pyvenv.cfg``, ``bin/python3``) whose
    ``site-packages`` holds one ``.pth`` file: the numpy < 2 directory first, then this environment's
    ``site-packages`` (added as a site directory, so its own ``.pth`` files, e.g. an editable
    himap-trt install, still apply). Put the returned directory first on ``PATH``.
    """
    root = Path(parent)
    base = Path(getattr(sys, "_base_executable", "") or sys.executable).resolve()
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("python3", "python"):
        link = bin_dir / name
        if not link.exists():
            link.symlink_to(base)
    version = ".".join(map(str, sys.version_info[:3]))
    (root / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\nversion = {version}\n")
    site = root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    paths = sysconfig.get_paths()
    lines = [str(install.stub_numpy)]
    for directory in dict.fromkeys((paths["purelib"], paths["platlib"])):
        lines.append(f"import site; site.addsitedir({directory!r})")
    (site / "himap-trt-triton-stub.pth").write_text("\n".join(lines) + "\n")
    return bin_dir


def server_environment(install: TritonInstall, stub_bin: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``tritonserver`` and its stubs: this Python's ``LIBDIR`` (and the wheel's
    libraries) first on ``LD_LIBRARY_PATH``; the stub environment's ``bin`` (see
    :func:`make_stub_environment`), then this environment's, first on ``PATH``."""
    env = dict(os.environ if base is None else base)
    libraries = [str(install.python_libdir)] + ([str(install.libs)] if install.libs else [])
    if env.get("LD_LIBRARY_PATH"):
        libraries.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries)
    first = [str(stub_bin), str(Path(sys.executable).parent)]
    env["PATH"] = os.pathsep.join(first + [p for p in env.get("PATH", "").split(os.pathsep) if p and p not in first])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env
