"""Continuous batching on the model's thread: every running request advances at every step.

Operations: `Scheduler(runner, policy).run(jobs)` (until the worker's stop marker and no work is
left), `.load()` (running / waiting counts and K/V in use, read from any thread).

A step: (1) drop cancelled requests; (2) one decode pass feeding a token to
every decoding request together (engine/batch_decode.py; one pass per request
where the model cannot batch, or in exact mode where batched rows would not
compute alike; in exact mode passes of at most `max_batch_rows` requests,
since more rows take other kernels: config.EXACT_DECODE_MAX_ROWS); (3) prefill passes of waiting prompts, first come first
served, until `step_prefill_tokens` are spent, so a long prompt advances a
pass at a time between decode steps instead of stalling them (a prompt's
first token is sampled as soon as its last pass ends); (4) sample every
request that has new logits. The passes are the prompt's own schedule
(engine/prefill.py), so exact mode holds as for a request alone.

A request looks the cache up only when its prefill begins, and a long prompt
prefills alone: requests that share a prefix and arrive together (one system
prompt, many users) find the blocks the first one just captured instead of
computing them again. Short prompts that have one pass left share it
(`batch_prefill_rows`, engine/batch_prefill.py): the waiting ones are admitted
into the forward of the first one's last pass, up to the step's tokens, unless
one shares a block with a prompt in that pass (then it waits for the block).

Memory: K/V held by admitted requests never exceeds `kv_budget_tokens`. A
prompt is admitted when its tokens and one more fit; when a decode step does
not fit, the newest running request is preempted: its K/V is dropped, and on
its return it restores its prompt (mostly a cache hit) and feeds its own
generated tokens again, unsampled, then goes on exactly where it stopped
(engine/sequence.py). A request that alone outgrows the budget ends with
finish reason "length"; one whose prompt cannot fit is refused before it
queues (Engine.prepare).

Why our own scheduler rather than transformers' `generate_batch` / continuous
batching manager or a port of vLLM's: those own their paged K/V pool and
their scheduling loop, while here the K/V of a request is the buffers the
prefix cache restores into and captures from, at the prefill schedule that
makes exact mode hold; the loop is small once that is given.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvcellar.config import EXACT_DECODE_MAX_ROWS
from kvcellar.engine.batch_decode import decode_rows
from kvcellar.engine.constraint import Grammars
from kvcellar.engine.request import StreamEvent
from kvcellar.engine.runner import RequestRunner
from kvcellar.engine.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulePolicy:
    batch_rows: bool  # decode requests in one pass (else one pass each, still every step)
    kv_budget_tokens: int  # K/V tokens all admitted requests may hold together
    step_prefill_tokens: int  # prompt tokens prefilled per step, at least one pass
    on_step: Callable[[int], None] | None = None  # told each decode pass's batch size (metrics)
    max_batch_rows: int | None = None  # the most requests one decode pass feeds (exact mode); None: all
    # The fewest rows a prompt's last pass needs to share a forward pass with other prompts' last passes
    # (engine/batch_prefill.py); None: every pass runs alone.
    batch_prefill_rows: int | None = None


@dataclass(frozen=True)
class Load:
    running: int  # admitted requests (prefilling or decoding)
    waiting: int  # not admitted yet: for their turn, for memory, or preempted
    kv_tokens: int  # K/V tokens the running requests hold
    kv_budget_tokens: int
    preemptions: int  # since the engine started


class Scheduler:
    def __init__(self, runner: RequestRunner, policy: SchedulePolicy, grammars: Grammars | None = None) -> None:
        """`grammars`: the constraints of requests with a grammar (engine/constraint.py); None: none allowed."""
        self.runner = runner
        self.policy = policy
        self.grammars = grammars
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._prefilling: Sequence | None = None
        self._order = itertools.count()
        self._preemptions = 0
        # Published by the model's thread after every change, read by any: replacing a reference is atomic.
        self._load = Load(0, 0, 0, policy.kv_budget_tokens, 0)

    def load(self) -> Load:
        return self._load

    # -- the loop --------------------------------------------------------------------------------
    def run(self, jobs: queue.Queue, stop: object) -> None:
        """Take jobs from `jobs` and step until `stop` arrives and every job before it is finished."""
        stopping = False
        with contextlib.ExitStack() as serving:
            while True:
                active = bool(self._running or self._waiting)
                if not active:
                    serving.close()  # the cache's background helpers run while the model is idle
                    if stopping:
                        return
                stopping |= self._collect(jobs, block=not active)
                if (self._running or self._waiting) and not active:
                    serving.enter_context(self.runner.prefix_cache.serving())
                with torch.inference_mode():
                    self._step()
                self._publish_counts()

    def _collect(self, jobs: queue.Queue, block: bool) -> bool:
        """Move queued jobs to the waiting line (waiting for one if `block`); True when `stop` came."""
        from kvcellar.engine.worker import Job

        stopped = False
        while True:
            try:
                item = jobs.get(block=block and not stopped and not self._waiting)
            except queue.Empty:
                return stopped
            if not isinstance(item, Job):
                stopped = True
                continue
            try:
                sequence = Sequence(item, next(self._order), self.runner.eos_ids, self.runner.loaded.tokenizer,
                                    self.runner.loaded.context_length, self.grammars)  # fmt: skip
            except Exception as exc:  # its grammar could not be set up: this request fails, the rest go on
                log.exception("request %d could not start", item.job_id)
                item.put(exc)
                continue
            self._waiting.append(sequence)
            block = False

    def _step(self) -> None:
        self.runner.fit_threads()
        for sequence in [*self._waiting, *self._running]:
            if sequence.job.is_cancelled():
                sequence.end("cancelled")
                self._retire(sequence)
        self._decode_pass()
        self._prefill_passes()
        for sequence in list(self._running):
            if sequence.logits is not None:
                self._sample(sequence)

    def _sample(self, sequence: Sequence) -> None:
        sequence.sample()
        if sequence.finish is not None:
            self._retire(sequence)

    # -- decode ----------------------------------------------------------------------------------
    def _decode_pass(self) -> None:
        rows = [s for s in self._running if s.next_token is not None and s.prompt is None]
        for sequence in rows:
            if sequence.restored is None:  # answered from stored logits: the K/V are restored only now
                self._start_prompt(sequence)
        rows = self._fit_memory(rows)
        if not rows:
            return
        for sequence in rows:
            if sequence.capture is None and sequence.captures and len(sequence.generated) == 1:
                sequence.capture = self.runner.prefix_cache.decode_capture(
                    sequence.tokens, sequence.request.prompt.block_keys, sequence.restored.cache, sequence.request.cache_salt)
        feeds = [sequence.feed_token() for sequence in rows]
        tokens = [token for token, _ in feeds]
        batched = self.policy.batch_rows and len(rows) > 1
        size = (self.policy.max_batch_rows or len(rows)) if batched else 1
        passes = [range(start, min(start + size, len(rows))) for start in range(0, len(rows), size)]
        try:
            if batched:
                model = self.runner.loaded.model
                logits = [row for group in passes
                          for row in decode_rows(model, [tokens[i] for i in group], [rows[i].restored.cache for i in group],
                                                 [rows[i].restored.spans for i in group])]  # fmt: skip
            else:
                logits = [self.runner.decode_step(token, s.restored.cache) for token, s in zip(tokens, rows)]
        except Exception as exc:  # the pass is lost for every row in it; the worker keeps serving
            log.exception("a decode pass of %d requests failed", len(rows))
            for sequence in rows:
                self._fail(sequence, exc)
            return
        if self.policy.on_step is not None:  # requests per forward pass
            for group in passes:
                self.policy.on_step(len(group))
        for sequence, (token, wanted), row_logits in zip(rows, feeds, logits):
            sequence.fed(token, row_logits if wanted else None)

    def _fit_memory(self, rows: list[Sequence]) -> list[Sequence]:
        """Preempt the newest requests until every row's next token fits the budget; the rows left."""
        budget = self.policy.kv_budget_tokens
        while rows and self._kv_tokens() + len(rows) > budget:
            victim = max(self._running, key=lambda s: s.order)
            if len(self._running) == 1:  # alone and still too long: the budget is its limit
                victim.end("length")
                self._retire(victim)
                return []
            self._preempt(victim)
            rows = [s for s in rows if s is not victim]
        return rows

    def _preempt(self, sequence: Sequence) -> None:
        log.info("request %d preempted (K/V budget of %d tokens): it resumes when memory frees up",
                 sequence.job.job_id, self.policy.kv_budget_tokens)  # fmt: skip
        self._detach(sequence)
        sequence.preempt()
        self._waiting.appendleft(sequence)
        self._preemptions += 1

    def _kv_tokens(self) -> int:
        return sum(sequence.kv_tokens for sequence in self._running)

    def _kv_claimed(self) -> int:
        """K/V tokens the running requests hold, a prompt still prefilling counted whole."""
        return sum(len(s.tokens) if s.prompt is not None else s.kv_tokens for s in self._running)

    # -- prefill ---------------------------------------------------------------------------------
    def _prefill_passes(self) -> None:
        spent = 0
        while spent < self.policy.step_prefill_tokens:
            sequence = self._prefilling or self._admit_next()
            if sequence is None:
                return
            if sequence.prompt is None:  # admitted with nothing to prefill (a whole hit)
                continue
            joiners = self._joiners(sequence, self.policy.step_prefill_tokens - spent)
            spent += self._run_last_passes([sequence, *joiners]) if joiners else self._run_pass(sequence)

    def _joiners(self, first: Sequence, room: int) -> list[Sequence]:
        """Waiting prompts admitted now to prefill their last pass in the forward of `first`'s last pass.

        Each joiner's pass has `batch_prefill_rows` rows or more and all of them fit `room` tokens; at most
        EXACT_DECODE_MAX_ROWS prompts share a pass (their first tokens' LM head is a few-rows product). A
        waiting prompt that shares a block with one being prefilled is not admitted: it waits, and finds the
        block cached at its turn (one prefill per shared prefix).
        """
        least = self.policy.batch_prefill_rows
        if least is None or not self._last_pass_of(first, least):
            return []
        joiners: list[Sequence] = []
        tokens = first.prompt.ends[0] - first.prompt.position
        in_flight = set(self._uncached_keys(first))
        while self._waiting and len(joiners) + 1 < EXACT_DECODE_MAX_ROWS:
            if in_flight.intersection(self._waiting[0].request.prompt.block_keys):
                break
            joiner = self._admit_next()
            if joiner is None:  # it waits for memory
                break
            if joiner.prompt is None:  # a whole hit: nothing to prefill
                continue
            size = joiner.prompt.ends[0] - joiner.prompt.position
            if not self._last_pass_of(joiner, least) or tokens + size > room:
                break  # it prefills on its own (it is `_prefilling` now)
            self._prefilling = first
            joiners.append(joiner)
            tokens += size
            in_flight.update(self._uncached_keys(joiner))
        return joiners

    @staticmethod
    def _last_pass_of(sequence: Sequence, least: int) -> bool:
        """Whether `sequence`'s prompt has one pass left, of at least `least` rows."""
        ends = sequence.prompt.ends
        return len(ends) == 1 and ends[0] - sequence.prompt.position >= least

    def _uncached_keys(self, sequence: Sequence) -> list:
        """The block keys of `sequence`'s prompt that its prefill computes (after what it restored)."""
        return sequence.request.prompt.block_keys[sequence.restored.num_tokens // self.runner.block_size :]

    def _admit_next(self) -> Sequence | None:
        """The first waiting request, admitted (looked up, restored) if its prompt fits the K/V budget."""
        if not self._waiting:
            return None
        sequence = self._waiting[0]
        if self._running and self._kv_claimed() + len(sequence.tokens) + 1 > self.policy.kv_budget_tokens:
            return None  # it waits for memory
        self._waiting.popleft()
        self._running.append(sequence)
        now = time.perf_counter()
        if sequence.started is None:
            sequence.started = now
            sequence.timings.queue_s = now - sequence.job.queued_at
        sequence.pending = self.runner.lookup(sequence.request, sequence.timings)
        if sequence.pending.logits is not None and not sequence.generated:
            sequence.logits = sequence.pending.logits  # the first token needs no forward: K/V restored later
            return sequence
        self._start_prompt(sequence)
        return sequence

    def _start_prompt(self, sequence: Sequence) -> None:
        """Restore the held prefix into the request's cache and plan the passes of the rest."""
        pending, sequence.pending = sequence.pending, None
        sequence.restored, sequence.prompt = self.runner.start_prompt(pending, sequence.request, sequence.timings)
        if sequence.hit is None:
            sequence.hit = (sequence.restored.num_tokens, dict(sequence.restored.tokens_by_tier))
        if sequence.prompt is not None:
            self._prefilling = sequence
        elif not sequence.generated:
            sequence.logits = sequence.restored.logits

    def _run_pass(self, sequence: Sequence) -> int:
        """Run the next pass of `sequence`'s prompt; returns its token count."""
        prompt = sequence.prompt
        start, end = prompt.position, prompt.ends[0]
        try:
            logits = self.runner.run_pass(prompt, sequence.restored.cache)
        except Exception as exc:
            log.exception("request %d failed in its prefill", sequence.job.job_id)
            self._fail(sequence, exc)
            return end - start
        if not prompt.ends:
            self._prompt_done(sequence, logits)
        return end - start

    def _run_last_passes(self, group: list[Sequence]) -> int:
        """Run the last pass of every prompt in `group` in one forward; returns their token count."""
        tokens = sum(sequence.prompt.ends[0] - sequence.prompt.position for sequence in group)
        try:
            logits = self.runner.run_last_passes([(sequence.prompt, sequence.restored.cache) for sequence in group])
        except Exception as exc:  # the pass is lost for every prompt in it; the worker keeps serving
            log.exception("a prefill pass of %d requests failed", len(group))
            for sequence in group:
                self._fail(sequence, exc)
            return tokens
        for sequence, row_logits in zip(group, logits):
            self._prompt_done(sequence, row_logits)
        return tokens

    def _prompt_done(self, sequence: Sequence, logits: torch.Tensor) -> None:
        """`sequence`'s prompt is in place: count it, and send its first token now, not after the step's other
        prefills."""
        self.runner.count_prefill(sequence.prompt, sequence.timings)
        sequence.prompt = None
        if self._prefilling is sequence:
            self._prefilling = None
        if not sequence.generated:
            sequence.logits = logits
            self._sample(sequence)

    # -- endings ---------------------------------------------------------------------------------
    def _detach(self, sequence: Sequence) -> None:
        """Take `sequence` out of the lines and let go of the cache entries its lookup held (those not
        restored: answered from the stored logits alone, or preempted before the restore)."""
        if sequence in self._running:
            self._running.remove(sequence)
        elif sequence in self._waiting:
            self._waiting.remove(sequence)
        if self._prefilling is sequence:
            self._prefilling = None
        if sequence.pending is not None:
            sequence.pending.release()

    def _retire(self, sequence: Sequence) -> None:
        """Free what `sequence` holds, then hand its result to its caller (who then finds it over)."""
        self._detach(sequence)
        if sequence.started is None:  # cancelled while it waited: it never reached the model
            sequence.timings.queue_s = time.perf_counter() - sequence.job.queued_at
        if sequence.prompt is not None:  # cancelled part-way through its prefill: what it computed counts
            self.runner.count_prefill(sequence.prompt, sequence.timings)
        result = sequence.result()
        if sequence.restored is not None:
            complete = sequence.prompt is None  # a prefill cancelled part-way vouches for none of its blocks
            self.runner.keep_buffers(sequence.restored.cache, sequence.request.prompt.block_keys if complete else ())
            sequence.restored = None
        self._publish_counts()
        sequence.job.put(StreamEvent(result=result))

    def _fail(self, sequence: Sequence, exc: Exception) -> None:
        self._detach(sequence)
        sequence.restored = None  # a failed request's buffers are simply freed
        sequence.job.put(exc)

    def _publish_counts(self) -> None:
        self._load = Load(len(self._running), len(self._waiting), self._kv_tokens(), self.policy.kv_budget_tokens,
                          self._preemptions)  # fmt: skip
