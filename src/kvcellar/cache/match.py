"""What a lookup found, and the rules that choose the restore point.

Operations: `Match` (the result handed to the engine), `RestorePoint` (a
candidate position p with the entries it needs) and `choose_restore_point`
(the pure rule: largest valid p, given the chain hit, its children and the
namespace's `ReuseRule`, cache/reuse.py).

Rules (n prompt tokens, B = block_size, k leading full blocks found):
- every block boundary jB, j <= k, the rule `resumes_at` is a candidate;
- a tail child of the last hit (or of the root) whose tokens are a prefix
  of the rest gives p = kB + len (a "full tail match": valid for every
  layer kind, a recurrent checkpoint exists at its end), where the rule
  `restores_tails`;
- with trimming allowed (capabilities.can_trim and the rule `trims_entries`),
  any child block or tail sharing c >= 1 leading tokens with the rest
  gives p = kB + c;
- p == n is valid only through a full tail match whose entry has logits
  (under every rule); otherwise p == n becomes n - 1 when trimming is
  allowed, else it is dropped;
- when kB == n, the children of block k-1's parent are candidates too, so the
  fallback below n can end inside the last block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from kvcellar.cache.entry import CacheEntry
from kvcellar.cache.reuse import ReuseRule


@dataclass(frozen=True)
class Match:
    """The longest restorable prefix: `blocks` in full, then `num_tail_tokens` of `tail`.

    `tail` is a tail entry, or a block or tail entry trimmed to its
    first `num_tail_tokens` tokens. With `use_logits`, the prompt is fully
    covered and `tail` carries the next-token logits: nothing to compute.
    The entries are pinned: call `PrefixCache.release(match)` after restoring.
    """

    num_tokens: int
    blocks: tuple[CacheEntry, ...] = ()
    tail: CacheEntry | None = None
    num_tail_tokens: int = 0
    use_logits: bool = False
    tokens_by_tier: dict[str, int] = field(default_factory=dict)
    load_s_by_tier: dict[str, float] = field(default_factory=dict)  # time spent in each tier's prepare_load
    loaded_bytes_by_tier: dict[str, int] = field(default_factory=dict)  # payload bytes each tier handed out
    # Payloads of the copies promoted into the first tier, by key: already in the fastest medium (e.g. on the
    # GPU), so restoring from them spares a second copy out of the slower tier.
    promoted_payloads: dict[object, object] = field(default_factory=dict)

    @property
    def is_hit(self) -> bool:
        return self.num_tokens > 0

    def payload_of(self, entry: CacheEntry) -> object:
        """The payload to restore `entry` from: its first-tier copy if it was just promoted, else its own."""
        return self.promoted_payloads.get(entry.key, entry.payload)

    @property
    def entries(self) -> tuple[CacheEntry, ...]:
        """Every pinned entry, in restore order."""
        return self.blocks if self.tail is None else (*self.blocks, self.tail)


@dataclass(frozen=True)
class RestorePoint:
    num_blocks: int  # leading chain blocks restored in full
    entry: CacheEntry | None = None  # restored after the blocks, possibly trimmed
    num_entry_tokens: int = 0
    use_logits: bool = False

    def num_tokens(self, block_size: int) -> int:
        return self.num_blocks * block_size + self.num_entry_tokens

    def rank(self, block_size: int) -> tuple[int, bool, bool, bool]:
        """Larger is better: more tokens; then logits; then no extra entry; then an untrimmed entry."""
        is_whole = self.entry is not None and self.num_entry_tokens == self.entry.num_tokens
        return (self.num_tokens(block_size), self.use_logits, self.entry is None, is_whole)


def choose_restore_point(
    token_ids: Sequence[int],
    chain: Sequence[CacheEntry],
    children: Sequence[CacheEntry],
    previous_children: Sequence[CacheEntry],
    *,
    block_size: int,
    can_trim: bool,
    rule: ReuseRule,
) -> RestorePoint:
    """The best valid restore point (RestorePoint(0) on a miss).

    `chain` holds the k leading blocks found; `children` the entries whose
    parent is the chain's last key (or the root); `previous_children` those
    whose parent is block k-1's parent (used only when kB == n). `can_trim`:
    the layout can cut an entry short (LayoutCapabilities.can_trim).
    """
    n = len(token_ids)
    k = len(chain)
    if n == 0:
        return RestorePoint(0)
    allow_trim = can_trim and rule.trims_entries
    raw = [RestorePoint(k), *_child_points(k, children, token_ids[k * block_size :], allow_trim)]
    if k > 0:
        raw.append(RestorePoint(k - 1))
        raw.append(RestorePoint(rule.last_boundary(k, n, block_size)))
        if k * block_size == n:
            rest = token_ids[(k - 1) * block_size :]
            raw.extend(_child_points(k - 1, previous_children, rest, allow_trim))
    best = RestorePoint(0)
    for point in raw:
        valid = _validate(point, n, chain, block_size, allow_trim, rule)
        if valid is not None and valid.rank(block_size) > best.rank(block_size):
            best = valid
    return best


def _child_points(
    num_blocks: int, children: Sequence[CacheEntry], rest: Sequence[int], allow_trim: bool
) -> Iterator[RestorePoint]:
    for child in children:
        common = _common_prefix_len(child.token_ids, rest)
        if child.is_tail and common == child.num_tokens:
            # Full tail match. A 0-token tail only matters for its logits at p == n.
            use_logits = child.has_logits and common == len(rest)
            if common > 0 or use_logits:
                yield RestorePoint(num_blocks, child, common, use_logits)
        elif allow_trim and common >= 1 and (child.is_tail or common < child.num_tokens):
            # Trimmed; a block matching in full is the next chain block, already a boundary.
            yield RestorePoint(num_blocks, child, common)


def _validate(
    point: RestorePoint, n: int, chain: Sequence[CacheEntry], block_size: int, allow_trim: bool, rule: ReuseRule
) -> RestorePoint | None:
    """`point` itself, its n - 1 trim, or None when it breaks the rules."""
    p = point.num_tokens(block_size)
    if point.use_logits:
        return point
    if point.entry is not None and not rule.restores_tails:
        return None
    if p < n:
        return point if point.entry is not None or rule.resumes_at(p, n) else None
    if not allow_trim or p == 0:
        return None
    # p == n without logits: keep one token to compute, cut from the last restored entry.
    if point.entry is None:
        entry, num_blocks, num_entry_tokens = chain[point.num_blocks - 1], point.num_blocks - 1, block_size - 1
    else:
        entry, num_blocks, num_entry_tokens = point.entry, point.num_blocks, point.num_entry_tokens - 1
    if num_entry_tokens == 0:
        return RestorePoint(num_blocks)
    return RestorePoint(num_blocks, entry, num_entry_tokens)


def _common_prefix_len(left: Sequence[int], right: Sequence[int]) -> int:
    count = 0
    for a, b in zip(left, right):
        if a != b:
            break
        count += 1
    return count
