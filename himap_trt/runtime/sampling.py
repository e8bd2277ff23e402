"""Choosing the next token: greedy, or sampled with temperature / top-k / top-p and a seed.

The logits warpers are transformers' own (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``), applied in that order, as ``model.generate`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from himap_trt.errors import HimapError


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate.

    Attributes:
        max_new_tokens: most tokens generated per prompt (tokens).
        temperature: 0 for greedy decoding; > 0 samples from softmax(logits / temperature).
        top_k: keep the k most likely tokens before sampling (0: all).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1.0: all).
        seed: seed of the sampling generator (None: nondeterministic).
        ignore_eos: generate exactly ``max_new_tokens`` (unless ``max_seq_len`` stops earlier): EOS
            does not end a row (benchmarks).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise HimapError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature):
            raise HimapError(f"--temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if self.temperature < 0:
            raise HimapError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise HimapError(f"--top-k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise HimapError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise HimapError(f"--seed must be a signed 64-bit integer (-2**63 .. 2**63-1), got {self.seed}")

    @property
    def ignored_options(self) -> list[str]:
        """Sampling options given while decoding greedily (temperature 0), which have no effect."""
        if self.do_sample:
            return []
        return [flag for flag, unused in (("--top-k", self.top_k != 0), ("--top-p", self.top_p != 1.0)) if unused]

    @property
    def do_sample(self) -> bool:
        """Sampling (temperature > 0) rather than greedy decoding."""
        return self.temperature > 0


class TokenChooser:
    """Picks next tokens from logits according to a :class:`GenerationConfig`."""

    def __init__(self, config: GenerationConfig, device: torch.device):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.config = config
        self.warpers = []
        if config.do_sample:
            self.warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k:
                self.warpers.append(TopKLogitsWarper(config.top_k))
            if config.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(config.top_p))
        self.generator = torch.Generator(device=device)
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Next tokens.

        Args:
            logits: [batch, vocab], any float dtype (computed on in float32).
            input_ids: [batch, tokens] so far (only some warpers look at it).

        Returns:
            [batch] int64 token ids.
        """
        logits = logits.float()
        if not self.config.do_sample:
            return logits.argmax(dim=-1)
        warped = logits
        for warper in self.warpers:
            warped = warper(input_ids, warped)
        probs = torch.softmax(warped, dim=-1)
        finite = torch.isfinite(probs).all(dim=-1)
        if not bool(finite.all()):
            # A temperature so small (below ~1e-38) that logits / temperature overflows float32 gives NaN
            # probabilities (found by API fuzzing: HTTP 500); the limit of sampling as the temperature
            # goes to 0 is the most likely token, so those rows decode greedily.
            greedy = logits.argmax(dim=-1)
            probs = torch.where(finite[:, None], probs, torch.nn.functional.one_hot(greedy, probs.shape[-1]).float())
        return torch.multinomial(probs, num_samples=1, generator=self.generator)[:, 0]
