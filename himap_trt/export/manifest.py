"""``manifest.json``: what an export directory holds, as frozen dataclasses <-> JSON.

The manifest is the contract between ``export``, ``build`` and ``run``: the plan, the model it was
exported from (id and content hash), dtype, opset, and for every graph its file, layer range and
input/output specs (name, dtype, symbolic shape). See ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from himap_trt.errors import HimapError
from himap_trt.graphs.spec import GraphSpec
from himap_trt.models.loading import ModelDims
from himap_trt.plan import PruningPlan

#: Bump on any incompatible change of the manifest or the graph I/O contract.
#: 2: segment graphs take preallocated KV-cache buffers and ``cache_position`` (written in place).
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
PROCESSOR_DIR = "processor"


@dataclass(frozen=True)
class Manifest:
    """An export directory's description.

    Attributes:
        format_version: :data:`FORMAT_VERSION` of the writer.
        package_version: himap-trt version that wrote it.
        source_model: the ``--model`` value exported.
        model_hash: ``blake2b-128:<hex>`` of the model config and every weight tensor.
        plan: the pruning plan the graphs implement.
        dtype: floating dtype of the graphs (``float32``, ``float16``, ``bfloat16``).
        opset: ONNX opset of every graph.
        max_seq_len: most tokens (prompt + generated) per sequence the export is meant for.
        dims: the model's dimensions.
        image_token_id / eos_token_ids / pad_token_id: token ids the runtime needs.
        graphs: every graph in chain order, with its file.
        processor_dir: subdirectory holding the saved processor (tokenizer, image processor, template).
        validation: per graph and phase, the max abs difference found against PyTorch (empty if skipped).
        kv_write: how segment graphs write their caches: ``scatternd`` (opset ``opset``) or
            ``tensorscatter`` (segment graphs at opset 24); see :mod:`himap_trt.export.compose`.
    """

    format_version: int
    package_version: str
    source_model: str
    model_hash: str
    plan: PruningPlan
    dtype: str
    opset: int
    max_seq_len: int
    dims: ModelDims
    image_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    graphs: tuple[GraphSpec, ...]
    processor_dir: str = PROCESSOR_DIR
    validation: dict[str, Any] = field(default_factory=dict)
    kv_write: str = "scatternd"

    def graph(self, name: str) -> GraphSpec:
        """The graph called ``name``; raises :class:`HimapError` if the export has none."""
        for spec in self.graphs:
            if spec.name == name:
                return spec
        raise HimapError(f"the manifest has no graph {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Parse and validate.

        Raises:
            HimapError: on a missing field or an invalid plan.
        """
        try:
            return cls(
                format_version=int(data["format_version"]),
                package_version=str(data["package_version"]),
                source_model=str(data["source_model"]),
                model_hash=str(data["model_hash"]),
                plan=PruningPlan.from_dict(data["plan"]),
                dtype=str(data["dtype"]),
                opset=int(data["opset"]),
                max_seq_len=int(data["max_seq_len"]),
                dims=ModelDims(**data["dims"]),
                image_token_id=int(data["image_token_id"]),
                eos_token_ids=tuple(int(t) for t in data["eos_token_ids"]),
                pad_token_id=int(data["pad_token_id"]),
                graphs=tuple(GraphSpec.from_dict(g) for g in data["graphs"]),
                processor_dir=str(data.get("processor_dir", PROCESSOR_DIR)),
                validation=dict(data.get("validation") or {}),
                kv_write=str(data.get("kv_write", "scatternd")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HimapError(f"malformed manifest: {type(exc).__name__}: {exc}") from None

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def read_versioned_json(path: Path, version: int, what: str, remedy: str) -> dict[str, Any]:
    """Read a manifest file that must be a JSON object with ``format_version == version``.

    Raises:
        HimapError: unreadable file or JSON, not an object, or another format version (the message
            names ``what`` and the ``remedy``).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HimapError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise HimapError(f"{str(path)!r} is not a himap-trt {what} (expected a JSON object)")
    found = data.get("format_version")
    if found != version:
        raise HimapError(f"{str(path)!r} has {what} format version {found!r}, this himap-trt reads version "
                         f"{version}; {remedy}")
    return data


def load_manifest(directory: str | Path, flag: str = "--export-dir") -> Manifest:
    """Read and check an export directory's manifest.

    Raises:
        HimapError: missing directory or manifest, unreadable JSON, another format version, or a
            graph file listed but missing.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise HimapError(f"{flag} {str(directory)!r} does not exist; create it with `himap-trt export`")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise HimapError(f"{flag} {str(directory)!r} holds no {MANIFEST_NAME}; it is not a himap-trt export")
    data = read_versioned_json(path, FORMAT_VERSION, "manifest", "re-export with this version")
    manifest = Manifest.from_dict(data)
    for spec in manifest.graphs:
        if not spec.file or not (directory / spec.file).is_file():
            raise HimapError(f"graph {spec.name!r}: file {spec.file!r} listed in {str(path)!r} is missing")
    return manifest


def model_hash(model: Any) -> str:
    """``blake2b-128:<hex>`` over the model's config (JSON, sorted keys) and every parameter and
    buffer (name, dtype, shape, bytes), in name order. Identifies the exported weights whatever
    the file layout they were loaded from.
    """
    import torch

    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return f"blake2b-128:{digest.hexdigest()}"
