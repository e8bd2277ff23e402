"""The architecture interface: everything that differs between multimodal model families.

The rest of the code (plan, specs, scoring, export, runtime, engines, CLI) works on the graph
contract of ``docs/ARCHITECTURE.md`` and asks an :class:`Architecture` for the few things a model
family decides itself. One module per family implements it (``arch/llava.py``,
``arch/qwen2_5_vl.py``); :func:`himap_trt.arch.architecture_for` maps a config's ``model_type``
to it, once.

What a family decides (and what it does not): the decoder layer is the same Llama-style layer
for every supported family (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``mlp``,
``post_attention_layernorm``; biases where the checkpoint has them), reached through
:meth:`Architecture.language_model` / :meth:`Architecture.lm_head`; its rotary embedding module
maps the family's position ids to ``cos``/``sin`` [B,S,Dh] (LLaVA: [B,S] positions; Qwen2.5-VL:
[3,B,S] M-RoPE positions, merged by ``mrope_section`` inside transformers' rotary module), so the
segment graphs are family-independent apart from the ``position_ids`` shape.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from himap_trt.errors import HimapError

if TYPE_CHECKING:
    from torch import nn

    from himap_trt.graphs.spec import GraphSpec
    from himap_trt.dims import ModelDims
    from himap_trt.prompt import PromptBatch


class Architecture(ABC):
    """One model family (LLaVA-1.5, Qwen2.5-VL, ...).

    Class attributes:
        name: the family's key (also ``ModelDims.architecture`` and the manifest's).
        model_type: the Hugging Face ``config.model_type`` it implements.
        supported: one human-readable line of what is supported (error messages).
        variable_image_tokens: whether |V| differs per request (dynamic resolution). Then the
            plan's keep counts are computed per request (:meth:`PruningPlan.image_tokens_for`),
            the scoring graphs take per-row keep counts and slot ordinals as inputs, and every
            segment's cache holds ``max_seq_len`` positions (a small image drops fewer tokens).
        position_axes: 1 (position ids [batch, sequence]) or 3 (M-RoPE: [3, batch, sequence]).
        streams_weights: whether ``export`` may build this family as a skeleton whose decoder-layer
            weights stay in the checkpoint files (:func:`himap_trt.models.streaming.load_streamed`,
            the bounded-memory export); False: the whole model is loaded (``load_model``).
    """

    name: ClassVar[str]
    model_type: ClassVar[str]
    supported: ClassVar[str]
    variable_image_tokens: ClassVar[bool] = False
    position_axes: ClassVar[int] = 1
    streams_weights: ClassVar[bool] = False

    # -- configs and loading -----------------------------------------------------------------
    @abstractmethod
    def check_supported(self, config: Any, source: str) -> None:
        """Raise :class:`~himap_trt.errors.HimapError` (naming ``source``) unless ``config`` is supported."""

    @abstractmethod
    def dims(self, config: Any) -> ModelDims:
        """The :class:`~himap_trt.models.loading.ModelDims` of a supported config."""

    @abstractmethod
    def model_class(self) -> type:
        """The transformers class whose ``from_pretrained`` loads a checkpoint."""

    def load_processor(self, path: str, **kwargs) -> Any:
        """The processor (tokenizer, image processor, chat template) of a checkpoint or export directory.

        ``kwargs`` (``trust_remote_code=False``, ``local_files_only``) go to ``from_pretrained``.
        """
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, **kwargs)

    def known_models(self) -> dict[str, tuple[str, Callable[[], Any]]]:
        """Built-in configurations of published checkpoints: short name -> (hub id, config factory).

        Used by ``flops`` and ``build --dry-run`` without downloading anything.
        """
        return {}

    def max_image_tokens(self, processor: Any) -> int | None:
        """The most image tokens one request can have under ``processor`` (None: |V| is fixed by the config)."""
        return None

    def max_image_tokens_in(self, path: str) -> int | None:
        """:meth:`max_image_tokens` read from a local directory's files, without loading the processor."""
        return None

    def with_max_image_tokens(self, dims: ModelDims, tokens: int) -> ModelDims:
        """``dims`` with |V|'s bound set to ``tokens`` (the export's ``--max-image-tokens``)."""
        from dataclasses import replace

        return replace(dims, num_image_tokens=tokens)

    # -- graphs --------------------------------------------------------------------------------
    @abstractmethod
    def vision_spec(self, dims: ModelDims, dtype: str) -> GraphSpec:
        """The ``vision`` graph's declaration (inputs and ``image_features`` output)."""

    @abstractmethod
    def vision_module(self, model: nn.Module) -> nn.Module:
        """The torch module of the ``vision`` graph (positional inputs in :meth:`vision_spec` order)."""

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``)."""
        return model.model.language_model

    def lm_head(self, model: nn.Module) -> nn.Module:
        """The output projection [D -> V]."""
        return model.lm_head

    def position_shape(self) -> tuple[int | str, ...]:
        """Symbolic shape of ``position_ids`` in segment and scoring graphs."""
        return ("batch", "sequence") if self.position_axes == 1 else (3, "batch", "sequence")

    # -- requests ------------------------------------------------------------------------------
    @abstractmethod
    def prepare_batch(self, processor: Any, images: list[Any], questions: list[str], image_token_id: int,
                      num_image_tokens: int) -> PromptBatch:
        """Chat template, tokenization (left padding), image preprocessing, spans and position ids.

        Args:
            image_token_id: the image placeholder id.
            num_image_tokens: |V| per prompt, or its bound where |V| varies (a larger image is refused).

        Raises:
            HimapError: bad question text, mismatched lists, an unexpected image-token count.
        """

    def prepare_conversation(self, processor: Any, conversation: Any, visuals: list[Any], image_token_id: int,
                             num_image_tokens: int) -> PromptBatch:
        """One conversation (:class:`himap_trt.chat.Conversation`) -> a one-row :class:`PromptBatch`:
        the chat template over every message, each visual input (``visuals``: loaded images /
        videos, in prompt order) expanded to its visual tokens, token types by the conversation rule
        (:mod:`himap_trt.chat`). No visual input: ``pixel_values`` has 0 rows and no token is an
        image token (the pipeline then runs neither the vision graph nor the pruning stages).

        Raises:
            HimapError: more visual inputs (or visual tokens) than the export's graphs hold, a
                template failure, special-token text in a message.
        """
        raise HimapError(f"the {self.name} family does not take conversations")

    @abstractmethod
    def vision_feeds(self, batch: PromptBatch, spec: GraphSpec) -> dict[str, torch.Tensor]:
        """The ``vision`` graph's inputs (``spec``) for a prepared batch (float tensors in float32)."""

    def next_positions(self, batch: PromptBatch) -> torch.Tensor:
        """[batch] int64: the position of each row's first generated token."""
        return batch.position_ids[:, -1] + 1

    def decode_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """[n] int64 positions of one new token per row -> the segments' ``position_ids``."""
        return positions[:, None]

    def image_token_counts(self, batch: PromptBatch, num_image_tokens: int) -> list[int]:
        """|V| of every row of a batch (tokens); ``num_image_tokens`` where it is fixed."""
        return [num_image_tokens] * batch.batch_size


#: ``config.model_type`` -> the family implementing it, filled by :func:`register` (from
#: ``himap_trt/arch/__init__.py``, the one list of families): the families' error messages list
#: what is supported without importing the package that lists them.
REGISTRY: dict[str, Architecture] = {}


def register(*families: Architecture) -> dict[str, Architecture]:
    """Add ``families`` to :data:`REGISTRY` (in order) and return it."""
    for family in families:
        REGISTRY[family.model_type] = family
    return REGISTRY


def supported_models() -> str:
    """What every registered family supports, one line each joined by '; '."""
    return "; ".join(arch.supported for arch in REGISTRY.values())


def decoder_dims(text_config: Any) -> dict[str, int]:
    """The decoder fields of :class:`~himap_trt.models.loading.ModelDims` from a Llama-shaped text config
    (every family's decoder, see the module docstring): hidden/intermediate sizes, layers, heads,
    KV heads (default: heads), head_dim (default: hidden / heads), vocabulary and position limit."""
    heads = text_config.num_attention_heads
    return dict(
        hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size,
        num_layers=text_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=text_config.num_key_value_heads or heads,
        head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
        vocab_size=text_config.vocab_size,
        max_position_embeddings=text_config.max_position_embeddings,
    )
