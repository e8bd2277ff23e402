"""The graphs as PyTorch modules: what the torch backend runs and what the ONNX export traces.

Every module's ``forward`` takes its :class:`~himap_trt.graphs.spec.GraphSpec` inputs
positionally, in spec order, and returns its outputs as a tuple in spec order. The modules share
their parameters with the Hugging Face model they were built from (no copies).

Decoder-segment data flow (one segment, layers [a, b)); M = the cache buffer's length::

    hidden_states [B,S,D] ──► layer a ──► ... ──► layer b-1 ──► last_hidden_state [B,S,D]
    position_ids [B,S] ──► RoPE cos/sin            │            (final segment: norm + lm_head on
    attention_mask [B,M], cache_position [B]       │             the last position -> logits [B,V])
        ──► causal + padding bias [B,1,S,M]        │
    past_key_values.{l}.key/value [B,Hkv,M,Dh] ──► write the S new keys/values at cache_position[b]
        (in place where the backend aliases the buffers) ──► present.{l}.key/value [B,Hkv,M,Dh]
                                                   └─► query.{b-1} [B,H,S,Dh] (if a stage follows)

Length (~510 lines): the decoder layer, the segment pieces and the stage scorers share one
attention bias and one score computation (``stage_scores``, ``kept_indices``), which
``graphs/variable.py`` and ``graphs/visipruner.py`` reuse; ``graphs/build.py`` picks the module of a spec.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from himap_trt.prompt import TOKEN_IMAGE, TOKEN_INSTRUCTION

_MASKED = torch.finfo(torch.float32).min


def attention_bias(attention_mask: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """Additive causal + padding bias for queries at given cache positions.

    Args:
        attention_mask: [batch, M] integer, 1 for real tokens in the cache buffer, 0 for padding and
            unused positions.
        query_positions: [batch, S] int64, the cache position of each query token (its own key's
            position).

    Returns:
        [batch, 1, S, M] float32: 0 where key j is visible to query i (j <= query_positions[b, i] and
        not padding), the most negative float32 elsewhere (finite, so fully masked rows give a
        uniform softmax instead of NaN).
    """
    key_pos = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    allowed = (key_pos[None, None, :] <= query_positions[:, :, None]) & attention_mask[:, None, :].bool()
    return torch.where(allowed, 0.0, _MASKED)[:, None]


def write_positions(cache_position: torch.Tensor, query_length: int) -> torch.Tensor:
    """[batch] first write position -> [batch, S] cache position of each of the S new tokens."""
    return cache_position[:, None] + torch.arange(query_length, device=cache_position.device)[None, :]


def scatter_indices(cache_position: torch.Tensor, kv_heads: int, query_length: int) -> torch.Tensor:
    """ONNX ``ScatterND`` indices writing S new tokens of every KV head at ``cache_position[b] + s``.

    Returns:
        [batch, kv_heads, S, 3] int64 tuples (b, h, position) into a [batch, kv_heads, M, Dh] buffer.
    """
    batch = cache_position.shape[0]
    dev = cache_position.device
    pos = write_positions(cache_position, query_length)[:, None, :].expand(batch, kv_heads, query_length)
    rows = torch.arange(batch, device=dev)[:, None, None].expand(batch, kv_heads, query_length)
    heads = torch.arange(kv_heads, device=dev)[None, :, None].expand(batch, kv_heads, query_length)
    return torch.stack([rows, heads, pos], dim=-1)


def write_cache(past: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """Write ``new`` [B,Hkv,S,Dh] into ``past`` [B,Hkv,M,Dh] at positions ``cache_position[b] + s``,
    **in place**, and return ``past`` (now the present). The torch form of the graphs' ScatterND /
    TensorScatter node (see :mod:`himap_trt.export.compose`)."""
    batch, _, seq, _ = new.shape
    if seq == past.shape[2]:                      # prefill into a buffer of exactly the prompt's length
        past.copy_(new)
        return past
    for row in range(batch):
        start = int(cache_position[row])
        past[row, :, start:start + seq] = new[row]
    return past
class VisionEncoder(nn.Module):
    """pixel_values [B,3,H,W] -> image_features [B, |V|, D]: CLIP up to the feature layer,
    feature selection (drop CLS for ``default``), multimodal projector."""

    def __init__(self, llava: nn.Module):
        super().__init__()
        config = llava.config
        tower = llava.model.vision_tower
        vision = getattr(tower, "vision_model", tower)  # transformers < 5.x nests the transformer
        layer = config.vision_feature_layer
        used = layer if layer >= 0 else len(vision.encoder.layers) + 1 + layer
        self.embeddings = vision.embeddings
        self.pre_layrnorm = vision.pre_layrnorm
        self.layers = nn.ModuleList(vision.encoder.layers[:used])
        self.projector = llava.model.multi_modal_projector
        self.drop_cls = config.vision_feature_select_strategy == "default"

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=None)
        if self.drop_cls:
            hidden = hidden[:, 1:]
        return (self.projector(hidden),)


class TokenEmbedding(nn.Module):
    """input_ids [B,S] int64 -> inputs_embeds [B,S,D]."""

    def __init__(self, llava: nn.Module):
        super().__init__()
        self.embed_tokens = llava.model.language_model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.embed_tokens(input_ids),)


def rope_and_bias(rotary_emb: nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor,
                  attention_mask: torch.Tensor, cache_position: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every layer of a segment shares: RoPE tables and the attention bias.

    Args:
        rotary_emb: the decoder's rotary embedding module.
        hidden_states: [B,S,D] (for its dtype and S).
        position_ids: [B,S] int64 RoPE positions.
        attention_mask: [B,M] int64 padding mask of the cache buffer (including the S new tokens).
        cache_position: [B] int64 buffer position where the first new token is written.

    Returns:
        cos, sin: [B,S,Dh] in the hidden dtype; bias: [B,1,S,M] float32 (:func:`attention_bias`).
    """
    cos, sin = rotary_emb(hidden_states, position_ids)
    return cos, sin, attention_bias(attention_mask, write_positions(cache_position, hidden_states.shape[1]))


