"""The prefix cache as the engine sees it: restore before prefill, capture during it.

Operations: `ModelPrefixCache.block_keys` (once per request: every later call
takes the keys it returned), `.restore`, `.lookup` (a `PendingRestore`: a hit's
logits at once, its K/V copied only by `build`), `.probe`, `.checkpoint_positions`,
`.capture_prompt_hook`, `.decode_capture` (generated tokens, where the reuse
rule stores them), and `DisabledPrefixCache`, the null object used when
caching is off or the model's cache cannot be restored (no `if enabled`
checks on the request path). What is reused is the namespace's reuse rule
(cache/reuse.py), chosen when the cache was wired; no method checks a mode.

Thread: only the engine's worker thread calls into these objects; the core
`PrefixCache` has its own lock for readers such as stats.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from kvcellar.cache import BlockHash, Match, Priority, PrefixCache, hash_block
from kvcellar.cache.cost_model import CostModel
from kvcellar.cache.reuse import ReuseRule
from kvcellar.cache.segments import PromptSegments, segment_priority
from kvcellar.kv import ModelLayout, RestoredSpan, build_cache, capture_entry, restored_spans
from kvcellar.kv.buffer_pool import KvBufferPool
from kvcellar.kv.growing_layer import new_cache

log = logging.getLogger(__name__)


@dataclass
class Restored:
    """A cache standing at `num_tokens`, ready to prefill the rest of the prompt."""

    cache: DynamicCache
    num_tokens: int
    logits: torch.Tensor | None = None  # the prompt's next-token logits when the whole prompt was cached
    tokens_by_tier: dict[str, int] = field(default_factory=dict)
    lookup_s: float = 0.0
    restore_s: float = 0.0
    num_resident_tokens: int = 0  # of num_tokens, adopted in place from the last request's buffers
    spans: tuple[RestoredSpan, ...] = ()  # the cache entries its K/V were copied from (kv/state.py)


class PendingRestore:
    """A lookup's entries, held (pinned) until `build` copies them into a cache or `release` lets them go.

    `build` at most once; `release` after it (or twice) is a no-op, so a `finally` may call it.
    `logits`: the prompt's next-token logits when the whole prompt was found with them (then no
    forward is needed before the first token), else None.
    """

    def __init__(self, owner: ModelPrefixCache | None, core: PrefixCache | None, match: Match | None,
                 logits: torch.Tensor | None, lookup_s: float) -> None:  # fmt: skip
        self._owner = owner
        self.core = core
        self.match = match
        self.logits = logits
        self.lookup_s = lookup_s
        self.num_tokens = match.num_tokens if match is not None else 0
        self.tokens_by_tier = dict(match.tokens_by_tier) if match is not None else {}
        self._open = True

    def build(self, capacity: int, pool: KvBufferPool | None) -> Restored:
        """The cache standing at `num_tokens` (at 0 if the entries did not fit: they are then discarded)."""
        self._close()
        return self._owner._build(self, capacity, pool)

    def release(self) -> None:
        """Let the entries go without restoring them (the request needed no forward)."""
        if self._open:
            self._open = False
            if self.core is not None:
                self.core.release(self.match)

    def _close(self) -> None:
        if not self._open:
            raise RuntimeError("a pending restore is built once, and not after its release")
        self._open = False


class _MissedRestore(PendingRestore):
    """The disabled cache's lookup: nothing held, a fresh cache."""

    def __init__(self, config: object) -> None:
        super().__init__(None, None, None, None, 0.0)
        self._config = config

    def build(self, capacity: int, pool: KvBufferPool | None) -> Restored:
        self._close()
        return Restored(new_cache(self._config, capacity, pool), 0)


