"""TensorRT-RTX execution contexts from an IRuntimeConfig, and the shared runtime cache file.

No GPU here, so no engine can be deserialised: the names the backend calls are checked on the
installed tensorrt_rtx 1.7.1 module, and the CPU-side logic (config settings, one cache shared by
every engine, the file read once and written atomically, a foreign cache ignored with one warning
line, TensorRT proper untouched) runs against recording stand-ins of the engine/config/cache objects.
"""

import gc
import inspect
import logging
import os
import weakref
from types import SimpleNamespace

import pytest
import torch

from himap_trt.cli.bench import bench
from himap_trt.cli.run import run
from himap_trt.engines.flavour import RTX, TENSORRT
from himap_trt.errors import HimapError
from himap_trt.runtime import tensorrt as backend
from himap_trt.runtime.tensorrt import (DEFAULT_KERNEL_SPECIALIZATION, KERNEL_SPECIALIZATIONS, RuntimeCache,
                                        check_kernel_specialization, execution_context)


def test_every_name_the_backend_calls_exists_in_tensorrt_rtx():
    trt = pytest.importorskip("tensorrt_rtx")
    for name in ("create_runtime_config", "create_execution_context"):
        assert hasattr(trt.ICudaEngine, name), name
    for name in ("set_execution_context_allocation_strategy", "dynamic_shapes_kernel_specialization_strategy",
                 "create_runtime_cache", "set_runtime_cache"):
        assert hasattr(trt.IRuntimeConfig, name), name
    for name in ("serialize", "deserialize"):
        assert hasattr(trt.IRuntimeCache, name), name
    assert {k.upper() for k in KERNEL_SPECIALIZATIONS} == set(trt.DynamicShapesKernelSpecializationStrategy.__members__)
    assert hasattr(trt.ExecutionContextAllocationStrategy, "USER_MANAGED")
    # the IRuntimeConfig overload of create_execution_context is the one the backend relies on
    assert "runtime_config" in trt.ICudaEngine.create_execution_context.__doc__


class FakeCache:
    def __init__(self, accepts=True, content=b""):
        self.accepts, self.content, self.deserialized = accepts, content, []

    def deserialize(self, blob):
        self.deserialized.append(bytes(blob))
        if self.accepts:
            self.content = bytes(blob)
        return self.accepts

    def serialize(self):
        return memoryview(self.content + b"+compiled")


class FakeConfig:
    def __init__(self, made):
        self.made, self.strategy, self.cache = made, None, None
        self.dynamic_shapes_kernel_specialization_strategy = "unset"

    def set_execution_context_allocation_strategy(self, strategy):
        self.strategy = strategy

    def create_runtime_cache(self):
        cache = FakeCache(**self.made["cache_args"])
        self.made["caches"].append(cache)
        return cache

    def set_runtime_cache(self, cache):
        self.cache = cache
        return True


class FakeEngine:
    def __init__(self, made):
        self.made, self.contexts = made, []

    def create_runtime_config(self):
        config = FakeConfig(self.made)
        self.made["configs"].append(config)
        return config

    def create_execution_context(self, argument):
        self.contexts.append(argument)
        return ("context", argument)


FAKE_TRT = SimpleNamespace(
    ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="USER_MANAGED"),
    DynamicShapesKernelSpecializationStrategy=SimpleNamespace(LAZY="S-LAZY", EAGER="S-EAGER", NONE="S-NONE"))


def made(accepts=True):
    return {"configs": [], "caches": [], "cache_args": {"accepts": accepts}}


@pytest.mark.parametrize("choice", KERNEL_SPECIALIZATIONS)
def test_rtx_contexts_come_from_a_runtime_config_sharing_one_cache(tmp_path, choice):
    record = made()
    (tmp_path / "runtime.rtxcache").write_bytes(b"earlier")
    cache = RuntimeCache(tmp_path / "runtime.rtxcache")
    engines = [FakeEngine(record), FakeEngine(record)]
    for engine in engines:
        for _ in range(2):                                   # two profiles each
            execution_context(engine, FAKE_TRT, rtx=True, kernel_specialization=choice, cache=cache)
    assert len(record["configs"]) == 4 and len(record["caches"]) == 1       # one cache for every engine
    assert all(c.cache is record["caches"][0] for c in record["configs"])
    assert all(c.strategy == "USER_MANAGED" for c in record["configs"])
    assert {c.dynamic_shapes_kernel_specialization_strategy for c in record["configs"]} == {f"S-{choice.upper()}"}
    assert [ctx for e in engines for ctx in e.contexts] == record["configs"]   # contexts made from the configs
    assert record["caches"][0].deserialized == [b"earlier"] and cache.loaded   # the file is read once


