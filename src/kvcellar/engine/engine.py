"""The engine: one model, its prefix cache, and the worker thread that runs requests.

Operations: `Engine.load(model_dir, ...)`, `encode` (text or chat messages to
ids and message boundaries), `prepare` (check a prompt and compute what every
later step needs, once: a `PreparedPrompt`), `generate`, `stream`, `probe`,
`cache_report` / `cache_stats` (all, or some salts' share; typed / as JSON),
`clear_cache`, `set_cache_budget`, `close`. `Engine` satisfies
`engine.serving.ServingEngine`, the protocol the server and
`ChatSession(engine)` are typed against.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from kvcellar.chat.tools import Tool, parse_tools
from kvcellar.config import EXACT_DECODE_MAX_ROWS, ROW_INVARIANT_MIN_ROWS, EngineConfig
from kvcellar.cache.report import CacheReport, ProbeResult, cache_report, namespace_report
from kvcellar.cache.registry import CacheRegistry, DrainReport
from kvcellar.cache.tier import check_known_tier
from kvcellar.kv.wiring import build_prefix_cache
from kvcellar.engine.constraint import Grammars
from kvcellar.engine.loader import LoadedModel, load_model
from kvcellar.engine.invariance import thread_counts_alike
from kvcellar.engine.schedule import choose_schedule
from kvcellar.engine.threads import ThreadSizer, cpu_busy_seconds
from kvcellar.engine.prepared import PreparedPrompt, PromptLimits
from kvcellar.engine.prompt import encode_chat, encode_text
from kvcellar.engine.request import GenerationRequest, GenerationResult, PromptSegments
from kvcellar.engine.batch_decode import batches_decode, rows_compute_alike
from kvcellar.engine.memory import DecodeBatchStats, kv_budget_tokens
from kvcellar.engine.runner import RequestRunner
from kvcellar.engine.scheduler import Load, SchedulePolicy, Scheduler
from kvcellar.engine.sampling import SamplingParams
from kvcellar.engine.worker import GenerationStream, ModelWorker
from kvcellar.kv import inspect_layout

log = logging.getLogger(__name__)


def _shut_down(worker: ModelWorker, registry: CacheRegistry, drain_timeout_s: float) -> DrainReport:
    worker.close()
    return registry.close(drain_timeout_s)


class Engine:
    """Load once, then generate. Thread-safe: requests from any thread queue to the model's worker."""

    def __init__(self, config: EngineConfig) -> None:
        # Everything that computes with the model runs on its worker thread, loading included (worker.py).
        self._worker = ModelWorker(lambda: self._set_up(config))
        # An engine nobody closed is closed at interpreter exit: the worker thread stops before torch
        # tears down (else the process may abort), and queued disk writes are flushed.
        self._finalizer = weakref.finalize(self, _shut_down, self._worker, self.cache_registry, self.config.cache.drain_timeout_s)

    def _set_up(self, config: EngineConfig) -> Scheduler:
        """Load the model, choose its prefill schedule, build its cache; the scheduler of its requests."""
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.loaded: LoadedModel = load_model(config.model, config.device, config.dtype)
        layout = inspect_layout(self.loaded.model.config)
        config = config.resolved(self.loaded.device.type, layout.only_full_attention)
        schedule, chunk = choose_schedule(self.loaded.model, config, layout, self.loaded.device.type)
        self.config = config = replace(config, prefill_chunk_size=chunk, prefill_schedule=schedule)  # as resolved
        self.prefix_cache, self.cache_registry = build_prefix_cache(
            self.loaded.model.config, layout, self.loaded.device, self.loaded.precision, self.loaded.fingerprint, config
        )
        vocab = self.loaded.model.get_input_embeddings().num_embeddings
        budget = kv_budget_tokens(self.loaded, config.kv_budget_bytes)
        # The one rule for what prompt runs (the server checks through it too): the embedding's rows are the vocabulary.
        self.limits = PromptLimits(self.loaded.context_length, vocab, budget)
        min_rows = ROW_INVARIANT_MIN_ROWS if schedule == "row-invariant" else None
        exact = config.cache.exact
        # An engine with no cache steps like an exact one of the same `exact` setting: it is the reference.
        runner = RequestRunner(self.loaded, self.prefix_cache, config.block_size, chunk, min_rows, steps_tail=exact,
                               threads=self._thread_sizer(config))  # fmt: skip
        batch_rows = batches_decode(layout)
        if batch_rows and exact:  # exact mode batches only where a row computes alike in any batch
            batch_rows = self.loaded.device.type == "cpu" and rows_compute_alike(self.loaded.model, vocab)
            if not batch_rows and layout.only_full_attention:
                log.info("exact mode decodes each request in a pass of its own: batched rows compute differently here")
        self.decode_batches = DecodeBatchStats()
        policy = SchedulePolicy(batch_rows, budget, chunk, on_step=self.decode_batches.observe,
                                max_batch_rows=EXACT_DECODE_MAX_ROWS if exact else None,
                                batch_prefill_rows=self._batch_prefill_rows(batch_rows, exact, schedule))  # fmt: skip
        head = self.loaded.model.get_output_embeddings()
        num_scores = head.weight.shape[0] if head is not None else vocab  # the logits' size: what a grammar masks
        self.grammars = Grammars(self.loaded.tokenizer, num_scores, self.loaded.eos_token_ids)
        return Scheduler(runner, policy, self.grammars)

    def _batch_prefill_rows(self, batch_rows: bool, exact: bool, schedule: str) -> int | None:
        """The fewest rows of a prompt's last pass that shares a forward pass with others' (engine/batch_prefill.py):
        on a CPU where decode rows batch; in exact mode only on the row-invariant schedule, whose passes of
        ROW_INVARIANT_MIN_ROWS rows or more compute each row alike. None: every pass runs alone."""
        if not batch_rows or self.loaded.device.type != "cpu":
            return None
        if exact:
            return ROW_INVARIANT_MIN_ROWS if schedule == "row-invariant" else None
        return 2

    def _thread_sizer(self, config: EngineConfig) -> ThreadSizer | None:
        """CPU threads sized to the free cores (engine/threads.py), among the counts that compute alike;
        None where the user set the threads, on a GPU, with one thread, or without /proc/stat."""
        most = torch.get_num_threads()
        if self.loaded.device.type != "cpu" or config.num_threads is not None or most < 2 or cpu_busy_seconds() is None:
            return None
        alike = thread_counts_alike(self.loaded.model, [1, most // 2, most - 1, most], ROW_INVARIANT_MIN_ROWS)
        if len(alike) < 2:
            log.info("CPU threads stay at %d: other thread counts round some values differently here", most)
            return None
        return ThreadSizer(alike)

    @classmethod
    def load(cls, model: str, **options: Any) -> Engine:
        """`Engine(EngineConfig(model, **options))`: options are EngineConfig's fields (device, dtype,
        block_size, num_threads, cache, prefill_chunk_size), defaulting as there."""
        return cls(EngineConfig(model, **options))

    # -- prompts ---------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> object:
        return self.loaded.tokenizer

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    def encode(self, prompt: str | None = None, messages: Sequence[dict] | None = None, tools: Sequence[Tool] = (),
               keep_through: int | None = None) -> tuple[list[int], PromptSegments]:  # fmt: skip
        """Token ids of a text or of chat messages (with `tools`, chat/tools.py, shown as the template can;
        `keep_through`: a message whose prefix is kept at user priority, engine/prompt.py)."""
        if (prompt is None) == (messages is None):
            raise ValueError("pass exactly one of prompt= or messages=")
        if messages is not None:
            return encode_chat(self.loaded.tokenizer, messages, tools, keep_through)
        return encode_text(self.loaded.tokenizer, prompt), PromptSegments()

    def prepare(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict] | None = None,
        prompt_ids: Sequence[int] | None = None,
        segments: PromptSegments | None = None,
        cache_salt: str = "",
        max_tokens: int | None = None,
        tools: Sequence[dict] = (),
    ) -> PreparedPrompt:
        """Encode (unless `prompt_ids` are given), check against `limits`, and compute the prompt's block keys.

        `segments` go with `prompt_ids` (as `encode(messages=...)` returned them): where the system
        prompt and the last user message end, so their blocks are cached at their priority.
        `max_tokens`, when given, must fit the context after the prompt. `tools`: OpenAI function tools
        shown with `messages` (chat/tools.py; `kvcellar.chat.tool_calls.split_tool_calls` reads calls out of
        the answer, and `kvcellar.chat.grammar.tool_call_grammar` forces them). Raises InvalidRequestError.
        """
        if segments is not None and prompt_ids is None:
            raise ValueError("segments= goes with prompt_ids=; with prompt= or messages= the engine finds them itself")
        if tools and messages is None:
            raise ValueError("tools= goes with messages=: a chat template shows them")
        if prompt_ids is not None:
            ids, segments = list(prompt_ids), segments or PromptSegments()
        else:
            ids, segments = self.encode(prompt, messages, parse_tools(list(tools)))
        self.limits.check_prompt(ids)
        self.limits.check_max_tokens(len(ids), max_tokens)
        return PreparedPrompt(tuple(ids), segments, cache_salt, tuple(self.prefix_cache.block_keys(ids, cache_salt)))

    # -- generation ------------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict] | None = None,
        prompt_ids: Sequence[int] | None = None,
        segments: PromptSegments | None = None,
        prepared: PreparedPrompt | None = None,
        params: SamplingParams | None = None,
        cache_salt: str = "",
        tools: Sequence[dict] = (),
        **sampling: object,
    ) -> GenerationStream:
        """Queue a request; iterate the returned stream for its text, the last event carries `.result`.

        The prompt comes as for `prepare` (text, messages with their `tools`, or ids with their segments), or as a
        `prepared` one (its salt is the one it was prepared with). A `max_tokens` given (here or in
        `params`) must fit the context after the prompt; left out, generation stops at the context's end.
        `stream.cancel()` (from any thread) or dropping the stream cancels the request.
        """
        max_tokens = sampling.get("max_tokens", params.max_tokens if params is not None else None)
        if prepared is None:
            prepared = self.prepare(prompt, messages=messages, prompt_ids=prompt_ids, segments=segments,
                                    cache_salt=cache_salt, max_tokens=max_tokens, tools=tools)  # fmt: skip
        else:
            self.limits.check_max_tokens(len(prepared.ids), max_tokens)
        params = replace(params, **sampling) if params is not None and sampling else params
        params = params or SamplingParams.from_request(**sampling)
        self.limits.check_sampling_ids(params.token_ids())
        if params.grammar is not None:
            self.grammars.check(params.grammar, "grammar")
        return GenerationStream(self._worker.submit(GenerationRequest(prepared, params)))

    def generate(self, prompt: str | None = None, **kwargs: object) -> GenerationResult:
        """Generate to the end and return the whole result (text, tokens, cached tokens, timings)."""
        for event in self.stream(prompt, **kwargs):
            if event.result is not None:
                return event.result
        raise RuntimeError("generation ended without a result")

    # -- cache -----------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def tier_names(self) -> list[str]:
        return [tier.name for tier in self.cache_registry.tiers]

    def cache_report(self, salts: Callable[[str], bool] | None = None) -> CacheReport:
        """Counters (lookups, hit/miss/saved tokens, evictions) and occupancy per tier and priority, typed.

        `salts`: only the cache salts it accepts, their counters and the entries of their namespaces
        (no evictions or media counters: those belong to the shared tiers); None: everything.
        """
        if salts is not None:
            return namespace_report(self.cache_registry, salts)
        return cache_report(self.cache_registry)

    def cache_stats(self, salts: Callable[[str], bool] | None = None) -> dict:
        """`cache_report(salts)` as JSON-ready dict (the cache part of GET /v1/cache/stats, docs/api.md)."""
        return self.cache_report(salts).as_json()

    def probe(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict] | None = None,
        prompt_ids: Sequence[int] | None = None,
        cache_salt: str = "",
        prepared: PreparedPrompt | None = None,
    ) -> ProbeResult:
        """How many of this prompt's tokens the cache would restore now, per tier, without running the model.

        The prompt comes as for `prepare`, or `prepared`; it is checked as a generation's prompt is."""
        if prepared is None:
            prepared = self.prepare(prompt, messages=messages, prompt_ids=prompt_ids, cache_salt=cache_salt)
        num_cached, by_tier = self.prefix_cache.probe(prepared.ids, prepared.block_keys, prepared.salt)
        return ProbeResult(len(prepared.ids), num_cached, by_tier)

    def clear_cache(self, tier: str | None = None) -> None:
        """Drop cached entries of one tier (by name), or of every tier."""
        check_known_tier(tier, self.tier_names)
        self.cache_registry.clear(tier)

    def set_cache_budget(self, tier: str, num_bytes: int) -> None:
        """Change a tier's byte budget at run time; lowering it evicts at once."""
        check_known_tier(tier, self.tier_names)
        if num_bytes < 0:
            raise ValueError(f"a budget cannot be negative (got {num_bytes})")
        self.cache_registry.set_budget(tier, num_bytes)

    @property
    def queue_depth(self) -> int:
        """Requests waiting: queued, or admitted but not running (memory) or preempted."""
        return self._worker.queue_depth

    def load_report(self) -> Load:
        """Running and waiting requests, and the K/V they hold against the budget (any thread)."""
        return self._worker.scheduler.load()

    def close(self, *, drain_timeout_s: float | None = None) -> DrainReport | None:
        """Finish queued work, then drain the cache's pending disk writes and release its directory.

        Drains for at most `drain_timeout_s` seconds (default: `CacheConfig.drain_timeout_s`); writes
        still queued then are dropped, and the report says how many. Idempotent: None after the first call.
        """
        detached = self._finalizer.detach()
        if detached is None:
            return None
        _, shut_down, (worker, registry, default_s), _ = detached
        return shut_down(worker, registry, default_s if drain_timeout_s is None else drain_timeout_s)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