def layer_qkv(layer: nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A Llama layer's new query/key/value states (after RoPE) from its input hidden states.

    Args:
        hidden_states: [B,S,D]. cos, sin: [B,S,Dh].

    Returns:
        query [B,H,S,Dh], key and value [B,Hkv,S,Dh].
    """
    attn = layer.self_attn
    batch, seq, _ = hidden_states.shape
    x = layer.input_layernorm(hidden_states)
    shape = (batch, seq, -1, attn.head_dim)
    query = attn.q_proj(x).view(shape).transpose(1, 2)          # [B,H,S,Dh]
    key = attn.k_proj(x).view(shape).transpose(1, 2)            # [B,Hkv,S,Dh]
    value = attn.v_proj(x).view(shape).transpose(1, 2)          # [B,Hkv,S,Dh]
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    return query, key, value


def layer_attention(layer: nn.Module, hidden_states: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The rest of a Llama layer: attention of the new queries over the whole cache buffer, o_proj,
    residual, MLP.

    Attention is computed here (not through transformers' attention dispatch) so the graph is the
    same on every backend: scores in the model dtype, bias and softmax in float32 (as
    transformers' eager attention), grouped-query heads repeated with ``repeat_kv``.

    Args:
        hidden_states: [B,S,D] (the layer's input). query: [B,H,S,Dh].
        key, value: [B,Hkv,M,Dh] the cache buffer after this call's write. bias: [B,1,S,M] float32.

    Returns:
        hidden_states [B,S,D].
    """
    attn = layer.self_attn
    batch, seq, _ = hidden_states.shape
    groups = attn.num_key_value_groups
    scores = torch.matmul(query, repeat_kv(key, groups).transpose(2, 3)) * attn.scaling
    probs = torch.softmax(scores.float() + bias, dim=-1).to(value.dtype)   # [B,H,S,M]
    out = torch.matmul(probs, repeat_kv(value, groups)).transpose(1, 2).reshape(batch, seq, -1)
    return layer_output(layer, hidden_states, out)


def layer_output(layer: nn.Module, hidden_states: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """The end of a Llama layer after the attention product: o_proj, residual, MLP.

    Args:
        hidden_states: [B,S,D] (the layer's input). attention: [B,S,H*Dh] the attention output,
            heads concatenated (what ONNX Runtime's GroupQueryAttention returns).

    Returns:
        hidden_states [B,S,D].
    """
    hidden_states = hidden_states + layer.self_attn.o_proj(attention)
    return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))


