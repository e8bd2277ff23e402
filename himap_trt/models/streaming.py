"""Checkpoint weights read from the safetensors files tensor by tensor, for exports in bounded memory.

``load_model`` materialises every weight (transformers memory-maps the shards, or converts the whole
model when the stored dtype differs from ``--dtype``). For the export of a 7B/13B checkpoint that
is what does not fit: here the model is built as a *skeleton* instead:

- the vision tower, projector, token embedding, final norm and lm_head are read from the files (each
  tensor converted to the export dtype on its own) and kept: every graph but the segments uses them;
- the decoder layers' parameters stay on the ``meta`` device. Whoever needs a layer's weights reads
  them from the files when needed and drops them after: the segment composer binds each initializer
  to an ``onnx_ir.LazyTensor`` that reads the tensor while the graph file is written
  (:meth:`StreamedWeights.initializer`), and the PyTorch reference materialises one leaf module
  (a projection or a norm) at a time around its forward (:meth:`StreamedWeights.streaming`).

Tensors are read with ``pread`` into private buffers (no mapping held: page-cache pages are not
counted in the process's RSS), converted per tensor, and released when their user is done. The
model hash (:func:`streamed_model_hash`) reads the files the same way and equals
:func:`himap_trt.manifest.model_hash` of the fully loaded model.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from himap_trt.arch import architecture_for
from himap_trt.errors import HimapError
from himap_trt.models.loading import LoadedModel, _from_pretrained, _resolve, load_config

#: safetensors dtype tags -> torch dtypes.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: The decoder layers (streamed, never kept) in a LlavaForConditionalGeneration's state_dict names.
LAYER_PREFIX = "model.language_model.layers."
#: The parameters a decoder layer's graph binds (state_dict names, ``{l}`` = layer index) are
#: ``LAYER_PREFIX + f"{l}." + name``.


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: file, stored dtype, shape, absolute byte range [start, end)."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def checkpoint_candidates(state_name: str) -> tuple[str, ...]:
    """Names a ``LlavaForConditionalGeneration`` state_dict name may have in a checkpoint file:
    itself (transformers >= 4.52 layout) or the llava-hf hub layout (``language_model.model.*``,
    ``language_model.lm_head.*``, ``vision_tower.[vision_model.]*``, ``multi_modal_projector.*``)."""
    names = [state_name]
    for new, olds in (("model.language_model.", ("language_model.model.",)),
                      ("lm_head.", ("language_model.lm_head.",)),
                      ("model.vision_tower.", ("vision_tower.", "vision_tower.vision_model.")),
                      ("model.multi_modal_projector.", ("multi_modal_projector.",))):
        if state_name.startswith(new):
            names += [old + state_name[len(new):] for old in olds]
    return tuple(names)


class CheckpointFiles:
    """The safetensors shards of a local checkpoint directory, indexed by tensor name (headers only).

    Args:
        directory: holds ``model.safetensors`` or ``model.safetensors.index.json`` + its shards.

    Raises:
        HimapError: a shard named by the index that is missing or outside the directory, or a
            malformed safetensors header (naming the file).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise HimapError(f"cannot read {str(index)!r}: {type(exc).__name__}: {exc}") from None
        else:
            shards = [SINGLE_NAME]
        self.entries: dict[str, TensorEntry] = {}
        root = self.directory.resolve()
        for shard in shards:
            path = (self.directory / shard).resolve()
            if not isinstance(shard, str) or root not in path.parents or not path.is_file():
                raise HimapError(f"checkpoint {str(self.directory)!r}: shard {shard!r} is missing or outside the directory")
            self.entries.update(_read_header(path))

    @classmethod
    def find(cls, directory: str | Path) -> CheckpointFiles | None:
        """The checkpoint's safetensors files, or None if the directory holds none (e.g. pickles)."""
        directory = Path(directory)
        if (directory / INDEX_NAME).is_file() or (directory / SINGLE_NAME).is_file():
            return cls(directory)
        return None

    @property
    def files(self) -> list[Path]:
        """The shard files, sorted."""
        return sorted({entry.path for entry in self.entries.values()})

    def entry(self, state_name: str) -> TensorEntry:
        """Where the model's ``state_name`` tensor is stored.

        Raises:
            HimapError: if the checkpoint has no tensor for it (under any of its layouts' names).
        """
        for name in checkpoint_candidates(state_name):
            if name in self.entries:
                return self.entries[name]
        raise HimapError(f"checkpoint {str(self.directory)!r} holds no tensor for {state_name!r} "
                         f"(looked for {', '.join(checkpoint_candidates(state_name))})")

    def read(self, state_name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor from its file into a private buffer, converted to ``dtype`` (this tensor only).

        Returns:
            A tensor of the stored shape, ``dtype`` (default: as stored), on ``device``.
        """
        entry = self.entry(state_name)
        size = entry.end - entry.start
        buffer = bytearray(size)
        with open(entry.path, "rb", buffering=0) as f:
            f.seek(entry.start)
            view = memoryview(buffer)
            done = 0
            while done < size:
                n = f.readinto(view[done:])
                if not n:
                    raise HimapError(f"{str(entry.path)!r} is truncated (tensor {state_name!r})")
                done += n
        tensor = (torch.frombuffer(buffer, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8))
        tensor = tensor.view(entry.dtype).reshape(entry.shape)
        if dtype is not None and dtype != entry.dtype:
            tensor = tensor.to(dtype)
        return tensor.to(device) if torch.device(device).type != "cpu" else tensor


def _read_header(path: Path) -> dict[str, TensorEntry]:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(f.read(length))
        size = path.stat().st_size
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = (8 + length + int(x) for x in info["data_offsets"])
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(x) for x in info["shape"])
            itemsize = torch.empty((), dtype=dtype).element_size()
            if end > size or end - start != math.prod(shape) * itemsize:
                raise ValueError(f"tensor {name!r} has a bad byte range")
            entries[name] = TensorEntry(path, dtype, shape, start, end)
        return entries
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise HimapError(f"{str(path)!r} is not a readable safetensors file: {type(exc).__name__}: {exc}") from None


def _ir_types():
    import onnx_ir as ir

    return {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16, torch.bfloat16: ir.DataType.BFLOAT16}


def _is_layer(name: str) -> bool:
    return name.startswith(LAYER_PREFIX)


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    module._parameters[name] = nn.Parameter(value, requires_grad=False)


class StreamedWeights:
    """A skeleton model's weights in the checkpoint files: decoder layers read on demand.

    Args:
        model: the skeleton (``LlavaForConditionalGeneration`` whose decoder-layer parameters are meta).
        files: the checkpoint's :class:`CheckpointFiles`.
        dtype: the export dtype (every tensor is converted to it as it is read).
        device: where the reference materialises layer weights.
    """

    def __init__(self, model: nn.Module, files: CheckpointFiles, dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.model = model
        self.files = files
        self.dtype = dtype
        self.device = torch.device(device)

    def read(self, state_name: str) -> torch.Tensor:
        """One tensor from the files in the export dtype (floating tensors only are converted)."""
        entry = self.files.entry(state_name)
        return self.files.read(state_name, self.dtype if entry.dtype.is_floating_point else None)

    def initializer(self, state_name: str, param: torch.Tensor):
        """An ``onnx_ir`` tensor for ``state_name`` that reads the file only when serialised (per tensor)."""
        import onnx_ir as ir
        from onnx_ir.tensor_adapters import TorchTensor

        return ir.LazyTensor(lambda: TorchTensor(self.read(state_name), name=state_name),
                             dtype=_ir_types()[param.dtype], shape=ir.Shape(tuple(param.shape)), name=state_name)

    def _leaf_modules(self, layers=None) -> Iterator[tuple[str, nn.Module]]:
        lm = self.model.model.language_model
        indices = range(len(lm.layers)) if layers is None else layers
        for index in indices:
            for name, module in lm.layers[index].named_modules():
                if any(p is not None for p in module._parameters.values()):
                    yield f"{LAYER_PREFIX}{index}." + (f"{name}." if name else ""), module

    def _load(self, prefix: str, module: nn.Module) -> None:
        for name, param in list(module._parameters.items()):
            if param is not None:
                _set_param(module, name, self.read(prefix + name).to(self.device))

    @staticmethod
    def _release(module: nn.Module) -> None:
        for name, param in list(module._parameters.items()):
            if param is not None:
                _set_param(module, name, torch.empty(param.shape, dtype=param.dtype, device="meta"))

    @contextlib.contextmanager
    def materialized(self, layers) -> Iterator[None]:
        """Decoder ``layers`` (indices) read from the files for the duration of the block, then released."""
        modules = list(self._leaf_modules(layers))
        try:
            for prefix, module in modules:
                self._load(prefix, module)
            yield
        finally:
            for _, module in modules:
                self._release(module)

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        """While active, every decoder-layer leaf module (projection, norm) reads its weights from the
        files right before its forward and drops them right after: at most one matrix resident."""
        handles = []
        for prefix, module in self._leaf_modules():
            handles.append(module.register_forward_pre_hook(lambda m, args, prefix=prefix: self._load(prefix, m)))
            handles.append(module.register_forward_hook(lambda m, args, out: self._release(m)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def to(self, device: str | torch.device) -> None:
        """Move the kept weights and buffers to ``device`` and materialise layers there from now on."""
        self.device = torch.device(device)
        _move(self.model, self.device)


def _move(model: nn.Module, device: torch.device) -> None:
    """``model.to(device)`` for a skeleton: meta parameters stay meta."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and not param.is_meta and param.device != device:
                _set_param(module, name, param.data.to(device))
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)


