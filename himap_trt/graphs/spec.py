"""The graph declarations: one per graph, the single source of the I/O contract.

Each :class:`GraphSpec` names its inputs and outputs with dtypes and *symbolic* shapes. From it
are derived: the ONNX export's dynamic axes and dim names, the runtime's feeds, the validation
shapes, and the TensorRT optimization profiles (see ``docs/ARCHITECTURE.md``).

Symbolic dims are strings over a few named sizes, combined with ``+`` / ``-`` and integers:

- ``batch``: prompts in the batch.
- ``sequence``: tokens fed to the graph in this call (the prompt at prefill, 1 at decode).
- ``cache_sequence``: length M of a segment's preallocated KV-cache buffer (the prompt's length at
  prefill, where the buffer is exactly filled; the slot cache's ``max_len_j`` at decode).
- e.g. ``sequence - 72`` (a scoring graph's output: its input minus the image tokens it drops).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from himap_trt.errors import HimapError
from himap_trt.dims import ModelDims
from himap_trt.plan import PruningPlan

Dim = int | str

_TERM = re.compile(r"\s*([+-]?)\s*([A-Za-z_][A-Za-z_0-9]*|\d+)\s*")


def eval_dim(dim: Dim, sizes: dict[str, int]) -> int:
    """Evaluate a symbolic dim (``'past_sequence + sequence'``, ``'sequence - 72'``, ``64``).

    Raises:
        HimapError: on a name missing from ``sizes`` or a malformed expression.
    """
    if isinstance(dim, int):
        return dim
    total, pos = 0, 0
    text = dim.strip()
    while pos < len(text):
        match = _TERM.match(text, pos)
        if not match or match.end() == pos:
            raise HimapError(f"malformed symbolic dim {dim!r}")
        sign, term = match.groups()
        if pos > 0 and not sign:
            raise HimapError(f"malformed symbolic dim {dim!r}")
        if term.isdigit():
            value = int(term)
        elif term in sizes:
            value = sizes[term]
        else:
            raise HimapError(f"symbolic dim {dim!r} uses {term!r}; known: {', '.join(sorted(sizes))}")
        total += -value if sign == "-" else value
        pos = match.end()
    return total


def dim_names(dim: Dim) -> list[str]:
    """The named sizes a symbolic dim refers to (``[]`` for an int)."""
    if isinstance(dim, int):
        return []
    return [t for _, t in _TERM.findall(dim) if not t.isdigit()]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    Attributes:
        name: the tensor's name in the graph (``past_key_values.{l}.key`` ...).
        dtype: numpy-style dtype name: ``float32``, ``float16``, ``bfloat16``, ``int64``.
        shape: one :data:`Dim` per axis (int: static; str: symbolic).
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def concrete(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The shape for given named sizes (e.g. ``{'batch': 1, 'sequence': 7, 'cache_sequence': 700}``)."""
        return tuple(eval_dim(d, sizes) for d in self.shape)