def decoder_layer(layer: nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  bias: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor, cache_position: torch.Tensor):
    """One Llama decoder layer with a preallocated KV cache, on a transformers ``LlamaDecoderLayer``'s weights.

    Args:
        hidden_states: [B,S,D]. cos, sin: [B,S,Dh]. bias: [B,1,S,M] float32.
        past_key, past_value: [B,Hkv,M,Dh] cache buffers; the S new keys/values are written into
            them in place at ``cache_position[b] + s``.
        cache_position: [B] int64.

    Returns:
        hidden_states [B,S,D], present_key and present_value (the same buffers) [B,Hkv,M,Dh],
        query [B,H,S,Dh] (after RoPE; what a scoring graph needs).
    """
    query, key, value = layer_qkv(layer, hidden_states, cos, sin)
    present_key = write_cache(past_key, key, cache_position)
    present_value = write_cache(past_value, value, cache_position)
    hidden_states = layer_attention(layer, hidden_states, query, present_key, present_value, bias)
    return hidden_states, present_key, present_value, query


def last_token_logits(norm: nn.Module, lm_head: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Final norm and lm_head on the last position: [B,S,D] -> logits [B,V]."""
    return lm_head(norm(hidden_states[:, -1]))


class DecoderSegment(nn.Module):
    """Decoder layers [start, end) with an explicit KV cache (see the module diagram)."""

    def __init__(self, llava: nn.Module, start: int, end: int, *, final: bool, emit_query: bool):
        super().__init__()
        lm = llava.model.language_model
        self.layers = nn.ModuleList(lm.layers[start:end])
        self.rotary_emb = lm.rotary_emb
        self.final = final
        self.emit_query = emit_query
        if final:
            self.norm = lm.norm
            self.lm_head = llava.lm_head

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache_position: torch.Tensor, *past_key_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cos, sin, bias = rope_and_bias(self.rotary_emb, hidden_states, position_ids, attention_mask, cache_position)
        presents: list[torch.Tensor] = []
        query = hidden_states
        for i, layer in enumerate(self.layers):
            hidden_states, key, value, query = decoder_layer(
                layer, hidden_states, cos, sin, bias, past_key_values[2 * i], past_key_values[2 * i + 1],
                cache_position)
            presents += [key, value]
        first = last_token_logits(self.norm, self.lm_head, hidden_states) if self.final else hidden_states
        extra = (query,) if self.emit_query else ()
        return (first, *presents, *extra)


# -- the pieces a segment graph is composed from at export (see himap_trt/export/compose.py) --------
class SegmentPrelude(nn.Module):
    """(hidden_states, position_ids, attention_mask, cache_position) -> (cos, sin, bias, write_indices):
    :func:`rope_and_bias` and the :func:`scatter_indices` every layer's cache write uses."""

    def __init__(self, rotary_emb: nn.Module, kv_heads: int):
        super().__init__()
        self.rotary_emb = rotary_emb
        self.kv_heads = kv_heads

    def forward(self, hidden_states, position_ids, attention_mask, cache_position):
        cos, sin, bias = rope_and_bias(self.rotary_emb, hidden_states, position_ids, attention_mask, cache_position)
        return cos, sin, bias, scatter_indices(cache_position, self.kv_heads, hidden_states.shape[1])


class _QKVStep(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, cos, sin):
        return layer_qkv(self.layer, hidden_states, cos, sin)


class _AttentionStep(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, query, key, value, bias):
        return (layer_attention(self.layer, hidden_states, query, key, value, bias),)


class _OutputStep(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, attention):
        return (layer_output(self.layer, hidden_states, attention),)


class LayerTemplate(nn.Module):
    """One half of a decoder layer with the layer's weights as *inputs* (after the activations, in
    :attr:`weight_names` order), so one exported graph serves every layer of the decoder.

    ``part='qkv'``: (hidden_states, cos, sin) -> (query, key, value), :func:`layer_qkv`;
    ``part='attention'``: (hidden_states, query, key, value, bias) -> hidden_states, :func:`layer_attention`;
    ``part='output'``: (hidden_states, attention [B,S,H*Dh]) -> hidden_states, :func:`layer_output` (the
    attention weights' part after a fused attention node, ``kv_write='gqa'``).
    The cache write between them is a node :mod:`himap_trt.export.compose` builds itself.
    """

    def __init__(self, layer: nn.Module, part: str):
        super().__init__()
        self.step = {"qkv": _QKVStep, "attention": _AttentionStep, "output": _OutputStep}[part](layer)
        self.part = part
        self.weight_names = [name for name, _ in self.used_parameters(layer)]

    @staticmethod
    def _used(part: str, name: str) -> bool:
        attention = name.startswith(("self_attn.o_proj", "mlp.", "post_attention_layernorm"))
        return attention if part in ("attention", "output") else not attention

    def used_parameters(self, layer: nn.Module):
        """(name, parameter) of ``layer`` that this part reads, in a fixed order."""
        return [(name, p) for name, p in layer.named_parameters() if self._used(self.part, name)]

    def forward(self, *args):
        n = {"qkv": 3, "attention": 5, "output": 2}[self.part]
        activations, weights = args[:n], args[n:]
        params = {f"layer.{name}": w for name, w in zip(self.weight_names, weights)}
        return torch.func.functional_call(self.step, params, activations)


class SegmentHead(nn.Module):
    """hidden_states [B,S,D] -> logits [B,V]: :func:`last_token_logits`."""

    def __init__(self, llava: nn.Module):
        super().__init__()
        self.norm = llava.model.language_model.norm
        self.lm_head = llava.lm_head

    def forward(self, hidden_states):
        return last_token_logits(self.norm, self.lm_head, hidden_states)


def _count(flags: torch.Tensor) -> torch.Tensor:
    """Number of True values along the last axis, int64: [..., N] bool -> [...].

    Summed in float32 (exact for N < 2**24) rather than int64: ONNX Runtime's int64 ReduceSum is
    scalar code, its float32 one vectorised (the S x S rank count of a 653-token prompt took 1.2 ms as
    int64 of a ~6 ms scoring graph; docs/PERFORMANCE.md). The counts, hence the kept indices, are the same.
    """
    return flags.float().sum(-1).long()


def image_row_indices(token_type_ids: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` image tokens of each row, ascending: [B,S] -> [B,count] int64.

    The (t+1)-th image token sits at the number of positions whose running image count is still
    <= t (a float running count: TensorRT's CumSum takes floating-point inputs only).
    """
    running = (token_type_ids == TOKEN_IMAGE).float().cumsum(-1)                    # [B,S]
    slots = torch.arange(count, device=token_type_ids.device).float()               # [count]
    return _count(running[:, None, :] <= slots[None, :, None])                     # [B,count]


def stage_scores(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor, criterion: str, scaling: float, entering,
                 masked_image_slots: bool = False) -> torch.Tensor:
    """Score every position by a stage's criterion (METHODS.md; HiMAP Eq. 8/9, FastV).

    ``A = softmax(Q K^T * scaling + causal/padding bias)`` over *all* keys, averaged over heads
    (``Ā``); then ``score(v) = sum_{i in rows} Ā[i, v]`` with rows = instruction tokens
    (``img2txt``), image tokens (``img2img``) or the last position (``last_row``). Computed in
    float32 whatever the input dtype.

    Only the rows the criterion reads are computed: they are gathered from ``query`` before the
    attention product. ``last_row``: the last position. ``img2txt``: the last ``S - entering``
    positions, which hold every row's instruction tokens (they follow the ``entering`` image
    tokens, and the batch is left-padded), weighted 1 for instruction tokens and 0 otherwise.
    ``img2img``: exactly the ``entering`` image positions of each row (:func:`image_row_indices`).

    Args:
        query: [B,H,S,Dh] query states of layer K-1 after RoPE.
        key: [B,Hkv,S,Dh] key states of layer K-1 after RoPE (its present at prefill).
        attention_mask: [B,S] int64 padding mask.
        token_type_ids: [B,S] int64 (``himap_trt.prompt.TOKEN_*``).
        criterion: ``img2txt`` | ``img2img`` | ``last_row``.
        scaling: the attention scale, 1/sqrt(Dh).
        entering: image tokens per row (|V| at the first stage, the previous keep count after; an
            int or a traced size).
        masked_image_slots: rows carry per-request image-token counts padded with masked slots
            (:mod:`himap_trt.graphs.variable`): ``img2img`` rows are weighted by their attention
            mask, so a masked slot's row counts 0 (False: every image row weighs 1).

    Returns:
        [B,S] float32 scores (meaningful at image positions only).
    """
    batch, heads, seq, head_dim = query.shape
    dev = query.device
    if criterion == "last_row":
        positions = torch.full((batch, 1), seq - 1, dtype=torch.int64, device=dev)
        query = query[:, :, -1:]
        weights = None
    elif criterion == "img2txt":
        positions = torch.arange(entering, seq, device=dev)[None, :].expand(batch, seq - entering)
        query = query[:, :, entering:]
        weights = (token_type_ids[:, entering:] == TOKEN_INSTRUCTION).float()          # [B,R]
    else:  # img2img
        positions = image_row_indices(token_type_ids, entering)                        # [B,R]
        query = torch.gather(query, 2, positions[:, None, :, None].expand(batch, heads, entering, head_dim))
        weights = (torch.gather(attention_mask, 1, positions).float() if masked_image_slots
                   else torch.ones((batch, entering), dtype=torch.float32, device=dev))
    groups = heads // key.shape[1]
    scores = torch.matmul(query.float(), repeat_kv(key.float(), groups).transpose(2, 3)) * scaling
    probs = torch.softmax(scores + attention_bias(attention_mask, positions), dim=-1)   # [B,H,R,S]
    mean = probs.mean(dim=1)                                                # [B,R,S]
    if weights is None:
        return mean[:, 0]
    return torch.matmul(weights[:, None, :], mean)[:, 0]                    # [B,S]


def random_score_table(seed: int, stage: int, entering: int) -> torch.Tensor:
    """The ``random`` criterion's scores (the control pruning papers compare against): a seeded random
    permutation of ``1..entering`` / ``entering``, the score of the t-th image token of a row.

    The table is a constant of the scoring graph, so every backend keeps the same tokens (ranked
    and gathered by :func:`kept_indices` like any criterion). It depends only on ``(seed, stage)``:
    every prompt keeps the same image-token ordinals (a fixed random mask per seed, not a fresh
    draw per prompt).

    Returns:
        [entering] float32, distinct values in (0, 1].
    """
    import numpy as np

    order = np.random.default_rng([seed, stage]).permutation(entering)
    return torch.from_numpy((order + 1).astype(np.float32) / entering)


def random_scores(token_type_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Scores of a ``random`` stage: ``table[t]`` for the t-th image position of each row.

    Args:
        token_type_ids: [B,S] int64; each row holds ``len(table)`` image positions.
        table: [entering] float32 (:func:`random_score_table`).

    Returns:
        [B,S] float32 (meaningful at image positions only).
    """
    image = (token_type_ids == TOKEN_IMAGE).float()
    ordinal = (image.cumsum(-1) - 1.0).clamp(min=0.0).long()          # [B,S]: t at the t-th image token
    return table[ordinal]


def kept_indices(scores: torch.Tensor, token_type_ids: torch.Tensor, keep: int, drop: int) -> torch.Tensor:
    """Indices of the positions that survive a stage, ascending.

    Every non-image position survives, plus the ``keep`` image positions of highest score. Ties
    are broken deterministically: higher score first, then lower index (METHODS.md). Built from
    comparisons, cumulative sums and reductions only (no TopK), so every backend agrees.

    Args:
        scores: [B,S] float32 (see :func:`stage_scores`), >= 0 at image positions.
        token_type_ids: [B,S] int64; each row holds ``keep + drop`` image positions.
        keep: image tokens kept.
        drop: image tokens dropped; the output length is ``S - drop``.

    Returns:
        [B, S - drop] int64, sorted ascending per row.
    """
    seq = scores.shape[1]
    image = token_type_ids == TOKEN_IMAGE
    score = torch.where(image, scores, -1.0)                          # non-image positions never win
    index = torch.arange(seq, device=scores.device)
    beats = score[:, None, :] > score[:, :, None]                     # [B,v,u]: u outranks v
    ties = (score[:, None, :] == score[:, :, None]) & (index[None, :] < index[:, None])[None]
    rank = _count(beats | ties)                                       # [B,S]: 0 for the best
    survives = ~image | (rank < keep)
    # Running count of survivors in float32 (exact below 2**24 tokens): TensorRT's CumSum takes
    # floating-point inputs only.
    cumulative = survives.float().cumsum(-1)                           # [B,S]
    slots = torch.arange(seq - drop, device=scores.device).float()     # [S']
    # The (t+1)-th survivor sits at the number of positions whose running count is still <= t.
    return _count(cumulative[:, None, :] <= slots[None, :, None])   # [B,S']


class StageScorer(nn.Module):
    """A scoring graph: criterion scores of layer K-1, top ``keep`` image tokens, gather.

    Inputs (spec order): ``query.{K-1}`` [B,H,S,Dh], ``present.{K-1}.key`` [B,Hkv,S,Dh],
    attention_mask [B,S], token_type_ids [B,S], hidden_states [B,S,D], position_ids [B,S].
    Outputs: kept_indices [B,S'] and the kept hidden states, position ids (original, not
    renumbered), attention mask and token types, S' = S - (entering - keep).
    """

    def __init__(self, criterion: str, keep: int, entering: int, scaling: float, *, seed: int | None = None,
                 stage: int = 0):
        super().__init__()
        self.criterion, self.keep, self.drop, self.scaling = criterion, keep, entering - keep, scaling
        self.entering = entering
        if criterion == "random":
            self.register_buffer("random_table", random_score_table(seed, stage, entering), persistent=False)

    def forward(self, query, key, attention_mask, token_type_ids, hidden_states, position_ids):
        if self.criterion == "random":
            scores = random_scores(token_type_ids, self.random_table)
        else:
            scores = stage_scores(query, key, attention_mask, token_type_ids, self.criterion, self.scaling,
                                  self.entering)
        index = kept_indices(scores, token_type_ids, self.keep, self.drop)
        gathered = torch.gather(hidden_states, 1, index[:, :, None].expand(-1, -1, hidden_states.shape[-1]))
        return (
            index,
            gathered,
            torch.gather(position_ids, 1, index),
            torch.gather(attention_mask, 1, index),
            torch.gather(token_type_ids, 1, index),
        )
