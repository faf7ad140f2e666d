"""The prefix cache of one namespace: chained blocks and tails over ordered tiers.

Operations: `block_keys` (a prompt's chained block keys under this
namespace's reuse rule: compute them once per request and pass them on);
`lookup` (longest restorable prefix, loaded and pinned; optional
restore-vs-recompute `planner`) and `release`; `probe` (the same answer,
nothing loaded or counted); `insert_block`, `insert_tail`; `discard` (drop
one entry that failed validation); `clear`, `set_budget_bytes`, `stats`.

What may be restored is the namespace's `ReuseRule` (cache/reuse.py: exact or
near), fixed when the cache is built; no call takes a mode.

Movement between tiers (movement.py), tiers ordered fastest first:
- insert: into the first tier, plus a copy into every `write_through` tier
  (the disk tier writes it on its background thread, so a restart finds it);
- eviction from tier i demotes the entry to tier i + 1 (a persistent tier
  queues the write and serves the entry from memory until it is durable, so
  an entry is never in neither place);
- a hit in a slower tier promotes a copy into the first tier.

Invariants:
- Chains stay connected: a block or tail is stored only when its parent is
  the root or a resident block, and tiers evict only leaves.
- At most `max_tail_entries` tail entries are resident in the first
  tier; beyond that the least recently used unpinned one is demoted.
- Only explicit removals (discard, clear, a tail superseded by the same tail
  with logits) take pinned entries; their holders keep a valid payload.
- A lookup's entries carry their payloads (loaded by the tiers); an entry a
  tier cannot load is dropped by that tier and the lookup walks again.
- One lock serializes every public method; tiers and observer run under it.
  Change budgets through `set_budget_bytes` so evictions are counted.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Callable, Sequence

from kvcellar.cache.cost_model import Segment
from kvcellar.cache.entry import CacheEntry, Priority
from kvcellar.cache.hashing import BlockHash, hash_block, hash_tail
from kvcellar.cache.layout import LayoutCapabilities
from kvcellar.cache.loading import LoadFailed, load_match, restore_entries, tokens_by_tier
from kvcellar.cache.match import Match, RestorePoint, choose_restore_point
from kvcellar.cache.movement import TierSet
from kvcellar.cache.observer import CacheObserver, NullObserver
from kvcellar.cache.tails import TailLRU
from kvcellar.cache.reuse import EXACT, ReuseRule
from kvcellar.cache.stats import CacheStats, snapshot
from kvcellar.cache.tier import Tier

Planner = Callable[[list[Segment], int], int]  # (segments found, tokens computed anyway) -> leading segments to load
MAX_LOAD_ATTEMPTS = 8  # each failed attempt removed the entry it tripped on; past this, run cold
_COUNTERS = (
    "num_lookups", "num_hit_tokens", "num_miss_tokens", "num_evictions", "num_discards",
    "num_promotions", "num_demotions", "num_dropped", "num_load_failures",
)  # fmt: skip


class PrefixCache:
    """Lookups and inserts for the namespace rooted at `root`, over `tiers` ordered fastest first."""

    def __init__(
        self,
        root: BlockHash,
        capabilities: LayoutCapabilities,
        tiers: Sequence[Tier],
        *,
        reuse: ReuseRule = EXACT,
        max_tail_entries: int = 8,
        observer: CacheObserver | None = None,
        write_through: Sequence[str] = (),
        lock: threading.RLock | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("a PrefixCache needs at least one tier (for example MemoryTier(budget_bytes))")
        self._root = root
        self._capabilities = capabilities
        self._block_size = capabilities.block_size
        self._reuse = reuse
        self._observer: CacheObserver = observer if observer is not None else NullObserver()
        # Re-entrant so an observer may read stats(); pass one lock to every core that shares these tiers.
        self._lock = lock if lock is not None else threading.RLock()
        self._counters: Counter[str] = Counter()  # the num_* fields of CacheStats
        self._tokens_by_tier: Counter[str] = Counter()
        tails = TailLRU(max_tail_entries)
        self._set = TierSet(tiers, root, tails, self._observer, self._counters, write_through)
        self._tiers = self._set.tiers  # fastest first

    @property
    def root(self) -> BlockHash:
        return self._root

    @property
    def capabilities(self) -> LayoutCapabilities:
        return self._capabilities

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return self._tiers

    @property
    def reuse(self) -> ReuseRule:
        return self._reuse

    def block_keys(self, token_ids: Sequence[int]) -> list[BlockHash]:
        """The chained keys of the prompt's full blocks, as lookups and inserts of this prompt use them."""
        return self._reuse.block_keys(self._root, token_ids, self._block_size)

    # -- lookup ------------------------------------------------------------------------------

    def lookup(
        self, token_ids: Sequence[int], *, block_keys: Sequence[BlockHash] | None = None, planner: Planner | None = None
    ) -> Match:
        """The longest restorable prefix of `token_ids`, payloads loaded; pinned until `release`.

        `block_keys`: the prompt's `block_keys`, when the caller already has them.
        `planner` (e.g. `CostModel.plan`) may cut the restore short when loading
        from a slow tier would take longer than computing those tokens again.
        """
        tokens = tuple(token_ids)
        keys = self.block_keys(tokens) if block_keys is None else block_keys
        with self._lock:
            match = Match(0)
            where: dict[BlockHash, int] = {}  # key -> index of the tier that holds the entry
            for _ in range(MAX_LOAD_ATTEMPTS):
                where = {}
                point, chain = self._restore_point(tokens, keys, where)
                if planner is not None:
                    point = self._plan(point, chain, where, planner, len(tokens))
                try:
                    match = load_match(self._tiers, point, chain, where, self._block_size, self._root)
                    break
                except LoadFailed as failed:
                    self._tiers[failed.tier_index].evict(failed.key)
                    self._counters["num_load_failures"] += 1
                except KeyError:  # the tier dropped the entry (gone, or failed validation): walk again
                    self._counters["num_load_failures"] += 1
            match = dataclasses.replace(match, promoted_payloads=self._set.promote(match.entries, where))
            self._counters["num_lookups"] += 1
            self._counters["num_hit_tokens"] += match.num_tokens
            self._counters["num_miss_tokens"] += len(tokens) - match.num_tokens
            self._tokens_by_tier.update(match.tokens_by_tier)
            self._observer.on_lookup(match, len(tokens))
            return match

    def probe(
        self, token_ids: Sequence[int], *, block_keys: Sequence[BlockHash] | None = None
    ) -> tuple[int, dict[str, int]]:
        """(tokens a lookup would restore now, per tier); nothing is loaded, pinned or counted."""
        tokens = tuple(token_ids)
        keys = self.block_keys(tokens) if block_keys is None else block_keys
        with self._lock:
            where: dict[BlockHash, int] = {}
            point, chain = self._restore_point(tokens, keys, where)
            return point.num_tokens(self._block_size), tokens_by_tier(point, chain, where, self._tiers, self._block_size)

    def release(self, match: Match) -> None:
        """Unpin the entries of `match` (call once per lookup, after restoring)."""
        with self._lock:
            for entry in match.entries:
                for tier in self._tiers:
                    # Identity, not key: an entry discarded and stored again is a new object. Entries
                    # read from a persistent tier are fresh objects no tier holds: nothing to unpin.
                    if tier.contains(entry.key) and tier.get(entry.key) is entry:
                        tier.complete_load([entry.key])
                        break

    def _restore_point(
        self, tokens: tuple[int, ...], keys: Sequence[BlockHash], where: dict[BlockHash, int]
    ) -> tuple[RestorePoint, list[CacheEntry]]:
        chain, asked = self._walk_chain(keys, where)
        parent = chain[-1].key if chain else self._root
        children = self._set.children(parent, where, asked)
        previous: list[CacheEntry] = []
        if chain and len(chain) * self._block_size == len(tokens):
            previous = self._set.children(chain[-1].parent, where, asked)
        point = choose_restore_point(
            tokens, chain, children, previous,
            block_size=self._block_size, can_trim=self._capabilities.can_trim, rule=self._reuse,
        )  # fmt: skip
        return point, chain

    def _walk_chain(self, keys: Sequence[BlockHash], where: dict[BlockHash, int]) -> tuple[list[CacheEntry], bool]:
        """(the resident entries of the leading `keys`, up to the first one missing; whether tiers across a
        network were asked).

        Tiers across a network are asked once, about the rest of the chain, at the first key no local
        tier holds: one round trip per lookup, none when the local tiers hold the whole chain.
        """
        chain: list[CacheEntry] = []
        asked = False
        for position, key in enumerate(keys):
            found = self._set.find(key)
            if not asked and (found is None or self._set.is_networked(found[1])):
                asked = True
                if self._set.ask_chain(chain[-1].key if chain else self._root, keys[position:]):
                    found = self._set.find(key)
            if found is None:
                break
            chain.append(found[0])
            where[key] = found[1]
        return chain, asked

    def _plan(
        self, point: RestorePoint, chain: list[CacheEntry], where: dict[BlockHash, int], planner: Planner, n: int
    ) -> RestorePoint:
        """Keep only the leading entries the planner finds faster to load than to compute."""
        used = restore_entries(point, chain)
        block_size = self._block_size
        segments = [
            Segment(self._tiers[where[e.key]].name, e.num_bytes, point.num_entry_tokens if e is point.entry else block_size)
            for e in used
        ]
        count = planner(segments, n - point.num_tokens(block_size))
        if count >= len(used):
            return point
        # Below the prompt's end (a boundary there needs logits), where the rule lets a prefill start.
        return RestorePoint(self._reuse.last_boundary(min(count, point.num_blocks), n, block_size))

    # -- insert ------------------------------------------------------------------------------

    def insert_block(
        self,
        parent: BlockHash,
        token_ids: Sequence[int],
        payload: object,
        num_bytes: int,
        priority: Priority,
        tier_name: str | None = None,
        key: BlockHash | None = None,
    ) -> BlockHash | None:
        """Store a full block after `parent`; its key, or None when refused (parent missing, no room).

        `key`: the block's key from its prompt's `block_keys` (the only source of a stepped key);
        None: the plain key of `token_ids` after `parent` is hashed here.
        """
        tokens = tuple(token_ids)
        if len(tokens) != self._block_size:
            raise ValueError(f"a block holds exactly {self._block_size} tokens, got {len(tokens)}; use insert_tail")
        key = hash_block(parent, tokens) if key is None else key
        entry = CacheEntry(key, parent, tokens, num_bytes, priority, payload, is_tail=False, namespace=self._root)
        with self._lock:
            stored = self._set.store(entry, self._set.index_of(tier_name))
            through = self._set.write_through(entry)  # even when the first tier had no room
            return key if stored is not None or through else None

    def insert_tail(
        self,
        parent: BlockHash,
        token_ids: Sequence[int],
        payload: object,
        num_bytes: int,
        priority: Priority,
        has_logits: bool = False,
    ) -> BlockHash | None:
        """Store a sub-block tail after `parent` in the first tier; its key, or None when refused."""
        tokens = tuple(token_ids)
        if len(tokens) >= self._block_size:
            raise ValueError(f"a tail entry holds fewer than {self._block_size} tokens, got {len(tokens)}")
        key = hash_tail(parent, tokens)
        entry = CacheEntry(
            key, parent, tokens, num_bytes, priority, payload, is_tail=True, has_logits=has_logits, namespace=self._root
        )
        with self._lock:
            stored = self._set.store_tail(entry)
            through = stored is not None and self._set.write_through(entry)
            return key if stored is not None or through else None

    # -- maintenance -------------------------------------------------------------------------

    def discard(self, key: BlockHash) -> bool:
        """Remove exactly the entry `key` from every tier (its payload failed validation)."""
        with self._lock:
            removed = False
            for tier in self._tiers:
                entry = tier.evict(key)
                if entry is not None:
                    removed = True
                    self._counters["num_discards"] += 1
                    self._observer.on_evict(entry, tier.name)
            self._set.tails.forget(key)
            return removed

    def clear(self, tier_name: str | None = None) -> None:
        """Drop every entry of one tier, or of all tiers (not counted as evictions)."""
        with self._lock:
            indexes = range(len(self._tiers)) if tier_name is None else [self._set.index_of(tier_name)]
            for index in indexes:
                self._tiers[index].clear()
            self._set.tails.prune(self._tiers)

    def set_budget_bytes(self, budget_bytes: int, tier_name: str | None = None) -> None:
        """Change a tier's budget (the first tier by default); evictions are counted and demoted."""
        with self._lock:
            index = self._set.index_of(tier_name)
            self._set.demote(self._tiers[index].set_budget(budget_bytes), index)

    def stats(self) -> CacheStats:
        with self._lock:
            counters = {name: self._counters[name] for name in _COUNTERS}
            return snapshot([tier.stats() for tier in self._tiers], counters, dict(self._tokens_by_tier))
