"""``manifest.json``: what an export directory holds, as frozen dataclasses <-> JSON.

The manifest is the contract between ``export``, ``build`` and ``run``: the plan, the model it was
exported from (id and content hash), dtype, opset, and for every graph its file, layer range and
input/output specs (name, dtype, symbolic shape). See ``docs/ARCHITECTURE.md``.

It sits below both sides of that contract (the layers in docs/ARCHITECTURE.md): ``export``
writes it, ``runtime``, ``engines``, ``triton`` and ``check`` read it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

from himap_trt.confine import check_onnx_external_data, confined_path, files_under, parse_file_records, verify_files
from himap_trt.dims import ModelDims
from himap_trt.errors import HimapError
from himap_trt.fsutil import artefact_kind
from himap_trt.graphs.spec import GraphSpec, graph_specs, segment_cache_lengths, static_cache_specs
from himap_trt.plan import PruningPlan

#: Bump on any incompatible change of the manifest or the graph I/O contract. Version 2 records every
#: file's size and sha256 (``files``), and its segment graphs take preallocated KV-cache buffers and
#: ``cache_position`` (written in place); version-1 exports are refused with a request to re-export.
FORMAT_VERSION = 2
#: How segment graphs write their KV caches (the export's ``--kv-write``; see export/compose.py).
#: ``gqa``: ONNX Runtime's ``com.microsoft.GroupQueryAttention`` writes and attends (ONNX Runtime only).
#: ``attention``: opset-24 ``TensorScatter`` into static-length slot caches + one ``Attention`` node per
#: layer (grouped-query heads, ``nonpad_kv_seqlen``): TensorRT's KV-cache-update and attention layers.
KV_WRITES = ("scatternd", "tensorscatter", "gqa", "attention")
#: The ``kv_write`` forms TensorRT's ONNX parser takes (``gqa`` is an ONNX Runtime contrib operator;
#: ``tensorscatter``'s TensorScatter needs a static cache length in TensorRT's KV-cache update layer,
#: which the exported segments' dynamic ``cache_sequence`` is not: the real parser rejects every
#: segment, see docs/ARCHITECTURE.md "TensorRT and TensorRT-RTX").
TENSORRT_KV_WRITES = ("scatternd", "attention")
#: The export's default ``--kv-write`` (ONE constant: ``export``, ``bench`` and ``scripts/gpu_check.py`` read
#: it; chosen by measurement, docs/PERFORMANCE.md "KV-write forms (issue 28)").
DEFAULT_KV_WRITE = "scatternd"
#: The form each ``export --target`` gets (``attention`` for TensorRT: its fused attention and in-place
#: KV-cache-update layers; docs/ARCHITECTURE.md "The attention form").
TARGET_KV_WRITES = {"onnxruntime": DEFAULT_KV_WRITE, "tensorrt": "attention"}
#: ``export --target`` choices (recorded in the manifest as ``target``).
TARGETS = tuple(TARGET_KV_WRITES)


def target_kv_write(target: str, dtype: str) -> str:
    """The ``--kv-write`` an export for ``target`` gets when none is given: :data:`TARGET_KV_WRITES`, except that an
    fp32 export for TensorRT gets the explicit ``scatternd`` form (TensorRT-RTX 1.7.1 has no fp32 kernel for its
    Attention layer, and layers parsed from ONNX cannot be marked decomposable).

    Raises:
        HimapError: for an unknown target.
    """
    if target not in TARGET_KV_WRITES:
        raise HimapError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    form = TARGET_KV_WRITES[target]
    if form == "attention" and dtype not in TENSORRT_ATTENTION_DTYPES:
        return "scatternd"
    return form
#: ONNX opset of the ``attention`` form's segment graphs (``Attention`` with ``nonpad_kv_seqlen``,
#: ``TensorScatter``).
ATTENTION_OPSET = 24
#: The ONNX opset the segment graphs of a ``kv_write`` form need (its cache-write / attention operators); the
#: forms not named here hold at any ``--opset``. An export of such a form takes no explicit ``--opset`` below it
#: (its segment graphs could not be at that opset); by default its segment graphs are at this opset and its
#: other graphs at the default opset (docs/ARCHITECTURE.md "The attention form").
KV_WRITE_OPSETS = {"tensorscatter": 24, "attention": ATTENTION_OPSET}
#: Floating dtypes TensorRT-RTX 1.7.1 builds the ``attention`` form in (fp32: "Attention operation was not
#: supported by a dedicated kernel"; ../shared/TENSORRT-RTX.md).
TENSORRT_ATTENTION_DTYPES = ("float16", "bfloat16")
#: Why ``build`` refuses each non-TensorRT kv_write (one line each).
NOT_TENSORRT = {
    "gqa": "ONNX Runtime's com.microsoft.GroupQueryAttention, which TensorRT cannot parse",
    "tensorscatter": "TensorScatter on a cache of dynamic length, which TensorRT's ONNX parser rejects: 'The KV "
                     "cache tensor must have a static sequence length dimension'",
}
MANIFEST_NAME = "manifest.json"
PROCESSOR_DIR = "processor"
#: ``--quantize`` choices: ``int8``/``int4`` weight-only (``DequantizeLinear -> MatMul``), ``int8-dynamic``
#: int8 weights with activations quantized per call at run time (``DynamicQuantizeLinear -> MatMulInteger``;
#: see himap_trt/export/quantize.py).
SCHEMES = ("none", "int8", "int4", "int8-dynamic")
#: Why ``build`` refuses each ``--quantize`` scheme TensorRT cannot take (one line each).
NOT_TENSORRT_QUANTIZE = {
    "int8-dynamic": "activations quantized per call by DynamicQuantizeLinear/MatMulInteger, ONNX Runtime's CPU "
                    "int8 form, which TensorRT's ONNX parser does not take",
}
#: ONNX Runtime MatMulNBits accuracy level recorded in the export and set on the session
#: (0: unset, 1: fp32, 2: fp16, 3: bf16, 4: int8 compute of the activations).
ACCURACY_LEVEL = 4


@dataclass(frozen=True)
class Quantization:
    """How an export's decoder weights are quantized (recorded in the manifest).

    Attributes:
        scheme: ``int8``, ``int4`` or ``int8-dynamic`` (see :mod:`himap_trt.export.quantize`).
        block_size: int4: input rows (K) per scale; int8: None (one scale per output channel).
        lm_head: whether the LM head is quantized too.
        accuracy_level: ONNX Runtime MatMulNBits accuracy level (:data:`ACCURACY_LEVEL`; 0 for
            ``int8-dynamic``, which has no MatMulNBits).
        symmetric: always True (no zero points).
        tool: the library that computed the codes.
    """

    scheme: str
    block_size: int | None = None
    lm_head: bool = False
    accuracy_level: int = ACCURACY_LEVEL
    symmetric: bool = True
    tool: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> Quantization | None:
        """Parse a manifest's ``quantization`` field (``{}`` or absent: none).

        Raises:
            HimapError: naming the field that is malformed.
        """
        if not data:
            return None
        if not isinstance(data, dict):
            raise HimapError(f"{where}: field 'quantization' must be an object")
        scheme = data.get("scheme")
        if scheme not in SCHEMES[1:]:
            raise HimapError(f"{where}: field 'quantization.scheme' must be one of {', '.join(SCHEMES[1:])}, "
                             f"got {scheme!r:.40}")
        block = data.get("block_size")
        if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block <= 0):
            raise HimapError(f"{where}: field 'quantization.block_size' must be a positive integer or null")
        level = data.get("accuracy_level", ACCURACY_LEVEL)
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= 4:
            raise HimapError(f"{where}: field 'quantization.accuracy_level' must be an integer 0-4")
        return cls(scheme=scheme, block_size=block, lm_head=bool(data.get("lm_head", False)), accuracy_level=level,
                   symmetric=bool(data.get("symmetric", True)), tool=str(data.get("tool", "")))

    def describe(self) -> str:
        where = "decoder linear layers" + (" and LM head" if self.lm_head else "")
        grain = f"blocks of {self.block_size}" if self.block_size else "per output channel"
        if self.scheme == "int8-dynamic":
            return (f"int8 weights ({grain}, symmetric) and uint8 activations quantized per call (one scale per "
                    f"tensor) on the {where}")
        return f"{self.scheme} weights ({grain}, symmetric) on the {where}"


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
        opset: ONNX opset of the graphs (``--opset``); the segment graphs of a form in :data:`KV_WRITE_OPSETS`
            are at that form's opset.
        max_seq_len: most tokens (prompt + generated) per sequence the export is meant for.
        dims: the model's dimensions.
        image_token_id / eos_token_ids / pad_token_id: token ids the runtime needs.
        graphs: every graph in chain order, with its file.
        processor_dir: subdirectory holding the saved processor (tokenizer, image processor, template).
        validation: per graph and phase, the max abs difference found against PyTorch (empty if skipped).
        files: every file of the export (graphs, their external data, the processor's files), relative
            path -> ``{"bytes": size, "sha256": hex}``; checked by :func:`load_manifest`.
        kv_write: how segment graphs write their caches: ``scatternd`` (opset ``opset``),
            ``tensorscatter`` (segment graphs at opset 24) or ``gqa`` (ONNX Runtime's
            GroupQueryAttention writes the cache and attends over each row's occupied prefix; not
            buildable with TensorRT) or ``attention`` (segment graphs at opset 24: TensorScatter into
            caches of static length + ONNX Attention); see :mod:`himap_trt.export.compose`.
        quantization: ``{}`` (float weights) or the weight quantization of the segment graphs
            (``export --quantize``): :meth:`Quantization.to_dict`.
        target: the backend the export was made for (``export --target``: ``onnxruntime`` or ``tensorrt``).
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
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    kv_write: str = "scatternd"
    quantization: dict[str, Any] = field(default_factory=dict)
    target: str = "onnxruntime"

    @property
    def quantize(self) -> str:
        """``none``, ``int8``, ``int4`` or ``int8-dynamic``: the export's ``--quantize``."""
        return self.quantization.get("scheme", "none") if self.quantization else "none"

    def graph(self, name: str) -> GraphSpec:
        """The graph called ``name``; raises :class:`HimapError` if the export has none."""
        for spec in self.graphs:
            if spec.name == name:
                return spec
        raise HimapError(f"the manifest has no graph {name!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.plan.evs_rate:      # exports without EVS (issue 29) are written as before
            data["plan"].pop("evs_rate", None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path | None = None) -> Manifest:
        """Parse and validate.

        Args:
            data: the parsed JSON.
            source: the manifest file, named in error messages.

        Raises:
            HimapError: naming the file and the field that is missing or of the wrong type, or an
                invalid plan.
        """
        where = f"manifest {str(source)!r}" if source is not None else "manifest"
        if not isinstance(data, dict):
            raise HimapError(f"{where} must be a JSON object")
        for key, kind in _FIELDS.items():
            _require(data, key, kind, where)
        # fields with a default (the architecture's, added later) may be absent; present ones are typed
        _require_each(data["dims"], "dims", {f.name: str if f.type in (str, "str") else int for f in fields(ModelDims)
                                             if f.name in data["dims"] or f.default is MISSING}, where)
        _require_each(data["plan"], "plan", {"method": str, "num_layers": int, "num_image_tokens": int,
                                              "stages": list}, where)
        for i, graph in enumerate(data["graphs"]):
            _require_each(graph, f"graphs[{i}]", {"name": str, "kind": str, "inputs": list, "outputs": list,
                                                  "file": str}, where)
        for i, token in enumerate(data["eos_token_ids"]):
            if not isinstance(token, int) or isinstance(token, bool):
                raise HimapError(f"{where}: field 'eos_token_ids[{i}]' must be an integer, got {token!r}")
        for key in ("processor_dir",):
            if key in data and not isinstance(data[key], str):
                raise HimapError(f"{where}: field {key!r} must be a string, got {type(data[key]).__name__}")
        if data.get("kv_write", "scatternd") not in KV_WRITES:
            raise HimapError(f"{where}: field 'kv_write' must be one of {', '.join(KV_WRITES)}, "
                             f"got {data.get('kv_write')!r:.40}")
        if data.get("target", "onnxruntime") not in TARGETS:
            raise HimapError(f"{where}: field 'target' must be one of {', '.join(TARGETS)}, "
                             f"got {data.get('target')!r:.40}")
        quantization = Quantization.from_dict(data.get("quantization"), where)
        if not isinstance(data.get("validation") or {}, dict):
            raise HimapError(f"{where}: field 'validation' must be an object")
        try:
            return cls(
                format_version=data["format_version"],
                package_version=data["package_version"],
                source_model=data["source_model"],
                model_hash=data["model_hash"],
                plan=PruningPlan.from_dict(data["plan"]),
                dtype=data["dtype"],
                opset=data["opset"],
                max_seq_len=data["max_seq_len"],
                dims=ModelDims(**data["dims"]),
                image_token_id=data["image_token_id"],
                eos_token_ids=tuple(data["eos_token_ids"]),
                pad_token_id=data["pad_token_id"],
                graphs=tuple(GraphSpec.from_dict(g) for g in data["graphs"]),
                processor_dir=data.get("processor_dir", PROCESSOR_DIR),
                validation=dict(data.get("validation") or {}),
                files=dict(data["files"]),
                kv_write=str(data.get("kv_write", "scatternd")),
                target=str(data.get("target", "onnxruntime")),
                quantization=quantization.to_dict() if quantization else {},
            )
        except HimapError as exc:
            raise HimapError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HimapError(f"{where} is malformed ({type(exc).__name__}: {exc})") from None

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


#: Top-level fields every manifest must have, with their JSON types.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format_version": int, "package_version": str, "source_model": str, "model_hash": str, "plan": dict,
    "dtype": str, "opset": int, "max_seq_len": int, "dims": dict, "image_token_id": int, "eos_token_ids": list,
    "pad_token_id": int, "graphs": list, "files": dict,
}

