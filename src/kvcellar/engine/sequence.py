"""One admitted request between scheduler steps: its prompt's progress, its sampling and its text.

Operations: `Sequence(job, eos_ids, tokenizer, context_length)`, `.sample()` (the next token from the
pending logits: emitted, stop conditions checked), `.feed_token()` (the token the next decode pass
feeds), `.preempt()`, `.end(finish)`, `.result()`.

States, in order: waiting (not admitted, or preempted: no K/V), prefilling (`prompt` set and not done),
decoding (`logits` to sample, or `next_token` to feed), finished (`finish` set). A preempted sequence
keeps its tokens and text: on its return it prefills its prompt again (mostly a cache hit), then feeds
its generated tokens again without sampling (`replay`), decode rows computed as they were the first time
(engine/batch_decode.py), so it goes on exactly where it stopped.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

import torch

from kvcellar.engine.logits import TokenLogprob, token_logprobs
from kvcellar.engine.request import GenerationRequest, GenerationResult, StreamEvent, Timings
from kvcellar.engine.sampling import Sampler
from kvcellar.engine.text_stream import IncrementalDetokenizer, StopStringMatcher

if TYPE_CHECKING:
    from kvcellar.engine.constraint import Grammars
    from kvcellar.engine.worker import Job


class Sequence:
    def __init__(self, job: Job, order: int, eos_ids: frozenset[int] | set[int], tokenizer: object, context_length: int,
                 grammars: Grammars | None = None) -> None:  # fmt: skip
        """`grammars`: where a request with a grammar gets its constraint (engine/constraint.py)."""
        self.job = job
        self.order = order  # admission order: preemption takes the newest first
        self.request: GenerationRequest = job.request
        params = self.request.params
        self.timings = Timings()
        self.started: float | None = None  # when it was first admitted (timings other than queue_s start here)
        self.pending = None  # the cache lookup's PendingRestore, held until the prompt is restored
        self.restored = None  # the prompt's Restored: its cache (None: not restored yet, or preempted)
        self.prompt = None  # the PromptPass filling the cache (engine/runner.py)
        self.capture = None  # the cache's DecodeCapture of generated blocks
        self.captures = True  # whether generated blocks are captured (not after a preemption)
        self.logits: torch.Tensor | None = None  # next-token logits waiting to be sampled
        self.next_token: int | None = None  # sampled, waiting for the decode pass that feeds it
        self.replay: deque[int] = deque()  # after a preemption: generated tokens to feed again, unsampled
        self.finish: str | None = None
        self.hit: tuple[int, dict[str, int]] | None = None  # the first restore's cached tokens, total and by tier
        self.generated: list[int] = []
        self.text_parts: list[str] = []
        self.tokens = list(self.request.prompt_ids)  # prompt + generated tokens fed so far
        self.budget = min(params.max_tokens, context_length - len(self.tokens))
        self._eos_ids = eos_ids
        constraint = grammars.matcher(params.grammar) if params.grammar is not None and grammars is not None else None
        if params.grammar is not None and constraint is None:
            raise ValueError("a request with a grammar needs the engine's grammars")
        self._sampler = Sampler(params, self.request.prompt_ids, constraint)
        self._stop_ids = frozenset(params.stop_token_ids)
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self._detokenizer = IncrementalDetokenizer(tokenizer, self.request.prompt_ids)
        self._stops = StopStringMatcher(params.stop)
        self._decode_started = 0.0

    @property
    def kv_tokens(self) -> int:
        """Tokens whose K/V this sequence holds now (0 while waiting or preempted)."""
        if self.restored is None:
            return 0
        layer = next((layer for layer in self.restored.cache.layers if hasattr(layer, "length")), None)
        return layer.length if layer is not None else len(self.tokens)

    def sample(self) -> None:
        """Sample the pending logits: emit the token, then either set `next_token` or end the sequence."""
        logits, self.logits = self.logits, None
        token = self._sampler.sample(logits)
        if not self.generated:
            self.timings.ttft_s = time.perf_counter() - self.started
            self._decode_started = time.perf_counter()
        self.generated.append(token)
        params = self.request.params
        if (token in self._eos_ids and not params.ignore_eos) or token in self._stop_ids:
            return self.end("stop")
        entry = None
        if self.logprobs is not None:
            entry = token_logprobs(logits, token, params.logprobs)
            self.logprobs.append(entry)
        match = self._stops.push(self._detokenizer.push(token))
        if match.text:
            self.text_parts.append(match.text)
        self.job.put(StreamEvent(text=match.text, token_id=token, logprob=entry))
        if match.stopped or (constraint := self._sampler.constraint) is not None and constraint.finished:
            return self.end("stop")
        if len(self.generated) >= self.budget:
            return self.end("length")
        self.next_token = token

    def feed_token(self) -> tuple[int, bool]:
        """The token the next decode pass feeds, and whether its logits are wanted (False while replaying)."""
        if self.replay:
            return self.replay.popleft(), False
        return self.next_token, True

    def fed(self, token: int, logits: torch.Tensor | None) -> None:
        """A decode pass fed `token`: keep its logits (None while replaying) and let the capture see it."""
        if logits is not None:
            self.next_token, self.logits = None, logits
            self.tokens.append(token)
            if self.capture is not None:
                self.capture.token_fed(self.tokens)

    def preempt(self) -> None:
        """Give up the K/V (the caller drops the cache): generated tokens but the last are fed again later."""
        self.restored = self.prompt = self.capture = self.pending = None
        self.captures = False
        self.logits = None
        self.replay = deque(self.generated[:-1])
        self.tokens = list(self.request.prompt_ids) + self.generated[:-1]

    def end(self, finish: str) -> None:
        self.finish = finish
        if not self._stops.stopped:  # release text held back for a stop string or a split character
            rest = self._stops.push(self._detokenizer.flush()).text
            rest += "" if self._stops.stopped else self._stops.flush()
            if rest:
                self.text_parts.append(rest)
                self.job.put(StreamEvent(text=rest))
        if self.capture is not None:
            self.capture.finish(self.tokens)
            self.capture = None

    def result(self) -> GenerationResult:
        timings = self.timings
        now = time.perf_counter()
        timings.total_s = now - self.started if self.started is not None else 0.0
        timings.num_decode_tokens = max(len(self.generated) - 1, 0)
        timings.decode_s = now - self._decode_started if self.generated else 0.0
        hit = self.hit
        if hit is None:
            source = self.restored if self.restored is not None else self.pending
            hit = (source.num_tokens, dict(source.tokens_by_tier)) if source is not None else (0, {})
        return GenerationResult(
            text="".join(self.text_parts),
            token_ids=tuple(self.generated),
            finish_reason=self.finish or "cancelled",
            num_prompt_tokens=len(self.request.prompt_ids),
            num_cached_tokens=hit[0],
            cached_tokens_by_tier=hit[1],
            timings=timings,
            logprobs=tuple(self.logprobs) if self.logprobs is not None else None,
            stop_sequence=self._stops.stop,
        )