def streamed_model_hash(model: nn.Module, files: CheckpointFiles, dtype: torch.dtype) -> str:
    """:func:`himap_trt.manifest.model_hash` of ``model`` loaded in ``dtype``, computed from
    the checkpoint files tensor by tensor (parameters from the files, buffers from ``model``)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    params = {name for name, _ in model.named_parameters()}
    for name, tensor in sorted(model.state_dict().items()):
        if name in params:
            stored = files.entry(name).dtype
            tensor = files.read(name, dtype if stored.is_floating_point else None)
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        del tensor
    return f"blake2b-128:{digest.hexdigest()}"


def _skeleton(config: Any, dtype: torch.dtype, attn_implementation: str = "eager"):
    """A ``LlavaForConditionalGeneration`` with every parameter on ``meta`` (as transformers builds it
    before loading: under ``dtype`` as the default dtype, with ``load_model``'s attention
    implementation) and its non-persistent buffers rebuilt on CPU."""
    from transformers import LlavaForConditionalGeneration

    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = attn_implementation
        part.dtype = dtype     # as from_pretrained records it (part of the model hash)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
        text = model.model.language_model
        text.rotary_emb = type(text.rotary_emb)(config=config.text_config)
    finally:
        torch.set_default_dtype(previous)
    embeddings = model.model.vision_tower.embeddings
    embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions).expand((1, -1)),
                               persistent=False)
    meta = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if meta:
        raise HimapError(f"cannot build a streamed model of this architecture: buffers {meta} have no value")
    return model.eval()


def load_streamed(model: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Open a local safetensors checkpoint for a bounded-memory export (see the module docstring).

    Returns:
        A :class:`~himap_trt.models.LoadedModel` whose ``weights`` is a :class:`StreamedWeights`, or
        None when ``model`` is not a local directory of safetensors files or its family does not
        stream (``Architecture.streams_weights``; Qwen2.5-VL does not yet): then use ``load_model``.

    Raises:
        HimapError: as ``load_model`` (unsupported architecture, custom code, unreadable files), or a
            tensor the model needs that the files lack.
    """
    from transformers import AutoProcessor, GenerationConfig
    from transformers.utils import logging as hf_logging

    source, is_local = _resolve(model)
    if not is_local:
        return None
    files = CheckpointFiles.find(source)
    if files is None:
        return None
    hf_logging.disable_progress_bar()
    config = load_config(model)
    if not architecture_for(config).streams_weights:
        return None
    processor = _from_pretrained(AutoProcessor.from_pretrained, source, True, "processor")
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise HimapError(f"the processor of {model!r} is not a multimodal (image + text) processor")
    skeleton = _skeleton(config, dtype)
    if (Path(source) / "generation_config.json").is_file():
        skeleton.generation_config = _from_pretrained(GenerationConfig.from_pretrained, source, True,
                                                      "generation config")
    weights = StreamedWeights(skeleton, files, dtype, device)
    for name, _ in list(skeleton.named_parameters()):
        if not _is_layer(name):
            owner, _, leaf = name.rpartition(".")
            _set_param(skeleton.get_submodule(owner), leaf, weights.read(name))
    weights.to(device)
    return LoadedModel(model=skeleton, processor=processor, source=model, path=source, weights=weights)
