"""Random workloads: the byte budget, chain connectivity, pins and lookup results hold after every step."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kvcellar.cache import Match, PrefixCache, Priority
from kvcellar.cache.reuse import EXACT, NEAR
from kvcellar.tiers.memory import MemoryTier

from .fakes import ATTENTION, B, RECURRENT, ROOT, SMALL_WINDOW, insert_chain, restored_tokens

MAX_TAILS = 3
# Prefixes of a few related conversations (many shared prefixes, tails, divergences) plus random prompts.
BASES = ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 2, 3, 4, 5, 6, 0, 0, 9, 10, 11, 12, 0, 0], [1, 2, 3, 0, 5])
prompts = st.one_of(
    st.builds(lambda base, size: base[:size], st.sampled_from(BASES), st.integers(0, 3 * B + 2)),
    st.lists(st.integers(0, 1), max_size=3 * B + 2),
)
ops = st.one_of(
    st.tuples(st.just("insert"), prompts, st.sampled_from(Priority), st.integers(1, 30), st.booleans()),
    st.tuples(st.just("lookup"), prompts, st.booleans()),
    st.tuples(st.just("budget"), st.integers(0, 150)),
    st.tuples(st.just("release")),
    st.tuples(st.just("discard"), st.integers(0, 50)),
)


def _insert(cache: PrefixCache, prompt: list[int], priority: Priority, num_bytes: int, with_logits: bool) -> None:
    keys = insert_chain(cache, prompt, num_bytes=num_bytes, priority=priority)
    if len(keys) < len(prompt) // B:
        return  # refused somewhere in the chain
    tail = prompt[len(keys) * B :]
    if tail or with_logits:
        parent = keys[-1] if keys else ROOT
        cache.insert_tail(parent, tail, "tail", max(1, num_bytes // 2), priority, with_logits)


def _check_match(cache: PrefixCache, match: Match, prompt: list[int], exact: bool) -> None:
    assert restored_tokens(match) == prompt[: match.num_tokens]
    assert match.num_tokens < len(prompt) or match.use_logits or not prompt
    if match.tail is not None and not (cache.capabilities.can_trim and not exact):
        assert match.num_tail_tokens == match.tail.num_tokens  # never trimmed
        assert match.tail.is_tail
    if exact:
        assert match.tail is None or match.use_logits
    assert sum(match.tokens_by_tier.values()) == match.num_tokens
    if prompt:  # the lookup finds the longest valid prefix, not just a valid one
        allow_trim = cache.capabilities.can_trim and not exact
        best = _best_restore_point(cache.tiers[0], prompt, allow_trim, exact)
        assert match.num_tokens == best
        assert match.use_logits == (best == len(prompt))


def _best_restore_point(tier: MemoryTier, prompt: list[int], allow_trim: bool, exact: bool) -> int:
    """Brute force over every entry reachable from the root: the largest valid restore point."""
    n = len(prompt)
    best = 0
    stack = [(ROOT, ())]
    while stack:
        parent, path = stack.pop()
        for entry in tier.children(parent):
            full = (*path, *entry.token_ids)
            if not entry.is_tail:
                stack.append((entry.key, full))
            is_prefix = list(full) == prompt[: len(full)]
            if is_prefix and len(full) == n and entry.has_logits:
                best = max(best, n)
            elif is_prefix and len(full) < n and not (exact and entry.is_tail):
                best = max(best, len(full))
            if allow_trim:
                common = next((i for i, (a, b) in enumerate(zip(full, prompt)) if a != b), min(len(full), n))
                best = max(best, min(common, n - 1))
    return best


def _check_tier(tier: MemoryTier, held: Match | None, held_intact: bool, connected: bool) -> None:
    if held is not None and held_intact:  # pinned entries are never evicted for space
        assert all(tier.get(entry.key) is entry for entry in held.entries)
    entries = tier.entries()
    assert tier.num_bytes <= tier.budget_bytes
    assert tier.num_bytes == sum(entry.num_bytes for entry in entries)
    assert sum(entry.is_tail for entry in entries) <= MAX_TAILS
    pinned = {id(entry) for entry in held.entries} if held is not None else set()
    assert all(entry.num_pins == (id(entry) in pinned) for entry in entries)
    if connected:  # no discard yet: evictions never broke a chain
        blocks = {entry.key for entry in entries if not entry.is_tail}
        assert all(entry.parent == ROOT or entry.parent in blocks for entry in entries)


@settings(max_examples=300, deadline=None)
@given(
    capabilities=st.sampled_from([ATTENTION, RECURRENT, SMALL_WINDOW]),
    reuse=st.sampled_from([EXACT, NEAR]),
    policy=st.sampled_from(["priority-lru", "lru"]),
    budget=st.integers(0, 150),
    steps=st.lists(ops, max_size=40),
)
def test_random_workload_keeps_invariants(capabilities, reuse, policy, budget, steps) -> None:
    tier = MemoryTier(budget, policy=policy)
    cache = PrefixCache(ROOT, capabilities, [tier], reuse=reuse, max_tail_entries=MAX_TAILS)
    exact = reuse is EXACT
    held: Match | None = None
    connected = held_intact = True
    for step in steps:
        kind = step[0]
        if kind == "insert":
            _insert(cache, *step[1:])
            held_intact = held_intact and not step[4]  # a tail with logits explicitly replaces one without
        elif kind == "lookup":
            _, prompt, hold = step
            match = cache.lookup(prompt)
            _check_match(cache, match, prompt, exact)
            if hold and held is None:
                held, held_intact = match, True
            else:
                cache.release(match)
        elif kind == "budget":
            before = (tier.budget_bytes, tier.num_bytes, tier.num_entries)
            try:
                cache.set_budget_bytes(step[1])
            except ValueError:
                assert held is not None  # only pins can block a budget change here
                assert (tier.budget_bytes, tier.num_bytes, tier.num_entries) == before
            else:
                assert tier.budget_bytes == step[1]
        elif kind == "release" and held is not None:
            cache.release(held)
            held = None
        elif kind == "discard" and tier.num_entries:
            entries = tier.entries()
            cache.discard(entries[step[1] % len(entries)].key)
            connected = held_intact = False
        _check_tier(tier, held, held_intact, connected)
    if held is not None:
        cache.release(held)
    assert all(entry.num_pins == 0 for entry in tier.entries())
