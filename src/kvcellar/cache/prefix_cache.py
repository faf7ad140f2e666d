"""The prefix cache of one namespace: chained blocks and partial tails over ordered tiers.

Operations: `lookup` (longest restorable prefix, pinned) and `release`;
`insert_block`, `insert_partial`; `discard` (drop one entry that failed
validation); `clear`, `set_budget_bytes`, `stats`.

Invariants:
- Chains stay connected: a block or partial is stored only when its parent is
  the root or a resident block, and tiers evict only leaves.
- At most `max_partial_entries` partial entries are resident; beyond that the
  least recently used (inserted or looked up) unpinned partial is evicted.
- Only explicit removals (discard, clear, a tail superseded by the same tail
  with logits) take pinned entries; their holders keep a valid payload.
- One lock serializes every public method; tiers and observer run under it.
  Change budgets through `set_budget_bytes` so evictions are counted.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

from kvcellar.cache.entry import CacheEntry, Priority
from kvcellar.cache.hashing import BlockHash, hash_block, hash_partial
from kvcellar.cache.layout import LayoutCapabilities
from kvcellar.cache.match import Match, RestorePoint, choose_restore_point
from kvcellar.cache.observer import CacheObserver, NullObserver
from kvcellar.cache.partials import PartialLRU
from kvcellar.cache.stats import CacheStats, snapshot
from kvcellar.cache.tier import Tier


class PrefixCache:
    """Lookups and inserts for the namespace rooted at `root`, over `tiers` ordered fastest first."""

    def __init__(
        self,
        root: BlockHash,
        capabilities: LayoutCapabilities,
        tiers: Sequence[Tier],
        *,
        max_partial_entries: int = 8,
        observer: CacheObserver | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("a PrefixCache needs at least one tier (for example MemoryTier(budget_bytes))")
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be distinct, got {names}")
        self._root = root
        self._capabilities = capabilities
        self._block_size = capabilities.block_size
        self._tiers: tuple[Tier, ...] = tuple(tiers)  # fastest first
        self._observer: CacheObserver = observer if observer is not None else NullObserver()
        self._lock = threading.RLock()  # re-entrant so an observer may read stats()
        self._partials = PartialLRU(max_partial_entries)
        self._num_lookups = self._num_hit_tokens = self._num_miss_tokens = 0
        self._num_evictions = self._num_discards = 0
        self._tokens_by_tier: Counter[str] = Counter()

    @property
    def root(self) -> BlockHash:
        return self._root

    @property
    def capabilities(self) -> LayoutCapabilities:
        return self._capabilities

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return self._tiers

    # -- lookup ------------------------------------------------------------------------------

    def lookup(self, token_ids: Sequence[int], *, exact: bool) -> Match:
        """The longest restorable prefix of `token_ids`; its entries stay pinned until `release`."""
        tokens = tuple(token_ids)
        with self._lock:
            where: dict[BlockHash, int] = {}  # key -> index of the tier that holds the entry
            chain = self._walk_chain(tokens, where)
            parent = chain[-1].key if chain else self._root
            children = self._children(parent, where)
            previous: list[CacheEntry] = []
            if chain and len(chain) * self._block_size == len(tokens):
                previous = self._children(chain[-1].parent, where)
            point = choose_restore_point(
                tokens, chain, children, previous,
                block_size=self._block_size, can_trim=self._capabilities.can_trim, exact=exact,
            )  # fmt: skip
            match = self._pin(point, chain, where)
            self._num_lookups += 1
            self._num_hit_tokens += match.num_tokens
            self._num_miss_tokens += len(tokens) - match.num_tokens
            self._tokens_by_tier.update(match.tokens_by_tier)
            self._observer.on_lookup(match, len(tokens))
            return match

    def release(self, match: Match) -> None:
        """Unpin the entries of `match` (call once per lookup, after restoring)."""
        with self._lock:
            for entry in match.entries:
                for tier in self._tiers:
                    # Identity, not key: an entry discarded and stored again is a new object.
                    if tier.get(entry.key) is entry:
                        tier.complete_load([entry.key])
                        break

    def _walk_chain(self, tokens: tuple[int, ...], where: dict[BlockHash, int]) -> list[CacheEntry]:
        chain: list[CacheEntry] = []
        parent = self._root
        block_size = self._block_size
        for start in range(0, len(tokens) - block_size + 1, block_size):
            key = hash_block(parent, tokens[start : start + block_size])
            found = self._find(key)
            if found is None:
                break
            chain.append(found[0])
            where[key] = found[1]
            parent = key
        return chain

    def _children(self, parent: BlockHash, where: dict[BlockHash, int]) -> list[CacheEntry]:
        found: list[CacheEntry] = []
        for index, tier in enumerate(self._tiers):
            for child in tier.children(parent):
                if child.key not in where:  # the fastest tier holding a key wins
                    where[child.key] = index
                    found.append(child)
        return found

    def _pin(self, point: RestorePoint, chain: list[CacheEntry], where: dict[BlockHash, int]) -> Match:
        blocks = tuple(chain[: point.num_blocks])
        used = [*blocks, point.entry] if point.entry is not None else list(blocks)
        keys_by_tier: dict[int, list[BlockHash]] = {}
        tokens_by_tier: Counter[str] = Counter()
        for entry in used:
            index = where[entry.key]
            keys_by_tier.setdefault(index, []).append(entry.key)
            num_used = point.num_entry_tokens if entry is point.entry else self._block_size
            tokens_by_tier[self._tiers[index].name] += num_used
        for index, keys in keys_by_tier.items():
            self._tiers[index].prepare_load(keys)  # pins and touches, chain order
        if point.entry is not None and point.entry.is_partial:
            self._partials.touch(point.entry.key, where[point.entry.key])  # promotion on hit
        return Match(
            num_tokens=point.num_tokens(self._block_size),
            blocks=blocks,
            partial=point.entry,
            num_partial_tokens=point.num_entry_tokens,
            use_logits=point.use_logits,
            tokens_by_tier={name: count for name, count in tokens_by_tier.items() if count},
        )

    # -- insert ------------------------------------------------------------------------------

    def insert_block(
        self,
        parent: BlockHash,
        token_ids: Sequence[int],
        payload: object,
        num_bytes: int,
        priority: Priority,
        tier_name: str | None = None,
    ) -> BlockHash | None:
        """Store a full block after `parent`; its key, or None when refused (parent missing, no room)."""
        tokens = tuple(token_ids)
        if len(tokens) != self._block_size:
            raise ValueError(f"a block holds exactly {self._block_size} tokens, got {len(tokens)}; use insert_partial")
        entry = CacheEntry(hash_block(parent, tokens), parent, tokens, num_bytes, priority, payload, is_partial=False)
        with self._lock:
            return self._store(entry, self._tier_index(tier_name))

    def insert_partial(
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
            raise ValueError(f"a partial entry holds fewer than {self._block_size} tokens, got {len(tokens)}")
        key = hash_partial(parent, tokens)
        entry = CacheEntry(key, parent, tokens, num_bytes, priority, payload, is_partial=True, has_logits=has_logits)
        with self._lock:
            tier = self._tiers[0]
            old = tier.get(key)
            superseded = old is not None and has_logits and not old.has_logits
            if superseded:
                tier.evict(key)  # the same tail with logits replaces it; not an eviction for space
            if (old is None or superseded) and not self._partials.can_admit(self._tiers):
                num_max = self._partials.max_entries
                full = f"max_partial_entries={num_max} reached and every partial is pinned"
                return self._refuse(entry, full if num_max else "partials disabled")
            stored = self._store(entry, 0)
            if stored is None and superseded:
                self._store(old, 0)  # the new tail was refused: keep the old one (its bytes were just freed)
            if tier.get(key) is not None:
                self._partials.touch(key, 0)
                for victim, index in self._partials.overflow(self._tiers):
                    self._tiers[index].evict(victim.key)
                    self._demote((victim,), index)
            return stored

    def _store(self, entry: CacheEntry, index: int) -> BlockHash | None:
        parent = self._find(entry.parent)
        if entry.parent != self._root and (parent is None or parent[0].is_partial):
            return self._refuse(entry, f"parent {entry.parent.hex()} is not a resident block")
        tier = self._tiers[index]
        result = tier.prepare_store(entry)
        if not result.accepted:
            return self._refuse(entry, result.reason)
        self._demote(result.evicted, index)
        is_new = tier.get(entry.key) is None
        tier.complete_store(entry.key)
        if is_new:
            self._observer.on_store(entry, tier.name)
        return entry.key

    def _refuse(self, entry: CacheEntry, reason: str) -> None:
        self._observer.on_refuse(entry, reason)

    def _demote(self, entries: Sequence[CacheEntry], from_index: int) -> None:
        """Hook for write-behind demotion: later, hand `entries` to tiers[from_index + 1].

        For now the entries are dropped: counted as evictions and reported.
        """
        name = self._tiers[from_index].name
        for entry in entries:
            self._num_evictions += 1
            if entry.is_partial:
                self._partials.forget(entry.key)
            self._observer.on_evict(entry, name)

    # -- maintenance -------------------------------------------------------------------------

    def discard(self, key: BlockHash) -> bool:
        """Remove exactly the entry `key` from every tier (its payload failed validation)."""
        with self._lock:
            removed = False
            for tier in self._tiers:
                entry = tier.evict(key)
                if entry is not None:
                    removed = True
                    self._num_discards += 1
                    self._observer.on_evict(entry, tier.name)
            self._partials.forget(key)
            return removed

    def clear(self, tier_name: str | None = None) -> None:
        """Drop every entry of one tier, or of all tiers (not counted as evictions)."""
        with self._lock:
            indexes = range(len(self._tiers)) if tier_name is None else [self._tier_index(tier_name)]
            for index in indexes:
                self._tiers[index].clear()
            self._partials.prune(self._tiers)

    def set_budget_bytes(self, budget_bytes: int, tier_name: str | None = None) -> None:
        """Change a tier's budget (the first tier by default); evictions are counted and reported."""
        with self._lock:
            index = self._tier_index(tier_name)
            self._demote(self._tiers[index].set_budget(budget_bytes), index)

    def stats(self) -> CacheStats:
        with self._lock:
            return snapshot(
                entries=[entry for tier in self._tiers for entry in tier.entries()],
                num_lookups=self._num_lookups,
                num_hit_tokens=self._num_hit_tokens,
                num_miss_tokens=self._num_miss_tokens,
                num_evictions=self._num_evictions,
                num_discards=self._num_discards,
                num_bytes=sum(tier.num_bytes for tier in self._tiers),
                budget_bytes=sum(tier.budget_bytes for tier in self._tiers),
                tokens_by_tier=dict(self._tokens_by_tier),
            )

    # -- helpers -----------------------------------------------------------------------------

    def _tier_index(self, tier_name: str | None) -> int:
        if tier_name is None:
            return 0
        for index, tier in enumerate(self._tiers):
            if tier.name == tier_name:
                return index
        raise ValueError(f"no tier named {tier_name!r}; this cache has: {', '.join(t.name for t in self._tiers)}")

    def _find(self, key: BlockHash) -> tuple[CacheEntry, int] | None:
        for index, tier in enumerate(self._tiers):
            entry = tier.get(key)
            if entry is not None:
                return entry, index
        return None
