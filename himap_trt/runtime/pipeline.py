"""The pipeline: drives the chain of graphs through any backend, with one KV cache per segment.

Prefill::

    pixel_values ─► vision ─► image_features ─┐
    input_ids ────► embed ──► inputs_embeds ──┴─► merge (image positions) ─► hidden
    hidden ─► segment_0 ─► scoring_0 ─► segment_1 ─► scoring_1 ─► ... ─► segment_n ─► logits [B,V]
                 │ cache 0       (kept tokens)  │ cache 1                     │ cache n

Decode (one token per step, position = prompt length + step, appended to every cache)::

    token ─► embed ─► segment_0 ─► segment_1 ─► ... ─► segment_n ─► logits

The pipeline does not know which backend it drives (PyTorch reference, ONNX Runtime, TensorRT).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from himap_trt.errors import HimapError
from himap_trt.graphs.spec import GraphSpec, present_names, query_name
from himap_trt.plan import PruningPlan
from himap_trt.prompt import TOKEN_IMAGE, PromptBatch, prepare_batch
from himap_trt.runtime.backend import Backend
from himap_trt.runtime.kv_cache import SegmentCache, torch_dtype
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
        caches: one :class:`SegmentCache` per segment.
        next_positions: [batch] int64 RoPE position of the first generated token (= real prompt length).
        stages: one :class:`StageOutput` per pruning stage.
    """

    logits: torch.Tensor
    caches: list[SegmentCache]
    next_positions: torch.Tensor
    stages: list[StageOutput]


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
        image_tokens_per_segment: image tokens each segment saw (tokens).
        stages: what each pruning stage kept.
        ttft_s: time to first token (seconds): preprocessing, vision, prefill, first pick.
        tpot_s: mean time per output token after the first (seconds; 0 if one token).
        tokens_per_s: generated tokens of the whole batch per second of generation.
        kv_cache_bytes: bytes held by all segments' KV caches at the end.
        timings: seconds spent per phase (``preprocess``, ``vision``, ``prefill``, ``decode``).
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
    """

    def __init__(self, specs: list[GraphSpec], backends: Mapping[str, Backend], processor: Any, plan: PruningPlan,
                 *, image_token_id: int, device: torch.device | str, eos_token_ids: list[int], pad_token_id: int,
                 max_seq_len: int | None = None, max_positions: int | None = None):
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

    # -- plumbing -------------------------------------------------------------------------------
    def _run(self, name: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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

    # -- inputs ---------------------------------------------------------------------------------
    def prepare(self, images: list[Any], questions: list[str]) -> PromptBatch:
        """Prompt, tokenize (left padding) and preprocess a batch of (PIL image, question) pairs.

        Raises:
            HimapError: empty question, or a prompt longer than ``max_seq_len``.
        """
        batch = prepare_batch(self.processor, images, questions, self.image_token_id, self.num_image_tokens)
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

    # -- prefill --------------------------------------------------------------------------------
    def prefill(self, batch: PromptBatch, timings: dict[str, float] | None = None) -> PrefillResult:
        """Run vision, embeddings, and the segment / scoring chain over the prompts.

        Args:
            batch: prepared inputs (see :meth:`prepare`).
            timings: if given, receives ``vision`` and ``prefill`` durations (seconds).

        Returns:
            The next-token logits, the per-segment caches and what each stage kept.
        """
        dev = self.device
        input_ids = batch.input_ids.to(dev)
        t0 = time.perf_counter()
        features = self._run("vision", {"pixel_values": batch.pixel_values.to(dev, self.dtype)})["image_features"]
        self._sync()
        t1 = time.perf_counter()
        embeds = self._run("embed", {"input_ids": input_ids})["inputs_embeds"]
        image_mask = (input_ids == self.image_token_id)[..., None]
        hidden = embeds.masked_scatter(image_mask, features.to(embeds.dtype))           # [B,S,D]
        positions = batch.position_ids.to(dev)
        mask = batch.attention_mask.to(dev)
        types = batch.token_type_ids.to(dev)
        origin = torch.arange(input_ids.shape[1], device=dev).expand_as(input_ids)      # original positions
        caches, stages = [], []
        logits = None
        for j, seg in enumerate(self.segments):
            cache = SegmentCache.empty(seg, batch.batch_size, dev)
            feeds = cache.feeds(mask)
            out = self._run(seg.name, {"hidden_states": hidden, "position_ids": positions, **feeds})
            cache.update(out, feeds["attention_mask"])
            caches.append(cache)
            if j == len(self.segments) - 1:
                logits = out["logits"]
                break
            scoring = self.scorings[j]
            scored = scoring.layers[0]
            kept = self._run(scoring.name, {
                query_name(scored): out[query_name(scored)],
                present_names(scored)[0]: out[present_names(scored)[0]],
                "attention_mask": mask, "token_type_ids": types,
                "hidden_states": out["last_hidden_state"], "position_ids": positions,
            })
            index = kept["kept_indices"]
            hidden, positions = kept["kept_hidden_states"], kept["kept_position_ids"]
            mask, types = kept["kept_attention_mask"], kept["kept_token_type_ids"]
            origin = torch.gather(origin, 1, index)
            image_positions = [origin[row][types[row] == TOKEN_IMAGE].tolist() for row in range(origin.shape[0])]
            stages.append(StageOutput(index, origin, image_positions))
        self._sync()
        if timings is not None:
            timings["vision"] = t1 - t0
            timings["prefill"] = time.perf_counter() - t1
        next_positions = batch.position_ids[:, -1].to(dev) + 1
        return PrefillResult(logits, caches, next_positions, stages)

    # -- decode ---------------------------------------------------------------------------------
    def decode_one_token(self, tokens: torch.Tensor, positions: torch.Tensor, caches: list[SegmentCache]) -> torch.Tensor:
        """Feed one token per row through every segment, appending it to every cache.

        Args:
            tokens: [batch] int64 ids.
            positions: [batch] int64 RoPE positions of these tokens.
            caches: the per-segment caches (updated in place).

        Returns:
            [batch, vocab] logits of the following token.
        """
        hidden = self._run("embed", {"input_ids": tokens[:, None]})["inputs_embeds"]
        ones = torch.ones((tokens.shape[0], 1), dtype=torch.int64, device=self.device)
        out: dict[str, torch.Tensor] = {}
        for seg, cache in zip(self.segments, caches):
            feeds = cache.feeds(ones)
            out = self._run(seg.name, {"hidden_states": hidden, "position_ids": positions[:, None], **feeds})
            cache.update(out, feeds["attention_mask"])
            hidden = out.get("last_hidden_state")
        return out["logits"]

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
        start = time.perf_counter()
        chooser = TokenChooser(config, self.device)
        state = self.prefill(batch, timings)
        tokens = chooser(state.logits)
        self._sync()
        ttft = preprocess_s + time.perf_counter() - start
        first_token_at = time.perf_counter()

        prompt_len = batch.input_ids.shape[1]
        limit = config.max_new_tokens
        if self.max_seq_len is not None:
            limit = min(limit, self.max_seq_len - prompt_len)
        finished = torch.zeros(batch.batch_size, dtype=torch.bool, device=self.device)
        eos = torch.tensor(self.eos_token_ids or [-1], device=self.device)
        generated: list[torch.Tensor] = []
        while True:
            tokens = torch.where(finished, self.pad_token_id, tokens)
            generated.append(tokens)
            if streamer is not None:
                streamer.put(tokens.cpu())
            finished |= torch.isin(tokens, eos)
            if bool(finished.all()) or len(generated) >= limit:
                break
            positions = state.next_positions + len(generated) - 1
            logits = self.decode_one_token(tokens, positions, state.caches)
            tokens = chooser(logits, torch.stack(generated, dim=1))
        self._sync()
        end = time.perf_counter()
        if streamer is not None:
            streamer.end()

        sequences = torch.stack(generated, dim=1).cpu()                      # [B,T]
        rows, reasons = [], []
        for row in sequences.tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in self.eos_token_ids), None)
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
            kv_cache_bytes=sum(cache.nbytes for cache in state.caches),
            timings=timings,
        )
