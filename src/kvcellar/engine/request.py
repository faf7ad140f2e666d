"""What a generation request carries in, and what comes back out.

Operations: `GenerationRequest` (a `PreparedPrompt`, engine/prepared.py, and its sampling), `Timings`,
`StreamEvent`, `GenerationResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcellar.cache.segments import PromptSegments
from kvcellar.engine.logits import TokenLogprob
from kvcellar.engine.prepared import PreparedPrompt
from kvcellar.engine.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    prompt: PreparedPrompt  # checked, its block keys computed (Engine.prepare)
    params: SamplingParams = field(default_factory=SamplingParams)

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.prompt.ids

    @property
    def segments(self) -> PromptSegments:
        return self.prompt.segments

    @property
    def cache_salt(self) -> str:
        return self.prompt.salt


@dataclass
class Timings:
    """Per-request timings; `*_s` in seconds, rates in tokens per second.

    `queue_s`: from `Engine.stream` queueing the request to the worker starting it. Every other
    time starts when the worker starts the request (`ttft_s` leaves the queue out).
    `num_prefill_tokens`: prompt tokens actually computed (fewer when cancelled during the prefill).
    """

    queue_s: float = 0.0
    ttft_s: float = 0.0
    lookup_s: float = 0.0
    restore_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    # Cached tokens whose K/V the request's buffers still held from the request before: nothing copied.
    num_resident_tokens: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.num_prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.num_decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "queue_s": self.queue_s,
            "ttft_s": self.ttft_s,
            "lookup_s": self.lookup_s,
            "restore_s": self.restore_s,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "total_s": self.total_s,
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
            "resident_tokens": self.num_resident_tokens,
        }


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (eos or a stop string), "length" (max_tokens or context), "cancelled"
    num_prompt_tokens: int
    num_cached_tokens: int
    cached_tokens_by_tier: dict[str, int]
    timings: Timings
    # With `SamplingParams.logprobs` set: one entry per token of the answer (an ending eos or stop id has none).
    logprobs: tuple[TokenLogprob, ...] | None = None
    stop_sequence: str | None = None  # the stop string that ended the answer, if one did


@dataclass(frozen=True)
class StreamEvent:
    """One step of a stream: new text (possibly empty), then a final event carrying the result."""

    text: str = ""
    token_id: int | None = None
    result: GenerationResult | None = None
    logprob: TokenLogprob | None = None  # the token's, where the request asked for log-probabilities
