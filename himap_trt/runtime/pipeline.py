"""The pipeline: drives the chain of graphs through any backend, with one KV cache per segment.

Prefill::

    pixel_values ─► vision ─► image_features ─┐
    input_ids ────► embed ──► inputs_embeds ──┴─► merge (image positions) ─► hidden
    hidden ─► segment_0 ─► scoring_0 ─► segment_1 ─► scoring_1 ─► ... ─► segment_n ─► logits [B,V]
                 │ cache 0       (kept tokens)  │ cache 1                     │ cache n

Decode (one token per step, position = prompt length + step, written in place into every
segment's preallocated cache at the slot's length)::

    token ─► embed ─► segment_0 ─► segment_1 ─► ... ─► segment_n ─► logits

Requests live in **slots** of a :class:`~himap_trt.runtime.kv_cache.SlotKVCache`: ``allocate``,
``prefill`` (into chosen free slots), ``decode_step`` (any occupied slots, each at its own length),
``release``; ``generate`` is those four for one batch. A server joins and leaves requests between
steps with the same four calls (docs/ARCHITECTURE.md, "KV-cache layout").

The pipeline does not know which backend it drives (PyTorch reference, ONNX Runtime, TensorRT).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from himap_trt.errors import HimapError
from himap_trt.arch import get_architecture
from himap_trt.graphs.spec import (DEEPSTACK_OUTPUT, GraphSpec, past_names, present_names, query_name,
                                   static_cache_length)
from himap_trt.plan import PruningPlan
from himap_trt.prompt import TOKEN_IMAGE, PromptBatch
from himap_trt.runtime.backend import Backend
from himap_trt.runtime.evs import apply_evs, check_evs_rate
from himap_trt.runtime.kv_cache import SlotKVCache, torch_dtype
from himap_trt.runtime.sampling import GenerationConfig, TokenChooser


@dataclass
class StageOutput:
    """What one pruning stage kept, for a batch.

    Attributes:
        kept_indices: [batch, S'] int64, indices into the sequence that entered the stage.
        kept_positions: [batch, S'] int64, the same tokens' positions in the original prompt.
        kept_image_positions: per row, the original prompt positions of the kept image tokens.
    """

    kept_indices: torch.Tensor
    kept_positions: torch.Tensor
    kept_image_positions: list[list[int]]


@dataclass
class PrefillResult:
    """The state after prefill.

    Attributes:
        logits: [batch, vocab] logits of the next token, model dtype.
        next_positions: [batch] int64 RoPE position of the first generated token (= real prompt length).
        stages: one :class:`StageOutput` per pruning stage.
        cache: the slot cache the prompts were written into.
        slots: the slot of each prompt row.
        image_tokens: per row, the image tokens each segment saw (models with per-request counts;
            after VisiPruner's middle stage, the tokens the row uses, not its min(C, |V|) slots).
        evs_kept: per row, the visual tokens EVS kept ([keep] int64 indices into the row's visual
            tokens, before the decoder; ``image_tokens`` then counts from them); None without EVS.
    """

    logits: torch.Tensor
    next_positions: torch.Tensor
    stages: list[StageOutput]
    cache: SlotKVCache
    slots: list[int] = field(default_factory=list)
    image_tokens: list[list[int]] | None = None
    evs_kept: list[torch.Tensor] | None = None


@dataclass
class GenerationOutput:
    """Generated tokens and per-request statistics of one batch.

    Attributes:
        sequences: [batch, steps] int64 generated ids; rows that ended early are padded with the
            pad token after their EOS (as transformers' ``generate``).
        tokens: per row, generated ids up to and including EOS.
        texts: per row, the decoded answer (special tokens skipped).
        finish_reasons: per row, ``eos``, ``max_new_tokens`` or ``max_seq_len``.
        prompt_tokens: per row, real prompt tokens (tokens).
        image_tokens_per_segment: image tokens each segment saw (tokens); for models with per-request
            counts, those of the export's bound (each row's own: ``image_tokens_per_row``).
        stages: what each pruning stage kept.
        ttft_s: time to first token (seconds): preprocessing, vision, prefill, first pick (not the
            one-off KV-cache allocation, ``timings['allocate']``).
        tpot_s: mean time per output token after the first (seconds; 0 if one token).
        tokens_per_s: generated tokens of the whole batch per second of generation.
        kv_cache_bytes: bytes held by all segments' KV caches at the end.
        timings: seconds spent per phase (``preprocess``, ``allocate``, ``vision``, ``prefill``, ``decode``).
        itl_s: inter-token latencies (seconds): time from each token to the next, batch-wide.
    """

    sequences: torch.Tensor
    tokens: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: list[int]
    image_tokens_per_segment: list[int]
    stages: list[StageOutput]
    ttft_s: float
    tpot_s: float
    tokens_per_s: float
    kv_cache_bytes: int
    timings: dict[str, float] = field(default_factory=dict)
    itl_s: list[float] = field(default_factory=list)
    image_tokens_per_row: list[list[int]] | None = None


class Pipeline:
    """Runs prefill and decode over a chain of graphs.

    Args:
        specs: the graph declarations in chain order (:func:`himap_trt.graphs.spec.graph_specs`).
        backends: graph name -> backend running it.
        processor: the model's processor (tokenizer, image processor, chat template).
        plan: the pruning plan the graphs implement.
        image_token_id: the image placeholder id.
        device: where the backends take and return tensors.
        eos_token_ids: ids that end a sequence.
        pad_token_id: id written after a sequence ended.
        max_seq_len: most tokens (prompt + generated) per sequence, or None for no limit.
        max_positions: the model's ``max_position_embeddings`` (tokens), or None if unknown: a prompt
            too long for ``max_seq_len`` suggests re-exporting only if the model allows more.
        architecture: the model family (:mod:`himap_trt.arch`): prompt preparation, the vision
            graph's feeds, position ids; ``ModelDims.architecture``. Default: the vision graph's
            ``attrs['architecture']`` (set by families other than LLaVA-1.5), else ``llava``.
    """

    def __init__(self, specs: list[GraphSpec], backends: Mapping[str, Backend], processor: Any, plan: PruningPlan,
                 *, image_token_id: int, device: torch.device | str, eos_token_ids: list[int], pad_token_id: int,
                 max_seq_len: int | None = None, max_positions: int | None = None, architecture: str | None = None):
        vision = next((spec for spec in specs if spec.kind == "vision"), None)
        self.arch = get_architecture(architecture or (vision.attrs.get("architecture", "llava") if vision else "llava"))
        self.specs = {spec.name: spec for spec in specs}
        self.segments = [spec for spec in specs if spec.kind == "segment"]
        self.scorings = [spec for spec in specs if spec.kind == "scoring"]
        if len(self.scorings) != len(self.segments) - 1 or len(self.segments) != len(plan.segments):
            raise HimapError(f"the graphs ({', '.join(self.specs)}) do not match the plan ({plan.describe()})")
        missing = [name for name in self.specs if name not in backends]
        if missing:
            raise HimapError(f"no backend for graph(s) {', '.join(missing)}")
        self.backends = dict(backends)
        self.processor = processor
        self.plan = plan
        self.image_token_id = image_token_id
        self.device = torch.device(device)
        self.dtype = torch_dtype(self.specs["vision"].inputs[0].dtype)
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.max_seq_len = max_seq_len
        self.max_positions = max_positions
        self.num_image_tokens = plan.num_image_tokens
        #: generate() allocates its caches to ``max_seq_len`` (True: what a server's slots hold; ``bench
        #: --full-cache``) instead of prompt + new tokens (False, the default)
        self.full_cache = False

    # -- plumbing -------------------------------------------------------------------------------
    def _run(self, name: str, feeds: Mapping[str, torch.Tensor],
             outputs: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        if outputs:
            return self.backends[name].run(feeds, outputs)
        return self.backends[name].run(feeds)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Close every backend."""
        for backend in self.backends.values():
            backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def evs_rates(self, batch: PromptBatch) -> list[float]:
        """EVS rate q of every visual input (``image_grid_thw`` row; one per row for a ``prepare``
        batch): the request's own (``batch.evs_rates``), else the export's (``plan.evs_rate``); 0 for
        an input of one temporal patch (an image: EVS keeps every token anyway).

        Raises:
            HimapError: a rate outside [0, 1), ``evs_rates`` not one per visual input, or EVS asked of
                a model without per-request visual token counts (LLaVA).
        """
        count = batch.visual_inputs
        own = batch.evs_rates or [None] * count
        if len(own) != count:
            raise HimapError(f"evs_rates: {len(own)} rates for {count} visual inputs (one per image or video)")
        rates = [check_evs_rate(self.plan.evs_rate if r is None else r, "evs_rate") for r in own]
        if any(rates) and not self.arch.variable_image_tokens:
            raise HimapError("EVS (evs_rate) needs a video model (Qwen2.5-VL, Qwen3-VL); this export's images have "
                             "a fixed token count")
        if batch.image_grid_thw is None:
            return rates
        return [rate if int(grid[0]) > 1 else 0.0 for rate, grid in zip(rates, batch.image_grid_thw)]

    # -- inputs ---------------------------------------------------------------------------------
    def prepare(self, images: list[Any], questions: list[str], processor: Any = None) -> PromptBatch:
        """Prompt, tokenize (left padding) and preprocess a batch of (PIL image, question) pairs.

        ``processor``: a copy of this pipeline's processor to use instead of it (a thread's own, as
        fast tokenizers are not safe to share between threads); None: the pipeline's.

        Raises:
            HimapError: empty question, or a prompt longer than ``max_seq_len``.
        """
        batch = self.arch.prepare_batch(processor or self.processor, images, questions, self.image_token_id,
                                        self.num_image_tokens)
        length = batch.input_ids.shape[1]
        if self.max_seq_len is not None and length >= self.max_seq_len:
            if self.max_positions is not None and self.max_seq_len >= self.max_positions:
                remedy = f"the model allows no more ({self.max_positions} positions): shorten the question"
            elif self.max_positions is not None:
                remedy = (f"shorten the question or re-export with a larger --max-seq-len (the model allows up to "
                          f"{self.max_positions})")
            else:
                remedy = "shorten the question or re-export with a larger --max-seq-len"
            raise HimapError(
                f"the prompt has {length} tokens but the export's --max-seq-len is {self.max_seq_len} "
                f"(prompt plus at least one generated token must fit); {remedy}"
            )
        return batch

    def prepare_conversation(self, conversation: Any, visuals: list[Any], processor: Any = None) -> PromptBatch:
        """A one-row batch for a conversation (:class:`himap_trt.chat.Conversation`; ``visuals``: its
        loaded images / videos in prompt order).

        A conversation that is one user message holding one visual input then text is prepared
        exactly as :meth:`prepare` does (special-token text in the question tokenized as text);
        any other goes through the family's ``prepare_conversation`` (chat template over every
        message, visual inputs pooled, instruction tokens by the conversation rule).

        Raises:
            HimapError: more visual inputs than the graphs hold, special-token text in a conversation,
                or a prompt that does not fit (naming its token count).
        """
        processor = processor or self.processor
        messages = conversation.messages
        kinds = [p.kind for p in messages[0].parts] if len(messages) == 1 else []
        if len(kinds) >= 2 and kinds[0] != "text" and all(k == "text" for k in kinds[1:]):
            return self._with_evs_rates(self.prepare(list(visuals), [messages[0].text], processor=processor),
                                        conversation)
        batch = self.arch.prepare_conversation(processor, conversation, list(visuals), self.image_token_id,
                                               self.num_image_tokens)
        self.check_fits(batch)
        return self._with_evs_rates(batch, conversation)

    @staticmethod
    def _with_evs_rates(batch: PromptBatch, conversation: Any) -> PromptBatch:
        """``batch`` with its video parts' own EVS rates (``video_url.evs_rate``, one per visual input in
        prompt order; None: the export's), when any part has one."""
        rates = [p.options.get("evs_rate") if p.kind == "video" else None for p in conversation.visual_parts]
        if any(r is not None for r in rates):
            if len(rates) != batch.visual_inputs:
                raise HimapError(f"messages: {len(rates)} visual inputs but the prompt holds {batch.visual_inputs}")
            batch.evs_rates = [None if r is None else float(r) for r in rates]
        return batch

    def capacity(self, batch: PromptBatch) -> int | None:
        """Most tokens (prompt + generated) a row of ``batch`` may hold (tokens), or None (no limit).

        ``max_seq_len``; for a prompt without visual tokens on a fixed-|V| export less: every segment
        keeps all its tokens, while segment j's cache holds ``max_seq_len - dropped_j``.
        """
        if self.max_seq_len is None:
            return None
        if self.arch.variable_image_tokens or bool((batch.input_ids == self.image_token_id).any()):
            return self.max_seq_len
        return self.max_seq_len - (self.num_image_tokens - min(self.plan.image_tokens_per_segment))

    def check_fits(self, batch: PromptBatch) -> None:
        """Raise :class:`HimapError` naming the token count unless each prompt leaves room for one
        generated token (:meth:`capacity`)."""
        limit = self.capacity(batch)
        length = max(batch.prompt_lengths)
        if limit is not None and length >= limit:
            text_only = limit != self.max_seq_len
            raise HimapError(
                f"messages: the conversation has {length} tokens but the export's --max-seq-len allows "
                f"{limit - 1} prompt tokens{' for a prompt without an image' if text_only else ''} (prompt plus at "
                "least one generated token must fit); shorten the conversation or re-export with a larger --max-seq-len")

    # -- slots ----------------------------------------------------------------------------------
    def allocate(self, max_batch: int, *, max_seq_len: int | None = None) -> SlotKVCache:
        """Allocate caches for ``max_batch`` slots, all free.

        Args:
            max_batch: number of slots.
            max_seq_len: most tokens (prompt + generated) per request (tokens); default the
                pipeline's ``max_seq_len``. Segment j's buffers hold ``max_seq_len - dropped_j``
                positions.

        Raises:
            HimapError: without a ``max_seq_len`` (neither given nor the pipeline's), or if it cannot
                hold the image tokens.
        """
        static = [static_cache_length(spec) for spec in self.segments]
        if all(static):
            # --kv-write attention: the graphs take caches of the length fixed at export, whatever is asked
            return SlotKVCache.allocate(self.segments, max_batch, static, self.device)
        length = max_seq_len or self.max_seq_len
        if length is None:
            raise HimapError("allocating a KV cache needs a max_seq_len (the pipeline has none; pass one)")
        if self.arch.variable_image_tokens:
            # a request with few image tokens drops few: every segment may hold the whole length
            dropped = [0] * len(self.plan.image_tokens_per_segment)
        else:
            dropped = [self.num_image_tokens - n for n in self.plan.image_tokens_per_segment]
            if length - max(dropped) < 2:
                raise HimapError(f"max_seq_len {length} cannot hold the {self.num_image_tokens} image tokens")
        return SlotKVCache.allocate(self.segments, max_batch, [length - d for d in dropped], self.device)

    def release(self, cache: SlotKVCache, slots: Sequence[int]) -> None:
        """Free the slots (length 0); they can be prefilled again.

        Raises:
            HimapError: if a slot is out of range or already free.
        """
        cache.check_slots(list(slots), occupied=True)
        cache.release(list(slots))

    # -- prefill --------------------------------------------------------------------------------
    def prefill(self, batch: PromptBatch, timings: dict[str, float] | None = None, *,
                cache: SlotKVCache | None = None, slots: Sequence[int] | None = None) -> PrefillResult:
        """Run vision, embeddings, and the segment / scoring chain over the prompts; write each prompt's
        KV entries into its slot.

        The segment graphs run on exact-size buffers ([batch, Hkv, S_j, Dh], attention over the
        prompt only); each row's real tokens are then copied into its slot (one copy per request).

        Args:
            batch: prepared inputs (see :meth:`prepare`).
            timings: if given, receives ``vision`` and ``prefill`` durations (seconds).
            cache: where to write (default: a new cache for the batch, :meth:`allocate` with the
                pipeline's ``max_seq_len``, or the prompt length + 1 if it has none).
            slots: slot of each prompt row (default 0..batch-1).

        Returns:
            The next-token logits [batch, vocab], next positions [batch], what each stage kept, and
            the cache.

        Raises:
            HimapError: if a slot is not free or out of range, or the prompt does not fit the cache.
        """
        dev = self.device
        size, seq = batch.input_ids.shape
        if cache is None:
            cache = self.allocate(size, max_seq_len=self.max_seq_len or seq + 1)
        slots = list(range(size)) if slots is None else [int(s) for s in slots]
        if len(slots) != size:
            raise HimapError(f"{size} prompt(s) need {size} slot(s), got {len(slots)}")
        cache.check_slots(slots, occupied=False)
        need = int(batch.attention_mask.sum(1).max()) + 1
        if need > (cache.max_lens[0] if bool((batch.input_ids == self.image_token_id).any()) else min(cache.max_lens)):
            raise HimapError(f"the prompt has {need - 1} tokens but the cache holds {cache.max_lens[0] - 1} "
                             "(prompt plus at least one generated token must fit); allocate a larger cache")
        input_ids = batch.input_ids.to(dev)
        t0 = time.perf_counter()
        # no visual token in the batch (text-only conversations): no vision graph, no pruning stage
        visual = bool((batch.input_ids == self.image_token_id).any())
        seen = {}
        if visual:
            vision_spec = self.specs["vision"]
            vision = {name: t.to(dev, torch_dtype(vision_spec.input(name).dtype) if t.is_floating_point() else t.dtype)
                      for name, t in self.arch.vision_feeds(batch, vision_spec).items()}
            seen = self._run("vision", vision)
            features = seen[self.specs["vision"].outputs[0].name]
            self._sync()
        t1 = time.perf_counter()
        unpruned, evs_kept = batch, None
        rates = self.evs_rates(batch)
        if any(rates):      # EVS before the LLM (runtime/evs.py): a shorter batch, positions unpruned
            batch, features, deep, evs_kept = apply_evs(
                batch, features, seen.get(DEEPSTACK_OUTPUT), rates, int(vision_spec.attrs["spatial_merge_size"]),
                self.image_token_id, self.pad_token_id)
            if deep is not None:
                seen = {**seen, DEEPSTACK_OUTPUT: deep}
            input_ids = batch.input_ids.to(dev)
            size, seq = batch.input_ids.shape
        embeds = self._run("embed", {"input_ids": input_ids})["inputs_embeds"]
        image_mask = (input_ids == self.image_token_id)[..., None]
        hidden = embeds.masked_scatter(image_mask, features.to(embeds.dtype)) if visual else embeds   # [B,S,D]
        # DeepStack (Qwen3-VL): per layer, the image tokens' features at their positions, 0 elsewhere:
        # [n, B, S, D], gathered by every stage's kept indices like the hidden states (docs/QWEN3VL.md)
        deepstack = None
        if DEEPSTACK_OUTPUT in seen:
            deepstack = torch.stack([torch.zeros_like(embeds).masked_scatter(image_mask, layer.to(embeds.dtype))
                                     for layer in seen[DEEPSTACK_OUTPUT]])
        positions = batch.position_ids.to(dev)
        mask = batch.attention_mask.to(dev)
        types = batch.token_type_ids.to(dev)
        origin = torch.arange(seq, device=dev).expand_as(input_ids)                     # original positions
        stages = []
        logits = None
        # per-row image tokens of every segment (METHODS.md rounding per request)
        counts = [self.plan.image_tokens_for(n) if self.arch.variable_image_tokens else
                  self.plan.image_tokens_per_segment
                  for n in self.arch.image_token_counts(batch, self.num_image_tokens)]
        if not visual:
            counts = [[0] * len(self.segments) for _ in range(size)]
        reported = [list(c) for c in counts]      # what each row's segments see (counts: the slots fed)
        start = torch.zeros(size, dtype=torch.int64, device=dev)
        for j, seg in enumerate(self.segments):
            length = mask.shape[1]
            # exact-size buffers, or (--kv-write attention) the static length fixed at export: zero-filled,
            # the mask padded with zeros, the S tokens written at positions 0..S-1
            static = static_cache_length(seg)
            buffer_length = static or length
            if buffer_length < length:
                raise HimapError(f"the prompt has {length} positions in segment {j} but its graph takes a cache "
                                 f"of {buffer_length}; shorten the question or re-export with a larger --max-seq-len")
            alloc = torch.zeros if static else torch.empty
            buffers = {}
            for layer in range(*seg.layers):
                for name in past_names(layer):
                    _, heads, _, head_dim = seg.input(name).shape
                    buffers[name] = alloc((size, heads, buffer_length, head_dim), dtype=self.dtype, device=dev)
            presents = {present: buffers[past] for layer in range(*seg.layers)
                        for past, present in zip(past_names(layer), present_names(layer))}
            layered = {name: torch.zeros_like(hidden) if deepstack is None else deepstack[int(name.split(".")[1])]
                       for name in seg.input_names if name.startswith("deepstack.")}
            segment_mask = torch.nn.functional.pad(mask, (0, buffer_length - length)) if static else mask
            out = self._run(seg.name, {"hidden_states": hidden, "position_ids": positions,
                                       "attention_mask": segment_mask, "cache_position": start, **buffers,
                                       **layered}, presents)
            if static:      # the prompt's S positions of the static buffers (views)
                buffers = {name: buffer[:, :, :length] for name, buffer in buffers.items()}
                past_of = {present: past for layer in range(*seg.layers)
                           for past, present in zip(past_names(layer), present_names(layer))}
                out = {name: buffers[past_of[name]] if name in past_of else value for name, value in out.items()}
            for row, slot in enumerate(slots):
                cache.store(j, slot, buffers, row, mask[row])
            if j == len(self.segments) - 1:
                logits = out["logits"]
                break
            if not visual:           # a stage with no visual token keeps every token
                hidden = out["last_hidden_state"]
                index = torch.arange(hidden.shape[1], device=dev).expand(size, -1)
                stages.append(StageOutput(index, origin, [[] for _ in range(size)]))
                continue
            scoring = self.scorings[j]
            scored = scoring.layers[0]
            available = {
                query_name(scored): out[query_name(scored)],
                **{name: out[name] for name in present_names(scored)},
                "attention_mask": mask, "token_type_ids": types,
                "hidden_states": out["last_hidden_state"], "position_ids": positions,
                "keep_counts": torch.tensor([c[j + 1] for c in counts], dtype=torch.int64, device=dev),
                "image_slots": torch.arange(max(c[j] for c in counts), device=dev),
                "kept_slots": torch.arange(max(c[j + 1] for c in counts), device=dev),
            }
            kept = self._run(scoring.name, {name: available[name] for name in scoring.input_names})
            index = kept["kept_indices"]
            hidden, positions = kept["kept_hidden_states"], kept["kept_position_ids"]
            mask, types = kept["kept_attention_mask"], kept["kept_token_type_ids"]
            origin = torch.gather(origin, 1, index)
            if deepstack is not None:       # pruned tokens' later DeepStack additions go with them
                deepstack = torch.gather(deepstack, 2, index[None, :, :, None].expand(
                    deepstack.shape[0], -1, -1, deepstack.shape[-1]))
            # masked slots (VisiPruner rows keeping fewer than C tokens) are not kept tokens
            image_positions = [origin[row][(types[row] == TOKEN_IMAGE) & (mask[row] == 1)].tolist()
                               for row in range(origin.shape[0])]
            if self.plan.stages[j].criterion == "value_norm" and self.arch.variable_image_tokens:
                # VisiPruner: the row's count was its slots min(C, |V|); report the tokens it uses
                for used, p in zip(reported, image_positions):
                    used[j + 1] = len(p)
            stages.append(StageOutput(index, origin, image_positions))
        for slot in slots:
            cache.occupied[slot] = True
        self._sync()
        if timings is not None:
            timings["vision"] = t1 - t0
            timings["prefill"] = time.perf_counter() - t1
        next_positions = self.arch.next_positions(unpruned).to(dev)        # the unpruned prompt's (METHODS.md)
        return PrefillResult(logits, next_positions, stages, cache, slots,
                             reported if self.arch.variable_image_tokens or not visual else None, evs_kept)

    # -- decode ---------------------------------------------------------------------------------
    def decode_step(self, cache: SlotKVCache, tokens: torch.Tensor, positions: torch.Tensor,
                    slots: Sequence[int]) -> torch.Tensor:
        """One decode step for the given occupied slots, each at its own length.

        The graphs run over the contiguous slot range ``min(slots)..max(slots)`` (views of the cache
        buffers, written in place). Rows of that range not in ``slots`` (free, or not stepping now)
        are fed a dummy token written at their length (or the scratch column), which their mask does
        not cover, so their contents and the other rows' results are unaffected.

        Args:
            cache: the slot cache.
            tokens: [n] int64 ids, one per slot.
            positions: [n] int64 RoPE positions of these tokens.
            slots: n distinct occupied slots.

        Returns:
            [n, vocab] logits of the following token. One token is appended to each slot's cache in
            every segment.

        Raises:
            HimapError: if a slot is free, repeated or out of range, or would exceed its ``max_len_j``.
        """
        slots = [int(s) for s in slots]
        if not slots:
            raise HimapError("decode_step needs at least one slot")
        if tokens.shape != (len(slots),) or positions.shape != (len(slots),):
            raise HimapError(f"decode_step: tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} "
                             f"must both be [{len(slots)}] (one per slot)")
        cache.check_slots(slots, occupied=True)
        for j, lengths in enumerate(cache.lengths):
            full = [s for s in slots if int(lengths[s]) > cache.max_lens[j] - 2]
            if full:
                raise HimapError(f"slot(s) {full} hold {int(lengths[full[0]])} tokens in segment {j}, the most its "
                                 f"cache takes ({cache.max_lens[j] - 1}); the request reached max_seq_len")
        low, high = min(slots), max(slots)
        rows = high - low + 1
        where = torch.tensor([s - low for s in slots])
        dev = self.device
        ids = torch.full((rows,), self.pad_token_id, dtype=torch.int64, device=dev)
        ids[where] = tokens.to(dev)
        pos = torch.zeros((rows,), dtype=torch.int64, device=dev)
        pos[where] = positions.to(dev)
        hidden = self._run("embed", {"input_ids": ids[:, None]})["inputs_embeds"]
        slot_index = torch.tensor(slots)
        out: dict[str, torch.Tensor] = {}
        for j, seg in enumerate(self.segments):
            lengths = cache.lengths[j]
            write = lengths[low:high + 1].clamp(max=cache.max_lens[j] - 1)        # dummy rows: length or scratch
            cache.masks[j][slot_index, lengths[slot_index]] = 1
            buffers = {name: tensor[low:high + 1] for name, tensor in cache.tensors[j].items()}
            presents = {present: buffers[past] for layer in range(*seg.layers)
                        for past, present in zip(past_names(layer), present_names(layer))}
            # a generated token is no image token: its DeepStack additions are 0
            layered = {name: torch.zeros_like(hidden) for name in seg.input_names if name.startswith("deepstack.")}
            out = self._run(seg.name, {"hidden_states": hidden, "position_ids": self.arch.decode_position_ids(pos),
                                       "attention_mask": cache.masks[j][low:high + 1],
                                       "cache_position": write.to(dev), **buffers, **layered}, presents)
            lengths[slot_index] += 1
            hidden = out.get("last_hidden_state")
        return out["logits"][where.to(dev)]

    def decode_one_token(self, tokens: torch.Tensor, positions: torch.Tensor, cache: SlotKVCache) -> torch.Tensor:
        """:meth:`decode_step` over every occupied slot of ``cache`` (tokens/positions [occupied], in slot order)."""
        return self.decode_step(cache, tokens, positions, [s for s, used in enumerate(cache.occupied) if used])

    def generate(self, batch: PromptBatch, config: GenerationConfig, streamer: Any = None,
                 preprocess_s: float = 0.0) -> GenerationOutput:
        """Prefill then decode until every row hit EOS, ``max_new_tokens`` or ``max_seq_len``.

        Args:
            batch: prepared inputs.
            config: decoding settings.
            streamer: optional transformers-style streamer (``put(ids)``, ``end()``), batch 1 only.
            preprocess_s: seconds already spent preparing ``batch`` (counted into TTFT).

        Returns:
            Tokens, texts and statistics (see :class:`GenerationOutput`).
        """
        if streamer is not None and batch.batch_size != 1:
            raise HimapError("streaming output needs a batch of one prompt; pass --no-stream")
        timings = {"preprocess": preprocess_s}
        prompt_len = batch.input_ids.shape[1]
        limit = config.max_new_tokens
        if self.max_seq_len is not None:
            limit = min(limit, self.capacity(batch) - prompt_len)
        # Caches sized for this batch's answer (gpt-fast's max_seq_length = prompt + new tokens), so a
        # short answer does not attend over a max_seq_len-long buffer. Allocating them is set-up (a
        # server allocates its slots once), reported as timings["allocate"], not counted in TTFT.
        # (full_cache: allocated to max_seq_len, as a server's slots are; the attention form's are always)
        allocated_at = time.perf_counter()
        # a prompt without visual tokens drops none: room for it in every segment
        extra = 0 if self.arch.variable_image_tokens or bool((batch.input_ids == self.image_token_id).any()) else \
            self.num_image_tokens - min(self.plan.image_tokens_per_segment)
        cache = self.allocate(batch.batch_size, max_seq_len=None if self.full_cache and self.max_seq_len
                              else prompt_len + limit + extra)
        timings["allocate"] = time.perf_counter() - allocated_at
        start = time.perf_counter()
        chooser = TokenChooser(config, self.device)
        slots = list(range(batch.batch_size))
        state = self.prefill(batch, timings, cache=cache, slots=slots)
        tokens = chooser(state.logits)
        self._sync()
        ttft = preprocess_s + time.perf_counter() - start
        first_token_at = time.perf_counter()

        finished = torch.zeros(batch.batch_size, dtype=torch.bool, device=self.device)
        eos = torch.tensor(self.eos_token_ids if self.eos_token_ids and not config.ignore_eos else [-1],
                           device=self.device)
        # The tokens so far, written in place: a step costs the same at token 1,000 as at token 1
        # (stacking a growing list every step cost ~1 us per generated token per step).
        generated = torch.empty((batch.batch_size, max(limit, 1)), dtype=torch.int64, device=self.device)
        count = 0
        token_times = [first_token_at]
        while True:
            tokens = torch.where(finished, self.pad_token_id, tokens)
            generated[:, count] = tokens
            count += 1
            if streamer is not None:
                streamer.put(tokens.cpu())
            finished |= torch.isin(tokens, eos)
            if bool(finished.all()) or count >= limit:
                break
            positions = state.next_positions + count - 1
            logits = self.decode_step(cache, tokens, positions, slots)
            tokens = chooser(logits, generated[:, :count])
            self._sync()
            token_times.append(time.perf_counter())
        self._sync()
        end = time.perf_counter()
        if streamer is not None:
            streamer.end()

        sequences = generated[:, :count].cpu()                                # [B,T]
        rows, reasons = [], []
        for row in sequences.tolist():
            cut = None if config.ignore_eos else next((i + 1 for i, t in enumerate(row) if t in self.eos_token_ids), None)
            rows.append(row[:cut] if cut else row)
            if cut:
                reasons.append("eos")
            elif len(row) >= config.max_new_tokens:
                reasons.append("max_new_tokens")
            else:
                reasons.append("max_seq_len")
        steps = sequences.shape[1]
        decode_s = end - first_token_at
        timings["decode"] = decode_s
        total_new = sum(len(r) for r in rows)
        return GenerationOutput(
            sequences=sequences,
            tokens=rows,
            texts=self.processor.tokenizer.batch_decode(rows, skip_special_tokens=True),
            finish_reasons=reasons,
            prompt_tokens=batch.prompt_lengths,
            image_tokens_per_segment=self.plan.image_tokens_per_segment,
            stages=state.stages,
            ttft_s=ttft,
            tpot_s=decode_s / (steps - 1) if steps > 1 else 0.0,
            tokens_per_s=total_new / (ttft - preprocess_s + decode_s) if total_new else 0.0,
            kv_cache_bytes=cache.nbytes(),
            timings=timings,
            itl_s=[b - a for a, b in zip(token_times, token_times[1:])],
            image_tokens_per_row=state.image_tokens,
        )