class DisabledPrefixCache:
    """Null object: every lookup misses, nothing is stored."""

    def __init__(self, config: object) -> None:
        self._config = config

    def block_keys(self, token_ids: Sequence[int], salt: str = "") -> list[BlockHash]:
        return []

    def restore(
        self, token_ids: Sequence[int], block_keys: Sequence[BlockHash], salt: str = "", capacity: int = 0,
        pool: KvBufferPool | None = None,
    ) -> Restored:
        return self.lookup(token_ids, block_keys, salt).build(capacity, pool)

    def lookup(self, token_ids: Sequence[int], block_keys: Sequence[BlockHash], salt: str = "") -> PendingRestore:
        return _MissedRestore(self._config)

    def checkpoint_positions(self, token_ids: Sequence[int], segments: PromptSegments) -> list[int]:
        return []

    def computing(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def serving(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def wants_prefill_rate(self) -> bool:
        return False

    def probe(self, token_ids: Sequence[int], block_keys: Sequence[BlockHash], salt: str = "") -> tuple[int, dict[str, int]]:
        return 0, {}

    def record_prefill(self, num_tokens: int, seconds: float) -> None:
        return None

    def capture_prompt_hook(self, token_ids, block_keys, segments, cache, salt="") -> None:
        return None

    def decode_capture(self, token_ids, block_keys, cache, salt="") -> DecodeCapture | None:
        return None


class ModelPrefixCache:
    """Glue between one model's transformers cache and the torch-free core."""

    def __init__(
        self,
        core_for_salt: Callable[[str], PrefixCache],
        model_config: object,
        layout: ModelLayout,
        block_size: int,
        reuse: ReuseRule,
        device: torch.device,
        computing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        serving: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        weigh_restores: bool = True,
    ) -> None:
        self._core_for_salt = core_for_salt
        self._device = device
        self.computing = computing  # context for a prefill: background writers step aside
        self.serving = serving  # context for a whole request: background helpers pause
        self.cost_model = CostModel()  # fed by restores (load rates) and by the runner (prefill rate)
        # Off: every hit is restored whatever it costs (CacheConfig.cost_model); rates are still measured.
        self._planner = self.cost_model.plan if weigh_restores else None
        self._config = model_config
        self._layout = layout
        self.block_size = block_size
        self.reuse = reuse  # the rule every salt's core was built with

    # -- restore ---------------------------------------------------------------------------------
    def block_keys(self, token_ids: Sequence[int], salt: str = "") -> list[BlockHash]:
        """The keys of the prompt's full blocks in the salt's namespace, as its prefill computes them."""
        return self._core_for_salt(salt).block_keys(token_ids)

    def restore(
        self, token_ids: Sequence[int], block_keys: Sequence[BlockHash], salt: str = "", capacity: int = 0,
        pool: KvBufferPool | None = None,
    ) -> Restored:
        """Build the cache for the longest restorable prefix; `capacity` = tokens the request may reach.

        The K/V buffers come from `pool` (the CPU runner's; None: fresh allocations), which may still
        hold the last request's K/V of this prompt's leading blocks: those are adopted in place.
        """
        return self.lookup(token_ids, block_keys, salt).build(capacity, pool)

    def lookup(self, token_ids: Sequence[int], block_keys: Sequence[BlockHash], salt: str = "") -> PendingRestore:
        """Find the longest restorable prefix and hold its entries; nothing is copied into a cache yet.

        When the whole prompt is cached with its next-token logits, `PendingRestore.logits` has them at
        once: the first token can be sampled before the K/V are copied (`build`), or without them at all.
        """
        core = self._core_for_salt(salt)
        started = time.perf_counter()
        match = core.lookup(token_ids, block_keys=block_keys, planner=self._planner)
        looked_up = time.perf_counter()
        for tier_name, seconds in match.load_s_by_tier.items():
            self.cost_model.record_load(tier_name, match.loaded_bytes_by_tier.get(tier_name, 0), seconds)
        logits = None
        if match.use_logits:
            try:
                logits = match.payload_of(match.tail).logits.to(self._device)
            except BaseException:
                core.release(match)
                raise
        return PendingRestore(self, core, match, logits, looked_up - started)

    def _build(self, pending: PendingRestore, capacity: int, pool: KvBufferPool | None) -> Restored:
        core, match = pending.core, pending.match
        started = time.perf_counter()
        try:
            payloads = [match.payload_of(entry) for entry in match.entries]
            for payload in payloads:
                payload.wait_ready()  # a demotion's asynchronous copy may still be filling it
            device = self._device
            resident = self._resident_tokens(match, capacity, pool)
            try:
                cache = build_cache(self._config, self._layout, payloads, match.num_tokens, device, capacity, pool, resident)
            except (KeyError, ValueError, RuntimeError) as exc:
                # A payload that does not fit this model is a mismatch: evict exactly it and run cold.
                log.warning("cached state did not fit (%s); discarding it and recomputing", exc)
                self._discard_suspects(core, match)
                return Restored(new_cache(self._config, capacity, pool), 0, lookup_s=pending.lookup_s)
        finally:
            core.release(match)
        if device.type == "cuda":  # the copies run behind the CPU: wait, so restore_s is their true time
            torch.cuda.synchronize(device)
        spans = restored_spans(payloads, match.num_tokens, device, resident)
        return Restored(cache, match.num_tokens, pending.logits, dict(match.tokens_by_tier), pending.lookup_s,
                        time.perf_counter() - started, resident, spans)

    def _resident_tokens(self, match: Match, capacity: int, pool: KvBufferPool | None) -> int:
        """Leading tokens of `match` whose K/V `pool`'s buffers still hold from the last request."""
        if pool is None:
            return 0
        whole = match.num_tokens // self.block_size  # a trimmed last block is copied, never adopted
        keys = [entry.key for entry in match.blocks[:whole]]
        return pool.resident_blocks(keys, max(capacity, match.num_tokens)) * self.block_size

    def probe(self, token_ids: Sequence[int], block_keys: Sequence[BlockHash], salt: str = "") -> tuple[int, dict[str, int]]:
        """Tokens the next request with these ids would restore, per tier (the lookup is released at once)."""
        return self._core_for_salt(salt).probe(token_ids, block_keys=block_keys)

    def wants_prefill_rate(self) -> bool:
        """Whether the cost model has a tier to weigh against recomputing (any tier below the first)."""
        return len(self._core_for_salt("").tiers) > 1

    def record_prefill(self, num_tokens: int, seconds: float) -> None:
        """Measured prefill speed: what the cost model weighs a slow tier's load time against.

        Runs shorter than a block are mostly per-call overhead and would understate the rate.
        """
        if num_tokens >= self.block_size:
            self.cost_model.record_prefill(num_tokens, seconds)

    def _discard_suspects(self, core: PrefixCache, match: Match) -> None:
        core.discard(match.tail.key if match.tail is not None else match.blocks[-1].key)

    # -- capture ---------------------------------------------------------------------------------
    def checkpoint_positions(self, token_ids: Sequence[int], segments: PromptSegments) -> list[int]:
        """Extra chunk cuts at message boundaries, where the reuse rule lets them change the chunk schedule."""
        return self.reuse.message_cuts(len(token_ids), (segments.system_end, segments.last_user_end))

    def capture_prompt_hook(
        self, token_ids: Sequence[int], block_keys: Sequence[BlockHash], segments: PromptSegments, cache: DynamicCache,
        salt: str = "",
    ) -> Callable[[int, int, torch.Tensor | None], None]:
        """A prefill hook that stores each full block, each message-boundary checkpoint and the prompt's tail.

        A chunk may span several blocks (engine/prefill.py): each is captured under its key in
        `block_keys` (the prompt's, from `block_keys`: keyed as its schedule computed it).
        """
        core = self._core_for_salt(salt)
        block = self.block_size
        layout = self._layout
        checkpoints = set(self.checkpoint_positions(token_ids, segments))
        num_tokens = len(token_ids)

        def on_chunk_end(chunk_start: int, end: int, logits: torch.Tensor | None) -> None:
            for block_end in range((chunk_start // block + 1) * block, end + 1, block):
                start = block_end - block
                parent = block_keys[start // block - 1] if start else core.root
                payload = capture_entry(cache, layout, start, block_end)
                priority = segment_priority(start, block_end, segments)
                key = block_keys[start // block]
                core.insert_block(parent, token_ids[start:block_end], payload, payload.num_bytes, priority, key=key)
            if end == num_tokens or end in checkpoints:
                priority = segment_priority(end - 1, end, segments)
                _store_tail(core, layout, cache, token_ids, end, logits, priority, block_keys)

        return on_chunk_end

    def decode_capture(
        self, token_ids: Sequence[int], block_keys: Sequence[BlockHash], cache: DynamicCache, salt: str = ""
    ) -> DecodeCapture | None:
        """Where the reuse rule stores generated tokens: what keeps their K/V as the request decodes."""
        if not self.reuse.stores_generated:
            return None
        return DecodeCapture(self._core_for_salt(salt), self._layout, cache, list(block_keys))


def _store_tail(
    core: PrefixCache, layout: ModelLayout, cache: DynamicCache, token_ids: Sequence[int], end: int,
    logits: torch.Tensor | None, priority: Priority, block_keys: Sequence[BlockHash],
) -> None:
    """Store tokens [last block boundary, end) as a tail entry; a 0-token one carries only logits."""
    block = core.capabilities.block_size
    start = end // block * block
    if start == end and logits is None:
        return
    parent = block_keys[start // block - 1] if start else core.root
    payload = capture_entry(cache, layout, start, end, logits)
    core.insert_tail(parent, token_ids[start:end], payload, payload.num_bytes, priority, has_logits=logits is not None)


class DecodeCapture:
    """Keeps the K/V of one request's generated tokens (assistant priority): each block as it fills,
    then the tail, so the next turn can extend prompt + answer.

    `chain` starts as the prompt's block keys and follows the sequence block by block.
    """

    def __init__(self, core: PrefixCache, layout: ModelLayout, cache: DynamicCache, chain: list[BlockHash]) -> None:
        self._core = core
        self._layout = layout
        self._cache = cache
        self._chain = chain

    def token_fed(self, sequence: list[int]) -> None:
        """`sequence` = prompt + generated tokens whose K/V is now in the cache."""
        block = self._core.capabilities.block_size
        end = len(sequence)
        if end % block:
            return
        core = self._core
        parent = self._chain[-1] if self._chain else core.root
        tokens = sequence[end - block : end]
        key = hash_block(parent, tokens)
        payload = capture_entry(self._cache, self._layout, end - block, end)
        core.insert_block(parent, tokens, payload, payload.num_bytes, Priority.ASSISTANT, key=key)
        # The chain follows the sequence even when the store was refused: a later block keyed
        # under an older parent would claim a prefix it does not have (the core then refuses
        # it, since its true parent is not resident).
        self._chain.append(key)

    def finish(self, sequence: Sequence[int]) -> None:
        """Store the tail of prompt + generated tokens (after the last full block)."""
        if len(sequence) % self._core.capabilities.block_size:
            end = len(sequence)
            _store_tail(self._core, self._layout, self._cache, sequence, end, None, Priority.ASSISTANT, self._chain)