_JSON_TYPES = {int: "an integer", str: "a string", dict: "an object", list: "an array", float: "a number"}


def _require(data: dict, key: str, kind, where: str, prefix: str = "") -> None:
    """Raise naming ``prefix + key`` unless ``data[key]`` exists and has JSON type ``kind``."""
    if key not in data:
        raise HimapError(f"{where}: field {prefix + key!r} is missing")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HimapError(f"{where}: field {prefix + key!r} must be {_JSON_TYPES.get(kind, kind)}, "
                         f"got {type(value).__name__} {value!r:.40}")


def _require_each(data: Any, name: str, kinds: dict[str, type], where: str) -> None:
    if not isinstance(data, dict):
        raise HimapError(f"{where}: field {name!r} must be an object, got {type(data).__name__}")
    for key, kind in kinds.items():
        _require(data, key, kind, where, prefix=f"{name}.")


def is_export_manifest(data: Any) -> bool:
    """Whether parsed JSON looks like a himap-trt export manifest (any format version): what
    ``export --out`` requires before it replaces a directory."""
    return (isinstance(data, dict) and isinstance(data.get("format_version"), int)
            and isinstance(data.get("graphs"), list) and isinstance(data.get("plan"), dict)
            and isinstance(data.get("model_hash"), str))


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


