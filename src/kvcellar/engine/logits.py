"""What a request does to the model's next-token scores before the pick, and the log-probabilities it reports.

Operations: `ScoreShaper(params, prompt_ids)`, `.shape(logits) -> scores`, `.generated(token)`;
`token_logprobs(logits, token, top) -> TokenLogprob`.

Shaping (in this order, as vLLM and transformers apply them): the repetition penalty over the
prompt's and the generated tokens (a positive score divided by it, a negative one multiplied),
OpenAI's frequency and presence penalties over the generated tokens (`count * frequency +
(count > 0) * presence` subtracted), then the logit bias added. Greedy requests pick the top of the
shaped scores; sampling ones apply temperature and the filters to them (engine/sampling.py).

Log-probabilities are the model's own: the log-softmax of the raw logits, before any shaping,
temperature or filter (what OpenAI's and vLLM's defaults report), so they match a direct forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvcellar.engine.sampling import SamplingParams


class ScoreShaper:
    """One request's bias and penalties; it counts the tokens the request generates (`generated`)."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        self._params = params
        self._prompt_ids = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long)
        self._counts: torch.Tensor | None = None  # [vocab] generated-token counts, made at the first `shape`
        self._uncounted: list[int] = []  # generated tokens not yet in `_counts`
        self._bias_ids = torch.tensor([token for token, _ in params.logit_bias], dtype=torch.long)
        self._bias = torch.tensor([shift for _, shift in params.logit_bias], dtype=torch.float32)

    def shape(self, logits: torch.Tensor) -> torch.Tensor:
        """The scores the pick sees: fp32 [vocab], on the logits' device."""
        scores = logits.to(torch.float32).clone()
        params, device = self._params, scores.device
        if self._counts is None:
            self._counts = torch.zeros(scores.numel(), dtype=torch.float32, device=device)
        for token in self._uncounted:
            self._counts[token] += 1
        self._uncounted.clear()
        if params.repetition_penalty != 1:
            seen = self._counts > 0
            seen[self._prompt_ids.to(device)] = True
            penalized = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
            scores = torch.where(seen, penalized, scores)
        if params.frequency_penalty != 0 or params.presence_penalty != 0:
            scores -= self._counts * params.frequency_penalty + (self._counts > 0).float() * params.presence_penalty
        if self._bias_ids.numel():
            scores.index_add_(0, self._bias_ids.to(device), self._bias.to(device))
        return scores

    def generated(self, token: int) -> None:
        self._uncounted.append(token)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the `top` most likely tokens' (id, log-probability), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The log-softmax of the raw logits [vocab] at `token`, and its `top` best entries, best first."""
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
        best = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), best)