def test_tensorrt_proper_gets_no_runtime_config():
    record = made()
    engine = FakeEngine(record)
    assert execution_context(engine, FAKE_TRT, rtx=False, kernel_specialization="eager",
                             cache=RuntimeCache(None)) == ("context", "USER_MANAGED")
    assert record["configs"] == []


def test_save_is_atomic_and_a_foreign_cache_is_ignored_with_one_warning(tmp_path, caplog):
    path = tmp_path / "runtime.rtxcache"
    path.write_bytes(b"from another GPU")
    record = made(accepts=False)
    cache = RuntimeCache(path)
    with caplog.at_level(logging.WARNING, logger=backend.__name__):
        execution_context(FakeEngine(record), FAKE_TRT, rtx=True, kernel_specialization="eager", cache=cache)
    assert not cache.loaded
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "another GPU" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()
    assert cache.save() == len(b"+compiled") and path.read_bytes() == b"+compiled"
    assert sorted(os.listdir(tmp_path)) == ["runtime.rtxcache"]               # no temporary left behind


def test_an_unwritable_directory_warns_and_saves_nothing(tmp_path, caplog):
    cache = RuntimeCache(tmp_path / "missing-dir" / "runtime.rtxcache")
    execution_context(FakeEngine(made()), FAKE_TRT, rtx=True, kernel_specialization="lazy", cache=cache)
    with caplog.at_level(logging.WARNING, logger=backend.__name__):
        assert cache.save() == 0
    assert "cannot be written" in caplog.text and not (tmp_path / "missing-dir").exists()


def test_bad_value_is_one_line_and_the_cli_defaults_are_the_documented_ones():
    with pytest.raises(HimapError, match=r"^--kernel-specialization must be one of lazy, eager, none, got 'fast'$"):
        check_kernel_specialization("fast")
    assert inspect.signature(run).parameters["kernel_specialization"].default == DEFAULT_KERNEL_SPECIALIZATION
    assert inspect.signature(bench).parameters["kernel_specialization"].default == "eager"


def test_shared_resources_save_once_when_the_last_engine_closes_and_are_not_kept_alive(tmp_path, monkeypatch):
    real_empty = torch.empty
    monkeypatch.setattr(torch.cuda, "Stream", lambda: SimpleNamespace(cuda_stream=0))   # no GPU here
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: real_empty(*a, **k))
    logger = lambda level: "logger"  # noqa: E731
    logger.WARNING = 2
    trt = SimpleNamespace(**vars(FAKE_TRT), Logger=logger, Runtime=lambda logger: "runtime")
    path = tmp_path / "runtime.rtxcache"
    shared = backend.SharedResources(trt, RTX, kernel_specialization="eager", runtime_cache=path)
    record = made()
    for _ in range(2):                       # two engines, one context each
        shared.acquire()
        shared.context(FakeEngine(record))
    assert record["configs"][0].dynamic_shapes_kernel_specialization_strategy == "S-EAGER"
    shared.release()
    assert not path.exists()                 # one engine still open
    shared.release()
    assert path.read_bytes() == b"+compiled"
    reference = weakref.ref(shared)
    del shared
    gc.collect()
    assert reference() is None               # the exit hook holds it weakly
    plain = backend.SharedResources(trt, TENSORRT, kernel_specialization="eager", runtime_cache=tmp_path / "x")
    assert plain.cache is None and plain.context(FakeEngine(made())) == ("context", "USER_MANAGED")
    with pytest.raises(HimapError, match="--kernel-specialization"):
        backend.SharedResources(trt, RTX, kernel_specialization="EAGER")
