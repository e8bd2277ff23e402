"""The one pattern that keeps torch, transformers, onnxruntime and tensorrt out of the command
line's start-up.

Command modules bind the library modules they call at their top, with :func:`lazy_import`::

    loader = lazy_import("himap_trt.runtime.loader")   # imported when a command first uses it

The library module (and the heavy packages it imports) is imported on the first attribute access,
that is when a command runs, not when ``himap-trt --help`` / ``--version`` / ``<command> --help``
is printed. Light modules (errors, plan, flops, fsutil, engines.compat, ...) are imported normally.
Only ``himap_trt/cli`` uses this (tests/unit/test_layers.py checks it): below the commands, imports
are plain and at the top of each module, so import-linter sees every dependency.
"""

from __future__ import annotations

import importlib
import types


class LazyModule(types.ModuleType):
    """A stand-in for module ``name`` that imports it on the first attribute access."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_lazy_module"] = None

    def __getattr__(self, attr: str):
        module = self.__dict__["_lazy_module"]
        if module is None:
            module = importlib.import_module(self.__name__)
            self.__dict__["_lazy_module"] = module
        return getattr(module, attr)


def lazy_import(name: str) -> types.ModuleType:
    """Module ``name`` (absolute, e.g. ``himap_trt.export``), imported on first use.

    Raises:
        ImportError: on first attribute access, if the module cannot be imported.
    """
    return LazyModule(name)
