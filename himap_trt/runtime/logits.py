"""What the OpenAI API (and vLLM's extensions) do to one request's next-token logits before a token is
chosen, and the log-probabilities it reports.

Order, as vLLM applies them: ``min_tokens`` (EOS masked), repetition penalty (prompt and answer
tokens), frequency and presence penalties (answer tokens); then temperature / top-p in
:class:`~himap_trt.runtime.sampling.TokenChooser`. Log-probabilities are those of the model's own
distribution (``log_softmax`` of the raw logits in float32), vLLM's default.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def penalise(logits: torch.Tensor, prompt_ids: torch.Tensor, output_ids: list[int], *, presence: float = 0.0,
             frequency: float = 0.0, repetition: float = 1.0, block: Iterable[int] = ()) -> torch.Tensor:
    """One request's logits with the penalties applied.

    Args:
        logits: [vocab] float32 (not modified).
        prompt_ids: [prompt] int64, the prompt's token ids (for the repetition penalty).
        output_ids: the answer's token ids so far.
        presence: OpenAI's presence penalty: ``- presence`` for every token in the answer.
        frequency: OpenAI's frequency penalty: ``- frequency x count`` in the answer.
        repetition: transformers' / vLLM's repetition penalty (1: off): a prompt or answer token's
            logit divided by it when positive, multiplied by it otherwise.
        block: ids that cannot be chosen (logit -inf): EOS before ``min_tokens``.

    Returns:
        [vocab] float32.
    """
    out = logits.float().clone()
    vocab = out.shape[0]
    if repetition != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool, device=out.device)
        seen[prompt_ids[(prompt_ids >= 0) & (prompt_ids < vocab)].to(out.device)] = True
        if output_ids:
            seen[torch.tensor(output_ids, device=out.device)] = True
        out = torch.where(seen, torch.where(out > 0, out / repetition, out * repetition), out)
    if (presence or frequency) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, device=out.device), minlength=vocab)[:vocab].float()
        out = out - frequency * counts - presence * (counts > 0).float()
    blocked = [t for t in block if 0 <= t < vocab]
    if blocked:
        out[torch.tensor(blocked, device=out.device)] = float("-inf")
    return out


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the ``top`` most likely tokens' (best first).

    Args:
        logits: [vocab] raw logits, any float dtype (computed in float32).
        token: the chosen id.
        top: 0..20.

    Returns:
        ``(token, log p(token), [(id, log p(id)), ...])``.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best: list[tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logprobs, top)
        best = [(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
    return int(token), float(logprobs[token]), best