@dataclass(frozen=True)
class GraphSpec:
    """One graph of the chain.

    Attributes:
        name: ``vision``, ``embed``, ``segment_{j}`` or ``scoring_{j}``.
        kind: ``vision`` | ``embed`` | ``segment`` | ``scoring``.
        inputs / outputs: the I/O contract, in the order of the torch module's arguments/results.
        layers: ``[start, end)`` decoder layers of a segment (of the scored layer K-1..K for scoring).
        stage: index into ``plan.stages`` of a scoring graph.
        file: the ONNX file, relative to the export directory (set by the export).
        attrs: constants of the graph (e.g. a scoring graph's ``keep`` and ``entering`` counts).
    """

    name: str
    kind: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    layers: tuple[int, int] | None = None
    stage: int | None = None
    file: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec:
        """The input called ``name``; raises ``KeyError`` if there is none."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(f"graph {self.name!r} has no input {name!r}")

    def output(self, name: str) -> TensorSpec:
        """The output called ``name``; raises ``KeyError`` if there is none."""
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(f"graph {self.name!r} has no output {name!r}")

    @property
    def input_names(self) -> list[str]:
        """Input names in spec (= module argument) order."""
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """Output names in spec (= module result) order."""
        return [s.name for s in self.outputs]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        def tensors(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

        return cls(
            name=data["name"], kind=data["kind"], inputs=tensors(data["inputs"]), outputs=tensors(data["outputs"]),
            layers=tuple(data["layers"]) if data.get("layers") is not None else None,
            stage=data.get("stage"), file=data.get("file"), attrs=dict(data.get("attrs") or {}),
        )


def past_names(layer: int) -> tuple[str, str]:
    """KV-cache input names of decoder layer ``layer`` (global index)."""
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    """KV-cache output names of decoder layer ``layer`` (global index)."""
    return f"present.{layer}.key", f"present.{layer}.value"


#: The vision graph's optional second output: [deepstack_layers, num_image_tokens, D] (Qwen3-VL).
DEEPSTACK_OUTPUT = "deepstack_embeds"


def deepstack_name(layer: int) -> str:
    """Name of the segment input added to the hidden states after decoder layer ``layer``
    (Qwen3-VL's DeepStack: [B,S,D], the image tokens' features of that layer, 0 at other tokens)."""
    return f"deepstack.{layer}"


def query_name(layer: int) -> str:
    """Name of the query-states output of layer ``layer`` that a scoring graph consumes."""
    return f"query.{layer}"


DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int64": torch.int64}


def torch_dtype(name: str) -> torch.dtype:
    """Spec dtype name -> torch dtype."""
    return _TORCH_DTYPES[name]


def graph_specs(dims: ModelDims, plan: PruningPlan, dtype: str = "float32", *, arch: Any) -> list[GraphSpec]:
    """Declare every graph of the chain for a model and a plan, in execution order.

    Order: ``vision``, ``embed``, ``segment_0``, ``scoring_0``, ``segment_1``, ... ``segment_n``.

    Args:
        dims: the model's dimensions.
        plan: the pruning plan (its stages split the decoder into segments).
        dtype: floating dtype of activations and KV caches (``float32``, ``float16``, ``bfloat16``).
        arch: the model's family (a :class:`himap_trt.arch.base.Architecture`, the one named
            ``dims.architecture``): its vision graph, position-id shape and whether |V| varies.

    Returns:
        The specs; see ``docs/ARCHITECTURE.md`` for the contract.
    """
    if plan.num_layers != dims.num_layers or plan.num_image_tokens != dims.num_image_tokens:
        raise HimapError(
            f"the plan is for {plan.num_layers} layers / {plan.num_image_tokens} image tokens, "
            f"the model has {dims.num_layers} / {dims.num_image_tokens}"
        )
    if arch.name != dims.architecture:
        raise HimapError(f"graph_specs: the dims are of a {dims.architecture!r} model, the family passed is {arch.name!r}")
    variable = arch.variable_image_tokens
    d, kv, h, hd = dims.hidden_size, dims.num_kv_heads, dims.num_heads, dims.head_dim
    b, s, m = "batch", "sequence", "cache_sequence"
    i64 = "int64"
    specs = [
        arch.vision_spec(dims, dtype),
        GraphSpec(
            name="embed", kind="embed",
            inputs=(TensorSpec("input_ids", i64, (b, s)),),
            outputs=(TensorSpec("inputs_embeds", dtype, (b, s, d)),),
        ),
    ]
    positions = arch.position_shape()
    segments = plan.segments
    for j, (start, end) in enumerate(segments):
        final = j == len(segments) - 1
        inputs = [
            TensorSpec("hidden_states", dtype, (b, s, d)),
            TensorSpec("position_ids", i64, positions),
            TensorSpec("attention_mask", i64, (b, m)),
            TensorSpec("cache_position", i64, (b,)),
        ]
        outputs = [TensorSpec("logits", dtype, (b, dims.vocab_size)) if final
                   else TensorSpec("last_hidden_state", dtype, (b, s, d))]
        for layer in range(start, end):
            inputs += [TensorSpec(n, dtype, (b, kv, m, hd)) for n in past_names(layer)]
            outputs += [TensorSpec(n, dtype, (b, kv, m, hd)) for n in present_names(layer)]
        # DeepStack (Qwen3-VL, docs/QWEN3VL.md): after layer l < deepstack_layers, add deepstack.{l}
        inputs += [TensorSpec(deepstack_name(layer), dtype, (b, s, d))
                   for layer in range(start, min(end, dims.deepstack_layers))]
        if not final:
            outputs.append(TensorSpec(query_name(end - 1), dtype, (b, h, s, hd)))
        specs.append(GraphSpec(
            name=f"segment_{j}", kind="segment", inputs=tuple(inputs), outputs=tuple(outputs),
            layers=(start, end), attrs={"image_tokens": plan.image_tokens_per_segment[j], "final": final},
        ))
        if not final:
            stage = plan.stages[j]
            entering = plan.image_tokens_per_segment[j]
            drop = entering - stage.keep
            kept = f"sequence - {drop}" if drop else s
            # per-request counts: E image slots enter, C leave (the lengths of two shape inputs), each
            # row keeps its own count (<= C) and masks the rest (graphs/variable.py)
            counts = (TensorSpec("keep_counts", i64, (b,)), TensorSpec("image_slots", i64, ("image_slots",)),
                      TensorSpec("kept_slots", i64, ("kept_slots",))) if variable else ()
            if variable:
                kept = "sequence - image_slots + kept_slots"
            if variable and stage.criterion == "drop_all":     # VisiPruner's deep stage: every slot goes
                counts, kept = counts[1:2], "sequence - image_slots"
            scored = end - 1
            # what the criterion reads of layer K-1: queries and keys; VisiPruner's value_norm also
            # the values; drop_all nothing (it drops every image slot)
            attention = [TensorSpec(query_name(scored), dtype, (b, h, s, hd)),
                         TensorSpec(present_names(scored)[0], dtype, (b, kv, s, hd))]
            if stage.criterion == "value_norm":
                attention.append(TensorSpec(present_names(scored)[1], dtype, (b, kv, s, hd)))
            elif stage.criterion == "drop_all":
                attention = []
            specs.append(GraphSpec(
                name=f"scoring_{j}", kind="scoring",
                inputs=(
                    *attention,
                    TensorSpec("attention_mask", i64, (b, s)),
                    TensorSpec("token_type_ids", i64, (b, s)),
                    TensorSpec("hidden_states", dtype, (b, s, d)),
                    TensorSpec("position_ids", i64, positions),
                    *counts,
                ),
                outputs=(
                    TensorSpec("kept_indices", i64, (b, kept)),
                    TensorSpec("kept_hidden_states", dtype, (b, kept, d)),
                    TensorSpec("kept_position_ids", i64, tuple(kept if x == s else x for x in positions)),
                    TensorSpec("kept_attention_mask", i64, (b, kept)),
                    TensorSpec("kept_token_type_ids", i64, (b, kept)),
                ),
                layers=(scored, end), stage=j,
                attrs={"criterion": stage.criterion, "keep": stage.keep, "entering": entering,
                       **({"threshold": stage.threshold} if stage.threshold is not None else {}),
                       **({"seed": stage.seed} if stage.seed is not None else {}),
                       **({"variable": True, "ratio": stage.ratio} if variable else {})},
            ))
    return specs


def segment_cache_lengths(plan: PruningPlan, max_seq_len: int, *, variable_image_tokens: bool) -> list[int]:
    """``max_len_j`` per segment: positions of segment j's slot-cache buffers for ``max_seq_len`` tokens
    (prompt + generated) per request: ``max_seq_len`` minus the image tokens dropped before segment j
    (0 for a family with per-request image-token counts, where a request with few image tokens drops
    few). See :class:`himap_trt.runtime.kv_cache.SlotKVCache`.

    Raises:
        HimapError: if ``max_seq_len`` cannot hold the image tokens (fixed-count families).
    """
    if variable_image_tokens:
        return [max_seq_len] * len(plan.image_tokens_per_segment)
    if max_seq_len <= plan.num_image_tokens:
        raise HimapError(f"max_seq_len {max_seq_len} cannot hold the {plan.num_image_tokens} image tokens")
    return [max_seq_len - (plan.num_image_tokens - n) for n in plan.image_tokens_per_segment]


def static_cache_specs(specs: list[GraphSpec], lengths: list[int]) -> list[GraphSpec]:
    """``specs`` with every segment's ``cache_sequence`` fixed to its ``lengths[j]`` (``--kv-write attention``:
    TensorRT's KV-cache-update layer needs a static cache length; the segment graphs then always run on
    [B, Hkv, max_len_j, Dh] buffers, at prefill too). Other graphs are returned unchanged."""
    segments = iter(lengths)
    out = []
    for spec in specs:
        if spec.kind == "segment":
            length = next(segments)

            def fix(tensor: TensorSpec) -> TensorSpec:
                return TensorSpec(tensor.name, tensor.dtype, tuple(length if d == "cache_sequence" else d
                                                                   for d in tensor.shape))
            spec = GraphSpec(spec.name, spec.kind, tuple(map(fix, spec.inputs)), tuple(map(fix, spec.outputs)),
                             spec.layers, spec.stage, spec.file, {**spec.attrs, "cache_length": length})
        out.append(spec)
    return out


def static_cache_length(spec: GraphSpec) -> int | None:
    """The fixed cache length of a segment graph exported with static caches (``--kv-write attention``,
    :func:`static_cache_specs`), or None (its ``cache_sequence`` is dynamic)."""
    if spec.kind != "segment":
        return None
    dim = spec.input("attention_mask").shape[1]
    return dim if isinstance(dim, int) else None
