"""Preallocated per-segment KV caches with one **slot** (batch row) per running request.

Each decoder segment keeps its own cache: segment j's layers hold only the tokens segment j saw
(a request's real prompt tokens for segment 0, the kept ones after each stage), plus every decoded
token, so the caches of one request have different lengths (METHODS.md, "Decoding with a KV cache").

Layout, allocated once (gpt-fast's static cache, per segment)::

    keys / values   past_key_values.{l}.key/.value   [max_batch, Hkv, max_len_j, Dh]   model dtype
    padding mask    masks[j]                          [max_batch, max_len_j]            int64
    lengths         lengths[j]                        [max_batch]                       int64

``max_len_j = max_seq_len - (image tokens dropped before segment j)``. A slot's tokens are stored
densely from position 0 (prefill copies only a prompt's real tokens, not its batch padding), so
``masks[j][slot, :lengths[j][slot]]`` is 1 and the rest 0. A decode step writes one token at position
``lengths[j][slot]`` of every segment, in place (the graphs' ScatterND / TensorScatter with the
``present`` output bound to the ``past`` buffer). A slot holds at most ``max_len_j - 1`` tokens: the
last position is a scratch column that rows stepped along with others (free slots, or slots not
decoding this step) may write into without touching real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from himap_trt.errors import HimapError
from himap_trt.graphs.spec import GraphSpec, past_names, torch_dtype  # noqa: F401  (torch_dtype: re-exported)

@dataclass
class SlotKVCache:
    """Preallocated per-segment KV caches for ``max_batch`` slots (one slot = one running request).

    Per segment j and layer l: key/value buffers [max_batch, Hkv, max_len_j, Dh] in the model dtype,
    max_len_j = max_seq_len - image tokens dropped before segment j; one padding mask per segment
    [max_batch, max_len_j] int64; per-slot lengths [max_batch] int64 per segment.

    Attributes:
        segments: the segment graph declarations, in chain order.
        max_batch: number of slots.
        max_lens: ``max_len_j`` per segment (tokens).
        tensors: per segment, ``past_key_values.{l}.key/value`` -> buffer.
        masks: per segment, [max_batch, max_len_j] int64.
        lengths: per segment, [max_batch] int64 tokens held per slot.
        occupied: per slot, whether a request holds it.
    """

    segments: list[GraphSpec]
    max_batch: int
    max_lens: list[int]
    tensors: list[dict[str, torch.Tensor]]
    masks: list[torch.Tensor]
    lengths: list[torch.Tensor]
    occupied: list[bool]

    @classmethod
    def allocate(cls, segments: list[GraphSpec], max_batch: int, max_lens: Sequence[int],
                 device: torch.device | str) -> SlotKVCache:
        """Zero-filled caches, every slot free.

        Raises:
            HimapError: if ``max_batch`` < 1 or a ``max_len_j`` < 2.
        """
        if max_batch < 1:
            raise HimapError(f"a KV cache needs at least one slot, got max_batch={max_batch}")
        if min(max_lens) < 2:
            raise HimapError(f"KV-cache buffers need at least 2 positions, got {list(max_lens)}")
        tensors = []
        for spec, length in zip(segments, max_lens):
            buffers = {}
            for layer in range(*spec.layers):
                for name in past_names(layer):
                    tensor_spec = spec.input(name)
                    _, heads, _, head_dim = tensor_spec.shape
                    buffers[name] = torch.zeros((max_batch, heads, length, head_dim),
                                                dtype=torch_dtype(tensor_spec.dtype), device=device)
            tensors.append(buffers)
        masks = [torch.zeros((max_batch, length), dtype=torch.int64, device=device) for length in max_lens]
        lengths = [torch.zeros(max_batch, dtype=torch.int64) for _ in max_lens]
        return cls(list(segments), max_batch, list(max_lens), tensors, masks, lengths, [False] * max_batch)

    def free_slots(self) -> list[int]:
        """Slots holding no request, ascending."""
        return [slot for slot, used in enumerate(self.occupied) if not used]

    def nbytes(self) -> int:
        """Bytes of all key/value buffers (allocated, whatever the slots hold)."""
        return sum(t.numel() * t.element_size() for buffers in self.tensors for t in buffers.values())

    def used_bytes(self) -> int:
        """Bytes of the key/value entries the occupied slots hold (tokens x layers x 2 x Hkv x Dh)."""
        total = 0
        for buffers, lengths in zip(self.tensors, self.lengths):
            per_token = sum(t.shape[1] * t.shape[3] * t.element_size() for t in buffers.values())
            total += per_token * int(lengths.sum())
        return total

    def slot_lengths(self, slot: int) -> list[int]:
        """Tokens slot ``slot`` holds in each segment."""
        return [int(lengths[slot]) for lengths in self.lengths]

    def check_slots(self, slots: Sequence[int], *, occupied: bool) -> None:
        """Raise :class:`HimapError` unless ``slots`` are distinct valid slots, all occupied (or all free)."""
        if len(set(slots)) != len(slots):
            raise HimapError(f"slots must be distinct, got {list(slots)}")
        for slot in slots:
            if not 0 <= slot < self.max_batch:
                raise HimapError(f"slot {slot} is out of range: the cache has {self.max_batch} slot(s)")
            if self.occupied[slot] != occupied:
                state = "free" if occupied else "occupied"
                raise HimapError(f"slot {slot} is {state}")

    def store(self, segment: int, slot: int, buffers: dict[str, torch.Tensor], row: int, mask: torch.Tensor) -> None:
        """Copy row ``row`` of a prefill's exact-size buffers (its real tokens, ``mask`` [S_j] = 1) into
        slot ``slot`` of segment ``segment``, densely from position 0."""
        real = mask.bool()
        count = int(real.sum())
        if count > self.max_lens[segment] - 1:
            raise HimapError(f"the prompt needs {count} cache positions in segment {segment} but the cache holds "
                             f"{self.max_lens[segment] - 1}; allocate with a larger max_seq_len")
        seq = mask.shape[0]
        suffix = bool(real[seq - count:].all())          # left padding: the real tokens are a suffix
        for name, source in buffers.items():
            values = source[row, :, seq - count:] if suffix else source[row][:, real]
            self.tensors[segment][name][slot, :, :count] = values
        self.masks[segment][slot] = 0
        self.masks[segment][slot, :count] = 1
        self.lengths[segment][slot] = count

    def release(self, slots: Sequence[int]) -> None:
        """Free ``slots`` (length 0, mask cleared); their buffers are overwritten by the next prefill."""
        for slot in slots:
            for mask, lengths in zip(self.masks, self.lengths):
                mask[slot] = 0
                lengths[slot] = 0
            self.occupied[slot] = False

    def copy_slot(self, source: int, target: int) -> None:
        """Give free slot ``target`` a copy of occupied slot ``source``'s tokens in every segment (a
        request's ``n`` choices share one prefill), and mark it occupied.

        Raises:
            HimapError: ``source`` free or ``target`` occupied (or either out of range).
        """
        self.check_slots([source], occupied=True)
        self.check_slots([target], occupied=False)
        for buffers, mask, lengths in zip(self.tensors, self.masks, self.lengths):
            count = int(lengths[source])
            for tensor in buffers.values():
                tensor[target, :, :count] = tensor[source, :, :count]
            mask[target] = mask[source]
            lengths[target] = count
        self.occupied[target] = True