def load_manifest(directory: str | Path, flag: str = "--export-dir", verify: bool = True, *,
                  families: Callable[[str], Any]) -> Manifest:
    """Read and check an export directory's manifest.

    With ``verify`` (the default; what ``run``, ``check`` and ``build`` use) every path the manifest
    names must stay inside ``directory`` (:func:`himap_trt.confine.confined_path`), every recorded file
    must have its recorded size and sha256, every graph's external data must be a recorded file, and
    the processor directory may hold recorded files only.

    ``families`` looks a model family up by ``dims.architecture``
    (:func:`himap_trt.arch.get_architecture`, passed in because the families sit above the manifest
    in the layers): :func:`check_consistency` needs it to re-derive the graph list.

    Raises:
        HimapError: missing directory or manifest, unreadable JSON, another format version, a missing or
            malformed field (named with the file), a path leaving the directory, or a file that is
            missing, changed or from another export (named).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise HimapError(f"{flag} {str(directory)!r} does not exist; create it with `himap-trt export`")
    path = directory / MANIFEST_NAME
    kind = artefact_kind(directory)
    if kind is not None and kind != "an export":
        raise HimapError(f"{flag} {str(directory)!r} is {kind}, not an export; pass the export directory "
                         "(written by `himap-trt export`)")
    if not path.is_file():
        raise HimapError(f"{flag} {str(directory)!r} holds no {MANIFEST_NAME}; it is not a himap-trt export")
    data = read_versioned_json(path, FORMAT_VERSION, "manifest",
                               f"re-export with this version (format {FORMAT_VERSION} records every file's sha256)")
    manifest = Manifest.from_dict(data, source=path)
    check_consistency(manifest, families, source=path)
    records = parse_file_records(manifest.files, field="files", source=path)
    for i, spec in enumerate(manifest.graphs):
        confined_path(directory, spec.file, field=f"graphs[{i}].file", source=path)
        if spec.file not in records:
            raise HimapError(f"graph {spec.name!r}: file {spec.file!r} is not recorded in 'files' of {str(path)!r}")
    processor = confined_path(directory, manifest.processor_dir, field="processor_dir", source=path, kind="dir")
    if not verify:
        return manifest
    verify_files(directory, records, source=path)
    prefix = manifest.processor_dir.rstrip("/") + "/"
    for name in files_under(processor):
        if prefix + name not in records:
            raise HimapError(f"the processor directory of {str(directory)!r} holds {name!r}, which {str(path)!r} "
                             "does not record; remove it or re-export")
    for spec in manifest.graphs:
        graph = check_onnx_external_data(directory, spec.file, records, source=path)
        check_graph_io(spec, graph, source=path)
    return manifest


def recorded_specs(specs: list[GraphSpec], quantization: dict[str, Any]) -> list[GraphSpec]:
    """The graph entries an export records for ``specs``: a quantized export's segment graphs carry
    its ``quantization`` (:meth:`Quantization.to_dict`; ``{}``: none) in their ``attrs`` (their ONNX
    Runtime session options and validation tolerances). The one rule for both the exporter and
    :func:`check_consistency`."""
    if not quantization:
        return list(specs)
    return [replace(spec, attrs={**spec.attrs, "quantization": dict(quantization)}) if spec.kind == "segment" else spec
            for spec in specs]


def check_consistency(manifest: Manifest, families: Callable[[str], Any], source: str | Path | None = None) -> None:
    """Check the manifest's fields against each other: the fields outside ``files`` are not hashed
    (the manifest is what records hashes), so an edited ``max_seq_len``, ``dims`` or ``plan`` must be
    caught here, before any graph runs.

    - ``max_seq_len`` must exceed the image tokens and stay within ``dims.max_position_embeddings``
      (RoPE positions the model was trained for);
    - ``plan`` must be for ``dims``' layers and image tokens, and ``graphs`` (names, kinds, layer
      ranges, every input's and output's name, dtype and symbolic shape) must be exactly what
      :func:`himap_trt.graphs.spec.graph_specs` declares for ``dims``, ``plan`` and ``dtype`` with the
      family ``families(dims.architecture)`` (e.g. :func:`himap_trt.arch.get_architecture`).

    Raises:
        HimapError: naming the manifest and the first field that disagrees.
    """
    where = f"manifest {str(source)!r}" if source is not None else "manifest"
    dims = manifest.dims
    if not dims.num_image_tokens < manifest.max_seq_len <= dims.max_position_embeddings:
        raise HimapError(f"{where}: field 'max_seq_len' is {manifest.max_seq_len}, outside "
                         f"({dims.num_image_tokens}, {dims.max_position_embeddings}] (more than the image tokens, at "
                         "most the model's positions 'dims.max_position_embeddings')")
    try:
        arch = families(dims.architecture)
    except HimapError as exc:
        raise HimapError(f"{where}: field 'dims.architecture': {exc}") from None
    try:
        expected = recorded_specs(graph_specs(dims, manifest.plan, manifest.dtype, arch=arch), manifest.quantization)
        if manifest.kv_write == "attention":    # caches of the length fixed at export (max_seq_len)
            expected = static_cache_specs(expected, segment_cache_lengths(
                manifest.plan, manifest.max_seq_len, variable_image_tokens=arch.variable_image_tokens))
    except HimapError as exc:
        raise HimapError(f"{where}: fields 'plan' and 'dims' disagree: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
        raise HimapError(f"{where}: fields 'dims' or 'dtype' are inconsistent ({type(exc).__name__}: {exc})") from None
    if len(expected) != len(manifest.graphs):
        raise HimapError(f"{where}: field 'graphs' lists {len(manifest.graphs)} graphs, 'dims' and 'plan' make "
                         f"{len(expected)}")
    for i, (have, want) in enumerate(zip(manifest.graphs, expected)):
        for name in ("name", "kind", "layers", "stage", "attrs"):
            if _as_json(getattr(have, name)) != _as_json(getattr(want, name)):   # tuples read back as lists
                raise HimapError(f"{where}: field 'graphs[{i}].{name}' is {getattr(have, name)!r:.80}, 'dims' and "
                                 f"'plan' make {getattr(want, name)!r:.80}")
        for side in ("inputs", "outputs"):
            ours, theirs = getattr(have, side), getattr(want, side)
            if len(ours) != len(theirs):
                raise HimapError(f"{where}: field 'graphs[{i}].{side}' has {len(ours)} tensors, 'dims' and 'plan' "
                                 f"make {len(theirs)}")
            for j, (a, b) in enumerate(zip(ours, theirs)):
                if a != b:
                    raise HimapError(f"{where}: field 'graphs[{i}].{side}[{j}]' is {a.name} {a.dtype} "
                                     f"{list(a.shape)}, 'dims' and 'plan' make {b.name} {b.dtype} {list(b.shape)}")


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}


def check_graph_io(spec: GraphSpec, graph: Any, source: str | Path | None = None) -> None:
    """Check an ONNX file's inputs and outputs against its manifest entry: names and order, element
    types, ranks and every static dim (symbolic dims are named by the exporter, not compared).

    Args:
        spec: the manifest's graph entry.
        graph: the parsed ``onnx.ModelProto`` (weights not loaded).

    Raises:
        HimapError: naming the file, the tensor and what differs.
    """
    where = f"{spec.file!r} (graph {spec.name!r} of {str(source)!r})"
    for side, declared, actual in (("inputs", spec.inputs, graph.graph.input), ("outputs", spec.outputs,
                                                                                 graph.graph.output)):
        names = [value.name for value in actual]
        if names != [t.name for t in declared]:
            raise HimapError(f"{where} has {side} {names[:6]}{'...' if len(names) > 6 else ''}, the manifest "
                             f"declares {[t.name for t in declared][:6]}: the file and the manifest disagree")
        for tensor, value in zip(declared, actual):
            kind = value.type.tensor_type
            dtype = _ONNX_DTYPES.get(kind.elem_type, str(kind.elem_type))
            shape = [d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim]
            static_mismatch = any(isinstance(want, int) and have is not None and have != want
                                  for want, have in zip(tensor.shape, shape))
            if dtype != tensor.dtype or len(shape) != len(tensor.shape) or static_mismatch:
                shown = [d if d is not None else "?" for d in shape]
                raise HimapError(f"{where}: {side[:-1]} {tensor.name!r} is {dtype} {shown} in the file, the manifest "
                                 f"declares {tensor.dtype} {list(tensor.shape)}: the file and the manifest disagree")


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
