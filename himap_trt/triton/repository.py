"""``himap-trt triton repo``: a Triton model repository serving an export (and its TensorRT engines).

Layout::

    model_repository/
      himap-repository.json        what was written, from what (Triton ignores files at the top)
      himap/                       the model: Python backend, decoupled (one response per text piece)
        config.pbtxt               = configs/<--model-config-name>.pbtxt
        configs/cpu.pbtxt          KIND_CPU instances (ONNX Runtime on CPU)
        configs/gpu.pbtxt          KIND_GPU instances (TensorRT engines, else ONNX Runtime CUDA)
        1/model.py                 imports himap_trt.triton.model (himap-trt must be installed for the stub's Python)
        1/export/                  the export, copied (hard links where the filesystem allows)
        1/engines/                 the engines, copied, if --engines was given
      himap_unary/                 one response per request (HTTP /infer clients): a BLS model that
        config.pbtxt               calls `himap` and joins its pieces; no pipeline of its own
        1/model.py

**The export is copied in, not referenced**, so the repository is relocatable: it can be moved,
mounted into a container at another path, or synced to object storage (Triton's s3:// / gs:// /
as:// repositories download the model directory; a path outside it would not exist there). Files are
hard-linked when the export is on the same filesystem (no extra disk; re-exports write new files, so
the repository keeps its own), else copied. ``model.py`` finds them relative to its version
directory. A Triton ``model.py`` is code: the repository is as trusted as the himap-trt that wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from himap_trt import __version__
from himap_trt.arch import get_architecture
from himap_trt.engines.manifest import export_fingerprint, read_engines_manifest
from himap_trt.errors import HimapError
from himap_trt.fsutil import atomic_directory, write_point
from himap_trt.manifest import load_manifest
from himap_trt.triton import protocol

REPOSITORY_MARKER = "himap-repository.json"
REPOSITORY_FORMAT_VERSION = 1
MODEL_NAME = "himap"
UNARY_MODEL_NAME = "himap_unary"
VERSION = "1"

_MODEL_PY = '''"""Triton Python-backend entry point for the `{name}` model, written by `himap-trt triton repo`
(himap-trt {version}). The implementation lives in the installed package; see {module}."""

from {module} import {cls} as TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class RepositoryOptions:
    """What ``himap-trt triton repo`` writes.

    Attributes:
        max_batch: slots of each instance's continuous-batching engine (requests decoded together).
        instances: instances of ``himap`` (per GPU for ``gpu``; in all for ``cpu``); each loads the
            pipeline once.
        default_config: which of ``cpu`` / ``gpu`` is also written as ``config.pbtxt`` (what
            ``tritonserver`` loads without ``--model-config-name``).
        default_max_tokens: new tokens when a request has no ``max_tokens`` (tokens).
        unary_instances: instances of ``himap_unary`` (each serves any number of requests at once).
        max_queue: requests waiting for a slot per instance; more are refused (UNAVAILABLE, HTTP 503).
        max_seq_len: prompt + generated tokens per request, the length of each slot's KV cache
            (decode steps attend over it); None: the export's.
    """

    max_batch: int = 8
    instances: int = 1
    default_config: str = "cpu"
    default_max_tokens: int = 32
    unary_instances: int = 1
    max_queue: int = 64
    max_seq_len: int | None = None

    def __post_init__(self):
        if self.max_batch < 1:
            raise HimapError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.instances < 1:
            raise HimapError(f"--instances must be at least 1, got {self.instances}")
        if self.default_config not in ("cpu", "gpu"):
            raise HimapError(f"--model-config-name must be cpu or gpu, got {self.default_config!r}")
        if self.default_max_tokens < 1:
            raise HimapError(f"--default-max-tokens must be at least 1, got {self.default_max_tokens}")
        if self.max_queue < 0:
            raise HimapError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise HimapError(f"--max-seq-len must be at least 2, got {self.max_seq_len}")


def _tensor_block(tensors: tuple[protocol.TensorDecl, ...]) -> str:
    lines = []
    for i, t in enumerate(tensors):
        dims = ", ".join(str(d) for d in t.dims)
        optional = " optional: true" if t.optional else ""
        comma = "," if i < len(tensors) - 1 else ""
        lines.append(f'  {{ name: "{t.name}" data_type: {t.data_type} dims: [ {dims} ]{optional} }}{comma}  # {t.doc}')
    return "[\n" + "\n".join(lines) + "\n]"


def _io_blocks() -> str:
    inputs = _tensor_block(protocol.INPUTS)
    outputs = _tensor_block(protocol.OUTPUTS)
    return f"input {inputs}\noutput {outputs}\n"


def _parameters(params: dict[str, str]) -> str:
    return "".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in params.items())


def model_config(kind: str, options: RepositoryOptions, *, backend: str) -> str:
    """``config.pbtxt`` text of the ``himap`` model for ``kind`` = ``cpu`` or ``gpu``.

    Batching: ``max_batch_size: 0`` and no Triton dynamic batcher, on purpose. Each instance runs
    himap-trt's continuous-batching engine: ``execute`` hands requests to it and returns at once,
    the engine prefills waiting requests and decodes every running one in one step, requests join
    and leave between steps. Triton's batcher could only delay requests until a batch forms. The
    engine's queue and running batch are exported as the ``himap_*`` metrics on Triton's ``/metrics``.
    """
    if kind == "cpu":
        group = (f"instance_group [ {{ count: {options.instances} kind: KIND_CPU }} ]\n"
                 "# CPU instances: ONNX Runtime on CPU. Each instance is a process with the whole pipeline; ONNX\n"
                 "# Runtime uses every core per graph, so more than one instance per machine mostly adds memory.\n")
    else:
        group = (f"instance_group [ {{ count: {options.instances} kind: KIND_GPU }} ]\n"
                 "# GPU instances: `count` per GPU (add `gpus: [ 0 ]` to pin). Each instance runs on its GPU\n"
                 "# (args model_instance_device_id): TensorRT when 1/engines/ holds engines built for this GPU\n"
                 "# and TensorRT version, else ONNX Runtime's CUDA provider (onnxruntime-gpu). Needs a GPU.\n")
    params = {
        "max_batch": str(options.max_batch),
        "max_queue": str(options.max_queue),
        "max_seq_len": str(options.max_seq_len or ""),
        "default_max_tokens": str(options.default_max_tokens),
        "backend": backend,
        "export_dir": "export",
        "engines_dir": "engines",
    }
    return (
        f'name: "{MODEL_NAME}"\n'
        'backend: "python"\n'
        "# Batching happens inside each instance (continuous batching, `max_batch` slots); see DEPLOY.md.\n"
        "max_batch_size: 0\n"
        "# Decoupled: one response per generated text piece, the last one flagged final.\n"
        "model_transaction_policy { decoupled: true }\n"
        + _io_blocks() + group
        + "# max_batch: engine slots (requests decoded together) per instance. max_queue: requests waiting\n"
          "# for a slot, more are refused (UNAVAILABLE). max_seq_len: prompt + generated tokens per request,\n"
          "# the length of each slot's KV cache (empty: the export's). default_max_tokens: when a request has\n"
          "# no max_tokens. backend: auto | onnxruntime | tensorrt (KIND_CPU instances run onnxruntime on\n"
          "# CPU). export_dir / engines_dir: relative to the version directory (1/).\n"
        + _parameters(params)
    )


def unary_model_config(options: RepositoryOptions) -> str:
    """``config.pbtxt`` of ``himap_unary``: same inputs and outputs, one response per request."""
    return (
        f'name: "{UNARY_MODEL_NAME}"\n'
        'backend: "python"\n'
        "# One response per request (HTTP /v2/models/himap_unary/infer): a BLS model that streams from\n"
        f"# `{MODEL_NAME}` and joins the pieces. It loads no pipeline; one instance serves requests concurrently.\n"
        "max_batch_size: 0\n"
        + _io_blocks()
        + f"instance_group [ {{ count: {options.unary_instances} kind: KIND_CPU }} ]\n"
        + _parameters({"stream_model": MODEL_NAME})
    )


def _link_or_copy_tree(source: Path, target: Path) -> str:
    """Hard-link every file of ``source`` into ``target`` (copy where linking fails); returns how."""
    how = "hard links"
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_symlink():
            raise HimapError(f"{path} is a symbolic link; the export to copy must hold plain files only")
        dest = target / relative
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)
            how = "copies"
        write_point("triton:file")
    return how


@dataclass(frozen=True)
class RepositoryInfo:
    """What was written (also saved as ``himap-repository.json``)."""

    format_version: int
    package_version: str
    source_model: str
    plan: str
    dtype: str
    export_fingerprint: str
    engines: bool
    files: str
    options: dict
    models: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def write_repository(export_dir: Path, out: Path, options: RepositoryOptions,
                     engines_dir: Path | None = None) -> RepositoryInfo:
    """Write the model repository for ``export_dir`` (and ``engines_dir``) to ``out``, atomically.

    Raises:
        HimapError: invalid export or engines (other export, batch above the engines' profile
            maximum), or an ``out`` that is a non-empty directory this tool did not write.
    """
    manifest = load_manifest(export_dir, families=get_architecture)
    if options.max_seq_len is not None and options.max_seq_len > manifest.max_seq_len:
        raise HimapError(f"--max-seq-len {options.max_seq_len} exceeds the export's max_seq_len {manifest.max_seq_len}")
    fingerprint = export_fingerprint(export_dir)
    if engines_dir is not None:
        engines = read_engines_manifest(engines_dir)
        if engines.export_fingerprint != fingerprint:
            raise HimapError(f"--engines {str(engines_dir)!r} were built from another export than --export-dir "
                             f"{str(export_dir)!r}; rebuild with `himap-trt build`")
        if options.max_batch > engines.max_batch:
            raise HimapError(f"--max-batch {options.max_batch} exceeds the engines' profile maximum "
                             f"{engines.max_batch}; rebuild with `himap-trt build --max-batch {options.max_batch}`")
    backend = "auto"
    with atomic_directory(out, marker=REPOSITORY_MARKER, flag="--out") as tmp:
        model = tmp / MODEL_NAME
        version = model / VERSION
        version.mkdir(parents=True)
        how = _link_or_copy_tree(Path(export_dir), version / "export")
        if engines_dir is not None:
            _link_or_copy_tree(Path(engines_dir), version / "engines")
        (model / "configs").mkdir()
        for kind in ("cpu", "gpu"):
            (model / "configs" / f"{kind}.pbtxt").write_text(model_config(kind, options, backend=backend))
        shutil.copyfile(model / "configs" / f"{options.default_config}.pbtxt", model / "config.pbtxt")
        (version / "model.py").write_text(_MODEL_PY.format(name=MODEL_NAME, version=__version__,
                                                           module="himap_trt.triton.model", cls="HimapModel"))
        unary = tmp / UNARY_MODEL_NAME
        (unary / VERSION).mkdir(parents=True)
        (unary / "config.pbtxt").write_text(unary_model_config(options))
        (unary / VERSION / "model.py").write_text(_MODEL_PY.format(name=UNARY_MODEL_NAME, version=__version__,
                                                                   module="himap_trt.triton.model",
                                                                   cls="HimapUnaryModel"))
        info = RepositoryInfo(format_version=REPOSITORY_FORMAT_VERSION, package_version=__version__,
                              source_model=manifest.source_model, plan=manifest.plan.describe(), dtype=manifest.dtype,
                              export_fingerprint=fingerprint, engines=engines_dir is not None, files=how,
                              options=asdict(options), models=[MODEL_NAME, UNARY_MODEL_NAME])
        write_point("triton:models")
        (tmp / REPOSITORY_MARKER).write_text(json.dumps(info.to_dict(), indent=1) + "\n")
        write_point("triton:marker")
    return info
